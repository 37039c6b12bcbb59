"""mta-telemetry end to end: OTLP spans and metrics decoded by the official OpenTelemetry
protobuf definitions, /metrics parsed by the `prometheus-client` package's parser, the
health endpoints, and the cost of tracing (reported, not asserted).

The process under test is mta-telemetry's `emit` example (mta/telemetry/examples/emit.rs),
which calls the same functions petrel-mta calls.
"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, wait_for

try:
    from otlp_receiver import OtlpReceiver
except ImportError:  # opentelemetry-proto missing
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    "opentelemetry-proto"], check=True)
    from otlp_receiver import OtlpReceiver

try:
    from prometheus_client.openmetrics.parser import text_string_to_metric_families
except ImportError:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    "prometheus-client"], check=True)
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

# emit.rs keeps these in scope while it traces; they must never be exported.
PASSWORD = "hunter2-correct-horse"
BODY_TEXT = "The eagle lands at midnight."

SPAN_KIND_SERVER = 2
SPAN_KIND_CLIENT = 3


@pytest.fixture(scope="module")
def emit():
    """Builds the example (no-op when up to date) and returns its path; cargo reports the
    path, so CARGO_TARGET_DIR is honoured. PETREL_EMIT_BIN overrides."""
    if os.environ.get("PETREL_EMIT_BIN"):
        return Path(os.environ["PETREL_EMIT_BIN"])
    out = subprocess.run(
        ["cargo", "build", "-q", "-p", "mta-telemetry", "--example", "emit", "--message-format=json"],
        cwd=ROOT, check=True, stdout=subprocess.PIPE,
    ).stdout
    for line in out.splitlines():
        msg = json.loads(line)
        if msg.get("reason") == "compiler-artifact" and msg.get("executable") \
                and msg["target"]["name"] == "emit":
            return Path(msg["executable"])
    raise AssertionError("cargo did not report the emit executable")


def clean_env(**extra):
    """The environment without any OTEL_* or RUST_LOG from the caller, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_") and k != "RUST_LOG"}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_emit(emit, *args, timeout=60, **env):
    started = time.monotonic()
    proc = subprocess.run([str(emit), *args], env=clean_env(**env), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"emit failed:\n{proc.stdout}\n{proc.stderr}"
    return proc, time.monotonic() - started


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_message_is_one_trace_with_the_right_attributes(emit):
    with OtlpReceiver() as collector:
        proc, _ = run_emit(emit, "trace", OTEL_EXPORTER_OTLP_ENDPOINT=collector.endpoint,
                           OTEL_RESOURCE_ATTRIBUTES="deployment.environment.name=e2e,k8s.pod.name=mta-0")
        # The guard flushed on exit: everything is here already.
        spans = {s.name: s for s in collector.spans()}
        raw = collector.raw_bytes()

    assert set(spans) == {"smtp.session", "smtp.transaction", "smtp.delivery"}, spans
    session, transaction, delivery = (spans["smtp.session"], spans["smtp.transaction"],
                                      spans["smtp.delivery"])

    # One trace: reception, then the delivery attempt as a child of the transaction.
    assert session.trace_id == transaction.trace_id == delivery.trace_id
    assert session.parent_span_id == ""
    assert transaction.parent_span_id == session.span_id
    assert delivery.parent_span_id == transaction.span_id
    assert session.kind == SPAN_KIND_SERVER and delivery.kind == SPAN_KIND_CLIENT

    assert session.resource["service.name"] == "petrel-mta"
    assert session.resource["deployment.environment.name"] == "e2e"
    assert session.resource["k8s.pod.name"] == "mta-0"

    assert session.attributes["client.address"] == "192.0.2.7"
    assert session.attributes["client.port"] == 40001
    assert session.attributes["petrel.smtp.helo"] == "client.example"
    assert session.attributes["tls.protocol.version"] == "1.3"
    assert session.attributes["user.id"] == "alice"

    assert transaction.attributes["petrel.queue.id"] == "0001TEST0001"
    assert transaction.attributes["petrel.message.size"] > 0
    assert transaction.attributes["petrel.message.recipients"] == 2
    assert transaction.attributes["petrel.smtp.reply.code"] == 250
    assert ("received", {"queue_id": "0001TEST0001",
                         "size": transaction.attributes["petrel.message.size"]}) in [
        (name, {k: v for k, v in attrs.items() if k in ("queue_id", "size")})
        for name, attrs in transaction.events]

    assert delivery.attributes["petrel.queue.id"] == "0001TEST0001"
    assert delivery.attributes["petrel.delivery.destination"] == "example.net"
    assert delivery.attributes["server.address"] == "mx1.example.net"
    assert delivery.attributes["server.port"] == 25
    assert delivery.attributes["tls.protocol.version"] == "1.2"
    assert delivery.attributes["petrel.smtp.reply.code"] == 250
    assert delivery.attributes["petrel.delivery.outcome"] == "delivered"

    # Nothing secret or personal left the process, in any field of any request.
    assert PASSWORD.encode() not in raw
    assert BODY_TEXT.encode() not in raw
    for span in spans.values():
        for key in span.attributes:
            assert "pass" not in key.lower() and "body" not in key.lower(), key
    assert "spans dropped: 0" in proc.stdout


def test_service_name_comes_from_the_environment_first(emit):
    with OtlpReceiver() as collector:
        run_emit(emit, "trace", OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=collector.endpoint + "/v1/traces",
                 OTEL_SERVICE_NAME="mta-canary")
        names = {s.resource["service.name"] for s in collector.spans()}
    assert names == {"mta-canary"}


def test_sampler_off_exports_nothing(emit):
    with OtlpReceiver() as collector:
        run_emit(emit, "trace", OTEL_EXPORTER_OTLP_ENDPOINT=collector.endpoint,
                 OTEL_TRACES_SAMPLER="always_off")
        assert collector.spans() == []


def test_no_otel_variables_no_export(emit):
    proc, _ = run_emit(emit, "trace")
    assert "OpenTelemetry export on" not in proc.stderr
    assert "received" in proc.stderr, "logs still work"


def test_collector_down_drops_and_counts_without_hanging(emit):
    proc, elapsed = run_emit(emit, "trace",
                             OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{closed_port()}",
                             OTEL_EXPORTER_OTLP_TIMEOUT="2000")
    assert "spans dropped: 3" in proc.stdout, proc.stdout + proc.stderr
    assert elapsed < 20, f"exit took {elapsed:.1f}s with the collector down"


class Served:
    """`emit serve`: the HTTP endpoints over a known workload."""

    def __init__(self, emit, **env):
        self.proc = subprocess.Popen([str(emit), "serve"], env=clean_env(**env), text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL)
        line = self.proc.stdout.readline().strip()
        assert line.startswith("http on "), line
        self.base = "http://" + line.removeprefix("http on ")

    def get(self, path):
        try:
            with urllib.request.urlopen(self.base + path, timeout=10) as r:
                return r.status, r.headers.get("Content-Type"), r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.headers.get("Content-Type"), e.read().decode()

    def say(self, line):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def stop(self):
        self.proc.stdin.close()
        assert self.proc.wait(timeout=30) == 0


def test_metrics_health_and_readiness(emit):
    served = Served(emit)
    try:
        assert served.get("/healthz")[0] == 200
        assert served.get("/readyz")[:1] == (200,)

        status, content_type, text = served.get("/metrics")
        assert status == 200
        assert content_type.startswith("application/openmetrics-text")
        families = {f.name: f for f in text_string_to_metric_families(text)}

        def sample(family, suffix="", **labels):
            for s in families[family].samples:
                if s.name == family + suffix and s.labels == labels:
                    return s.value
            raise AssertionError(f"no {family}{suffix}{labels} in {families[family].samples}")

        assert families["petrel_mta_smtp_sessions"].type == "counter"
        assert sample("petrel_mta_smtp_sessions", "_total") == 3
        assert sample("petrel_mta_smtp_sessions_active") == 2
        assert sample("petrel_mta_smtp_replies", "_total", command="RCPT", **{"class": "2xx"}) == 2
        assert sample("petrel_mta_smtp_replies", "_total", command="RCPT", **{"class": "5xx"}) == 1
        assert sample("petrel_mta_smtp_replies", "_total", command="DATA", **{"class": "3xx"}) == 1
        assert sample("petrel_mta_messages_accepted", "_total") == 2
        assert families["petrel_mta_message_size_bytes"].type == "histogram"
        assert families["petrel_mta_message_size_bytes"].unit == "bytes"
        assert sample("petrel_mta_message_size_bytes", "_sum") == 73000
        assert sample("petrel_mta_message_size_bytes", "_bucket", le="4096.0") == 1
        assert sample("petrel_mta_message_size_bytes", "_bucket", le="+Inf") == 2
        assert families["petrel_mta_accept_duration_seconds"].unit == "seconds"
        assert sample("petrel_mta_accept_duration_seconds", "_count") == 2
        assert sample("petrel_mta_delivery_attempts", "_total", outcome="delivered") == 1
        assert sample("petrel_mta_delivery_attempts", "_total", outcome="deferred") == 1
        assert sample("petrel_mta_delivery_attempts", "_total", outcome="failed") == 0
        assert sample("petrel_mta_delivery_duration_seconds", "_count", outcome="deferred") == 1
        assert sample("petrel_mta_messages_bounced", "_total") == 1
        assert sample("petrel_mta_messages_expired", "_total") == 0
        assert sample("petrel_mta_queue_messages", state="waiting") == 4
        assert sample("petrel_mta_queue_messages", state="held") == 0
        assert sample("petrel_mta_spool_sync_batch_messages", "_sum") == 2
        assert sample("petrel_mta_tls_handshakes", "_total", result="ok") == 1
        assert sample("petrel_mta_auth_failures", "_total") == 2
        assert sample("petrel_mta_rate_limited", "_total", limit="client_ip") == 1
        assert sample("petrel_mta_otel_spans_dropped", "_total", reason="queue_full") == 0

        # Draining: not ready, still alive.
        assert served.say("drain") == "draining"
        status, _, body = served.get("/readyz")
        assert (status, body) == (503, "not ready: draining\n")
        assert served.get("/healthz")[0] == 200
    finally:
        served.stop()


def test_metrics_are_also_pushed_over_otlp(emit):
    with OtlpReceiver() as collector:
        served = Served(emit, OTEL_EXPORTER_OTLP_ENDPOINT=collector.endpoint,
                        OTEL_METRIC_EXPORT_INTERVAL="200")
        try:
            wait_for(lambda: "petrel.mta.auth.failures" in collector.metrics(), timeout=30,
                     what="a metrics export")
        finally:
            served.stop()
        metrics = collector.metrics()

    resource, failures = metrics["petrel.mta.auth.failures"][-1]
    assert resource["service.name"] == "petrel-mta"
    assert failures.sum.is_monotonic and failures.sum.data_points[0].as_int == 2
    _, replies = metrics["petrel.mta.smtp.replies"][-1]
    points = {(p.attributes[0].value.string_value, p.attributes[1].value.string_value): p.as_int
              for p in replies.sum.data_points
              for _ in [p.attributes.sort(key=lambda kv: kv.key)]}
    assert points[("5xx", "RCPT")] == 1 and points[("2xx", "RCPT")] == 2
    _, accept = metrics["petrel.mta.accept.duration"][-1]
    assert accept.unit == "s" and accept.histogram.data_points[0].count == 2
    _, queue = metrics["petrel.mta.queue.messages"][-1]
    assert queue.gauge.data_points[0].as_int == 4


def test_tracing_cost_on_and_off(emit):
    """Reports µs per message (three spans, two log events) with export on and off; asserts
    nothing. Debug build unless PETREL_EMIT_BIN points at a release one."""
    n = os.environ.get("PETREL_BENCH_MESSAGES", "20000")
    report = []
    with OtlpReceiver() as collector:
        for label, env in [
            ("RUST_LOG=warn, no OTEL", dict(RUST_LOG="warn")),
            ("RUST_LOG=warn, OTLP on", dict(RUST_LOG="warn", OTEL_EXPORTER_OTLP_ENDPOINT=collector.endpoint)),
            ("RUST_LOG=info, no OTEL", dict(RUST_LOG="info")),
            ("RUST_LOG=info, OTLP on", dict(RUST_LOG="info", OTEL_EXPORTER_OTLP_ENDPOINT=collector.endpoint)),
        ]:
            proc, _ = run_emit(emit, "bench", n, timeout=300, **env)
            line = next(l for l in proc.stdout.splitlines() if l.startswith("bench:"))
            dropped = next(l for l in proc.stdout.splitlines() if l.startswith("spans dropped"))
            report.append(f"{label:24} {line.removeprefix('bench: ')}; {dropped}")
    print("\n" + "\n".join(report))
