"""The Helm chart on a real cluster, as a user meets it (charts/petrel).

 1. A value the schema refuses makes `helm install` fail before anything is created.
 2. `helm install` with the example resources: operator Ready, MTA pods Ready, a message
    sent into a pod is delivered.
 3. `helm upgrade` changing the log level rolls the operator and nothing else.
 4. `helm uninstall` removes everything but the CRDs and the users' own resources.
 5. Install again after the uninstall works.
 6. Namespaced mode (watchNamespaces): Roles only, the examples still run; then uninstall,
    leaving the cluster to the next suite.

Runs before test_live_cluster.py (file order) on the same cluster.
"""

import re
import smtplib
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from live import CLUSTER_SH, ROOT, log, poll  # noqa: E402

CHART = ROOT / "charts" / "petrel"
RELEASE, OPERATOR_NS, EXAMPLES_NS = "petrel", "petrel-helm-system", "petrel-helm"
LISTENER = "petrel-example"


def helm_path():
    import shutil
    found = shutil.which("helm")
    if found:
        return found
    tools = subprocess.run(["bash", str(CLUSTER_SH), "tools"], capture_output=True, text=True,
                           check=True).stdout.strip().splitlines()[-1]
    return str(Path(tools) / "helm")


@pytest.fixture(scope="module")
def helm(kube):
    binary = helm_path()

    def run(*args, check=True):
        p = subprocess.run([binary, *args], capture_output=True, text=True, env=kube.env,
                           timeout=600)
        if check and p.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed:\n{p.stdout}\n{p.stderr}")
        return p

    kube.run("create", "namespace", EXAMPLES_NS, check=False)
    yield run
    run("uninstall", RELEASE, "-n", OPERATOR_NS, "--wait", check=False)
    kube.run("delete", "namespace", EXAMPLES_NS, OPERATOR_NS, "--wait=false", check=False)


def install(helm, *extra):
    return helm("install", RELEASE, str(CHART), "-n", OPERATOR_NS, "--create-namespace",
                "--set", "examples.enabled=true", "--set", f"examples.namespace={EXAMPLES_NS}",
                "--wait=legacy", "--timeout", "5m", *extra)


def operator_pod(kube):
    items = kube.json("get", "pods", "-n", OPERATOR_NS, "-l",
                      "app.kubernetes.io/component=operator")["items"]
    return [p for p in items if not p["metadata"].get("deletionTimestamp")]


def mta_pods(kube):
    return {p["metadata"]["name"]: p["metadata"]["uid"] for p in kube.json(
        "get", "pods", "-n", EXAMPLES_NS, "-l", f"app.kubernetes.io/instance={LISTENER}")["items"]}


def test_1_a_schema_violation_fails_before_anything_is_created(kube, helm):
    p = helm("install", RELEASE, str(CHART), "-n", OPERATOR_NS, "--create-namespace",
             "--set", "logFormat=xml", check=False)
    assert p.returncode != 0
    assert "logFormat" in p.stderr and "json" in p.stderr, p.stderr
    assert RELEASE not in helm("list", "-A", "-q").stdout
    assert kube.get("namespace", OPERATOR_NS, "default") is None or \
        kube.json("get", "deployments", "-n", OPERATOR_NS)["items"] == []
    assert kube.run("get", "clusterrole", "petrel-operator", check=False).returncode != 0


def test_2_install_gives_a_working_mta_fleet(kube, helm):
    out = install(helm).stdout
    assert "kubectl" in out and "smtplistener" in out.lower(), "NOTES tell what to do next"
    kube.wait("--for=condition=Available", "deployment", "-l",
              "app.kubernetes.io/component=operator", "-n", OPERATOR_NS)
    kube.wait("--for=condition=Ready", f"smtplistener/{LISTENER}", "-n", EXAMPLES_NS,
              timeout=300)
    pod = next(iter(mta_pods(kube)))
    ip = kube.json("get", "pod", pod, "-n", EXAMPLES_NS)["status"]["podIP"]

    def accepts_alice():
        # Ready says the pods run; the MailDomain may reach their config a moment later
        # (the operator's ConfigMap update, then the MTA's reload).
        with smtplib.SMTP(ip, 10025, timeout=30) as s:
            s.ehlo("e2e.test")
            s.mail("someone@sender.test")
            return s.rcpt("alice@example.test")[0] == 250

    poll(accepts_alice, timeout=120, what="the pod accepting mail for alice@example.test")
    with smtplib.SMTP(ip, 10025, timeout=30) as s:
        s.ehlo("e2e.test")
        assert not s.sendmail("someone@sender.test", ["alice@example.test"],
                              "Subject: helm\r\nMessage-ID: <helm@e2e.test>\r\n\r\nhi\r\n")
    poll(lambda: re.search(r"delivered.*alice@example\.test|alice@example\.test.*delivered",
                           kube.logs(pod, EXAMPLES_NS)), what="delivered line for alice")


def test_3_upgrade_rolls_the_operator_and_nothing_else(kube, helm):
    before_op = operator_pod(kube)[0]["metadata"]["uid"]
    before_mta = mta_pods(kube)
    listener_rv = kube.get("smtplistener", LISTENER, EXAMPLES_NS)["metadata"]["generation"]
    helm("upgrade", RELEASE, str(CHART), "-n", OPERATOR_NS, "--reuse-values",
         "--set", "logLevel=debug", "--wait=legacy", "--timeout", "5m")
    kube.run("rollout", "status", "deployment", "-l", "app.kubernetes.io/component=operator",
             "-n", OPERATOR_NS, "--timeout=180s", check=False)
    pods = poll(lambda: [p for p in operator_pod(kube) if p["metadata"]["uid"] != before_op],
                what="a new operator pod")
    env = {e["name"]: e.get("value") for e in pods[0]["spec"]["containers"][0].get("env", [])}
    assert env.get("RUST_LOG") == "debug", env
    assert mta_pods(kube) == before_mta, "MTA pods untouched"
    assert kube.get("smtplistener", LISTENER, EXAMPLES_NS)["metadata"]["generation"] == listener_rv


def test_4_uninstall_keeps_crds_and_users_resources(kube, helm):
    users = """apiVersion: mail.petrel.dev/v1alpha1
kind: MailDomain
metadata: {name: users-own, namespace: %s}
spec: {domain: users.example.test, delivery: {maildir: {}}}
""" % EXAMPLES_NS
    kube.apply(users)
    helm("uninstall", RELEASE, "-n", OPERATOR_NS, "--wait", "--timeout", "5m")
    assert kube.json("get", "deployments", "-n", OPERATOR_NS)["items"] == []
    assert kube.run("get", "clusterrole", "petrel-operator", check=False).returncode != 0
    for crd in ["smtplisteners", "maildomains", "dkimkeys", "relaypolicies"]:
        kube.run("get", "crd", f"{crd}.mail.petrel.dev")
    assert kube.get("maildomain", "users-own", EXAMPLES_NS), "the user's resource stays"
    assert kube.get("smtplistener", LISTENER, EXAMPLES_NS) is None, "the chart's examples go"
    kube.wait("--for=delete", f"statefulset/{LISTENER}", "-n", EXAMPLES_NS)
    kube.run("delete", "maildomain", "users-own", "-n", EXAMPLES_NS)


def test_5_install_again_after_uninstall(kube, helm):
    install(helm)
    kube.wait("--for=condition=Ready", f"smtplistener/{LISTENER}", "-n", EXAMPLES_NS,
              timeout=300)
    helm("uninstall", RELEASE, "-n", OPERATOR_NS, "--wait", "--timeout", "5m")
    kube.wait("--for=delete", f"statefulset/{LISTENER}", "-n", EXAMPLES_NS)
    log("helm: install, upgrade, uninstall, install again: all as expected")
    # The namespace stays, for the next test (a terminating one refuses new objects).


def test_6_namespaced_mode_needs_no_cluster_wide_access(kube, helm):
    """watchNamespaces: Roles in the watched namespace only; the operator still runs the
    examples there, and cannot read a Secret anywhere else."""
    install(helm, "--set", f"watchNamespaces={{{EXAMPLES_NS}}}")
    sa = f"system:serviceaccount:{OPERATOR_NS}:petrel-operator"

    def can(*args):
        return kube.run("auth", "can-i", *args, "--as", sa, check=False).stdout.strip()

    assert can("list", "secrets", "--all-namespaces") == "no"
    assert can("get", "secrets", "-n", "default") == "no"
    assert can("create", "secrets", "-n", EXAMPLES_NS) == "yes"
    assert kube.run("get", "clusterrolebinding", "petrel-operator", check=False).returncode != 0
    kube.wait("--for=condition=Available", "deployment", "-l",
              "app.kubernetes.io/component=operator", "-n", OPERATOR_NS)
    kube.wait("--for=condition=Ready", f"smtplistener/{LISTENER}", "-n", EXAMPLES_NS,
              timeout=300)
    env = {e["name"]: e.get("value") for e in operator_pod(kube)[0]["spec"]["containers"][0]["env"]}
    assert env.get("PETREL_WATCH_NAMESPACES") == EXAMPLES_NS, env
    helm("uninstall", RELEASE, "-n", OPERATOR_NS, "--wait", "--timeout", "5m")
    kube.wait("--for=delete", f"statefulset/{LISTENER}", "-n", EXAMPLES_NS)
