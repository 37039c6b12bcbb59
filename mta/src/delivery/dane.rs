//! DANE (RFC 7672) for delivery by MX: the DNSSEC-validating resolver, the per-host
//! decision from MX, address and TLSA records, and the certificate verifier that carries
//! one host's TLSA records into its TLS handshake. [`super::smtp`] asks [`plan`] for the
//! hosts of a domain and, for a host with usable TLSA records, connects with
//! [`tls_config`]; smarthost and LMTP routes never get here.
//!
//! * Lookups go through [`ValidatingResolver`]: hickory's resolver with DNSSEC validation
//!   against `smtp_client.dnssec_trust_anchor` (the root's keys by default). Every answer
//!   is secure, insecure or bogus; a bogus answer is an error, never an insecure one.
//! * Decisions (RFC 7672 §2.2): an insecure MX set means no DANE (the caller goes on as
//!   without it: opportunistic TLS or MTA-STS). With a secure MX set, each host whose
//!   addresses are secure has its TLSA records looked up at `_25._tcp.<host>`: secure and
//!   usable (DANE-TA(2) or DANE-EE(3), selector 0/1, matching 0/1/2) means TLS that must
//!   match them; secure but all unusable means TLS without authentication, still
//!   mandatory; none (proven) means no DANE for that host. A bogus answer or a failed
//!   lookup (SERVFAIL, timeout) takes the host out; when no host is left the mail is
//!   deferred with `451 4.7.5`.
//! * Matching, inside the handshake ([`DaneVerifier`]): DANE-EE compares the server's
//!   certificate or its key with the record and ignores names and dates; DANE-TA finds
//!   the published authority among the certificates the server sent and checks the chain
//!   from it (webpki: signatures, dates, usage) and the MX host name.
//!
//! * Whether validation works at all ([`ValidatingResolver::validation_available`]): the
//!   root's SOA must validate through the configured resolvers. Where it does not (a
//!   resolver that strips DNSSEC records, or no route to the root's data), no answer could
//!   ever be secure and every MX set would look bogus; DANE is then not in effect and mail
//!   goes as without it (opportunistic TLS or MTA-STS), with a warning logged at each
//!   change, as Postfix does with a resolver that does not validate. Asked again every
//!   [`VALIDATION_PROBE_TTL`]. (Whoever can strip signatures between this MTA and its
//!   resolver at that moment can turn DANE off: use a DNSSEC-aware resolver on a trusted
//!   path.)
//!
//! Must never: use a bogus or unvalidated answer as secure, send mail in plain text (or
//! over TLS that does not match) to a host with usable TLSA records, or let a TLS session
//! made under one TLSA set be resumed under another (every DANE connection gets its own
//! rustls configuration with resumption off).
//!
//! * CNAME (RFC 7672 §2.2.2): when the MX host is an alias and the whole chain is secure,
//!   the TLSA records are looked up at the final name first, then at the MX name; DANE-TA
//!   accepts a certificate for either name. A chain that ends in an unsigned zone makes the
//!   addresses insecure: no DANE for that host.
//!
//! Lookups that failed on the way (bogus or SERVFAIL, of the MX set or of one host) are
//! also handed back to the caller as [`DnsProblem`]s, for TLS-RPT (`dnssec-invalid`,
//! RFC 8460 §4.3.2.1).
//!
//! * Mandatory DANE (RFC 7672 §6; a route's `dane: required`, [`mode`]): [`Plan::mandatory`]
//!   keeps only the hosts with usable TLSA records and names what each other host
//!   lacked ([`NoDane`]: an insecure MX set or address records, no signed TLSA records,
//!   only unusable ones). When none is left the mail is deferred with `451 4.7.5`
//!   ([`Mandatory::into_hosts`]), never sent by MTA-STS or opportunistic TLS instead, and
//!   never bounced for it before the queue's lifetime ends. Where validation is
//!   unavailable, nothing can be checked: deferred the same way ([`required_but`]).
//!
//! Not here: DANE-TA(2) `2 0 0` anchors the server does not send, and TLS-RPT reports
//! (RFC 8460).

use super::outcome::DeliveryError;
use super::route::Target;
use crate::queue::Status;
use hickory_resolver::TokioResolver;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::dnssec::TrustAnchors;
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{RData, Record, RecordType};
use mta_config::{DaneMode, DnsConfig, MtaConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{Resumption, WebPkiServerVerifier};
use rustls::crypto::{CryptoProvider, ring as ring_provider};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// The validating resolver for the current `dns` and `smtp_client.dnssec_trust_anchor`,
/// built on first use and rebuilt when either changes.
#[derive(Default)]
pub struct ValidatingResolver {
    cached: Mutex<Option<(ResolverKey, Arc<TokioResolver>)>>,
    /// The last verdict of [`ValidatingResolver::validation_available`]: for which
    /// resolver, when, and whether validation worked.
    probe: Mutex<Option<(ResolverKey, tokio::time::Instant, bool)>>,
}

/// How long a verdict on whether DNSSEC validation works holds.
pub const VALIDATION_PROBE_TTL: std::time::Duration = std::time::Duration::from_secs(300);

type ResolverKey = (DnsConfig, Option<PathBuf>);

impl ValidatingResolver {
    pub fn get(&self, config: &MtaConfig) -> Result<Arc<TokioResolver>, Status> {
        let key = (
            config.dns.clone(),
            config.smtp_client.dnssec_trust_anchor.clone(),
        );
        let mut cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((built_for, resolver)) = cached.as_ref()
            && *built_for == key
        {
            return Ok(resolver.clone());
        }
        let anchors = match &key.1 {
            Some(path) => TrustAnchors::from_file(path).map_err(|e| DeliveryError::Dane {
                detail: format!(
                    "cannot load smtp_client.dnssec_trust_anchor {}: {e}",
                    path.display()
                ),
            })?,
            None => TrustAnchors::default(),
        };
        if anchors.is_empty() && key.1.is_some() {
            return Err(DeliveryError::Dane {
                detail: "smtp_client.dnssec_trust_anchor has no root DNSKEY record".into(),
            }
            .into());
        }
        let resolver = super::route::resolver_builder(&key.0)
            .map_err(|e| DeliveryError::Dns {
                detail: e.to_string(),
            })?
            .with_trust_anchor(Arc::new(anchors))
            .build()
            .map_err(|e| DeliveryError::Dns {
                detail: format!("validating resolver: {e}"),
            })?;
        let resolver = Arc::new(resolver);
        *cached = Some((key, resolver.clone()));
        Ok(resolver)
    }
}

impl ValidatingResolver {
    /// Whether DNSSEC validation works through the configured resolvers: the root's SOA,
    /// looked up with `resolver` (the one [`ValidatingResolver::get`] built for `config`),
    /// validates as secure. See the module doc for what follows when it does not.
    pub async fn validation_available(&self, config: &MtaConfig, resolver: &TokioResolver) -> bool {
        let key = (
            config.dns.clone(),
            config.smtp_client.dnssec_trust_anchor.clone(),
        );
        let now = tokio::time::Instant::now();
        let previous = {
            let probe = self.probe.lock().unwrap_or_else(|e| e.into_inner());
            match &*probe {
                Some((k, at, works))
                    if *k == key && now.duration_since(*at) < VALIDATION_PROBE_TTL =>
                {
                    return *works;
                }
                Some((k, _, works)) if *k == key => Some(*works),
                _ => None,
            }
        };
        let (works, why) = match lookup(resolver, ".", RecordType::SOA).await {
            Answer::Records { secure: true, .. } => (true, String::new()),
            Answer::Records { secure: false, .. } => (
                false,
                "the root's SOA came without a validated signature".to_owned(),
            ),
            Answer::Bogus => (
                false,
                "the root's SOA did not validate (signatures stripped or broken)".to_owned(),
            ),
            Answer::NoData | Answer::NxDomain => {
                (false, "the resolvers have no SOA for the root".to_owned())
            }
            Answer::Failed(e) => (false, format!("the root's SOA could not be looked up: {e}")),
        };
        if previous != Some(works) {
            if works {
                tracing::info!(
                    "DNSSEC validation works through the configured resolvers: DANE is in effect"
                );
            } else {
                tracing::warn!(
                    reason = why,
                    "DNSSEC validation is unavailable through the configured resolvers: DANE is not in effect (mail by MX goes with opportunistic TLS or MTA-STS) until it is; use a resolver that passes DNSSEC records"
                );
            }
        }
        *self.probe.lock().unwrap_or_else(|e| e.into_inner()) = Some((key, now, works));
        works
    }
}

/// Whether DANE applies to delivery by MX for `domain`, and how: its route's `dane`,
/// else `smtp_client.dane` (`true` meaning where the domain publishes it).
pub fn mode(config: &MtaConfig, domain: &str) -> DaneMode {
    config
        .route(domain)
        .and_then(|r| r.dane)
        .unwrap_or(DaneMode::from(config.smtp_client.dane))
}

/// One TLSA record (RFC 6698 §2.1), as numbers and bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Tlsa {
    pub usage: u8,
    pub selector: u8,
    pub matching: u8,
    pub data: Vec<u8>,
}

/// DANE-TA (RFC 7218 acronym): the record names a trust anchor of the server's chain.
pub const DANE_TA: u8 = 2;
/// DANE-EE: the record names the server's own certificate or key.
pub const DANE_EE: u8 = 3;

impl Tlsa {
    /// Usable for SMTP (RFC 7672 §3.1): DANE-TA or DANE-EE, a known selector and a known
    /// matching type. PKIX-TA(0) and PKIX-EE(1) are not.
    pub fn is_usable(&self) -> bool {
        matches!(self.usage, DANE_TA | DANE_EE) && self.selector <= 1 && self.matching <= 2
    }

    /// Whether `cert` (DER) is what this record describes (selector, then matching type).
    pub fn matches(&self, cert: &[u8]) -> bool {
        let selected = match self.selector {
            0 => cert,
            1 => match x509_parser::parse_x509_certificate(cert) {
                Ok((_, parsed)) => parsed.tbs_certificate.subject_pki.raw,
                Err(_) => return false,
            },
            _ => return false,
        };
        match self.matching {
            0 => selected == self.data.as_slice(),
            1 => ring::digest::digest(&ring::digest::SHA256, selected).as_ref() == self.data,
            2 => ring::digest::digest(&ring::digest::SHA512, selected).as_ref() == self.data,
            _ => false,
        }
    }
}

/// What DANE asks of one MX host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPolicy {
    /// DANE does not apply: no secure TLSA records (or insecure MX or address records).
    None,
    /// Secure TLSA records, none usable: TLS is mandatory, the certificate is not checked
    /// (RFC 7672 §2.2).
    TlsRequired,
    /// Secure usable TLSA records: TLS that matches one of them.
    Dane(Arc<TlsaSet>),
}

/// The usable TLSA records of one host and the names a DANE-TA certificate may carry: the
/// MX host name and, after CNAME expansion, the TLSA base domain (RFC 7672 §3.2.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsaSet {
    pub records: Vec<Tlsa>,
    pub names: Vec<String>,
}

impl HostPolicy {
    pub fn applies(&self) -> bool {
        !matches!(self, HostPolicy::None)
    }
}

/// A DANE lookup that gave no valid answer (bogus, SERVFAIL, timeout): of the MX set
/// (`host` is `None`) or of one MX host's addresses or TLSA records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsProblem {
    pub host: Option<String>,
}

/// The hosts to try for a domain, best first, with what DANE asks of each.
#[derive(Debug)]
pub struct Plan {
    /// The MX records were validated as secure.
    pub mx_secure: bool,
    pub hosts: Vec<(Target, HostPolicy)>,
    /// Why DANE does not apply to each host of `hosts` whose policy is
    /// [`HostPolicy::None`], by host name.
    pub no_dane: Vec<(String, NoDane)>,
    /// The hosts left out of `hosts` because a lookup for them failed (bogus, SERVFAIL),
    /// each as `"<host>: <why>"`.
    pub skipped: Vec<String>,
}

/// Why an MX host is not under DANE (or, under mandatory DANE, gets no mail).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoDane {
    /// The domain's MX records are not DNSSEC-signed (insecure); for a domain without
    /// MX records, its own address records are not.
    MxInsecure,
    /// The host's addresses (or an alias on the way to them) are not DNSSEC-signed.
    AddressesInsecure,
    /// No DNSSEC-signed TLSA records at `_25._tcp.<host>` (none, or unsigned ones).
    NoTlsa,
    /// Signed TLSA records, none of them usable (RFC 7672 §3.1): TLS without
    /// authentication, which mandatory DANE does not accept.
    UnusableTlsa,
}

impl NoDane {
    fn describe(self, host: &str) -> String {
        match self {
            NoDane::MxInsecure => format!("{host}: the MX records are not DNSSEC-signed"),
            NoDane::AddressesInsecure => {
                format!("{host}: its addresses are not DNSSEC-signed")
            }
            NoDane::NoTlsa => format!("{host}: no DNSSEC-signed TLSA records at _25._tcp.{host}"),
            NoDane::UnusableTlsa => format!("{host}: its TLSA records are all unusable"),
        }
    }
}

impl Plan {
    /// Whether DANE governs delivery to this domain (it then wins over MTA-STS).
    pub fn applies(&self) -> bool {
        self.hosts.iter().any(|(_, policy)| policy.applies())
    }

    /// Mandatory DANE (RFC 7672 §6, a route's `dane: required`): only the hosts with
    /// usable TLSA records ([`HostPolicy::Dane`]) keep their place, in MX preference
    /// order; every other host is refused, once, with what it lacked. The caller must
    /// not fall back to MTA-STS or opportunistic TLS for the refused hosts.
    pub fn mandatory(self) -> Mandatory {
        let mut hosts = Vec::new();
        let mut refused: Vec<(String, NoDane)> = Vec::new();
        for (target, policy) in self.hosts {
            let missing = match policy {
                HostPolicy::Dane(_) => {
                    hosts.push((target, policy));
                    continue;
                }
                HostPolicy::TlsRequired => NoDane::UnusableTlsa,
                HostPolicy::None => self
                    .no_dane
                    .iter()
                    .find(|(host, _)| *host == target.name)
                    .map_or(NoDane::NoTlsa, |(_, why)| *why),
            };
            if !refused.iter().any(|(host, _)| *host == target.name) {
                refused.push((target.name, missing));
            }
        }
        Mandatory {
            hosts,
            refused,
            skipped: self.skipped,
        }
    }
}

/// What mandatory DANE makes of a [`Plan`] ([`Plan::mandatory`]).
#[derive(Debug)]
pub struct Mandatory {
    /// The hosts with usable TLSA records, best first: the only ones to try.
    pub hosts: Vec<(Target, HostPolicy)>,
    /// The hosts refused, best first, and what each lacked (RFC 8460 `dane-required`).
    pub refused: Vec<(String, NoDane)>,
    /// As [`Plan::skipped`]: hosts whose lookups failed.
    pub skipped: Vec<String>,
}

impl Mandatory {
    /// The hosts to try, or, when none is left, the deferral of every recipient:
    /// `451 4.7.5`, saying that DANE is required and what each host lacked. Never a
    /// bounce: the mail waits for the destination's DNSSEC and TLSA records, under the
    /// queue's usual retries and lifetime.
    pub fn into_hosts(self, domain: &str) -> Result<Vec<(Target, HostPolicy)>, Status> {
        if !self.hosts.is_empty() {
            return Ok(self.hosts);
        }
        let why = if !self.refused.is_empty()
            && self.skipped.is_empty()
            && self
                .refused
                .iter()
                .all(|(_, why)| *why == NoDane::MxInsecure)
        {
            "its MX records are not DNSSEC-signed".to_owned()
        } else {
            let hosts: Vec<String> = self
                .refused
                .iter()
                .map(|(host, why)| why.describe(host))
                .chain(self.skipped.iter().cloned())
                .collect();
            format!("no MX host has usable TLSA records ({})", hosts.join("; "))
        };
        Err(required_but(domain, &why))
    }
}

/// Mandatory DANE's deferral (`451 4.7.5`) for `domain`, with what was missing.
pub fn required_but(domain: &str, why: &str) -> Status {
    DeliveryError::Dane {
        detail: format!("required for {domain} (route dane: required), but {why}"),
    }
    .status()
}

/// What a validated lookup gave.
enum Answer {
    /// Records, all secure or not.
    Records {
        records: Vec<Record>,
        secure: bool,
    },
    /// The name exists without records of the type (NODATA).
    NoData,
    NxDomain,
    /// Validation failed: forged, broken or stripped signatures.
    Bogus,
    /// SERVFAIL, timeout or another failure to get an answer.
    Failed(String),
}

fn classify(result: Result<Vec<Record>, NetError>) -> Answer {
    match result {
        Ok(records) => {
            let data: Vec<&Record> = records
                .iter()
                .filter(|r| r.record_type() != RecordType::RRSIG)
                .collect();
            let secure = !data.is_empty() && data.iter().all(|r| r.proof.is_secure());
            if data.iter().any(|r| r.proof.is_bogus()) {
                return Answer::Bogus;
            }
            Answer::Records { records, secure }
        }
        Err(e) if e.is_nx_domain() => Answer::NxDomain,
        Err(e) if e.is_no_records_found() => Answer::NoData,
        Err(NetError::Dns(DnsError::DnssecBogus)) => Answer::Bogus,
        Err(NetError::Dns(DnsError::Nsec {
            proof, response, ..
        })) => {
            if proof.is_bogus() {
                Answer::Bogus
            } else if response.metadata.response_code == ResponseCode::NXDomain {
                Answer::NxDomain
            } else {
                Answer::NoData
            }
        }
        Err(e) => Answer::Failed(e.to_string()),
    }
}

async fn lookup(resolver: &TokioResolver, name: &str, kind: RecordType) -> Answer {
    classify(
        resolver
            .lookup(name, kind)
            .await
            .map(|l| l.answers().to_vec()),
    )
}

/// The hosts for mail to `domain` on `port`, with DANE's decision for each (see the
/// module doc). Errors are the statuses of all recipients: NXDOMAIN and null MX fail as
/// without DANE; a bogus MX set, or no usable host when DANE lookups failed, defers
/// with `4.7.5`. Every lookup that failed that way is added to `problems`, whether or
/// not a plan results.
pub async fn plan(
    resolver: &TokioResolver,
    domain: &str,
    port: u16,
    problems: &mut Vec<DnsProblem>,
) -> Result<Plan, Status> {
    let fqdn = format!("{}.", domain.trim_end_matches('.'));
    let (mut hosts, mx_secure) = match lookup(resolver, &fqdn, RecordType::MX).await {
        Answer::Records { records, secure } => {
            let hosts = records
                .iter()
                .filter_map(|record| match &record.data {
                    RData::MX(mx) => Some((mx.preference, mx.exchange.to_ascii())),
                    _ => None,
                })
                .collect::<Vec<_>>();
            (hosts, secure)
        }
        // RFC 5321 §5.1: the domain itself is the implicit MX; its address records'
        // security decides below (the non-existence proof of the MX is not kept).
        Answer::NoData => (vec![(0, fqdn.clone())], true),
        Answer::NxDomain => {
            return Err(DeliveryError::NoSuchDomain {
                domain: domain.to_owned(),
            }
            .into());
        }
        Answer::Bogus => {
            problems.push(DnsProblem { host: None });
            return Err(DeliveryError::Dane {
                detail: format!("DNSSEC validation of the MX records of {domain} failed (bogus)"),
            }
            .into());
        }
        Answer::Failed(e) => {
            problems.push(DnsProblem { host: None });
            return Err(DeliveryError::Dns {
                detail: format!("MX lookup for {domain} failed: {e}"),
            }
            .into());
        }
    };
    if hosts.len() == 1 && hosts[0].1 == "." {
        return Err(DeliveryError::NullMx {
            domain: domain.to_owned(),
        }
        .into());
    }
    hosts.retain(|(_, name)| name != ".");
    super::route::order_by_preference(&mut hosts);

    let mut planned = Vec::new();
    let mut unusable = Vec::new();
    let mut no_dane = Vec::new();
    for (_, host) in hosts {
        let name = host.trim_end_matches('.').to_owned();
        let (addresses, addresses_secure, alias_of) = match host_addresses(resolver, &host).await {
            Ok(found) => found,
            Err(HostProblem::Missing) => continue,
            Err(HostProblem::Unusable(why)) => {
                problems.push(DnsProblem {
                    host: Some(name.clone()),
                });
                unusable.push(format!("{name}: {why}"));
                continue;
            }
        };
        let policy = if mx_secure && addresses_secure {
            match tlsa_policy(resolver, &name, alias_of.as_deref()).await {
                Ok(policy) => {
                    if !policy.applies() {
                        no_dane.push((name.clone(), NoDane::NoTlsa));
                    }
                    policy
                }
                Err(why) => {
                    problems.push(DnsProblem {
                        host: Some(name.clone()),
                    });
                    unusable.push(format!("{name}: {why}"));
                    continue;
                }
            }
        } else {
            let why = if mx_secure {
                NoDane::AddressesInsecure
            } else {
                NoDane::MxInsecure
            };
            no_dane.push((name.clone(), why));
            HostPolicy::None
        };
        planned.extend(addresses.into_iter().map(|ip| {
            (
                Target {
                    name: name.clone(),
                    address: SocketAddr::new(ip, port),
                },
                policy.clone(),
            )
        }));
    }
    if planned.is_empty() {
        return Err(if unusable.is_empty() {
            DeliveryError::NoMxAddress {
                domain: domain.to_owned(),
            }
        } else {
            DeliveryError::Dane {
                detail: format!("no usable MX host for {domain} ({})", unusable.join("; ")),
            }
        }
        .into());
    }
    Ok(Plan {
        mx_secure,
        hosts: planned,
        no_dane,
        skipped: unusable,
    })
}

enum HostProblem {
    /// NXDOMAIN or no A/AAAA records: the host is skipped, as without DANE.
    Missing,
    /// Bogus or failed lookup: the host is skipped and named if nothing else is left.
    Unusable(String),
}

/// The host's addresses, whether they (and any CNAME on the way) were all validated as
/// secure, and the name they belong to when the host is an alias (CNAME).
async fn host_addresses(
    resolver: &TokioResolver,
    host: &str,
) -> Result<(Vec<IpAddr>, bool, Option<String>), HostProblem> {
    let result = resolver
        .lookup_ip(host)
        .await
        .map(|l| l.as_lookup().answers().to_vec());
    match classify(result) {
        Answer::Records { records, secure } => {
            let addresses: Vec<IpAddr> = records
                .iter()
                .filter_map(|record| match &record.data {
                    RData::A(a) => Some(IpAddr::V4(a.0)),
                    RData::AAAA(aaaa) => Some(IpAddr::V6(aaaa.0)),
                    _ => None,
                })
                .collect();
            let owner = records
                .iter()
                .find(|r| matches!(r.data, RData::A(_) | RData::AAAA(_)))
                .map(|r| r.name.to_ascii().trim_end_matches('.').to_ascii_lowercase());
            let alias_of = owner.filter(|o| !o.eq_ignore_ascii_case(host.trim_end_matches('.')));
            if addresses.is_empty() {
                Err(HostProblem::Missing)
            } else {
                Ok((addresses, secure, alias_of))
            }
        }
        Answer::NoData | Answer::NxDomain => Err(HostProblem::Missing),
        Answer::Bogus => Err(HostProblem::Unusable(
            "DNSSEC validation of its addresses failed (bogus)".into(),
        )),
        Answer::Failed(e) => Err(HostProblem::Unusable(format!("address lookup failed: {e}"))),
    }
}

/// RFC 7672 §2.2: the TLSA records at `_25._tcp.<host>` (the port is that of SMTP, not
/// `smtp_client.port`, which only tests change); for an alias, at `_25._tcp.<target>`
/// first (§2.2.2).
async fn tlsa_policy(
    resolver: &TokioResolver,
    host: &str,
    alias_of: Option<&str>,
) -> Result<HostPolicy, String> {
    let mut names = vec![host.to_owned()];
    if let Some(target) = alias_of {
        names.push(target.to_owned());
        let policy = tlsa_records(resolver, target, &names).await?;
        if policy.applies() {
            return Ok(policy);
        }
    }
    tlsa_records(resolver, host, &names).await
}

async fn tlsa_records(
    resolver: &TokioResolver,
    base: &str,
    names: &[String],
) -> Result<HostPolicy, String> {
    let name = format!("_25._tcp.{base}.");
    match lookup(resolver, &name, RecordType::TLSA).await {
        Answer::Records { records, secure } => {
            if !secure {
                return Ok(HostPolicy::None);
            }
            let tlsa: Vec<Tlsa> = records
                .iter()
                .filter_map(|record| match &record.data {
                    RData::TLSA(t) => Some(Tlsa {
                        usage: t.cert_usage.into(),
                        selector: t.selector.into(),
                        matching: t.matching.into(),
                        data: t.cert_data.clone(),
                    }),
                    _ => None,
                })
                .collect();
            let usable: Vec<Tlsa> = tlsa.into_iter().filter(Tlsa::is_usable).collect();
            Ok(if usable.is_empty() {
                HostPolicy::TlsRequired
            } else {
                HostPolicy::Dane(Arc::new(TlsaSet {
                    records: usable,
                    names: names.to_vec(),
                }))
            })
        }
        Answer::NoData | Answer::NxDomain => Ok(HostPolicy::None),
        Answer::Bogus => Err("DNSSEC validation of its TLSA records failed (bogus)".into()),
        Answer::Failed(e) => Err(format!("TLSA lookup failed: {e}")),
    }
}

/// A rustls configuration for one connection to `host` under `tlsa`: the certificate must
/// match a record ([`DaneVerifier`]); no session is resumed (none is stored).
pub fn tls_config(tlsa: Arc<TlsaSet>, host: &str) -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = Arc::new(ring_provider::default_provider());
    let names = tlsa
        .names
        .iter()
        .map(|name| {
            ServerName::try_from(name.clone())
                .map_err(|e| format!("{name:?} is not a usable TLS name: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let verifier = DaneVerifier {
        tlsa,
        host: host.to_owned(),
        names,
        provider: provider.clone(),
    };
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

/// Why a certificate was refused, as rustls reports it ("invalid peer certificate: …").
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Mismatch(String);

fn mismatch(why: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
        Arc::new(Mismatch(why)),
    )))
}

/// Judges a server certificate by one host's TLSA records (RFC 7672 §3.1, RFC 7671 §5).
#[derive(Debug)]
pub struct DaneVerifier {
    tlsa: Arc<TlsaSet>,
    /// The MX host name, for error messages.
    host: String,
    /// The names DANE-TA accepts ([`TlsaSet::names`]).
    names: Vec<ServerName<'static>>,
    provider: Arc<CryptoProvider>,
}

impl DaneVerifier {
    /// DANE-TA: `anchor` (a certificate the server sent, matching a record) is the only
    /// root; the chain from it and the host name (any of [`TlsaSet::names`]) are checked
    /// as for any PKIX server.
    fn chain_to(
        &self,
        anchor: &CertificateDer<'_>,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), String> {
        let mut roots = RootCertStore::empty();
        roots
            .add(anchor.clone().into_owned())
            .map_err(|e| format!("TLSA trust anchor unusable: {e}"))?;
        let verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| e.to_string())?;
        let mut why = String::from("no name to check");
        for name in &self.names {
            match verifier.verify_server_cert(end_entity, intermediates, name, &[], now) {
                Ok(_) => return Ok(()),
                Err(e) => why = e.to_string(),
            }
        }
        Err(why)
    }
}

impl ServerCertVerifier for DaneVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // DANE-EE: the key or certificate itself; names and dates do not matter (§3.1.1).
        if self
            .tlsa
            .records
            .iter()
            .any(|t| t.usage == DANE_EE && t.matches(end_entity))
        {
            return Ok(ServerCertVerified::assertion());
        }
        // DANE-TA: an issuer the server sent, then a valid chain for the host (§3.1.2).
        let mut why = None;
        for anchor in intermediates {
            if self
                .tlsa
                .records
                .iter()
                .any(|t| t.usage == DANE_TA && t.matches(anchor))
            {
                match self.chain_to(anchor, end_entity, intermediates, now) {
                    Ok(()) => return Ok(ServerCertVerified::assertion()),
                    Err(e) => why = Some(e),
                }
            }
        }
        Err(mismatch(match why {
            Some(e) => format!(
                "DANE: the TLSA trust anchor of {} is in the chain, but: {e}",
                self.host
            ),
            None => format!(
                "DANE: the certificate of {} matches none of its TLSA records",
                self.host
            ),
        }))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};

    fn sha256(data: &[u8]) -> Vec<u8> {
        ring::digest::digest(&ring::digest::SHA256, data)
            .as_ref()
            .to_vec()
    }

    fn spki(cert: &[u8]) -> Vec<u8> {
        let (_, parsed) = x509_parser::parse_x509_certificate(cert).expect("certificate");
        parsed.tbs_certificate.subject_pki.raw.to_vec()
    }

    fn record(usage: u8, selector: u8, matching: u8, data: Vec<u8>) -> Tlsa {
        Tlsa {
            usage,
            selector,
            matching,
            data,
        }
    }

    /// A CA, and a server certificate it issued for `names`: (leaf DER, CA DER).
    fn chain(names: &[&str]) -> (CertificateDer<'static>, CertificateDer<'static>) {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let ca_key = KeyPair::generate().expect("key");
        let ca = ca_params.self_signed(&ca_key).expect("ca");
        let issuer = Issuer::new(ca_params, ca_key);
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let leaf_key = KeyPair::generate().expect("key");
        let leaf = CertificateParams::new(names)
            .expect("params")
            .signed_by(&leaf_key, &issuer)
            .expect("leaf");
        (
            CertificateDer::from(leaf.der().to_vec()),
            CertificateDer::from(ca.der().to_vec()),
        )
    }

    fn verify(
        tlsa: Vec<Tlsa>,
        host: &str,
        leaf: &CertificateDer<'_>,
        rest: &[CertificateDer<'_>],
    ) -> Result<(), String> {
        let verifier = DaneVerifier {
            tlsa: Arc::new(TlsaSet {
                records: tlsa,
                names: vec![host.into()],
            }),
            host: host.into(),
            names: vec![ServerName::try_from(host.to_owned()).expect("name")],
            provider: Arc::new(ring_provider::default_provider()),
        };
        let name = ServerName::try_from("ignored.test").expect("name");
        verifier
            .verify_server_cert(leaf, rest, &name, &[], UnixTime::now())
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn usable_records_are_dane_ta_and_dane_ee_with_known_parameters() {
        assert!(record(3, 1, 1, vec![1]).is_usable());
        assert!(record(2, 0, 2, vec![1]).is_usable());
        assert!(record(3, 1, 0, vec![1]).is_usable());
        assert!(!record(0, 1, 1, vec![1]).is_usable(), "PKIX-TA");
        assert!(!record(1, 1, 1, vec![1]).is_usable(), "PKIX-EE");
        assert!(!record(3, 2, 1, vec![1]).is_usable(), "unknown selector");
        assert!(
            !record(3, 1, 3, vec![1]).is_usable(),
            "unknown matching type"
        );
    }

    #[test]
    fn dane_ee_matches_key_or_certificate_and_ignores_the_name() {
        let (leaf, _) = chain(&["somewhere-else.test"]);
        let key = spki(&leaf);
        let sha512 = ring::digest::digest(&ring::digest::SHA512, &key)
            .as_ref()
            .to_vec();
        for tlsa in [
            record(3, 1, 1, sha256(&key)),
            record(3, 1, 2, sha512),
            record(3, 1, 0, key.clone()),
            record(3, 0, 1, sha256(&leaf)),
            record(3, 0, 0, leaf.to_vec()),
        ] {
            // No chain, and a name that is not the MX's: DANE-EE does not care.
            verify(vec![tlsa.clone()], "mx.example.test", &leaf, &[])
                .unwrap_or_else(|e| panic!("{tlsa:?}: {e}"));
        }
        let mut wrong = sha256(&key);
        wrong[0] ^= 1;
        let err = verify(vec![record(3, 1, 1, wrong)], "mx.example.test", &leaf, &[])
            .expect_err("a wrong digest is refused");
        assert!(err.contains("matches none of its TLSA records"), "{err}");
    }

    #[test]
    fn dane_ta_needs_the_anchor_in_the_chain_and_the_mx_name() {
        let (leaf, ca) = chain(&["mx.example.test"]);
        let anchor = record(2, 1, 1, sha256(&spki(&ca)));
        verify(
            vec![anchor.clone()],
            "mx.example.test",
            &leaf,
            std::slice::from_ref(&ca),
        )
        .expect("chain to the published anchor, right name");
        verify(
            vec![record(2, 0, 1, sha256(&ca))],
            "mx.example.test",
            &leaf,
            std::slice::from_ref(&ca),
        )
        .expect("full-certificate anchor");
        let err = verify(
            vec![anchor.clone()],
            "mx.other.test",
            &leaf,
            std::slice::from_ref(&ca),
        )
        .expect_err("another host's name is refused");
        assert!(
            err.contains("trust anchor of mx.other.test is in the chain"),
            "{err}"
        );
        verify(vec![anchor.clone()], "mx.example.test", &leaf, &[])
            .expect_err("the anchor must be sent");
        // A DANE-TA record never matches the server's own certificate as if it were EE.
        let (other_leaf, other_ca) = chain(&["mx.example.test"]);
        verify(vec![anchor], "mx.example.test", &other_leaf, &[other_ca])
            .expect_err("another CA is refused");
    }

    #[test]
    fn dane_ta_accepts_the_tlsa_base_domain_of_an_alias() {
        let (leaf, ca) = chain(&["target.example.test"]);
        let verifier = DaneVerifier {
            tlsa: Arc::new(TlsaSet {
                records: vec![record(2, 1, 1, sha256(&spki(&ca)))],
                names: vec!["mx.example.test".into(), "target.example.test".into()],
            }),
            host: "mx.example.test".into(),
            names: ["mx.example.test", "target.example.test"]
                .map(|n| ServerName::try_from(n).expect("name"))
                .to_vec(),
            provider: Arc::new(ring_provider::default_provider()),
        };
        let name = ServerName::try_from("mx.example.test").expect("name");
        verifier
            .verify_server_cert(&leaf, &[ca], &name, &[], UnixTime::now())
            .expect("a certificate for the CNAME target is accepted");
    }

    fn target(name: &str, last: u8) -> Target {
        Target {
            name: name.into(),
            address: SocketAddr::from(([192, 0, 2, last], 25)),
        }
    }

    fn dane_policy() -> HostPolicy {
        HostPolicy::Dane(Arc::new(TlsaSet {
            records: vec![record(3, 1, 1, vec![0; 32])],
            names: vec!["mx1.a.test".into()],
        }))
    }

    fn deferral_text(status: &Status) -> String {
        match status {
            Status::Deferred(d) => {
                assert_eq!((d.code, d.enhanced), (Some(451), Some([4, 7, 5])), "{d}");
                d.to_string()
            }
            other => panic!("expected a deferral, got {other:?}"),
        }
    }

    #[test]
    fn mandatory_dane_keeps_only_hosts_with_usable_tlsa_records_in_order() {
        let plan = Plan {
            mx_secure: true,
            hosts: vec![
                (target("mx0.a.test", 1), HostPolicy::None),
                (target("mx0.a.test", 2), HostPolicy::None),
                (target("mx1.a.test", 3), dane_policy()),
                (target("mx2.a.test", 4), HostPolicy::TlsRequired),
                (target("mx3.a.test", 5), HostPolicy::None),
                (target("mx4.a.test", 6), dane_policy()),
            ],
            no_dane: vec![
                ("mx0.a.test".into(), NoDane::NoTlsa),
                ("mx3.a.test".into(), NoDane::AddressesInsecure),
            ],
            skipped: vec!["mx5.a.test: TLSA lookup failed: timeout".into()],
        };
        let mandatory = plan.mandatory();
        assert_eq!(
            mandatory.refused,
            [
                ("mx0.a.test".to_owned(), NoDane::NoTlsa),
                ("mx2.a.test".to_owned(), NoDane::UnusableTlsa),
                ("mx3.a.test".to_owned(), NoDane::AddressesInsecure),
            ],
            "each refused host once, in preference order"
        );
        let hosts = mandatory.into_hosts("a.test").expect("two hosts left");
        let names: Vec<&str> = hosts.iter().map(|(t, _)| t.name.as_str()).collect();
        assert_eq!(names, ["mx1.a.test", "mx4.a.test"]);
        assert!(hosts.iter().all(|(_, p)| matches!(p, HostPolicy::Dane(_))));
    }

    #[test]
    fn mandatory_dane_with_no_host_left_defers_with_what_was_missing() {
        // An unsigned zone: every host is refused for the MX set alone.
        let plan = Plan {
            mx_secure: false,
            hosts: vec![
                (target("mx.u.test", 1), HostPolicy::None),
                (target("mx2.u.test", 2), HostPolicy::None),
            ],
            no_dane: vec![
                ("mx.u.test".into(), NoDane::MxInsecure),
                ("mx2.u.test".into(), NoDane::MxInsecure),
            ],
            skipped: Vec::new(),
        };
        let mandatory = plan.mandatory();
        assert_eq!(mandatory.refused.len(), 2);
        let status = mandatory.into_hosts("u.test").expect_err("deferred");
        let text = deferral_text(&status);
        assert!(
            text.contains("DANE: required for u.test (route dane: required), but its MX records are not DNSSEC-signed"),
            "{text}"
        );
        assert!(!status.is_final(), "never a bounce");

        // A signed zone, without TLSA records, one host only unusable ones, one skipped.
        let plan = Plan {
            mx_secure: true,
            hosts: vec![
                (target("mx.s.test", 1), HostPolicy::None),
                (target("mx2.s.test", 2), HostPolicy::TlsRequired),
            ],
            no_dane: vec![("mx.s.test".into(), NoDane::NoTlsa)],
            skipped: vec!["mx3.s.test: DNSSEC validation of its addresses failed (bogus)".into()],
        };
        let text = deferral_text(&plan.mandatory().into_hosts("s.test").expect_err("deferred"));
        for part in [
            "required for s.test",
            "no MX host has usable TLSA records",
            "mx.s.test: no DNSSEC-signed TLSA records at _25._tcp.mx.s.test",
            "mx2.s.test: its TLSA records are all unusable",
            "mx3.s.test: DNSSEC validation of its addresses failed (bogus)",
        ] {
            assert!(text.contains(part), "{part:?} in {text}");
        }
    }

    #[test]
    fn a_route_decides_dane_before_smtp_client_dane() {
        let yaml = "\
smtp_client:
  dane: false
routes:
  - domain: must.test
    dane: required
  - domain: on.test
    dane: true
";
        let config = MtaConfig::from_yaml(yaml).expect("config");
        assert_eq!(mode(&config, "must.test"), DaneMode::Required);
        assert_eq!(mode(&config, "MUST.test"), DaneMode::Required);
        assert_eq!(mode(&config, "on.test"), DaneMode::Opportunistic);
        assert_eq!(mode(&config, "other.test"), DaneMode::Off);
        let yaml =
            "routes:\n  - domain: '*'\n    dane: required\n  - domain: off.test\n    dane: false\n";
        let config = MtaConfig::from_yaml(yaml).expect("config");
        assert_eq!(mode(&config, "any.test"), DaneMode::Required);
        assert_eq!(mode(&config, "off.test"), DaneMode::Off);
        let config = MtaConfig::from_yaml("hostname: a.test\n").expect("config");
        assert_eq!(mode(&config, "any.test"), DaneMode::Opportunistic);
    }

    #[test]
    fn every_dane_connection_has_its_own_configuration_without_resumption() {
        let tlsa = Arc::new(TlsaSet {
            records: vec![record(3, 1, 1, vec![0; 32])],
            names: vec!["mx.example.test".into()],
        });
        let a = tls_config(tlsa.clone(), "mx.example.test").expect("config");
        let b = tls_config(tlsa, "mx.example.test").expect("config");
        assert!(!Arc::ptr_eq(&a, &b));
        let resumption = format!("{:?}", a.resumption);
        assert!(
            resumption.contains("NoClientSessionStorage"),
            "{resumption}"
        );
    }
}
