//! Mail authentication for petrel-mta: DKIM signing of outbound mail, SPF / DKIM / DMARC /
//! ARC verification of inbound mail, and DNSBL look-ups of connecting clients.
//!
//! The crate is a library with no SMTP in it. The MTA calls it from two places:
//!
//! * **cleanup, outbound** ([`sign`]): after the `Received:` header is added and before the
//!   message is queued for remote delivery, [`Signer::sign`] returns one `DKIM-Signature:`
//!   header field per active selector of the signing domain, to be prepended to the
//!   message. Keys are loaded once from PEM files ([`SigningKey::from_pem_file`]).
//! * **end of DATA, inbound** ([`verify`], [`dnsbl`]): [`strip_forged_authentication_results`]
//!   removes `Authentication-Results` fields that claim our authserv-id, then
//!   [`Verifier::verify`] returns a [`Verdict`]: one RFC 8601 `Authentication-Results:`
//!   field to prepend, the individual results, what the author domain's DMARC policy asks
//!   for, and whether any DNS look-up failed temporarily. [`dnsbl_listed`] checks the
//!   client address against one DNSBL zone (RFC 5782).
//!
//! The cryptography, the canonicalisation and the SPF/DMARC evaluation are the
//! `mail-auth` crate's (ring backend); this crate chooses the defaults (relaxed/relaxed,
//! the signed header list, over-signed `From`), maps results into small enums the MTA's
//! policy can match on exhaustively, and guarantees that a DNS failure shows up as a
//! temporary result, never as a pass or a permanent failure.
//!
//! It never decides what to reply: the policy (reject with `550 5.7.1`, defer with
//! `451 4.7.x`, tag) belongs to the MTA and its config.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod dnsbl;
pub mod headers;
pub mod sign;
pub mod verify;

pub use dnsbl::{DnsblError, DnsblListing, dnsbl_listed};
pub use headers::strip_forged_authentication_results;
pub use sign::{Algorithm, DEFAULT_SIGNED_HEADERS, Signer, SigningKey};
pub use verify::{
    ArcResult, DkimOutcome, DkimResult, DmarcDisposition, DmarcResultSummary, InboundFacts,
    SpfResult, Verdict, Verifier,
};

/// Why a key could not be loaded, a message could not be signed, or the verifier could not
/// be built.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The key file could not be read.
    #[error("reading DKIM key {path}: {source}")]
    KeyFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The PEM holds no private key we can use (RSA PKCS#1/PKCS#8 or Ed25519 PKCS#8).
    #[error("DKIM key for {selector}._domainkey.{domain}: {detail}")]
    Key {
        domain: String,
        selector: String,
        detail: String,
    },
    /// No key is configured for the domain asked to sign for.
    #[error("no DKIM key for domain {0}")]
    NoKeyForDomain(String),
    /// `mail-auth` refused to sign (for example: none of the signed header fields is
    /// present).
    #[error("DKIM signing for {domain} with selector {selector} failed: {detail}")]
    Sign {
        domain: String,
        selector: String,
        detail: String,
    },
    /// The resolver could not be built (system resolver configuration unreadable).
    #[error("DNS resolver: {0}")]
    Resolver(String),
}
