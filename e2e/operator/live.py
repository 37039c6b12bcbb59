"""Helpers of the live-cluster suite: kubectl, polling, images, and how the cluster is chosen.

Which cluster, decided once and printed:
  * KUBECONFIG set          -> that cluster (its nodes must be able to run the images:
                               load them yourself, e.g. `kind load image-archive`, or set
                               PETREL_E2E_LOAD_IMAGES=cluster.sh when it is this machine's);
  * ../shared/k8s/cluster.sh -> a single-node cluster started here, stopped at the end
                               (also when a test fails), with the images loaded into it;
  * neither                 -> every live test is SKIPPED, with the reason.

Pods reach test servers on the host (DNS, SMTP sink) at PETREL_E2E_HOST_ADDRESS, by default
198.18.1.1: the node address of cluster.sh's cluster.
"""

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import wait_for

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_SH = ROOT.parent / "shared" / "k8s" / "cluster.sh"
IMAGES_DIR = Path(os.environ.get("PETREL_IMAGES_DIR", ROOT / "target" / "images"))
HOST_ADDRESS = os.environ.get("PETREL_E2E_HOST_ADDRESS", "198.18.1.1")


def log(message):
    print(f"[live] {message}", flush=True)


class Kube:
    """kubectl against one cluster. Every call has a timeout; nothing waits blindly."""

    def __init__(self, kubeconfig, kubectl):
        self.env = dict(os.environ, KUBECONFIG=str(kubeconfig))
        self.kubectl = kubectl

    def run(self, *args, input=None, check=True, timeout=120):
        p = subprocess.run([self.kubectl, *args], input=input, capture_output=True,
                           text=True, env=self.env, timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed:\n{p.stdout}\n{p.stderr}")
        return p

    def json(self, *args):
        return json.loads(self.run(*args, "-o", "json").stdout)

    def get(self, kind, name, ns):
        p = self.run("get", kind, name, "-n", ns, "-o", "json", check=False)
        return json.loads(p.stdout) if p.returncode == 0 else None

    def apply(self, text, *extra):
        return self.run("apply", *extra, "-f", "-", input=text)

    def wait(self, *args, timeout=180):
        return self.run("wait", *args, f"--timeout={timeout}s", timeout=timeout + 30)

    def logs(self, pod, ns, **kw):
        return self.run("logs", pod, "-n", ns, check=False, **kw).stdout

    def restarts(self, pod, ns):
        """(restart count, why): the containers' restarts, each with how its last run
        ended and the tail of its log, so a failed assertion says what happened."""
        obj = self.json("get", "pod", pod, "-n", ns)
        count, why = 0, []
        for c in obj["status"].get("containerStatuses", []):
            count += c["restartCount"]
            if c["restartCount"]:
                previous = self.run("logs", pod, "-n", ns, "-c", c["name"], "--previous",
                                    "--tail=30", check=False)
                why.append(f"{c['name']}: {c['restartCount']} restart(s); last ended "
                           f"{json.dumps(c.get('lastState', {}))}\nprevious log:\n"
                           f"{previous.stdout}{previous.stderr}")
        if count:
            events = self.run("get", "events", "-n", ns, "--field-selector",
                              f"involvedObject.name={pod}", check=False).stdout
            why.append(f"events:\n{events}")
        return count, "\n".join(why)


def kubectl_path():
    found = shutil.which("kubectl")
    if found:
        return found
    if CLUSTER_SH.exists():
        tools = subprocess.run(["bash", str(CLUSTER_SH), "tools"], capture_output=True,
                               text=True, check=True).stdout.strip().splitlines()[-1]
        return str(Path(tools) / "kubectl")
    return None


def build_images():
    """The images the suite runs, from scripts/build-images.sh (release binaries)."""
    wanted = [IMAGES_DIR / "petrel-mta.tar", IMAGES_DIR / "petrel-operator.tar"]
    if not all(p.exists() for p in wanted):
        log("building the images (scripts/build-images.sh)")
        subprocess.run(["bash", str(ROOT / "scripts" / "build-images.sh")], check=True,
                       timeout=1800)
    return wanted


def poll(condition, timeout=180.0, interval=1.0, what="condition"):
    """wait_for (e2e/conftest.py) with the live suite's deadline and pace."""
    return wait_for(condition, timeout=timeout, interval=interval, what=what)


def cluster():
    """Yields a Kube for the chosen cluster; stops a cluster it started (also on failure)."""
    began = time.monotonic()
    started = False
    kubeconfig = os.environ.get("KUBECONFIG")
    if kubeconfig:
        log(f"using the cluster in KUBECONFIG={kubeconfig}")
    elif CLUSTER_SH.exists() and os.geteuid() == 0:
        log(f"starting a cluster with {CLUSTER_SH}")
        up = subprocess.run(["bash", str(CLUSTER_SH), "up"], capture_output=True, text=True,
                            timeout=300)
        if up.returncode != 0:
            subprocess.run(["bash", str(CLUSTER_SH), "down"], capture_output=True, timeout=300)
            raise AssertionError(f"cluster.sh up failed:\n{up.stdout}\n{up.stderr}")
        started = True
        kubeconfig = "/tmp/petrel-cluster/kubeconfig"
        for line in up.stdout.splitlines():
            if line.startswith("export KUBECONFIG="):
                kubeconfig = line.split("=", 1)[1]
    else:
        pytest.skip("live cluster: SKIPPED (no KUBECONFIG, and no ../shared/k8s/cluster.sh "
                    "to start one as root)")
    try:
        k = Kube(kubeconfig, kubectl_path())
        k.run("version")
        archives = build_images()
        if started or os.environ.get("PETREL_E2E_LOAD_IMAGES") == "cluster.sh":
            for archive in archives:
                log(f"loading {archive.name} into the cluster")
                subprocess.run(["bash", str(CLUSTER_SH), "load-image", str(archive)],
                               check=True, capture_output=True, timeout=600)
        yield k
    finally:
        if started:
            log("stopping the cluster (cluster.sh down)")
            subprocess.run(["bash", str(CLUSTER_SH), "down"], capture_output=True, timeout=300)
        log(f"live-cluster suite: {time.monotonic() - began:.0f} s, cluster start and stop included")
