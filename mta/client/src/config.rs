//! What the caller asks of a connection: where to connect, how to greet, the TLS
//! policy, optional credentials and one timeout per protocol phase.
//!
//! These types are deliberately serde-free: petrel-mta maps its `MtaConfig`
//! route settings onto them.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Where the peer listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A TCP address (an MX's A/AAAA record with port 25, a smarthost, an LMTP host).
    Tcp(SocketAddr),
    /// A unix stream socket (local LMTP, e.g. Dovecot's `lmtp` socket).
    Unix(PathBuf),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Tcp(addr) => write!(f, "{addr}"),
            Target::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// STARTTLS policy (RFC 3207).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsMode {
    /// Never use TLS, even when offered. Credentials may then be sent in the clear.
    None,
    /// Use STARTTLS when the peer offers it, accepting any certificate; stay in
    /// plain text only when STARTTLS is not offered. A STARTTLS that is offered but
    /// refused, or a handshake that fails, is an error (the caller may retry with
    /// [`TlsMode::None`]).
    #[default]
    Opportunistic,
    /// STARTTLS must succeed (any certificate is accepted); no STARTTLS offered is
    /// [`crate::ClientError::TlsUnavailable`].
    Required,
    /// STARTTLS must succeed and the certificate must chain to a trusted root
    /// (Mozilla's roots plus [`ClientConfig::extra_roots_pem`]) and match the
    /// server name given to [`crate::Connection::connect`].
    Verified,
}

/// One timeout per phase. [`Default`] gives the RFC 5321 section 4.5.3.2 values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP or unix-socket connect (not in RFC 5321; 30 s).
    pub connect: Duration,
    /// Initial 220 greeting (RFC 5321 4.5.3.2.1: 5 minutes).
    pub greeting: Duration,
    /// EHLO/HELO/LHLO reply (5 minutes, like MAIL).
    pub ehlo: Duration,
    /// STARTTLS reply and the TLS handshake (5 minutes).
    pub starttls: Duration,
    /// Each AUTH exchange step (5 minutes).
    pub auth: Duration,
    /// MAIL reply (RFC 5321 4.5.3.2.2: 5 minutes).
    pub mail: Duration,
    /// Each RCPT reply (RFC 5321 4.5.3.2.3: 5 minutes).
    pub rcpt: Duration,
    /// The 354 reply to DATA (RFC 5321 4.5.3.2.4: 2 minutes).
    pub data_init: Duration,
    /// Each write of a block of message content (RFC 5321 4.5.3.2.5: 3 minutes).
    pub data_block: Duration,
    /// The reply after the final `.` (RFC 5321 4.5.3.2.6: 10 minutes); for LMTP,
    /// each per-recipient reply.
    pub data_done: Duration,
    /// RSET reply (5 minutes).
    pub rset: Duration,
    /// QUIT reply (RFC 5321 does not say; 30 s, as it is only a courtesy).
    pub quit: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        const MIN: u64 = 60;
        Self {
            connect: Duration::from_secs(30),
            greeting: Duration::from_secs(5 * MIN),
            ehlo: Duration::from_secs(5 * MIN),
            starttls: Duration::from_secs(5 * MIN),
            auth: Duration::from_secs(5 * MIN),
            mail: Duration::from_secs(5 * MIN),
            rcpt: Duration::from_secs(5 * MIN),
            data_init: Duration::from_secs(2 * MIN),
            data_block: Duration::from_secs(3 * MIN),
            data_done: Duration::from_secs(10 * MIN),
            rset: Duration::from_secs(5 * MIN),
            quit: Duration::from_secs(30),
        }
    }
}

impl Timeouts {
    /// Every phase gets the same timeout; handy in tests.
    pub fn uniform(timeout: Duration) -> Self {
        Self {
            connect: timeout,
            greeting: timeout,
            ehlo: timeout,
            starttls: timeout,
            auth: timeout,
            mail: timeout,
            rcpt: timeout,
            data_init: timeout,
            data_block: timeout,
            data_done: timeout,
            rset: timeout,
            quit: timeout,
        }
    }
}

/// AUTH PLAIN / LOGIN credentials (RFC 4954, RFC 4616).
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Everything [`crate::Connection::connect`] needs besides the target and server name.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Our name in EHLO/HELO/LHLO.
    pub helo_name: String,
    /// Speak LMTP (LHLO, one reply per recipient after the data) instead of SMTP.
    pub lmtp: bool,
    pub tls: TlsMode,
    /// Extra PEM CA certificates trusted by [`TlsMode::Verified`] in addition to
    /// the built-in Mozilla roots (private CAs, tests).
    pub extra_roots_pem: Option<Vec<u8>>,
    /// Authenticate after EHLO (and after TLS unless `tls` is [`TlsMode::None`]).
    pub auth: Option<Credentials>,
    pub timeouts: Timeouts,
    /// A caller-made rustls configuration that [`TlsMode::Verified`] uses instead of the
    /// built-in one (roots plus `extra_roots_pem`): its certificate verifier decides.
    /// The delivery stage makes one per connection for DANE (RFC 7672), carrying that
    /// host's TLSA records, with session resumption off.
    pub rustls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

impl ClientConfig {
    /// SMTP, opportunistic TLS, no credentials, RFC timeouts.
    pub fn new(helo_name: impl Into<String>) -> Self {
        Self {
            helo_name: helo_name.into(),
            lmtp: false,
            tls: TlsMode::Opportunistic,
            extra_roots_pem: None,
            auth: None,
            timeouts: Timeouts::default(),
            rustls: None,
        }
    }
}
