//! What a queued message is: its [`QueueId`], its [`Envelope`] (sender, recipients and the
//! ESMTP parameters that travel with them) and the per-recipient [`Status`].
//!
//! These types are written into the spool exactly as they are (JSON inside a checksummed
//! record), so a restart rebuilds every message and every recipient's state from the spool
//! alone. Changing a field here changes the on-disk format: add fields with
//! `#[serde(default)]` only.

pub mod inbox;
pub mod schedule;
mod status;

pub use status::{Class, Diagnostic, Disposition, Status};

use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// A message's identity for its whole life in this MTA: in the `250` reply, the logs, the
/// `Received:` header and the Maildir file name.
///
/// It is the microsecond time of acceptance, made strictly increasing within a process and
/// across restarts (the spool hands out ids above the largest one it recovered), so ids
/// sort by arrival. Printed as 16 upper-case hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct QueueId(pub u64);

impl fmt::Display for QueueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016X}", self.0)
    }
}

impl std::str::FromStr for QueueId {
    type Err = std::num::ParseIntError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        u64::from_str_radix(s, 16).map(QueueId)
    }
}

/// Hands out [`QueueId`]s: never twice, never going backwards.
#[derive(Debug)]
pub struct QueueIdGenerator {
    last: AtomicU64,
}

impl QueueIdGenerator {
    /// Starts above `floor` (the largest id recovered from the spool).
    pub fn new(floor: u64) -> Self {
        Self {
            last: AtomicU64::new(floor),
        }
    }

    pub fn next(&self) -> QueueId {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        let mut last = self.last.load(Ordering::Relaxed);
        loop {
            let candidate = now.max(last + 1);
            match self.last.compare_exchange_weak(
                last,
                candidate,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return QueueId(candidate),
                Err(actual) => last = actual,
            }
        }
    }
}

/// `BODY=` of MAIL FROM (RFC 6152).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BodyType {
    #[default]
    SevenBit,
    EightBitMime,
}

/// DSN `RET=` (RFC 3461 §4.3): how much of the message a bounce returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DsnReturn {
    Full,
    Headers,
}

/// DSN `NOTIFY=` (RFC 3461 §4.1) for one recipient. `never` is all flags false.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DsnNotify {
    pub success: bool,
    pub failure: bool,
    pub delay: bool,
}

/// Everything the client said about a message besides its content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// Reverse path; empty for the null sender `<>` (bounces, which are never bounced).
    pub sender: String,
    pub recipients: Vec<Recipient>,
    /// What the client announced with `SIZE=`, 0 when absent.
    #[serde(default)]
    pub declared_size: u64,
    #[serde(default)]
    pub body: BodyType,
    /// The client asked for `SMTPUTF8` (RFC 6531).
    #[serde(default)]
    pub smtputf8: bool,
    /// DSN `RET=`, when given.
    #[serde(default)]
    pub dsn_ret: Option<DsnReturn>,
    /// DSN `ENVID=`, when given (xtext-decoded).
    #[serde(default)]
    pub dsn_envid: Option<String>,
    /// The client's address and the name it gave in EHLO/HELO, for logs and bounces.
    pub client_ip: IpAddr,
    pub helo: String,
    /// Seconds since the epoch when the message was accepted.
    pub received_at: u64,
    /// Delivery attempts so far (rounds over all pending recipients).
    #[serde(default)]
    pub attempts: u32,
    /// Seconds since the epoch of the next attempt; 0 means "as soon as possible".
    #[serde(default)]
    pub next_attempt_at: u64,
    /// On hold: no attempts until released by an operator.
    #[serde(default)]
    pub held: bool,
    /// A delay notice has been sent for this message.
    #[serde(default)]
    pub delay_notified: bool,
    /// MAIL FROM had REQUIRETLS (RFC 8689): relay only over verified TLS.
    #[serde(default)]
    pub require_tls: bool,
    /// W3C `traceparent` of the reception span, so delivery attempts (even after a
    /// restart, on another pod) join the message's trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_parent: Option<String>,
    /// Seconds since the epoch when the message expires, when it came from a peer (issue
    /// 16): the lifetime its first MTA gave it travels with it. `None`: `received_at`
    /// plus this MTA's `queue.max_age`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    /// Where a message handed over by a draining peer came from. Stored in the same
    /// record as the message, so the receiver still recognises a resend after a crash
    /// between its store and its origins log (see `drain::origins`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handoff_origin: Option<HandoffOrigin>,
    /// The peer (`host:port`) this message is being handed to by a drain, written before
    /// the request leaves, so after a crash the message goes to that peer again (which
    /// recognises it) rather than to a second one (which would deliver it again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handoff_peer: Option<String>,
    /// The spool identity of that peer, when it told: a peer pod that comes back at
    /// another address is still the one to ask (see `drain::offer`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handoff_peer_spool: Option<String>,
}

/// The identity of a handed-over message at the pod that first queued it: unique in the
/// fleet because queue ids are unique within a spool and `spool` names the spool.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandoffOrigin {
    /// The sending pod's name (informational: a Job draining a left-behind volume runs
    /// under another name but the same spool).
    pub pod: String,
    /// The sending spool's identity (random, written once into the spool directory).
    pub spool: String,
    /// The queue id there.
    pub id: String,
}

impl Envelope {
    /// A fresh envelope: no recipients yet, 7-bit, no DSN or TLS requests, never attempted.
    pub fn new(sender: impl Into<String>, client_ip: IpAddr, helo: impl Into<String>) -> Self {
        Self {
            sender: sender.into(),
            recipients: Vec::new(),
            declared_size: 0,
            body: BodyType::SevenBit,
            smtputf8: false,
            dsn_ret: None,
            dsn_envid: None,
            client_ip,
            helo: helo.into(),
            received_at: 0,
            attempts: 0,
            next_attempt_at: 0,
            held: false,
            delay_notified: false,
            require_tls: false,
            trace_parent: None,
            expires_at: None,
            handoff_origin: None,
            handoff_peer: None,
            handoff_peer_spool: None,
        }
    }
}

impl Recipient {
    /// A recipient not yet attempted, without DSN parameters.
    pub fn new(address: impl Into<String>) -> Self {
        Self {
            address: address.into(),
            notify: None,
            orcpt: None,
            status: Status::Scheduled,
            remote_mta: None,
        }
    }
}

/// One recipient and its delivery state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recipient {
    pub address: String,
    /// DSN `NOTIFY=`; `None` means the client did not say (RFC 3461: failure and delay).
    #[serde(default)]
    pub notify: Option<DsnNotify>,
    /// DSN `ORCPT=`: the original recipient address, decoded from `rfc822;xtext`.
    #[serde(default)]
    pub orcpt: Option<String>,
    #[serde(default)]
    pub status: Status,
    /// The host that gave the last attempt's answer for this recipient (a bounce's
    /// `Remote-MTA`); `None` when no host was reached or delivery is local.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_mta: Option<String>,
}

/// Splits `local@domain` at the last `@`. `None` for addresses without a domain.
pub fn split_address(address: &str) -> Option<(&str, &str)> {
    let at = address.rfind('@')?;
    Some((&address[..at], &address[at + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_ids_strictly_increase_and_round_trip() {
        let generator = QueueIdGenerator::new(u64::MAX / 2);
        let a = generator.next();
        let b = generator.next();
        assert!(b > a);
        assert_eq!(
            a.0,
            u64::MAX / 2 + 1,
            "floor from the spool wins over the clock"
        );
        let text = a.to_string();
        assert_eq!(text.len(), 16);
        assert_eq!(text.parse::<QueueId>().ok(), Some(a));
    }

    #[test]
    fn split_address_uses_last_at() {
        assert_eq!(split_address("a@b@c.test"), Some(("a@b", "c.test")));
        assert_eq!(split_address("postmaster"), None);
    }
}
