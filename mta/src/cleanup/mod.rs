//! After the end of DATA: checks the content, stamps the `Received:` header and stores the
//! message durably. The only writer of new messages into the spool (Postfix's cleanup).
//!
//! A session hands each finished message to its [`Cleanup`] handle ([`Cleanup::accept`]),
//! which returns the queue id only once the message is stored; the session then says
//! `250`. Any failure maps to a reply from the table and nothing is queued. The server's
//! sessions use [`Cleanup::Spool`]: stored means synced to the spool volume, then queued.
//! Session tests and the fuzz harness use `Cleanup::Memory` (built only for tests and with
//! the `memory-cleanup` feature), which runs the same checks, stamping and signing and
//! keeps the result in a `Memory` instead of the spool and the queue. The store (and so
//! the queueing) is the only step where the two differ.
//!
//! Notices this MTA writes ([`store_notice`]: delivery status notifications and mailed
//! TLS-RPT reports) come in here too, and so do messages a draining peer hands over
//! ([`store_handed_off`], issue 16), through the same spool store. A notice is built by
//! this MTA, so there is nothing to check or stamp, but it is DKIM-signed as
//! [`Cleanup::accept`] signs: with the keys for its From domain, when it leaves this MTA
//! (RFC 8460 §5.3 wants mailed reports signed; a DSN to a remote sender is signed too when
//! a key covers its From domain). A handed-over message is stored as it is: it is mail the
//! fleet has already accepted, checked, stamped and signed, so doing any of that again
//! would change it. (The queue manager and the drain write status records for messages
//! already in the spool; only this module puts a message there.)
//!
//! Never answers the client itself, and never reports a message accepted before it is on
//! stable storage: [`Cleanup::Spool`] returns the id, and queues the message, only after
//! the spool's store returned.

use crate::context::Context;
use crate::queue::{Envelope, QueueId};
use crate::reply::Reply;
use crate::spool;
use mta_config::MtaConfig;
use std::time::{SystemTime, UNIX_EPOCH};

#[cfg(any(test, feature = "memory-cleanup"))]
mod memory;
#[cfg(any(test, feature = "memory-cleanup"))]
pub use memory::{Accepted, Memory};

/// How a message arrived, as far as cleanup cares.
pub struct Arrival<'a> {
    /// `with` of the Received header (see [`protocol_name`]).
    pub protocol: String,
    /// Skip inbound checks (authenticated client or trusted network).
    pub exempt: bool,
    /// Header lines decided earlier in the session (e.g. a DNSBL tag).
    pub extra_headers: &'a str,
}

/// Where a session's finished messages go. Cheap to clone; chosen when the session is
/// built (`Session::with_cleanup`), [`Cleanup::Spool`] unless a test says otherwise.
#[derive(Debug, Clone, Default)]
pub enum Cleanup {
    /// Into the spool, synced, then queued: what the server uses.
    #[default]
    Spool,
    /// Kept in memory, never queued: session tests and the fuzz harness, which test the
    /// SMTP dialogue and need no disk I/O per message.
    #[cfg(any(test, feature = "memory-cleanup"))]
    Memory(std::sync::Arc<Memory>),
}

impl Cleanup {
    /// Checks, stamps, signs and stores one message. Returns its queue id only once it is
    /// stored: for [`Cleanup::Spool`], synced to the spool volume and then queued.
    pub async fn accept(
        &self,
        ctx: &Context,
        config: &MtaConfig,
        arrival: &Arrival<'_>,
        envelope: &mut Envelope,
        content: &[u8],
    ) -> Result<QueueId, Reply> {
        let began = std::time::Instant::now();
        if content.len() as u64 > config.smtpd.max_message_size {
            return Err(Reply::MESSAGE_TOO_BIG);
        }
        if has_bare_line_ending(content) {
            return Err(Reply::BARE_LINE_ENDING);
        }
        let verified = if arrival.exempt {
            None
        } else {
            let facts = mta_auth::InboundFacts {
                client_ip: envelope.client_ip,
                helo: &envelope.helo,
                mail_from: &envelope.sender,
                authserv_id: &config.hostname,
            };
            crate::checks::verify(ctx, config, &facts, content).await?
        };
        let (content, auth_headers) = match &verified {
            Some(v) => (v.content.as_slice(), v.headers.as_str()),
            None => (content, ""),
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        envelope.received_at = now;
        // Stored with the message, so the hold outlives restarts and config changes until
        // an operator releases it.
        envelope.held = config.queue.hold_all;
        envelope.trace_parent = mta_telemetry::spans::traceparent(&tracing::Span::current());
        let id = ctx.spool.next_id();
        let header = received_header(config, &arrival.protocol, envelope, id, now);
        // Newest first: our signature, our verdicts, our trace header, then the message.
        let signature = ctx
            .signer()
            .map(|signer| crate::signing::sign(&signer, config, envelope, content))
            .unwrap_or_default();
        let message: [&[u8]; 5] = [
            signature.as_bytes(),
            auth_headers.as_bytes(),
            arrival.extra_headers.as_bytes(),
            header.as_bytes(),
            content,
        ];
        match self {
            Self::Spool => ctx.spool.store(id, envelope, &message).await,
            #[cfg(any(test, feature = "memory-cleanup"))]
            Self::Memory(memory) => memory.store(id, envelope, &message),
        }
        .map_err(|e| spool_reply(&e))?;
        ctx.metrics
            .message_accepted(content.len() as u64, began.elapsed());
        tracing::info!(
            queue_id = %id,
            from = %envelope.sender,
            recipients = envelope.recipients.len(),
            size = content.len(),
            client = %envelope.client_ip,
            "received"
        );
        match self {
            Self::Spool => ctx.scheduler.enqueue(id, envelope.clone()),
            // Nothing in the spool to deliver: the test reads what was kept.
            #[cfg(any(test, feature = "memory-cleanup"))]
            Self::Memory(_) => {}
        }
        Ok(id)
    }
}

/// A message a draining peer hands over, stored durably (synced) with its envelope as the
/// peer had it: arrival time, attempts, next attempt, expiry, hold and each recipient's
/// state. Not checked, stamped or signed again. It is not queued yet: the caller first
/// records where it came from, then [`Stored::enqueue`]s it, so it cannot be delivered
/// (and leave the spool) before its origin is on record.
pub async fn store_handed_off(
    ctx: &Context,
    envelope: Envelope,
    content: &[u8],
) -> Result<Stored, spool::Error> {
    let id = ctx.spool.next_id();
    ctx.spool.store(id, &envelope, &[content]).await?;
    let origin = envelope.handoff_origin.as_ref();
    tracing::info!(
        queue_id = %id,
        from = %envelope.sender,
        recipients = envelope.recipients.len(),
        size = content.len(),
        origin_pod = origin.map(|o| o.pod.as_str()).unwrap_or("-"),
        origin_id = origin.map(|o| o.id.as_str()).unwrap_or("-"),
        "received from a draining peer"
    );
    Ok(Stored { id, envelope })
}

/// A notice this MTA wrote (a delivery status notification, RFC 3464, or a TLS-RPT report,
/// RFC 8460 §5.3), stored durably under `id`, then queued. Built here, so nothing is
/// checked or stamped; it is DKIM-signed as [`Cleanup::accept`] signs (with the keys for
/// its From domain, when it leaves this MTA), the signature prepended. Notices come in here
/// like every other new message, as Postfix posts bounces through its cleanup.
pub async fn store_notice(
    ctx: &Context,
    config: &MtaConfig,
    id: QueueId,
    envelope: Envelope,
    content: &[u8],
) -> Result<(), spool::Error> {
    let signature = ctx
        .signer()
        .map(|signer| crate::signing::sign(&signer, config, &envelope, content))
        .unwrap_or_default();
    ctx.spool
        .store(id, &envelope, &[signature.as_bytes(), content])
        .await?;
    ctx.scheduler.enqueue(id, envelope);
    Ok(())
}

/// A handed-over message on stable storage, not queued yet.
#[must_use = "a stored message must be queued"]
#[derive(Debug)]
pub struct Stored {
    id: QueueId,
    envelope: Envelope,
}

impl Stored {
    pub fn id(&self) -> QueueId {
        self.id
    }

    /// Hands the message to the scheduler.
    pub fn enqueue(self, ctx: &Context) -> QueueId {
        ctx.scheduler.enqueue(self.id, self.envelope);
        self.id
    }
}

/// The reply for a failed store (STYLE A.3: full → 452 4.3.1, shut down → 421 4.3.2).
pub fn spool_reply(error: &spool::Error) -> Reply {
    tracing::error!(error = %error, "spool store failed");
    match error {
        spool::Error::Full => Reply::SPOOL_FULL,
        spool::Error::Closed => Reply::SHUTTING_DOWN,
        spool::Error::Io(_)
        | spool::Error::NotFound(_)
        | spool::Error::Corrupt { .. }
        | spool::Error::InUse { .. } => Reply::SPOOL_ERROR,
    }
}

/// The `with` protocol of a `Received:` header: SMTP or ESMTP, `S` for TLS, `A` for AUTH
/// (RFC 3848), `UTF8` prefix for SMTPUTF8 (RFC 6531).
pub fn protocol_name(extended: bool, tls: bool, authenticated: bool, smtputf8: bool) -> String {
    if !extended {
        return "SMTP".into();
    }
    let mut name = String::from(if smtputf8 { "UTF8ESMTP" } else { "ESMTP" });
    if tls {
        name.push('S');
    }
    if authenticated {
        name.push('A');
    }
    name
}

/// True when a CR is not followed by LF, or an LF is not preceded by CR.
pub fn has_bare_line_ending(content: &[u8]) -> bool {
    let mut prev = 0u8;
    for (i, &b) in content.iter().enumerate() {
        match b {
            b'\n' if prev != b'\r' => return true,
            b'\r' if content.get(i + 1) != Some(&b'\n') => return true,
            _ => {}
        }
        prev = b;
    }
    false
}

/// RFC 5321 §4.4 trace header; `with` is the protocol name from RFC 3848 / RFC 6531.
fn received_header(
    config: &MtaConfig,
    with: &str,
    envelope: &Envelope,
    id: QueueId,
    now: u64,
) -> String {
    let ip = match envelope.client_ip {
        std::net::IpAddr::V4(ip) => ip.to_string(),
        std::net::IpAddr::V6(ip) => format!("IPv6:{ip}"),
    };
    let for_clause = match envelope.recipients.as_slice() {
        [only] => format!("\r\n\tfor <{}>", only.address),
        _ => String::new(),
    };
    format!(
        "Received: from {helo} ([{ip}])\r\n\tby {host} (Petrel) with {with} id {id}{for_clause};\r\n\t{date}\r\n",
        helo = trace_name(&envelope.helo),
        host = config.hostname,
        date = crate::dates::rfc5322_date(now),
    )
}

/// The EHLO/HELO argument as it may appear in `Received:`. The client chooses it, and
/// smtp-proto takes any bytes up to the end of the line (spaces, `(`, `;`, control
/// characters, invalid UTF-8 shown as U+FFFD), which could forge the rest of the trace
/// header (`from x (y [10.0.0.1]) by trusted.host …`). Only what a domain name uses is
/// kept (letters and digits of any script, `.-_`), plus `:` and the enclosing brackets of
/// an address literal (`[192.0.2.1]`, `[IPv6:…]`); every other character becomes `?`, and
/// the name is cut at 255 characters (RFC 5321 §4.5.3.1.2).
fn trace_name(helo: &str) -> String {
    const MAX: usize = 255;
    let literal = helo.len() > 2 && helo.starts_with('[') && helo.ends_with(']');
    let last = helo.chars().count().saturating_sub(1);
    helo.chars()
        .enumerate()
        .take(MAX)
        .map(|(i, c)| {
            let kept = c.is_alphanumeric()
                || matches!(c, '.' | '-' | '_')
                || (literal && (c == ':' || (c == '[' && i == 0) || (c == ']' && i == last)));
            if kept { c } else { '?' }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::Spool;

    /// Issue 13, item 10: the EHLO argument cannot shape the `Received:` header.
    #[test]
    fn trace_name_table() {
        let long = "a".repeat(300);
        let cases: &[(&str, &str)] = &[
            ("mail.example.test", "mail.example.test"),
            ("[192.0.2.1]", "[192.0.2.1]"),
            ("[IPv6:2001:db8::1]", "[IPv6:2001:db8::1]"),
            ("bücher.example", "bücher.example"),
            (
                "x (trusted [10.0.0.1]) by mx",
                "x??trusted??10.0.0.1???by?mx",
            ),
            ("a;b", "a?b"),
            ("evil\x1b[31mred", "evil??31mred"),
            ("tab\there", "tab?here"),
            ("bad\u{fffd}utf8", "bad?utf8"),
            ("<script>", "?script?"),
            (&long, &long[..255]),
        ];
        for (helo, expected) in cases {
            assert_eq!(trace_name(helo), *expected, "{helo:?}");
        }
    }

    /// A notice is DKIM-signed as accepted mail is: with the key for its From domain, when
    /// it leaves this MTA; stored as it is otherwise. Stored first, then queued.
    #[tokio::test]
    async fn notices_are_signed_when_they_leave() {
        use crate::queue::Recipient;
        use crate::queue::inbox::{Command, SchedulerHandle};
        use base64::Engine;

        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = MtaConfig::embedded_default();
        config.spool.path = dir.path().join("spool");
        let (spool, _) = Spool::open(&config.spool.path, 1 << 20).expect("spool");
        let (handle, mut jobs) = SchedulerHandle::channel();
        let ctx = Context::new(config.clone(), spool, handle, None, None);
        let pkcs8 =
            ring::signature::Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
                .expect("key");
        let pem = format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            base64::engine::general_purpose::STANDARD.encode(pkcs8.as_ref())
        );
        let key = mta_auth::SigningKey::from_pem("notices.test", "n1", pem.as_bytes())
            .expect("signing key");
        ctx.set_signer(Some(mta_auth::Signer::new(vec![key])));

        // (From domain, recipient, signed): example.test is local in the default config.
        for (from, to, signed) in [
            ("notices.test", "someone@remote.test", true),
            ("notices.test", "someone@example.test", false),
            ("unkeyed.test", "someone@remote.test", false),
        ] {
            let content = format!(
                "From: <reports@{from}>\r\nTo: <{to}>\r\nSubject: a notice\r\n\r\nbody\r\n"
            );
            let mut envelope = Envelope::new("", [127, 0, 0, 1].into(), "mx.petrel.test");
            envelope.recipients.push(Recipient::new(to.to_owned()));
            let id = ctx.spool.next_id();
            store_notice(&ctx, &config, id, envelope, content.as_bytes())
                .await
                .expect("stored");
            match jobs.try_recv() {
                Ok(Command::Enqueue { id: queued, .. }) => assert_eq!(queued, id),
                other => panic!("expected the notice queued, got {other:?}"),
            }
            let stored = ctx.spool.read_message(id).await.expect("in the spool");
            let stored = String::from_utf8(stored).expect("utf-8");
            assert!(stored.ends_with(&content), "{from} to {to}: {stored}");
            let head = &stored[..stored.len() - content.len()];
            if signed {
                assert!(
                    head.starts_with("DKIM-Signature:"),
                    "{from} to {to}: {stored}"
                );
                assert!(
                    head.contains("d=notices.test") && head.contains("s=n1"),
                    "{head}"
                );
            } else {
                assert_eq!(head, "", "{from} to {to}");
            }
        }
    }

    #[test]
    fn bare_line_endings() {
        for (content, bare) in [
            (&b"a\r\nb\r\n"[..], false),
            (b"", false),
            (b"a\nb\r\n", true),
            (b"a\rb\r\n", true),
            (b"a\r\n.\r\nMAIL FROM:<x>\n", true),
            (b"a\r", true),
            (b"\n", true),
        ] {
            assert_eq!(has_bare_line_ending(content), bare, "{content:?}");
        }
    }
}
