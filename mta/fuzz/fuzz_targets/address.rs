//! Recipient addresses (the string inside `RCPT TO:<…>`) through the relay policy and the
//! Maildir folder mapping.
//!
//! Asserted, for arbitrary strings:
//! * `mailbox_name` only ever returns a safe single path component: non-empty, at most 64
//!   bytes, lower case, no `/`, no NUL, no `+`, not starting with `.` (so neither `.` nor
//!   `..` nor a hidden name), only `[a-z0-9._-]`;
//! * a recipient `check_recipient` accepts from an outsider (not in a relay network, not
//!   authenticated) is for a configured local domain, and its local part yields such a
//!   mailbox name (which, for a domain with a recipient list, is on that list);
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
    let outside = mta::policy::check_recipient(config, outsider, false, input);
    if outside.is_ok() {
        let (local, domain) =
            mta::queue::split_address(input).expect("accepted address has an '@'");
        let domain = config
            .local_domain(domain)
            .unwrap_or_else(|| panic!("OPEN RELAY: outsider may send to {input:?}"));
        let mailbox = mta::local::mailbox_name(local)
            .unwrap_or_else(|| panic!("{input:?} accepted but has no Maildir name"));
        assert_safe_mailbox(input, &mailbox);
        if let Some(users) = &domain.recipients {
            assert!(
                users.iter().any(|u| u.eq_ignore_ascii_case(&mailbox)),
                "{input:?} accepted for a closed domain but {mailbox:?} is not listed"
            );
        }
    }
    let authenticated = mta::policy::check_recipient(config, outsider, true, input);
    let relay = mta::policy::check_recipient(config, insider, false, input);
    // Being trusted never makes an answer worse, and both kinds of trust are equivalent.
    if outside.is_ok() {
        assert!(authenticated.is_ok() && relay.is_ok(), "{input:?}: trust made it worse");
    }
    assert_eq!(authenticated, relay, "{input:?}: AUTH and relay network disagree");
});
