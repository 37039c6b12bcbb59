"""petrel-operator proven on a real cluster, as a user meets it.

The operator runs in the cluster from its image, as the Deployment of
manifests/install.yaml, under its own ServiceAccount: the RBAC that ships is the RBAC
tested. The steps run in file order and build on each other:

 1. CRDs, RBAC and the operator install; the operator becomes Ready.
 2. The API server refuses CRs that break a CEL rule, with the rule's message.
 3. manifests/examples/ applied: Ready=False naming a missing Secret until it exists,
    then MTA pods Ready with one bound PVC each, a DkimKey Active once its record is
    answered by the zone's authoritative server (nsd) and the pods report the key, every
    resource Ready at its generation, DNS guidance in MailDomain status.
 4. Mail into a pod is delivered to a local Maildir.
 5. Hot reload: deleting a MailDomain and changing the RelayPolicy reach running pods
    without a restart; relayed mail reaches a sink on the host, DKIM-signed (dkimpy).
 6. A second reconcile with nothing changed writes nothing.
 7. DKIM keys rotate twice with mail flowing; every message verifies on arrival (dkimpy,
    against the nsd zone) and again just before its key's overlap ends.
 8. A reference to a missing Secret: Ready=False naming it; running pods untouched.
 9. Deleting the SmtpListener garbage-collects everything it owned.

Pods reach the host's test servers (nsd, aiosmtpd) at live.HOST_ADDRESS.
"""

import calendar
import email
import json
import math
import os
import re
import smtplib
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import dkim
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from live import HOST_ADDRESS, ROOT, log, poll  # noqa: E402
from nsd import Nsd  # noqa: E402
from aiosmtpd.controller import Controller  # noqa: E402
from outbound import Sink, SinkHandler, free_port  # noqa: E402

NS = "petrel-e2e"
OPERATOR_NS = "petrel-system"
KINDS = "smtplisteners,maildomains,dkimkeys,relaypolicies"
SMTP_PORT = 10025  # container port of the examples' port 25 (unprivileged pods)
USER, PASSWORD = "alice@example.com", "correct horse battery staple"
MTA_BIN = next((p for p in [Path(os.environ.get("PETREL_MTA_BIN", "/nonexistent")),
                            ROOT / "target" / "debug" / "petrel-mta",
                            ROOT / "target" / "release" / "petrel-mta"] if p.exists()),
               None)


# --- fixtures -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dns_server():
    """nsd on the host address, the authoritative server of example.com (and so of
    corp.example.com), with short TTLs; the operator asks it directly."""
    server = Nsd("example.com", listen=HOST_ADDRESS)
    yield server
    server.stop()


class TimedSinkHandler(SinkHandler):
    """A sink that also notes when each message arrived (`received_at`, Unix seconds)."""

    async def handle_DATA(self, server, session, envelope):
        arrived = time.time()
        reply = await super().handle_DATA(server, session, envelope)
        with self.lock:
            self.messages[-1].received_at = arrived
        return reply


class TimedSink(Sink):
    def __init__(self, host, port):  # noqa: super().__init__ would start a plain handler
        self.handler = TimedSinkHandler()
        self.controller = Controller(self.handler, hostname=host, port=port,
                                     decode_data=False, enable_SMTPUTF8=True)
        self.controller.start()


@pytest.fixture(scope="module")
def sink():
    s = TimedSink(HOST_ADDRESS, free_port(host=HOST_ADDRESS))
    yield s
    s.stop()


def operator_manifests(dns_address, dns_port):
    """manifests/install.yaml with the operator pointed at the test DNS server (as its
    resolver, and as the zone's authoritative server, on its port)."""
    docs = list(yaml.safe_load_all((ROOT / "manifests" / "install.yaml").read_text()))
    for doc in docs:
        if doc and doc["kind"] == "Deployment":
            env = doc["spec"]["template"]["spec"]["containers"][0].setdefault("env", [])
            env.append({"name": "PETREL_DNS_SERVER", "value": dns_address})
            env.append({"name": "PETREL_DNS_AUTHORITATIVE_PORT", "value": str(dns_port)})
            env.append({"name": "RUST_LOG", "value": "info,operator=debug"})
    return yaml.safe_dump_all([d for d in docs if d])


@pytest.fixture(scope="module")
def operator(kube, dns_server):
    kube.run("apply", "--server-side", "-f", str(ROOT / "manifests" / "crds"))
    kube.wait("--for=condition=Established",
              *[f"crd/{k}.mail.petrel.dev" for k in KINDS.split(",")], timeout=60)
    manifests = operator_manifests(f"{HOST_ADDRESS}:{dns_server.port}", dns_server.port)
    kube.apply(manifests)
    yield
    log("operator logs (tail):\n" + kube.run("logs", "-n", OPERATOR_NS, "deploy/petrel-operator",
                                             "--tail=40", check=False).stdout)
    kube.run("delete", "namespace", NS, "--wait=false", check=False)
    # Uninstall (the CRDs stay), so a later suite on the same cluster starts clean.
    kube.run("delete", "--ignore-not-found", "--wait=false", "-f", "-", input=manifests,
             check=False)


def examples_yaml():
    out = []
    for f in sorted((ROOT / "manifests" / "examples").glob("*.yaml")):
        out.append(f.read_text().replace("namespace: mail", f"namespace: {NS}"))
    return "\n---\n".join(out)


def users_file():
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "users"
        subprocess.run([str(MTA_BIN), "passwd", USER, "--file", str(path)], check=True,
                       input=PASSWORD + "\n", text=True, capture_output=True)
        return path.read_text()


def tls_pair(hostname):
    with tempfile.TemporaryDirectory() as d:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec",
                        "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "30",
                        "-subj", f"/CN={hostname}", "-addext", f"subjectAltName=DNS:{hostname}",
                        "-keyout", f"{d}/k", "-out", f"{d}/c"], check=True, capture_output=True)
        return Path(f"{d}/c").read_text(), Path(f"{d}/k").read_text()


# --- small readers --------------------------------------------------------------------

def condition(obj, type_="Ready"):
    for c in (obj or {}).get("status", {}).get("conditions", []):
        if c["type"] == type_:
            return c
    return {}


def ready_at_generation(obj):
    c = condition(obj)
    return (c.get("status") == "True"
            and c.get("observedGeneration") == obj["metadata"]["generation"]
            and obj["status"].get("observedGeneration") == obj["metadata"]["generation"])


def pods(kube, listener):
    return kube.json("get", "pods", "-n", NS, "-l",
                     f"app.kubernetes.io/instance={listener},app.kubernetes.io/name=petrel-mta")["items"]


def pod_state(kube, listener):
    """uid and restart count of each pod: what a restart would change."""
    return {p["metadata"]["name"]: (p["metadata"]["uid"],
                                    sum(c["restartCount"] for c in p["status"].get("containerStatuses", [])))
            for p in pods(kube, listener)}


def pod_ip(kube, name):
    return kube.json("get", "pod", name, "-n", NS)["status"]["podIP"]


def rcpt_reply(ip, rcpt, sender="someone@sender.test"):
    """The reply to RCPT TO from a fresh session (nothing is sent)."""
    with smtplib.SMTP(ip, SMTP_PORT, timeout=30) as s:
        s.ehlo("e2e.test")
        s.mail(sender)
        return s.rcpt(rcpt)


def send(ip, sender, rcpts, subject):
    body = (f"From: <{sender}>\r\nTo: <{rcpts[0]}>\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject}@e2e.test>\r\n\r\nHello from the live suite.\r\n")
    with smtplib.SMTP(ip, SMTP_PORT, timeout=30) as s:
        s.ehlo("e2e.test")
        refused = s.sendmail(sender, rcpts, body)
        assert not refused, refused


def operator_metrics(kube):
    pod = kube.json("get", "pods", "-n", OPERATOR_NS, "-l",
                    "app.kubernetes.io/component=operator")["items"][0]
    ip = pod["status"]["podIP"]
    with urllib.request.urlopen(f"http://{ip}:8080/metrics", timeout=10) as r:
        return r.read().decode()


def reconcile_runs(kube, kind):
    m = re.search(rf'petrel_operator_reconcile_runs_total{{kind="{kind}"}} (\d+)',
                  operator_metrics(kube))
    return int(m.group(1)) if m else 0


def owned_versions(kube):
    """resourceVersion of every object the operator made in the test namespace."""
    out = {}
    for kind in ["configmaps", "secrets", "statefulsets", "services", "poddisruptionbudgets",
                 "horizontalpodautoscalers"]:
        for o in kube.json("get", kind, "-n", NS, "-l",
                           "app.kubernetes.io/managed-by=petrel-operator")["items"]:
            out[f"{kind}/{o['metadata']['name']}"] = o["metadata"]["resourceVersion"]
    return out


# --- the steps ------------------------------------------------------------------------

def test_1_operator_installs_and_becomes_ready(kube, operator):
    kube.wait("--for=condition=Available", "deployment/petrel-operator", "-n", OPERATOR_NS)
    pod = kube.json("get", "pods", "-n", OPERATOR_NS, "-l",
                    "app.kubernetes.io/component=operator")["items"][0]
    assert pod["spec"]["serviceAccountName"] == "petrel-operator"
    assert condition(pod) and all(c["ready"] for c in pod["status"]["containerStatuses"])
    sa = "system:serviceaccount:petrel-system:petrel-operator"
    can = lambda *a: kube.run("auth", "can-i", *a, "--as", sa, check=False).stdout.strip()  # noqa: E731
    assert can("create", "statefulsets", "-n", NS) == "yes"
    assert can("create", "secrets", "-n", NS) == "yes"
    assert can("patch", "smtplisteners.mail.petrel.dev", "--subresource=status", "-n", NS) == "yes"
    assert can("create", "pods", "-n", NS) == "no", "least privilege"
    assert can("patch", "smtplisteners.mail.petrel.dev", "-n", NS) == "no", "never edits a spec"


def test_2_cel_rules_refuse_bad_input_with_their_message(kube, operator):
    kube.run("create", "namespace", NS, check=False)
    bad = [
        ("RelayPolicy", {"clientNetworks": ["0.0.0.0/0"]}, "open relay"),
        ("SmtpListener", {"hostname": "mx.example.com", "ports": [
            {"name": "a", "kind": "smtp", "port": 25},
            {"name": "b", "kind": "smtp", "port": 25}]}, "port numbers must be unique"),
        ("MailDomain", {"domain": "Not A Domain", "delivery": {"maildir": {}}},
         "must be a lower-case DNS domain name"),
    ]
    for kind, spec, message in bad:
        doc = {"apiVersion": "mail.petrel.dev/v1alpha1", "kind": kind,
               "metadata": {"name": "bad", "namespace": NS}, "spec": spec}
        p = kube.run("apply", "-f", "-", input=json.dumps(doc), check=False)
        assert p.returncode != 0, f"{kind} was accepted"
        assert message in p.stderr, p.stderr


def test_3_examples_become_ready(kube, operator, dns_server):
    kube.apply(examples_yaml())
    # The examples name two Secrets a user provides; until they exist nothing is applied
    # and the listener says which one is missing.
    poll(lambda: "Secret mail-users" in condition(kube.get("smtplistener", "mx", NS))
         .get("message", ""), what="mx Ready=False naming Secret mail-users")
    assert condition(kube.get("smtplistener", "mx", NS))["reason"] == "SecretNotFound"
    # (A StatefulSet may exist, rendered before the RelayPolicy was seen, but nothing that
    # mounts the missing Secret is ever applied: no pod can get stuck on it.)
    sts = kube.get("statefulset", "mx", NS)
    if sts:
        volumes = sts["spec"]["template"]["spec"].get("volumes", [])
        assert not [v for v in volumes if v.get("secret", {}).get("secretName") == "mail-users"]

    crt, key = tls_pair("smtp.example.com")
    secrets = [
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "mail-users", "namespace": NS},
         "stringData": {"users": users_file()}},
        {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
         "metadata": {"name": "smtp-example-com-tls", "namespace": NS},
         "stringData": {"tls.crt": crt, "tls.key": key}},
    ]
    kube.apply(yaml.safe_dump_all(secrets))

    # The DkimKey shows its record in status; once the zone serves it (and the TTLs have
    # passed, and the pods report the key loaded), it becomes Active.
    key_obj = poll(lambda: (k := kube.get("dkimkey", "example-com-ed25519", NS))
                   and k.get("status", {}).get("phase") == "Generated" and k,
                   what="DkimKey Generated")
    sel = key_obj["status"]["selectors"][0]
    assert sel["selector"] == "petrel-a", sel
    dns_server.set_txt({sel["recordName"]: sel["recordValue"]})
    poll(lambda: kube.get("dkimkey", "example-com-ed25519", NS)["status"]["phase"] == "Active",
         timeout=240, what="DkimKey Active (published, TTLs waited out, loaded by the pods)")

    kube.wait("--for=condition=Ready", "smtplistener/mx", "smtplistener/submission", "-n", NS,
              timeout=300)
    # mx has 2 replicas; submission is autoscaled and runs what its HPA (or, with no
    # metrics in the cluster, the StatefulSet's default) says: what status reports.
    names = []
    for listener in ["mx", "submission"]:
        got = pods(kube, listener)
        desired = kube.get("smtplistener", listener, NS)["status"]["desiredReplicas"]
        assert len(got) == desired and all(condition(p)["status"] == "True" for p in got), listener
        names += [f"queue-{p['metadata']['name']}" for p in got]
    assert len(pods(kube, "mx")) == 2
    pvcs = kube.json("get", "pvc", "-n", NS)["items"]
    assert sorted(p["metadata"]["name"] for p in pvcs) == sorted(names), "one PVC per pod"
    assert all(p["status"]["phase"] == "Bound" for p in pvcs)

    for kind in KINDS.split(","):
        for obj in kube.json("get", kind, "-n", NS)["items"]:
            poll(lambda: ready_at_generation(kube.get(kind, obj["metadata"]["name"], NS)),
                 what=f"{kind}/{obj['metadata']['name']} Ready at its generation "
                      f"({condition(kube.get(kind, obj['metadata']['name'], NS))})")

    table = kube.run("get", KINDS, "-n", NS).stdout
    log("kubectl get " + KINDS + ":\n" + table)
    for column in ["HOSTNAME", "READY", "PHASE", "DOMAIN"]:
        assert column in table, table
    domain = kube.get("maildomain", "example-com", NS)
    types = {r["type"] for r in domain["status"]["dns"]}
    assert {"MX", "TXT"} <= types, domain["status"]["dns"]


def test_4_mail_is_delivered_to_a_local_maildir(kube, operator):
    ip = pod_ip(kube, "mx-0")
    send(ip, "someone@sender.test", ["bob@example.com"], "local-delivery")
    poll(lambda: re.search(r"delivered.*bob@example\.com|bob@example\.com.*delivered",
                           kube.logs("mx-0", NS)), what="a delivered line for bob in mx-0's log")


def dnsfunc_of(server):
    """dkimpy's DNS lookup, answered by the zone's authoritative server."""
    def dnsfunc(name, timeout=5):
        return server.lookup_txt(name.decode() if isinstance(name, bytes) else name)
    return dnsfunc


def test_5_hot_reload_without_restarts_then_relay_with_dkim(kube, operator, sink, dns_server):
    before = {l: pod_state(kube, l) for l in ["mx", "submission"]}
    ip = pod_ip(kube, "mx-0")
    assert rcpt_reply(ip, "ceo@corp.example.com")[0] == 250

    # Deleting a MailDomain removes it from the served config, and the pods apply it.
    kube.run("delete", "maildomain", "corp-example-com", "-n", NS)
    poll(lambda: "corp.example.com" not in kube.json("get", "configmap", "mx-config", "-n", NS)
         ["data"]["mta.yaml"], what="corp.example.com gone from the rendered config")
    poll(lambda: rcpt_reply(ip, "ceo@corp.example.com")[0] == 550, timeout=240,
         what="the running pod refusing corp.example.com (config file reloaded)")

    # Relay: this host's network may relay, through the sink as smarthost.
    kube.run("patch", "relaypolicy", "internal", "-n", NS, "--type=merge", "-p", json.dumps({
        "spec": {"clientNetworks": ["10.0.0.0/8", "198.18.0.0/15"],
                 "route": {"mode": "Smarthost",
                           "smarthost": {"host": HOST_ADDRESS, "port": sink.controller.port}}}}))
    poll(lambda: rcpt_reply(ip, "friend@elsewhere.test", USER)[0] == 250, timeout=240,
         what="the running pod relaying for the host network")
    send(ip, USER, ["friend@elsewhere.test"], "relayed")
    msg = poll(lambda: [m for m in sink.messages if b"relayed@e2e.test" in m.content],
               what="the relayed message at the sink")[0]
    assert b"DKIM-Signature:" in msg.content
    assert dkim.verify(msg.content, dnsfunc=dnsfunc_of(dns_server)), "dkimpy verifies it"

    # (The autoscaled listener's HPA may add pods meanwhile; no pod may be replaced.)
    after = {l: pod_state(kube, l) for l in ["mx", "submission"]}
    for listener, state in before.items():
        for pod, uid_restarts in state.items():
            assert after[listener].get(pod) == uid_restarts, f"{pod} was restarted or replaced"


def test_6_a_reconcile_with_nothing_changed_writes_nothing(kube, operator):
    versions = owned_versions(kube)
    statuses = {k: kube.json("get", k, "-n", NS)["items"] for k in KINDS.split(",")}
    runs = reconcile_runs(kube, "SmtpListener")
    # An annotation changes no spec but triggers a reconcile of each listener.
    for listener in ["mx", "submission"]:
        kube.run("annotate", "smtplistener", listener, "-n", NS, "e2e.petrel.dev/poke=1",
                 "--overwrite")
    poll(lambda: reconcile_runs(kube, "SmtpListener") >= runs + 2,
         what="two more SmtpListener reconciles")
    now = owned_versions(kube)
    assert now == versions, {k: (versions.get(k), v) for k, v in now.items() if versions.get(k) != v}
    for kind, items in statuses.items():
        now = kube.json("get", kind, "-n", NS)["items"]
        for before, after in zip(items, now):
            old, new = before.get("status") or {}, after.get("status") or {}
            changed = {k: (old.get(k), new.get(k)) for k in set(old) | set(new)
                       if old.get(k) != new.get(k)}
            assert not changed, f"{kind}/{after['metadata']['name']}: {changed}"


def dkim_tags(text):
    """The tags of a DKIM-Signature or of a DKIM key record: {"s": ..., "t": ..., "p": ...}."""
    if isinstance(text, bytes):
        text = text.decode()
    tags = {}
    for part in re.sub(r"\s+", "", text).split(";"):
        if "=" in part:
            name, value = part.split("=", 1)
            tags[name] = value
    return tags


def check_signatures(content, server):
    """Every DKIM-Signature of `content` checked by dkimpy against the zone's server:
    [(selector, p= of the record it was checked against, t= or None, verified)]. During a
    switch a message may carry two signatures (the new key's and the old one's)."""
    fields = email.message_from_bytes(content).get_all("DKIM-Signature") or []
    checker = dkim.DKIM(content)
    out = []
    for idx, field in enumerate(fields):
        tags = dkim_tags(field)
        answers = []

        def dnsfunc(name, timeout=5):
            value = server.lookup_txt(name.decode() if isinstance(name, bytes) else name)
            answers.append(value)
            return value
        try:
            ok = bool(checker.verify(idx=idx, dnsfunc=dnsfunc))
        except dkim.DKIMException:
            ok = False
        key = dkim_tags(answers[-1]).get("p") if answers and answers[-1] else None
        signed_at = int(tags["t"]) if tags.get("t", "").isdigit() else None
        out.append((tags.get("s"), key, signed_at, ok))
    return out


def key_label(selector, p):
    return f"{selector}:{(p or '-')[:8]}"


def test_7_dkim_keys_rotate_with_mail_flowing(kube, operator, sink, dns_server):
    """Two rotations under a steady stream of relayed mail, sent to both mx pods in turn:
    every message is signed, every signature verifies on arrival (dkimpy) and was made
    with a key whose record nsd was already serving; at least three distinct keys sign;
    the messages of each retired key verify again just before its overlap ends."""
    key_name = "example-com-ed25519"
    stop = threading.Event()
    errors = []
    # (selector, p=) -> when nsd first served that record, as the publisher saw it: after
    # set_txt returned (nsd serves the new serial), so never earlier than the truth.
    published_at = {}

    def publish_once():
        status = kube.get("dkimkey", key_name, NS).get("status", {})
        records = {s["recordName"]: s["recordValue"] for s in status.get("selectors", [])}
        dns_server.set_txt(records)
        served = time.time()
        for s in status.get("selectors", []):
            published_at.setdefault((s["selector"], dkim_tags(s["recordValue"]).get("p")),
                                    served)

    def publisher():
        # The DNS admin: serves every record status asks for (next, active, retiring,
        # revoked), as external-dns or a person would.
        while not stop.is_set():
            try:
                publish_once()
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(f"publisher: {e}")
            stop.wait(0.5)

    # Both pods of mx take mail in turn (each signs with the keys it has loaded).
    targets = []
    for name in ("mx-0", "mx-1"):
        ip = pod_ip(kube, name)
        try:
            with smtplib.SMTP(ip, SMTP_PORT, timeout=10) as s:
                s.noop()
            targets.append((name, ip))
        except OSError as e:
            log(f"{name} ({ip}) not reachable, not sending to it: {e}")
    assert targets, "no mx pod reachable"
    sent = {}  # token -> pod

    def sender():
        n = 0
        while not stop.is_set():
            n += 1
            token = f"rot-{n}"
            pod, ip = targets[n % len(targets)]
            try:
                send(ip, USER, ["friend@elsewhere.test"], token)
                sent[token] = pod
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(f"send {token} to {pod}: {e}")
            stop.wait(0.3)

    # Records already served (the first key, published in step 3) count from now: every
    # message of this step is signed after this.
    publish_once()
    threads = [threading.Thread(target=f, daemon=True) for f in (publisher, sender)]
    for t in threads:
        t.start()
    arrived = {}  # token -> {"content", "received_at", "signatures"}
    failures, unsigned = [], []
    reverified = {}  # key label -> messages re-verified just before its overlap ended

    def check_arrivals():
        for m in sink.messages:
            found = re.search(rb"Message-ID: <(rot-\d+)@e2e.test>", m.content)
            received_at = getattr(m, "received_at", None)
            if not found or received_at is None or found.group(1).decode() in arrived:
                continue
            token = found.group(1).decode()
            signatures = check_signatures(m.content, dns_server)
            arrived[token] = {"content": m.content, "received_at": received_at,
                              "signatures": signatures}
            if not signatures:
                unsigned.append(token)
            failures.extend((token, key_label(sel, p)) for sel, p, _, ok in signatures
                            if not ok)

    def recheck_retiring():
        # Just before a Retiring key's overlap ends (overlap counts from when the pods
        # stopped signing, which is after `since`), its messages must still verify.
        status = kube.get("dkimkey", key_name, NS).get("status", {})
        for s in status.get("selectors", []):
            key = (s["selector"], dkim_tags(s["recordValue"]).get("p"))
            if s["phase"] != "Retiring" or key_label(*key) in reverified:
                continue
            since = calendar.timegm(time.strptime(s["since"], "%Y-%m-%dT%H:%M:%SZ"))
            if time.time() < since + OVERLAP - 5:
                continue
            check_arrivals()
            old = [(token, idx, a["content"]) for token, a in arrived.items()
                   for idx, (sel, p, _, ok) in enumerate(a["signatures"])
                   if ok and (sel, p) == key]
            assert old, f"messages signed with {key_label(*key)}"
            bad = []
            for token, idx, content in old:
                sel, p, _, ok = check_signatures(content, dns_server)[idx]
                if not ok or (sel, p) != key:
                    bad.append(token)
            assert not bad, (f"{key_label(*key)}: {len(bad)} of {len(old)} fail before its "
                             f"overlap ends: {bad[:10]}")
            log(f"re-verified {len(old)} messages signed with {key_label(*key)} "
                f"{time.time() - since:.0f} s after it started retiring")
            reverified[key_label(*key)] = len(old)

    OVERLAP = 25
    actives = [kube.get("dkimkey", key_name, NS)["status"]["activeSelector"]]
    started = time.monotonic()
    try:
        kube.run("patch", "dkimkey", key_name, "-n", NS, "--type=merge", "-p", json.dumps(
            {"spec": {"rotationPeriod": "20s", "overlap": f"{OVERLAP}s"}}))

        def two_rotations_and_rechecks():
            check_arrivals()
            recheck_retiring()
            active = kube.get("dkimkey", key_name, NS)["status"].get("activeSelector")
            if active and active != actives[-1]:
                actives.append(active)
                log(f"active selector {active} after {time.monotonic() - started:.0f} s")
            return len(actives) >= 3 and len(reverified) >= 2

        poll(two_rotations_and_rechecks, timeout=420, interval=1,
             what="two rotations, and the retired keys' messages re-verified")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
        kube.run("patch", "dkimkey", key_name, "-n", NS, "--type=merge", "-p", json.dumps(
            {"spec": {"rotation": "Manual"}}), check=False)
    duration = time.monotonic() - started
    poll(lambda: (check_arrivals(), all(t in arrived for t in sent))[1], timeout=120,
         what="every message sent arrived at the sink")

    # Per key (selector and p= value, so a slot's second key counts apart from its first):
    # verified signatures, and how long after its record was first served it first signed.
    # A signature's time is its t= (whole seconds), else the message's arrival.
    by_key, first_signed, unpublished = {}, {}, []
    for token, a in sorted(arrived.items()):
        for sel, p, t, ok in a["signatures"]:
            if not ok:
                continue
            label = key_label(sel, p)
            by_key[label] = by_key.get(label, 0) + 1
            signed_at = t if t is not None else a["received_at"]
            first_signed[label] = min(first_signed.get(label, signed_at), signed_at)
            served = published_at.get((sel, p))
            if served is None or signed_at < math.floor(served):
                unpublished.append((token, label, signed_at, served))
    times = sorted(a["received_at"] for a in arrived.values())
    gaps = [b - a for a, b in zip(times, times[1:])]
    per_pod = {pod: sum(1 for p in sent.values() if p == pod) for pod, _ in targets}
    two = sum(1 for a in arrived.values() if len(a["signatures"]) > 1)
    margins = {label: round(first_signed[label] - published_at[(sel, p)], 1)
               for (sel, p) in published_at if (label := key_label(sel, p)) in first_signed}
    log(f"rotation figures: {len(sent)} sent {per_pod}, {len(arrived)} arrived, "
        f"{sum(by_key.values())} signatures verified on arrival ({two} messages with two), "
        f"by key {by_key}; failures {len(failures)} {failures[:10]}; unsigned "
        f"{len(unsigned)}; signed before published {len(unpublished)} {unpublished[:10]}; "
        f"re-verified before overlap end {reverified}; first signature after its record "
        f"was served (s, t= has 1 s resolution) {margins}; largest gap between arrivals "
        f"{max(gaps, default=0):.2f} s; active selectors {actives}; {duration:.0f} s; "
        f"errors {errors}")
    assert actives[:3] == ["petrel-a", "petrel-b", "petrel-a"], actives
    assert not errors, errors
    assert not unsigned, f"{len(unsigned)} messages unsigned: {unsigned[:10]}"
    assert not failures, failures
    assert not unpublished, f"signed with a key before nsd served its record: {unpublished}"
    signing_keys = [label for label, n in by_key.items() if n > 0]
    assert len(signing_keys) >= 3, f"two rotations: three keys sign ({by_key})"


def test_8_a_missing_secret_breaks_nothing_that_runs(kube, operator):
    before = pod_state(kube, "submission")
    sts = kube.get("statefulset", "submission", NS)
    assert before
    kube.run("patch", "smtplistener", "submission", "-n", NS, "--type=merge", "-p",
             json.dumps({"spec": {"tls": {"secretName": "no-such-secret"}}}))
    poll(lambda: "Secret no-such-secret" in condition(kube.get("smtplistener", "submission", NS))
         .get("message", ""), what="Ready=False naming no-such-secret")
    c = condition(kube.get("smtplistener", "submission", NS))
    assert (c["status"], c["reason"]) == ("False", "SecretNotFound")
    assert kube.get("statefulset", "submission", NS)["spec"]["template"] == \
        sts["spec"]["template"], "the pod template was not touched"
    after = pod_state(kube, "submission")
    assert all(after.get(pod) == state for pod, state in before.items()), "pods untouched"
    kube.run("patch", "smtplistener", "submission", "-n", NS, "--type=merge", "-p",
             json.dumps({"spec": {"tls": {"secretName": "smtp-example-com-tls"}}}))
    kube.wait("--for=condition=Ready", "smtplistener/submission", "-n", NS)


def test_9_deleting_the_listener_collects_what_it_owned(kube, operator):
    owned = [o for o in owned_versions(kube)
             if o.split("/")[1] in ("mx", "mx-config", "mx-tls", "mx-dkim", "mx-headless")]
    assert len(owned) >= 6, owned
    kube.run("delete", "smtplistener", "mx", "-n", NS)
    for o in owned:
        kind, name = o.split("/")
        kube.wait("--for=delete", f"{kind}/{name}", "-n", NS)
    assert not pods(kube, "mx") or poll(lambda: not pods(kube, "mx"), what="mx pods gone")
