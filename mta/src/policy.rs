//! Relay policy: decides at RCPT whether this server takes a recipient.
//!
//! Mail for a configured local domain is accepted from anyone (subject to its recipient
//! list); everything else is relayed only for clients in `relay.client_networks`, and
//! refused with `550 5.7.1` for everyone else: never an open relay. Spam checks (SPF, DKIM,
//! DMARC, DNSBL) will live apart from this, so a permissive spam setting can never widen
//! who may relay.

use crate::local;
use crate::queue::split_address;
use crate::session::Reply;
use mta_config::MtaConfig;
use std::net::IpAddr;

/// Whether `client` is in a network allowed to relay.
pub fn may_relay(config: &MtaConfig, client: IpAddr) -> bool {
    config
        .relay
        .client_networks
        .iter()
        .any(|net| net.contains(&client))
}

/// Accepts or refuses one recipient address (as given in `RCPT TO:<…>`).
pub fn check_recipient(
    config: &MtaConfig,
    client: IpAddr,
    authenticated: bool,
    address: &str,
) -> Result<(), Reply> {
    let Some((local_part, domain)) = split_address(address) else {
        return Err(Reply::BAD_RECIPIENT_SYNTAX);
    };
    let Some(domain) = config.local_domain(domain) else {
        return if authenticated || may_relay(config, client) {
            Ok(())
        } else {
            Err(Reply::RELAY_DENIED)
        };
    };
    let Some(mailbox) = local::mailbox_name(local_part) else {
        return Err(Reply::BAD_LOCAL_PART);
    };
    if let Some(users) = &domain.recipients
        && !users.iter().any(|u| u.eq_ignore_ascii_case(&mailbox))
    {
        return Err(Reply::NO_SUCH_USER);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mta_config::{LocalDelivery, LocalDomainConfig};

    #[test]
    fn recipient_table() {
        let mut config = MtaConfig::embedded_default();
        config.local_domains.push(LocalDomainConfig {
            name: "closed.test".into(),
            delivery: LocalDelivery::Maildir {
                root: "/tmp/x".into(),
            },
            recipients: Some(vec!["alice".into()]),
        });
        let outsider: IpAddr = "192.0.2.1".parse().expect("ip");
        let cases: &[(&str, Result<(), Reply>)] = &[
            ("user@example.test", Ok(())),
            ("User@EXAMPLE.TEST", Ok(())),
            ("user+tag@localhost", Ok(())),
            ("alice@closed.test", Ok(())),
            ("ALICE+x@closed.test", Ok(())),
            ("bob@closed.test", Err(Reply::NO_SUCH_USER)),
            ("user@remote.test", Err(Reply::RELAY_DENIED)),
            ("user@example.test.evil", Err(Reply::RELAY_DENIED)),
            ("user%remote.test@example.test", Err(Reply::BAD_LOCAL_PART)),
            ("../etc@example.test", Err(Reply::BAD_LOCAL_PART)),
            ("postmaster", Err(Reply::BAD_RECIPIENT_SYNTAX)),
        ];
        for (address, expected) in cases {
            assert_eq!(
                &check_recipient(&config, outsider, false, address),
                expected,
                "{address}"
            );
        }
        // A client in a relay network may send anywhere; others still may not.
        config.relay.client_networks = vec!["10.0.0.0/8".parse().expect("net")];
        let insider: IpAddr = "10.1.2.3".parse().expect("ip");
        assert_eq!(
            check_recipient(&config, insider, false, "x@remote.test"),
            Ok(())
        );
        assert_eq!(
            check_recipient(&config, outsider, false, "x@remote.test"),
            Err(Reply::RELAY_DENIED)
        );
        assert_eq!(
            check_recipient(&config, outsider, true, "x@remote.test"),
            Ok(()),
            "authenticated users may relay"
        );
    }
}
