//! Every way a connection or a message can fail before per-recipient replies
//! exist, as one typed enum the delivery stage matches exhaustively.
//!
//! How petrel-mta is expected to classify them (the client itself never retries):
//! transport trouble (`Connect`, `Timeout`, `Io`, `Tls`, `Protocol`) defers the
//! whole attempt; `Rejected` and `AuthFailed` follow the reply's class (4xx
//! defers, 5xx fails); `TlsUnavailable` and `AuthUnavailable` are configuration
//! mismatches with this peer; `MessageTooBig` (5.3.4), `EightBitUnsupported`
//! (5.6.3) and `Smtputf8Unsupported` (5.6.7) are permanent for this message.

use std::fmt;
use std::io;
use std::time::Duration;

use crate::reply::Reply;

/// The protocol step a failure happened in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    Connect,
    Greeting,
    Ehlo,
    StartTls,
    Auth,
    Mail,
    Rcpt,
    Data,
    DataDone,
    Rset,
    Quit,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::Connect => "connect",
            Phase::Greeting => "greeting",
            Phase::Ehlo => "EHLO",
            Phase::StartTls => "STARTTLS",
            Phase::Auth => "AUTH",
            Phase::Mail => "MAIL",
            Phase::Rcpt => "RCPT",
            Phase::Data => "DATA",
            Phase::DataDone => "end of data",
            Phase::Rset => "RSET",
            Phase::Quit => "QUIT",
        })
    }
}

/// Why TLS with a peer failed, as far as the certificate check can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TlsFailure {
    /// The certificate does not name the server (rustls `NotValidForName`).
    HostMismatch,
    /// The certificate (or one of its chain) is expired or not yet valid.
    Expired,
    /// The chain leads to no trusted root, or a signature in it is bad, or the
    /// certificate is revoked or not for server authentication.
    NotTrusted,
    /// A verifier the caller supplied ([`crate::ClientConfig::rustls`], such as
    /// DANE's) refused the certificate for its own reasons.
    PolicyMismatch,
    /// The handshake failed otherwise: no common version or cipher, an alert from
    /// the peer, a malformed message or certificate.
    Handshake,
    /// Nothing was sent: the TLS configuration or the server name is not usable.
    Setup,
}

impl TlsFailure {
    /// The cause of a failed handshake, from the error tokio-rustls returns (an
    /// `io::Error` wrapping a `rustls::Error`).
    pub fn of_handshake(error: &io::Error) -> TlsFailure {
        match error
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            Some(rustls::Error::InvalidCertificate(cert)) => TlsFailure::of_certificate(cert),
            Some(_) | None => TlsFailure::Handshake,
        }
    }

    /// The cause for a certificate error of rustls (or of a verifier made with it).
    // The unit variants rustls deprecated are still what older verifiers return.
    #[allow(deprecated)]
    pub fn of_certificate(error: &rustls::CertificateError) -> TlsFailure {
        use rustls::CertificateError as E;
        match error {
            E::NotValidForName | E::NotValidForNameContext { .. } => TlsFailure::HostMismatch,
            E::Expired
            | E::ExpiredContext { .. }
            | E::NotValidYet
            | E::NotValidYetContext { .. } => TlsFailure::Expired,
            E::UnknownIssuer
            | E::BadSignature
            | E::UnsupportedSignatureAlgorithm
            | E::UnsupportedSignatureAlgorithmContext { .. }
            | E::UnsupportedSignatureAlgorithmForPublicKeyContext { .. }
            | E::Revoked
            | E::UnknownRevocationStatus
            | E::ExpiredRevocationList
            | E::ExpiredRevocationListContext { .. }
            | E::InvalidPurpose
            | E::InvalidPurposeContext { .. }
            | E::InvalidOcspResponse => TlsFailure::NotTrusted,
            E::ApplicationVerificationFailure | E::Other(_) => TlsFailure::PolicyMismatch,
            // rustls's enum is non-exhaustive: a new variant is a malformed or odd
            // certificate until it is named here.
            E::BadEncoding | E::UnhandledCriticalExtension | _ => TlsFailure::Handshake,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The TCP or unix-socket connect failed.
    #[error("cannot connect to {target}: {source}")]
    Connect {
        target: String,
        #[source]
        source: io::Error,
    },
    /// The peer did not answer (or did not read) within the phase's timeout.
    #[error("timed out after {after:?} in {phase}")]
    Timeout { phase: Phase, after: Duration },
    /// The connection broke (reset, closed by the peer, write error).
    #[error("connection lost in {phase}: {source}")]
    Io {
        phase: Phase,
        #[source]
        source: io::Error,
    },
    /// The TLS handshake or certificate verification failed, or the server name
    /// is not usable for TLS. `cause` says why, for reports (TLS-RPT, RFC 8460
    /// §4.3); `detail` is the text for people.
    #[error("TLS failure: {detail}")]
    Tls { cause: TlsFailure, detail: String },
    /// [`crate::TlsMode::Required`] or [`crate::TlsMode::Verified`] (or
    /// credentials that must not travel in the clear) but the peer does not
    /// offer STARTTLS.
    #[error("peer does not offer STARTTLS")]
    TlsUnavailable,
    /// The peer refused the whole message or session: greeting, EHLO/HELO/LHLO,
    /// STARTTLS, MAIL, DATA, or (SMTP) the reply after the final dot. Also used
    /// with a reply made up by this client (code 501) for a sender address that
    /// cannot be sent (contains CR, LF, `<` or `>`).
    #[error("{phase} rejected: {reply}")]
    Rejected { phase: Phase, reply: Reply },
    /// The peer sent something that is not an SMTP reply, or more than the
    /// reply size limit, or data it had no right to send (after STARTTLS).
    #[error("protocol violation in {phase}: {detail}")]
    Protocol { phase: Phase, detail: String },
    /// The peer rejected our credentials.
    #[error("authentication failed: {reply}")]
    AuthFailed { reply: Reply },
    /// Credentials are configured but the peer offers neither AUTH PLAIN nor AUTH LOGIN.
    #[error("peer offers no usable AUTH mechanism")]
    AuthUnavailable,
    /// The peer's SIZE limit is smaller than the message (RFC 1870; 5.3.4).
    #[error("message exceeds the peer's size limit of {limit} bytes")]
    MessageTooBig { limit: u64 },
    /// An 8-bit message and a peer without 8BITMIME (RFC 6152; 5.6.3). We do
    /// not downgrade to 7-bit: the message is returned to its sender.
    #[error("message has 8-bit content and the peer lacks 8BITMIME")]
    EightBitUnsupported,
    /// A message needing SMTPUTF8 and a peer without it (RFC 6531 3.2; 5.6.7).
    #[error("message needs SMTPUTF8 and the peer lacks it")]
    Smtputf8Unsupported,
}

impl ClientError {
    /// The phase the error belongs to, where it has one.
    pub fn phase(&self) -> Option<Phase> {
        match self {
            ClientError::Connect { .. } => Some(Phase::Connect),
            ClientError::Timeout { phase, .. }
            | ClientError::Io { phase, .. }
            | ClientError::Rejected { phase, .. }
            | ClientError::Protocol { phase, .. } => Some(*phase),
            ClientError::Tls { .. } | ClientError::TlsUnavailable => Some(Phase::StartTls),
            ClientError::AuthFailed { .. } | ClientError::AuthUnavailable => Some(Phase::Auth),
            ClientError::MessageTooBig { .. }
            | ClientError::EightBitUnsupported
            | ClientError::Smtputf8Unsupported => None,
        }
    }
}
