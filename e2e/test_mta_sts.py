"""MTA-STS (RFC 8461) on outbound delivery by MX: dnsmasq publishes the `_mta-sts` TXT
records, Python's http.server serves the policies over real HTTPS, and aiosmtpd sinks
offer STARTTLS as the MX hosts. A test CA made here with `cryptography` signs the
certificates; the MTA trusts it through `smtp_client.ca_file`.

Addresses: 127.0.0.20 serves the policies (OS-chosen port, `smtp_client.mta_sts_port`);
127.0.0.21-25 are the MX hosts, all on one OS-chosen port (`smtp_client.port`)."""

import datetime
import json
import shutil
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from aiosmtpd.controller import Controller

from conftest import Mta, wait_for
from outbound import Dns, Sink, SinkHandler, free_port
from test_outbound import outbound_config, queue_cli, send

pytestmark = pytest.mark.skipif(shutil.which("dnsmasq") is None, reason="dnsmasq is not installed")
crypto = pytest.importorskip("cryptography")

POLICY_IP = "127.0.0.20"
POLICIES = {
    # Enforced, and the MX presents a certificate from the trusted CA.
    "enforce.test": "version: STSv1\r\nmode: enforce\r\nmx: mx.enforce.test\r\nmax_age: 86400\r\n",
    # Enforced, but the domain's MX is not one the policy lists.
    "wrongmx.test": "version: STSv1\r\nmode: enforce\r\nmx: *.elsewhere.test\r\nmax_age: 86400\r\n",
    # Enforced, but the MX's certificate comes from a CA nobody trusts.
    "badcert.test": "version: STSv1\r\nmode: enforce\r\nmx: mx.badcert.test\r\nmax_age: 86400\r\n",
    # Testing: the same untrusted certificate only gets a warning.
    "testing.test": "version: STSv1\r\nmode: testing\r\nmx: mx.testing.test\r\nmax_age: 86400\r\n",
}
MX_IPS = {
    "enforce.test": "127.0.0.21",
    "wrongmx.test": "127.0.0.22",
    "badcert.test": "127.0.0.23",
    "testing.test": "127.0.0.24",
    "plain.test": "127.0.0.25",  # no _mta-sts record at all
}


class Ca:
    """A throwaway certificate authority (EC P-256) writing PEM files into `directory`."""

    def __init__(self, directory, name):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
        self.directory, self.name = directory, name
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()),
                           critical=False)
            .sign(self.key, hashes.SHA256()))
        self.pem_path = directory / f"{name}.pem"
        self.pem_path.write_bytes(self._pem(self.cert))

    @staticmethod
    def _pem(cert):
        from cryptography.hazmat.primitives import serialization
        return cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, *names, expired=False):
        """A server certificate for `names` (valid now, or `expired` a month ago);
        returns (cert file, key file)."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        if expired:
            now -= datetime.timedelta(days=30)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(self.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256()))
        stem = self.directory / f"{self.name}-{names[0]}{'-expired' if expired else ''}"
        cert_path, key_path = stem.with_suffix(".crt"), stem.with_suffix(".key")
        cert_path.write_bytes(self._pem(cert) + self._pem(self.cert))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return cert_path, key_path


def server_context(cert_key):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*cert_key)
    return context


class PolicyServer:
    """HTTPS on POLICY_IP: `/.well-known/mta-sts.txt` answers with the policy of the domain
    named in the Host header (`mta-sts.<domain>`), 404 otherwise. Records each request."""

    def __init__(self, cert_key, policies):
        self.requests = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                host = (self.headers.get("Host") or "").split(":")[0]
                server.requests.append((host, self.path))
                policy = policies.get(host.removeprefix("mta-sts."))
                if self.path != "/.well-known/mta-sts.txt" or policy is None:
                    self.send_error(404)
                    return
                body = policy.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer((POLICY_IP, 0), Handler)
        self.httpd.socket = server_context(cert_key).wrap_socket(self.httpd.socket,
                                                                 server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class TlsHandler(SinkHandler):
    """A sink handler that also records, per message, whether it came over TLS."""

    def __init__(self):
        super().__init__()
        self.over_tls = []

    async def handle_DATA(self, server, session, envelope):
        with self.lock:
            self.over_tls.append(session.ssl is not None)
        return await super().handle_DATA(server, session, envelope)


class TlsSink(Sink):
    """An MX host offering STARTTLS with `cert_key`; `require_starttls` refuses mail
    before TLS."""

    def __init__(self, host, port, cert_key, require_starttls=False):
        self.handler = TlsHandler()
        self.controller = Controller(self.handler, hostname=host, port=port,
                                     decode_data=False, tls_context=server_context(cert_key),
                                     require_starttls=require_starttls)
        self.controller.start()


@pytest.fixture
def sts_world(workdir):
    """DNS, the policy server and one MX sink per domain; yields (config text, sinks,
    policy server)."""
    trusted = Ca(workdir, "trusted-ca")
    untrusted = Ca(workdir, "untrusted-ca")
    mx = [(domain, f"mx.{domain}", 10) for domain in MX_IPS]
    hosts = [(f"mx.{domain}", ip) for domain, ip in MX_IPS.items()]
    hosts += [(f"mta-sts.{domain}", POLICY_IP) for domain in POLICIES]
    txt = [(f"_mta-sts.{domain}", "v=STSv1; id=20260101T000000;") for domain in POLICIES]
    dns = Dns(mx=mx, hosts=hosts, txt=txt)
    policy_server = PolicyServer(trusted.issue(*(f"mta-sts.{d}" for d in POLICIES)), POLICIES)
    port = free_port(host=MX_IPS["enforce.test"])
    sinks = {
        "enforce.test": TlsSink(MX_IPS["enforce.test"], port, trusted.issue("mx.enforce.test"),
                                require_starttls=True),
        "wrongmx.test": TlsSink(MX_IPS["wrongmx.test"], port, trusted.issue("mx.wrongmx.test")),
        "badcert.test": TlsSink(MX_IPS["badcert.test"], port,
                                untrusted.issue("mx.badcert.test")),
        "testing.test": TlsSink(MX_IPS["testing.test"], port,
                                untrusted.issue("mx.testing.test")),
        "plain.test": Sink(MX_IPS["plain.test"], port),
    }
    config = outbound_config(workdir, dns.port, port).replace(
        "smtp_client:\n",
        f"smtp_client:\n  ca_file: {trusted.pem_path}\n  mta_sts_port: {policy_server.port}\n")
    yield config, sinks, policy_server
    for sink in sinks.values():
        sink.stop()
    policy_server.stop()
    dns.stop()


def deferred_detail(mta):
    """The detail of the only queued message's first recipient, once it is deferred."""
    data = json.loads(queue_cli(mta, "--json", "list").stdout)
    for entry in data["messages"]:
        status = entry["recipients"][0]["status"]
        if status["state"] == "deferred":
            return status.get("detail") or json.dumps(status)
    return None


def test_enforce_delivers_over_verified_tls(workdir, sts_world):
    config, sinks, policy_server = sts_world
    mta = Mta(workdir, config).start()
    try:
        send(mta, "me@example.test", ["user@enforce.test"], subject="enforced")
        got = wait_for(lambda: sinks["enforce.test"].messages, what="delivery to mx.enforce.test")
        assert got[0].recipients == ["user@enforce.test"]
        assert sinks["enforce.test"].handler.over_tls == [True]
        assert ("mta-sts.enforce.test", "/.well-known/mta-sts.txt") in policy_server.requests
        assert "MTA-STS policy fetched" in mta.log()
    finally:
        mta.kill()


def test_enforce_refuses_an_mx_the_policy_does_not_list(workdir, sts_world):
    config, sinks, _ = sts_world
    mta = Mta(workdir, config).start()
    try:
        send(mta, "me@example.test", ["user@wrongmx.test"], subject="wrong-mx")
        detail = wait_for(lambda: deferred_detail(mta), what="an MTA-STS deferral")
        assert "451 4.7.5 MTA-STS:" in detail and "*.elsewhere.test" in detail, detail
        # A second attempt is refused the same way, and nothing ever reaches the MX.
        wait_for(lambda: mta.log().count("4.7.5 MTA-STS: no MX host of wrongmx.test") >= 2,
                 what="a second deferred attempt")
        assert sinks["wrongmx.test"].messages == []
        assert sinks["wrongmx.test"].handler.sessions == set()
    finally:
        mta.kill()


def test_enforce_defers_when_the_mx_certificate_is_not_trusted(workdir, sts_world):
    config, sinks, _ = sts_world
    mta = Mta(workdir, config).start()
    try:
        send(mta, "me@example.test", ["user@badcert.test"], subject="bad-cert")
        detail = wait_for(lambda: deferred_detail(mta), what="an MTA-STS deferral")
        assert "451 4.7.5 MTA-STS: no verified TLS to mx.badcert.test" in detail, detail
        wait_for(lambda: mta.log().count("MTA-STS: no verified TLS to mx.badcert.test") >= 2,
                 what="a second deferred attempt")
        assert sinks["badcert.test"].messages == []
    finally:
        mta.kill()


def test_testing_mode_delivers_and_warns(workdir, sts_world):
    config, sinks, _ = sts_world
    mta = Mta(workdir, config).start()
    try:
        send(mta, "me@example.test", ["user@testing.test"], subject="testing")
        got = wait_for(lambda: sinks["testing.test"].messages, what="delivery to mx.testing.test")
        assert got[0].recipients == ["user@testing.test"]
        # Opportunistic TLS (any certificate) was still used.
        assert sinks["testing.test"].handler.over_tls == [True]
        log = mta.log()
        assert "MTA-STS testing: no verified TLS to the MX host; enforce would defer" in log
        assert "WARN" in next(line for line in log.splitlines() if "MTA-STS testing" in line)
    finally:
        mta.kill()


def test_no_policy_delivers_as_before(workdir, sts_world):
    config, sinks, policy_server = sts_world
    mta = Mta(workdir, config).start()
    try:
        send(mta, "me@example.test", ["user@plain.test"], subject="plain")
        got = wait_for(lambda: sinks["plain.test"].messages, what="delivery to mx.plain.test")
        assert got[0].recipients == ["user@plain.test"]
        assert policy_server.requests == []
    finally:
        mta.kill()
