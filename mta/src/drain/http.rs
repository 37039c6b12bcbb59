//! The fleet's endpoints on the HTTP port (`http.address`, beside `/metrics` and
//! `/readyz`), for the operator and for draining peers:
//!
//! | request | answer |
//! |---|---|
//! | `POST /admin/drain` `{"peers": ["host:port", …], "deliver_for_secs": 30}` | `202 {"state": …}`; `400 {"error": …}` for a malformed body or peer |
//! | `GET /admin/drain` | `200` [`Report`]: `{"state", "left", "delivered", "handed_off", "marker", "peers", "error"?, "spool"}` (`spool`: this spool's identity, by which a draining peer recognises this MTA at a new address) |
//! | `DELETE /admin/drain` | `200 {"state": "serving"}`: drain cancelled, marker removed |
//! | `POST /admin/handoff` [`handoff::Request`] | `200 {"stored": true}`; `200 {"stored": false, "duplicate": true}`; `409` draining; `400` malformed; `503` not stored (spool); `413` too large |
//!
//! They exist only while `admin.fleet_token_file` is set (`404` otherwise) and answer only
//! requests bearing that file's token (`Authorization: Bearer …`, `401` otherwise); see
//! [`token`](super::token). Errors are `{"error": "…"}`.
//!
//! Never: answers `200` to a hand-over before the message and its origin are on stable
//! storage; answers one of the "nothing stored" statuses (`400`, `409`, `413`, `503`)
//! after storing; lets a client that hangs up interrupt a store (it runs in a task of its
//! own).

use super::token::Refusal;
use super::{Drain, Plan, Received, Report, handoff};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use std::sync::Arc;

/// The drain endpoint's path.
pub const DRAIN_PATH: &str = "/admin/drain";

/// Largest hand-over body: a message of `max_message_size` in base64 (4/3), plus what we
/// add to a message (trace header, signature) and the envelope.
pub fn body_limit(max_message_size: u64) -> usize {
    let limit = max_message_size
        .saturating_mul(4)
        .div_ceil(3)
        .saturating_add(4 * 1024 * 1024);
    usize::try_from(limit).unwrap_or(usize::MAX)
}

/// The routes, to merge into the observability router.
pub fn router(drain: Arc<Drain>) -> Router {
    let limit = body_limit(drain.config().smtpd.max_message_size);
    Router::new()
        .route(
            DRAIN_PATH,
            get(drain_status).post(drain_start).delete(drain_cancel),
        )
        .route(
            handoff::PATH,
            post(receive).layer(DefaultBodyLimit::max(limit)),
        )
        .with_state(drain)
}

fn json(status: StatusCode, value: &impl serde::Serialize) -> Response {
    (status, axum::Json(value)).into_response()
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    json(status, &serde_json::json!({ "error": message.into() }))
}

/// The token check, first thing in every handler: the answer when the request is not let
/// in.
fn refusal(drain: &Drain, headers: &HeaderMap) -> Option<Response> {
    let config = drain.config();
    let authorization = headers.get(header::AUTHORIZATION).map(|v| v.as_bytes());
    match drain
        .token()
        .admit(config.admin.fleet_token_file.as_deref(), authorization)
    {
        Ok(()) => None,
        Err(Refusal::NotConfigured) => Some(StatusCode::NOT_FOUND.into_response()),
        Err(Refusal::Unauthorised) => Some(error(
            StatusCode::UNAUTHORIZED,
            "wrong or missing fleet token",
        )),
    }
}

async fn drain_status(State(drain): State<Arc<Drain>>, headers: HeaderMap) -> Response {
    if let Some(refused) = refusal(&drain, &headers) {
        return refused;
    }
    let report: Report = drain.report().await;
    json(StatusCode::OK, &report)
}

async fn drain_start(State(drain): State<Arc<Drain>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(refused) = refusal(&drain, &headers) {
        return refused;
    }
    let plan: Plan = match serde_json::from_slice(&body) {
        Ok(plan) => plan,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("drain request: {e}")),
    };
    match drain.start(plan).await {
        Ok(state) => json(StatusCode::ACCEPTED, &serde_json::json!({ "state": state })),
        Err(e) => error(StatusCode::BAD_REQUEST, e),
    }
}

async fn drain_cancel(State(drain): State<Arc<Drain>>, headers: HeaderMap) -> Response {
    if let Some(refused) = refusal(&drain, &headers) {
        return refused;
    }
    match drain.cancel().await {
        Ok(state) => json(StatusCode::OK, &serde_json::json!({ "state": state })),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

async fn receive(State(drain): State<Arc<Drain>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(refused) = refusal(&drain, &headers) {
        return refused;
    }
    let opened = serde_json::from_slice::<handoff::Request>(&body)
        .map_err(|e| e.to_string())
        .and_then(handoff::Request::open);
    drop(body);
    let (origin, envelope, content) = match opened {
        Ok(opened) => opened,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("hand-over: {e}")),
    };
    // To completion even if the client hangs up: store, origin, queue.
    let task = tokio::spawn(async move { drain.receive(origin, envelope, content).await });
    match task.await {
        Ok(Received::Stored(_)) => json(
            StatusCode::OK,
            &handoff::Answer {
                stored: true,
                duplicate: false,
            },
        ),
        Ok(Received::Duplicate) => json(
            StatusCode::OK,
            &handoff::Answer {
                stored: false,
                duplicate: true,
            },
        ),
        Ok(Received::Draining) => error(StatusCode::CONFLICT, "draining: takes no hand-overs"),
        Ok(Received::NotStored(e)) => error(StatusCode::SERVICE_UNAVAILABLE, e),
        // The task died: whether it stored is unknown, and 500 says so to the sender.
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}
