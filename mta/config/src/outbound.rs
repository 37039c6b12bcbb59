//! Config for everything after the spool: who may relay, where mail for a domain goes,
//! how the queue retries and expires, which DNS servers to ask, and the admin endpoint.

use crate::duration;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::time::Duration;

/// Who may send mail to non-local domains through this MTA.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default, rename_all = "snake_case")]
pub struct RelayConfig {
    /// Client networks (CIDR, e.g. `10.0.0.0/8`, `::1/128`) allowed to relay.
    /// Default: none, so this MTA relays for nobody.
    pub client_networks: Vec<ipnet::IpNet>,
}

/// How the SMTP client protects a connection (per route).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TlsMode {
    /// Never use TLS.
    None,
    /// STARTTLS when offered, any certificate; plain text when not offered. The default.
    #[default]
    Opportunistic,
    /// STARTTLS must succeed (any certificate), else the attempt is deferred.
    Required,
    /// STARTTLS must succeed with a certificate valid for the MX (or smarthost) name.
    Verified,
}

/// Where mail for one recipient domain goes. Routes are matched by exact domain first,
/// then `*`; a domain without a route goes to its MX hosts with opportunistic TLS.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct RouteConfig {
    /// Recipient domain, or `*` for every domain without a route of its own. Required.
    pub domain: String,
    /// Send everything to this `host:port` instead of the domain's MX hosts.
    /// Default: absent (direct MX delivery).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smarthost: Option<String>,
    /// TLS for this route. Default: `opportunistic`.
    #[serde(default)]
    pub tls: TlsMode,
    /// DANE (RFC 7672) for this route's delivery by MX, overriding `smtp_client.dane`:
    /// `true` (where the domain publishes it), `false`, or `required` (mandatory DANE,
    /// RFC 7672 §6: only MX hosts with DNSSEC-secure, usable TLSA records get mail;
    /// without any, the mail waits with `451 4.7.5`, and MTA-STS and opportunistic TLS
    /// are never used instead). Not allowed with `smarthost` (DANE applies to MX hosts
    /// only). Default: absent (`smtp_client.dane` decides).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dane: Option<DaneMode>,
    /// SMTP AUTH (PLAIN or LOGIN) towards the smarthost. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<RouteAuth>,
}

/// A route's `dane`: YAML `false`, `true` or `required`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DaneMode {
    /// `false`: no DANE, whatever the domain publishes.
    Off,
    /// `true`: DANE where the domain's zone is signed and its MX hosts publish TLSA
    /// records; as without it elsewhere.
    Opportunistic,
    /// `required`: mandatory DANE (RFC 7672 §6), for destinations that agreed to it.
    Required,
}

/// `smtp_client.dane`'s (and a route's YAML boolean's) meaning.
impl From<bool> for DaneMode {
    fn from(on: bool) -> Self {
        if on {
            DaneMode::Opportunistic
        } else {
            DaneMode::Off
        }
    }
}

impl Serialize for DaneMode {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            DaneMode::Off => serializer.serialize_bool(false),
            DaneMode::Opportunistic => serializer.serialize_bool(true),
            DaneMode::Required => serializer.serialize_str("required"),
        }
    }
}

impl<'de> Deserialize<'de> for DaneMode {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = DaneMode;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("true, false or required")
            }

            fn visit_bool<E: serde::de::Error>(self, on: bool) -> Result<DaneMode, E> {
                Ok(DaneMode::from(on))
            }

            fn visit_str<E: serde::de::Error>(self, word: &str) -> Result<DaneMode, E> {
                if word == "required" {
                    return Ok(DaneMode::Required);
                }
                // A quoted boolean (`'true'`) was read as one when this was a `bool`.
                match serde_saphyr::from_str::<bool>(word) {
                    Ok(on) => self.visit_bool(on),
                    Err(_) => Err(E::invalid_value(serde::de::Unexpected::Str(word), &self)),
                }
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// Credentials for a smarthost; the password (and, if wanted, the user name) is read from a
/// file (a mounted Secret) at each connection, so a rotated Secret applies without a reload.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct RouteAuth {
    /// User name. Required unless `username_file` is set.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub username: String,
    /// File whose content (trailing newline removed) is the user name. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username_file: Option<std::path::PathBuf>,
    /// File whose content (trailing newline removed) is the password. Required.
    pub password_file: std::path::PathBuf,
}

/// The queue: retries, lifetime, notices, concurrency.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default, rename_all = "snake_case")]
pub struct QueueConfig {
    /// Keep every accepted message on hold: no delivery attempts until released
    /// (`petrel-mta queue release`). For maintenance and benchmarks. Default: `false`.
    pub hold_all: bool,
    /// Delay before the first retry of a deferred recipient. Default: `5m`.
    #[serde(with = "duration")]
    pub retry_interval: Duration,
    /// Each further retry waits this many times longer than the last. Default: `2.0`.
    pub retry_backoff_factor: f64,
    /// Longest wait between two attempts. Default: `1h`.
    #[serde(with = "duration")]
    pub max_retry_interval: Duration,
    /// A message still undelivered this long after it arrived is bounced. Default: `5d`.
    #[serde(with = "duration")]
    pub max_age: Duration,
    /// Send a delay notice (RFC 3464, action `delayed`) once a message has waited this
    /// long; `off` disables them. Default: `4h`.
    #[serde(with = "duration::optional")]
    pub delay_warning_after: Option<Duration>,
    /// Simultaneous connections to one destination (MX domain or smarthost). Default: `10`.
    /// With `smtpd.rate_limits.redis` set it is the fleet's: at most this many across
    /// every pod sharing that Redis, and each pod's share (this / `fleet_size`, at least
    /// 1) while Redis is unreachable. LMTP destinations are always counted per pod.
    pub max_connections_per_destination: usize,
    /// Messages sent over one connection before it is closed. Default: `100`.
    pub max_messages_per_connection: usize,
    /// Outbound shaping: the limits of every *site* (the domains whose MX hosts are the
    /// same, with the same TLS policy in force, share one site and its limits) that no
    /// rule in `sites` names. Per pod. Default: see [`SiteLimits`].
    #[serde(default, skip_serializing_if = "SiteLimits::is_default")]
    pub site_limits: SiteLimits,
    /// Named sites: domains, or MX host patterns, that share one provider's limits
    /// whatever their MX sets (e.g. every domain hosted by one big mailbox provider).
    /// The first rule that matches wins. Default: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sites: Vec<SiteRule>,
    /// Bounces that cannot be delivered (their sender is `<>`) are not bounced again;
    /// when set, they are forwarded to this address instead. Default: none (logged only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postmaster: Option<String>,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            hold_all: false,
            retry_interval: Duration::from_secs(5 * 60),
            retry_backoff_factor: 2.0,
            max_retry_interval: Duration::from_secs(60 * 60),
            max_age: Duration::from_secs(5 * 24 * 3600),
            delay_warning_after: Some(Duration::from_secs(4 * 3600)),
            max_connections_per_destination: 10,
            max_messages_per_connection: 100,
            postmaster: None,
            site_limits: SiteLimits::default(),
            sites: Vec::new(),
        }
    }
}

/// How hard one site is pushed, and how it is backed off (adaptive throttling, AIMD).
///
/// A reply that says "too many connections" or "rate limited" (a *throttle*) halves the
/// site's connections (at least 1) and message rate at once, and remembers the level it
/// happened at as a ceiling; every `recovery_interval` with deliveries and no throttle,
/// one connection and a quarter of the ceiling's rate come back, up to the ceiling. A site
/// that keeps failing (`suspend_after` throttles or connection failures in a row with no
/// delivery between them) is suspended: its mail stays queued, deferred with `451 4.4.5`
/// naming the site, and is not tried there until the suspension ends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default, rename_all = "snake_case")]
pub struct SiteLimits {
    /// Simultaneous connections to the site from this pod, over all its domains.
    /// Default: `20`.
    pub max_connections: usize,
    /// Messages per interval to the site (`N/interval`, e.g. `5/1s`, `600/1m`), or `off`
    /// for no limit until the site throttles. Default: `off`.
    pub max_message_rate: String,
    /// How often a throttled site gets one step of its concurrency and rate back, while
    /// mail to it is delivered. Default: `2s`.
    #[serde(with = "duration")]
    pub recovery_interval: Duration,
    /// How long the ceilings learnt from a throttle are kept after the last one; then
    /// the configured limits apply again. Default: `15m`.
    #[serde(with = "duration")]
    pub throttle_memory: Duration,
    /// Throttles or connection failures in a row (each counted at most once a second)
    /// after which the site is suspended. Default: `5`.
    pub suspend_after: u32,
    /// The first suspension's length; each one that follows without a delivery between
    /// them lasts twice as long, up to `max_suspend_time`. Default: `1m`.
    #[serde(with = "duration")]
    pub suspend_time: Duration,
    /// The longest suspension. Default: `30m`.
    #[serde(with = "duration")]
    pub max_suspend_time: Duration,
}

impl Default for SiteLimits {
    fn default() -> Self {
        Self {
            max_connections: 20,
            max_message_rate: "off".into(),
            recovery_interval: Duration::from_secs(2),
            throttle_memory: Duration::from_secs(15 * 60),
            suspend_after: 5,
            suspend_time: Duration::from_secs(60),
            max_suspend_time: Duration::from_secs(30 * 60),
        }
    }
}

impl SiteLimits {
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// A named site: recipient domains, or MX host patterns, that share one set of limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct SiteRule {
    /// The site's name, in logs, deferral texts and metrics labels. Required, unique.
    pub name: String,
    /// Recipient domains of the site (exact names). Default: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub domains: Vec<String>,
    /// MX host names or patterns (`*.mail.example` matches any name under
    /// `mail.example`): a domain with any MX host that matches belongs to the site.
    /// Default: none. A rule needs `domains` or `mx`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mx: Vec<String>,
    /// The site's limits. Default: `queue.site_limits`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<SiteLimits>,
}

/// DNS resolution for MX lookups.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default, rename_all = "snake_case")]
pub struct DnsConfig {
    /// Name servers (`ip:port`) to ask. Default: empty, meaning the system's
    /// `/etc/resolv.conf`.
    pub nameservers: Vec<SocketAddr>,
}

/// The admin endpoint `petrel-mta queue …` talks to: one JSON request per line, each
/// carrying the token from `token_file`. Anything else (an HTTP request line, a wrong or
/// missing token) is refused before any queue operation runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default, rename_all = "snake_case")]
pub struct AdminConfig {
    /// Loopback address of the admin endpoint (TCP). Only loopback addresses are
    /// accepted. Default: `127.0.0.1:2580`.
    pub address: SocketAddr,
    /// File holding the admin token. At each start the MTA writes a new random token into
    /// it, mode 0600, so only the MTA's own user (and root) can read it and use the
    /// endpoint; `petrel-mta queue` reads it from the same place. Default: `admin.token`
    /// in the directory that holds `spool.path` (`./petrel-data/admin.token` for the
    /// embedded default, `/var/lib/petrel/admin.token` on the queue volume in a pod).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<std::path::PathBuf>,
    /// File holding the token the whole fleet shares (the operator writes it into a
    /// Secret every pod of a listener mounts). When set, the HTTP endpoint also serves
    /// `/admin/drain` (the operator drains a pod before scale-in) and `/admin/handoff` (a
    /// draining peer hands its messages over), both only to requests bearing it
    /// (`Authorization: Bearer …`). Unset (default): those endpoints do not exist.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet_token_file: Option<std::path::PathBuf>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            address: SocketAddr::from(([127, 0, 0, 1], 2580)),
            token_file: None,
            fleet_token_file: None,
        }
    }
}

/// The outbound SMTP client: MX port, trusted CAs, MTA-STS, and timeouts per phase
/// (RFC 5321 §4.5.3.2 defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default, rename_all = "snake_case")]
pub struct SmtpClientConfig {
    /// TCP port of MX hosts. Default: `25`; change it only for tests.
    pub port: u16,
    /// Extra CA certificates (PEM) trusted for `tls: verified`, besides the Mozilla roots.
    /// Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<std::path::PathBuf>,
    /// Apply MTA-STS (RFC 8461) to delivery by MX: when the recipient domain publishes an
    /// `_mta-sts` TXT record, fetch its policy from `https://mta-sts.<domain>/` (certificate
    /// checked against the Mozilla roots and `ca_file`) and cache it for its `max_age`.
    /// With `mode: enforce` only MX hosts the policy lists are used, always over TLS
    /// verified for the MX name (whatever the route's `tls` says); a failure defers with
    /// `4.7.5`. With `mode: testing` mail goes as usual and what enforce would have
    /// refused is logged as a warning. Smarthost and LMTP routes are never affected.
    /// Default: `true`.
    pub mta_sts: bool,
    /// TCP port of the HTTPS servers MTA-STS policies are fetched from. Default: `443`;
    /// change it only for tests.
    pub mta_sts_port: u16,
    /// Apply DANE (RFC 7672) to delivery by MX. MX, address and TLSA records are looked
    /// up with DNSSEC validation (against `dnssec_trust_anchor`). When the MX records and
    /// a host's addresses are signed (secure) and the host publishes usable TLSA records
    /// at `_25._tcp.<host>`, TLS is mandatory and the certificate must match them: DANE-EE
    /// (`3 x x`) matches the server's key or certificate (names and expiry are ignored),
    /// DANE-TA (`2 x x`) needs a chain to the published authority and the MX host name.
    /// Unsigned (insecure) domains are delivered as without DANE (opportunistic TLS or
    /// MTA-STS); DANE, where it applies, wins over MTA-STS (RFC 8461 §2). A bogus
    /// (forged or broken) answer or a failed TLSA lookup defers with `4.7.5`, never
    /// falls back to plain text. The name servers in `dns` must pass DNSSEC records
    /// through (any validating or DNSSEC-aware recursive resolver does); with ones that
    /// strip them every answer is bogus and mail by MX waits. Default: `true`.
    pub dane: bool,
    /// File of DNSKEY records (zone-file lines, e.g. `. IN DNSKEY 257 3 8 AwEAA…`) that
    /// DNSSEC validation trusts. Default: absent, meaning the root zone's published keys
    /// (KSK-2017 and KSK-2024, built in). Set it only for a private DNS tree or tests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dnssec_trust_anchor: Option<std::path::PathBuf>,
    /// TLS-RPT (RFC 8460): results of delivery by MX to domains that ask for reports, and
    /// the aggregate reports sent to them.
    #[serde(default, skip_serializing_if = "TlsRptConfig::is_default")]
    pub tls_rpt: TlsRptConfig,
    /// TCP connect. Default: `30s`.
    #[serde(with = "duration")]
    pub connect_timeout: Duration,
    /// Greeting, EHLO, STARTTLS, AUTH, MAIL and RCPT replies. Default: `5m`.
    #[serde(with = "duration")]
    pub command_timeout: Duration,
    /// Reply to DATA (the 354). Default: `2m`.
    #[serde(with = "duration")]
    pub data_init_timeout: Duration,
    /// Each write of message content. Default: `3m`.
    #[serde(with = "duration")]
    pub data_block_timeout: Duration,
    /// Reply after the final dot. Default: `10m`.
    #[serde(with = "duration")]
    pub data_done_timeout: Duration,
}

impl Default for SmtpClientConfig {
    fn default() -> Self {
        Self {
            port: 25,
            ca_file: None,
            mta_sts: true,
            mta_sts_port: 443,
            dane: true,
            dnssec_trust_anchor: None,
            tls_rpt: TlsRptConfig::default(),
            connect_timeout: Duration::from_secs(30),
            command_timeout: Duration::from_secs(5 * 60),
            data_init_timeout: Duration::from_secs(2 * 60),
            data_block_timeout: Duration::from_secs(3 * 60),
            data_done_timeout: Duration::from_secs(10 * 60),
        }
    }
}

/// TLS-RPT (RFC 8460). Each connection by MX to a domain that publishes a
/// `_smtp._tls` TXT record (`v=TLSRPTv1; rua=…`) counts as a success or as a failure of
/// the policy that applied (DANE's TLSA records, the MTA-STS policy, or none), with the
/// RFC 8460 result type. Every `report_interval`, each such domain gets one aggregate
/// JSON report, gzipped, by mail (`mailto:`, with `TLS-Required: No`) or HTTPS POST
/// (`https:`) as its record asks. Reports are never counted in reports. Counts are saved
/// in the spool directory and survive a restart. With `smtpd.rate_limits.redis` the
/// fleet's counts are added up in Redis and one pod sends each report; without it (or
/// while Redis is unreachable) each pod reports its own under its own report id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default, rename_all = "snake_case")]
pub struct TlsRptConfig {
    /// Record results and send reports. Default: `true`.
    pub enabled: bool,
    /// Time covered by one report. Default: `1d` (RFC 8460 §4.1); change it only for tests.
    #[serde(with = "duration")]
    pub report_interval: Duration,
    /// `From:` and envelope sender of mailed reports. Default: absent, meaning
    /// `tls-reports@<hostname>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sender: Option<String>,
    /// `organization-name` of the reports. Default: absent, meaning `hostname`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub organization: Option<String>,
}

impl Default for TlsRptConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            report_interval: Duration::from_secs(24 * 3600),
            sender: None,
            organization: None,
        }
    }
}

impl TlsRptConfig {
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// DKIM signing of outbound mail (RFC 6376), relaxed/relaxed, From over-signed.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default, rename_all = "snake_case")]
pub struct DkimConfig {
    /// Signing keys. A message whose From domain has keys here, and that goes to at least
    /// one non-local recipient, gets one signature per signing key of that domain.
    /// Default: none.
    pub keys: Vec<DkimKeyConfig>,
}

/// One DKIM key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct DkimKeyConfig {
    /// Signing domain (`d=`). Required.
    pub domain: String,
    /// Selector (`s=`); its public key is published at `<selector>._domainkey.<domain>`.
    pub selector: String,
    /// PEM private key: RSA (PKCS#1 or PKCS#8) or Ed25519 (PKCS#8). Required.
    pub key_file: std::path::PathBuf,
    /// Whether mail is signed with this key. `false` loads the key (a config naming an
    /// unreadable key is refused) and reports it in `petrel_mta_dkim_keys` without signing:
    /// the operator stages the next key of a rotation this way, and switches signing over
    /// only once every pod reports it has the key. Default: `true`.
    #[serde(default = "signs_by_default")]
    pub sign: bool,
}

fn signs_by_default() -> bool {
    true
}

/// What to do with a client listed on a DNSBL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DnsblAction {
    /// Refuse its recipients with `554 5.7.1`, naming the list.
    #[default]
    Reject,
    /// Accept, and add an `X-Petrel-DNSBL:` header naming the list.
    Tag,
}

/// Inbound checks on arriving mail, on every listener whose `inbound_checks` is on (the
/// default). Authenticated clients and `trusted_networks` are exempt. Relay policy lives elsewhere (`relay`): nothing here can
/// widen who may relay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default, rename_all = "snake_case")]
pub struct MailAuthConfig {
    /// Check SPF, DKIM, DMARC and ARC and add an `Authentication-Results:` header (after
    /// removing forged ones that claim our host name). Default: `false`.
    pub verify: bool,
    /// Refuse (`550 5.7.1`) a message failing DMARC whose domain publishes `p=reject`;
    /// `p=quarantine` failures get `X-Petrel-Quarantine: yes`. Default: `true`.
    pub dmarc_enforce: bool,
    /// DNSBL zones to look the client address up in, e.g. `zen.spamhaus.org`.
    /// Default: none.
    pub dnsbl_zones: Vec<String>,
    /// Default: `reject`.
    pub dnsbl_action: DnsblAction,
    /// Client networks exempt from these checks. Default: none.
    pub trusted_networks: Vec<ipnet::IpNet>,
    /// Time allowed for each DNS query of these checks. Default: `5s`.
    #[serde(with = "duration")]
    pub dns_timeout: Duration,
}

impl Default for MailAuthConfig {
    fn default() -> Self {
        Self {
            verify: false,
            dmarc_enforce: true,
            dnsbl_zones: Vec::new(),
            dnsbl_action: DnsblAction::Reject,
            trusted_networks: Vec::new(),
            dns_timeout: Duration::from_secs(5),
        }
    }
}
