//! Where a recipient stands ([`Status`]) and what the last answer about it was
//! ([`Diagnostic`]): a reply code, an RFC 3463 enhanced code and a text, as typed values.
//!
//! Owns the value and its spool form, nothing else. The codes in a diagnostic are chosen
//! where the answer is known (the peer's reply, or the table in
//! `delivery::outcome`) and are never parsed back out of text, with one exception:
//! statuses written before diagnostics were typed (`{"state": "failed", "detail": "550
//! 5.1.1 ..."}`) are read by splitting their `detail` once, at load ([`legacy_diagnostic`]).
//!
//! Spool form: the typed fields plus that one-line `detail`, so a spool (or a drain
//! hand-off) written by this version is still read by the previous one (rollback, rolling
//! update). Must never depend on delivery: it is below it in the pipeline.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Where a recipient stands. The same value drives the queue, the logs and DSNs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(from = "StatusRecord", into = "StatusRecord")]
pub enum Status {
    /// Not yet attempted, or due again.
    #[default]
    Scheduled,
    /// Handed over for good (`2xx`, or written into a Maildir).
    Delivered(Diagnostic),
    /// Failed for now; will be retried.
    Deferred(Diagnostic),
    /// Failed for good.
    Failed(Diagnostic),
}

impl Status {
    /// True when nothing more will be done for this recipient.
    pub fn is_final(&self) -> bool {
        matches!(self, Status::Delivered(_) | Status::Failed(_))
    }

    /// The last answer, `None` before the first attempt.
    pub fn diagnostic(&self) -> Option<&Diagnostic> {
        match self {
            Status::Delivered(d) | Status::Deferred(d) | Status::Failed(d) => Some(d),
            Status::Scheduled => None,
        }
    }

    /// `scheduled`, `delivered`, `deferred` or `failed` (the spool's `state`).
    pub fn state(&self) -> &'static str {
        match self {
            Status::Scheduled => "scheduled",
            Status::Delivered(_) => "delivered",
            Status::Deferred(_) => "deferred",
            Status::Failed(_) => "failed",
        }
    }
}

/// The answer about one recipient: from the peer (its reply) or from this MTA (a DNS
/// failure, an expired message...), in the same shape.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Diagnostic {
    /// The SMTP reply code; `None` for a verdict of this MTA that no reply stands for
    /// (expiry), which a DSN then gives without a `Diagnostic-Code:`.
    pub code: Option<u16>,
    /// The RFC 3463 enhanced status code, `[class, subject, detail]`.
    pub enhanced: Option<[u8; 3]>,
    /// The reply text (lines joined by `\n`), or this MTA's explanation.
    pub text: String,
    /// Why it failed (`delivery::classify`); `None` for deliveries, and for failures
    /// recorded before classes existed.
    pub class: Option<Class>,
}

/// Why a delivery failed, in a few words: a bounded set (it is a metrics label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    /// The mailbox does not exist, was disabled or moved.
    BadMailbox,
    /// The domain does not exist or takes no mail (NXDOMAIN, null MX).
    BadDomain,
    /// Over quota.
    MailboxFull,
    /// Refused by policy: spam or content filters, SPF/DKIM/DMARC, relaying, the sender.
    Policy,
    /// Our IP or domain is on a block list or has a poor reputation.
    Reputation,
    /// Too many connections, messages or recipients: slow down.
    RateLimit,
    /// Greylisting: come back in a few minutes.
    Greylisted,
    /// A DNS lookup failed.
    Dns,
    /// TLS could not be had as required (STARTTLS, DANE, MTA-STS, REQUIRETLS).
    Tls,
    /// The peer could not be reached or the connection failed.
    Network,
    /// The message is too large.
    TooLarge,
    /// This MTA's own trouble (spool, Maildir, configuration, credentials).
    Local,
    /// Anything else.
    Other,
}

impl Class {
    /// Every class, in declaration order.
    pub const ALL: [Class; 13] = [
        Class::BadMailbox,
        Class::BadDomain,
        Class::MailboxFull,
        Class::Policy,
        Class::Reputation,
        Class::RateLimit,
        Class::Greylisted,
        Class::Dns,
        Class::Tls,
        Class::Network,
        Class::TooLarge,
        Class::Local,
        Class::Other,
    ];

    /// The snake-case name: logs, metric labels, DSNs, the admin `show`.
    pub fn as_str(self) -> &'static str {
        match self {
            Class::BadMailbox => "bad_mailbox",
            Class::BadDomain => "bad_domain",
            Class::MailboxFull => "mailbox_full",
            Class::Policy => "policy",
            Class::Reputation => "reputation",
            Class::RateLimit => "rate_limit",
            Class::Greylisted => "greylisted",
            Class::Dns => "dns",
            Class::Tls => "tls",
            Class::Network => "network",
            Class::TooLarge => "too_large",
            Class::Local => "local",
            Class::Other => "other",
        }
    }
}

impl fmt::Display for Class {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What to do about a failure (`delivery::classify` explains the rules).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Disposition {
    /// Retrying will not help this recipient.
    Hard,
    /// The condition may clear, or is not the recipient's.
    Soft,
    /// The site asks us to send more slowly.
    Throttle,
}

impl Disposition {
    pub fn as_str(self) -> &'static str {
        match self {
            Disposition::Hard => "hard",
            Disposition::Soft => "soft",
            Disposition::Throttle => "throttle",
        }
    }
}

impl fmt::Display for Disposition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Diagnostic {
    /// A reply with both codes.
    pub fn new(code: u16, enhanced: [u8; 3], text: impl Into<String>) -> Self {
        Self {
            code: Some(code),
            enhanced: Some(enhanced),
            text: text.into(),
            class: None,
        }
    }

    /// The same, with its class.
    pub fn with_class(self, class: Class) -> Self {
        Self {
            class: Some(class),
            ..self
        }
    }

    /// The enhanced code as `class.subject.detail`.
    pub fn enhanced_code(&self) -> Option<String> {
        self.enhanced.map(|[a, b, c]| format!("{a}.{b}.{c}"))
    }
}

/// `550 5.1.1 text`, leaving out what is absent: the one-line form of logs, bounces, the
/// admin `show` and the spool's `detail`.
impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        if let Some(code) = self.code {
            write!(f, "{code}")?;
            first = false;
        }
        if let Some([a, b, c]) = self.enhanced {
            write!(f, "{}{a}.{b}.{c}", if first { "" } else { " " })?;
            first = false;
        }
        write!(f, "{}{}", if first { "" } else { " " }, self.text)
    }
}

/// The spool form of a [`Status`] (see the module doc).
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
enum StatusRecord {
    Scheduled,
    Delivered(DiagnosticRecord),
    Deferred(DiagnosticRecord),
    Failed(DiagnosticRecord),
}

#[derive(Serialize, Deserialize)]
struct DiagnosticRecord {
    /// The [`Diagnostic`]'s one-line form: all that versions before typed diagnostics
    /// wrote, and all they read.
    #[serde(default)]
    detail: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    code: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    enhanced: Option<String>,
    /// Present in every typed record (it tells them from old ones).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    class: Option<Class>,
}

impl From<Status> for StatusRecord {
    fn from(status: Status) -> Self {
        let record = |d: Diagnostic| DiagnosticRecord {
            detail: d.to_string(),
            code: d.code,
            enhanced: d.enhanced_code(),
            text: Some(d.text),
            class: d.class,
        };
        match status {
            Status::Scheduled => StatusRecord::Scheduled,
            Status::Delivered(d) => StatusRecord::Delivered(record(d)),
            Status::Deferred(d) => StatusRecord::Deferred(record(d)),
            Status::Failed(d) => StatusRecord::Failed(record(d)),
        }
    }
}

impl From<StatusRecord> for Status {
    fn from(record: StatusRecord) -> Self {
        let diagnostic = |r: DiagnosticRecord| match r.text {
            Some(text) => Diagnostic {
                code: r.code,
                enhanced: r.enhanced.as_deref().and_then(parse_enhanced),
                text,
                class: r.class,
            },
            None => legacy_diagnostic(&r.detail),
        };
        match record {
            StatusRecord::Scheduled => Status::Scheduled,
            StatusRecord::Delivered(r) => Status::Delivered(diagnostic(r)),
            StatusRecord::Deferred(r) => Status::Deferred(diagnostic(r)),
            StatusRecord::Failed(r) => Status::Failed(diagnostic(r)),
        }
    }
}

/// A `detail` written before diagnostics were typed: `[code] [enhanced] text`, as this
/// MTA always wrote it (`550 5.1.1 text`, `451 text`, `5.4.7 text`). The only place that
/// reads codes out of text; its [`Display`](fmt::Display) gives back the same line.
pub fn legacy_diagnostic(detail: &str) -> Diagnostic {
    let mut rest = detail;
    let mut code = None;
    if let Some((word, after)) = split_word(rest)
        && word.len() == 3
        && let Ok(value @ 200..=599) = word.parse::<u16>()
    {
        code = Some(value);
        rest = after;
    }
    let mut enhanced = None;
    if let Some((word, after)) = split_word(rest)
        && let Some(parsed) = parse_enhanced(word)
    {
        enhanced = Some(parsed);
        rest = after;
    }
    Diagnostic {
        code,
        enhanced,
        text: rest.to_owned(),
        class: None,
    }
}

/// The first word and what follows the one space after it (`None` without a space, so a
/// lone code stays text: the line must come back the same).
fn split_word(text: &str) -> Option<(&str, &str)> {
    text.split_once(' ')
}

/// `class.subject.detail` (RFC 3463 §2: class 2, 4 or 5, then up to three digits each).
fn parse_enhanced(word: &str) -> Option<[u8; 3]> {
    let mut parts = word.split('.');
    let (class, subject, detail) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || !matches!(class, "2" | "4" | "5") {
        return None;
    }
    let number = |p: &str| -> Option<u8> {
        if p.is_empty() || p.len() > 3 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        p.parse().ok()
    };
    Some([number(class)?, number(subject)?, number(detail)?])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_details_split_into_the_same_line() {
        for (detail, code, enhanced, text) in [
            (
                "550 5.1.1 <b@x>: user unknown",
                Some(550),
                Some([5, 1, 1]),
                "<b@x>: user unknown",
            ),
            ("451 try later", Some(451), None, "try later"),
            (
                "5.4.7 message expired (last attempt: 421 busy)",
                None,
                Some([5, 4, 7]),
                "message expired (last attempt: 421 busy)",
            ),
            (
                "556 5.1.10 domain x does not accept mail (null MX)",
                Some(556),
                Some([5, 1, 10]),
                "domain x does not accept mail (null MX)",
            ),
            ("250 2.0.0 ", Some(250), Some([2, 0, 0]), ""),
            ("no code at all", None, None, "no code at all"),
            ("", None, None, ""),
        ] {
            let d = legacy_diagnostic(detail);
            assert_eq!(
                (d.code, d.enhanced, d.text.as_str()),
                (code, enhanced, text),
                "{detail}"
            );
            assert_eq!(d.to_string(), detail);
        }
    }

    #[test]
    fn typed_records_round_trip_and_carry_the_old_detail() {
        let status = Status::Failed(Diagnostic::new(550, [5, 1, 1], "4.2.2 is not a code here"));
        let json = serde_json::to_value(&status).expect("serialise");
        assert_eq!(
            json,
            serde_json::json!({"state": "failed", "detail": "550 5.1.1 4.2.2 is not a code here",
                "code": 550, "enhanced": "5.1.1", "text": "4.2.2 is not a code here"})
        );
        let back: Status = serde_json::from_value(json).expect("deserialise");
        assert_eq!(back, status);
        let old: Status = serde_json::from_value(
            serde_json::json!({"state": "deferred", "detail": "451 4.7.1 greylisted"}),
        )
        .expect("old shape");
        assert_eq!(
            old,
            Status::Deferred(Diagnostic::new(451, [4, 7, 1], "greylisted"))
        );
        let scheduled: Status =
            serde_json::from_value(serde_json::json!({"state": "scheduled"})).expect("scheduled");
        assert_eq!(scheduled, Status::Scheduled);
    }
}
