"""The live-cluster fixture: one real Kubernetes for the whole live suite (see live.py
for how the cluster is chosen)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from live import CLUSTER_SH, Kube, build_images, kubectl_path, log  # noqa: E402


@pytest.fixture(scope="session")
def kube():
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
