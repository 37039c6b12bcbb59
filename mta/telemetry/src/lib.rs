//! Telemetry for Petrel: logs, OpenTelemetry traces and metrics, and the HTTP port that
//! serves `/metrics`, `/healthz` and `/readyz`.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! let _guard = mta_telemetry::init("petrel-mta", false)?; // first: logs + OTLP from OTEL_*
//! let metrics = mta_telemetry::MtaMetrics::new();          // after init: mirrors into OTLP
//! let listener = tokio::net::TcpListener::bind("0.0.0.0:9090").await?;
//! let ready = || -> Result<(), String> { Ok(()) };
//! tokio::spawn(mta_telemetry::serve_http(listener, metrics.clone(), Arc::new(ready), std::future::pending()));
//! let session = mta_telemetry::spans::session("192.0.2.1:40000".parse()?);
//! metrics.session_started();
//! # drop(session); Ok(()) }
//! ```
//!
//! Modules, in the order a process meets them: [`init`](crate::init()) (subscriber and
//! exporters), `export` (the never-blocking span queue), [`metrics`], [`spans`], [`http`].

mod escape;
mod export;
pub mod http;
mod init;
pub mod metrics;
pub mod spans;

pub use escape::Escaped;
pub use export::spans_dropped;
pub use http::{Readiness, serve_http};
pub use init::{TelemetryGuard, init};
pub use metrics::{
    DrainState, HandoffDirection, MtaMetrics, Outcome, QueueState, RateLimitBackend, TlsReload,
};

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A global `tracing` subscriber is already installed.
    #[error("a tracing subscriber is already installed: {0}")]
    Subscriber(#[from] tracing_subscriber::util::TryInitError),
    /// The OTLP exporter rejected its configuration (for example a bad endpoint URL).
    #[error("OTLP exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    /// The exporter thread or its runtime could not start.
    #[error("starting the exporter: {0}")]
    Io(#[from] std::io::Error),
}
