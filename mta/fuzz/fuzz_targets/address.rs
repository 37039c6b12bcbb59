//! Recipient addresses (the string inside `RCPT TO:<…>`) through the relay policy and the
//! Maildir folder mapping.
//!
//! Asserted, for arbitrary strings:
//! * `mailbox_name` only ever returns a safe single path component: non-empty, at most 64
//!   bytes, lower case, no `/`, no NUL, no `+`, not starting with `.` (so neither `.` nor
//!   `..` nor a hidden name), only `[a-z0-9._-]`;
//! * every address a recipient that `resolve_recipient` accepts from an outsider (not in a
//!   relay network, not authenticated) leads to is in a configured local domain, with a
//!   local part that yields such a mailbox name (on the domain's recipient list when it
//!   has one), unless it is an alias or catch-all target the configuration names;
//! * an authenticated client or a relay-network client is never refused for a remote
//!   domain with well-formed syntax (`x@y`), i.e. the answers stay consistent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mta_config::{LocalDelivery, LocalDomainConfig, MtaConfig};
use std::net::IpAddr;
use std::sync::OnceLock;

fn config() -> &'static MtaConfig {
    static CONFIG: OnceLock<MtaConfig> = OnceLock::new();
    CONFIG.get_or_init(|| {
        let mut config = MtaConfig::embedded_default();
        config.local_domains.push(LocalDomainConfig {
            name: "closed.test".into(),
            delivery: LocalDelivery::Maildir {
                root: "/nonexistent/maildir".into(),
            },
            recipients: Some(vec!["alice".into(), "bob.smith".into()]),
            aliases: [(
                "team".to_owned(),
                vec!["alice@closed.test".to_owned(), "partner@remote.test".to_owned()],
            )]
            .into(),
            catch_all: None,
        });
        config.relay.client_networks = vec!["10.0.0.0/8".parse().expect("net")];
        config
    })
}

fn assert_safe_mailbox(input: &str, mailbox: &str) {
    assert!(!mailbox.is_empty(), "{input:?}: empty mailbox name");
    assert!(mailbox.len() <= 64, "{input:?}: mailbox name too long");
    assert!(!mailbox.contains('/'), "{input:?}: '/' in {mailbox:?}");
    assert!(!mailbox.contains('\0'), "{input:?}: NUL in {mailbox:?}");
    assert!(!mailbox.contains('+'), "{input:?}: '+' in {mailbox:?}");
    assert!(!mailbox.starts_with('.'), "{input:?}: {mailbox:?} starts with '.'");
    assert!(
        mailbox
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')),
        "{input:?}: unexpected character in {mailbox:?}"
    );
}

fuzz_target!(|data: &[u8]| {
    let Ok(input) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(mailbox) = mta::local::mailbox_name(input) {
        assert_safe_mailbox(input, &mailbox);
    }

    let config = config();
    let outsider: IpAddr = "192.0.2.1".parse().expect("ip");
    let insider: IpAddr = "10.1.2.3".parse().expect("ip");
    let outside = mta::policy::resolve_recipient(config, outsider, false, input);
    if let Ok(targets) = &outside {
        assert!(!targets.is_empty(), "{input:?} accepted with nowhere to go");
        for target in targets {
            // What the domain owner configured may lead off-site; nothing else may.
            let configured = config.local_domains.iter().any(|d| {
                d.aliases.values().flatten().any(|t| t.eq_ignore_ascii_case(target))
                    || d.catch_all.as_deref().is_some_and(|c| c.eq_ignore_ascii_case(target))
            });
            let (local, domain) =
                mta::queue::split_address(target).expect("a target has an '@'");
            let Some(domain) = config.local_domain(domain) else {
                assert!(configured, "OPEN RELAY: outsider may send to {input:?} -> {target:?}");
                continue;
            };
            let mailbox = mta::local::mailbox_name(local)
                .unwrap_or_else(|| panic!("{input:?} -> {target:?} has no Maildir name"));
            assert_safe_mailbox(input, &mailbox);
            if let Some(users) = &domain.recipients {
                assert!(
                    configured || users.iter().any(|u| u.eq_ignore_ascii_case(&mailbox)),
                    "{input:?} accepted for a closed domain but {mailbox:?} is not listed"
                );
            }
        }
    }
    let authenticated = mta::policy::resolve_recipient(config, outsider, true, input);
    let relay = mta::policy::resolve_recipient(config, insider, false, input);
    // Being trusted never makes an answer worse, and both kinds of trust are equivalent.
    if outside.is_ok() {
        assert!(authenticated.is_ok() && relay.is_ok(), "{input:?}: trust made it worse");
    }
    assert_eq!(authenticated, relay, "{input:?}: AUTH and relay network disagree");
});
