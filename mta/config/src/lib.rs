//! The `MtaConfig` document: the one contract between `petrel-operator` (which renders it)
//! and `petrel-mta` (which reads it).
//!
//! Owns: the YAML schema (serde, `deny_unknown_fields`, documented defaults), parsing, and
//! [`MtaConfig::validate`]. The operator builds this very type and calls the very same
//! `validate`, so it can never render a config the MTA would refuse.
//!
//! Never does I/O beyond reading the one file it is asked to parse: paths named here are
//! checked by the MTA when it opens them, not by this crate.

mod duration;
mod outbound;
mod validate;

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use outbound::{
    AdminConfig, DaneMode, DkimConfig, DkimKeyConfig, DnsConfig, DnsblAction, MailAuthConfig,
    QueueConfig, RelayConfig, RouteAuth, RouteConfig, SiteLimits, SiteRule, SmtpClientConfig,
    TlsMode, TlsRptConfig,
};
pub use validate::{ConfigError, Problem, is_maildir_safe_local_part};

/// The only document version this build understands.
pub const CONFIG_VERSION: u32 = 1;

/// The whole configuration of one `petrel-mta` process.
///
/// Every field has a default, so `{}` is a valid (if useless) config; the embedded default
/// used by `petrel-mta serve` with no arguments is [`MtaConfig::embedded_default`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default, rename_all = "snake_case")]
pub struct MtaConfig {
    /// Document version. Default: `1`, the only version this build accepts.
    pub version: u32,
    /// Name this server uses for itself in the greeting, EHLO reply and `Received:` headers.
    /// Default: `localhost`.
    pub hostname: String,
    /// Where the MTA accepts SMTP connections. Default: one plain `smtp` listener on
    /// `127.0.0.1:2525`.
    pub listeners: Vec<ListenerConfig>,
    /// Limits enforced by the SMTP server side of each session (`smtpd_*` in Postfix terms).
    pub smtpd: SmtpdConfig,
    /// The durable queue.
    pub spool: SpoolConfig,
    /// Domains whose mail is delivered here rather than relayed. Default: none.
    pub local_domains: Vec<LocalDomainConfig>,
    /// Who may relay to other domains. Default: nobody.
    pub relay: RelayConfig,
    /// Where mail for non-local domains goes. Default: none (direct MX delivery).
    pub routes: Vec<RouteConfig>,
    /// Retries, expiry, notices and concurrency of the queue.
    pub queue: QueueConfig,
    /// Outbound SMTP client timeouts (`smtp_*` in Postfix terms).
    pub smtp_client: SmtpClientConfig,
    /// Resolver used for MX lookups.
    pub dns: DnsConfig,
    /// The loopback admin endpoint used by `petrel-mta queue`, and its token file.
    pub admin: AdminConfig,
    /// The server certificate for STARTTLS and implicit TLS.
    pub tls: TlsConfig,
    /// DKIM signing keys for outbound mail.
    pub dkim: DkimConfig,
    /// SPF/DKIM/DMARC/ARC verification and DNSBL checks of inbound mail.
    pub mail_auth: MailAuthConfig,
    /// The observability endpoint: `/metrics`, `/healthz`, `/readyz`.
    pub http: HttpConfig,
}

/// The HTTP endpoint for probes and Prometheus (separate from SMTP and from the admin
/// endpoint).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default, rename_all = "snake_case")]
pub struct HttpConfig {
    /// Address to serve on, e.g. `0.0.0.0:8080` in a pod. Default: none (not served).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<SocketAddr>,
}

/// The server's TLS certificate. The files are re-read when they change on disk (a
/// mounted Secret is replaced by a symlink swap), without dropping sessions; a broken new
/// pair is refused and the old one stays in use.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default, rename_all = "snake_case")]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first. Default: none, so no STARTTLS is offered and
    /// `submission`/`smtps` listeners cannot be used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1). Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// When the two files do not exist, generate a self-signed certificate for
    /// `hostname` into them at start-up. Default: `false` (the embedded default sets it).
    pub generate_self_signed: bool,
}

/// What a listener speaks on its port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ListenerKind {
    /// MTA-to-MTA SMTP (port 25): accepts mail for local domains from anyone.
    Smtp,
    /// Message submission with STARTTLS (port 587, RFC 6409).
    Submission,
    /// Message submission over implicit TLS (port 465, RFC 8314).
    Smtps,
}

/// One listening socket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct ListenerConfig {
    /// Socket address to bind, e.g. `0.0.0.0:25` or `[::]:587`. Required.
    pub address: SocketAddr,
    /// Protocol flavour of this port. Default: `smtp`.
    #[serde(default = "default_listener_kind")]
    pub kind: ListenerKind,
    /// Every connection starts with a PROXY protocol header (HAProxy's v1 text or v2
    /// binary form, told apart automatically), as sent by a load balancer that keeps the
    /// client's address this way. The address in the header then stands for the client
    /// everywhere: per-IP connection and rate limits, `relay.client_networks`, SPF and
    /// DNSBL checks, the `Received:` header and the logs. The header is read before the
    /// greeting and, on `smtps`, before the TLS handshake; a connection without a valid
    /// header within `smtpd.proxy_header_timeout` is closed. A v2 `LOCAL` header (a
    /// health check) or v1 `UNKNOWN` keeps the socket's address. Only turn this on behind
    /// a proxy that sends the header: plain clients are dropped. Default: `false`.
    #[serde(default, skip_serializing_if = "is_false")]
    pub proxy_protocol: bool,
    /// Networks (CIDR) whose connections may carry the PROXY header; a connection from
    /// anywhere else is closed before a byte is read, so a client that reaches the port
    /// directly cannot claim another address. Set it when the port is reachable by more
    /// than the proxy (e.g. a pod address inside the cluster). Needs `proxy_protocol`, and
    /// an empty list is refused (it would close every connection). Default: absent, which
    /// trusts any sender: a cloud load balancer's source addresses are often neither known
    /// nor stable, and the port is then guarded by the network (a NetworkPolicy) instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_trusted_networks: Option<Vec<ipnet::IpNet>>,
    /// Run the inbound checks of `mail_auth` (SPF/DKIM/DMARC/ARC verification and its
    /// enforcement, DNSBL) on this listener. Turn it off for a port only trusted systems
    /// reach (an internal relay port), so their mail is neither tagged nor refused there;
    /// other ports keep the checks. Authenticated clients and `mail_auth.trusted_networks`
    /// are exempt on every port anyway. Default: `true`.
    #[serde(default = "default_true", skip_serializing_if = "is_true")]
    pub inbound_checks: bool,
}

impl ListenerConfig {
    /// A listener on `address` of `kind` with every other setting at its default.
    pub fn new(address: SocketAddr, kind: ListenerKind) -> Self {
        Self {
            address,
            kind,
            proxy_protocol: false,
            proxy_trusted_networks: None,
            inbound_checks: true,
        }
    }
}

fn default_true() -> bool {
    true
}

// Left out of the serialised form at its default, like `proxy_protocol`.
fn is_true(value: &bool) -> bool {
    *value
}

// Left out of the serialised form when off, so a config rendered without PROXY protocol
// reads exactly as before the setting existed.
fn is_false(value: &bool) -> bool {
    !*value
}

fn default_listener_kind() -> ListenerKind {
    ListenerKind::Smtp
}

/// Per-session limits. Each one, when hit, produces a precise SMTP reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default, rename_all = "snake_case")]
pub struct SmtpdConfig {
    /// Largest message accepted, in bytes (advertised as `SIZE`). Larger ones get
    /// `552 5.3.4`. Default: `26214400` (25 MiB).
    pub max_message_size: u64,
    /// Most recipients in one transaction; the next gets `452 4.5.3`. Default: `100`.
    pub max_recipients: usize,
    /// Time allowed for each command line, from when the server waits for it to its end
    /// (RFC 5321 §4.5.3.2.7 says at least 5 minutes). It is a total: bytes trickling in do
    /// not restart it. Expiry closes the session with `421 4.4.2`. Default: `5m`.
    #[serde(with = "duration")]
    pub command_timeout: Duration,
    /// Time allowed between two reads while receiving DATA or BDAT content
    /// (RFC 5321 §4.5.3.2.5: 3 minutes at least). Default: `10m`.
    #[serde(with = "duration")]
    pub data_timeout: Duration,
    /// Time allowed for one transaction, from MAIL to the end of its message, on top of
    /// what `min_data_rate` allows for its content. Expiry closes the session with
    /// `421 4.4.2`. Default: `10m`.
    #[serde(
        with = "duration",
        skip_serializing_if = "is_default_transaction_timeout"
    )]
    pub transaction_timeout: Duration,
    /// Slowest message content accepted, in bytes per second: each byte of DATA or BDAT
    /// content adds `1/min_data_rate` seconds to the transaction's time, so a client
    /// sending at least this fast is never cut off, and one trickling bytes is. Default:
    /// `500` (Postfix's `smtp_min_data_rate`).
    #[serde(skip_serializing_if = "is_default_min_data_rate")]
    pub min_data_rate: u64,
    /// Once `max_connections` is reached, a new connection is not refused while some
    /// session has waited this long for a command line to finish: the session that has
    /// waited longest is closed (`421 4.4.2`) and the new one takes its place. Sessions
    /// receiving message content are never chosen. Default: `10s`.
    #[serde(
        with = "duration",
        skip_serializing_if = "is_default_pressure_idle_timeout"
    )]
    pub pressure_idle_timeout: Duration,
    /// Protocol errors tolerated in one session before it is closed with `421 4.7.0`.
    /// Default: `10`.
    pub max_errors: u32,
    /// Concurrent connections over all listeners; further ones get `421 4.7.0` and are
    /// closed. Default: `5000`.
    pub max_connections: usize,
    /// Concurrent connections from one client IP address. On a `proxy_protocol`
    /// listener the address is the one in the PROXY header, counted once the header has
    /// been read (the proxy's own address is not limited). Default: `50`.
    pub max_connections_per_ip: usize,
    /// Clients (CIDR) to which `max_connections_per_ip` and the per-IP rate limits
    /// (`rate_limits.messages_per_ip`, `recipients_per_ip`) do not apply, as Postfix exempts
    /// `$mynetworks` (`smtpd_client_event_limit_exceptions`): local applications and
    /// benchmarks are served, not refused. `max_connections` still bounds everyone (it
    /// protects the server itself), as do per-user and per-domain limits and AUTH
    /// lockouts. Default: absent, meaning `relay.client_networks`; the embedded default
    /// exempts loopback (`127.0.0.0/8`, `::1/128`) without relaying for it; `[]` exempts
    /// no one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit_exempt_networks: Option<Vec<ipnet::IpNet>>,
    /// Time allowed for the PROXY protocol header on `proxy_protocol` listeners, from
    /// accept to the header's last byte; expiry closes the connection without a reply.
    /// A proxy sends the header at once. Default: `5s` (Postfix's
    /// `smtpd_upstream_proxy_timeout`).
    #[serde(with = "duration")]
    pub proxy_header_timeout: Duration,
    /// File of `user:argon2-PHC-hash[:sender,...]` lines (write entries with
    /// `petrel-mta passwd`). Senders are addresses or `@domain`s the user may use in MAIL
    /// FROM; without them, only the user name itself (when it is an address). AUTH is
    /// offered only when this is set. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_users_file: Option<PathBuf>,
    /// Offer AUTH on connections without TLS. Only for tests. Default: `false`.
    pub auth_allow_plaintext: bool,
    /// Message and recipient rates per client address and per authenticated user.
    pub rate_limits: RateLimitsConfig,
}

/// Rates written as `N/interval`, e.g. `100/1m`; `off` (the default for none) disables.
/// Exceeding one gets `451 4.7.1` for that MAIL or RCPT.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default, rename_all = "snake_case")]
pub struct RateLimitsConfig {
    /// Messages (MAIL commands) per client IP. Default: `3000/1m`.
    pub messages_per_ip: String,
    /// Recipients per client IP. Default: `15000/1m`.
    pub recipients_per_ip: String,
    /// Messages per authenticated user. Default: `1000/1m`.
    pub messages_per_user: String,
    /// Recipients per destination domain (outbound, at RCPT). Default: `off`.
    pub recipients_per_domain: String,
    /// A Redis shared by every pod of the fleet that holds the rate counters and the
    /// outbound connection leases, so the rates above and
    /// `queue.max_connections_per_destination` are the fleet's rather than each pod's.
    /// Default: none (each pod counts alone). `url` and `timeout` are read at start (a
    /// change takes effect when the MTA restarts); `fleet_size` follows config reloads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisLimitsConfig>,
}

/// Where the fleet's rate counters and connection leases live, and what each pod does
/// without them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct RedisLimitsConfig {
    /// `redis://host:port/db`, e.g. `redis://petrel-redis:6379/0` (plain TCP).
    pub url: String,
    /// Longest a rate check or a connection lease waits on Redis (connect or command)
    /// before the pod counts alone. Default: `50ms`; at most `1s`.
    #[serde(with = "duration", default = "default_redis_timeout")]
    pub timeout: Duration,
    /// Pods sharing the limits. While Redis is unreachable each pod allows
    /// `N / fleet_size` of a rate `N/interval`, and of N connections per destination
    /// (at least 1 of each), so the fleet stays within N.
    /// Whoever scales the fleet keeps it current (a reload applies it at once).
    pub fleet_size: u32,
}

/// The longest `smtpd.rate_limits.redis.timeout` may be: mail must not wait on Redis.
pub const MAX_REDIS_TIMEOUT: Duration = Duration::from_secs(1);

fn default_redis_timeout() -> Duration {
    Duration::from_millis(50)
}

impl Default for RateLimitsConfig {
    fn default() -> Self {
        Self {
            messages_per_ip: "3000/1m".into(),
            recipients_per_ip: "15000/1m".into(),
            messages_per_user: "1000/1m".into(),
            recipients_per_domain: "off".into(),
            redis: None,
        }
    }
}

/// A parsed rate: `count` events per `interval`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub interval: Duration,
}

impl Rate {
    /// `N/interval` or `off` (→ `None`).
    pub fn parse(text: &str) -> Result<Option<Rate>, String> {
        if text == "off" {
            return Ok(None);
        }
        let (count, interval) = text
            .split_once('/')
            .ok_or_else(|| format!("{text:?} is not N/interval (e.g. 100/1m) or off"))?;
        let count: u32 = count
            .trim()
            .parse()
            .map_err(|_| format!("{count:?} is not a count"))?;
        let interval =
            humantime::parse_duration(interval.trim()).map_err(|e| format!("{interval:?}: {e}"))?;
        if count == 0 || interval.is_zero() {
            return Err(format!("{text:?}: count and interval must be positive"));
        }
        Ok(Some(Rate { count, interval }))
    }

    /// One pod's share of this rate among `fleet_size` pods: `count / fleet_size`
    /// (rounded down, at least 1) per the same interval, so the shares together never
    /// exceed the rate.
    pub fn share(self, fleet_size: u32) -> Rate {
        Rate {
            count: (self.count / fleet_size.max(1)).max(1),
            interval: self.interval,
        }
    }
}

const DEFAULT_TRANSACTION_TIMEOUT: Duration = Duration::from_secs(10 * 60);
const DEFAULT_MIN_DATA_RATE: u64 = 500;
const DEFAULT_PRESSURE_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

// The slow-client limits are left out of the serialised form at their defaults, so a
// config rendered without them reads exactly as before they existed.
fn is_default_transaction_timeout(value: &Duration) -> bool {
    *value == DEFAULT_TRANSACTION_TIMEOUT
}

fn is_default_min_data_rate(value: &u64) -> bool {
    *value == DEFAULT_MIN_DATA_RATE
}

fn is_default_pressure_idle_timeout(value: &Duration) -> bool {
    *value == DEFAULT_PRESSURE_IDLE_TIMEOUT
}

impl Default for SmtpdConfig {
    fn default() -> Self {
        Self {
            max_message_size: 25 * 1024 * 1024,
            max_recipients: 100,
            command_timeout: Duration::from_secs(5 * 60),
            data_timeout: Duration::from_secs(10 * 60),
            transaction_timeout: DEFAULT_TRANSACTION_TIMEOUT,
            min_data_rate: DEFAULT_MIN_DATA_RATE,
            pressure_idle_timeout: DEFAULT_PRESSURE_IDLE_TIMEOUT,
            max_errors: 10,
            max_connections: 5000,
            max_connections_per_ip: 50,
            limit_exempt_networks: None,
            proxy_header_timeout: Duration::from_secs(5),
            auth_users_file: None,
            auth_allow_plaintext: false,
            rate_limits: RateLimitsConfig::default(),
        }
    }
}

/// The durable queue on the pod's volume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default, rename_all = "snake_case")]
pub struct SpoolConfig {
    /// Directory holding the spool segments. Created when missing.
    /// Default: `./petrel-data/spool`.
    pub path: PathBuf,
    /// A segment file is closed and a new one started once it grows past this many bytes.
    /// On a volume smaller than eight segments the MTA uses an eighth of the volume instead
    /// (at least 64 KiB), so finished segments can always be deleted; it logs so at start.
    /// Default: `67108864` (64 MiB).
    pub segment_size: u64,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::from("./petrel-data/spool"),
            segment_size: 64 * 1024 * 1024,
        }
    }
}

/// A domain whose mail this MTA delivers itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct LocalDomainConfig {
    /// The domain, e.g. `example.test`. Required; matched case-insensitively.
    pub name: String,
    /// Where its mail goes. Required.
    pub delivery: LocalDelivery,
    /// Local parts that exist. When set, any other local part gets `550 5.1.1` at RCPT;
    /// when absent, every local part is accepted. Default: absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipients: Option<Vec<String>>,
    /// Virtual aliases: a local part and the addresses its mail goes to instead, local or
    /// remote (forwarding). Expanded at RCPT, through local aliases again (at most 8
    /// levels); each target becomes a recipient of its own, with the address the client
    /// gave as its DSN original recipient. An alias exists even when `recipients` does not
    /// list it. Keys are plain local parts, matched like mailboxes (case-insensitive,
    /// `+detail` ignored). Default: none.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub aliases: BTreeMap<String, Vec<String>>,
    /// The address that receives mail for local parts that do not exist (instead of
    /// `550 5.1.1`). Needs `recipients`: without it every local part exists. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catch_all: Option<String>,
}

/// A local delivery target.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum LocalDelivery {
    /// Maildir++ folders under `root/<local part>/{tmp,new,cur}`.
    Maildir {
        /// Directory holding one Maildir per user. Created when missing.
        root: PathBuf,
    },
    /// An LMTP server (RFC 2033), e.g. Dovecot's `lmtp` service.
    Lmtp {
        /// `host:port` for TCP, or an absolute path to a unix socket.
        address: String,
    },
    /// Another SMTP server that holds the mailboxes (an internal groupware server, say):
    /// this MTA accepts the domain's mail from anyone and forwards it there.
    Relay {
        /// `host:port` of that server.
        host: String,
        /// TLS towards it. Default: `opportunistic`.
        #[serde(default)]
        tls: TlsMode,
    },
}

impl Default for MtaConfig {
    fn default() -> Self {
        Self {
            version: CONFIG_VERSION,
            hostname: "localhost".to_owned(),
            listeners: vec![ListenerConfig::new(
                SocketAddr::from(([127, 0, 0, 1], 2525)),
                ListenerKind::Smtp,
            )],
            smtpd: SmtpdConfig::default(),
            spool: SpoolConfig::default(),
            local_domains: Vec::new(),
            relay: RelayConfig::default(),
            routes: Vec::new(),
            queue: QueueConfig::default(),
            smtp_client: SmtpClientConfig::default(),
            dns: DnsConfig::default(),
            admin: AdminConfig::default(),
            tls: TlsConfig::default(),
            dkim: DkimConfig::default(),
            mail_auth: MailAuthConfig::default(),
            http: HttpConfig::default(),
        }
    }
}

impl MtaConfig {
    /// The configuration `petrel-mta serve` runs with no `--config`: plain SMTP on
    /// 127.0.0.1:2525, spool and Maildirs under `./petrel-data/`, mail for `localhost` and
    /// `example.test` delivered locally, nothing relayed.
    pub fn embedded_default() -> Self {
        let maildir = |domain: &str| LocalDomainConfig {
            name: domain.to_owned(),
            delivery: LocalDelivery::Maildir {
                root: PathBuf::from("./petrel-data/maildir").join(domain),
            },
            recipients: None,
            aliases: BTreeMap::new(),
            catch_all: None,
        };
        Self {
            local_domains: vec![maildir("localhost"), maildir("example.test")],
            // Local applications and benchmarks are not limited like strangers (issue 13,
            // item 11); nothing is relayed for them all the same.
            smtpd: SmtpdConfig {
                limit_exempt_networks: Some(vec![
                    ipnet::IpNet::V4(ipnet::Ipv4Net::new_assert(
                        std::net::Ipv4Addr::new(127, 0, 0, 0),
                        8,
                    )),
                    ipnet::IpNet::V6(ipnet::Ipv6Net::new_assert(
                        std::net::Ipv6Addr::LOCALHOST,
                        128,
                    )),
                ]),
                ..SmtpdConfig::default()
            },
            tls: TlsConfig {
                cert_file: Some(PathBuf::from("./petrel-data/tls/cert.pem")),
                key_file: Some(PathBuf::from("./petrel-data/tls/key.pem")),
                generate_self_signed: true,
            },
            ..Self::default()
        }
    }

    /// Parses a YAML document and validates it. Errors name the key and what is wrong.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        let config: Self = serde_saphyr::from_str(text).map_err(ConfigError::Syntax)?;
        config.validate()?;
        Ok(config)
    }

    /// Reads, parses and validates a config file.
    pub fn from_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_yaml(&text)
    }

    /// Serialises to YAML (what the operator writes into its ConfigMap).
    pub fn to_yaml(&self) -> String {
        serde_saphyr::to_string(self).unwrap_or_else(|e| format!("# cannot serialise: {e}\n"))
    }

    /// The route for a recipient domain: its own, else `*`, else none (direct MX).
    pub fn route(&self, domain: &str) -> Option<&RouteConfig> {
        self.routes
            .iter()
            .find(|r| r.domain.eq_ignore_ascii_case(domain))
            .or_else(|| self.routes.iter().find(|r| r.domain == "*"))
    }

    /// Where the admin token lives: `admin.token_file`, else `admin.token` beside the
    /// spool directory.
    pub fn admin_token_file(&self) -> PathBuf {
        if let Some(file) = &self.admin.token_file {
            return file.clone();
        }
        let dir = self
            .spool
            .path
            .parent()
            .unwrap_or(self.spool.path.as_path());
        dir.join("admin.token")
    }

    /// Whether per-IP connection and rate limits spare `client`: it is in
    /// `smtpd.limit_exempt_networks`, or (when that is absent) in `relay.client_networks`.
    pub fn limits_exempt(&self, client: std::net::IpAddr) -> bool {
        self.smtpd
            .limit_exempt_networks
            .as_ref()
            .unwrap_or(&self.relay.client_networks)
            .iter()
            .any(|net| net.contains(&client))
    }

    /// The local domain entry for `domain`, if any (case-insensitive).
    pub fn local_domain(&self, domain: &str) -> Option<&LocalDomainConfig> {
        self.local_domains
            .iter()
            .find(|d| d.name.eq_ignore_ascii_case(domain))
    }
}

#[cfg(test)]
mod tests;
