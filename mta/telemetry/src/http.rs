//! The observability HTTP port, separate from SMTP: `/metrics`, `/healthz`, `/readyz`.
//!
//! * `/metrics`: the [`MtaMetrics`] registry in the text exposition format.
//! * `/healthz`: `200 ok` while the process can answer at all (the liveness probe).
//! * `/readyz`: `200 ready` when [`Readiness::check`] says so, otherwise `503` with the
//!   reason as plain text (the readiness probe: listeners bound, spool writable, config
//!   valid, not draining; the MTA decides, this module only asks).

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::MtaMetrics;

/// The content type of [`MtaMetrics::encode_prometheus`].
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Whether the process is ready to take traffic. Called on every `/readyz` request, so
/// it should be cheap (read flags the MTA maintains, do not probe the disk here).
pub trait Readiness: Send + Sync + 'static {
    /// `Ok(())` when ready, otherwise why not, in a few words (`"draining"`,
    /// `"spool not writable: ..."`).
    fn check(&self) -> Result<(), String>;
}

impl<F> Readiness for F
where
    F: Fn() -> Result<(), String> + Send + Sync + 'static,
{
    fn check(&self) -> Result<(), String> {
        self()
    }
}

#[derive(Clone)]
struct AppState {
    metrics: MtaMetrics,
    readiness: Arc<dyn Readiness>,
}

/// Serves the observability endpoints on `listener` until `shutdown` completes.
pub async fn serve_http(
    listener: tokio::net::TcpListener,
    metrics: MtaMetrics,
    readiness: Arc<dyn Readiness>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(metrics, readiness))
        .with_graceful_shutdown(shutdown)
        .await
}

/// The routes, for callers that want to add their own or serve them differently.
pub fn router(metrics: MtaMetrics, readiness: Arc<dyn Readiness>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(AppState { metrics, readiness })
}

async fn metrics_handler(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)],
        state.metrics.encode_prometheus(),
    )
        .into_response()
}

async fn readyz(State(state): State<AppState>) -> Response {
    match state.readiness.check() {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()).into_response(),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// One HTTP/1.1 GET over a fresh connection: (status, content type, body).
    async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String, String) {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut raw = String::new();
        stream.read_to_string(&mut raw).await.expect("read");
        let (head, body) = raw.split_once("\r\n\r\n").expect("a header block");
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("a status");
        let content_type = head
            .lines()
            .find_map(|l| l.strip_prefix("content-type: "))
            .unwrap_or_default()
            .to_string();
        (status, content_type, body.to_string())
    }

    #[tokio::test]
    async fn endpoints_follow_the_readiness_callback() {
        let metrics = MtaMetrics::new();
        metrics.session_started();
        let state: Arc<Mutex<Result<(), String>>> = Arc::new(Mutex::new(Ok(())));
        let probe = state.clone();
        let readiness = move || {
            probe
                .lock()
                .map(|s| s.clone())
                .unwrap_or_else(|_| Err("poisoned".into()))
        };

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_http(
            listener,
            metrics.clone(),
            Arc::new(readiness),
            async {
                let _ = stop_rx.await;
            },
        ));

        assert_eq!(get(addr, "/healthz").await.0, 200);
        let (status, _, body) = get(addr, "/readyz").await;
        assert_eq!((status, body.as_str()), (200, "ready\n"));

        *state.lock().expect("lock") = Err("draining".into());
        let (status, _, body) = get(addr, "/readyz").await;
        assert_eq!((status, body.as_str()), (503, "not ready: draining\n"));
        assert_eq!(get(addr, "/healthz").await.0, 200, "alive while not ready");

        *state.lock().expect("lock") = Ok(());
        assert_eq!(get(addr, "/readyz").await.0, 200);

        let (status, content_type, body) = get(addr, "/metrics").await;
        assert_eq!(status, 200);
        assert_eq!(content_type, METRICS_CONTENT_TYPE);
        assert!(
            body.contains("# TYPE petrel_mta_smtp_sessions counter\n"),
            "{body}"
        );
        assert!(
            body.contains("\npetrel_mta_smtp_sessions_total 1\n"),
            "{body}"
        );
        assert!(body.ends_with("# EOF\n"));

        assert_eq!(get(addr, "/nope").await.0, 404);

        stop_tx.send(()).expect("server running");
        server.await.expect("join").expect("serve");
    }
}
