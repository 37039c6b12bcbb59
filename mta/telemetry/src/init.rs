//! Process start-up: logs always, OpenTelemetry export only when asked for.
//!
//! Logs go to stderr through `tracing-subscriber`'s fmt layer, human-readable or JSON,
//! filtered by `RUST_LOG` (default `info`). That filter applies to the log lines only.
//!
//! OpenTelemetry is configured by the standard variables and nothing else:
//!
//! * traces are exported when `OTEL_EXPORTER_OTLP_ENDPOINT` or
//!   `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set, metrics when `OTEL_EXPORTER_OTLP_ENDPOINT`
//!   or `OTEL_EXPORTER_OTLP_METRICS_ENDPOINT` is; `OTEL_SDK_DISABLED=true`,
//!   `OTEL_TRACES_EXPORTER=none` and `OTEL_METRICS_EXPORTER=none` turn them off;
//! * the protocol is OTLP/HTTP with protobuf (collector port 4318); `..._HEADERS`,
//!   `..._TIMEOUT` and `..._COMPRESSION` are read by the exporter;
//! * `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES` make the resource (the service
//!   name defaults to the `service_name` argument), `OTEL_TRACES_SAMPLER(_ARG)` the
//!   sampler, `OTEL_BSP_MAX_QUEUE_SIZE`, `OTEL_BSP_MAX_EXPORT_BATCH_SIZE` and
//!   `OTEL_BSP_SCHEDULE_DELAY` the span queue, `OTEL_METRIC_EXPORT_INTERVAL` the metric
//!   push period.
//!
//! Spans reach the OpenTelemetry layer at `info` and above whatever `RUST_LOG` says, so
//! quieter logs do not break traces. With no endpoint there is no layer at all: a span is
//! then as cheap as the fmt layer makes it.

use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{MetricExporter, SpanExporter};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::Error;
use crate::export::{BatchConfig, DroppingBatchProcessor, OnOwnRuntime};

/// How long dropping the guard may wait for the last export.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// Keeps the exporters alive; dropping it flushes what is queued (for at most a few
/// seconds) and shuts them down. Hold it in `main` until the process is done.
#[must_use = "dropping the guard shuts telemetry export down"]
#[derive(Debug, Default)]
pub struct TelemetryGuard {
    tracer: Option<SdkTracerProvider>,
    meter: Option<SdkMeterProvider>,
}

impl TelemetryGuard {
    /// Whether spans are being exported.
    pub fn traces_exported(&self) -> bool {
        self.tracer.is_some()
    }

    /// Whether metrics are being pushed over OTLP.
    pub fn metrics_exported(&self) -> bool {
        self.meter.is_some()
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(tracer) = self.tracer.take()
            && let Err(e) = tracer.shutdown_with_timeout(SHUTDOWN_TIMEOUT)
        {
            eprintln!("telemetry: span export shutdown: {e}");
        }
        if let Some(meter) = self.meter.take()
            && let Err(e) = meter.shutdown_with_timeout(SHUTDOWN_TIMEOUT)
        {
            eprintln!("telemetry: metric export shutdown: {e}");
        }
    }
}

/// Sets up logging and, when the `OTEL_*` variables ask for it, OpenTelemetry export
/// of traces and metrics (see the module docs). Call once, before creating
/// [`crate::MtaMetrics`], and keep the guard until exit.
pub fn init(service_name: &str, json: bool) -> Result<TelemetryGuard, Error> {
    let env_filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour only on a terminal: escape sequences in a log file or a collector's input
    // are noise at best (issue 13, item 7).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let fmt = if json {
        fmt.json().with_filter(env_filter).boxed()
    } else {
        fmt.with_filter(env_filter).boxed()
    };

    let mut guard = TelemetryGuard::default();
    let disabled = env_is("OTEL_SDK_DISABLED", "true");
    let resource = resource(service_name);

    if !disabled
        && !env_is("OTEL_TRACES_EXPORTER", "none")
        && env_set(&[
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        ])
    {
        let exporter = SpanExporter::builder().with_http().build()?;
        let processor = DroppingBatchProcessor::new(exporter, &resource, BatchConfig::from_env())?;
        guard.tracer = Some(
            SdkTracerProvider::builder()
                .with_resource(resource.clone())
                .with_span_processor(processor)
                .build(),
        );
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    }
    if !disabled
        && !env_is("OTEL_METRICS_EXPORTER", "none")
        && env_set(&[
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
        ])
    {
        let exporter = OnOwnRuntime::new(MetricExporter::builder().with_http().build()?)?;
        let provider = SdkMeterProvider::builder()
            .with_resource(resource.clone())
            .with_reader(PeriodicReader::builder(exporter).build())
            .build();
        opentelemetry::global::set_meter_provider(provider.clone());
        guard.meter = Some(provider);
    }

    let otel = guard.tracer.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer(service_name.to_string()))
            .with_tracked_inactivity(false)
            .with_filter(LevelFilter::INFO)
    });
    tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .try_init()?;

    if let Ok(protocol) = std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL")
        && protocol != "http/protobuf"
        && (guard.tracer.is_some() || guard.meter.is_some())
    {
        tracing::warn!(%protocol, "OTEL_EXPORTER_OTLP_PROTOCOL is not supported, using http/protobuf");
    }
    if guard.tracer.is_some() || guard.meter.is_some() {
        tracing::info!(
            traces = guard.traces_exported(),
            metrics = guard.metrics_exported(),
            "OpenTelemetry export on"
        );
    }
    Ok(guard)
}

/// The resource: `OTEL_RESOURCE_ATTRIBUTES` and `OTEL_SERVICE_NAME` win, `service_name`
/// fills in.
fn resource(service_name: &str) -> Resource {
    let from_env = Resource::builder().build();
    let named_by_env = std::env::var("OTEL_SERVICE_NAME").is_ok_and(|v| !v.is_empty())
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|v| {
            v.split(',')
                .any(|kv| kv.trim().starts_with("service.name="))
        });
    if named_by_env {
        from_env
    } else {
        Resource::builder()
            .with_attribute(KeyValue::new("service.name", service_name.to_string()))
            .build()
    }
}

fn env_set(names: &[&str]) -> bool {
    names
        .iter()
        .any(|n| std::env::var(n).is_ok_and(|v| !v.trim().is_empty()))
}

fn env_is(name: &str, value: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v.trim().eq_ignore_ascii_case(value))
}
