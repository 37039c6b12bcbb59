//! Turns what the SMTP/LMTP client reports, and every failure of delivery besides the
//! peer's reply ([`DeliveryError`]), into per-recipient [`Status`]es.
//!
//! Pure and exhaustive: one `match` over every [`ClientError`] variant and one over every
//! [`DeliveryError`] variant, with no `_` arm, so a new error kind cannot be classified by
//! accident. Temporary versus permanent comes from the reply class or the kind of failure,
//! never from reply text. This is the one place where this MTA chooses reply and enhanced
//! codes for delivery results; nothing parses them back out of text.

use super::classify;
use crate::queue::{Class, Diagnostic, Status};
use mta_client::{ClientError, Reply};

/// A delivery failure that is not the peer's reply. Each variant's doc gives the codes
/// it maps to in [`DeliveryError::status`]; its text is the diagnostic's text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryError {
    /// `550 5.1.3`: the recipient address has no domain.
    #[error("recipient address has no domain")]
    AddressWithoutDomain,
    /// `553 5.1.3`: the local part cannot name a Maildir folder.
    #[error("local part not acceptable for local delivery")]
    LocalPartNotAcceptable,
    /// `550 5.1.2`: the recipient domain does not exist.
    #[error("domain {domain} does not exist (NXDOMAIN)")]
    NoSuchDomain { domain: String },
    /// `556 5.1.10`: the domain publishes a null MX (RFC 7505).
    #[error("domain {domain} does not accept mail (null MX)")]
    NullMx { domain: String },
    /// `550 5.4.4`: no MX host of the domain has an address.
    #[error("no address for any MX host of {domain}")]
    NoMxAddress { domain: String },
    /// `451 4.4.4`: a host (smarthost) has no address.
    #[error("{host} has no address")]
    HostWithoutAddress { host: String },
    /// `451 4.4.4`: nothing to connect to.
    #[error("no host to connect to")]
    NoHost,
    /// `451 4.4.3`: a DNS lookup (or building the resolver) failed for now; `detail`
    /// says which.
    #[error("{detail}")]
    Dns { detail: String },
    /// `554 5.3.5`: a configured next hop is not usable as written.
    #[error("{detail}")]
    BadNextHop { detail: String },
    /// `451 4.3.5`: a file the configuration names cannot be read.
    #[error("{detail}")]
    LocalFile { detail: String },
    /// `451 4.7.5`: DANE (RFC 7672) forbids delivery now.
    #[error("DANE: {detail}")]
    Dane { detail: String },
    /// `451 4.7.5`: an MTA-STS policy (RFC 8461) forbids delivery now.
    #[error("MTA-STS: {detail}")]
    MtaSts { detail: String },
    /// `451 4.3.0`: this MTA failed (reading the spool, writing a Maildir, a task).
    #[error("{detail}")]
    Local { detail: String },
    /// `451 4.4.5`: the recipient's site is suspended after repeated throttling or
    /// connection failures ([`super::site`]); the mail stays queued.
    #[error(
        "site {site} suspended for {seconds}s after repeated throttling or connection failures; the message stays queued"
    )]
    SiteSuspended { site: String, seconds: u64 },
}

impl DeliveryError {
    /// The status of every recipient this error stands for.
    pub fn status(&self) -> Status {
        let text = self.to_string();
        match self {
            DeliveryError::AddressWithoutDomain => failed(550, [5, 1, 3], Class::BadMailbox, text),
            DeliveryError::LocalPartNotAcceptable => {
                failed(553, [5, 1, 3], Class::BadMailbox, text)
            }
            DeliveryError::NoSuchDomain { .. } => failed(550, [5, 1, 2], Class::BadDomain, text),
            DeliveryError::NullMx { .. } => failed(556, [5, 1, 10], Class::BadDomain, text),
            DeliveryError::NoMxAddress { .. } => failed(550, [5, 4, 4], Class::BadDomain, text),
            DeliveryError::HostWithoutAddress { .. } | DeliveryError::NoHost => {
                deferred(451, [4, 4, 4], Class::Dns, text)
            }
            DeliveryError::Dns { .. } => deferred(451, [4, 4, 3], Class::Dns, text),
            DeliveryError::BadNextHop { .. } => failed(554, [5, 3, 5], Class::Local, text),
            DeliveryError::LocalFile { .. } => deferred(451, [4, 3, 5], Class::Local, text),
            DeliveryError::Dane { .. } | DeliveryError::MtaSts { .. } => {
                deferred(451, [4, 7, 5], Class::Tls, text)
            }
            DeliveryError::Local { .. } => deferred(451, [4, 3, 0], Class::Local, text),
            DeliveryError::SiteSuspended { .. } => deferred(451, [4, 4, 5], Class::RateLimit, text),
        }
    }
}

impl From<DeliveryError> for Status {
    fn from(error: DeliveryError) -> Self {
        error.status()
    }
}

fn failed(code: u16, enhanced: [u8; 3], class: Class, text: String) -> Status {
    Status::Failed(Diagnostic::new(code, enhanced, text).with_class(class))
}

fn deferred(code: u16, enhanced: [u8; 3], class: Class, text: String) -> Status {
    Status::Deferred(Diagnostic::new(code, enhanced, text).with_class(class))
}

/// `250 2.0.0`: written into a local store.
pub fn delivered_locally(text: String) -> Status {
    Status::Delivered(Diagnostic::new(250, [2, 0, 0], text))
}

/// Why the queue gave up on a recipient that was still pending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GaveUp {
    /// `5.4.7`: `queue.max_age` passed.
    Expired,
    /// `5.0.0`: an operator bounced the message.
    Bounced,
}

/// The final status of a pending recipient the queue gives up on, naming the last
/// attempt's answer and keeping its class. No reply code: no peer said it (a DSN gives no
/// `Diagnostic-Code:`).
pub fn gave_up(why: GaveUp, last: &Status) -> Status {
    let (enhanced, reason) = match why {
        GaveUp::Expired => ([5, 4, 7], "message expired: delivery time limit exceeded"),
        GaveUp::Bounced => ([5, 0, 0], "message bounced by the postmaster"),
    };
    let text = match last {
        Status::Deferred(d) => format!("{reason} (last attempt: {d})"),
        Status::Scheduled | Status::Delivered(_) | Status::Failed(_) => reason.to_owned(),
    };
    Status::Failed(Diagnostic {
        code: None,
        enhanced: Some(enhanced),
        text,
        class: Some(
            last.diagnostic()
                .and_then(|d| d.class)
                .unwrap_or(Class::Other),
        ),
    })
}

/// The status of a recipient given its reply (RCPT reply, or the final reply after DATA),
/// classified ([`classify`]) when negative.
pub fn from_reply(reply: &Reply) -> Status {
    let mut diagnostic = Diagnostic {
        code: Some(reply.code),
        enhanced: reply.enhanced,
        text: reply.text.clone(),
        class: None,
    };
    if reply.is_positive() {
        return Status::Delivered(diagnostic);
    }
    let class = classify::classify(Some(reply.code), reply.enhanced, &reply.text);
    diagnostic.class = Some(class);
    let permanent = classify::is_permanent(Some(reply.code), reply.enhanced);
    if reply.is_permanent() || classify::never_retry(class, permanent) {
        // A 4xx whose enhanced code says 5.1.1 is a hard bad mailbox: never retried.
        Status::Failed(diagnostic)
    } else {
        // 4xx, and anything malformed, is retried.
        Status::Deferred(diagnostic)
    }
}

/// The status of every recipient of an attempt that failed as a whole.
pub fn from_error(error: &ClientError) -> Status {
    let text = error.to_string();
    match error {
        // The peer could not be reached or talked to: try again later.
        ClientError::Connect { .. }
        | ClientError::Timeout { .. }
        | ClientError::Io { .. }
        | ClientError::Protocol { .. } => deferred(451, [4, 4, 0], Class::Network, text),
        ClientError::Tls { .. } | ClientError::TlsUnavailable => {
            deferred(451, [4, 4, 0], Class::Tls, text)
        }
        // Our credentials or the peer's mechanisms: an operator must fix it; meanwhile the
        // mail waits (as Postfix does for SASL failures).
        ClientError::AuthFailed { .. } | ClientError::AuthUnavailable => {
            deferred(451, [4, 4, 0], Class::Local, text)
        }
        // The peer answered for the whole message: its reply class decides.
        ClientError::Rejected { reply, .. } => from_reply(reply),
        ClientError::MessageTooBig { .. } => failed(552, [5, 3, 4], Class::TooLarge, text),
        // RFC 6152: we do not downgrade 8-bit content to 7-bit.
        ClientError::EightBitUnsupported => failed(554, [5, 6, 3], Class::Other, text),
        // RFC 6531 §3.2: an SMTPUTF8 message cannot go to a peer without SMTPUTF8.
        ClientError::Smtputf8Unsupported => failed(553, [5, 6, 7], Class::Other, text),
    }
}

/// True when the peer could not give TLS (the handshake or its verification failed, or it
/// offers no STARTTLS). Exhaustive, like [`from_error`].
fn is_tls_failure(error: &ClientError) -> bool {
    match error {
        ClientError::Tls { .. } | ClientError::TlsUnavailable => true,
        ClientError::Connect { .. }
        | ClientError::Timeout { .. }
        | ClientError::Io { .. }
        | ClientError::Protocol { .. }
        | ClientError::AuthFailed { .. }
        | ClientError::AuthUnavailable
        | ClientError::Rejected { .. }
        | ClientError::MessageTooBig { .. }
        | ClientError::EightBitUnsupported
        | ClientError::Smtputf8Unsupported => false,
    }
}

/// [`from_error`] for a REQUIRETLS message (RFC 8689 §5): when the next hop cannot give
/// verified TLS the message fails for good instead of waiting for a plain-text route.
pub fn from_error_requiring_tls(error: &ClientError) -> Status {
    if is_tls_failure(error) {
        failed(
            550,
            [5, 7, 10],
            Class::Tls,
            format!("REQUIRETLS: no verified TLS to the next hop ({error})"),
        )
    } else {
        from_error(error)
    }
}

/// [`from_error`] for a connection an MTA-STS `enforce` policy governs (RFC 8461 §5): when
/// the MX host cannot give TLS verified for its name, the attempt is deferred with
/// `4.7.5` and never retried in plain text.
pub fn from_error_under_mta_sts(error: &ClientError, host: &str) -> Status {
    if is_tls_failure(error) {
        DeliveryError::MtaSts {
            detail: format!("no verified TLS to {host} ({error})"),
        }
        .status()
    } else {
        from_error(error)
    }
}

/// [`from_error`] for a connection DANE governs (RFC 7672 §2.2): when the MX host cannot
/// give TLS (matching its TLSA records, when it has usable ones), the attempt is deferred
/// with `4.7.5` and never retried in plain text.
pub fn from_error_under_dane(error: &ClientError, host: &str) -> Status {
    if is_tls_failure(error) {
        DeliveryError::Dane {
            detail: format!("no TLS matching the TLSA records of {host} ({error})"),
        }
        .status()
    } else {
        from_error(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn detail(status: &Status) -> (&'static str, String) {
        let line = status.diagnostic().map(|d| d.to_string());
        (status.state(), line.unwrap_or_default())
    }

    #[test]
    fn mta_sts_defers_tls_failures_with_4_7_5_and_leaves_the_rest_alone() {
        let tls = ClientError::Tls {
            cause: mta_client::TlsFailure::NotTrusted,
            detail: "invalid peer certificate: UnknownIssuer".into(),
        };
        let refused = ClientError::Connect {
            target: "127.0.0.1:25".into(),
            source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        };
        for (error, kind, prefix) in [
            (
                &tls,
                "deferred",
                "451 4.7.5 MTA-STS: no verified TLS to mx.example.com (",
            ),
            (
                &ClientError::TlsUnavailable,
                "deferred",
                "451 4.7.5 MTA-STS: no verified TLS to mx.example.com (peer does not offer",
            ),
            (&refused, "deferred", "451 4.4.0 cannot connect"),
            (&ClientError::EightBitUnsupported, "failed", "554 5.6.3 "),
        ] {
            let status = from_error_under_mta_sts(error, "mx.example.com");
            let (got_kind, got_detail) = detail(&status);
            assert_eq!(got_kind, kind, "{error}");
            assert!(got_detail.starts_with(prefix), "{got_detail}");
        }
    }
}
