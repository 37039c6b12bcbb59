//! Turns what the SMTP/LMTP client reports into per-recipient [`Status`]es.
//!
//! Pure and exhaustive: one `match` over every [`ClientError`] variant, with no `_` arm, so
//! a new error kind cannot be classified by accident. Temporary versus permanent comes
//! from the reply class or the kind of failure, never from reply text.

use crate::queue::Status;
use mta_client::{ClientError, Reply};

/// The status of a recipient given its reply (RCPT reply, or the final reply after DATA).
pub fn from_reply(reply: &Reply) -> Status {
    let detail = describe(reply);
    if reply.is_positive() {
        Status::Delivered { detail }
    } else if reply.is_permanent() {
        Status::Failed { detail }
    } else {
        // 4xx, and anything malformed, is retried.
        Status::Deferred { detail }
    }
}

/// The status of every recipient of an attempt that failed as a whole.
pub fn from_error(error: &ClientError) -> Status {
    let detail = error.to_string();
    match error {
        // The peer could not be reached or talked to: try again later.
        ClientError::Connect { .. }
        | ClientError::Timeout { .. }
        | ClientError::Io { .. }
        | ClientError::Tls { .. }
        | ClientError::TlsUnavailable
        | ClientError::Protocol { .. }
        // Our credentials or the peer's mechanisms: an operator must fix it; meanwhile the
        // mail waits (as Postfix does for SASL failures).
        | ClientError::AuthFailed { .. }
        | ClientError::AuthUnavailable => Status::Deferred {
            detail: format!("451 4.4.0 {detail}"),
        },
        // The peer answered for the whole message: its reply class decides.
        ClientError::Rejected { reply, .. } => from_reply(reply),
        ClientError::MessageTooBig { .. } => Status::Failed {
            detail: format!("552 5.3.4 {detail}"),
        },
        // RFC 6152: we do not downgrade 8-bit content to 7-bit.
        ClientError::EightBitUnsupported => Status::Failed {
            detail: format!("554 5.6.3 {detail}"),
        },
        // RFC 6531 §3.2: an SMTPUTF8 message cannot go to a peer without SMTPUTF8.
        ClientError::Smtputf8Unsupported => Status::Failed {
            detail: format!("553 5.6.7 {detail}"),
        },
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
        Status::Failed {
            detail: format!("550 5.7.10 REQUIRETLS: no verified TLS to the next hop ({error})"),
        }
    } else {
        from_error(error)
    }
}

/// [`from_error`] for a connection an MTA-STS `enforce` policy governs (RFC 8461 §5): when
/// the MX host cannot give TLS verified for its name, the attempt is deferred with
/// `4.7.5` and never retried in plain text.
pub fn from_error_under_mta_sts(error: &ClientError, host: &str) -> Status {
    if is_tls_failure(error) {
        Status::Deferred {
            detail: format!("451 4.7.5 MTA-STS: no verified TLS to {host} ({error})"),
        }
    } else {
        from_error(error)
    }
}

/// [`from_error`] for a connection DANE governs (RFC 7672 §2.2): when the MX host cannot
/// give TLS (matching its TLSA records, when it has usable ones), the attempt is deferred
/// with `4.7.5` and never retried in plain text.
pub fn from_error_under_dane(error: &ClientError, host: &str) -> Status {
    if is_tls_failure(error) {
        Status::Deferred {
            detail: format!("451 4.7.5 DANE: no TLS matching the TLSA records of {host} ({error})"),
        }
    } else {
        from_error(error)
    }
}

fn describe(reply: &Reply) -> String {
    match reply.enhanced {
        Some([a, b, c]) => format!("{} {a}.{b}.{c} {}", reply.code, reply.text),
        None => format!("{} {}", reply.code, reply.text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn detail(status: &Status) -> (&'static str, &str) {
        match status {
            Status::Delivered { detail } => ("delivered", detail),
            Status::Deferred { detail } => ("deferred", detail),
            Status::Failed { detail } => ("failed", detail),
            Status::Scheduled => ("scheduled", ""),
        }
    }

    #[test]
    fn mta_sts_defers_tls_failures_with_4_7_5_and_leaves_the_rest_alone() {
        let tls = ClientError::Tls {
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
