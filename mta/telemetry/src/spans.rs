//! The MTA's spans, with every attribute declared up front so callers only record.
//!
//! ```
//! use mta_telemetry::spans::{self, field};
//! let session = spans::session("192.0.2.7:40000".parse().expect("addr"));
//! session.record(field::HELO, "client.example");
//! let transaction = session.in_scope(spans::transaction);
//! transaction.record(field::QUEUE_ID, "0001A2B3C4D5");
//! transaction.record(field::REPLY_CODE, 250);
//! // Store this with the message; the delivery attempts continue the same trace.
//! let reception = spans::traceparent(&transaction);
//! let attempt = spans::delivery_attempt("0001A2B3C4D5", "example.net", reception.as_deref());
//! attempt.record(field::OUTCOME, "delivered");
//! ```
//!
//! Names follow the OpenTelemetry semantic conventions where one exists (`client.address`,
//! `server.address`, `tls.protocol.version`, `user.id`, `error.type`); the rest live
//! under `petrel.`. Span fields are attributes exported off the pod: record identifiers,
//! sizes and codes only. Never a password, an AUTH exchange, a header or body line, and
//! no envelope addresses (they are personal data; the queue id leads to them through the
//! logs and `petrel-mta queue show`).
//!
//! A delivery attempt is a child of the transaction that received the message, across
//! restarts and pods: [`traceparent`] turns the transaction span into a W3C
//! `traceparent` string to keep in the spool, and [`delivery_attempt`] continues that
//! trace. Without an OpenTelemetry layer `traceparent` is `None` and nothing is stored.

use std::net::SocketAddr;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::Span;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The attribute names, for `span.record(field::X, value)`.
///
/// Record integers as `i64`: tracing-opentelemetry 0.34 exports a `u64` field as a string.
pub mod field {
    /// Session: the HELO/EHLO name the client gave.
    pub const HELO: &str = "petrel.smtp.helo";
    /// Session and delivery attempt: negotiated TLS version (`"1.3"`), absent without TLS.
    pub const TLS_VERSION: &str = "tls.protocol.version";
    /// Session: the authenticated user id (the login name, never the secret).
    pub const USER_ID: &str = "user.id";
    /// Transaction and delivery attempt: the queue id.
    pub const QUEUE_ID: &str = "petrel.queue.id";
    /// Transaction: message size in bytes as spooled.
    pub const SIZE: &str = "petrel.message.size";
    /// Transaction and delivery attempt: number of recipients.
    pub const RECIPIENTS: &str = "petrel.message.recipients";
    /// Transaction and delivery attempt: the final SMTP reply code.
    pub const REPLY_CODE: &str = "petrel.smtp.reply.code";
    /// Delivery attempt: the host that was connected to (MX host, smarthost, LMTP host).
    pub const MX_HOST: &str = "server.address";
    /// Delivery attempt: the port that was connected to.
    pub const SERVER_PORT: &str = "server.port";
    /// Delivery attempt: `delivered`, `deferred` or `failed` ([`crate::Outcome::as_str`]).
    pub const OUTCOME: &str = "petrel.delivery.outcome";
    /// Delivery attempt: which attempt this is for the message, from 1.
    pub const ATTEMPT: &str = "petrel.delivery.attempt";
    /// Any: a short, closed-set error kind (`"timeout"`, `"dns"`, `"tls"`), when the span failed.
    pub const ERROR_TYPE: &str = "error.type";
    /// Any: `"error"` marks the span failed in OpenTelemetry (or `"ok"`).
    pub const STATUS: &str = "otel.status_code";
}

/// The span of one SMTP session, from accept to close (OpenTelemetry kind server).
/// Record [`field::HELO`], [`field::TLS_VERSION`] and [`field::USER_ID`] as they become known.
pub fn session(client: SocketAddr) -> Span {
    tracing::info_span!(
        "smtp.session",
        otel.kind = "server",
        otel.status_code = Empty,
        client.address = %client.ip(),
        client.port = i64::from(client.port()),
        network.transport = "tcp",
        petrel.smtp.helo = Empty,
        tls.protocol.version = Empty,
        user.id = Empty,
        error.type = Empty,
    )
}

/// The span of one mail transaction (MAIL FROM to the reply after the data), as a child of
/// the current span (enter the session span first, or use `session.in_scope`).
/// Record [`field::QUEUE_ID`], [`field::SIZE`], [`field::RECIPIENTS`] and [`field::REPLY_CODE`].
pub fn transaction() -> Span {
    tracing::info_span!(
        "smtp.transaction",
        otel.kind = "internal",
        otel.status_code = Empty,
        petrel.queue.id = Empty,
        petrel.message.size = Empty,
        petrel.message.recipients = Empty,
        petrel.smtp.reply.code = Empty,
        error.type = Empty,
    )
}

/// The span of one delivery attempt of message `queue_id` to `destination` (the domain
/// or route; OpenTelemetry kind client). When `reception` is the `traceparent` saved from
/// the transaction span, the attempt joins that trace as its child, so one message is
/// one trace. Record [`field::MX_HOST`], [`field::SERVER_PORT`], [`field::TLS_VERSION`],
/// [`field::REPLY_CODE`], [`field::OUTCOME`], [`field::RECIPIENTS`], [`field::ATTEMPT`].
pub fn delivery_attempt(queue_id: &str, destination: &str, reception: Option<&str>) -> Span {
    let span = tracing::info_span!(
        "smtp.delivery",
        otel.kind = "client",
        otel.status_code = Empty,
        petrel.queue.id = queue_id,
        petrel.delivery.destination = destination,
        petrel.delivery.attempt = Empty,
        petrel.delivery.outcome = Empty,
        petrel.message.recipients = Empty,
        petrel.smtp.reply.code = Empty,
        server.address = Empty,
        server.port = Empty,
        tls.protocol.version = Empty,
        error.type = Empty,
    );
    if let Some(cx) = reception.and_then(parse_traceparent) {
        // Fails only when the span is disabled or already started; nothing to do then.
        let _ = span.set_parent(cx);
    }
    span
}

/// The W3C `traceparent` of `span` (`00-<trace id>-<span id>-<flags>`), or `None` when
/// the span is not exported (no OpenTelemetry layer, filtered out).
pub fn traceparent(span: &Span) -> Option<String> {
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = std::collections::HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.remove("traceparent")
}

fn parse_traceparent(value: &str) -> Option<opentelemetry::Context> {
    let carrier = std::collections::HashMap::from([("traceparent".to_string(), value.to_string())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    cx.span().span_context().is_valid().then_some(cx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::TracerProvider;
    use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn attempts_continue_the_reception_trace() {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        let reception = tracing::subscriber::with_default(subscriber, || {
            let session = session("192.0.2.7:40000".parse().expect("addr"));
            session.record(field::HELO, "client.example");
            session.record(field::USER_ID, "alice");
            let transaction = session.in_scope(transaction);
            transaction.record(field::QUEUE_ID, "Q1");
            transaction.record(field::SIZE, 1234_i64);
            transaction.record(field::REPLY_CODE, 250_i64);
            let reception = traceparent(&transaction).expect("exported span has a traceparent");
            drop(transaction);
            drop(session);
            let attempt = delivery_attempt("Q1", "example.net", Some(&reception));
            attempt.record(field::MX_HOST, "mx.example.net");
            attempt.record(field::OUTCOME, "delivered");
            drop(attempt);
            reception
        });
        let spans = exporter.get_finished_spans().expect("spans");
        let by_name = |n: &str| {
            spans
                .iter()
                .find(|s| s.name == n)
                .unwrap_or_else(|| panic!("no span {n}"))
        };
        let (s, t, d) = (
            by_name("smtp.session"),
            by_name("smtp.transaction"),
            by_name("smtp.delivery"),
        );
        assert_eq!(t.parent_span_id, s.span_context.span_id());
        assert_eq!(d.parent_span_id, t.span_context.span_id());
        assert_eq!(d.span_context.trace_id(), s.span_context.trace_id());
        assert!(reception.contains(&t.span_context.span_id().to_string()));
        let attr = |span: &opentelemetry_sdk::trace::SpanData, key: &str| {
            span.attributes
                .iter()
                .find(|kv| kv.key.as_str() == key)
                .map(|kv| kv.value.to_string())
        };
        assert_eq!(attr(s, "client.address").as_deref(), Some("192.0.2.7"));
        assert_eq!(attr(s, field::HELO).as_deref(), Some("client.example"));
        assert_eq!(attr(s, field::USER_ID).as_deref(), Some("alice"));
        assert_eq!(attr(t, field::QUEUE_ID).as_deref(), Some("Q1"));
        let size = t
            .attributes
            .iter()
            .find(|kv| kv.key.as_str() == field::SIZE)
            .map(|kv| kv.value.clone());
        assert_eq!(
            size,
            Some(opentelemetry::Value::I64(1234)),
            "integers stay integers"
        );
        assert_eq!(attr(d, field::MX_HOST).as_deref(), Some("mx.example.net"));
        assert_eq!(
            attr(d, "petrel.delivery.destination").as_deref(),
            Some("example.net")
        );
        assert_eq!(
            attr(t, field::TLS_VERSION),
            None,
            "unrecorded fields are not exported"
        );
    }

    #[test]
    fn without_an_otel_layer_there_is_no_traceparent() {
        let subscriber = tracing_subscriber::registry();
        tracing::subscriber::with_default(subscriber, || {
            let t = transaction();
            assert_eq!(traceparent(&t), None);
            assert_eq!(parse_traceparent("garbage").map(|_| ()), None);
            // A stored traceparent with nothing to export to is harmless.
            let _ = delivery_attempt(
                "Q1",
                "example.net",
                Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
            );
        });
    }
}
