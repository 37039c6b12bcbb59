#!/usr/bin/env bash
# End-to-end test of petrel-operator against a real cluster.
#
# Runs only when KUBECONFIG points at a reachable cluster; otherwise prints that it
# skipped and exits 0. Steps: install the CRDs (server-side, so the apiserver checks the
# CEL rules compile), check that CEL refuses an open relay, run the operator locally
# against the cluster, apply the examples into a scratch namespace, and wait for the
# operator's work: rendered objects with owner references, DkimKey Published with a TXT
# record, MailDomain DNS guidance in status, SmtpListener status with observedGeneration.
# (MTA pods becoming Ready needs the petrel-mta image in the cluster: checked only when
# PETREL_E2E_WAIT_PODS=1.)
set -euo pipefail

repo="$(cd "$(dirname "$0")/../.." && pwd)"
ns="petrel-e2e-$$"

if [ -z "${KUBECONFIG:-}" ]; then
    echo "e2e/operator: SKIPPED (KUBECONFIG is not set; point it at a test cluster to run)"
    exit 0
fi
if ! kubectl version --request-timeout=5s >/dev/null 2>&1; then
    echo "e2e/operator: SKIPPED (cluster in KUBECONFIG=$KUBECONFIG is not reachable)"
    exit 0
fi

cd "$repo"
cargo build --quiet -p operator --bin petrel-operator
bin="${CARGO_TARGET_DIR:-$repo/target}/debug/petrel-operator"

operator_pid=""
cleanup() {
    [ -n "$operator_pid" ] && kill "$operator_pid" 2>/dev/null || true
    kubectl delete namespace "$ns" --wait=false >/dev/null 2>&1 || true
}
trap cleanup EXIT

fail() { echo "e2e/operator: FAIL: $*" >&2; exit 1; }

kubectl apply --server-side -f manifests/crds/ >/dev/null
kubectl wait --for=condition=Established crd --all --timeout=60s >/dev/null
kubectl create namespace "$ns" >/dev/null

# CEL catches an open relay at apply time.
if kubectl -n "$ns" apply -f - >/dev/null 2>/tmp/petrel-e2e-cel.err <<YAML
apiVersion: mail.petrel.dev/v1alpha1
kind: RelayPolicy
metadata: {name: open}
spec: {clientNetworks: ["0.0.0.0/0"]}
YAML
then fail "an open relay was accepted"; fi
grep -q "open relay" /tmp/petrel-e2e-cel.err || fail "open relay refused for the wrong reason: $(cat /tmp/petrel-e2e-cel.err)"

"$bin" run > "/tmp/petrel-e2e-operator.log" 2>&1 &
operator_pid=$!

for f in manifests/examples/*.yaml; do
    sed "s/namespace: mail/namespace: $ns/" "$f" | kubectl apply -f - >/dev/null
done

wait_for() { # description, command...
    local what="$1"; shift
    for _ in $(seq 1 60); do
        if "$@" >/dev/null 2>&1; then echo "e2e/operator: ok: $what"; return 0; fi
        sleep 2
    done
    tail -50 /tmp/petrel-e2e-operator.log >&2
    fail "timed out waiting for: $what"
}

wait_for "StatefulSet mx rendered" kubectl -n "$ns" get statefulset mx
wait_for "ConfigMap owned by the SmtpListener" bash -c \
    "kubectl -n $ns get configmap mx-config -o jsonpath='{.metadata.ownerReferences[0].kind}' | grep -qx SmtpListener"
wait_for "DkimKey Published" bash -c \
    "kubectl -n $ns get dkimkey example-com-ed25519 -o jsonpath='{.status.phase}' | grep -Eqx 'Published|Active'"
wait_for "MailDomain DNS guidance" bash -c \
    "kubectl -n $ns get maildomain example-com -o jsonpath='{.status.dns[*].type}' | grep -q MX"
wait_for "SmtpListener status observedGeneration" bash -c \
    "kubectl -n $ns get smtplistener mx -o jsonpath='{.status.observedGeneration}' | grep -qx 1"
if [ "${PETREL_E2E_WAIT_PODS:-0}" = 1 ]; then
    wait_for "SmtpListener Ready" kubectl -n "$ns" wait smtplistener/mx --for=condition=Ready --timeout=5s
fi
kubectl get -n "$ns" smtplisteners,maildomains,dkimkeys,relaypolicies
echo "e2e/operator: 1 passed, 0 failed"
