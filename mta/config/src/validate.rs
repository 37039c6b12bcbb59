//! Semantic validation of an [`MtaConfig`]: everything serde's types cannot express.
//!
//! Every problem names the key (as a path such as `local_domains[1].name`) and says what is
//! wrong. All problems are collected, not just the first, so one run of
//! `petrel-mta check-config` shows everything to fix.

use crate::{CONFIG_VERSION, LocalDelivery, MtaConfig};
use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// One thing wrong with a config, at a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Path of the offending key, e.g. `smtpd.max_recipients`.
    pub key: String,
    /// What is wrong with it.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Why a config was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// Not YAML, an unknown key, or a value of the wrong type (the message names the key
    /// and its line).
    #[error("{0}")]
    Syntax(serde_saphyr::Error),
    #[error("invalid configuration:\n{}", .0.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Problem>),
}

/// Whether two listening sockets cannot both be bound: the same port and the same
/// address, or a wildcard address that covers the other (`0.0.0.0` covers every IPv4
/// address; `[::]` every address, as the MTA binds it dual-stack). Port 0 (the OS picks a
/// port, used by tests) never collides.
pub fn sockets_collide(a: SocketAddr, b: SocketAddr) -> bool {
    if a.port() != b.port() || a.port() == 0 {
        return false;
    }
    let covers =
        |wide: IpAddr, other: IpAddr| wide.is_unspecified() && (wide.is_ipv6() || other.is_ipv4());
    a.ip() == b.ip() || covers(a.ip(), b.ip()) || covers(b.ip(), a.ip())
}

impl MtaConfig {
    /// Checks everything the types cannot. The operator calls this on what it renders.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        let mut problem = |key: String, message: String| problems.push(Problem { key, message });

        if self.version != CONFIG_VERSION {
            problem(
                "version".into(),
                format!(
                    "unsupported version {}; this petrel-mta reads version {CONFIG_VERSION}",
                    self.version
                ),
            );
        }
        if !is_domain_name(&self.hostname) {
            problem(
                "hostname".into(),
                format!("{:?} is not a valid host name", self.hostname),
            );
        }
        if self.listeners.is_empty() {
            problem(
                "listeners".into(),
                "at least one listener is required".into(),
            );
        }
        for (i, listener) in self.listeners.iter().enumerate() {
            let earlier = self.listeners[..i]
                .iter()
                .find(|other| sockets_collide(other.address, listener.address));
            if let Some(other) = earlier {
                problem(
                    format!("listeners[{i}].address"),
                    format!(
                        "{} is used by another listener (on {})",
                        listener.address, other.address
                    ),
                );
            }
        }

        let has_tls = self.tls.cert_file.is_some() && self.tls.key_file.is_some();
        if self.tls.cert_file.is_some() != self.tls.key_file.is_some() {
            problem(
                "tls".into(),
                "cert_file and key_file must be set together".into(),
            );
        }
        for (i, listener) in self.listeners.iter().enumerate() {
            if listener.kind == crate::ListenerKind::Submission
                && !has_tls
                && !self.smtpd.auth_allow_plaintext
            {
                problem(
                    format!("listeners[{i}].kind"),
                    "submission needs tls.cert_file and tls.key_file (AUTH only under TLS)".into(),
                );
            }
            if listener.kind == crate::ListenerKind::Smtps && !has_tls {
                problem(
                    format!("listeners[{i}].kind"),
                    "smtps (implicit TLS) needs tls.cert_file and tls.key_file".into(),
                );
            }
            match &listener.proxy_trusted_networks {
                Some(_) if !listener.proxy_protocol => problem(
                    format!("listeners[{i}].proxy_trusted_networks"),
                    "has no effect without proxy_protocol: true".into(),
                ),
                Some(networks) if networks.is_empty() => problem(
                    format!("listeners[{i}].proxy_trusted_networks"),
                    "an empty list would close every connection; remove the key to trust any sender"
                        .into(),
                ),
                _ => {}
            }
            if listener.kind != crate::ListenerKind::Smtp && self.smtpd.auth_users_file.is_none() {
                problem(
                    format!("listeners[{i}].kind"),
                    "submission listeners need smtpd.auth_users_file (AUTH is required there)"
                        .into(),
                );
            }
        }
        let limits = &self.smtpd.rate_limits;
        for (key, value) in [
            ("messages_per_ip", &limits.messages_per_ip),
            ("recipients_per_ip", &limits.recipients_per_ip),
            ("messages_per_user", &limits.messages_per_user),
            ("recipients_per_domain", &limits.recipients_per_domain),
        ] {
            if let Err(e) = crate::Rate::parse(value) {
                problem(format!("smtpd.rate_limits.{key}"), e);
            }
        }
        if let Some(redis) = &limits.redis {
            let key = "smtpd.rate_limits.redis";
            match redis.url.split_once("://") {
                Some(("redis", rest)) if !rest.is_empty() && !rest.starts_with('/') => {}
                Some(("rediss" | "redis+unix" | "unix", _)) => problem(
                    format!("{key}.url"),
                    format!("{:?}: only redis://host:port/db is supported", redis.url),
                ),
                _ => problem(
                    format!("{key}.url"),
                    format!("{:?} is not redis://host:port/db", redis.url),
                ),
            }
            if redis.timeout.is_zero() || redis.timeout > crate::MAX_REDIS_TIMEOUT {
                problem(
                    format!("{key}.timeout"),
                    "must be more than 0 and at most 1s (mail never waits longer on Redis)".into(),
                );
            }
            if redis.fleet_size == 0 {
                problem(
                    format!("{key}.fleet_size"),
                    "must be at least 1 (the pods sharing the limits)".into(),
                );
            }
        }

        for (i, key) in self.dkim.keys.iter().enumerate() {
            if !is_domain_name(&key.domain) {
                problem(
                    format!("dkim.keys[{i}].domain"),
                    format!("{:?} is not a domain name", key.domain),
                );
            }
            let selector_ok = !key.selector.is_empty()
                && key.selector.split('.').all(|l| {
                    !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                });
            if !selector_ok {
                problem(
                    format!("dkim.keys[{i}].selector"),
                    format!("{:?} is not a valid selector", key.selector),
                );
            }
        }
        for (i, zone) in self.mail_auth.dnsbl_zones.iter().enumerate() {
            if !is_domain_name(zone) {
                problem(
                    format!("mail_auth.dnsbl_zones[{i}]"),
                    format!("{zone:?} is not a domain name"),
                );
            }
        }

        let smtpd = &self.smtpd;
        if smtpd.max_message_size < 1024 {
            problem(
                "smtpd.max_message_size".into(),
                "must be at least 1024 bytes".into(),
            );
        }
        if smtpd.max_recipients == 0 {
            problem("smtpd.max_recipients".into(), "must be at least 1".into());
        }
        if smtpd.command_timeout.as_secs() == 0 {
            problem("smtpd.command_timeout".into(), "must be at least 1s".into());
        }
        if smtpd.data_timeout.as_secs() == 0 {
            problem("smtpd.data_timeout".into(), "must be at least 1s".into());
        }
        if smtpd.transaction_timeout.as_secs() == 0 {
            problem(
                "smtpd.transaction_timeout".into(),
                "must be at least 1s".into(),
            );
        }
        if smtpd.min_data_rate == 0 {
            problem("smtpd.min_data_rate".into(), "must be at least 1".into());
        }
        if smtpd.pressure_idle_timeout.is_zero() {
            problem(
                "smtpd.pressure_idle_timeout".into(),
                "must be more than 0s".into(),
            );
        }
        if smtpd.proxy_header_timeout.is_zero() {
            problem(
                "smtpd.proxy_header_timeout".into(),
                "must be longer than 0s".into(),
            );
        }
        if smtpd.max_connections == 0 {
            problem("smtpd.max_connections".into(), "must be at least 1".into());
        }
        if smtpd.max_connections_per_ip == 0 {
            problem(
                "smtpd.max_connections_per_ip".into(),
                "must be at least 1".into(),
            );
        }

        if self.spool.path.as_os_str().is_empty() {
            problem("spool.path".into(), "must not be empty".into());
        }
        if self.spool.segment_size < 1024 * 1024 {
            problem(
                "spool.segment_size".into(),
                "must be at least 1048576 bytes (1 MiB)".into(),
            );
        }

        let mut domains = HashSet::new();
        for (i, domain) in self.local_domains.iter().enumerate() {
            let key = format!("local_domains[{i}]");
            if !is_domain_name(&domain.name) {
                problem(
                    format!("{key}.name"),
                    format!("{:?} is not a valid domain name", domain.name),
                );
            }
            if !domains.insert(domain.name.to_ascii_lowercase()) {
                problem(
                    format!("{key}.name"),
                    format!("{} is listed twice", domain.name),
                );
            }
            match &domain.delivery {
                LocalDelivery::Maildir { root } if root.as_os_str().is_empty() => problem(
                    format!("{key}.delivery.maildir.root"),
                    "must not be empty".into(),
                ),
                LocalDelivery::Maildir { .. } => {}
                LocalDelivery::Lmtp { address } => {
                    if !address.starts_with('/') && !is_host_port(address) {
                        problem(
                            format!("{key}.delivery.lmtp.address"),
                            format!("{address:?} is neither host:port nor an absolute socket path"),
                        );
                    }
                }
                LocalDelivery::Relay { host, .. } => {
                    if !is_host_port(host) {
                        problem(
                            format!("{key}.delivery.relay.host"),
                            format!("{host:?} is not host:port"),
                        );
                    }
                }
            }
            for (name, targets) in &domain.aliases {
                if !is_maildir_safe_local_part(name) || name.contains('+') {
                    problem(
                        format!("{key}.aliases.{name}"),
                        "is not a plain local part (letters, digits, . _ -)".into(),
                    );
                }
                if targets.is_empty() {
                    problem(
                        format!("{key}.aliases.{name}"),
                        "needs at least one target address".into(),
                    );
                }
                for (j, target) in targets.iter().enumerate() {
                    if !is_mail_address(target) {
                        problem(
                            format!("{key}.aliases.{name}[{j}]"),
                            format!("{target:?} is not an address like user@domain"),
                        );
                    }
                }
            }
            if let Some(target) = &domain.catch_all {
                if !is_mail_address(target) {
                    problem(
                        format!("{key}.catch_all"),
                        format!("{target:?} is not an address like user@domain"),
                    );
                }
                if domain.recipients.is_none() {
                    problem(
                        format!("{key}.catch_all"),
                        "needs `recipients`: without a list every local part exists".into(),
                    );
                }
            }
            for (j, local) in domain.recipients.iter().flatten().enumerate() {
                if !is_maildir_safe_local_part(local) {
                    problem(
                        format!("{key}.recipients[{j}]"),
                        format!("{local:?} is not a plain local part (letters, digits, . _ + -)"),
                    );
                }
            }
        }

        let mut route_domains = HashSet::new();
        for (i, route) in self.routes.iter().enumerate() {
            let key = format!("routes[{i}]");
            if route.domain != "*" && !is_domain_name(&route.domain) {
                problem(
                    format!("{key}.domain"),
                    format!("{:?} is neither a domain name nor *", route.domain),
                );
            }
            if !route_domains.insert(route.domain.to_ascii_lowercase()) {
                problem(
                    format!("{key}.domain"),
                    format!("{} has two routes", route.domain),
                );
            }
            if let Some(host) = &route.smarthost
                && !is_host_port(host)
            {
                problem(
                    format!("{key}.smarthost"),
                    format!("{host:?} is not host:port"),
                );
            }
            if let Some(dane) = route.dane
                && route.smarthost.is_some()
            {
                problem(
                    format!("{key}.dane"),
                    if dane == crate::DaneMode::Required {
                        "dane: required applies to delivery by MX; a smarthost route cannot require DANE".into()
                    } else {
                        "DANE applies to delivery by MX; a smarthost route cannot set it".into()
                    },
                );
            }
            if route.auth.is_some() && route.smarthost.is_none() {
                problem(
                    format!("{key}.auth"),
                    "credentials are only sent to a smarthost".into(),
                );
            }
            if let Some(auth) = &route.auth
                && auth.username.is_empty() == auth.username_file.is_none()
            {
                problem(
                    format!("{key}.auth"),
                    "set exactly one of username and username_file".into(),
                );
            }
        }

        if self
            .smtp_client
            .dnssec_trust_anchor
            .as_ref()
            .is_some_and(|path| path.as_os_str().is_empty())
        {
            problem(
                "smtp_client.dnssec_trust_anchor".into(),
                "must name a file of DNSKEY records, or be left out for the root's keys".into(),
            );
        }

        let rpt = &self.smtp_client.tls_rpt;
        if rpt.report_interval.as_secs() == 0 {
            problem(
                "smtp_client.tls_rpt.report_interval".into(),
                "must be at least 1s".into(),
            );
        }
        if let Some(sender) = &rpt.sender
            && !is_mail_address(sender)
        {
            problem(
                "smtp_client.tls_rpt.sender".into(),
                format!("{sender:?} is not an address"),
            );
        }

        let queue = &self.queue;
        if queue.retry_interval.as_secs() == 0 {
            problem("queue.retry_interval".into(), "must be at least 1s".into());
        }
        if !(1.0..=100.0).contains(&queue.retry_backoff_factor) {
            problem(
                "queue.retry_backoff_factor".into(),
                "must be between 1.0 and 100.0".into(),
            );
        }
        if queue.max_retry_interval < queue.retry_interval {
            problem(
                "queue.max_retry_interval".into(),
                "must not be shorter than queue.retry_interval".into(),
            );
        }
        if queue.max_age < queue.retry_interval {
            problem(
                "queue.max_age".into(),
                "must not be shorter than queue.retry_interval".into(),
            );
        }
        if queue.max_connections_per_destination == 0 {
            problem(
                "queue.max_connections_per_destination".into(),
                "must be at least 1".into(),
            );
        }
        if queue.max_messages_per_connection == 0 {
            problem(
                "queue.max_messages_per_connection".into(),
                "must be at least 1".into(),
            );
        }
        validate_site_limits("queue.site_limits", &queue.site_limits, &mut problem);
        let mut site_names = std::collections::HashSet::new();
        for (i, rule) in queue.sites.iter().enumerate() {
            let key = format!("queue.sites[{i}]");
            if rule.name.is_empty()
                || !rule
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            {
                problem(
                    format!("{key}.name"),
                    format!(
                        "{:?} must be letters, digits, '-', '_' or '.' (it is a metrics label)",
                        rule.name
                    ),
                );
            } else if !site_names.insert(rule.name.as_str()) {
                problem(
                    format!("{key}.name"),
                    format!("{:?} names another site already", rule.name),
                );
            }
            if rule.domains.is_empty() && rule.mx.is_empty() {
                problem(key.clone(), "needs domains or mx (or both)".into());
            }
            for (j, pattern) in rule.mx.iter().enumerate() {
                let name = pattern.strip_prefix("*.").unwrap_or(pattern);
                if name.is_empty() || name.contains('*') {
                    problem(
                        format!("{key}.mx[{j}]"),
                        format!("{pattern:?} is not a host name or *.domain pattern"),
                    );
                }
            }
            if let Some(limits) = &rule.limits {
                validate_site_limits(&format!("{key}.limits"), limits, &mut problem);
            }
        }
        if let Some(postmaster) = &queue.postmaster
            && !postmaster.contains('@')
        {
            problem(
                "queue.postmaster".into(),
                format!("{postmaster:?} is not an address"),
            );
        }
        if !self.admin.address.ip().is_loopback() {
            problem(
                "admin.address".into(),
                format!(
                    "{} is not a loopback address; the admin endpoint is never exposed",
                    self.admin.address
                ),
            );
        }
        if let Some(file) = &self.admin.token_file
            && (file.as_os_str().is_empty() || file == &self.spool.path)
        {
            problem(
                "admin.token_file".into(),
                "must name a file of its own (not empty, not the spool directory)".into(),
            );
        }

        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }
}

/// `host:port` with a non-empty host and a numeric port.
fn is_host_port(text: &str) -> bool {
    match text.rsplit_once(':') {
        Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok(),
        None => false,
    }
}

/// `local@domain` with a non-empty local part without spaces, `@` or angle brackets, and a
/// valid domain name: what an alias or catch-all target must look like.
fn is_mail_address(text: &str) -> bool {
    match text.rsplit_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && !local
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_control() || "@<>".contains(c))
                && is_domain_name(domain)
        }
        None => false,
    }
}

/// A DNS name of LDH labels (RFC 1123), no trailing dot.
pub(crate) fn is_domain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Local parts that can be used as a Maildir folder name as they are.
pub fn is_maildir_safe_local_part(local: &str) -> bool {
    !local.is_empty()
        && local.len() <= 64
        && !local.starts_with('.')
        && local
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'+' | b'-'))
}

/// The checks of one [`crate::SiteLimits`] (at `queue.site_limits` or a site's `limits`).
fn validate_site_limits(
    key: &str,
    limits: &crate::SiteLimits,
    problem: &mut impl FnMut(String, String),
) {
    if limits.max_connections == 0 {
        problem(
            format!("{key}.max_connections"),
            "must be at least 1".into(),
        );
    }
    if let Err(e) = crate::Rate::parse(&limits.max_message_rate) {
        problem(format!("{key}.max_message_rate"), e);
    }
    if limits.recovery_interval.is_zero() {
        problem(
            format!("{key}.recovery_interval"),
            "must be longer than 0s".into(),
        );
    }
    if limits.throttle_memory < limits.recovery_interval {
        problem(
            format!("{key}.throttle_memory"),
            "must not be shorter than recovery_interval".into(),
        );
    }
    if limits.suspend_after == 0 {
        problem(format!("{key}.suspend_after"), "must be at least 1".into());
    }
    if limits.suspend_time.as_secs() == 0 {
        problem(format!("{key}.suspend_time"), "must be at least 1s".into());
    }
    if limits.max_suspend_time < limits.suspend_time {
        problem(
            format!("{key}.max_suspend_time"),
            "must not be shorter than suspend_time".into(),
        );
    }
}
