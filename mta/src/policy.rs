//! Relay policy: decides at RCPT whether this server takes a recipient, and to which
//! addresses its mail goes.
//!
//! Mail for a configured local domain is accepted from anyone (subject to its recipient
//! list, aliases and catch-all); everything else is relayed only for authenticated clients
//! and clients in `relay.client_networks`, and refused with `550 5.7.1` for everyone else:
//! never an open relay. An alias may forward to a remote address: the domain's owner
//! configured that, the client did not choose it. Spam checks (SPF, DKIM, DMARC, DNSBL)
//! live apart from this (`checks`), so a permissive spam setting can never widen who may
//! relay.

use crate::local;
use crate::queue::split_address;
use crate::reply::Reply;
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

/// Most levels of alias expansion (an alias whose target is an alias, and so on).
const MAX_ALIAS_DEPTH: usize = 8;

/// Accepts or refuses one recipient address (as given in `RCPT TO:<…>`). Accepted, it
/// names where the mail goes: the address itself, or what its aliases (or the domain's
/// catch-all) expand to, without duplicates.
pub fn resolve_recipient(
    config: &MtaConfig,
    client: IpAddr,
    authenticated: bool,
    address: &str,
) -> Result<Vec<String>, Reply> {
    let Some((_, domain)) = split_address(address) else {
        return Err(Reply::BAD_RECIPIENT_SYNTAX);
    };
    if config.local_domain(domain).is_none() {
        return if authenticated || may_relay(config, client) {
            Ok(vec![address.to_owned()])
        } else {
            Err(Reply::RELAY_DENIED)
        };
    }
    let mut out = Vec::new();
    expand(config, address, 0, &mut out)?;
    Ok(out)
}

/// Appends where mail for `address` goes to `out`. Addresses outside local domains, and
/// local ones that are not aliases, are final.
fn expand(
    config: &MtaConfig,
    address: &str,
    depth: usize,
    out: &mut Vec<String>,
) -> Result<(), Reply> {
    if depth > MAX_ALIAS_DEPTH {
        return Err(Reply::ALIAS_LOOP);
    }
    let local = split_address(address).and_then(|(local_part, domain)| {
        config
            .local_domain(domain)
            .map(|domain| (local_part, domain))
    });
    let Some((local_part, domain)) = local else {
        if !out.iter().any(|a| a.eq_ignore_ascii_case(address)) {
            out.push(address.to_owned());
        }
        return Ok(());
    };
    let Some(mailbox) = local::mailbox_name(local_part) else {
        return Err(Reply::BAD_LOCAL_PART);
    };
    let alias = domain
        .aliases
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(&mailbox));
    if let Some((_, targets)) = alias {
        for target in targets {
            expand(config, target, depth + 1, out)?;
        }
        return Ok(());
    }
    if let Some(users) = &domain.recipients
        && !users.iter().any(|u| u.eq_ignore_ascii_case(&mailbox))
    {
        return match &domain.catch_all {
            Some(target) => expand(config, target, depth + 1, out),
            None => Err(Reply::NO_SUCH_USER),
        };
    }
    if !out.iter().any(|a| a.eq_ignore_ascii_case(address)) {
        out.push(address.to_owned());
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
            aliases: Default::default(),
            catch_all: None,
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
                &resolve_recipient(&config, outsider, false, address).map(|_| ()),
                expected,
                "{address}"
            );
        }
        // A client in a relay network may send anywhere; others still may not.
        config.relay.client_networks = vec!["10.0.0.0/8".parse().expect("net")];
        let insider: IpAddr = "10.1.2.3".parse().expect("ip");
        assert_eq!(
            resolve_recipient(&config, insider, false, "x@remote.test"),
            Ok(vec!["x@remote.test".to_owned()])
        );
        assert_eq!(
            resolve_recipient(&config, outsider, false, "x@remote.test"),
            Err(Reply::RELAY_DENIED)
        );
        assert_eq!(
            resolve_recipient(&config, outsider, true, "x@remote.test"),
            Ok(vec!["x@remote.test".to_owned()]),
            "authenticated users may relay"
        );
    }

    #[test]
    fn aliases_and_catch_all_expand() {
        let config = MtaConfig::from_yaml(
            r#"
local_domains:
  - name: corp.test
    delivery: {maildir: {root: /tmp/x}}
    recipients: [alice, bob]
    aliases:
      sales: [alice@corp.test, Bob@corp.test, partner@remote.test]
      team: [sales@corp.test, alice@corp.test]
      loop1: [loop2@corp.test]
      loop2: [loop1@corp.test]
    catch_all: alice@corp.test
  - name: open.test
    delivery: {maildir: {root: /tmp/y}}
"#,
        )
        .expect("a valid config");
        let outsider: IpAddr = "192.0.2.1".parse().expect("ip");
        let resolve = |a: &str| resolve_recipient(&config, outsider, false, a);
        assert_eq!(resolve("bob@corp.test"), Ok(vec!["bob@corp.test".into()]));
        // An alias may forward off-site even for a client that may not relay.
        assert_eq!(
            resolve("Sales+q3@CORP.test"),
            Ok(vec![
                "alice@corp.test".into(),
                "Bob@corp.test".into(),
                "partner@remote.test".into()
            ])
        );
        assert_eq!(
            resolve("team@corp.test"),
            Ok(vec![
                "alice@corp.test".into(),
                "Bob@corp.test".into(),
                "partner@remote.test".into()
            ]),
            "nested, without duplicates"
        );
        assert_eq!(
            resolve("nobody@corp.test"),
            Ok(vec!["alice@corp.test".into()])
        );
        assert_eq!(resolve("loop1@corp.test"), Err(Reply::ALIAS_LOOP));
        assert_eq!(resolve("x%y@corp.test"), Err(Reply::BAD_LOCAL_PART));
        assert_eq!(
            resolve("anyone@open.test"),
            Ok(vec!["anyone@open.test".into()])
        );
        // Without a catch-all, an unknown user is refused.
        let mut strict = config.clone();
        strict.local_domains[0].catch_all = None;
        assert_eq!(
            resolve_recipient(&strict, outsider, false, "nobody@corp.test"),
            Err(Reply::NO_SUCH_USER)
        );
    }
}
