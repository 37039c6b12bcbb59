//! Spam policy for inbound mail: SPF/DKIM/DMARC/ARC verification with an
//! `Authentication-Results:` header, DMARC enforcement, and DNSBL lookups, using the
//! `mta-auth` crate against the configured resolver.
//!
//! Kept apart from relay policy ([`crate::policy`]): nothing here can make this server
//! relay for anyone. Authenticated clients and `mail_auth.trusted_networks` are exempt.
//! A DNS failure is never a silent pass nor a permanent refusal: DNSBL lookups that fail
//! answer `451 4.7.1`, and verification writes `temperror` into the header.

use crate::context::Context;
use crate::reply::Reply;
use mta_auth::{DmarcDisposition, InboundFacts};
use mta_config::{DnsblAction, MtaConfig};
use std::net::IpAddr;

/// Whether `client` skips inbound checks.
pub fn exempt(config: &MtaConfig, client: IpAddr, authenticated: bool) -> bool {
    authenticated
        || config
            .mail_auth
            .trusted_networks
            .iter()
            .any(|n| n.contains(&client))
}

/// A DNSBL verdict for the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dnsbl {
    Clean,
    /// Listed, and the action is `tag`: the header to add.
    Tag(String),
}

/// Looks `client` up in every configured zone. `Err` is the reply to send.
pub async fn dnsbl(ctx: &Context, config: &MtaConfig, client: IpAddr) -> Result<Dnsbl, Reply> {
    let Some(verifier) = ctx.verifier.as_ref() else {
        return Ok(Dnsbl::Clean);
    };
    for zone in &config.mail_auth.dnsbl_zones {
        match mta_auth::dnsbl_listed(verifier.resolver(), client, zone).await {
            Ok(None) => {}
            Ok(Some(listing)) => {
                tracing::warn!(%client, zone, address = %listing.address, "client listed on DNSBL");
                return match config.mail_auth.dnsbl_action {
                    DnsblAction::Reject => Err(Reply::DNSBL_LISTED.with_text(format!(
                        "Service unavailable; client host [{client}] blocked using {zone}"
                    ))),
                    DnsblAction::Tag => Ok(Dnsbl::Tag(format!(
                        "X-Petrel-DNSBL: {zone}; client=[{client}]; result={}\r\n",
                        listing.address
                    ))),
                };
            }
            Err(e) => {
                tracing::warn!(%client, zone, error = %e.detail, "DNSBL lookup failed");
                return Err(Reply::DNSBL_TEMPFAIL);
            }
        }
    }
    Ok(Dnsbl::Clean)
}

/// What verification adds to a message.
pub struct Verified {
    /// The content with forged `Authentication-Results:` headers removed.
    pub content: Vec<u8>,
    /// Header lines to prepend (Authentication-Results, and a quarantine tag).
    pub headers: String,
}

/// Verifies a message; `Err` is the reply when DMARC enforcement refuses it.
pub async fn verify(
    ctx: &Context,
    config: &MtaConfig,
    facts: &InboundFacts<'_>,
    content: &[u8],
) -> Result<Option<Verified>, Reply> {
    let Some(verifier) = ctx.verifier.as_ref().filter(|_| config.mail_auth.verify) else {
        return Ok(None);
    };
    let content = mta_auth::strip_forged_authentication_results(content, facts.authserv_id);
    let verdict = verifier.verify(facts, &content).await;
    let mut headers = verdict.header.clone();
    if config.mail_auth.dmarc_enforce {
        match verdict.dmarc_policy {
            DmarcDisposition::Reject => {
                tracing::warn!(
                    sender = facts.mail_from,
                    "refused by the sender domain's DMARC policy"
                );
                return Err(Reply::DMARC_REJECT);
            }
            DmarcDisposition::Quarantine => {
                headers.push_str("X-Petrel-Quarantine: yes (DMARC)\r\n")
            }
            DmarcDisposition::None => {}
        }
    }
    Ok(Some(Verified { content, headers }))
}
