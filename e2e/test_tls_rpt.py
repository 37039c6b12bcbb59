"""TLS-RPT (RFC 8460) on outbound delivery by MX, on the signed zones of test_dane.py.

ee.test (DANE 3 1 1 matching), wrongdigest.test (DANE, wrong digest) and
plain.unsigned.test (no DNSSEC, no policy) publish `_smtp._tls` records asking for reports
by mail (`mailto:tlsrpt@reports.test`, an aiosmtpd sink as reports.test's MX) and by HTTPS
POST (`https://reports.test:<port>/tlsrpt`, Python's http.server with a certificate from
the CA the MTA trusts). reports.test asks for reports too, so a report counted in a report
would show up as one for reports.test. The reports' JSON is checked against a JSON schema
written from RFC 8460 §4.4 (jsonschema validates it) and its counts against the attempts
made (one each: retries are an hour away).
"""

import email
import email.policy
import gzip
import json
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import Mta, wait_for
from dnssec import have_tools
from outbound import Sink
from test_dane import World
from test_outbound import send

pytestmark = pytest.mark.skipif(not have_tools(),
                                reason="ldnsutils, bind9-dnsutils (delv) or nsd missing")
jsonschema = pytest.importorskip("jsonschema")

REPORTS_MX_IP, REPORTS_HTTPS_IP = "127.0.0.74", "127.0.0.75"
REPORTED = ("ee.test", "wrongdigest.test", "plain.unsigned.test")

# RFC 8460 §4.4, as a JSON schema (the RFC describes the fields in prose and an example).
SCHEMA = {
    "type": "object",
    "required": ["organization-name", "date-range", "contact-info", "report-id", "policies"],
    "properties": {
        "organization-name": {"type": "string"},
        "contact-info": {"type": "string"},
        "report-id": {"type": "string"},
        "date-range": {
            "type": "object",
            "required": ["start-datetime", "end-datetime"],
            "properties": {"start-datetime": {"type": "string", "format": "date-time"},
                           "end-datetime": {"type": "string", "format": "date-time"}},
        },
        "policies": {"type": "array", "items": {
            "type": "object",
            "required": ["policy", "summary"],
            "properties": {
                "policy": {
                    "type": "object",
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
                    "required": ["total-successful-session-count",
                                 "total-failure-session-count"],
                    "properties": {
                        "total-successful-session-count": {"type": "integer", "minimum": 0},
                        "total-failure-session-count": {"type": "integer", "minimum": 0},
                    },
                },
                "failure-details": {"type": "array", "items": {
                    "type": "object",
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

    def reports(self):
        with self.lock:
            return [json.loads(gzip.decompress(body)) for path, kind, body in self.posts
                    if path == "/tlsrpt" and kind == "application/tlsrpt+gzip"]

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def mailed_reports(sink):
    """The JSON reports in the messages the reports mailbox got, with their headers."""
    out = []
    for message in sink.messages:
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
    extra = {
        "test.": [f'_smtp._tls.ee.test. IN TXT "{rua}"',
                  f'_smtp._tls.wrongdigest.test. IN TXT "{rua}"',
                  f'_smtp._tls.reports.test. IN TXT "{rua}"',
                  "reports.test. IN MX 10 mx.reports.test.",
                  f"mx.reports.test. IN A {REPORTS_MX_IP}",
                  f"reports.test. IN A {REPORTS_HTTPS_IP}"],
        "unsigned.test.": [f'_smtp._tls.plain.unsigned.test. IN TXT "{rua}"'],
    }
    world = World(directory, extra_records=extra)
    world.start_sinks()
    mailbox = Sink(REPORTS_MX_IP, world.port)
    # The MTA trusts one CA file: both CAs in it.
    world.sts_ca.pem_path.write_bytes(world.sts_ca.pem_path.read_bytes() + ca.pem_path.read_bytes())
    yield world, endpoint, mailbox
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
}


def test_reports_by_mail_and_https_count_every_attempt(rpt_world, workdir):
    world, endpoint, mailbox = rpt_world
    config = world.config(workdir, retry_interval="1h",
                          smtp_client="  tls_rpt:\n    report_interval: 2s\n"
                                      "    organization: Petrel Test\n")
    mta = Mta(workdir, config).start()
    try:
        send(mta, "me@example.test", ["a@ee.test"], subject="rpt-ok")
        send(mta, "me@example.test", ["a@wrongdigest.test"], subject="rpt-bad")
        send(mta, "me@example.test", ["a@plain.unsigned.test"], subject="rpt-plain")

        def complete(reports):
            return all(totals(reports, d) == EXPECTED[d] for d in REPORTED)

        by_https = wait_for(lambda: complete(endpoint.reports()) and endpoint.reports(),
                            what="HTTPS reports with every attempt counted")
        by_mail = wait_for(lambda: complete(mailed_reports(mailbox)) and mailed_reports(mailbox),
                           what="mailed reports with every attempt counted")
        for report in by_https + by_mail:
            jsonschema.validate(report, SCHEMA)
            assert report["organization-name"] == "Petrel Test"
        ids = [r["report-id"] for r in by_https]
        assert len(set(ids)) == len(ids), "one report id per domain and period"
        tlsa = next(e for r in by_https for e in r["policies"]
                    if e["policy"]["policy-domain"] == "wrongdigest.test")
        assert tlsa["policy"]["policy-string"] == ["3 1 1 " + "00" * 32]
        assert tlsa["policy"]["mx-host"] == ["mx.wrongdigest.test"]
        assert tlsa["failure-details"][0]["receiving-mx-hostname"] == "mx.wrongdigest.test"
        # The mailed reports went to reports.test, which asks for reports too. Two more
        # periods later, still no report is about reports.test: reports are not counted.
        periods = mta.log().count("TLS-RPT period closed")
        wait_for(lambda: mta.log().count("TLS-RPT period closed") >= periods + 2,
                 what="two more report periods")
        assert totals(endpoint.reports() + mailed_reports(mailbox), "reports.test") == {}
        assert len(mailed_reports(mailbox)) == len(by_mail)
    finally:
        mta.kill()
