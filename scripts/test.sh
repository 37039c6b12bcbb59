#!/usr/bin/env bash
# The whole Petrel test suite: formatting, lints, Rust tests, and the end-to-end suite that
# drives the real binaries with independent peers (Python smtplib/aiosmtpd, swaks, Postfix
# tools, dkimpy, HAProxy). Installs what those tests need when it is missing, and says so.
set -euo pipefail
cd "$(dirname "$0")/.."

# Each step says how long the run has taken so far, so a slow CI run shows where its time
# went (the whole suite must stay under 30 minutes on 2 cores).
say() { printf '\n==> [%dm%02ds] %s\n' $((SECONDS / 60)) $((SECONDS % 60)) "$*"; }

# --- test dependencies -----------------------------------------------------------------
apt_missing=()
command -v swaks >/dev/null || apt_missing+=(swaks)
# swaks speaks STARTTLS through Net::SSLeay (a Recommends that minimal installs skip).
perl -MNet::SSLeay -MIO::Socket::SSL -e1 2>/dev/null || apt_missing+=(libnet-ssleay-perl libio-socket-ssl-perl)
command -v smtp-source >/dev/null || [ -x /usr/sbin/smtp-source ] || apt_missing+=(postfix)
command -v dnsmasq >/dev/null || [ -x /usr/sbin/dnsmasq ] || apt_missing+=(dnsmasq-base)
command -v openssl >/dev/null || apt_missing+=(openssl)
command -v dovecot >/dev/null || [ -x /usr/sbin/dovecot ] || apt_missing+=(dovecot-lmtpd)
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || apt_missing+=(haproxy)
# Two real authoritative DNS servers for operator/tests/authoritative_dns.rs.
command -v nsd >/dev/null || [ -x /usr/sbin/nsd ] || apt_missing+=(nsd)
# A Redis shared by three MTAs for e2e/test_fleet_limits.py (rate limits of the fleet).
command -v redis-server >/dev/null || [ -x /usr/bin/redis-server ] || apt_missing+=(redis-server)
# Signed test zones (ldns-keygen, ldns-signzone) and an independent validator (delv) for
# e2e/test_dane.py (DANE, RFC 7672).
command -v ldns-signzone >/dev/null || apt_missing+=(ldnsutils)
command -v delv >/dev/null || apt_missing+=(bind9-dnsutils)
if [ ${#apt_missing[@]} -gt 0 ]; then
    say "installing Debian packages needed by the tests: ${apt_missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "postfix postfix/main_mailer_type select No configuration" | $SUDO debconf-set-selections
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${apt_missing[@]}" >/dev/null
fi

py_missing=()
python3 -c 'import pytest' 2>/dev/null || py_missing+=(pytest)
python3 -c 'import aiosmtpd' 2>/dev/null || py_missing+=(aiosmtpd)
python3 -c 'import dkim' 2>/dev/null || py_missing+=(dkimpy)
python3 -c 'import dns' 2>/dev/null || py_missing+=(dnspython)
python3 -c 'import nacl' 2>/dev/null || py_missing+=(pynacl)
python3 -c 'import yaml' 2>/dev/null || py_missing+=(pyyaml)
python3 -c 'import cryptography' 2>/dev/null || py_missing+=(cryptography)
# The RFC 8460 report schema of e2e/test_tls_rpt.py; jsonschema checks `date-time` only
# with rfc3339-validator installed.
python3 -c 'import jsonschema' 2>/dev/null || py_missing+=(jsonschema)
python3 -c 'import rfc3339_validator' 2>/dev/null || py_missing+=(rfc3339-validator)
if [ ${#py_missing[@]} -gt 0 ]; then
    say "installing Python packages needed by the tests: ${py_missing[*]}"
    python3 -m pip install -q --disable-pip-version-check "${py_missing[@]}"
fi

# --- Rust ------------------------------------------------------------------------------
# A full run builds once from scratch: incremental caches would only double the disk used.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
say "disk before the build: $(df -h --output=avail . | tail -1 | tr -d ' ') free"
say "cargo fmt --check"
cargo fmt --all -- --check

say "import direction: no module imports one that imports it back (scripts/import_cycles.py)"
for src in mta/src operator/src crds/src; do
    python3 scripts/import_cycles.py --check "$src"
done

say "cargo clippy -- -D warnings"
cargo clippy --workspace --all-targets --quiet -- -D warnings

say "cargo check of the fuzz targets (mta/fuzz/smoke.sh runs them; here they only must build)"
CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}" \
    cargo check --quiet --manifest-path mta/fuzz/Cargo.toml --bins

say "cargo test"
cargo test --workspace --quiet

say "building binaries for the end-to-end suite"
cargo build --workspace --bins --quiet

# --- rendered Kubernetes objects ---------------------------------------------------------
say "validating every rendered object with kubernetes-validate"
operator/tests/validate_rendered.sh

say "Helm chart: lint, kubernetes-validate, checkov, schema refusals, install.yaml drift"
charts/petrel/tests/check.sh

# --- container images ----------------------------------------------------------------------
# Release binaries in images built offline (podman; see images/Containerfile). The live
# cluster suite and e2e/test_image.py run these.
say "release build and container images"
# The images carry no debug info (build-images.sh strips it), so none is generated here.
CARGO_PROFILE_RELEASE_DEBUG=0 cargo build --release --quiet -p mta -p operator --bins
scripts/build-images.sh

# --- end-to-end, with real peers ---------------------------------------------------------
# e2e/operator/ is the live-cluster suite: KUBECONFIG's cluster, else one started with
# ../shared/k8s/cluster.sh (stopped at the end, also on failure), else SKIPPED. Its
# progress lines ([live] ...) and its total time are shown (-s).
export PETREL_MTA_BIN="$PWD/target/debug/petrel-mta"
say "live-cluster suite (e2e/operator/)"
python3 -m pytest -q -rs -s e2e/operator

say "end-to-end suite (e2e/)"
python3 -m pytest -q -rs e2e --ignore=e2e/operator

say "all tests passed"
