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
import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import Mta, mta_header, wait_for
from dnssec import Front, SignedDns, have_tools, missing
from outbound import Sink, free_port
from test_outbound import queue_cli, send

if not have_tools():
    missing("ldnsutils, bind9-dnsutils (delv) or nsd")
try:
    import cryptography  # noqa: F401
except ImportError:
    missing("Python module cryptography")

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
    # A signed MX set naming a host in the unsigned zone: its addresses are insecure.
    "insecurehost.test": ("mx.insecurehost.unsigned.test", "127.0.0.70"),
    # The MX host is an alias (CNAME) of a host in the unsigned zone.
    "cname.test": ("mx.cname.test", "127.0.0.71"),
    # The MX host is an alias of a host in the signed zone: TLSA at the target's name.
    "cnamesec.test": ("mx.cnamesec.test", "127.0.0.72"),
    # The front answers SERVFAIL for the MX records (signed, with a matching TLSA record).
    "mxservfail.test": ("mx.mxservfail.test", "127.0.0.73"),
    # Signed MX and addresses, no TLSA record (proven absent): DANE does not apply, unless
    # a route requires it.
    "notlsa.test": ("mx.notlsa.test", "127.0.0.82"),
}
# MX host: the name its CNAME points to (which has the address).
CNAMES = {"mx.cname.test": "mx.cname.unsigned.test", "mx.cnamesec.test": "mxhost.cnamesec.test"}
SERVFAIL = [("_25._tcp.mx.servfail.test", "TLSA"), ("mxservfail.test", "MX")]
# MX 10 mx.wrongdigest.test (DANE fails), MX 20 mx.ee.test (DANE passes).
TWO_MX = "twomx.test"
# What a validator says of an answer from each zone (dnssec.py).
VERDICTS = {"test.": "secure", "unsigned.test.": "insecure", "bogus.test.": "bogus"}


def zone_of(name):
    for zone in ("bogus.test.", "unsigned.test."):
        if (name + ".").endswith("." + zone):
            return zone
    return "test."


def weakest(*verdicts):
    return min(verdicts, key=["bogus", "insecure", "secure"].index)


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

    def __init__(self, directory, extra_records=None, sts_policies=None, sts_uncertified=()):
        """`sts_policies`: more MTA-STS policies the policy server serves (domain: text,
        or None for a 404); its certificate names none of the `sts_uncertified` domains."""
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
            "insecurehost.test": self_signed(directory, "mx.insecurehost.unsigned.test"),
            "cname.test": self_signed(directory, "mx.cname.test"),
            # For the CNAME target only: DANE-TA accepts the TLSA base domain's name.
            "cnamesec.test": self.ca.issue("mxhost.cnamesec.test"),
            "mxservfail.test": self_signed(directory, "mx.mxservfail.test"),
            "notlsa.test": self_signed(directory, "mx.notlsa.test"),
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
            # Unsigned, so never used: DANE needs secure addresses and TLSA records.
            "insecurehost.test": f"3 1 1 {wrong}",
            # Signed but wrong, at the alias: not used, as the addresses are insecure.
            "cname.test": f"3 1 1 {wrong}",
            "cnamesec.test": f"2 1 1 {spki_sha256(self.ca.pem_path)}",
            "mxservfail.test": f"3 1 1 {spki_sha256(self.certs['mxservfail.test'][0])}",
        }
        tlsa_owner = {"cnamesec.test": "mxhost.cnamesec.test"}
        for domain, (host, ip) in MX.items():
            records[zone_of(domain)].append(f"{domain}. IN MX 10 {host}.")
            if host in CNAMES:
                records[zone_of(host)].append(f"{host}. IN CNAME {CNAMES[host]}.")
            address_owner = CNAMES.get(host, host)
            records[zone_of(address_owner)].append(f"{address_owner}. IN A {ip}")
            if domain in tlsa:
                owner = tlsa_owner.get(domain, host)
                records[zone_of(owner)].append(f"_25._tcp.{owner}. IN TLSA {tlsa[domain]}")
        # Two MX hosts: the preferred one fails DANE (wrong digest), the other passes.
        records["test."] += [f"{TWO_MX}. IN MX 10 mx.wrongdigest.test.",
                             f"{TWO_MX}. IN MX 20 mx.ee.test."]
        for domain in ("both.test", "bothbad.test"):
            records["test."] += [f'_mta-sts.{domain}. IN TXT "v=STSv1; id=20260101T000000;"',
                                 f"mta-sts.{domain}. IN A 127.0.0.20"]
        for zone, lines in (extra_records or {}).items():
            records[zone] += lines
        self.records = records
        self.dns = SignedDns(records, listen=DNS_IP)
        self.front = Front((DNS_IP, self.dns.port), servfail=SERVFAIL, listen=DNS_IP)
        self.sinks, self.policy_server = {}, None
        self.sts_policies, self.sts_uncertified = sts_policies or {}, set(sts_uncertified)

    def expected_answers(self):
        """[(name, type, verdict)]: every answer the MTA may ask the front for, with what
        a validator must say of it. An RRset's verdict is its zone's; an address through
        a CNAME is as weak as the weaker of the alias and its target; an MX host's TLSA
        (present or proven absent) and AAAA (proven absent) are its zone's too; the
        front's SERVFAIL names are "servfail"."""
        found, hosts = {}, set()
        for zone, lines in self.records.items():
            for line in lines:
                tokens = line.split()
                at = tokens.index("IN")
                owner, rtype, data = tokens[0].rstrip("."), tokens[at + 1], tokens[at + 2:]
                if rtype == "CNAME":
                    target = data[0].rstrip(".")
                    found[(owner, "A")] = weakest(VERDICTS[zone], VERDICTS[zone_of(target)])
                    continue
                found[(owner, rtype)] = VERDICTS[zone]
                if rtype == "MX":
                    hosts.add(data[-1].rstrip("."))
        for host in hosts:
            found.setdefault((f"_25._tcp.{host}", "TLSA"), VERDICTS[zone_of(host)])
            found.setdefault((host, "AAAA"), found.get((host, "A"), VERDICTS[zone_of(host)]))
        for name, rtype in SERVFAIL:
            found[(name, rtype)] = "servfail"
        return sorted((name, rtype, verdict) for (name, rtype), verdict in found.items())

    def delv_disagreements(self):
        """Each answer of `expected_answers` on which delv, asking the front as the MTA
        does, says otherwise."""
        expected = self.expected_answers()
        with ThreadPoolExecutor(4) as pool:
            said = list(pool.map(lambda e: self.dns.delv(e[0], e[1], port=self.front.port),
                                 expected))
        return [f"{name} {rtype}: delv says {got!r}, expected {verdict}"
                for (name, rtype, verdict), got in zip(expected, said) if got != verdict]

    def start_sinks(self):
        """One STARTTLS sink per MX, all on one port, and the MTA-STS policy server."""
        from test_mta_sts import PolicyServer, TlsSink
        if self.sinks:
            return
        self.port = free_port(host=MX["ee.test"][1])
        for domain, (_, ip) in MX.items():
            self.sinks[domain] = TlsSink(ip, self.port, self.certs[domain])
        policies = {d: f"version: STSv1\r\nmode: enforce\r\nmx: mx.{d}\r\nmax_age: 86400\r\n"
                    for d in ("both.test", "bothbad.test")}
        policies.update(self.sts_policies)
        names = [f"mta-sts.{d}" for d in policies if d not in self.sts_uncertified]
        self.policy_server = PolicyServer(self.sts_ca.issue(*names), policies)

    def config(self, workdir, smtp_client="", retry_interval="1s"):
        """The MTA relays for 127.0.0.0/8, asks the front, trusts the private root."""
        return mta_header(workdir) + f"""\
relay:
  client_networks: ["127.0.0.0/8"]
dns:
  nameservers: ["{self.front.listen}:{self.front.port}"]
smtp_client:
  port: {self.port}
  connect_timeout: 5s
  ca_file: {self.sts_ca.pem_path}
  mta_sts_port: {self.policy_server.port}
  dnssec_trust_anchor: {self.dns.anchor_file}
{smtp_client}queue:
  retry_interval: {retry_interval}
  max_retry_interval: {retry_interval}
local_domains:
  - name: example.test
    delivery:
      maildir:
        root: {workdir / "maildir"}
"""

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
    """The zones are what the cases below assume, by a validator we did not write: every
    MX, address, TLSA and TXT answer of every domain (World.expected_answers), then the
    cases that need a word of their own."""
    answers = world.expected_answers()
    assert len(answers) > 3 * len(MX), answers
    assert world.delv_disagreements() == []
    d, front = world.dns, world.front.port
    # What the front answers SERVFAIL for is secure at nsd itself.
    for name, rtype in SERVFAIL:
        assert d.delv(name, rtype) == "secure", name
    assert d.delv("ee.test", "MX") == "secure"
    assert d.delv("mx.ee.test", "A") == "secure"
    assert d.delv("_25._tcp.mx.ee.test", "TLSA") == "secure"
    assert d.delv("_25._tcp.mx.wrongdigest.test", "TLSA") == "secure"
    assert d.delv("_25._tcp.mx.ta.test", "TLSA") == "secure"
    assert d.delv("insecurehost.test", "MX") == "secure"
    assert d.delv("mx.insecurehost.unsigned.test", "A") == "insecure"
    assert d.delv("_25._tcp.mx.insecurehost.unsigned.test", "TLSA") == "insecure"
    assert d.delv("plain.unsigned.test", "MX") == "insecure"
    assert d.delv("mx.cname.test", "A") == "insecure"  # CNAME secure, target unsigned
    assert d.delv("_25._tcp.mx.cname.test", "TLSA") == "secure"
    assert d.delv("mx.cnamesec.test", "A") == "secure"
    assert d.delv("_25._tcp.mxhost.cnamesec.test", "TLSA") == "secure"
    assert d.delv("mx.plain.unsigned.test", "A") == "insecure"
    assert d.delv("bad.bogus.test", "MX") == "bogus"
    assert d.delv("_25._tcp.mx.bad.bogus.test", "TLSA") == "bogus"
    assert d.delv("_25._tcp.mx.servfail.test", "TLSA") == "secure"
    assert d.delv("notlsa.test", "MX") == "secure"
    assert d.delv("mx.notlsa.test", "A") == "secure"
    assert d.delv("_25._tcp.mx.notlsa.test", "TLSA") == "secure"  # proven absent
    assert d.delv("_25._tcp.mx.servfail.test", "TLSA", port=front) == "servfail"
    assert d.delv("mx.servfail.test", "A", port=front) == "secure"
    assert d.delv("_mta-sts.both.test", "TXT", port=front) == "secure"
    # A name that does not exist is proven not to exist.
    assert d.delv("_25._tcp.mx.none.test", "TLSA") == "secure"


@pytest.fixture
def mta(world, workdir):
    world.start_sinks()
    server = Mta(workdir, world.config(workdir)).start()
    yield server
    server.kill()


def recipient_status(mta, address):
    """(state, detail) of `address` in the queue, or None when it is not queued."""
    data = json.loads(queue_cli(mta, "--json", "list").stdout)
    for entry in data["messages"]:
        for r in entry["recipients"]:
            if r["address"] == address:
                status = r["status"]
                return status["state"], status.get("detail") or ""
    return None


def deferred(mta, address, *expected):
    """Waits until `address` has been deferred twice with a detail containing every
    string of `expected` (twice: a retry decides the same), and returns the detail."""
    def check():
        status = recipient_status(mta, address)
        if status and status[0] == "deferred" and all(e in status[1] for e in expected):
            return status[1]
        return None
    detail = wait_for(check, what=f"{address} deferred with {expected}")
    wait_for(lambda: mta.log().count(f'to="{address}"') >= 2, what=f"a retry for {address}")
    return detail


def delivered(world, domain, address):
    """Waits for `address`'s message at the MX of `domain`; it came over TLS."""
    sink = world.sinks[domain]

    def arrived():
        with sink.handler.lock:
            return [tls for m, tls in zip(sink.handler.messages, sink.handler.over_tls)
                    if m.recipients == [address]]
    over_tls = wait_for(arrived, what=f"delivery to the MX of {domain}")
    assert over_tls == [True], "DANE and opportunistic delivery use TLS"


def never_sent(world, domain, address):
    assert [m for m in world.sinks[domain].messages if address in m.recipients] == []


def test_dane_ee_3_1_1_match_delivers(world, mta):
    """The certificate is expired and names another host: DANE-EE looks at the key only."""
    send(mta, "me@example.test", ["user@ee.test"], subject="dane-ee")
    delivered(world, "ee.test", "user@ee.test")
    assert "DANE: certificate matches the TLSA records" in mta.log()


def test_wrong_digest_defers_and_never_sends(world, mta):
    send(mta, "me@example.test", ["user@wrongdigest.test"], subject="wrong-digest")
    detail = deferred(mta, "user@wrongdigest.test", "451 4.7.5 DANE",
                      "matches none of its TLSA records")
    assert "mx.wrongdigest.test" in detail
    never_sent(world, "wrongdigest.test", "user@wrongdigest.test")


def test_bogus_zone_defers(world, mta):
    send(mta, "me@example.test", ["user@bad.bogus.test"], subject="bogus")
    detail = deferred(mta, "user@bad.bogus.test", "451 4.7.5 DANE", "bogus")
    assert "MX records of bad.bogus.test" in detail
    assert world.sinks["bad.bogus.test"].handler.sessions == set()
    assert world.sinks["bad.bogus.test"].messages == []


def test_unsigned_zone_delivers_with_opportunistic_tls(world, mta):
    """No DNSSEC, no DANE: a self-signed certificate is fine, as without DANE."""
    send(mta, "me@example.test", ["user@plain.unsigned.test"], subject="unsigned")
    delivered(world, "plain.unsigned.test", "user@plain.unsigned.test")
    assert "DANE: TLSA records apply" not in mta.log()


def test_secure_mx_with_insecure_host_addresses_is_not_dane(world, mta):
    """RFC 7672 §2.2.2: TLSA records count only when the host's addresses are secure
    too; here they are not, so the (wrong, unsigned) TLSA record is not used."""
    send(mta, "me@example.test", ["user@insecurehost.test"], subject="insecure-host")
    delivered(world, "insecurehost.test", "user@insecurehost.test")
    assert "DANE: TLSA records apply domain=insecurehost.test" not in mta.log()


def test_mx_alias_into_an_unsigned_zone_is_not_dane(world, mta):
    """The MX host is a CNAME into the unsigned zone: its addresses are insecure, so the
    (signed, wrong) TLSA record at the alias is not used."""
    send(mta, "me@example.test", ["user@cname.test"], subject="cname-unsigned")
    delivered(world, "cname.test", "user@cname.test")
    assert "DANE: TLSA records apply domain=cname.test" not in mta.log()


def test_mx_alias_in_a_signed_zone_uses_the_target_tlsa_and_name(world, mta):
    """A secure CNAME chain: TLSA at the target's name (2 1 1), and a certificate naming
    only the target (the TLSA base domain) is accepted."""
    send(mta, "me@example.test", ["user@cnamesec.test"], subject="cname-signed")
    delivered(world, "cnamesec.test", "user@cnamesec.test")
    assert "DANE: certificate matches the TLSA records host=mx.cnamesec.test" in mta.log()


def test_dane_ta_2_1_1_with_a_private_ca_delivers(world, mta):
    send(mta, "me@example.test", ["user@ta.test"], subject="dane-ta")
    delivered(world, "ta.test", "user@ta.test")


def test_dane_ta_refuses_a_certificate_for_another_name(world, mta):
    send(mta, "me@example.test", ["user@tawrongname.test"], subject="dane-ta-name")
    deferred(mta, "user@tawrongname.test", "451 4.7.5 DANE", "mx.tawrongname.test")
    never_sent(world, "tawrongname.test", "user@tawrongname.test")


def test_one_mx_failing_dane_leaves_the_next_to_deliver(world, mta):
    """RFC 7672 §2.2: each MX host is judged by its own TLSA records. The preferred host's
    certificate matches none of them, so it gets no mail; the next host's does."""
    send(mta, "me@example.test", [f"user@{TWO_MX}"], subject="two-mx")
    delivered(world, "ee.test", f"user@{TWO_MX}")
    never_sent(world, "wrongdigest.test", f"user@{TWO_MX}")
    failed = [line for line in mta.log().splitlines() if "connection attempt failed" in line
              and "host=mx.wrongdigest.test" in line]
    assert failed, "the preferred host was tried first"


def test_tlsa_servfail_defers(world, mta):
    send(mta, "me@example.test", ["user@servfail.test"], subject="servfail")
    detail = deferred(mta, "user@servfail.test", "451 4.7.5 DANE", "TLSA lookup failed")
    assert "mx.servfail.test" in detail
    assert world.front.servfails >= 1
    assert world.sinks["servfail.test"].handler.sessions == set()


def test_mx_servfail_defers(world, mta):
    """RFC 7672 §2.1.1: an MX lookup that fails is indeterminate, so delivery waits; it
    neither falls back to the domain's own address nor leaves DANE out. The deferral is
    the DNS failure it is, 451 4.4.3 (as without DANE): 4.7.5 is for an answer that
    failed validation (bogus) or a certificate DANE refuses, and a SERVFAIL says neither."""
    send(mta, "me@example.test", ["user@mxservfail.test"], subject="mx-servfail")
    detail = deferred(mta, "user@mxservfail.test", "451 4.4.3",
                      "MX lookup for mxservfail.test failed")
    assert "4.7.5" not in detail
    assert world.front.servfails >= 1
    assert world.sinks["mxservfail.test"].handler.sessions == set()


def test_dane_decides_over_mta_sts(world, mta):
    """both.test: MTA-STS enforce with a certificate its CA list does not vouch for would
    defer; the matching TLSA record delivers. bothbad.test: the certificate satisfies
    MTA-STS, but the TLSA digest is wrong: deferred."""
    send(mta, "me@example.test", ["user@both.test"], subject="both")
    delivered(world, "both.test", "user@both.test")
    send(mta, "me@example.test", ["user@bothbad.test"], subject="both-bad")
    deferred(mta, "user@bothbad.test", "451 4.7.5 DANE", "matches none of its TLSA records")
    never_sent(world, "bothbad.test", "user@bothbad.test")
    # MTA-STS was not even asked (RFC 8461 §2).
    assert not any(host.startswith("mta-sts.both") for host, _ in world.policy_server.requests)


def test_dane_off_for_a_route_delivers_despite_a_wrong_digest(world, workdir):
    world.start_sinks()
    config = world.config(workdir).replace(
        "local_domains:", "routes:\n  - domain: wrongdigest.test\n    dane: false\nlocal_domains:")
    mta = Mta(workdir, config).start()
    try:
        send(mta, "me@example.test", ["other@wrongdigest.test"], subject="dane-off")
        got = wait_for(lambda: [m for m in world.sinks["wrongdigest.test"].messages
                                if m.recipients == ["other@wrongdigest.test"]],
                       what="delivery with DANE off for the route")
        assert got
    finally:
        mta.kill()


# Mandatory DANE (RFC 7672 §6): a route's `dane: required`.
REQUIRED = ("plain.unsigned.test", "ee.test", "notlsa.test")


def required_routes(config):
    routes = "".join(f"  - domain: {d}\n    dane: required\n" for d in REQUIRED)
    return config.replace("local_domains:", f"routes:\n{routes}local_domains:")


@pytest.fixture
def required_mta(world, workdir):
    world.start_sinks()
    server = Mta(workdir, required_routes(world.config(workdir))).start()
    yield server
    server.kill()


def test_dane_required_to_an_unsigned_zone_defers_and_never_sends(world, required_mta):
    """Without the route this domain gets mail over opportunistic TLS
    (test_unsigned_zone_delivers_with_opportunistic_tls); required, it waits, retried
    (not bounced), and no connection carries it."""
    address = "required@plain.unsigned.test"
    send(required_mta, "me@example.test", [address], subject="required-unsigned")
    detail = deferred(required_mta, address, "451 4.7.5 DANE: required for plain.unsigned.test",
                      "its MX records are not DNSSEC-signed")
    assert "MTA-STS" not in detail
    never_sent(world, "plain.unsigned.test", address)
    assert "DANE required: MX host refused" in required_mta.log()


def test_dane_required_with_matching_tlsa_delivers(world, required_mta):
    send(required_mta, "me@example.test", ["required@ee.test"], subject="required-ee")
    delivered(world, "ee.test", "required@ee.test")
    assert "DANE: certificate matches the TLSA records host=mx.ee.test" in required_mta.log()


def test_dane_required_to_a_signed_zone_without_tlsa_defers(world, required_mta, workdir):
    """notlsa.test is signed but publishes no TLSA record: an ordinary MTA delivers it
    (opportunistic TLS); under `dane: required` the host is refused before any
    connection."""
    address = "required@notlsa.test"
    send(required_mta, "me@example.test", [address], subject="required-notlsa")
    deferred(required_mta, address, "451 4.7.5 DANE: required for notlsa.test",
             "mx.notlsa.test: no DNSSEC-signed TLSA records at _25._tcp.mx.notlsa.test")
    never_sent(world, "notlsa.test", address)
    assert world.sinks["notlsa.test"].handler.sessions == set(), "no connection at all"

    # The same destination without the route: delivered, so the deferral was the route's.
    other = workdir / "without-route"
    other.mkdir()
    plain = Mta(other, world.config(other)).start()
    try:
        send(plain, "me@example.test", ["plain@notlsa.test"], subject="notlsa-opportunistic")
        delivered(world, "notlsa.test", "plain@notlsa.test")
    finally:
        plain.kill()
