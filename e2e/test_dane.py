"""DANE (RFC 7672) on outbound delivery by MX, against really signed zones.

`dnssec.SignedDns` signs a private root, a secure `test.`, an unsigned `unsigned.test.` and
a bogus `bogus.test.` with ldnsutils and serves them with nsd; `dnssec.Front` relays to it
and answers SERVFAIL for chosen names. The MTA's resolver asks the front and trusts only
the private root's key (`smtp_client.dnssec_trust_anchor`). Before any delivery,
`test_delv_agrees_on_every_answer` checks with delv, an independent validator, that each
answer really is secure, insecure, bogus or a SERVFAIL.

Each case is an aiosmtpd sink offering STARTTLS on its own 127.0.0.x address (all on one
OS-chosen port, `smtp_client.port`); TLSA records are computed from the sinks'
certificates, made here with `cryptography`.
"""

import datetime
import hashlib

import pytest

from dnssec import Front, SignedDns, have_tools

pytestmark = pytest.mark.skipif(not have_tools(),
                                reason="ldnsutils, bind9-dnsutils (delv) or nsd missing")
pytest.importorskip("cryptography")

DNS_IP = "127.0.0.60"
# domain: (MX host, its address)
MX = {
    "ee.test": ("mx.ee.test", "127.0.0.61"),
    "wrongdigest.test": ("mx.wrongdigest.test", "127.0.0.62"),
    "bad.bogus.test": ("mx.bad.bogus.test", "127.0.0.63"),
    "plain.unsigned.test": ("mx.plain.unsigned.test", "127.0.0.64"),
    "ta.test": ("mx.ta.test", "127.0.0.65"),
    "tawrongname.test": ("mx.tawrongname.test", "127.0.0.66"),
    "servfail.test": ("mx.servfail.test", "127.0.0.67"),
    "both.test": ("mx.both.test", "127.0.0.68"),
    "bothbad.test": ("mx.bothbad.test", "127.0.0.69"),
}
SERVFAIL = [("_25._tcp.mx.servfail.test", "TLSA")]


def zone_of(name):
    for zone in ("bogus.test.", "unsigned.test."):
        if (name + ".").endswith("." + zone):
            return zone
    return "test."


def spki_sha256(cert_path):
    """The TLSA `x 1 1` data of the first certificate in a PEM file."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    cert = x509.load_pem_x509_certificates(cert_path.read_bytes())[0]
    spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


def self_signed(directory, name, expired=False):
    """A self-signed certificate (not from any CA, for `name` only, optionally long
    expired): what DANE-EE accepts when its key matches, and nothing else does."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    start = now - datetime.timedelta(days=400 if expired else 1)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=30 if expired else 400))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class World:
    """The signed zones, the front, the certificates and (when delivering) the sinks."""

    def __init__(self, directory):
        from test_mta_sts import Ca
        self.dir = directory
        self.ca = Ca(directory, "dane-ta-ca")
        self.sts_ca = Ca(directory, "sts-ca")
        self.certs = {
            # DANE-EE ignores names and expiry: a long-expired certificate for another name.
            "ee.test": self_signed(directory, "unrelated.example", expired=True),
            "wrongdigest.test": self_signed(directory, "mx.wrongdigest.test"),
            "bad.bogus.test": self_signed(directory, "mx.bad.bogus.test"),
            "plain.unsigned.test": self_signed(directory, "mx.plain.unsigned.test"),
            "ta.test": self.ca.issue("mx.ta.test"),
            "tawrongname.test": self.ca.issue("mx.someone-else.test"),
            "servfail.test": self_signed(directory, "mx.servfail.test"),
            # Not from the CA MTA-STS trusts: MTA-STS alone would defer; DANE decides.
            "both.test": self_signed(directory, "mx.both.test"),
            # From the CA MTA-STS trusts, but the TLSA digest is wrong: DANE defers.
            "bothbad.test": self.sts_ca.issue("mx.bothbad.test"),
        }
        records = {"test.": [], "unsigned.test.": [], "bogus.test.": []}
        wrong = "00" * 32
        tlsa = {
            "ee.test": f"3 1 1 {spki_sha256(self.certs['ee.test'][0])}",
            "wrongdigest.test": f"3 1 1 {wrong}",
            "bad.bogus.test": f"3 1 1 {spki_sha256(self.certs['bad.bogus.test'][0])}",
            "ta.test": f"2 1 1 {spki_sha256(self.ca.pem_path)}",
            "tawrongname.test": f"2 1 1 {spki_sha256(self.ca.pem_path)}",
            "servfail.test": f"3 1 1 {spki_sha256(self.certs['servfail.test'][0])}",
            "both.test": f"3 1 1 {spki_sha256(self.certs['both.test'][0])}",
            "bothbad.test": f"3 1 1 {wrong}",
        }
        for domain, (host, ip) in MX.items():
            records[zone_of(domain)].append(f"{domain}. IN MX 10 {host}.")
            records[zone_of(host)].append(f"{host}. IN A {ip}")
            if domain in tlsa:
                records[zone_of(host)].append(f"_25._tcp.{host}. IN TLSA {tlsa[domain]}")
        for domain in ("both.test", "bothbad.test"):
            records["test."] += [f'_mta-sts.{domain}. IN TXT "v=STSv1; id=20260101T000000;"',
                                 f"mta-sts.{domain}. IN A 127.0.0.20"]
        self.dns = SignedDns(records, listen=DNS_IP)
        self.front = Front((DNS_IP, self.dns.port), servfail=SERVFAIL, listen=DNS_IP)
        self.sinks, self.policy_server = {}, None

    def stop(self):
        for sink in self.sinks.values():
            sink.stop()
        if self.policy_server:
            self.policy_server.stop()
        self.front.stop()
        self.dns.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = World(tmp_path_factory.mktemp("dane"))
    yield w
    w.stop()


def test_delv_agrees_on_every_answer(world):
    """The zones are what the cases below assume, by a validator we did not write."""
    d, front = world.dns, world.front.port
    assert d.delv("ee.test", "MX") == "secure"
    assert d.delv("mx.ee.test", "A") == "secure"
    assert d.delv("_25._tcp.mx.ee.test", "TLSA") == "secure"
    assert d.delv("_25._tcp.mx.wrongdigest.test", "TLSA") == "secure"
    assert d.delv("_25._tcp.mx.ta.test", "TLSA") == "secure"
    assert d.delv("plain.unsigned.test", "MX") == "insecure"
    assert d.delv("mx.plain.unsigned.test", "A") == "insecure"
    assert d.delv("bad.bogus.test", "MX") == "bogus"
    assert d.delv("_25._tcp.mx.bad.bogus.test", "TLSA") == "bogus"
    assert d.delv("_25._tcp.mx.servfail.test", "TLSA") == "secure"
    assert d.delv("_25._tcp.mx.servfail.test", "TLSA", port=front) == "servfail"
    assert d.delv("mx.servfail.test", "A", port=front) == "secure"
    assert d.delv("_mta-sts.both.test", "TXT", port=front) == "secure"
    # A name that does not exist is proven not to exist.
    assert d.delv("_25._tcp.mx.none.test", "TLSA") == "secure"
