"""Scale-in on a real cluster loses and duplicates nothing.

An SmtpListener with 3 pods relays to a sink on the host that answers 451, so every
message stays queued: 300 per pod, each with a unique token. `kubectl scale` takes it to
1 through the scale subresource, as the HPA would. The operator drains pods 2 and 1 (they
hand their queues to pod 0) and only then shrinks the StatefulSet: when it first reads 1,
both leaving pods' volumes carry the `mail.petrel.dev/drained` annotation (or are already
deleted, having carried it: a watch on the PVCs records every version); they go only
after that. Pod 2 is deleted by hand in the middle of its drain. Then the sink accepts,
pod 0 flushes, and every token arrives exactly once.

Then a pod goes without draining (the StatefulSet shrunk by hand while the operator is
stopped), leaving 200 messages on its volume: the operator, back, drains that volume with
a Job into pod 0 and deletes it only then; every message arrives exactly once.
"""

import json
import re
import smtplib
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from live import HOST_ADDRESS, ROOT, log, poll  # noqa: E402
from outbound import Sink, free_port  # noqa: E402

NS = "petrel-scale"
OPERATOR_NS = "petrel-system"
SMTP_PORT = 10025  # container port of port 25
PER_POD = 300
LISTENER = "relay"
DRAINED = "mail.petrel.dev/drained"


@pytest.fixture(scope="module")
def sink():
    s = Sink(HOST_ADDRESS, free_port(host=HOST_ADDRESS), rcpt_reply="451 4.3.0 not now")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def operator(kube):
    # An earlier module's uninstall may still be deleting the operator's namespace.
    if kube.run("get", "namespace", OPERATOR_NS, check=False).returncode == 0:
        phase = kube.json("get", "namespace", OPERATOR_NS)["status"].get("phase")
        if phase == "Terminating":
            kube.wait("--for=delete", f"namespace/{OPERATOR_NS}", timeout=180)
    kube.run("apply", "--server-side", "-f", str(ROOT / "manifests" / "crds"))
    kube.wait("--for=condition=Established", "crd/smtplisteners.mail.petrel.dev", timeout=60)
    manifests = (ROOT / "manifests" / "install.yaml").read_text()
    kube.apply(manifests)
    kube.wait("--for=condition=Available", "deployment/petrel-operator", "-n", OPERATOR_NS,
              timeout=180)
    yield
    log("operator logs (tail):\n" + kube.run("logs", "-n", OPERATOR_NS, "deploy/petrel-operator",
                                             "--tail=30", check=False).stdout)
    kube.run("delete", "namespace", NS, "--wait=false", check=False)
    kube.run("delete", "--ignore-not-found", "--wait=false", "-f", "-", input=manifests,
             check=False)


def pods(kube):
    items = kube.json("get", "pods", "-n", NS, "-l",
                      f"app.kubernetes.io/instance={LISTENER},app.kubernetes.io/name=petrel-mta")
    return {p["metadata"]["name"]: p for p in items["items"]}


def send_many(ip, tokens):
    with smtplib.SMTP(ip, SMTP_PORT, timeout=60) as s:
        s.ehlo("e2e.test")
        for token in tokens:
            body = (f"From: <sender@e2e.test>\r\nTo: <friend@elsewhere.test>\r\n"
                    f"Subject: {token}\r\nMessage-ID: <{token}@e2e.test>\r\n\r\n{token}\r\n")
            refused = s.sendmail("sender@e2e.test", ["friend@elsewhere.test"], body)
            assert not refused, refused


def depth(kube):
    status = kube.get("smtplistener", LISTENER, NS).get("status", {})
    return {d["pod"]: d for d in status.get("queueDepth", [])}


def scaling(kube):
    for c in kube.get("smtplistener", LISTENER, NS).get("status", {}).get("conditions", []):
        if c["type"] == "ScalingIn":
            return c
    return {}


class PvcWatch:
    """Every version of the namespace's PVCs the API server announces, from a
    `kubectl get pvc --watch` started before the scale-in: a volume deleted between two
    looks still shows the annotations it carried."""

    def __init__(self, kube):
        self.proc = subprocess.Popen(
            [kube.kubectl, "get", "pvc", "-n", NS, "--watch", "--output-watch-events",
             "-o", "json"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            env=kube.env)
        self.events = []  # (type, name, annotations)
        self.lock = threading.Lock()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        decoder, text = json.JSONDecoder(), ""
        for line in self.proc.stdout:
            text += line
            try:
                event, end = decoder.raw_decode(text.lstrip())
            except ValueError:
                continue  # the object is not complete yet
            text = text.lstrip()[end:]
            meta = event["object"]["metadata"]
            with self.lock:
                self.events.append((event["type"], meta["name"],
                                    meta.get("annotations") or {}))

    def versions(self, name):
        with self.lock:
            return [(kind, notes) for kind, n, notes in self.events if n == name]

    def stop(self):
        self.proc.kill()
        self.proc.wait(timeout=30)


def test_scale_in_drains_before_shrinking(kube, operator, sink):
    kube.run("create", "namespace", NS)
    kube.apply(yaml.safe_dump_all([
        {"apiVersion": "mail.petrel.dev/v1alpha1", "kind": "RelayPolicy",
         "metadata": {"name": "host", "namespace": NS},
         "spec": {"clientNetworks": ["198.18.0.0/15"],
                  "route": {"mode": "Smarthost",
                            "smarthost": {"host": HOST_ADDRESS, "port": sink.controller.port}}}},
        {"apiVersion": "mail.petrel.dev/v1alpha1", "kind": "SmtpListener",
         "metadata": {"name": LISTENER, "namespace": NS},
         "spec": {"hostname": "relay.example.com", "replicas": 3,
                  "ports": [{"name": "smtp", "port": 25, "kind": "smtp"}],
                  "service": {"type": "ClusterIP"}}},
    ]))
    kube.wait("--for=condition=Ready", f"smtplistener/{LISTENER}", "-n", NS, timeout=300)
    running = pods(kube)
    assert sorted(running) == [f"{LISTENER}-{i}" for i in range(3)], sorted(running)

    # 300 deferred messages in each pod, every one with its own token.
    tokens = {name: [f"tok-{name}-{n}" for n in range(PER_POD)] for name in running}
    started = time.monotonic()
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda n: send_many(running[n]["status"]["podIP"], tokens[n]), running))
    log(f"sent {3 * PER_POD} messages in {time.monotonic() - started:.0f} s")
    poll(lambda: all(d.get("messages", 0) >= PER_POD for d in depth(kube).values())
         and len(depth(kube)) == 3, timeout=120,
         what=f"status.queueDepth: {PER_POD} queued in each pod")
    pvcs = lambda: sorted(p["metadata"]["name"]  # noqa: E731
                          for p in kube.json("get", "pvc", "-n", NS)["items"])
    assert pvcs() == [f"queue-{LISTENER}-{i}" for i in range(3)]

    # Scale to 1 through the scale subresource (what the HPA uses): the StatefulSet keeps
    # 3 pods until 2 and 1 have drained.
    watch = PvcWatch(kube)
    try:
        began = time.monotonic()
        kube.run("scale", "smtplistener", LISTENER, "-n", NS, "--replicas=1")
        assert kube.get("smtplistener", LISTENER, NS)["spec"]["replicas"] == 1
        poll(lambda: scaling(kube).get("status") == "True", timeout=60, what="ScalingIn=True")
        sts_sizes = set()
        deleted = False

        def shrunk():
            nonlocal deleted
            sts = kube.get("statefulset", LISTENER, NS)
            sts_sizes.add(sts["spec"]["replicas"])
            if sts["spec"]["replicas"] == 1:
                return sts
            d = depth(kube)
            if not deleted and d.get(f"{LISTENER}-2", {}).get("drain") in ("draining",
                                                                           "handing_off"):
                # The pod being drained is deleted by hand: the StatefulSet brings it back
                # on the same volume and the operator asks it again.
                kube.run("delete", "pod", f"{LISTENER}-2", "-n", NS, "--wait=false")
                deleted = True
                log(f"deleted {LISTENER}-2 mid-drain: {d.get(f'{LISTENER}-2')}")
            # While it is 3, no leaving pod's volume may be gone.
            assert pvcs()[:3] == [f"queue-{LISTENER}-{i}" for i in range(3)], pvcs()
            return None

        poll(shrunk, timeout=420, what="the StatefulSet shrunk to 1 after the drain")
        drain_time = time.monotonic() - began
        # The StatefulSet first reads 1: both leaving volumes are marked drained by now.
        # Marked before the StatefulSet shrank, so a read now shows the mark unless the
        # volume is already gone; then the watch shows the versions it went through.
        now = {p["metadata"]["name"]: p for p in kube.json("get", "pvc", "-n", NS)["items"]}
        for i in (2, 1):
            pvc = f"queue-{LISTENER}-{i}"
            if pvc in now:
                notes = now[pvc]["metadata"].get("annotations") or {}
                assert notes.get(DRAINED) == "true", (pvc, notes)
            else:
                versions = poll(lambda: (v := watch.versions(pvc))
                                and v[-1][0] == "DELETED" and v, timeout=60,
                                what=f"the watch saw {pvc} deleted")
                assert any(notes.get(DRAINED) == "true" for _, notes in versions), versions
                assert versions[-1][1].get(DRAINED) == "true", versions
            log(f"{pvc} marked drained when the StatefulSet shrank "
                f"({'present' if pvc in now else 'already deleted'})")
    finally:
        watch.stop()
    assert sts_sizes <= {3, 1}, sts_sizes
    assert deleted, "pod 2 was deleted mid-drain"
    poll(lambda: pvcs() == [f"queue-{LISTENER}-0"], timeout=180,
         what="the drained pods' volumes deleted after they left")
    poll(lambda: scaling(kube).get("status") == "False", timeout=60, what="ScalingIn=False")
    assert list(pods(kube)) == [f"{LISTENER}-0"] or poll(
        lambda: list(pods(kube)) == [f"{LISTENER}-0"], timeout=120, what="only pod 0 left")
    poll(lambda: depth(kube).get(f"{LISTENER}-0", {}).get("messages") == 3 * PER_POD,
         timeout=120, what=f"pod 0 holds all {3 * PER_POD} messages")

    # The destination comes back: every message arrives exactly once.
    sink.handler.rcpt_reply = None
    kube.run("exec", "-n", NS, f"{LISTENER}-0", "--", "petrel-mta", "queue", "flush",
             "--config", "/etc/petrel/config/mta.yaml")
    everything = {t for ts in tokens.values() for t in ts}

    def arrived():
        seen = [re.search(rb"Subject: (tok-[\w-]+)", m.content).group(1).decode()
                for m in sink.messages]
        return seen if set(seen) >= everything else None

    seen = poll(arrived, timeout=300, what=f"all {len(everything)} messages at the sink")
    duplicates = len(seen) - len(set(seen))
    log(f"scale-in 3 -> 1: {len(everything)} queued, drained in {drain_time:.0f} s "
        f"(pod 2 deleted mid-drain), {len(set(seen))} delivered, {duplicates} duplicates")
    assert duplicates == 0
    assert set(seen) == everything


LEFT = 200


def test_a_volume_left_behind_is_drained_by_a_job(kube, operator, sink):
    """A pod that goes without draining (here: the StatefulSet shrunk by hand while the
    operator is away) leaves its queue on its volume. The operator, back, drains that
    volume with a Job into the pod that stays, and deletes the volume only then."""
    sink.handler.rcpt_reply = "451 4.3.0 not now"
    kube.run("patch", "smtplistener", LISTENER, "-n", NS, "--type=merge",
             "-p", json.dumps({"spec": {"replicas": 2}}))
    poll(lambda: f"{LISTENER}-1" in pods(kube), timeout=120, what=f"{LISTENER}-1 created")
    kube.wait("--for=condition=Ready", f"pod/{LISTENER}-1", "-n", NS, timeout=180)
    tokens = [f"left-{n}" for n in range(LEFT)]
    send_many(pods(kube)[f"{LISTENER}-1"]["status"]["podIP"], tokens)
    poll(lambda: depth(kube).get(f"{LISTENER}-1", {}).get("messages", 0) >= LEFT,
         timeout=120, what=f"{LEFT} messages queued in {LISTENER}-1")

    # The operator is away, and someone shrinks the StatefulSet by hand: pod 1 goes
    # without draining, its queue stays on its volume.
    operator_pods = ["pods", "-n", OPERATOR_NS, "-l",
                     "app.kubernetes.io/name=petrel,app.kubernetes.io/component=operator"]
    kube.run("scale", "deployment", "petrel-operator", "-n", OPERATOR_NS, "--replicas=0")
    poll(lambda: not kube.json("get", *operator_pods)["items"], timeout=180,
         what="the operator stopped")
    kube.run("patch", "smtplistener", LISTENER, "-n", NS, "--type=merge",
             "-p", json.dumps({"spec": {"replicas": 1}}))
    kube.run("scale", "statefulset", LISTENER, "-n", NS, "--replicas=1")
    poll(lambda: f"{LISTENER}-1" not in pods(kube), timeout=180,
         what=f"{LISTENER}-1 gone without draining")
    volume = f"queue-{LISTENER}-1"
    pvc_names = lambda: [p["metadata"]["name"]  # noqa: E731
                         for p in kube.json("get", "pvc", "-n", NS)["items"]]
    assert volume in pvc_names()

    # The operator comes back: a Job drains the volume into pod 0, then the volume goes.
    began = time.monotonic()
    kube.run("scale", "deployment", "petrel-operator", "-n", OPERATOR_NS, "--replicas=1")
    job = f"{LISTENER}-drain-1"
    seen = {"job": False, "reasons": set()}

    def volume_drained():
        if kube.run("get", "job", job, "-n", NS, check=False).returncode == 0:
            seen["job"] = True
        seen["reasons"].add(scaling(kube).get("reason"))
        return volume not in pvc_names()

    poll(volume_drained, timeout=300, interval=1, what=f"{volume} drained by {job}, then deleted")
    drain_time = time.monotonic() - began
    assert seen["job"], f"Job {job} was never seen"
    assert "DrainingVolumes" in seen["reasons"], seen["reasons"]
    poll(lambda: kube.run("get", "job", job, "-n", NS, check=False).returncode != 0,
         timeout=120, what=f"Job {job} removed")
    poll(lambda: scaling(kube).get("reason") == "Idle", timeout=60, what="ScalingIn Idle")
    poll(lambda: depth(kube).get(f"{LISTENER}-0", {}).get("messages") == LEFT,
         timeout=120, what=f"pod 0 holds the {LEFT} messages of the left-behind volume")

    sink.handler.rcpt_reply = None
    kube.run("exec", "-n", NS, f"{LISTENER}-0", "--", "petrel-mta", "queue", "flush",
             "--config", "/etc/petrel/config/mta.yaml")

    def arrived():
        got = [m.group(1).decode() for m in
               (re.search(rb"Subject: (left-\d+)", x.content) for x in sink.messages) if m]
        return got if set(got) >= set(tokens) else None

    got = poll(arrived, timeout=300, what=f"all {LEFT} left-behind messages at the sink")
    duplicates = len(got) - len(set(got))
    log(f"left-behind volume: {LEFT} queued, drained by a Job and deleted {drain_time:.0f} s "
        f"after the operator came back, {len(set(got))} delivered, {duplicates} duplicates")
    assert duplicates == 0
    assert set(got) == set(tokens)
