#!/usr/bin/env bash
# Static checks of the Helm chart charts/petrel, no cluster needed. Exits non-zero when any
# check fails:
#   * helm lint --strict with the default values and with each charts/petrel/ci/*.yaml;
#   * helm template of each -> kubernetes-validate --strict (Kubernetes 1.30 and 1.37), the
#     example custom resources against the CRD schemas, the chart's CRDs;
#   * checkov (framework kubernetes): no failed check outside tests/checkov-allowlist.yaml;
#   * values.schema.json refuses an unknown key, a wrong enum and a wrong type with a clear
#     message, and every value it defines is in the README's table;
#   * manifests/install.yaml is a fresh render (and charts/petrel/crds/ = manifests/crds/).
#
# Usage: charts/petrel/tests/check.sh                  run the checks
#        charts/petrel/tests/check.sh --update-install rewrite manifests/install.yaml
#
# Tools: helm from PATH, else `../shared/k8s/cluster.sh tools`; kubernetes-validate and
# checkov (pinned below) in a virtualenv at $PETREL_CHART_TOOLS (default
# ~/.cache/petrel/chart-tools), created with pip on first use.
set -euo pipefail

KUBERNETES_VALIDATE_VERSION=1.37.0
CHECKOV_VERSION=3.3.30
K8S_VERSIONS=(1.30.0 1.37.0)   # the chart's kubeVersion floor, and the newest schemas

chart_rel=charts/petrel
repo="$(cd "$(dirname "$0")/../../.." && pwd)"
cd "$repo"
chart="$repo/$chart_rel"
tests="$chart/tests"

# --- tools ---------------------------------------------------------------------------------
if ! command -v helm >/dev/null 2>&1; then
    PATH="$("$repo/../shared/k8s/cluster.sh" tools):$PATH"
    export PATH
fi
tools="${PETREL_CHART_TOOLS:-$HOME/.cache/petrel/chart-tools}"
if ! "$tools/bin/kubernetes-validate" --version 2>/dev/null | grep -qx "$KUBERNETES_VALIDATE_VERSION" \
    || ! "$tools/bin/checkov" --version 2>/dev/null | grep -qx "$CHECKOV_VERSION"; then
    echo "check: installing kubernetes-validate $KUBERNETES_VALIDATE_VERSION and checkov $CHECKOV_VERSION into $tools" >&2
    python3 -m venv "$tools"
    "$tools/bin/pip" install --quiet --disable-pip-version-check \
        "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" "checkov==$CHECKOV_VERSION" >&2
fi
py="$tools/bin/python"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# --- the plain-YAML install path -----------------------------------------------------------
install_cmd="helm template petrel $chart_rel --namespace petrel-system"
render_install() {
    cat <<EOF
# Petrel for clusters without Helm: the petrel-system namespace (Pod Security
# "restricted") and the petrel-operator with its ServiceAccount, RBAC and metrics Service.
# Generated from the Helm chart with its default values, do not edit:
#   $install_cmd
# (charts/petrel/tests/check.sh --update-install rewrites this file; check.sh fails when
# it differs from a fresh render.)
#
# Install (the CRDs first; Helm users get them from charts/petrel/crds/):
#   kubectl apply --server-side -f manifests/crds/ && kubectl apply -f manifests/install.yaml
# Then apply SmtpListener, MailDomain, DkimKey and RelayPolicy resources, e.g. from
# manifests/examples/, and watch them:
#   kubectl get smtplisteners,maildomains,dkimkeys,relaypolicies -A
---
apiVersion: v1
kind: Namespace
metadata:
  name: petrel-system
  labels:
    app.kubernetes.io/part-of: petrel
    pod-security.kubernetes.io/enforce: restricted
EOF
    $install_cmd
}

if [ "${1:-}" = "--update-install" ]; then
    render_install >manifests/install.yaml
    echo "check: wrote manifests/install.yaml"
    exit 0
elif [ $# -gt 0 ]; then
    sed -n '2,18p' "$0"
    exit 2
fi

failures=0
fail() {
    echo "FAIL $*"
    failures=$((failures + 1))
}

# --- lint and render each value set --------------------------------------------------------
# Value sets: "values" is the chart's values.yaml alone; the others are named after their
# ci/ file ("namespaced" for ci/namespaced-values.yaml); "install" is manifests/install.yaml.
sets=(values)
declare -A set_file=([values]="")
for f in "$chart"/ci/*.yaml; do
    name="$(basename "$f" .yaml)"
    name="${name%-values}"
    sets+=("$name")
    set_file[$name]="$f"
done

echo "== helm lint --strict ($(helm version --short))"
for s in "${sets[@]}"; do
    args=()
    [ -n "${set_file[$s]}" ] && args=(-f "${set_file[$s]}")
    if out="$(helm lint --strict "$chart" "${args[@]}" 2>&1)"; then
        echo "ok   $s: $(tail -n 1 <<<"$out")"
    else
        fail "helm lint $s"
        echo "$out"
    fi
    mkdir -p "$work/rendered/$s"
    if ! helm template petrel "$chart" --namespace petrel-system "${args[@]}" \
        >"$work/$s.yaml" 2>"$work/$s.err"; then
        fail "helm template $s: $(cat "$work/$s.err")"
        continue
    fi
    cp "$work/$s.yaml" "$work/rendered/$s/all.yaml"
done
if [ -f manifests/install.yaml ]; then
    sets+=(install)
    mkdir -p "$work/rendered/install"
    cp manifests/install.yaml "$work/install.yaml"
    cp manifests/install.yaml "$work/rendered/install/all.yaml"
fi

# --- kubernetes-validate and the CRD schemas ----------------------------------------------
echo "== kubernetes-validate --strict (Kubernetes ${K8S_VERSIONS[*]})"
crd_dir=manifests/crds
for s in "${sets[@]}"; do
    [ -f "$work/$s.yaml" ] || continue
    split="$work/split/$s"
    counts="$("$py" "$tests/checks.py" split "$work/$s.yaml" "$split")" || { fail "split $s"; continue; }
    for v in "${K8S_VERSIONS[@]}"; do
        if out="$("$tools/bin/kubernetes-validate" --strict --quiet -k "$v" "$split"/builtin/*.yaml 2>&1)"; then
            :
        else
            fail "kubernetes-validate $s (Kubernetes $v)"
            echo "$out"
        fi
    done
    line="ok   $s: $counts"
    if compgen -G "$split/petrel/*.yaml" >/dev/null; then
        if out="$("$py" "$tests/checks.py" crs "$crd_dir" "$split"/petrel/*.yaml)"; then
            line+="; $out"
        else
            fail "custom resources of $s"
            echo "$out"
        fi
    fi
    if compgen -G "$split/other/*.yaml" >/dev/null; then
        line+="; not validated (no schema here): $(cd "$split/other" && ls | sed 's/^[0-9]*-//; s/\.yaml$//' | paste -sd ' ')"
    fi
    echo "$line"
done
if compgen -G "$chart/crds/*.yaml" >/dev/null; then
    for v in "${K8S_VERSIONS[@]}"; do
        "$tools/bin/kubernetes-validate" --strict --quiet -k "$v" "$chart"/crds/*.yaml \
            || fail "kubernetes-validate $chart_rel/crds (Kubernetes $v)"
    done
    if diff -r -x '*.actual' "$crd_dir" "$chart/crds" >"$work/crds.diff"; then
        echo "ok   $chart_rel/crds: $(ls "$chart"/crds/*.yaml | wc -l) CRDs, valid, equal to $crd_dir"
    else
        fail "$chart_rel/crds differs from $crd_dir; regenerate both: cargo run -p crds --bin crdgen"
        cat "$work/crds.diff"
    fi
else
    fail "$chart_rel/crds/ has no CRDs; generate them: cargo run -p crds --bin crdgen"
fi

# --- checkov -------------------------------------------------------------------------------
echo "== checkov $CHECKOV_VERSION (framework kubernetes)"
# One run per value set: checkov's graph checks (CKV2_*) match objects across everything
# one run reads, so a NetworkPolicy rendered by one set would satisfy another's pods.
# --skip-download: no call to the Prisma Cloud API (guidelines), which CI may not reach.
checkov_results=()
for s in "${sets[@]}"; do
    [ -d "$work/rendered/$s" ] || continue
    "$tools/bin/checkov" --directory "$work/rendered/$s" --framework kubernetes --skip-download \
        --quiet --output json >"$work/checkov-$s.json" 2>"$work/checkov-$s.err" || true
    if [ -s "$work/checkov-$s.json" ]; then
        checkov_results+=("$work/checkov-$s.json")
    else
        fail "checkov did not run on $s"
        cat "$work/checkov-$s.err"
    fi
done
if ! "$py" "$tests/checks.py" checkov "$chart_rel/tests/checkov-allowlist.yaml" "${checkov_results[@]}"; then
    fail "checkov"
fi

# --- values.schema.json --------------------------------------------------------------------
echo "== values.schema.json"
# Each case: --set arguments, then a fragment the error must contain.
schema_cases=(
    "unknownKey=1|additional properties 'unknownKey' not allowed"
    "image.tga=1|additional properties 'tga' not allowed"
    "logFormat=xml|value must be one of 'text', 'json'"
    "logLevel=verbose|value must be one of 'error', 'warn', 'info', 'debug', 'trace'"
    "image.pullPolicy=Sometimes|value must be one of 'IfNotPresent', 'Always', 'Never'"
    "metrics.port=http|got string, want integer"
    "image.digest=latest|does not match pattern"
    "watchNamespaces[0]=Mail_Team|does not match pattern"
)
for case in "${schema_cases[@]}"; do
    set_arg="${case%%|*}"
    want="${case#*|}"
    if out="$(helm template petrel "$chart" --set "$set_arg" 2>&1)"; then
        fail "schema accepted --set $set_arg"
    elif grep -qF -- "$want" <<<"$out"; then
        echo "ok   --set $set_arg refused: $(grep -F -- "$want" <<<"$out" | head -n 1 | sed 's/^ *- //')"
    else
        fail "--set $set_arg refused without \"$want\":"
        echo "$out"
    fi
done
# A rule the schema cannot state: the examples must be in a watched namespace.
if out="$(helm template petrel "$chart" --set examples.enabled=true --set 'watchNamespaces={mail}' 2>&1)"; then
    fail "examples outside watchNamespaces were accepted"
elif grep -qF "is not in watchNamespaces" <<<"$out"; then
    echo "ok   examples outside watchNamespaces refused: $(grep -o 'examples.namespace .*' <<<"$out" | head -n 1)"
else
    fail "examples outside watchNamespaces refused without a clear message:"
    echo "$out"
fi
if out="$("$py" "$tests/checks.py" readme "$chart_rel/values.schema.json" "$chart_rel/README.md")"; then
    echo "ok   $out"
else
    fail "README values table"
    echo "$out"
fi

# --- drift of manifests/install.yaml -------------------------------------------------------
echo "== manifests/install.yaml"
render_install >"$work/install.fresh.yaml"
if [ ! -f manifests/install.yaml ]; then
    fail "manifests/install.yaml is missing; create it: $chart_rel/tests/check.sh --update-install"
elif diff -u manifests/install.yaml "$work/install.fresh.yaml" >"$work/install.diff"; then
    echo "ok   manifests/install.yaml equals a fresh render ($install_cmd)"
else
    fail "manifests/install.yaml differs from a fresh render (diff below); regenerate it: $chart_rel/tests/check.sh --update-install"
    cat "$work/install.diff"
fi

echo
if [ "$failures" -eq 0 ]; then
    echo "check: all chart checks passed"
else
    echo "check: $failures check(s) FAILED"
    exit 1
fi
