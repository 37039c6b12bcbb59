//! Is a TXT record answered by every authoritative nameserver of its zone? The DKIM key
//! rotation asks this before it signs with a new key (DESIGN.md section 4).
//!
//! This module owns: finding the zone of a name (the SOA of the negative answer, else
//! walking up), its NS set and their addresses through the resolver it is given; one direct
//! query per server address (UDP with recursion not desired, TCP when the answer is
//! truncated) for the TXT record and for the zone's SOA; and [`AuthoritativeCheck::verdict`],
//! the pure rule that turns those answers into "visible, wait this long", "not visible, these
//! servers lag" or "nothing is known".
//!
//! It must never take the record itself from a caching resolver (a cache may hold the old
//! value or a negative answer for as long as its TTL), never wait without a deadline, and
//! never say [`Verdict::Visible`] unless every server it found answered, authoritatively,
//! with the expected value.
//!
//! The resolver is only used for the zone, the NS names and their addresses; the address
//! families asked are those the resolver's IP strategy returns (IPv4, then IPv6 when a name
//! has no IPv4 address, by default), so a pod without IPv6 is not made to fail on servers
//! it cannot reach.

use futures::future::join_all;
use hickory_resolver::TokioResolver;
use hickory_resolver::proto::op::{Edns, Message, MessageType, Query, ResponseCode};
use hickory_resolver::proto::rr::{Name, RData, RecordType};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::{Instant, timeout, timeout_at};

/// What one authoritative server said about the record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerAnswer {
    /// The server answers the expected value with this TTL (seconds, as configured).
    Matches {
        /// The TTL of the TXT record set.
        ttl: u32,
    },
    /// The server says the name does not exist (NXDOMAIN) or has no TXT record (NODATA).
    Missing,
    /// The server answers TXT records, none of them the expected value.
    Differs,
    /// No usable answer: timeout, refused, SERVFAIL, not authoritative, a CNAME, or the
    /// zone's SOA could not be read from it. The text says which.
    Failed(String),
}

/// One authoritative server of the zone (one address of one NS name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerReport {
    /// NS host name, fully qualified (`ns1.example.com.`).
    pub name: String,
    /// The address asked.
    pub address: SocketAddr,
    /// What it said.
    pub answer: ServerAnswer,
    /// The zone serial it answered in its SOA, when it did (helps tell a lagging secondary).
    pub serial: Option<u32>,
}

/// The result for one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthoritativeCheck {
    /// The zone found for the name, fully qualified; empty when none was found.
    pub zone: String,
    /// RFC 2308 §5 negative-caching TTL, min(SOA MINIMUM, SOA record TTL), the largest
    /// among the servers that answered their SOA; `None` when none did.
    pub negative_ttl: Option<u32>,
    /// Every server asked, sorted by name then address.
    pub servers: Vec<ServerReport>,
    /// Why the zone, its NS set or an NS address could not be found, when that happened.
    pub error: Option<String>,
}

/// The verdict the rotation uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every authoritative server answers the expected value. `wait` is the largest record
    /// TTL seen plus the negative TTL: after that long no resolver can still hold a cached
    /// NXDOMAIN/NODATA or an old value.
    Visible {
        /// How long to wait before relying on the record.
        wait: Duration,
    },
    /// At least one server definitely answers "missing" or another value; names the
    /// laggards (NS names, each once).
    NotVisible {
        /// NS names of the servers that do not answer the expected value.
        lagging: Vec<String>,
    },
    /// Could not find the zone/servers, or a server did not answer: nothing is known.
    LookupFailed(String),
}

impl AuthoritativeCheck {
    /// The verdict, from the answers alone. A definite "missing" or "other value" from any
    /// server wins over a failure elsewhere (the record is certainly not visible
    /// everywhere); otherwise any failure, or no server at all, or no negative TTL, means
    /// nothing is known.
    pub fn verdict(&self) -> Verdict {
        let mut lagging: Vec<String> = Vec::new();
        for server in &self.servers {
            if matches!(server.answer, ServerAnswer::Missing | ServerAnswer::Differs)
                && !lagging.contains(&server.name)
            {
                lagging.push(server.name.clone());
            }
        }
        if !lagging.is_empty() {
            return Verdict::NotVisible { lagging };
        }
        if let Some(error) = &self.error {
            return Verdict::LookupFailed(error.clone());
        }
        if self.servers.is_empty() {
            return Verdict::LookupFailed(format!(
                "no authoritative servers found for zone {}",
                self.zone
            ));
        }
        let failed: Vec<String> = self
            .servers
            .iter()
            .filter_map(|s| match &s.answer {
                ServerAnswer::Failed(why) => Some(format!("{} ({}): {why}", s.name, s.address)),
                _ => None,
            })
            .collect();
        if !failed.is_empty() {
            return Verdict::LookupFailed(failed.join("; "));
        }
        let Some(negative_ttl) = self.negative_ttl else {
            return Verdict::LookupFailed(format!("no SOA answered for zone {}", self.zone));
        };
        let max_ttl = self
            .servers
            .iter()
            .filter_map(|s| match s.answer {
                ServerAnswer::Matches { ttl } => Some(ttl),
                _ => None,
            })
            .max()
            .unwrap_or(0);
        Verdict::Visible {
            wait: Duration::from_secs(u64::from(max_ttl) + u64::from(negative_ttl)),
        }
    }
}

/// Finds the zone of `name` (the SOA in the negative answer / walking up), its NS set and
/// their addresses through `resolver` (a hickory TokioResolver; in tests it points at the
/// loopback authoritative servers), then asks each NS address directly on `port` (53 in
/// production; tests pass the port their servers use) with recursion not desired and no
/// cache. `expected` is the TXT value as text (multi-string TXT records are concatenated,
/// per RFC 6376 §3.6.2.2). Every lookup and every query has the deadline `timeout`.
pub async fn check_txt(
    resolver: &TokioResolver,
    name: &str,
    expected: &str,
    port: u16,
    timeout: Duration,
) -> AuthoritativeCheck {
    let mut check = AuthoritativeCheck {
        zone: String::new(),
        negative_ttl: None,
        servers: Vec::new(),
        error: None,
    };
    let qname = match Name::from_ascii(super::fqdn(name)) {
        Ok(n) => n,
        Err(e) => {
            check.error = Some(format!("{name} is not a domain name: {e}"));
            return check;
        }
    };
    let zone = match find_zone(resolver, &qname, timeout).await {
        Ok(zone) => zone,
        Err(e) => {
            check.error = Some(e);
            return check;
        }
    };
    check.zone = zone.to_ascii();
    let targets = match server_addresses(resolver, &zone, port, timeout).await {
        Ok((targets, unresolved)) => {
            if !unresolved.is_empty() {
                check.error = Some(unresolved.join("; "));
            }
            targets
        }
        Err(e) => {
            check.error = Some(e);
            return check;
        }
    };
    let reports = join_all(targets.into_iter().map(|(ns, address)| {
        let (qname, zone) = (qname.clone(), zone.clone());
        async move {
            let (txt, soa) = futures::join!(
                ask(address, &qname, RecordType::TXT, timeout),
                ask(address, &zone, RecordType::SOA, timeout)
            );
            let soa = soa.and_then(|m| negative_ttl(&m, &zone));
            let answer = match (txt, &soa) {
                (Err(e), _) => ServerAnswer::Failed(e),
                (Ok(_), Err(e)) => ServerAnswer::Failed(format!("SOA of {zone}: {e}")),
                (Ok(m), Ok(_)) => classify(&m, expected),
            };
            let (serial, negative) = match soa {
                Ok((serial, negative)) => (Some(serial), Some(negative)),
                Err(_) => (None, None),
            };
            (
                ServerReport {
                    name: ns,
                    address,
                    answer,
                    serial,
                },
                negative,
            )
        }
    }))
    .await;
    check.negative_ttl = reports.iter().filter_map(|(_, n)| *n).max();
    check.servers = reports.into_iter().map(|(r, _)| r).collect();
    check
}

/// The zone that holds `name`: the owner of the SOA answered for it, or of the SOA in its
/// negative answer; else the same question one label up.
async fn find_zone(resolver: &TokioResolver, name: &Name, limit: Duration) -> Result<Name, String> {
    let mut candidate = name.clone();
    loop {
        let lookup = timeout(limit, resolver.soa_lookup(candidate.clone()))
            .await
            .map_err(|_| format!("SOA lookup for {candidate}: no answer within {limit:?}"))?;
        match lookup {
            Ok(lookup) => {
                if let Some(soa) = lookup
                    .answers()
                    .iter()
                    .find(|r| matches!(r.data, RData::SOA(_)))
                {
                    return Ok(soa.name.clone());
                }
            }
            Err(e) if e.is_no_records_found() => {
                if let Some(soa) = e.into_soa() {
                    return Ok(soa.name.clone());
                }
            }
            Err(e) => return Err(format!("SOA lookup for {candidate}: {e}")),
        }
        if candidate.is_root() {
            return Err(format!("no zone found for {name}"));
        }
        candidate = candidate.base_name();
    }
}

/// The zone's NS names and their addresses on `port`, sorted; plus a message for each NS
/// name whose address could not be found.
async fn server_addresses(
    resolver: &TokioResolver,
    zone: &Name,
    port: u16,
    limit: Duration,
) -> Result<(Vec<(String, SocketAddr)>, Vec<String>), String> {
    let lookup = timeout(limit, resolver.ns_lookup(zone.clone()))
        .await
        .map_err(|_| format!("NS lookup for {zone}: no answer within {limit:?}"))?
        .map_err(|e| format!("NS lookup for {zone}: {e}"))?;
    let mut names: Vec<Name> = lookup
        .answers()
        .iter()
        .filter_map(|r| match &r.data {
            RData::NS(ns) => Some(ns.0.clone()),
            _ => None,
        })
        .collect();
    names.sort();
    names.dedup();
    if names.is_empty() {
        return Err(format!("no NS records for zone {zone}"));
    }
    let addresses = join_all(names.iter().map(|ns| async move {
        match timeout(limit, resolver.lookup_ip(ns.clone())).await {
            Err(_) => Err(format!("address of {ns}: no answer within {limit:?}")),
            Ok(Err(e)) => Err(format!("address of {ns}: {e}")),
            Ok(Ok(ips)) => Ok(ips.iter().collect::<Vec<_>>()),
        }
    }))
    .await;
    let mut targets = Vec::new();
    let mut unresolved = Vec::new();
    for (ns, ips) in names.iter().zip(addresses) {
        match ips {
            Ok(ips) if !ips.is_empty() => {
                for ip in ips {
                    targets.push((ns.to_ascii(), SocketAddr::new(ip, port)));
                }
            }
            Ok(_) => unresolved.push(format!("address of {ns}: none")),
            Err(e) => unresolved.push(e),
        }
    }
    targets.sort();
    targets.dedup();
    Ok((targets, unresolved))
}

/// The answer of one authoritative server to the TXT question.
fn classify(response: &Message, expected: &str) -> ServerAnswer {
    if !response.metadata.authoritative {
        return ServerAnswer::Failed(
            "answer is not authoritative (AA clear): the server does not serve this zone".into(),
        );
    }
    match response.metadata.response_code {
        ResponseCode::NXDomain => return ServerAnswer::Missing,
        ResponseCode::NoError => {}
        other => return ServerAnswer::Failed(format!("answered {other}")),
    }
    let want = super::normalise_txt(expected);
    let mut matching_ttl = None;
    let mut any_txt = false;
    for record in &response.answers {
        if let RData::TXT(txt) = &record.data {
            any_txt = true;
            let joined: Vec<u8> = txt
                .txt_data
                .iter()
                .flat_map(|s| s.iter().copied())
                .collect();
            if super::normalise_txt(&String::from_utf8_lossy(&joined)) == want {
                matching_ttl = matching_ttl.max(Some(record.ttl));
            }
        }
    }
    if let Some(ttl) = matching_ttl {
        // One RRset has one TTL; the largest seen is the safe one if a server disagrees.
        let ttl = response
            .answers
            .iter()
            .filter(|r| matches!(r.data, RData::TXT(_)))
            .map(|r| r.ttl)
            .fold(ttl, u32::max);
        return ServerAnswer::Matches { ttl };
    }
    if any_txt {
        return ServerAnswer::Differs;
    }
    if let Some(target) = response.answers.iter().find_map(|r| match &r.data {
        RData::CNAME(c) => Some(c.0.to_ascii()),
        _ => None,
    }) {
        return ServerAnswer::Failed(format!(
            "the name is a CNAME to {target}; check the target's zone instead"
        ));
    }
    ServerAnswer::Missing
}

/// The zone's serial and RFC 2308 negative TTL, min(SOA MINIMUM, SOA TTL), from a direct
/// answer to the SOA question.
fn negative_ttl(response: &Message, zone: &Name) -> Result<(u32, u32), String> {
    if !response.metadata.authoritative {
        return Err("answer is not authoritative (AA clear)".into());
    }
    if response.metadata.response_code != ResponseCode::NoError {
        return Err(format!("answered {}", response.metadata.response_code));
    }
    response
        .answers
        .iter()
        .find_map(|r| match &r.data {
            RData::SOA(soa) if r.name == *zone => Some((soa.serial, soa.minimum.min(r.ttl))),
            _ => None,
        })
        .ok_or_else(|| "no SOA record in the answer".to_owned())
}

/// Asks `server` one question directly: UDP (resent every third of `limit`), then TCP if
/// the answer is truncated, all within `limit`. Only an answer to this question (same id,
/// same question) from that address is accepted.
async fn ask(
    server: SocketAddr,
    name: &Name,
    rtype: RecordType,
    limit: Duration,
) -> Result<Message, String> {
    let deadline = Instant::now() + limit;
    let query = Query::query(name.clone(), rtype);
    let mut request = Message::query();
    request.metadata.recursion_desired = false;
    request.add_query(query.clone());
    let mut edns = Edns::new();
    edns.set_max_payload(1232);
    request.set_edns(edns);
    let bytes = request
        .to_vec()
        .map_err(|e| format!("encoding query: {e}"))?;
    let id = request.metadata.id;
    let is_answer = |m: &Message| {
        m.metadata.id == id
            && m.metadata.message_type == MessageType::Response
            && m.queries.first() == Some(&query)
    };

    let local: SocketAddr = if server.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(local)
        .await
        .map_err(|e| format!("UDP socket: {e}"))?;
    socket
        .connect(server)
        .await
        .map_err(|e| format!("UDP to {server}: {e}"))?;
    let resend = limit / 3;
    let mut next_send = Instant::now();
    let mut buf = vec![0u8; 65535];
    let response = loop {
        let now = Instant::now();
        if now >= deadline {
            return Err(format!("no answer within {limit:?}"));
        }
        if now >= next_send {
            socket
                .send(&bytes)
                .await
                .map_err(|e| format!("UDP send: {e}"))?;
            next_send = now + resend;
        }
        match timeout_at(next_send.min(deadline), socket.recv(&mut buf)).await {
            Err(_) => continue,
            Ok(Err(e)) => return Err(format!("UDP: {e}")),
            Ok(Ok(n)) => match Message::from_vec(&buf[..n]) {
                Ok(m) if is_answer(&m) => break m,
                _ => continue,
            },
        }
    };
    if !response.metadata.truncation {
        return Ok(response);
    }

    let tcp = async {
        let mut stream = TcpStream::connect(server).await?;
        let len = u16::try_from(bytes.len()).map_err(std::io::Error::other)?;
        let mut framed = len.to_be_bytes().to_vec();
        framed.extend_from_slice(&bytes);
        stream.write_all(&framed).await?;
        let len = stream.read_u16().await?;
        let mut body = vec![0u8; usize::from(len)];
        stream.read_exact(&mut body).await?;
        Ok::<_, std::io::Error>(body)
    };
    let body = timeout_at(deadline, tcp)
        .await
        .map_err(|_| format!("no TCP answer within {limit:?}"))?
        .map_err(|e| format!("TCP: {e}"))?;
    match Message::from_vec(&body) {
        Ok(m) if is_answer(&m) => Ok(m),
        Ok(_) => Err("TCP answer to another question".into()),
        Err(e) => Err(format!("TCP answer undecodable: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(name: &str, answer: ServerAnswer) -> ServerReport {
        ServerReport {
            name: name.to_owned(),
            address: "192.0.2.1:53".parse().unwrap(),
            answer,
            serial: Some(1),
        }
    }

    fn check(servers: Vec<ServerReport>) -> AuthoritativeCheck {
        AuthoritativeCheck {
            zone: "example.com.".into(),
            negative_ttl: Some(300),
            servers,
            error: None,
        }
    }

    #[test]
    fn verdict_table() {
        use ServerAnswer::*;
        let matches = |ttl| Matches { ttl };
        let secs = |s| Verdict::Visible {
            wait: Duration::from_secs(s),
        };
        let cases: Vec<(&str, AuthoritativeCheck, Verdict)> = vec![
            (
                "all match: max TTL + negative TTL",
                check(vec![
                    server("ns1.", matches(120)),
                    server("ns2.", matches(600)),
                ]),
                secs(900),
            ),
            (
                "one missing",
                check(vec![server("ns1.", matches(120)), server("ns2.", Missing)]),
                Verdict::NotVisible {
                    lagging: vec!["ns2.".into()],
                },
            ),
            (
                "one differs",
                check(vec![server("ns1.", Differs), server("ns2.", matches(120))]),
                Verdict::NotVisible {
                    lagging: vec!["ns1.".into()],
                },
            ),
            (
                "two addresses of one laggard are named once",
                check(vec![server("ns2.", Missing), server("ns2.", Missing)]),
                Verdict::NotVisible {
                    lagging: vec!["ns2.".into()],
                },
            ),
            (
                "one failed",
                check(vec![
                    server("ns1.", matches(120)),
                    server("ns2.", Failed("timeout".into())),
                ]),
                Verdict::LookupFailed("ns2. (192.0.2.1:53): timeout".into()),
            ),
            (
                "a definite laggard wins over a failure",
                check(vec![
                    server("ns1.", Missing),
                    server("ns2.", Failed("timeout".into())),
                ]),
                Verdict::NotVisible {
                    lagging: vec!["ns1.".into()],
                },
            ),
            (
                "no servers",
                check(vec![]),
                Verdict::LookupFailed(
                    "no authoritative servers found for zone example.com.".into(),
                ),
            ),
            (
                "an NS without address",
                AuthoritativeCheck {
                    error: Some("address of ns3.: none".into()),
                    ..check(vec![server("ns1.", matches(120))])
                },
                Verdict::LookupFailed("address of ns3.: none".into()),
            ),
            (
                "no negative TTL",
                AuthoritativeCheck {
                    negative_ttl: None,
                    ..check(vec![server("ns1.", matches(120))])
                },
                Verdict::LookupFailed("no SOA answered for zone example.com.".into()),
            ),
        ];
        for (what, check, want) in cases {
            assert_eq!(check.verdict(), want, "{what}");
        }
    }

    fn response(rcode: ResponseCode, aa: bool, answers: Vec<(&str, u32, RData)>) -> Message {
        let mut m = Message::response(7, hickory_resolver::proto::op::OpCode::Query);
        m.metadata.authoritative = aa;
        m.metadata.response_code = rcode;
        for (name, ttl, data) in answers {
            m.add_answer(hickory_resolver::proto::rr::Record::from_rdata(
                Name::from_ascii(name).unwrap(),
                ttl,
                data,
            ));
        }
        m
    }

    fn txt(parts: &[&str]) -> RData {
        RData::TXT(hickory_resolver::proto::rr::rdata::TXT::new(
            parts.iter().map(|s| (*s).to_owned()).collect(),
        ))
    }

    #[test]
    fn classify_table() {
        use ResponseCode::*;
        let expected = "v=DKIM1; k=ed25519; p=abc";
        let name = "sel._domainkey.example.com.";
        let cases: Vec<(&str, Message, ServerAnswer)> =
            vec![
            (
                "several strings, other spacing around ;",
                response(NoError, true, vec![(name, 120, txt(&["v=DKIM1;k=ed25519;", " p=abc"]))]),
                ServerAnswer::Matches { ttl: 120 },
            ),
            (
                "another value beside the expected one",
                response(
                    NoError,
                    true,
                    vec![(name, 60, txt(&["v=DKIM1; p=old"])), (name, 60, txt(&[expected]))],
                ),
                ServerAnswer::Matches { ttl: 60 },
            ),
            (
                "another value only",
                response(NoError, true, vec![(name, 60, txt(&["v=DKIM1; p=old"]))]),
                ServerAnswer::Differs,
            ),
            ("NODATA", response(NoError, true, vec![]), ServerAnswer::Missing),
            ("NXDOMAIN", response(NXDomain, true, vec![]), ServerAnswer::Missing),
            (
                "not authoritative",
                response(NoError, false, vec![(name, 120, txt(&[expected]))]),
                ServerAnswer::Failed(
                    "answer is not authoritative (AA clear): the server does not serve this zone"
                        .into(),
                ),
            ),
            (
                "SERVFAIL",
                response(ServFail, true, vec![]),
                ServerAnswer::Failed("answered Server Failure".into()),
            ),
        ];
        for (what, m, want) in cases {
            assert_eq!(classify(&m, expected), want, "{what}");
        }
    }
}
