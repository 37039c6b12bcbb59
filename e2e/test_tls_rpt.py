"""TLS-RPT (RFC 8460) on outbound delivery by MX, on the signed zones of test_dane.py.

ee.test (DANE 3 1 1 matching), wrongdigest.test (DANE, wrong digest),
plain.unsigned.test (no DNSSEC, no policy), bad.bogus.test (bogus MX set), servfail.test
(TLSA lookup SERVFAIL) and unusable.test (only unusable TLSA records) publish `_smtp._tls`
records, and so do seven domains of the unsigned zone under MTA-STS: `enforce` with an MX
certificate for another name (stsname), expired (stsexpired) or no STARTTLS (stsplain);
`testing` with the wrong name (ststesting: delivered, reported as a failure); and a policy
that cannot be had: 404 (stsfetch), not a valid policy (stsinvalid), a policy host whose
certificate does not name it (stswebpki). Each asks for reports by mail
(`mailto:tlsrpt@reports.test`, an aiosmtpd sink as reports.test's MX) and by HTTPS POST
(`https://reports.test:<port>/tlsrpt`, Python's http.server with a certificate from the
CA the MTA trusts). reports.test asks for reports too, so a report counted in a report
would show up as one for reports.test. The reports' JSON is checked against a JSON schema
written from RFC 8460 §4.4 (jsonschema validates it) and its counts against the attempts
made (one each: retries are an hour away).

Mailed reports are DKIM-signed (RFC 8460 §5.3): every MTA here has an Ed25519 key for
the reports' sender domain (the default sender, tls-reports@mx.petrel.test), its record
published in the signed test zone, and dkimpy verifies each mailed report against that
record, asked of the zones' DNS as the MTA asks it.

Counts survive a `kill -9` (saved in the spool directory), and with the rate limits' Redis
three MTAs send one report per domain and period with the fleet's counts, or each its own
(distinct report ids) while Redis is down.
"""

import datetime
import email
import email.policy
import gzip
import json
import os
import shutil
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import Mta, wait_for
from dnssec import have_tools, missing
from outbound import Sink

if not have_tools():
    missing("ldnsutils, bind9-dnsutils (delv) or nsd")
try:
    import jsonschema
except ImportError:
    missing("Python module jsonschema")
try:
    import dkim
    import dns.message
    import dns.query
    import dns.rdatatype
    import nacl  # noqa: F401  (dkimpy needs PyNaCl for Ed25519)
except ImportError:
    missing("Python modules dkimpy, dnspython and PyNaCl")

from dkim_helpers import KeyPair  # noqa: E402
from test_dane import World, self_signed  # noqa: E402
from test_fleet_limits import Redis  # noqa: E402
from test_outbound import send  # noqa: E402

REPORTS_MX_IP, REPORTS_HTTPS_IP = "127.0.0.74", "127.0.0.75"
# MTA-STS enforce domains whose MX certificates fail: domain: (MX address, what is wrong)
STS_MX = {"stsname.unsigned.test": ("127.0.0.76", "name"),
          "stsexpired.unsigned.test": ("127.0.0.77", "expired")}
# MTA-STS enforce, its MX a sink without STARTTLS.
STS_PLAIN, STS_PLAIN_IP = "stsplain.unsigned.test", "127.0.0.78"
# Signed, with TLSA records that are all unusable (PKIX-TA, RFC 7672 §3.1): TLS required,
# the certificate not checked.
UNUSABLE, UNUSABLE_IP = "unusable.test", "127.0.0.79"
# MTA-STS testing, its MX the sink of stsname (a certificate for another name).
STS_TESTING = "ststesting.unsigned.test"
# Domains whose MTA-STS policy cannot be had; their MX is plain.unsigned.test's sink.
STS_BROKEN = ("stsfetch.unsigned.test", "stsinvalid.unsigned.test", "stswebpki.unsigned.test")
# MTA-STS enforce, its MX certificate from a CA the MTA does not trust.
STS_UNTRUSTED, STS_UNTRUSTED_IP = "stsuntrusted.unsigned.test", "127.0.0.80"
# The DANE cases of test_dane.py that have a TLS-RPT record here too.
DANE_REPORTED = ("ta.test", "tawrongname.test", "both.test", "bothbad.test", "cname.test",
                 "cnamesec.test")
REPORTED = ("ee.test", "wrongdigest.test", "plain.unsigned.test", "bad.bogus.test",
            "servfail.test", *STS_MX, STS_PLAIN, STS_TESTING, *STS_BROKEN, UNUSABLE,
            STS_UNTRUSTED, *DANE_REPORTED)
# danerpt.test (MX: ee.test's) asks for reports by mail only, at reportsdane.test, whose
# MX has a TLSA record with a wrong digest: ordinary mail there is deferred, reports go.
DANE_RPT, REPORTS_DANE, REPORTS_DANE_IP = "danerpt.test", "reportsdane.test", "127.0.0.81"
# The reports' sender domain (the default sender is tls-reports@<hostname>) and the
# selector of its DKIM key.
SENDER_DOMAIN, SELECTOR = "mx.petrel.test", "rpt"

# RFC 8460 §4.4, as a JSON schema (the RFC describes the fields in prose and an example).
# Every object it defines in full admits no other member.
SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["organization-name", "date-range", "contact-info", "report-id", "policies"],
    "properties": {
        "organization-name": {"type": "string"},
        "contact-info": {"type": "string"},
        "report-id": {"type": "string"},
        "date-range": {
            "type": "object",
            "additionalProperties": False,
            "required": ["start-datetime", "end-datetime"],
            "properties": {"start-datetime": {"type": "string", "format": "date-time"},
                           "end-datetime": {"type": "string", "format": "date-time"}},
        },
        "policies": {"type": "array", "items": {
            "type": "object",
            "additionalProperties": False,
            "required": ["policy", "summary"],
            "properties": {
                "policy": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["policy-type", "policy-domain"],
                    "properties": {
                        "policy-type": {"enum": ["tlsa", "sts", "no-policy-found"]},
                        "policy-string": {"type": "array", "items": {"type": "string"}},
                        "policy-domain": {"type": "string"},
                        "mx-host": {"type": "array", "items": {"type": "string"}},
                    },
                },
                "summary": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["total-successful-session-count",
                                 "total-failure-session-count"],
                    "properties": {
                        "total-successful-session-count": {"type": "integer", "minimum": 0},
                        "total-failure-session-count": {"type": "integer", "minimum": 0},
                    },
                },
                "failure-details": {"type": "array", "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["result-type", "failed-session-count"],
                    "properties": {
                        "result-type": {"enum": [
                            "starttls-not-supported", "certificate-host-mismatch",
                            "certificate-expired", "certificate-not-trusted",
                            "validation-failure", "tlsa-invalid", "dnssec-invalid",
                            "dane-required", "sts-policy-fetch-error", "sts-policy-invalid",
                            "sts-webpki-invalid"]},
                        "sending-mta-ip": {"type": "string"},
                        "receiving-mx-hostname": {"type": "string"},
                        "receiving-mx-helo": {"type": "string"},
                        "receiving-ip": {"type": "string"},
                        "failed-session-count": {"type": "integer", "minimum": 1},
                        "additional-information": {"type": "string"},
                        "failure-reason-code": {"type": "string"},
                    },
                }},
            },
        }},
    },
}
FORMATS = jsonschema.FormatChecker()
if "date-time" not in FORMATS.checkers:
    missing("Python module rfc3339-validator (jsonschema's date-time check)")


def check_report(report):
    """`report` fits the schema, formats included, and its date range is two RFC 3339
    times (as Python reads them), the start before the end."""
    jsonschema.validate(report, SCHEMA, format_checker=FORMATS)
    start, end = (datetime.datetime.fromisoformat(report["date-range"][k])
                  for k in ("start-datetime", "end-datetime"))
    assert start.tzinfo is not None and end.tzinfo is not None, report["date-range"]
    assert start < end, report["date-range"]


class ReportEndpoint:
    """HTTPS on REPORTS_HTTPS_IP: records each POST (path, Content-Type, body)."""

    def __init__(self, cert_key):
        self.posts, self.lock = [], threading.Lock()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with endpoint.lock:
                    endpoint.posts.append((self.path, self.headers.get("Content-Type"), body))
                self.send_response(201)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer((REPORTS_HTTPS_IP, 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*cert_key)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def reports(self, since=0):
        """The reports posted, from the `since`-th post on."""
        with self.lock:
            return [json.loads(gzip.decompress(body)) for path, kind, body in self.posts[since:]
                    if path == "/tlsrpt" and kind == "application/tlsrpt+gzip"]

    def count(self):
        with self.lock:
            return len(self.posts)

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class ReportWorld(World):
    """test_dane.py's World, with an Ed25519 DKIM key for the reports' sender domain: its
    record is in the signed zone test., and every MTA config has the key."""

    def __init__(self, directory, extra_records, **kwargs):
        self.report_key = KeyPair(directory, "ed25519")
        extra_records["test."].append(f"{SELECTOR}._domainkey.{SENDER_DOMAIN}. IN TXT "
                                      f'"{self.report_key.record()}"')
        super().__init__(directory, extra_records=extra_records, **kwargs)

    def config(self, workdir, smtp_client="", retry_interval="1s"):
        return super().config(workdir, smtp_client, retry_interval) + f"""\
dkim:
  keys:
    - {{domain: {SENDER_DOMAIN}, selector: {SELECTOR}, key_file: {self.report_key.path}}}
"""

    def txt(self, name, timeout=5):
        """A dkimpy `dnsfunc`: the TXT record at `name`, asked of the DNS front as the MTA
        asks it (the zones nsd serves), or None."""
        name = name.decode() if isinstance(name, bytes) else name
        query = dns.message.make_query(name, dns.rdatatype.TXT)
        answer = dns.query.tcp(query, self.front.listen, port=self.front.port, timeout=timeout)
        for rrset in answer.answer:
            if rrset.rdtype == dns.rdatatype.TXT:
                return b"".join(rrset[0].strings)
        return None


def assert_signed(world, raw):
    """`raw` carries one DKIM signature, by the reports' sender domain with its key, and
    dkimpy verifies it against the record published in the zone."""
    signatures = [v for k, v in email.message_from_bytes(raw).items()
                  if k.lower() == "dkim-signature"]
    assert len(signatures) == 1, raw[:2000]
    tags = dict(t.strip().split("=", 1) for t in "".join(signatures[0].split()).split(";")
                if "=" in t)
    assert (tags["d"], tags["s"], tags["a"]) == (SENDER_DOMAIN, SELECTOR, "ed25519-sha256"), tags
    assert dkim.verify(raw, dnsfunc=world.txt), f"DKIM signature does not verify: {raw[:2000]}"


def mailed_reports(world, sink):
    """The JSON reports in the messages the reports mailbox got, with their headers; each
    message's DKIM signature verifies."""
    out = []
    for message in sink.messages:
        assert_signed(world, message.content)
        parsed = email.message_from_bytes(message.content, policy=email.policy.default)
        assert parsed["TLS-Required"] == "No"
        assert parsed.get_content_type() == "multipart/report"
        assert parsed.get_param("report-type") == "tlsrpt"
        parts = [p for p in parsed.iter_attachments()
                 if p.get_content_type() == "application/tlsrpt+gzip"]
        assert len(parts) == 1
        report = json.loads(gzip.decompress(parts[0].get_content()))
        assert parsed["TLS-Report-Domain"] == report["policies"][0]["policy"]["policy-domain"]
        out.append(report)
    return out


@pytest.fixture(scope="module")
def rpt_world(tmp_path_factory):
    from test_mta_sts import Ca
    directory = tmp_path_factory.mktemp("tls-rpt")
    ca = Ca(directory, "reports-ca")
    endpoint = ReportEndpoint(ca.issue("reports.test"))
    rua = (f"v=TLSRPTv1; rua=mailto:tlsrpt@reports.test,"
           f"https://reports.test:{endpoint.port}/tlsrpt")
    from test_mta_sts import POLICY_IP, TlsSink
    sts_id = '"v=STSv1; id=20260101T000000;"'
    unsigned = [f'_smtp._tls.plain.unsigned.test. IN TXT "{rua}"']
    policies = {}
    for domain, (ip, _) in STS_MX.items():
        unsigned += [f"{domain}. IN MX 10 mx.{domain}.", f"mx.{domain}. IN A {ip}"]
        policies[domain] = f"version: STSv1\r\nmode: enforce\r\nmx: mx.{domain}\r\nmax_age: 86400\r\n"
    unsigned += [f"{STS_PLAIN}. IN MX 10 mx.{STS_PLAIN}.", f"mx.{STS_PLAIN}. IN A {STS_PLAIN_IP}"]
    policies[STS_PLAIN] = f"version: STSv1\r\nmode: enforce\r\nmx: mx.{STS_PLAIN}\r\nmax_age: 86400\r\n"
    unsigned += [f"{STS_TESTING}. IN MX 10 mx.{STS_TESTING}.",
                 f"mx.{STS_TESTING}. IN A {STS_MX['stsname.unsigned.test'][0]}"]
    policies[STS_TESTING] = (f"version: STSv1\r\nmode: testing\r\nmx: mx.{STS_TESTING}\r\n"
                             "max_age: 86400\r\n")
    for domain in STS_BROKEN:
        unsigned.append(f"{domain}. IN MX 10 mx.plain.unsigned.test.")
    policies["stsfetch.unsigned.test"] = None
    policies["stsinvalid.unsigned.test"] = "version: STSv1\r\nmode: sometimes\r\n"
    policies["stswebpki.unsigned.test"] = policies["stsname.unsigned.test"]
    unsigned += [f"{STS_UNTRUSTED}. IN MX 10 mx.{STS_UNTRUSTED}.",
                 f"mx.{STS_UNTRUSTED}. IN A {STS_UNTRUSTED_IP}"]
    policies[STS_UNTRUSTED] = (f"version: STSv1\r\nmode: enforce\r\nmx: mx.{STS_UNTRUSTED}\r\n"
                               "max_age: 86400\r\n")
    for domain in (*STS_MX, STS_PLAIN, STS_TESTING, *STS_BROKEN, STS_UNTRUSTED):
        unsigned += [f'_smtp._tls.{domain}. IN TXT "{rua}"', f"_mta-sts.{domain}. IN TXT {sts_id}",
                     f"mta-sts.{domain}. IN A {POLICY_IP}"]
    extra = {
        "test.": [f'_smtp._tls.ee.test. IN TXT "{rua}"',
                  f'_smtp._tls.wrongdigest.test. IN TXT "{rua}"',
                  f'_smtp._tls.servfail.test. IN TXT "{rua}"',
                  f'_smtp._tls.{UNUSABLE}. IN TXT "{rua}"',
                  f"{UNUSABLE}. IN MX 10 mx.{UNUSABLE}.",
                  f"mx.{UNUSABLE}. IN A {UNUSABLE_IP}",
                  f"_25._tcp.mx.{UNUSABLE}. IN TLSA 0 0 1 {'00' * 32}",
                  f'_smtp._tls.reports.test. IN TXT "{rua}"',
                  "reports.test. IN MX 10 mx.reports.test.",
                  f"mx.reports.test. IN A {REPORTS_MX_IP}",
                  f"reports.test. IN A {REPORTS_HTTPS_IP}",
                  f"{DANE_RPT}. IN MX 10 mx.ee.test.",
                  f'_smtp._tls.{DANE_RPT}. IN TXT "v=TLSRPTv1; rua=mailto:tlsrpt@{REPORTS_DANE}"',
                  f"{REPORTS_DANE}. IN MX 10 mx.{REPORTS_DANE}.",
                  f"mx.{REPORTS_DANE}. IN A {REPORTS_DANE_IP}",
                  f"_25._tcp.mx.{REPORTS_DANE}. IN TLSA 3 1 1 {'00' * 32}"]
                 + [f'_smtp._tls.{domain}. IN TXT "{rua}"' for domain in DANE_REPORTED],
        "bogus.test.": [f'_smtp._tls.bad.bogus.test. IN TXT "{rua}"'],
        "unsigned.test.": unsigned,
    }
    world = ReportWorld(directory, extra_records=extra, sts_policies=policies,
                        sts_uncertified=["stswebpki.unsigned.test"])
    world.start_sinks()
    certs = {"name": world.sts_ca.issue("mx.someone-else.test"),
             "expired": world.sts_ca.issue("mx.stsexpired.unsigned.test", expired=True)}
    sts_sinks = [TlsSink(ip, world.port, certs[wrong]) for ip, wrong in STS_MX.values()]
    untrusted = Ca(directory, "untrusted-ca").issue(f"mx.{STS_UNTRUSTED}")
    sts_sinks += [Sink(STS_PLAIN_IP, world.port),
                  TlsSink(UNUSABLE_IP, world.port, self_signed(directory, f"mx.{UNUSABLE}")),
                  TlsSink(STS_UNTRUSTED_IP, world.port, untrusted)]
    mailbox = Sink(REPORTS_MX_IP, world.port)
    world.sinks[REPORTS_DANE] = TlsSink(REPORTS_DANE_IP, world.port,
                                        self_signed(directory, f"mx.{REPORTS_DANE}"))
    # The MTA trusts one CA file: both CAs in it.
    world.sts_ca.pem_path.write_bytes(world.sts_ca.pem_path.read_bytes() + ca.pem_path.read_bytes())
    yield world, endpoint, mailbox
    for sink in sts_sinks:
        sink.stop()
    mailbox.stop()
    endpoint.stop()
    world.stop()


def totals(reports, domain):
    """{policy-type: (successes, failures, result types)} summed over `reports`."""
    out = {}
    for report in reports:
        for entry in report["policies"]:
            if entry["policy"]["policy-domain"] != domain:
                continue
            kind = entry["policy"]["policy-type"]
            ok, bad, results = out.get(kind, (0, 0, set()))
            out[kind] = (ok + entry["summary"]["total-successful-session-count"],
                         bad + entry["summary"]["total-failure-session-count"],
                         results | {d["result-type"] for d in entry.get("failure-details", [])})
    return out


EXPECTED = {
    "ee.test": {"tlsa": (1, 0, set())},
    "wrongdigest.test": {"tlsa": (0, 1, {"validation-failure"})},
    "plain.unsigned.test": {"no-policy-found": (1, 0, set())},
    # No valid DNSSEC answer, before any connection (RFC 8460 §4.3.2.1).
    "bad.bogus.test": {"tlsa": (0, 1, {"dnssec-invalid"})},
    "servfail.test": {"tlsa": (0, 1, {"dnssec-invalid"})},
    # MTA-STS enforce, the MX certificate's own fault (§4.3.1).
    "stsname.unsigned.test": {"sts": (0, 1, {"certificate-host-mismatch"})},
    "stsexpired.unsigned.test": {"sts": (0, 1, {"certificate-expired"})},
    STS_PLAIN: {"sts": (0, 1, {"starttls-not-supported"})},
    # TLS made, but no TLSA record could check it (§4.3.2.1); the mail went.
    UNUSABLE: {"tlsa": (0, 1, {"tlsa-invalid"})},
    # MTA-STS testing: the same failure is reported, though the mail went (opportunistic).
    STS_TESTING: {"sts": (0, 1, {"certificate-host-mismatch"})},
    # No policy to be had (§4.3.2.2); the mail then goes as without one.
    "stsfetch.unsigned.test": {"sts": (0, 1, {"sts-policy-fetch-error"}),
                               "no-policy-found": (1, 0, set())},
    "stsinvalid.unsigned.test": {"sts": (0, 1, {"sts-policy-invalid"}),
                                 "no-policy-found": (1, 0, set())},
    "stswebpki.unsigned.test": {"sts": (0, 1, {"sts-webpki-invalid"}),
                                "no-policy-found": (1, 0, set())},
    # MTA-STS enforce, the MX certificate from a CA the MTA does not trust (§4.3.1).
    STS_UNTRUSTED: {"sts": (0, 1, {"certificate-not-trusted"})},
    # DANE-TA (2 1 1) to a private CA; the same CA, the certificate for another name
    # (TLS-RPT's type for any DANE refusal: validation-failure).
    "ta.test": {"tlsa": (1, 0, set())},
    "tawrongname.test": {"tlsa": (0, 1, {"validation-failure"})},
    # DANE and MTA-STS both published: DANE decides, so only it is reported.
    "both.test": {"tlsa": (1, 0, set())},
    "bothbad.test": {"tlsa": (0, 1, {"validation-failure"})},
    # The MX host an alias into the unsigned zone: no DANE, no other policy.
    "cname.test": {"no-policy-found": (1, 0, set())},
    # A secure alias: the target's TLSA records (2 1 1) apply.
    "cnamesec.test": {"tlsa": (1, 0, set())},
}


def test_delv_agrees_on_every_answer_of_the_report_zones(rpt_world):
    """The zones here are test_dane.py's with more records (the `_smtp._tls` TXT records,
    the MTA-STS domains, the reports' own domains): delv checks every answer of them."""
    world, _, _ = rpt_world
    names = {(name, rtype) for name, rtype, _ in world.expected_answers()}
    for domain in REPORTED:
        assert (f"_smtp._tls.{domain}", "TXT") in names, domain
        assert (domain, "MX") in names, domain
    assert (f"_25._tcp.mx.{REPORTS_DANE}", "TLSA") in names
    assert world.delv_disagreements() == []


def test_reports_by_mail_and_https_count_every_attempt(rpt_world, workdir):
    world, endpoint, mailbox = rpt_world
    config = world.config(workdir, retry_interval="1h",
                          smtp_client="  tls_rpt:\n    report_interval: 2s\n"
                                      "    organization: Petrel Test\n")
    mta = Mta(workdir, config).start()
    try:
        for domain in REPORTED:
            send(mta, "me@example.test", [f"a@{domain}"], subject=f"rpt {domain}")

        def complete(reports):
            return all(totals(reports, d) == EXPECTED[d] for d in REPORTED)

        by_https = wait_for(lambda: complete(endpoint.reports()) and endpoint.reports(),
                            what="HTTPS reports with every attempt counted")
        by_mail = wait_for(lambda: complete(mailed_reports(world, mailbox))
                           and mailed_reports(world, mailbox),
                           what="mailed reports with every attempt counted")
        # Each mailed report verified (mailed_reports); a report changed in transit does not.
        raw = mailbox.messages[0].content
        tampered = raw.replace(b"aggregate TLS report", b"aggregate TLS-report")
        assert tampered != raw
        assert not dkim.verify(tampered, dnsfunc=world.txt)
        for report in by_https + by_mail:
            check_report(report)
            assert report["organization-name"] == "Petrel Test"
        ids = [r["report-id"] for r in by_https]
        assert len(set(ids)) == len(ids), "one report id per domain and period"
        tlsa = next(e for r in by_https for e in r["policies"]
                    if e["policy"]["policy-domain"] == "wrongdigest.test")
        assert tlsa["policy"]["policy-string"] == ["3 1 1 " + "00" * 32]
        assert tlsa["policy"]["mx-host"] == ["mx.wrongdigest.test"]
        assert tlsa["failure-details"][0]["receiving-mx-hostname"] == "mx.wrongdigest.test"
        mismatch = next(e for r in by_https for e in r["policies"]
                        if e["policy"]["policy-domain"] == "stsname.unsigned.test")
        assert mismatch["policy"]["policy-string"][1] == "mode: enforce"
        assert mismatch["failure-details"][0]["receiving-ip"] == STS_MX["stsname.unsigned.test"][0]
        # The mailed reports went to reports.test, which asks for reports too. Two more
        # periods later, still no report is about reports.test: reports are not counted.
        periods = mta.log().count("TLS-RPT period closed")
        wait_for(lambda: mta.log().count("TLS-RPT period closed") >= periods + 2,
                 what="two more report periods")
        assert totals(endpoint.reports() + mailed_reports(world, mailbox), "reports.test") == {}
        assert len(mailed_reports(world, mailbox)) == len(by_mail)
    finally:
        mta.kill()


def test_a_mailed_report_goes_despite_the_mailbox_domain_failing_dane(rpt_world, workdir):
    """RFC 8460 §5.3: reports are delivered despite TLS policy failures. danerpt.test's
    reports go by mail to reportsdane.test, whose MX fails DANE (wrong digest): the report
    goes all the same, over opportunistic TLS (it carries `TLS-Required: No`), while an
    ordinary message sent after it to the same MX is deferred and never sent."""
    from test_dane import deferred, never_sent
    world, _, _ = rpt_world
    config = world.config(workdir, smtp_client="  tls_rpt:\n    report_interval: 2s\n")
    mta = Mta(workdir, config).start()
    sink = world.sinks[REPORTS_DANE]
    try:
        send(mta, "me@example.test", [f"a@{DANE_RPT}"], subject="report by mail")

        def report_arrived():
            with sink.handler.lock:
                return [(m, tls) for m, tls in zip(sink.handler.messages, sink.handler.over_tls)
                        if m.recipients == [f"tlsrpt@{REPORTS_DANE}"]]
        (message, over_tls), *_ = wait_for(report_arrived, what="the report at the DANE-failing MX")
        assert over_tls, "STARTTLS was offered: the report went over TLS"
        assert_signed(world, message.content)
        parsed = email.message_from_bytes(message.content, policy=email.policy.default)
        assert parsed["TLS-Required"] == "No"
        part = next(p for p in parsed.iter_attachments()
                    if p.get_content_type() == "application/tlsrpt+gzip")
        report = json.loads(gzip.decompress(part.get_content()))
        check_report(report)
        assert totals([report], DANE_RPT) == {"tlsa": (1, 0, set())}
        assert ("TLS-RPT report: TLS-Required: No, the domain's DANE and MTA-STS policies "
                f"do not apply domain={REPORTS_DANE}") in mta.log()
        assert f"DANE: TLSA records apply domain={REPORTS_DANE}" not in mta.log()

        send(mta, "me@example.test", [f"user@{REPORTS_DANE}"], subject="not a report")
        deferred(mta, f"user@{REPORTS_DANE}", "451 4.7.5 DANE", "matches none of its TLSA records")
        never_sent(world, REPORTS_DANE, f"user@{REPORTS_DANE}")
    finally:
        mta.kill()


def test_dane_required_refusal_is_reported_as_dane_required(rpt_world, workdir):
    """A route with `dane: required` to plain.unsigned.test (no DNSSEC): the MX host is
    refused before any connection, and the report counts it as RFC 8460 §4.3.2.1's
    `dane-required`, under `no-policy-found` (no DANE policy was found, and MTA-STS is
    not consulted on such a route), naming the refused host."""
    from test_dane import never_sent, recipient_status
    world, endpoint, _ = rpt_world
    domain, address = "plain.unsigned.test", "required@plain.unsigned.test"
    config = world.config(workdir, retry_interval="1h",
                          smtp_client="  tls_rpt:\n    report_interval: 2s\n").replace(
        "local_domains:", f"routes:\n  - domain: {domain}\n    dane: required\nlocal_domains:")
    before = endpoint.count()
    mta = Mta(workdir, config).start()
    try:
        send(mta, "me@example.test", [address], subject="dane required")
        reports = wait_for(lambda: [r for r in endpoint.reports(before)
                                    if totals([r], domain)],
                           what=f"a report for {domain}")
        for report in reports:
            check_report(report)
        assert totals(reports, domain) == {"no-policy-found": (0, 1, {"dane-required"})}
        detail = next(d for r in reports for e in r["policies"]
                      if e["policy"]["policy-domain"] == domain
                      for d in e.get("failure-details", []))
        assert detail["receiving-mx-hostname"] == "mx.plain.unsigned.test", detail
        assert "receiving-ip" not in detail, "no connection was made"
        wait_for(lambda: (recipient_status(mta, address) or ("", ""))[0] == "deferred",
                 what=f"{address} deferred")
        state, text = recipient_status(mta, address)
        assert state == "deferred" and "451 4.7.5 DANE: required for" in text, (state, text)
        never_sent(world, domain, address)
    finally:
        mta.kill()


def wait_for_a_fresh_period(interval):
    """Waits (polling the clock) until the current period of `interval` seconds has at
    least two thirds left, so what follows ends well before the period does."""
    wait_for(lambda: time.time() % interval < interval / 3, timeout=interval + 5,
             what="the start of a report period")


def test_counts_survive_kill_9(rpt_world, workdir):
    """Counted, saved in the spool directory within seconds, SIGKILLed before the period
    ends, started again: the report has the counts of before the kill."""
    world, endpoint, _ = rpt_world
    interval = 40
    config = world.config(workdir, retry_interval="1h",
                          smtp_client=f"  tls_rpt:\n    report_interval: {interval}s\n")
    before = endpoint.count()
    saved = workdir / "spool" / "tls-rpt.json"
    mta = Mta(workdir, config).start()
    try:
        wait_for_a_fresh_period(interval)
        send(mta, "me@example.test", ["b@ee.test"], subject="before the kill")
        send(mta, "me@example.test", ["b@wrongdigest.test"], subject="before the kill")
        wait_for(lambda: saved.exists() and '"ee.test"' in saved.read_text()
                 and '"wrongdigest.test"' in saved.read_text(), what="counts saved")
    finally:
        mta.kill()
    assert "TLS-RPT report sent" not in mta.log(), "the period ended before the kill"
    assert endpoint.count() == before
    mta = Mta(workdir, config).start()
    try:
        wait_for(lambda: "TLS-RPT: saved counts loaded" in mta.log(), what="counts loaded")
        expected = {"ee.test": {"tlsa": (1, 0, set())},
                    "wrongdigest.test": {"tlsa": (0, 1, {"validation-failure"})}}
        wait_for(lambda: all(totals(endpoint.reports(before), d) == e
                             for d, e in expected.items()),
                 timeout=interval + 30, what="the report with the counts made before the kill")
    finally:
        mta.kill()


def test_fleet_reports_once_through_redis_and_per_pod_without(rpt_world, tmp_path):
    """Three MTAs share the rate limits' Redis: each domain and period gets one report,
    with the three MTAs' counts. With Redis gone, each MTA reports its own counts under
    its own report id, and says so."""
    if not shutil.which("redis-server"):
        missing("redis-server")
    world, endpoint, _ = rpt_world
    redis = Redis(tmp_path).start()
    pods = []
    try:
        for n in range(3):
            workdir = tmp_path / f"pod-{n}"
            workdir.mkdir()
            config = world.config(workdir, retry_interval="1h",
                                  smtp_client="  tls_rpt:\n    report_interval: 3s\n") + f"""\
smtpd:
  rate_limits:
    redis:
      url: redis://127.0.0.1:{redis.port}/0
      timeout: 500ms
      fleet_size: 3
"""
            pods.append(Mta(workdir, config, env={"POD_NAME": f"pod-{n}"}).start())
        for pod in pods:
            wait_for(lambda: "Redis reachable" in pod.log(), what="the pod on Redis")

        before = endpoint.count()
        for n, pod in enumerate(pods):
            send(pod, "me@example.test", [f"c{n}@ee.test"], subject="fleet")
            send(pod, "me@example.test", [f"c{n}@wrongdigest.test"], subject="fleet")
        expected = {"ee.test": {"tlsa": (3, 0, set())},
                    "wrongdigest.test": {"tlsa": (0, 3, {"validation-failure"})}}
        wait_for(lambda: all(totals(endpoint.reports(before), d) == e
                             for d, e in expected.items()),
                 timeout=90, what="the fleet's reports with every pod's counts")
        reports = endpoint.reports(before)
        periods = [(r["policies"][0]["policy"]["policy-domain"], r["date-range"]["start-datetime"])
                   for r in reports]
        assert len(periods) == len(set(periods)), f"one report per domain and period: {periods}"
        assert all(r["report-id"].endswith("@mx.petrel.test") for r in reports), reports
        for report in reports:
            check_report(report)

        redis.kill()
        before = endpoint.count()
        for n, pod in enumerate(pods):
            send(pod, "me@example.test", [f"d{n}@ee.test"], subject="alone")
        wait_for(lambda: totals(endpoint.reports(before), "ee.test") == {"tlsa": (3, 0, set())},
                 timeout=90, what="each pod's own report")
        ids = [r["report-id"] for r in endpoint.reports(before)]
        assert len(ids) == 3 and len(set(ids)) == 3, ids
        assert sorted(i.split("@")[1] for i in ids) == [
            f"pod-{n}.mx.petrel.test" for n in range(3)], ids
        for pod in pods:
            assert "this pod reports its own counts" in pod.log()
    finally:
        for pod in pods:
            pod.kill()
        redis.kill()
