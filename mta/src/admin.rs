//! The admin endpoint behind `petrel-mta queue …`: one JSON request per line in, one JSON
//! response per line out, on a loopback TCP address only (`admin.address`; validation
//! refuses anything else). Requests and responses are
//! [`AdminRequest`] / [`AdminResponse`]; the scheduler answers them.

use crate::context::Context;
use crate::queue::scheduler::{AdminRequest, AdminResponse};
use crate::shutdown::Shutdown;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// Longest request line accepted.
const MAX_REQUEST: u64 = 64 * 1024;

pub async fn serve(listener: TcpListener, ctx: Arc<Context>, mut shutdown: Shutdown) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.recv() => return,
        };
        match accepted {
            Ok((stream, peer)) if peer.ip().is_loopback() => {
                tokio::spawn(handle(stream, ctx.clone()));
            }
            Ok((_, peer)) => tracing::warn!(%peer, "admin: refused non-loopback client"),
            Err(e) => {
                tracing::warn!(error = %e, "admin: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn handle(stream: TcpStream, ctx: Arc<Context>) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(tokio::io::AsyncReadExt::take(read, MAX_REQUEST)).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let response = match serde_json::from_str::<AdminRequest>(&line) {
            Ok(request) => match ctx.scheduler.admin(request).await {
                Some(response) => serde_json::to_string(&response),
                None => Ok(r#"{"result":"error","message":"shutting down"}"#.to_owned()),
            },
            Err(e) => {
                Ok(serde_json::json!({"result": "error", "message": e.to_string()}).to_string())
            }
        };
        let Ok(mut text) = response else { return };
        text.push('\n');
        if write.write_all(text.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// Client side, for the CLI: sends one request and returns the response.
pub async fn request(
    address: std::net::SocketAddr,
    request: &AdminRequest,
) -> Result<AdminResponse, String> {
    let stream = TcpStream::connect(address).await.map_err(|e| {
        format!("cannot reach the admin endpoint at {address}: {e} (is petrel-mta running?)")
    })?;
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_string(request).map_err(|e| e.to_string())?;
    line.push('\n');
    write
        .write_all(line.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut reply = String::new();
    BufReader::new(read)
        .read_line(&mut reply)
        .await
        .map_err(|e| e.to_string())?;
    serde_json::from_str(&reply).map_err(|e| format!("bad response {reply:?}: {e}"))
}

/// Human-readable form of a response (the CLI's default output).
pub fn render(response: &AdminResponse) -> String {
    use crate::queue::Status;
    use std::fmt::Write;
    let mut out = String::new();
    let next = |at: Option<u64>| match at {
        Some(at) => crate::cleanup::rfc5322_date(at),
        None => "-".to_owned(),
    };
    match response {
        AdminResponse::List { messages } => {
            let _ = writeln!(
                out,
                "{:<16}  {:<7}  {:>8}  {:<31}  {:<30}  PENDING/ALL",
                "QUEUE ID", "STATE", "ATTEMPTS", "NEXT ATTEMPT", "SENDER"
            );
            for m in messages {
                let pending = m.recipients.iter().filter(|r| !r.status.is_final()).count();
                let sender = if m.sender.is_empty() { "<>" } else { &m.sender };
                let _ = writeln!(
                    out,
                    "{:<16}  {:<7}  {:>8}  {:<31}  {:<30}  {pending}/{}",
                    m.id.to_string(),
                    m.state,
                    m.attempts,
                    next(m.next_attempt_at),
                    sender,
                    m.recipients.len()
                );
            }
            let _ = writeln!(out, "{} message(s)", messages.len());
        }
        AdminResponse::Show { message: m } => {
            let _ = writeln!(out, "queue id:      {}", m.id);
            let _ = writeln!(out, "state:         {}", m.state);
            let _ = writeln!(out, "sender:        <{}>", m.sender);
            let _ = writeln!(
                out,
                "received:      {}",
                crate::cleanup::rfc5322_date(m.received_at)
            );
            let _ = writeln!(out, "attempts:      {}", m.attempts);
            let _ = writeln!(out, "next attempt:  {}", next(m.next_attempt_at));
            for r in &m.recipients {
                let (state, detail) = match &r.status {
                    Status::Scheduled => ("scheduled", ""),
                    Status::Delivered { detail } => ("delivered", detail.as_str()),
                    Status::Deferred { detail } => ("deferred", detail.as_str()),
                    Status::Failed { detail } => ("failed", detail.as_str()),
                };
                let via = r
                    .remote_mta
                    .as_deref()
                    .map(|host| format!(" (from {host})"))
                    .unwrap_or_default();
                let _ = writeln!(out, "  <{}>  {state}  {detail}{via}", r.address);
            }
        }
        AdminResponse::Done { affected } => {
            let _ = writeln!(out, "ok: {affected} message(s) affected");
        }
        AdminResponse::NotFound { id } => {
            let _ = writeln!(out, "no message {id} in the queue");
        }
    }
    out
}
