"""Issue 15 (TLS) on a real cluster: an SmtpListener with `tls.issuerRef` gets a
cert-manager Certificate, waits for the Secret cert-manager fills, then serves it, and
serves a renewal of it without a restart or a failed handshake.

The operator runs in the cluster from its image, as the Deployment of
manifests/install.yaml: its RBAC for certificates.cert-manager.io is the one that ships.
cert-manager itself is not installed; the test stands in for it with a minimal
Certificate CRD (only what the test needs; spec and status preserve unknown fields) and
by writing the Secret the way cert-manager does. In file order:

 1. Without the Certificate CRD, the listener says CertManagerMissing and nothing is made.
 2. With it, the Certificate appears with the fields cert-manager needs, owned by the
    listener, and the listener waits (SecretNotFound) with cert-manager's word on it.
 3. The Secret is written: the pod runs, the listener is Ready, STARTTLS to the pod
    serves that certificate, status has certificateNotAfter and renewalTime.
 4. A renewal (new key and certificate in the same Secret, as cert-manager writes it)
    reaches the running pod through the kubelet's volume update: the new serial is served,
    0 failed handshakes meanwhile, the pod not restarted.
 5. Deleting the listener garbage-collects the Certificate.
"""

import datetime
import smtplib
import ssl
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

sys.path.insert(0, str(Path(__file__).resolve().parent))
from live import ROOT, log, poll  # noqa: E402

NS = "petrel-certs"
OPERATOR_NS = "petrel-system"
HOSTNAME = "mx.certs.test"
SMTP_PORT = 10025  # container port of port 25 (unprivileged pods)
PETREL_KINDS = "smtplisteners,maildomains,dkimkeys,relaypolicies"

CERTIFICATE_CRD = """\
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: certificates.cert-manager.io
spec:
  group: cert-manager.io
  names: {kind: Certificate, listKind: CertificateList, plural: certificates,
          singular: certificate, shortNames: [cert, certs]}
  scope: Namespaced
  versions:
    - name: v1
      served: true
      storage: true
      subresources: {status: {}}
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec: {type: object, x-kubernetes-preserve-unknown-fields: true}
            status: {type: object, x-kubernetes-preserve-unknown-fields: true}
"""

LISTENER = f"""\
apiVersion: mail.petrel.dev/v1alpha1
kind: SmtpListener
metadata: {{name: mx, namespace: {NS}}}
spec:
  hostname: {HOSTNAME}
  replicas: 1
  ports: [{{name: smtp, kind: smtp, port: 25}}]
  service: {{type: ClusterIP}}
  queue: {{size: 64Mi}}
  tls:
    issuerRef: {{name: test-issuer, kind: ClusterIssuer}}
    renewBefore: 720h
"""


class Pair:
    """A certificate for HOSTNAME valid for 90 days from now, and its key (PEM)."""

    def __init__(self):
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
        self.not_after = now + datetime.timedelta(days=90)
        self.serial = x509.random_serial_number()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOSTNAME)])
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(key.public_key()).serial_number(self.serial)
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(self.not_after)
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(HOSTNAME)]),
                               critical=False)
                .sign(key, hashes.SHA256()))
        self.cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
        self.key_pem = key.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()).decode()

    def secret(self):
        """The Secret as cert-manager writes it for Certificate mx."""
        return yaml.safe_dump({
            "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
            "metadata": {"name": "mx-issued-tls", "namespace": NS, "annotations": {
                "cert-manager.io/certificate-name": "mx",
                "cert-manager.io/issuer-name": "test-issuer",
                "cert-manager.io/issuer-kind": "ClusterIssuer",
                "cert-manager.io/issuer-group": "cert-manager.io"}},
            "stringData": {"tls.crt": self.cert_pem, "tls.key": self.key_pem}})


def rfc3339(t):
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def served_serial(ip):
    """The serial of the certificate a STARTTLS handshake with `ip` is given."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP(ip, SMTP_PORT, timeout=20) as smtp:
        smtp.ehlo("e2e.test")
        smtp.starttls(context=context)
        der = smtp.sock.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).serial_number


def condition(obj, type_="Ready"):
    for c in (obj or {}).get("status", {}).get("conditions", []):
        if c["type"] == type_:
            return c
    return {}


@pytest.fixture(scope="module")
def operator(kube):
    kube.run("delete", "crd", "certificates.cert-manager.io", "--ignore-not-found")
    kube.run("apply", "--server-side", "-f", str(ROOT / "manifests" / "crds"))
    kube.wait("--for=condition=Established",
              *[f"crd/{k}.mail.petrel.dev" for k in PETREL_KINDS.split(",")], timeout=60)
    manifests = (ROOT / "manifests" / "install.yaml").read_text()
    kube.apply(manifests)
    kube.wait("--for=condition=Available", "deployment/petrel-operator", "-n", OPERATOR_NS)
    kube.run("create", "namespace", NS)
    yield
    log("operator logs (tail):\n" + kube.run("logs", "-n", OPERATOR_NS, "deploy/petrel-operator",
                                             "--tail=40", check=False).stdout)
    kube.run("delete", "namespace", NS, "--wait=false", check=False)
    kube.run("delete", "crd", "certificates.cert-manager.io", "--ignore-not-found",
             "--wait=false", check=False)
    kube.run("delete", "--ignore-not-found", "--wait=false", "-f", "-", input=manifests,
             check=False)


def listener(kube):
    return kube.get("smtplistener", "mx", NS)


def test_1_without_cert_manager_the_listener_says_so(kube, operator):
    kube.apply(LISTENER)
    obj = poll(lambda: (o := listener(kube)) and condition(o).get("reason") == "CertManagerMissing"
               and o, what="Ready=False CertManagerMissing")
    assert condition(obj)["status"] == "False"
    assert "certificates.cert-manager.io/v1" in condition(obj)["message"]
    log(f"without cert-manager: {condition(obj)['message']}")
    assert kube.get("statefulset", "mx", NS) is None, "nothing applied"


def test_2_the_certificate_appears_and_the_listener_waits_for_its_secret(kube, operator):
    kube.apply(CERTIFICATE_CRD)
    kube.wait("--for=condition=Established", "crd/certificates.cert-manager.io", timeout=60)
    # The listener is looked at again within SECRET_RECHECK (20 s).
    cert = poll(lambda: kube.get("certificate", "mx", NS), timeout=120,
                what="the Certificate")
    assert cert["spec"] == {
        "secretName": "mx-issued-tls",
        "dnsNames": [HOSTNAME],
        "issuerRef": {"name": "test-issuer", "kind": "ClusterIssuer",
                      "group": "cert-manager.io"},
        "renewBefore": "720h",
        "privateKey": {"rotationPolicy": "Always"},
    }, cert["spec"]
    owner = cert["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["controller"]) == ("SmtpListener", "mx", True)
    assert cert["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "petrel-operator"

    # cert-manager's word on the Certificate reaches the listener's message.
    kube.run("patch", "certificate", "mx", "-n", NS, "--subresource=status", "--type=merge",
             "-p", '{"status": {"conditions": [{"type": "Ready", "status": "False", '
                   '"reason": "DoesNotExist", "message": "Issuing certificate as Secret '
                   'does not exist"}]}}')
    obj = poll(lambda: (o := listener(kube)) and "Issuing certificate" in
               condition(o).get("message", "") and o, timeout=120,
               what="SecretNotFound with cert-manager's message")
    c = condition(obj)
    assert c["reason"] == "SecretNotFound", c
    assert "Secret mx-issued-tls" in c["message"], c
    log(f"waiting: {c['message']}")
    assert kube.get("statefulset", "mx", NS) is None, "nothing applied yet"


def test_3_the_issued_secret_is_mounted_and_served(kube, operator, state):
    pair = Pair()
    kube.apply(pair.secret())
    obj = poll(lambda: (o := listener(kube)) and condition(o).get("status") == "True" and o,
               timeout=300, interval=2, what="the listener Ready")
    sts = kube.get("statefulset", "mx", NS)
    tls = next(v for v in sts["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls")
    assert tls["secret"]["secretName"] == "mx-issued-tls"
    assert kube.get("secret", "mx-tls", NS) is None, "no self-signed Secret"
    pod = kube.json("get", "pod", "mx-0", "-n", NS)
    ip = pod["status"]["podIP"]
    assert served_serial(ip) == pair.serial
    restarts, why = kube.restarts("mx-0", NS)
    if restarts:
        # The test cluster opens a new hostPath volume's folder to non-root pods from a loop
        # that runs every 0.5 s (cluster.sh), so a pod that starts first finds its spool
        # unwritable, exits saying so and is restarted by the kubelet. That restart is the
        # cluster's; a restart for any other reason (the certificate) fails here.
        assert "cannot open spool" in why and "Permission denied" in why, why
        log(f"mx-0 restarted {restarts}x before Ready: its new volume was not yet writable")
    assert obj["status"]["certificateNotAfter"] == rfc3339(pair.not_after)
    assert obj["status"]["renewalTime"] == rfc3339(pair.not_after - datetime.timedelta(days=30))
    log(f"serving serial {pair.serial:x}; notAfter {obj['status']['certificateNotAfter']}, "
        f"renewalTime {obj['status']['renewalTime']}")
    state.update(ip=ip, pair=pair, pod_uid=pod["metadata"]["uid"], restarts=restarts)


def test_4_a_renewal_is_served_without_restart_or_failed_handshake(kube, operator, state):
    ip, old = state["ip"], state["pair"]
    served, failures, stop = [], [], threading.Event()

    def handshakes():
        while not stop.is_set():
            try:
                served.append((time.monotonic(), served_serial(ip)))
            except Exception as e:  # every failure counts
                failures.append(repr(e))

    client = threading.Thread(target=handshakes, daemon=True)
    client.start()
    try:
        poll(lambda: len(served) >= 50, timeout=120, what="handshakes before the renewal")
        renewed = Pair()
        written = time.monotonic()
        kube.apply(renewed.secret())
        seen = poll(lambda: next((t for t, s in list(served) if s == renewed.serial), None),
                    timeout=240, interval=0.5, what="the renewed certificate served")
        poll(lambda: sum(1 for t, _ in list(served) if t > seen) >= 100, timeout=120,
             what="handshakes after the renewal")
    finally:
        stop.set()
        client.join(timeout=60)
    assert failures == [], failures[:5]
    after = [s for t, s in served if t > seen]
    assert set(after) == {renewed.serial}, "once served, the renewal stays"
    assert {s for _, s in served} == {old.serial, renewed.serial}
    pod = kube.json("get", "pod", "mx-0", "-n", NS)
    assert pod["metadata"]["uid"] == state["pod_uid"], "the same pod"
    restarts, why = kube.restarts("mx-0", NS)
    assert restarts == state["restarts"], why
    log(f"renewal: {len(served)} STARTTLS handshakes, 0 failed; new serial served "
        f"{seen - written:.1f} s after the Secret was written (the kubelet's volume sync)")


def test_5_deleting_the_listener_removes_its_certificate(kube, operator):
    kube.run("delete", "smtplistener", "mx", "-n", NS)
    poll(lambda: kube.get("certificate", "mx", NS) is None, timeout=120,
         what="the Certificate garbage-collected")


@pytest.fixture(scope="module")
def state():
    return {}
