//! Delivery status notifications (RFC 3464 `multipart/report; report-type=delivery-status`):
//! bounces for failed recipients, delay notices, and success reports for `NOTIFY=SUCCESS`.
//!
//! A notice is a new message from the null sender `<>` to the original sender, stored in
//! the spool and queued like any other message. Rules:
//! * Never notify the null sender (a bounce is never bounced). Its failures are logged and,
//!   when `queue.postmaster` is set, reported there instead.
//! * Only recipients whose NOTIFY asks for that kind of notice are reported (RFC 3461 §4.1;
//!   the default is failure and delay).
//! * RET=HDRS returns only the original header, RET=FULL (or no RET) the whole message.
//! * The notice is stored durably *before* the original leaves the spool, and the two
//!   records are ordered in the log, so a crash never loses both.
//!
//! The same per-recipient [`Status`] that drove the queue gives `Action:` and `Status:`.

use crate::context::Context;
use crate::queue::{DsnReturn, Envelope, QueueId, Recipient, Status, schedule};
use mta_config::MtaConfig;
use std::fmt::Write;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// Which notice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Recipients failed for good.
    Failure,
    /// Recipients are still being retried.
    Delay,
    /// Recipients that asked (NOTIFY=SUCCESS) were delivered.
    Success,
}

/// The message leaves the queue: send the notices its recipients call for, then remove it.
pub fn retire(ctx: &Arc<Context>, id: QueueId, envelope: Envelope) {
    let ctx = ctx.clone();
    tokio::spawn(async move {
        for kind in [Kind::Failure, Kind::Success] {
            notify(&ctx, id, &envelope, kind).await;
        }
        let mut bounced = false;
        for recipient in &envelope.recipients {
            if let Status::Failed(diagnostic) = &recipient.status {
                let class = diagnostic.class.map(|c| c.as_str()).unwrap_or_default();
                tracing::warn!(queue_id = %id, to = %mta_telemetry::Escaped(&recipient.address), detail = %diagnostic, class, "bounced");
                bounced = true;
            }
        }
        if bounced {
            ctx.metrics.message_bounced();
        }
        ctx.spool.remove_detached(id);
    });
}

/// Sends one notice about a message that stays queued (delay notices).
pub fn send_notice(ctx: &Arc<Context>, id: QueueId, envelope: Envelope, kind: Kind) {
    let ctx = ctx.clone();
    tokio::spawn(async move { notify(&ctx, id, &envelope, kind).await });
}

async fn notify(ctx: &Arc<Context>, id: QueueId, envelope: &Envelope, kind: Kind) {
    let reported: Vec<&Recipient> = envelope
        .recipients
        .iter()
        .filter(|r| wants(r, kind))
        .collect();
    if reported.is_empty() {
        return;
    }
    let config = ctx.config();
    let to = if envelope.sender.is_empty() {
        match (&config.queue.postmaster, kind) {
            (Some(postmaster), Kind::Failure) => postmaster.clone(),
            _ => {
                tracing::warn!(queue_id = %id, ?kind, "not notifying the null sender");
                return;
            }
        }
    } else {
        envelope.sender.clone()
    };
    let original = match ctx.spool.read_message(id).await {
        Ok(original) => original,
        Err(e) => {
            tracing::error!(queue_id = %id, error = %e, "cannot read message for its notice");
            return;
        }
    };
    let now = unix_now();
    let notice_id = ctx.spool.next_id();
    let content = build(
        &config, envelope, &reported, kind, &original, notice_id, now,
    );
    let notice = notice_envelope(&config, envelope, to, now);
    match crate::cleanup::store_notice(ctx, &config, notice_id, notice, &content).await {
        Ok(()) => {
            tracing::info!(queue_id = %id, notice_id = %notice_id, ?kind, "delivery status notification queued");
        }
        Err(e) => tracing::error!(queue_id = %id, error = %e, "cannot store notice"),
    }
}

/// Whether this recipient is reported in a notice of this kind.
fn wants(recipient: &Recipient, kind: Kind) -> bool {
    let notify = schedule::notify(recipient);
    match (&recipient.status, kind) {
        (Status::Failed(_), Kind::Failure) => notify.failure,
        (Status::Deferred(_) | Status::Scheduled, Kind::Delay) => notify.delay,
        (Status::Delivered(_), Kind::Success) => notify.success,
        _ => false,
    }
}

fn notice_envelope(config: &MtaConfig, original: &Envelope, to: String, now: u64) -> Envelope {
    let mut recipient = Recipient::new(to);
    // A notice about a notice is never wanted.
    recipient.notify = Some(crate::queue::DsnNotify::default());
    Envelope {
        recipients: vec![recipient],
        // An 8-bit original returned in full makes the notice 8-bit too.
        body: original.body,
        smtputf8: original.smtputf8,
        received_at: now,
        ..Envelope::new("", std::net::IpAddr::from([127, 0, 0, 1]), &config.hostname)
    }
}

/// Builds the notice message (RFC 3464 §2).
pub fn build(
    config: &MtaConfig,
    envelope: &Envelope,
    recipients: &[&Recipient],
    kind: Kind,
    original: &[u8],
    notice_id: QueueId,
    now: u64,
) -> Vec<u8> {
    let host = &config.hostname;
    let boundary = format!("{notice_id}/{host}");
    let (subject, action, intro) = match kind {
        Kind::Failure => (
            "Undelivered Mail Returned to Sender",
            "failed",
            "Your message could not be delivered to one or more recipients.\r\nIt has been returned below.",
        ),
        Kind::Delay => (
            "Delayed Mail (still being retried)",
            "delayed",
            "Your message has not been delivered yet to the recipients below.\r\nDelivery will be retried; you do not need to send it again.",
        ),
        Kind::Success => (
            "Successful Mail Delivery Report",
            "delivered",
            "Your message was delivered to the recipients below.",
        ),
    };
    let date = crate::dates::rfc5322_date(now);
    let mut out = String::new();
    let _ = write!(
        out,
        "From: Mail Delivery System <MAILER-DAEMON@{host}>\r\n\
         To: <{to}>\r\n\
         Subject: {subject}\r\n\
         Date: {date}\r\n\
         Message-ID: <{notice_id}@{host}>\r\n\
         Auto-Submitted: auto-replied\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: multipart/report; report-type=delivery-status;\r\n\
         \tboundary=\"{boundary}\"\r\n\
         \r\n\
         This is a MIME-encapsulated message.\r\n\
         \r\n\
         --{boundary}\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\
         \r\n\
         This is the mail system at {host}.\r\n\
         \r\n\
         {intro}\r\n\
         \r\n",
        to = if envelope.sender.is_empty() {
            "postmaster"
        } else {
            &envelope.sender
        },
    );
    for r in recipients {
        let _ = write!(out, "<{}>: {}\r\n", r.address, detail(&r.status));
    }
    let _ = write!(
        out,
        "\r\n--{boundary}\r\n\
         Content-Type: message/delivery-status\r\n\
         \r\n\
         Reporting-MTA: dns; {host}\r\n"
    );
    if let Some(envid) = &envelope.dsn_envid {
        let _ = write!(out, "Original-Envelope-Id: {envid}\r\n");
    }
    let _ = write!(
        out,
        "Arrival-Date: {}\r\n",
        crate::dates::rfc5322_date(envelope.received_at)
    );
    for r in recipients {
        let _ = write!(out, "\r\nFinal-Recipient: rfc822; {}\r\n", r.address);
        if let Some(orcpt) = &r.orcpt {
            let _ = write!(out, "Original-Recipient: rfc822; {orcpt}\r\n");
        }
        let _ = write!(
            out,
            "Action: {action}\r\nStatus: {}\r\n",
            status_code(&r.status)
        );
        if let Some(host) = &r.remote_mta {
            let _ = write!(out, "Remote-MTA: dns; {host}\r\n");
        }
        if let Some(diagnostic) = r.status.diagnostic()
            && diagnostic.code.is_some()
        {
            let _ = write!(out, "Diagnostic-Code: smtp; {diagnostic}\r\n");
        }
        // An extension field (RFC 3464 §3.3: `X-` names are for private use).
        if let Some(verdict) = crate::delivery::classify::verdict(&r.status) {
            let _ = write!(
                out,
                "X-Petrel-Class: {}; {}\r\n",
                verdict.class, verdict.disposition
            );
        }
        if kind == Kind::Delay {
            let until = schedule::expires_at_ms(&config.queue, envelope.received_at) / 1000;
            let _ = write!(
                out,
                "Will-Retry-Until: {}\r\n",
                crate::dates::rfc5322_date(until)
            );
        }
    }
    let returned = match envelope.dsn_ret {
        Some(DsnReturn::Headers) => header_of(original),
        Some(DsnReturn::Full) | None => original,
    };
    let part_type = if returned.len() < original.len() {
        "text/rfc822-headers"
    } else {
        "message/rfc822"
    };
    let _ = write!(out, "\r\n--{boundary}\r\nContent-Type: {part_type}\r\n\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(returned);
    if !returned.ends_with(b"\r\n") {
        bytes.extend_from_slice(b"\r\n");
    }
    bytes.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    bytes
}

/// The one-line answer about a recipient, for the human-readable part.
fn detail(status: &Status) -> String {
    match status.diagnostic() {
        Some(diagnostic) => diagnostic.to_string(),
        None => "not yet attempted".to_owned(),
    }
}

/// The RFC 3463 code of a status: its enhanced code when it has one, otherwise the
/// class's generic code.
pub fn status_code(status: &Status) -> String {
    if let Some(code) = status.diagnostic().and_then(|d| d.enhanced_code()) {
        return code;
    }
    match status {
        Status::Delivered(_) => "2.0.0",
        Status::Failed(_) => "5.0.0",
        Status::Deferred(_) | Status::Scheduled => "4.0.0",
    }
    .to_owned()
}

/// The header section of a message, up to and including the blank line.
fn header_of(message: &[u8]) -> &[u8] {
    match memchr::memmem::find(message, b"\r\n\r\n") {
        Some(pos) => &message[..pos + 4],
        None => message,
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests;
