"""A test OTLP/HTTP collector: decodes what it receives with the official OpenTelemetry
protobuf definitions (PyPI `opentelemetry-proto`).

It accepts `POST /v1/traces` (ExportTraceServiceRequest) and `POST /v1/metrics`
(ExportMetricsServiceRequest), gzip or not, keeps every decoded request and its raw
bytes, and answers with the matching empty Export*ServiceResponse.
"""

import gzip
import http.server
import threading

from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

ROUTES = {
    "/v1/traces": (
        trace_service_pb2.ExportTraceServiceRequest,
        trace_service_pb2.ExportTraceServiceResponse,
    ),
    "/v1/metrics": (
        metrics_service_pb2.ExportMetricsServiceRequest,
        metrics_service_pb2.ExportMetricsServiceResponse,
    ),
}


def attributes(key_values):
    """OTLP KeyValue list -> dict of plain Python values."""
    out = {}
    for kv in key_values:
        which = kv.value.WhichOneof("value")
        out[kv.key] = getattr(kv.value, which) if which else None
    return out


class Span:
    """One received span, flattened for assertions."""

    def __init__(self, resource, scope, span):
        self.resource = resource
        self.scope = scope
        self.raw = span
        self.name = span.name
        self.kind = span.kind
        self.trace_id = span.trace_id.hex()
        self.span_id = span.span_id.hex()
        self.parent_span_id = span.parent_span_id.hex()
        self.attributes = attributes(span.attributes)
        self.events = [(e.name, attributes(e.attributes)) for e in span.events]
        self.links = [(link.trace_id.hex(), link.span_id.hex()) for link in span.links]

    def __repr__(self):
        return f"Span({self.name!r}, {self.attributes!r})"


class OtlpReceiver:
    """Run with `with OtlpReceiver() as r:`; point OTEL_EXPORTER_OTLP_ENDPOINT at r.endpoint."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = []  # (path, decoded message)
        self.raw = []  # request bodies after gzip, for "never appears" checks
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                route = ROUTES.get(self.path)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if route is None:
                    self.send_error(404)
                    return
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                request_type, response_type = route
                message = request_type()
                message.ParseFromString(body)
                with receiver.lock:
                    receiver.requests.append((self.path, message))
                    receiver.raw.append(body)
                reply = response_type().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def spans(self):
        out = []
        with self.lock:
            requests = [m for path, m in self.requests if path == "/v1/traces"]
        for request in requests:
            for rs in request.resource_spans:
                resource = attributes(rs.resource.attributes)
                for ss in rs.scope_spans:
                    for span in ss.spans:
                        out.append(Span(resource, ss.scope.name, span))
        return out

    def metrics(self):
        """{metric name: [(resource attributes, Metric)]} over every metrics request."""
        out = {}
        with self.lock:
            requests = [m for path, m in self.requests if path == "/v1/metrics"]
        for request in requests:
            for rm in request.resource_metrics:
                resource = attributes(rm.resource.attributes)
                for sm in rm.scope_metrics:
                    for metric in sm.metrics:
                        out.setdefault(metric.name, []).append((resource, metric))
        return out

    def raw_bytes(self):
        with self.lock:
            return b"".join(self.raw)
