//! Bounce classification: the [`Class`] of a peer's negative reply (why it failed) and its
//! [`Disposition`] (what to do about it), from one rule table.
//!
//! Owns the rules and nothing else: pure functions of a reply's code, enhanced code and
//! text, with no I/O and no state. It must never decide whether a status is temporary or
//! permanent (the reply class does that, in `outcome`), except for the one rule below.
//! Failures this MTA diagnoses itself (DNS, TLS policy, its own files) get their class
//! where their codes are chosen, in `outcome`, not from here.
//!
//! Rules, first match wins:
//! 1. An enhanced status code whose meaning is unambiguous in practice (RFC 3463, RFC
//!    7372, RFC 7505 and the registry): `X.1.1` bad mailbox, `X.2.2` mailbox full, `X.3.4`
//!    too large, `X.7.23` SPF failed... ([`by_enhanced`]).
//! 2. Text patterns for well-known provider phrasings (greylisting, rate limits, block
//!    lists, SPF/DKIM/DMARC, quota, unknown users...), case-insensitive, most specific
//!    class first ([`RULES`]). Generic codes (`X.0.0`, `X.7.0`, `X.7.1`, `X.2.1`, `X.1.10`
//!    which some providers use for "recipient not found"...) are used for everything, so
//!    the text decides for them.
//! 3. The generic code's hint when the text said nothing (`X.7.1` policy, `X.4.x`
//!    network...).
//! 4. The reply code (`421` network, `551`/`553` bad mailbox, `552` too large).
//! 5. [`Class::Other`].
//!
//! Disposition ([`disposition`]): *hard* means retrying will not help this recipient
//! (a permanent bad mailbox or domain, a message refused as it is); *soft* means the
//! condition may clear or is not the recipient's (a full mailbox, a greylist, an IP on a
//! block list); *throttle* means the site asks us to send more slowly (too many
//! connections, a rate limit, a temporary reputation deferral). A reply is *permanent*
//! when its code is `5xx` or its enhanced code's class is `5`.
//!
//! The one rule that changes what is retried: a **hard bad mailbox or bad domain is never
//! retried**. A `5xx` already fails; a `4xx` whose enhanced code is `5.1.1` (a server
//! contradicting itself, RFC 3463 §2 wants both classes to agree) fails too. A `4xx` that
//! only *says* the user is unknown (`450 4.1.1 ... User unknown`, often a directory
//! lookup that failed) is temporary by RFC 5321 §4.2.1 and is retried as before.

use crate::queue::{Class, Disposition, Status};

/// A failure's class and what to do about it: what delivery code (and the adaptive
/// throttling to come) asks about a status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub class: Class,
    pub disposition: Disposition,
}

impl Verdict {
    /// The site asked us to slow down (421/451 "too many connections", "rate limited"...).
    pub fn is_throttle(&self) -> bool {
        self.disposition == Disposition::Throttle
    }
}

/// The verdict on a deferred or failed status; `None` for one delivered or not yet
/// attempted. A failure recorded before classes existed is classified now.
pub fn verdict(status: &Status) -> Option<Verdict> {
    let diagnostic = match status {
        Status::Deferred(d) | Status::Failed(d) => d,
        Status::Scheduled | Status::Delivered(_) => return None,
    };
    let class = diagnostic
        .class
        .unwrap_or_else(|| classify(diagnostic.code, diagnostic.enhanced, &diagnostic.text));
    let permanent =
        matches!(status, Status::Failed(_)) || is_permanent(diagnostic.code, diagnostic.enhanced);
    Some(Verdict {
        class,
        disposition: disposition(class, permanent),
    })
}

/// The class of a peer's reply: `code` is the reply code, `enhanced` its RFC 3463 code.
pub fn classify(code: Option<u16>, enhanced: Option<[u8; 3]>, text: &str) -> Class {
    let by_code = enhanced.map(by_enhanced);
    if let Some(Enhanced::Sure(class)) = by_code {
        return class;
    }
    let lower = text.to_ascii_lowercase();
    if let Some((class, _)) = RULES
        .iter()
        .find(|(_, patterns)| patterns.iter().any(|p| lower.contains(p)))
    {
        return *class;
    }
    if let Some(Enhanced::Hint(class)) = by_code {
        return class;
    }
    match code {
        Some(421) => Class::Network,
        Some(551 | 553) => Class::BadMailbox,
        Some(552) => Class::TooLarge,
        _ => Class::Other,
    }
}

/// A reply is permanent when its code is `5xx` or its enhanced code's class is `5`.
pub fn is_permanent(code: Option<u16>, enhanced: Option<[u8; 3]>) -> bool {
    code.is_some_and(|c| (500..600).contains(&c)) || enhanced.is_some_and(|[class, ..]| class == 5)
}

/// What to do about a failure of this class (see the module doc).
pub fn disposition(class: Class, permanent: bool) -> Disposition {
    use Disposition::{Hard, Soft, Throttle};
    match class {
        Class::RateLimit => Throttle,
        Class::Reputation if permanent => Soft,
        Class::Reputation => Throttle,
        Class::MailboxFull | Class::Greylisted | Class::Network | Class::Local => Soft,
        Class::BadMailbox
        | Class::BadDomain
        | Class::Policy
        | Class::Dns
        | Class::Tls
        | Class::TooLarge
        | Class::Other => {
            if permanent {
                Hard
            } else {
                Soft
            }
        }
    }
}

/// True for a failure that must never be retried whatever its reply code: a hard bad
/// mailbox or bad domain (see the module doc).
pub fn never_retry(class: Class, permanent: bool) -> bool {
    matches!(class, Class::BadMailbox | Class::BadDomain)
        && disposition(class, permanent) == Disposition::Hard
}

/// What an enhanced code says on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Enhanced {
    /// Providers use it for this and nothing else: the text is not read.
    Sure(Class),
    /// Used loosely: the text decides, and this only when the text says nothing.
    Hint(Class),
    /// Says nothing about the class.
    Nothing,
}

/// The enhanced-code part of the table (RFC 3463 §3, RFC 7372, RFC 7505, RFC 8689 and
/// the IANA registry). Details above 255 (Microsoft's `5.7.606` "banned sending IP"...)
/// do not fit a reply's enhanced code and are left to the text rules.
fn by_enhanced([_, subject, detail]: [u8; 3]) -> Enhanced {
    use Class::*;
    use Enhanced::{Hint, Nothing, Sure};
    match (subject, detail) {
        // Addressing (X.1.x).
        (1, 1 | 3 | 4 | 6) => Sure(BadMailbox),
        (1, 2) => Sure(BadDomain),
        // Sender's address or system: a policy about us, not the recipient.
        (1, 7 | 8) => Sure(Policy),
        (1, 10) => Hint(BadDomain),
        (1, _) => Hint(BadMailbox),
        // Mailbox (X.2.x).
        (2, 2) => Sure(MailboxFull),
        (2, 3) => Sure(TooLarge),
        (2, 1) => Hint(BadMailbox),
        (2, _) => Nothing,
        // Mail system (X.3.x).
        (3, 4) => Sure(TooLarge),
        (3, 2) => Hint(Network),
        (3, _) => Nothing,
        // Network and routing (X.4.x).
        (4, 3) => Sure(Dns),
        (4, 4) => Hint(Dns),
        (4, 5) => Sure(RateLimit),
        (4, 6) => Hint(Other),
        (4, _) => Hint(Network),
        // Protocol (X.5.x): too many recipients is a rate limit.
        (5, 3) => Sure(RateLimit),
        (5, _) => Nothing,
        // Content (X.6.x).
        (6, _) => Hint(Other),
        // Security and policy (X.7.x).
        (7, 4 | 10 | 11 | 30) => Sure(Tls),
        // Cryptographic failure: TLS, or a DKIM key; the text says which.
        (7, 5) => Hint(Tls),
        (7, 2 | 14 | 15 | 19 | 20..=27 | 29) => Sure(Policy),
        (7, 13 | 17) => Sure(BadMailbox),
        (7, 18) => Sure(BadDomain),
        (7, 16) => Sure(TooLarge),
        (7, 28) => Hint(Reputation),
        (7, _) => Hint(Policy),
        _ => Nothing,
    }
}

/// The text part of the table: lower-case substrings, most specific class first.
pub const RULES: &[(Class, &[&str])] = &[
    (
        Class::Reputation,
        &["unusual rate of unsolicited", "[tss04]", "user complaints"],
    ),
    (
        Class::Other,
        &[
            "hop count exceeded",
            "mail loop",
            "routing loop",
            "too many errors",
        ],
    ),
    (
        Class::Greylisted,
        &[
            "greylist",
            "graylist",
            "grey-list",
            "gray-list",
            "grey list",
            "gray list",
            "postgrey",
            "try again in a few minutes",
        ],
    ),
    (
        Class::RateLimit,
        &[
            "too many connections",
            "too many login attempts",
            "too many concurrent",
            "too many simultaneous",
            "too many smtp sessions",
            "too many sessions",
            "connection limit",
            "connection rate",
            "maximum number of connections",
            "max connections",
            "too many messages",
            "too many recipients",
            "too many mails",
            "rate limit",
            "ratelimit",
            "rate-limit",
            "rate limited",
            "throttl",
            "sending rate",
            "at a rate",
            "too quickly",
            "too fast",
            "slow down",
            "sending quota",
            "unexpected volume",
            "try again later, closing connection",
            "temporarily deferred due to",
            "[ts01]",
            "[ts02]",
            "[ts03]",
            "exceeded the maximum number",
            "too much mail",
            "resources temporarily unavailable",
        ],
    ),
    (
        Class::Reputation,
        &[
            "spamhaus",
            "spamcop",
            "barracudacentral",
            "barracuda reputation",
            "sorbs",
            "uceprotect",
            "abusix",
            "spameatingmonkey",
            "psbl",
            "dnsbl",
            "rbl",
            "blocklist",
            "block list",
            "blacklist",
            "black list",
            "denylist",
            "listed at",
            "listed on",
            "listed in",
            "is listed",
            "reputation",
            "banned sending ip",
            "user complaints",
            "ip address has been blocked",
            "your ip",
            "sending ip",
            "ip address is blocked",
            "traffic not accepted from this ip",
            "senderscore",
            "[tss",
            "s3140",
            "s3150",
            "poor sending",
        ],
    ),
    (
        // The sender's address or host, not the recipient's.
        Class::Policy,
        &[
            "sender address",
            "sender rejected",
            "sender domain",
            "sender verify",
            "allowed rcpthosts",
            "client host rejected",
            "cannot find your hostname",
            "reverse dns",
            "rdns",
            "ptr record",
            "helo",
            "ehlo",
        ],
    ),
    (
        Class::Tls,
        &[
            "starttls",
            "tls",
            "ssl",
            "encryption",
            "encrypted",
            "secure connection",
            "certificate",
        ],
    ),
    (
        Class::MailboxFull,
        &[
            "mailbox full",
            "mailbox is full",
            "mailbox has exceeded",
            "mailbox size limit",
            "mailfolder is full",
            "full mailbox",
            "inbox is full",
            "over quota",
            "overquota",
            "over its quota",
            "over the quota",
            "quota exceeded",
            "exceeds its quota",
            "exceeded its quota",
            "quota full",
            "disk quota",
            "exceeded storage allocation",
            "out of storage",
            "not enough storage",
            "storage limit",
        ],
    ),
    (
        Class::TooLarge,
        &[
            "too large",
            "too big",
            "size limit",
            "size exceeds",
            "exceeds size",
            "message size",
            "maximum message size",
            "exceeds the maximum size",
            "message length exceeds",
            "message exceeds",
        ],
    ),
    (
        Class::BadDomain,
        &[
            "domain not found",
            "domain does not exist",
            "domain doesn't exist",
            "no such domain",
            "unrouteable mail domain",
            "unroutable mail domain",
            "host or domain name not found",
            "host not found",
            "null mx",
            "does not accept mail",
            "not a valid domain",
            "bad destination system",
        ],
    ),
    (
        Class::BadMailbox,
        &[
            // Microsoft's directory-based edge blocking (RFC 3463 would say 5.1.1).
            "recipient address rejected: access denied",
            "user unknown",
            "unknown user",
            "no such user",
            "no such mailbox",
            "no such recipient",
            "no such address",
            "user not found",
            "recipient not found",
            "recipientnotfound",
            "address not found",
            "mailbox not found",
            "mailbox unavailable",
            "mailbox is unavailable",
            "mailbox does not exist",
            "account does not exist",
            "address does not exist",
            "does not exist",
            "doesn't exist",
            "doesn't have an account",
            "user doesn't have a",
            "unknown recipient",
            "unknown local part",
            "unknown address",
            "invalid recipient",
            "invalid mailbox",
            "invalid address",
            "not a valid mailbox",
            "not a known user",
            "unrouteable address",
            "unroutable address",
            "user not local",
            "mailbox disabled",
            "account disabled",
            "account has been disabled",
            "is disabled",
            "inactive",
            "deactivated",
            "no longer",
            "has been terminated",
            "mailbox name not allowed",
            "recipient rejected",
            "bad destination mailbox",
        ],
    ),
    (
        Class::Policy,
        &[
            // Authentication of the message.
            "spf",
            "dkim",
            "dmarc",
            "domainkeys",
            "authentication checks",
            "not authenticated",
            "unauthenticated",
            "sender policy framework",
            "arc validation",
            // Relaying and content.
            "relay",
            "spam",
            "junk",
            "bulk",
            "virus",
            "malware",
            "phish",
            "infected",
            "content rejected",
            "content filter",
            "message rejected",
            "message refused",
            "policy",
            "policies",
            "not accepted",
            "suspicious",
            "access denied",
            "not allowed",
            "prohibited",
            "administrative prohibition",
            "blocked",
            "unsolicited",
        ],
    ),
    (
        Class::Dns,
        &[
            "dns",
            "name server",
            "nameserver",
            "servfail",
            "lookup fail",
            "temporary lookup failure",
        ],
    ),
    (
        Class::Network,
        &[
            "timed out",
            "timeout",
            "connection refused",
            "connection reset",
            "connection closed",
            "lost connection",
            "broken pipe",
            "service not available",
            "service unavailable",
            "service temporarily unavailable",
            "closing transmission channel",
            "closing connection",
            "network is unreachable",
            "no route to host",
            "try again later",
        ],
    ),
];

#[cfg(test)]
mod tests;
