"""Observability of the real MTA: one trace per message from reception to delivery at an
OTLP receiver (decoded with opentelemetry-proto), /metrics matching a known workload
(parsed with prometheus-client), and /readyz false while draining."""

import signal
import smtplib
import socket
import urllib.error
import urllib.request

from conftest import Mta, maildir_files, wait_for
from outbound import Sink, free_port
from test_telemetry import OtlpReceiver, text_string_to_metric_families

BODY_MARKER = "secret-body-text-never-in-telemetry"


def observed_config(workdir, sink_port):
    return f"""\
hostname: mx.petrel.test
listeners:
  - address: 127.0.0.1:0
admin:
  address: 127.0.0.1:0
http:
  address: 127.0.0.1:0
spool:
  path: {workdir / "spool"}
relay:
  client_networks: ["127.0.0.0/8"]
routes:
  - domain: "*"
    smarthost: 127.0.0.1:{sink_port}
    tls: none
local_domains:
  - name: example.test
    delivery:
      maildir:
        root: {workdir / "maildir"}
"""


def http_get(mta, path):
    # Printed just after the SMTP listener line that Mta.start() waits for.
    line = wait_for(lambda: next((l for l in mta.stdout_lines if "/readyz on http://" in l), None),
                    what="the HTTP endpoint line")
    base = line.rsplit(" on ", 1)[1]
    try:
        with urllib.request.urlopen(base + path, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def message(n):
    return (f"From: a@example.test\r\nSubject: m{n}\r\n\r\n{BODY_MARKER}\r\n").encode()


def test_trace_metrics_and_readiness_of_a_real_workload(workdir):
    port = free_port()
    sink = Sink("127.0.0.1", port)
    with OtlpReceiver() as otlp:
        mta = Mta(workdir, observed_config(workdir, port), env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": otlp.endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "OTEL_SERVICE_NAME": "petrel-mta-test",
        }).start()
        try:
            assert http_get(mta, "/healthz")[0] == 200
            assert http_get(mta, "/readyz")[0] == 200
            with smtplib.SMTP(mta.host, mta.port, timeout=30) as s:
                s.ehlo("client.test")
                s.sendmail("a@example.test", ["r1@remote.test"], message(1))
                s.sendmail("a@example.test", ["r2@remote.test"], message(2))
                s.sendmail("a@example.test", ["local@example.test"], message(3))
                s.mail("a@example.test")
                assert s.rcpt("bad%hack@example.test")[0] == 553
                s.rset()
            wait_for(lambda: len(sink.messages) == 2, what="relayed messages")
            wait_for(lambda: maildir_files(workdir / "maildir", "local"), what="local copy")

            # --- metrics -----------------------------------------------------------------
            def families():
                status, text = http_get(mta, "/metrics")
                assert status == 200
                return {f.name: f for f in text_string_to_metric_families(text)}

            def sample(fams, family, suffix="", **labels):
                for s in fams[family].samples:
                    if s.name == family + suffix and s.labels == labels:
                        return s.value
                raise AssertionError(f"no {family}{suffix}{labels}")

            fams = wait_for(lambda: (f := families()) and sample(
                f, "petrel_mta_delivery_attempts", "_total", outcome="delivered") == 3 and f,
                what="three deliveries counted")
            assert sample(fams, "petrel_mta_messages_accepted", "_total") == 3
            assert sample(fams, "petrel_mta_smtp_sessions", "_total") == 1
            assert sample(fams, "petrel_mta_smtp_replies", "_total",
                          command="RCPT", **{"class": "2xx"}) == 3
            assert sample(fams, "petrel_mta_smtp_replies", "_total",
                          command="RCPT", **{"class": "5xx"}) == 1
            assert sample(fams, "petrel_mta_smtp_replies", "_total",
                          command="DATA", **{"class": "3xx"}) == 3
            assert sample(fams, "petrel_mta_queue_messages", state="waiting") == 0
            assert sample(fams, "petrel_mta_spool_sync_batch_messages", "_count") >= 3

            # --- traces --------------------------------------------------------------------
            def complete():
                spans = otlp.spans()
                deliveries = [s for s in spans if s.name == "smtp.delivery"]
                return spans if len(deliveries) >= 3 else None

            spans = wait_for(complete, what="three delivery spans")
            by_id = {s.span_id: s for s in spans}
            (session,) = [s for s in spans if s.name == "smtp.session"]
            assert session.attributes["client.address"] == "127.0.0.1"
            assert session.attributes["petrel.smtp.helo"] == "client.test"
            assert session.resource["service.name"] == "petrel-mta-test"
            transactions = [s for s in spans if s.name == "smtp.transaction"]
            assert len(transactions) == 3
            for tx in transactions:
                assert tx.parent_span_id == session.span_id
                assert tx.attributes["petrel.smtp.reply.code"] == 250
                deliveries = [s for s in spans if s.name == "smtp.delivery"
                              and s.attributes["petrel.queue.id"] == tx.attributes["petrel.queue.id"]]
                assert len(deliveries) == 1, tx.attributes
                d = deliveries[0]
                assert d.trace_id == tx.trace_id and d.parent_span_id == tx.span_id
                assert d.attributes["petrel.delivery.outcome"] == "delivered"
                assert by_id[d.parent_span_id].name == "smtp.transaction"
            relayed = [s for s in spans if s.name == "smtp.delivery"
                       and s.attributes["petrel.delivery.destination"].startswith("smarthost:")]
            assert len(relayed) == 2
            assert all(s.attributes["server.address"] == "127.0.0.1" for s in relayed)
            assert BODY_MARKER.encode() not in otlp.raw_bytes()

            # --- readiness while draining ------------------------------------------------
            held = socket.create_connection((mta.host, mta.port), timeout=30)
            f = held.makefile("rb")
            f.readline()
            held.sendall(b"EHLO c.test\r\nMAIL FROM:<a@example.test>\r\n"
                         b"RCPT TO:<x@example.test>\r\nDATA\r\n")
            wait_for(lambda: f.readline().startswith(b"354"), what="in DATA")
            mta.proc.send_signal(signal.SIGTERM)
            status, body = wait_for(lambda: (r := http_get(mta, "/readyz"))[0] == 503 and r,
                                    what="not ready while draining")
            assert "draining" in body
            assert http_get(mta, "/healthz")[0] == 200, "alive while draining"
            held.sendall(b"Subject: last\r\n\r\nfinished during drain\r\n.\r\n")
            assert f.readline().startswith(b"250 ")
            held.close()
            assert mta.proc.wait(timeout=60) == 0
        finally:
            mta.kill()
            sink.stop()
