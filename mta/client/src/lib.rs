//! `mta-client`: the outbound SMTP (RFC 5321) and LMTP (RFC 2033) client used by
//! petrel-mta's delivery stage.
//!
//! One [`Connection`] is one session with one peer: [`Connection::connect`] does
//! the TCP or unix-socket connect, reads the greeting, says EHLO (HELO fallback,
//! LHLO for LMTP), negotiates STARTTLS according to [`TlsMode`], re-says EHLO and
//! authenticates when [`ClientConfig::auth`] is set. [`Connection::send`] then
//! delivers messages one at a time (PIPELINING when offered) and returns one
//! [`Reply`] per recipient; [`Connection::reset`] and [`Connection::quit`] reuse
//! and close the session.
//!
//! Outcomes are typed so that the caller classifies them with one exhaustive
//! `match` on [`ClientError`] and, per recipient, on [`Reply::is_positive`] /
//! [`Reply::is_transient`] / [`Reply::is_permanent`]; nothing here asks the
//! caller to look at reply text.
//!
//! ```no_run
//! # async fn demo() -> Result<(), mta_client::ClientError> {
//! use mta_client::*;
//! let config = ClientConfig::new("mta.example.net"); // SMTP, opportunistic TLS
//! let target = Target::Tcp("192.0.2.25:25".parse().unwrap());
//! let mut conn = Connection::connect(&target, "mx.example.org", &config).await?;
//! let to = [OutboundRecipient::new("user@example.org")];
//! let replies = conn
//!     .send(&OutboundMessage::new("sender@example.net", &to, b"Subject: hi\r\n\r\nhello\r\n"))
//!     .await?;
//! for reply in &replies {
//!     match (reply.is_positive(), reply.is_transient()) {
//!         (true, _) => { /* delivered */ }
//!         (false, true) => { /* defer this recipient */ }
//!         (false, false) => { /* bounce this recipient */ }
//!     }
//! }
//! conn.quit().await;
//! # Ok(()) }
//! ```
//!
//! Flow of the modules: [`config`] (what the caller asks for) → `stream`
//! (plain or TLS bytes) → `reply` (bounded reply reader, on `smtp-proto`) →
//! [`capabilities`] (EHLO keywords) → `envelope` (MAIL/RCPT parameters,
//! dot-stuffing) → [`connection`] (the session) with [`error`] for every failure.

pub mod capabilities;
pub mod config;
pub mod connection;
mod envelope;
pub mod error;
pub mod message;
mod reply;
mod stream;
mod tls;

pub use capabilities::Capabilities;
pub use config::{ClientConfig, Credentials, Target, Timeouts, TlsMode};
pub use connection::Connection;
pub use error::{ClientError, Phase, TlsFailure};
pub use message::{OutboundMessage, OutboundRecipient};
pub use reply::Reply;
pub use stream::MaybeTls;

/// The rustls configuration [`TlsMode::Verified`] uses: Mozilla's roots plus
/// `extra_roots_pem`, on the `ring` provider. Shared with the delivery stage's other TLS
/// client (the MTA-STS policy fetch), so both trust exactly the same roots.
pub fn verified_tls_config(
    extra_roots_pem: Option<&[u8]>,
) -> Result<std::sync::Arc<rustls::ClientConfig>, String> {
    tls::verified_config(extra_roots_pem)
}
