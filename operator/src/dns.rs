//! DNS guidance for a MailDomain: every record it needs (MX, SPF, DKIM per published
//! selector, DMARC, MTA-STS with its policy file, TLS-RPT, PTR hints), rendered as a BIND
//! zone fragment or as MailDomain status, and checked against live DNS with
//! hickory-resolver (the resolver address is configurable, so tests use a loopback server).
//!
//! [`guidance`] is pure; only [`check`] does network I/O, and it never fails a reconcile:
//! a lookup error just means "does not match yet".

use crate::render::World;
use crate::render::dkim;
use crds::ListenerPortKind;
use crds::MailDomain;
use crds::mail_domain::{DmarcDisposition, DnsRecordStatus, MtaStsMode, SpfAll};
use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;
use hickory_resolver::{Resolver, TokioResolver};
use kube::ResourceExt;
use std::net::{IpAddr, SocketAddr};

pub mod authoritative;

/// One record a domain needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsRecord {
    /// Owner name, fully qualified with trailing dot.
    pub name: String,
    /// `MX`, `TXT` or `PTR`.
    pub type_: &'static str,
    /// Value in zone-file form (`10 mx.example.com.` for MX; unquoted text for TXT).
    pub value: String,
    /// What it is for.
    pub purpose: String,
}

/// The guidance for one domain: records and the MTA-STS policy file (when configured).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Guidance {
    /// Records to publish, in zone order.
    pub records: Vec<DnsRecord>,
    /// Contents of `https://mta-sts.<domain>/.well-known/mta-sts.txt`.
    pub mta_sts_policy: Option<String>,
    /// DKIM selectors whose key does not exist yet (nothing to publish until it does).
    pub pending_dkim: Vec<String>,
}

fn fqdn(name: &str) -> String {
    if name.ends_with('.') {
        name.to_owned()
    } else {
        format!("{name}.")
    }
}

/// MX hosts of `domain`: its own list, else the listeners' hostnames at preference 10.
fn mx_hosts(domain: &MailDomain, world: &World) -> Vec<(u16, String)> {
    if !domain.spec.mx.is_empty() {
        return domain
            .spec
            .mx
            .iter()
            .map(|m| (m.preference, m.host.clone()))
            .collect();
    }
    // Only fleets that speak MTA-to-MTA SMTP can be mail exchangers.
    let mut hosts: Vec<(u16, String)> = world
        .listeners
        .iter()
        .filter(|l| {
            l.spec
                .ports
                .iter()
                .any(|p| p.kind == ListenerPortKind::Smtp)
        })
        .map(|l| (10, l.spec.hostname.clone()))
        .collect();
    hosts.sort();
    hosts.dedup();
    hosts
}

/// Every record `domain` needs, given the listeners, DkimKeys and key Secrets in `world`.
/// `listener_addresses` are the public addresses of the listeners' Services (for PTR
/// hints); without them the hint names no address.
pub fn guidance(domain: &MailDomain, world: &World, listener_addresses: &[IpAddr]) -> Guidance {
    let spec = &domain.spec;
    let apex = fqdn(&spec.domain);
    let mut records = Vec::new();
    let mut pending_dkim = Vec::new();
    let mx = mx_hosts(domain, world);
    for (preference, host) in &mx {
        records.push(DnsRecord {
            name: apex.clone(),
            type_: "MX",
            value: format!("{preference} {}", fqdn(host)),
            purpose: "MX".to_owned(),
        });
    }
    records.push(DnsRecord {
        name: apex.clone(),
        type_: "TXT",
        value: spf(domain),
        purpose: "SPF".to_owned(),
    });
    for key in &world.dkim_keys {
        let referenced = spec.dkim_key_ref.as_deref() == Some(key.name_any().as_str());
        if key.spec.domain != spec.domain && !referenced {
            continue;
        }
        // Every slot with a record that must exist now: the next key, the active one,
        // the retiring one, and a revoked one (empty `p=`) until its slot is reused.
        let slots = dkim::read_slots(key, world);
        if slots.iter().all(|s| s.record.is_none()) {
            pending_dkim.push(format!("{}._domainkey.{apex}", slots[0].selector));
        }
        for slot in slots {
            let (Some(value), Some(state)) = (slot.record, slot.state) else {
                continue;
            };
            records.push(DnsRecord {
                name: format!("{}._domainkey.{apex}", slot.selector),
                type_: "TXT",
                value,
                purpose: format!("DKIM selector {} ({:?})", slot.selector, state.phase),
            });
        }
    }
    records.push(DnsRecord {
        name: format!("_dmarc.{apex}"),
        type_: "TXT",
        value: dmarc(domain),
        purpose: "DMARC".to_owned(),
    });
    let mta_sts_policy = spec.mta_sts.as_ref().map(|sts| {
        let mode = match sts.mode {
            MtaStsMode::Testing => "testing",
            MtaStsMode::Enforce => "enforce",
            MtaStsMode::None => "none",
        };
        let mut policy = format!("version: STSv1\nmode: {mode}\n");
        for (_, host) in &mx {
            policy.push_str(&format!("mx: {host}\n"));
        }
        policy.push_str(&format!("max_age: {}\n", sts.max_age));
        policy
    });
    if let Some(policy) = &mta_sts_policy {
        // RFC 8461 §3.1: id changes whenever the policy does; a hash of it does exactly that.
        let id = &crate::render::sha256_hex(policy.as_bytes())[..20];
        records.push(DnsRecord {
            name: format!("_mta-sts.{apex}"),
            type_: "TXT",
            value: format!("v=STSv1; id={id}"),
            purpose: format!(
                "MTA-STS (serve the policy at https://mta-sts.{}/.well-known/mta-sts.txt)",
                spec.domain
            ),
        });
    }
    if let Some(rpt) = &spec.tls_rpt {
        records.push(DnsRecord {
            name: format!("_smtp._tls.{apex}"),
            type_: "TXT",
            value: format!("v=TLSRPTv1; rua={}", rpt.rua.join(",")),
            purpose: "TLS-RPT".to_owned(),
        });
    }
    let mut listeners: Vec<&str> = world
        .listeners
        .iter()
        .map(|l| l.spec.hostname.as_str())
        .collect();
    listeners.sort_unstable();
    listeners.dedup();
    for host in listeners {
        if listener_addresses.is_empty() {
            records.push(DnsRecord {
                name: "(reverse name of the listener's public address)".to_owned(),
                type_: "PTR",
                value: fqdn(host),
                purpose: format!(
                    "PTR hint: the address {host} resolves to should point back to it"
                ),
            });
        }
        for ip in listener_addresses {
            records.push(DnsRecord {
                name: reverse_name(*ip),
                type_: "PTR",
                value: fqdn(host),
                purpose: format!("PTR hint for {ip} (set by whoever owns the address)"),
            });
        }
    }
    Guidance {
        records,
        mta_sts_policy,
        pending_dkim,
    }
}

fn spf(domain: &MailDomain) -> String {
    let spf = &domain.spec.spf;
    let mut parts = vec!["v=spf1".to_owned()];
    if spf.mx {
        parts.push("mx".to_owned());
    }
    for net in &spf.networks {
        let v6 = net.contains(':');
        parts.push(format!("{}:{net}", if v6 { "ip6" } else { "ip4" }));
    }
    for include in &spf.include {
        parts.push(format!("include:{include}"));
    }
    parts.push(
        match spf.all {
            SpfAll::Fail => "-all",
            SpfAll::Softfail => "~all",
            SpfAll::Neutral => "?all",
        }
        .to_owned(),
    );
    parts.join(" ")
}

fn dmarc(domain: &MailDomain) -> String {
    let dmarc = &domain.spec.dmarc;
    let p = match dmarc.policy {
        DmarcDisposition::None => "none",
        DmarcDisposition::Quarantine => "quarantine",
        DmarcDisposition::Reject => "reject",
    };
    let mut value = format!("v=DMARC1; p={p}");
    if dmarc.percent != 100 {
        value.push_str(&format!("; pct={}", dmarc.percent));
    }
    if !dmarc.rua.is_empty() {
        value.push_str(&format!("; rua={}", dmarc.rua.join(",")));
    }
    value
}

/// The `in-addr.arpa.`/`ip6.arpa.` name of `ip`.
pub fn reverse_name(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}.in-addr.arpa.", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(v6) => {
            let mut out = String::new();
            for byte in v6.octets().iter().rev() {
                out.push_str(&format!("{:x}.{:x}.", byte & 0xf, byte >> 4));
            }
            out + "ip6.arpa."
        }
    }
}

/// TXT values longer than 255 bytes must be split into several strings (RFC 1035 §3.3.14).
fn quote_txt(value: &str) -> String {
    value
        .as_bytes()
        .chunks(255)
        .map(|c| format!("\"{}\"", String::from_utf8_lossy(c).replace('"', "\\\"")))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The guidance as a BIND zone fragment, with the MTA-STS policy as a comment block.
pub fn zone_fragment(domain: &MailDomain, guidance: &Guidance) -> String {
    let mut out = format!(
        "; DNS records for {} (generated by petrel-operator)\n",
        domain.spec.domain
    );
    for r in &guidance.records {
        out.push_str(&format!("; {}\n", r.purpose));
        let value = if r.type_ == "TXT" {
            quote_txt(&r.value)
        } else {
            r.value.clone()
        };
        let line = format!("{} 3600 IN {} {}\n", r.name, r.type_, value);
        if r.name.starts_with('(') {
            out.push_str(&format!("; {line}"));
        } else {
            out.push_str(&line);
        }
    }
    for name in &guidance.pending_dkim {
        out.push_str(&format!(
            "; DKIM {name}: key not generated yet; the DkimKey's status shows the TXT record once it is\n"
        ));
    }
    if let Some(policy) = &guidance.mta_sts_policy {
        out.push_str(&format!(
            "; MTA-STS policy file, served at https://mta-sts.{}/.well-known/mta-sts.txt:\n",
            domain.spec.domain
        ));
        for line in policy.lines() {
            out.push_str(&format!(";   {line}\n"));
        }
    }
    out
}

/// Builds a resolver that asks `server` (e.g. `127.0.0.1:5353`), or the system's
/// configured resolvers when `None`.
pub fn resolver(server: Option<SocketAddr>) -> Result<TokioResolver, String> {
    let builder = match server {
        Some(addr) => {
            let mut ns = NameServerConfig::udp_and_tcp(addr.ip());
            for connection in &mut ns.connections {
                connection.port = addr.port();
            }
            Resolver::builder_with_config(
                ResolverConfig::from_name_servers(vec![ns]),
                TokioRuntimeProvider::default(),
            )
        }
        None => TokioResolver::builder_tokio().map_err(|e| e.to_string())?,
    };
    builder.build().map_err(|e| e.to_string())
}

/// Whether live DNS serves each record: `Some(true)` served as expected, `Some(false)`
/// absent or different, `None` not checked (PTR hints without an address) or the lookup
/// failed.
pub async fn check(resolver: &TokioResolver, records: &[DnsRecord]) -> Vec<Option<bool>> {
    let mut out = Vec::with_capacity(records.len());
    for r in records {
        let result = match r.type_ {
            "MX" => settle(resolver.mx_lookup(r.name.as_str()).await.map(|lookup| {
                lookup.answers().iter().any(|rec| match &rec.data {
                    RData::MX(mx) => format!("{} {}", mx.preference, mx.exchange.to_ascii())
                        .eq_ignore_ascii_case(&r.value),
                    _ => false,
                })
            })),
            "TXT" => settle(resolver.txt_lookup(r.name.as_str()).await.map(|lookup| {
                lookup.answers().iter().any(|rec| match &rec.data {
                    RData::TXT(txt) => {
                        let joined: Vec<u8> = txt
                            .txt_data
                            .iter()
                            .flat_map(|s| s.iter().copied())
                            .collect();
                        normalise_txt(&String::from_utf8_lossy(&joined)) == normalise_txt(&r.value)
                    }
                    _ => false,
                })
            })),
            "PTR" if !r.name.starts_with('(') => settle(
                resolver
                    .reverse_lookup(r.name.as_str())
                    .await
                    .map(|lookup| {
                        lookup.answers().iter().any(|rec| match &rec.data {
                            RData::PTR(ptr) => ptr.0.to_ascii().eq_ignore_ascii_case(&r.value),
                            _ => false,
                        })
                    }),
            ),
            _ => None,
        };
        out.push(result);
    }
    out
}

/// The answer of one lookup: whether it matched, `Some(false)` when DNS says there is no
/// such record, and `None` when DNS did not answer (timeout, SERVFAIL, refused): a failed
/// lookup is no evidence either way.
fn settle(result: Result<bool, hickory_resolver::net::NetError>) -> Option<bool> {
    match result {
        Ok(matched) => Some(matched),
        Err(e) if e.is_no_records_found() => Some(false),
        Err(_) => None,
    }
}

/// TXT comparison ignores the spacing around `;` that publishers vary.
fn normalise_txt(value: &str) -> String {
    value
        .split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(";")
}

/// Guidance records as MailDomain status entries.
pub fn to_status(records: &[DnsRecord], matches: &[Option<bool>]) -> Vec<DnsRecordStatus> {
    records
        .iter()
        .enumerate()
        .map(|(i, r)| DnsRecordStatus {
            name: r.name.clone(),
            type_: r.type_.to_owned(),
            value: r.value.clone(),
            purpose: r.purpose.clone(),
            matches: matches.get(i).copied().flatten(),
        })
        .collect()
}

#[cfg(test)]
mod tests;
