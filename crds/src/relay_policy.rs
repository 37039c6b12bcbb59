//! `RelayPolicy`: who may relay mail through Petrel to other domains, how fast, and by
//! which route.
//!
//! Owns the spec (authenticated users from a Secret, client networks, rate limits, outbound
//! route, TLS requirements, message size) and the status (conditions). The CEL rules make an
//! open relay impossible to declare by accident.

// kube's `printcolumn(name = .., type_ = ..)` repeats keys across columns by design.
#![allow(clippy::duplicated_attributes)]

use crate::conditions::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// Relay permissions and the outbound route. Applies to every SmtpListener in the namespace.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "mail.petrel.dev",
    version = "v1alpha1",
    kind = "RelayPolicy",
    namespaced,
    status = "RelayPolicyStatus",
    shortname = "rp",
    category = "petrel",
    doc = "Who may relay through Petrel, how fast, and by which route.",
    printcolumn(name = "Route", type_ = "string", json_path = ".spec.route.mode"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.authentication) || size(self.clientNetworks) > 0").message("a RelayPolicy must allow authenticated users or clientNetworks; otherwise it permits nobody"))]
pub struct RelayPolicySpec {
    /// SMTP AUTH for submission: users and password hashes come from a Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authentication: Option<Authentication>,
    /// Client networks (CIDR) allowed to relay without authentication, e.g. a cluster's pod
    /// network. `0.0.0.0/0` and `::/0` are refused: that would be an open relay. At most 256
    /// entries of at most 43 characters each (the longest IPv6 CIDR).
    #[serde(default)]
    #[schemars(length(max = 256), inner(length(max = 43)))]
    #[x_kube(
        validation = Rule::new("self.all(n, isCIDR(n))").message("clientNetworks entries must be CIDRs like 10.0.0.0/8"),
        validation = Rule::new("self.all(n, !isCIDR(n) || cidr(n).prefixLength() > 0)").message("a /0 network would make an open relay")
    )]
    pub client_networks: Vec<String>,
    /// Rate limits; absent members mean unlimited.
    #[serde(default)]
    pub rate_limits: RateLimits,
    /// How relayed mail leaves.
    #[serde(default)]
    pub route: Route,
    /// TLS requirements for outbound delivery.
    #[serde(default)]
    pub outbound_tls: OutboundTls,
    /// Largest relayed message, in bytes. Default: the listener's limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1024))]
    pub max_message_size: Option<u64>,
    /// Outbound shaping: connection and message-rate limits per *site* (the domains
    /// whose MX hosts are the same share one), lowered at once when a site throttles and
    /// recovered gradually. Taken from the same policy as the route. Default: the MTA's
    /// (20 connections per site, no rate limit until a site throttles).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outbound_shaping: Option<OutboundShaping>,
}

/// Outbound shaping: the limits of every site, and named sites with their own.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct OutboundShaping {
    /// The limits of every site that no entry of `sites` names.
    #[serde(default)]
    pub defaults: SiteLimits,
    /// Named sites: recipient domains, or MX host patterns (`*.mail.example`), that
    /// share one provider's limits whatever their MX sets. The first that matches wins.
    /// At most 64.
    #[serde(default)]
    #[schemars(length(max = 64))]
    pub sites: Vec<Site>,
}

/// How hard one site is pushed; absent members keep the MTA's defaults.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SiteLimits {
    /// Simultaneous connections to the site from each pod. Default: 20.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_connections: Option<u32>,
    /// Messages per interval to the site from each pod. Default: none until the site
    /// throttles.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_message_rate: Option<Rate>,
    /// How often a throttled site gets a step of its limits back while mail to it is
    /// delivered, like `2s`. Default: `2s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new(crate::DURATION_RULE).message("recoveryInterval is a duration like 2s or 1m"))]
    pub recovery_interval: Option<String>,
    /// Throttles or connection failures in a row before the site is suspended (its mail
    /// waits in the queue). Default: 5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub suspend_after: Option<u32>,
    /// The first suspension's length, doubling for each one in a row, like `1m`.
    /// Default: `1m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new(crate::DURATION_RULE).message("suspendTime is a duration like 30s or 1m"))]
    pub suspend_time: Option<String>,
}

/// A named site.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("size(self.domains) > 0 || size(self.mx) > 0").message("a site needs domains or mx"))]
pub struct Site {
    /// The site's name, in logs and metrics labels: letters, digits, `-`, `_`, `.`; at
    /// most 63 characters.
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z0-9._-]+$')").message("name is letters, digits, '.', '_' or '-'"))]
    pub name: String,
    /// Recipient domains of the site. At most 256 of at most 253 characters.
    #[serde(default)]
    #[schemars(length(max = 256), inner(length(max = 253)))]
    pub domains: Vec<String>,
    /// MX host names or `*.domain` patterns: a domain with an MX host that matches
    /// belongs to the site. At most 64 of at most 253 characters.
    #[serde(default)]
    #[schemars(length(max = 64), inner(length(max = 253)))]
    pub mx: Vec<String>,
    /// The site's limits; absent members are the `defaults`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<SiteLimits>,
}

/// SMTP AUTH settings.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Authentication {
    /// Secret in this namespace whose keys are user names and whose values are argon2 PHC
    /// password hashes (`$argon2id$...`). At most 253 characters.
    #[schemars(length(max = 253))]
    #[x_kube(validation = Rule::new("self.size() > 0").message("secretName must not be empty"))]
    pub secret_name: String,
    /// Offer AUTH on connections without TLS. Default: false (credentials never travel in
    /// the clear).
    #[serde(default)]
    pub allow_plaintext: bool,
}

/// Rate limits, each counted per pod.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RateLimits {
    /// Messages per client IP address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_client_ip: Option<Rate>,
    /// Messages per authenticated user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_user: Option<Rate>,
    /// Messages per recipient domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_recipient_domain: Option<Rate>,
}

/// A number of messages per interval.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Rate {
    /// Messages allowed per interval.
    #[schemars(range(min = 1))]
    pub messages: u32,
    /// The interval, like `1m`, `1h` or `1d`. At most 32 characters.
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new(crate::DURATION_RULE).message("interval is a duration like 30s, 1m, 1h or 1d"))]
    pub interval: String,
}

/// Outbound route.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.mode == 'Direct' ? !has(self.smarthost) : has(self.smarthost)").message("smarthost is required with mode Smarthost and not allowed with mode Direct"))]
pub struct Route {
    /// `Direct` (look up the recipient domain's MX) or `Smarthost`. Default: `Direct`.
    #[serde(default)]
    pub mode: RouteMode,
    /// The next hop when `mode` is `Smarthost`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smarthost: Option<Smarthost>,
}

/// How relayed mail leaves.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum RouteMode {
    /// Deliver to the recipient domain's MX hosts.
    #[default]
    Direct,
    /// Hand everything to one upstream server.
    Smarthost,
}

/// An upstream SMTP server.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Smarthost {
    /// Host name of the smarthost, at most 253 characters.
    #[schemars(length(max = 253))]
    #[x_kube(validation = Rule::new("self.size() > 0").message("host must not be empty"))]
    pub host: String,
    /// Port. Default: 587.
    #[serde(default = "default_submission_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
    /// Secret with keys `username` and `password` for AUTH at the smarthost. At most 253
    /// characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub credentials_secret: Option<String>,
}

fn default_submission_port() -> u16 {
    587
}

/// Outbound TLS requirements.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct OutboundTls {
    /// `Opportunistic` (STARTTLS when offered) or `Required` (defer rather than send in
    /// the clear). Default: `Opportunistic`.
    #[serde(default)]
    pub mode: OutboundTlsMode,
    /// Honour recipient domains' MTA-STS policies. Default: true.
    #[serde(default = "default_true")]
    pub mta_sts: bool,
    /// Honour DANE TLSA records (RFC 7672) of recipient domains whose zones are signed:
    /// TLS that must match them, deferring (`451 4.7.5`) rather than sending otherwise.
    /// Needs name servers that pass DNSSEC records; where validation does not work, DANE
    /// is not in effect (the pods log it). Where both apply, DANE decides over MTA-STS.
    /// Default: true.
    #[serde(default = "default_true")]
    pub dane: bool,
}

impl Default for OutboundTls {
    fn default() -> Self {
        Self {
            mode: OutboundTlsMode::default(),
            mta_sts: true,
            dane: true,
        }
    }
}

fn default_true() -> bool {
    true
}

/// Outbound TLS mode.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum OutboundTlsMode {
    /// Use STARTTLS when the server offers it.
    #[default]
    Opportunistic,
    /// Never send without TLS.
    Required,
}

/// Observed state of a RelayPolicy.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RelayPolicyStatus {
    /// Standard conditions: `Ready`, `Degraded`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` the status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}
