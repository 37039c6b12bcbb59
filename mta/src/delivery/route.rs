//! Next-hop resolution: MX lookup with `hickory-resolver` (RFC 5321 §5.1) and address
//! lookup for smarthosts and LMTP servers.
//!
//! * MX hosts by preference, shuffled among equal preferences, each then resolved to its
//!   A/AAAA addresses.
//! * No MX records (NOERROR, no data): the domain itself is the implicit MX.
//! * Null MX (RFC 7505, a single `0 .`): the domain accepts no mail: fails at once with
//!   `556 5.1.10`.
//! * NXDOMAIN: the domain does not exist: fails (`550 5.1.2`).
//! * SERVFAIL, timeouts and other resolver errors: deferred (`451 4.4.3`).

use super::outcome::DeliveryError;
use crate::queue::Status;
use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;
use hickory_resolver::{ResolverBuilder, TokioResolver};
use mta_config::DnsConfig;
use rand::seq::SliceRandom;
use std::net::{IpAddr, SocketAddr};

/// The text of each TXT record among `answers` (its character-strings joined), for the
/// `_mta-sts` and `_smtp._tls` records.
pub fn txt_strings(answers: &[hickory_resolver::proto::rr::Record]) -> Vec<String> {
    answers
        .iter()
        .filter_map(|record| match &record.data {
            RData::TXT(txt) => Some(
                txt.txt_data
                    .iter()
                    .map(|s| String::from_utf8_lossy(s))
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

/// One host to try, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The host name (MX exchange, smarthost name): TLS server name and log detail.
    pub name: String,
    pub address: SocketAddr,
}

/// Builds the resolver from config: the listed name servers, or the system's resolv.conf.
pub fn resolver(config: &DnsConfig) -> Result<TokioResolver, String> {
    resolver_builder(config)?
        .build()
        .map_err(|e| format!("resolver: {e}"))
}

/// [`resolver`] before it is built, for the DNSSEC-validating one of [`super::dane`].
pub fn resolver_builder(
    config: &DnsConfig,
) -> Result<ResolverBuilder<TokioRuntimeProvider>, String> {
    Ok(if config.nameservers.is_empty() {
        TokioResolver::builder_tokio().map_err(|e| format!("system resolver: {e}"))?
    } else {
        let servers = config
            .nameservers
            .iter()
            .map(|server| {
                let mut ns = NameServerConfig::udp_and_tcp(server.ip());
                for connection in &mut ns.connections {
                    connection.port = server.port();
                }
                ns
            })
            .collect();
        TokioResolver::builder_with_config(
            ResolverConfig::from_name_servers(servers),
            TokioRuntimeProvider::default(),
        )
    })
}

/// The hosts to try for mail to `domain`, best first, on `port`.
pub async fn mx_targets(
    resolver: &TokioResolver,
    domain: &str,
    port: u16,
) -> Result<Vec<Target>, Status> {
    let fqdn = format!("{}.", domain.trim_end_matches('.'));
    let mut hosts: Vec<(u16, String)> = match resolver.mx_lookup(fqdn.as_str()).await {
        Ok(lookup) => lookup
            .answers()
            .iter()
            .filter_map(|record| match &record.data {
                RData::MX(mx) => Some((mx.preference, mx.exchange.to_ascii())),
                _ => None,
            })
            .collect(),
        Err(e) if e.is_nx_domain() => {
            return Err(DeliveryError::NoSuchDomain {
                domain: domain.to_owned(),
            }
            .into());
        }
        Err(e) if e.is_no_records_found() => vec![(0, fqdn.clone())],
        Err(e) => {
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
    order_by_preference(&mut hosts);

    let mut targets = Vec::new();
    let mut temporary_failure = None;
    for (_, host) in hosts {
        match host_addresses(resolver, &host).await {
            Ok(addresses) => targets.extend(addresses.into_iter().map(|ip| Target {
                name: host.trim_end_matches('.').to_owned(),
                address: SocketAddr::new(ip, port),
            })),
            Err(HostError::Temporary(detail)) => temporary_failure = Some(detail),
            Err(HostError::Missing) => {}
        }
    }
    if targets.is_empty() {
        return Err(match temporary_failure {
            Some(detail) => DeliveryError::Dns {
                detail: format!("address lookup for the MX hosts of {domain} failed: {detail}"),
            },
            None => DeliveryError::NoMxAddress {
                domain: domain.to_owned(),
            },
        }
        .into());
    }
    Ok(targets)
}

/// `host:port` (a name or an IP literal) to targets.
pub async fn host_port_targets(
    resolver: &TokioResolver,
    host_port: &str,
) -> Result<Vec<Target>, Status> {
    let Some((host, port)) = host_port.rsplit_once(':') else {
        return Err(DeliveryError::BadNextHop {
            detail: format!("{host_port:?} is not host:port"),
        }
        .into());
    };
    let port: u16 = port.parse().map_err(|_| DeliveryError::BadNextHop {
        detail: format!("bad port in {host_port:?}"),
    })?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![Target {
            name: host.to_owned(),
            address: SocketAddr::new(ip, port),
        }]);
    }
    match host_addresses(resolver, &format!("{host}.")).await {
        Ok(addresses) => Ok(addresses
            .into_iter()
            .map(|ip| Target {
                name: host.to_owned(),
                address: SocketAddr::new(ip, port),
            })
            .collect()),
        Err(HostError::Temporary(detail)) => Err(DeliveryError::Dns {
            detail: format!("address lookup for {host} failed: {detail}"),
        }
        .into()),
        Err(HostError::Missing) => Err(DeliveryError::HostWithoutAddress {
            host: host.to_owned(),
        }
        .into()),
    }
}

enum HostError {
    /// NXDOMAIN or no A/AAAA records.
    Missing,
    Temporary(String),
}

async fn host_addresses(resolver: &TokioResolver, host: &str) -> Result<Vec<IpAddr>, HostError> {
    match resolver.lookup_ip(host).await {
        Ok(lookup) => {
            let addresses: Vec<IpAddr> = lookup.iter().collect();
            if addresses.is_empty() {
                Err(HostError::Missing)
            } else {
                Ok(addresses)
            }
        }
        Err(e) if e.is_nx_domain() || e.is_no_records_found() => Err(HostError::Missing),
        Err(e) => Err(HostError::Temporary(e.to_string())),
    }
}

/// Sorts by preference, shuffling hosts of equal preference (RFC 5321 §5.1).
pub(super) fn order_by_preference(hosts: &mut [(u16, String)]) {
    let mut rng = rand::rng();
    hosts.shuffle(&mut rng);
    hosts.sort_by_key(|(preference, _)| *preference);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preference_order_is_kept_and_ties_are_shuffled() {
        let mut seen_first = std::collections::HashSet::new();
        for _ in 0..64 {
            let mut hosts = vec![
                (20, "c".to_owned()),
                (10, "a".to_owned()),
                (10, "b".to_owned()),
                (30, "d".to_owned()),
            ];
            order_by_preference(&mut hosts);
            let prefs: Vec<u16> = hosts.iter().map(|(p, _)| *p).collect();
            assert_eq!(prefs, [10, 10, 20, 30]);
            seen_first.insert(hosts[0].1.clone());
        }
        assert_eq!(
            seen_first.len(),
            2,
            "both equal-preference hosts come first sometimes"
        );
    }
}
