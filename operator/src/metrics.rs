//! The operator's own metrics (`petrel_operator_reconcile_*`), served on `/metrics`:
//! reconcile runs and their duration per CR kind, and failures per kind and error label
//! (`Error::metric_label`, never free text).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::time::Instant;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    kind: String,
    error: String,
}

/// Cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    runs: Family<KindLabels, Counter>,
    failures: Family<FailureLabels, Counter>,
    duration: Family<KindLabels, Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        let runs = Family::<KindLabels, Counter>::default();
        let failures = Family::<FailureLabels, Counter>::default();
        let duration = Family::<KindLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.005, 2.0, 12))
        });
        let mut registry = Registry::with_prefix("petrel_operator_reconcile");
        registry.register("runs", "Reconciles run, per CR kind", runs.clone());
        registry.register(
            "failures",
            "Reconciles that failed, per CR kind and error",
            failures.clone(),
        );
        registry.register(
            "duration_seconds",
            "Time one reconcile took, per CR kind",
            duration.clone(),
        );
        Self {
            registry: Arc::new(registry),
            runs,
            failures,
            duration,
        }
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

/// Records a reconcile's run and duration when dropped.
pub struct Measure {
    metrics: Metrics,
    kind: &'static str,
    started: Instant,
}

impl Drop for Measure {
    fn drop(&mut self) {
        let labels = KindLabels {
            kind: self.kind.to_owned(),
        };
        self.metrics.runs.get_or_create(&labels).inc();
        self.metrics
            .duration
            .get_or_create(&labels)
            .observe(self.started.elapsed().as_secs_f64());
    }
}

impl Metrics {
    /// Starts measuring one reconcile of `kind`.
    pub fn measure(&self, kind: &'static str) -> Measure {
        Measure {
            metrics: self.clone(),
            kind,
            started: Instant::now(),
        }
    }

    pub fn failed(&self, kind: &str, error: &'static str) {
        self.failures
            .get_or_create(&FailureLabels {
                kind: kind.to_owned(),
                error: error.to_owned(),
            })
            .inc();
    }

    /// OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Serves `/metrics`, `/healthz` (the process answers) and `/readyz` (`ready()` says the
/// caches are filled and reconciles run; 503 until then) until the process ends.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Metrics,
    ready: impl Fn() -> bool + Clone + Send + Sync + 'static,
) -> std::io::Result<()> {
    use axum::http::StatusCode;
    use axum::routing::get;
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        metrics.encode(),
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let ready = ready();
                async move {
                    if ready {
                        (StatusCode::OK, "ready\n")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "caches not filled yet\n")
                    }
                }
            }),
        );
    axum::serve(listener, app).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_failures_and_durations_are_counted_per_kind() {
        let metrics = Metrics::default();
        drop(metrics.measure("SmtpListener"));
        drop(metrics.measure("SmtpListener"));
        drop(metrics.measure("MailDomain"));
        metrics.failed("SmtpListener", "KubeError");
        let text = metrics.encode();
        assert!(
            text.contains("petrel_operator_reconcile_runs_total{kind=\"SmtpListener\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("petrel_operator_reconcile_runs_total{kind=\"MailDomain\"} 1"),
            "{text}"
        );
        assert!(text.contains(
            "petrel_operator_reconcile_failures_total{kind=\"SmtpListener\",error=\"KubeError\"} 1"
        ), "{text}");
        assert!(
            text.contains(
                "petrel_operator_reconcile_duration_seconds_count{kind=\"MailDomain\"} 1"
            ),
            "{text}"
        );
    }
}
