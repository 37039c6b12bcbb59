#!/usr/bin/env bash
# Validates every object `petrel-operator render` produces for manifests/examples/ (and the
# generated CRDs, and the operator's own install manifest, rendered from the Helm chart) with kubernetes-validate
# (PyPI), strict mode, against a recent Kubernetes. Exits non-zero when any object fails.
#
# Usage: operator/tests/validate_rendered.sh [KUBERNETES_VERSION]   (default 1.37.0)
# Respects CARGO_TARGET_DIR; installs kubernetes-validate with pip when missing.
set -euo pipefail

k8s_version="${1:-1.37.0}"
repo="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$repo"

if ! command -v kubernetes-validate >/dev/null 2>&1; then
    echo "validate_rendered: installing kubernetes-validate" >&2
    python3 -m pip install --quiet kubernetes-validate >&2
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

cargo build --quiet -p operator --bin petrel-operator
bin="${CARGO_TARGET_DIR:-$repo/target}/debug/petrel-operator"
"$bin" render -f manifests/examples/ > "$work/rendered.yaml"

# One file per document, so a failure names the object.
python3 - "$work" <<'PY'
import sys, pathlib
work = pathlib.Path(sys.argv[1])
docs = [d for d in (work / "rendered.yaml").read_text().split("\n---\n")]
n = 0
for doc in docs:
    body = "\n".join(l for l in doc.splitlines() if l.strip() != "---" and not l.startswith("# note:"))
    if body.strip():
        n += 1
        (work / f"object-{n:03d}.yaml").write_text(body + "\n")
print(f"validate_rendered: {n} rendered objects", file=sys.stderr)
if n == 0:
    sys.exit("validate_rendered: render produced no objects")
PY

status=0
installs=(manifests/crds/*.yaml manifests/install.yaml)
kubernetes-validate --strict --quiet -k "$k8s_version" "$work"/object-*.yaml "${installs[@]}" || status=$?
count=$(( $(ls "$work"/object-*.yaml | wc -l) + $(cat "${installs[@]}" | grep -c '^kind:') ))
if [ "$status" -eq 0 ]; then
    echo "validate_rendered: $count objects valid for Kubernetes $k8s_version"
    echo "$count passed, 0 failed"
else
    echo "validate_rendered: FAILED (kubernetes-validate exit $status)" >&2
fi
exit "$status"
