//! `MailDomain`: a domain Petrel accepts and/or sends mail for.
//!
//! Owns the spec (local delivery target, recipients, aliases, catch-all, SPF/DMARC/MTA-STS/
//! TLS-RPT wishes, which DkimKey signs it) and the status (conditions plus the DNS guidance:
//! every record the domain needs and whether live DNS already matches).

// kube's `printcolumn(name = .., type_ = ..)` repeats keys across columns by design.
#![allow(clippy::duplicated_attributes)]

use crate::conditions::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// A mail domain. Every `SmtpListener` in the same namespace accepts mail for it.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "mail.petrel.dev",
    version = "v1alpha1",
    kind = "MailDomain",
    namespaced,
    status = "MailDomainStatus",
    shortname = "md",
    category = "petrel",
    doc = "A domain Petrel accepts and/or sends mail for.",
    printcolumn(name = "Domain", type_ = "string", json_path = ".spec.domain"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "DNS OK",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"DnsReady\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.catchAll) || has(self.recipients)").message("catchAll needs recipients: without a recipient list every local part exists"))]
pub struct MailDomainSpec {
    /// The domain name, lower case, e.g. `example.com`, at most 253 characters. Immutable:
    /// create a new MailDomain to serve another domain.
    #[schemars(length(max = 253))]
    #[x_kube(
        validation = Rule::new(crate::DOMAIN_RULE).message("must be a lower-case DNS domain name such as example.com"),
        validation = Rule::new("self == oldSelf").message("domain is immutable")
    )]
    pub domain: String,
    /// Where mail for this domain is delivered. Exactly one of `maildir`, `lmtp` or `relay`.
    pub delivery: DomainDelivery,
    /// Local parts that exist (e.g. `alice`). When set, mail for any other local part that is
    /// not an alias and has no catch-all is refused with `550 5.1.1` at RCPT. When absent,
    /// every local part is accepted. At most 10000 entries of at most 64 characters each
    /// (the RFC 5321 limit of a local part).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 10000), inner(length(max = 64)))]
    #[x_kube(validation = Rule::new("self.all(r, r.matches('^[^@\\\\s]+$'))").message("recipients are local parts, without '@' or spaces"))]
    pub recipients: Option<Vec<String>>,
    /// Local parts that forward to other addresses. At most 512 aliases.
    // 512 aliases x 32 targets keeps the target rule under the API server's CEL cost budget.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 512))]
    pub aliases: Vec<Alias>,
    /// Address that receives mail for local parts that are neither recipients nor aliases.
    /// At most 254 characters (the RFC 5321 limit of an address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 254))]
    #[x_kube(validation = Rule::new("self.matches('^[^@\\\\s]+@[^@\\\\s]+$')").message("catchAll must be an address like postmaster@example.com"))]
    pub catch_all: Option<String>,
    /// Name of the `DkimKey` (same namespace) that signs mail from this domain. Without it,
    /// outbound mail is not DKIM-signed. At most 253 characters (a Kubernetes object name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub dkim_key_ref: Option<String>,
    /// MX hosts to publish, best first. When empty, the `hostname` of every SmtpListener in
    /// the namespace is published at preference 10. At most 32 hosts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub mx: Vec<MxHost>,
    /// What the SPF record says.
    #[serde(default)]
    pub spf: SpfPolicy,
    /// What the DMARC record says.
    #[serde(default)]
    pub dmarc: DmarcPolicy,
    /// MTA-STS (RFC 8461) policy to publish. Absent: no MTA-STS records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mta_sts: Option<MtaStsPolicy>,
    /// SMTP TLS reporting (RFC 8460). Absent: no TLS-RPT record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_rpt: Option<TlsRpt>,
}

/// Where mail for a domain goes. Exactly one member is set.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("[has(self.maildir), has(self.lmtp), has(self.relay)].filter(x, x).size() == 1").message("set exactly one of delivery.maildir, delivery.lmtp, delivery.relay"))]
pub struct DomainDelivery {
    /// Deliver into Maildirs on the MTA pod's queue volume (one per local part).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maildir: Option<MaildirDelivery>,
    /// Deliver over LMTP (RFC 2033), e.g. to Dovecot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lmtp: Option<LmtpDelivery>,
    /// Forward every message to another SMTP server (this MTA is a backup MX or gateway).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<RelayDelivery>,
}

/// Maildir delivery on the pod's volume.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct MaildirDelivery {
    /// Sub-directory of the pod's data volume holding one Maildir per local part.
    /// Default: `maildir/<domain>`. At most 1024 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    #[x_kube(validation = Rule::new("!self.startsWith('/') && !self.contains('..')").message("subPath is relative to the data volume and may not contain '..'"))]
    pub sub_path: Option<String>,
}

/// LMTP delivery target.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LmtpDelivery {
    /// Host name or address of the LMTP server, e.g. `dovecot.mail.svc`. At most 253
    /// characters.
    #[schemars(length(max = 253))]
    #[x_kube(validation = Rule::new("self.size() > 0").message("host must not be empty"))]
    pub host: String,
    /// TCP port. Default: 24.
    #[serde(default = "default_lmtp_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
}

fn default_lmtp_port() -> u16 {
    24
}

/// Forward-everything delivery target.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RelayDelivery {
    /// Host name or address of the next hop. At most 253 characters.
    #[schemars(length(max = 253))]
    #[x_kube(validation = Rule::new("self.size() > 0").message("host must not be empty"))]
    pub host: String,
    /// TCP port. Default: 25.
    #[serde(default = "default_smtp_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
}

fn default_smtp_port() -> u16 {
    25
}

/// One alias: a local part whose mail is forwarded.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Alias {
    /// The local part, e.g. `postmaster`. At most 64 characters (RFC 5321).
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z0-9._-]+$')").message("alias name is a plain local part: letters, digits, '.', '_', '-'"))]
    pub name: String,
    /// Full addresses that receive its mail: at least one, at most 32, each at most 254
    /// characters (RFC 5321).
    #[schemars(length(max = 32), inner(length(max = 254)))]
    #[x_kube(validation = Rule::new("self.size() > 0 && self.all(a, a.matches('^[^@\\\\s]+@[^@\\\\s]+$'))").message("alias targets must be full addresses like alice@example.com"))]
    pub to: Vec<String>,
}

/// One published MX host.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MxHost {
    /// Host name of the mail exchanger. At most 253 characters.
    #[schemars(length(max = 253))]
    #[x_kube(validation = Rule::new(crate::DOMAIN_RULE).message("MX host must be a DNS name, not an address"))]
    pub host: String,
    /// MX preference: lower is tried first. Default: 10.
    #[serde(default = "default_mx_preference")]
    pub preference: u16,
}

fn default_mx_preference() -> u16 {
    10
}

/// What the SPF (RFC 7208) TXT record says.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SpfPolicy {
    /// Authorise the domain's MX hosts (`mx` mechanism). Default: true.
    #[serde(default = "default_true")]
    pub mx: bool,
    /// Other domains whose SPF records are included (e.g. a newsletter provider). At most 32
    /// domains of at most 253 characters each (SPF itself allows only 10 DNS lookups).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(max = 253)))]
    pub include: Vec<String>,
    /// Extra `ip4:`/`ip6:` networks allowed to send, e.g. `192.0.2.0/24`. At most 256
    /// entries of at most 43 characters each (the longest IPv6 CIDR).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(length(max = 43)))]
    #[x_kube(validation = Rule::new("self.all(n, isCIDR(n) || isIP(n))").message("networks must be IP addresses or CIDRs"))]
    pub networks: Vec<String>,
    /// What happens to everyone else: `fail` (`-all`), `softfail` (`~all`) or `neutral`
    /// (`?all`). Default: `fail`.
    #[serde(default)]
    pub all: SpfAll,
}

impl Default for SpfPolicy {
    fn default() -> Self {
        Self {
            mx: true,
            include: Vec::new(),
            networks: Vec::new(),
            all: SpfAll::default(),
        }
    }
}

fn default_true() -> bool {
    true
}

/// The SPF `all` qualifier.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
#[serde(rename_all = "lowercase")]
pub enum SpfAll {
    /// `-all`
    #[default]
    Fail,
    /// `~all`
    Softfail,
    /// `?all`
    Neutral,
}

/// What the DMARC (RFC 7489) record says.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DmarcPolicy {
    /// Requested handling of failing mail: `none`, `quarantine` or `reject`. Default: `none`
    /// (monitor first, then tighten).
    #[serde(default)]
    pub policy: DmarcDisposition,
    /// Percentage of failing mail the policy applies to. Default: 100.
    #[serde(default = "default_percent")]
    #[schemars(range(min = 0, max = 100))]
    pub percent: u8,
    /// Where aggregate reports go, as `mailto:` URIs. At most 16 URIs of at most 2048
    /// characters each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(max = 2048)))]
    #[x_kube(validation = Rule::new("self.all(u, u.startsWith('mailto:'))").message("report addresses are mailto: URIs"))]
    pub rua: Vec<String>,
}

impl Default for DmarcPolicy {
    fn default() -> Self {
        Self {
            policy: DmarcDisposition::default(),
            percent: 100,
            rua: Vec::new(),
        }
    }
}

fn default_percent() -> u8 {
    100
}

/// DMARC `p=` value.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
#[serde(rename_all = "lowercase")]
pub enum DmarcDisposition {
    /// Monitor only.
    #[default]
    None,
    /// Treat failing mail as suspicious.
    Quarantine,
    /// Refuse failing mail.
    Reject,
}

/// MTA-STS (RFC 8461) policy.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MtaStsPolicy {
    /// `testing` (report only), `enforce`, or `none` (withdraw). Default: `testing`.
    #[serde(default)]
    pub mode: MtaStsMode,
    /// How long senders may cache the policy, in seconds. Default: 604800 (one week).
    #[serde(default = "default_mta_sts_max_age")]
    #[schemars(range(min = 1, max = 31_557_600))]
    pub max_age: u32,
}

fn default_mta_sts_max_age() -> u32 {
    604_800
}

/// MTA-STS mode.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
#[serde(rename_all = "lowercase")]
pub enum MtaStsMode {
    /// Senders report failures but deliver anyway.
    #[default]
    Testing,
    /// Senders refuse to deliver without valid TLS to a listed MX.
    Enforce,
    /// The policy is withdrawn.
    None,
}

/// SMTP TLS reporting (RFC 8460).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TlsRpt {
    /// Where reports go: `mailto:` or `https:` URIs. At least one, at most 16, each at most
    /// 2048 characters.
    #[schemars(length(max = 16), inner(length(max = 2048)))]
    #[x_kube(validation = Rule::new("self.size() > 0 && self.all(u, u.startsWith('mailto:') || u.startsWith('https://'))").message("TLS-RPT rua entries are mailto: or https:// URIs"))]
    pub rua: Vec<String>,
}

/// Observed state of a MailDomain.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct MailDomainStatus {
    /// Standard conditions: `Ready`, `DnsReady`, `Degraded`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` the status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Every DNS record this domain needs, and whether live DNS already has it.
    #[serde(default)]
    pub dns: Vec<DnsRecordStatus>,
    /// The MTA-STS policy file to serve at
    /// `https://mta-sts.<domain>/.well-known/mta-sts.txt`, when MTA-STS is configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mta_sts_policy: Option<String>,
}

/// One record of DNS guidance.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DnsRecordStatus {
    /// Fully qualified owner name, with trailing dot.
    pub name: String,
    /// Record type: `MX`, `TXT` or `PTR`.
    #[serde(rename = "type")]
    pub type_: String,
    /// The value to publish (for MX: `<preference> <host>.`).
    pub value: String,
    /// What the record is for, e.g. `SPF`, `DKIM selector petrel-a (Active)`, `DMARC`.
    pub purpose: String,
    /// `true` when live DNS already serves this value; absent when not checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matches: Option<bool>,
}
