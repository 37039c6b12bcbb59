//! DNS blocklist look-ups of the connecting client's address (RFC 5782).
//!
//! `1.2.3.4` is listed in `zone` when `4.3.2.1.<zone>` has an A record in 127.0.0.0/8
//! (IPv6: the 32 reversed nibbles, §2.4); the TXT record at the same name, when there is
//! one, says why. NXDOMAIN or no A record means not listed. A DNS failure is an error
//! the caller must treat as temporary (`451 4.7.1`), never as "not listed" and never as
//! "listed".
//!
//! Answers outside 127.0.0.0/8 are ignored (RFC 5782 §2.1: a list MUST answer inside
//! it; anything else is a hijacked or wildcarded zone), as are the 127.255.255.0/24
//! codes large lists use to say "your query was refused" rather than "listed".

use hickory_resolver::TokioResolver;
use hickory_resolver::proto::rr::RData;
use std::fmt;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};

/// A listing: the A record and, when published, the TXT reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsblListing {
    /// The name that was looked up, e.g. `2.0.0.127.zen.example`.
    pub query: String,
    /// The A record (e.g. 127.0.0.2; lists encode the reason in the last octet).
    pub address: Ipv4Addr,
    /// The TXT record, if any (often a URL explaining the listing).
    pub text: Option<String>,
}

impl fmt::Display for DnsblListing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.address)?;
        if let Some(text) = &self.text {
            write!(f, " ({text})")?;
        }
        Ok(())
    }
}

/// The look-up could not be completed; the answer is unknown.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("DNSBL look-up {query} failed: {detail}")]
pub struct DnsblError {
    pub query: String,
    pub detail: String,
}

/// Looks `ip` up in the DNSBL `zone` (e.g. `zen.spamhaus.org`).
pub async fn dnsbl_listed(
    resolver: &TokioResolver,
    ip: IpAddr,
    zone: &str,
) -> Result<Option<DnsblListing>, DnsblError> {
    let query = query_name(ip, zone);
    let failed = |detail: String| DnsblError {
        query: query.clone(),
        detail,
    };
    let lookup = match resolver.ipv4_lookup(query.as_str()).await {
        Ok(lookup) => lookup,
        Err(e) if e.is_nx_domain() || e.is_no_records_found() => return Ok(None),
        Err(e) => return Err(failed(e.to_string())),
    };
    let address = lookup
        .answers()
        .iter()
        .find_map(|record| match &record.data {
            RData::A(a) if is_listing(a.0) => Some(a.0),
            _ => None,
        });
    let Some(address) = address else {
        return Ok(None);
    };
    // The reason is a courtesy: a failure to fetch it does not undo the listing.
    let text = resolver
        .txt_lookup(query.as_str())
        .await
        .ok()
        .and_then(|lookup| {
            lookup
                .answers()
                .iter()
                .find_map(|record| match &record.data {
                    RData::TXT(txt) => Some(
                        txt.txt_data
                            .iter()
                            .map(|part| String::from_utf8_lossy(part))
                            .collect::<String>(),
                    ),
                    _ => None,
                })
        });
    Ok(Some(DnsblListing {
        query,
        address,
        text,
    }))
}

fn is_listing(address: Ipv4Addr) -> bool {
    let [a, b, c, _] = address.octets();
    a == 127 && !(b == 255 && c == 255)
}

/// `d.c.b.a.<zone>.` for IPv4; 32 reversed nibbles for IPv6 (RFC 5782 §2.1, §2.4).
fn query_name(ip: IpAddr, zone: &str) -> String {
    let mut name = String::with_capacity(80);
    match ip {
        IpAddr::V4(v4) => {
            for octet in v4.octets().iter().rev() {
                let _ = write!(name, "{octet}.");
            }
        }
        IpAddr::V6(v6) => {
            for byte in v6.octets().iter().rev() {
                let _ = write!(name, "{:x}.{:x}.", byte & 0x0f, byte >> 4);
            }
        }
    }
    name.push_str(zone.trim_end_matches('.'));
    name.push('.');
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_names() {
        assert_eq!(
            query_name("192.0.2.99".parse().unwrap(), "bl.example."),
            "99.2.0.192.bl.example."
        );
        assert_eq!(
            query_name("2001:db8::1".parse().unwrap(), "bl.example"),
            "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.bl.example."
        );
    }

    #[test]
    fn listing_range() {
        assert!(is_listing(Ipv4Addr::new(127, 0, 0, 2)));
        assert!(!is_listing(Ipv4Addr::new(127, 255, 255, 254)));
        assert!(!is_listing(Ipv4Addr::new(192, 0, 2, 1)));
    }
}
