//! An authoritative DNS server for the `test.` zone, in process, on 127.0.0.1 (UDP and
//! TCP on the same OS-chosen port): hickory-server's in-memory zone behind a `Catalog`.
//! Names that are not in the zone get NXDOMAIN with the zone's SOA, like a real server.

use hickory_server::Server;
use hickory_server::net::runtime::TokioRuntimeProvider;
use hickory_server::proto::rr::rdata::{A, SOA, TXT};
use hickory_server::proto::rr::{LowerName, Name, RData, Record};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneType};
use std::net::{Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, UdpSocket};

pub struct TestDns {
    pub address: SocketAddr,
    _server: Server<Catalog>,
}

/// Builds the `test.` zone record by record.
pub struct Zone {
    handler: InMemoryZoneHandler<TokioRuntimeProvider>,
    serial: u32,
}

const TTL: u32 = 60;

fn name(fqdn: &str) -> Name {
    Name::from_str(&format!("{}.", fqdn.trim_end_matches('.'))).unwrap()
}

impl Zone {
    pub fn new() -> Self {
        let origin = name("test");
        let mut handler =
            InMemoryZoneHandler::empty(origin.clone(), ZoneType::Primary, AxfrPolicy::Deny);
        let soa = SOA::new(
            name("ns.test"),
            name("hostmaster.test"),
            1,
            3600,
            600,
            86400,
            60,
        );
        handler.upsert_mut(Record::from_rdata(origin, TTL, RData::SOA(soa)), 1);
        Zone { handler, serial: 1 }
    }

    /// A TXT record, split into strings of at most 255 bytes (RFC 1035 §3.3) as a
    /// published 2048-bit DKIM key must be.
    pub fn txt(mut self, owner: &str, text: &str) -> Self {
        let strings = text
            .as_bytes()
            .chunks(255)
            .map(|c| String::from_utf8(c.to_vec()).unwrap())
            .collect();
        self.serial += 1;
        self.handler.upsert_mut(
            Record::from_rdata(name(owner), TTL, RData::TXT(TXT::new(strings))),
            self.serial,
        );
        self
    }

    pub fn a(mut self, owner: &str, address: Ipv4Addr) -> Self {
        self.serial += 1;
        self.handler.upsert_mut(
            Record::from_rdata(name(owner), TTL, RData::A(A(address))),
            self.serial,
        );
        self
    }

    /// Serves the zone until the returned value is dropped.
    pub async fn serve(self) -> TestDns {
        let mut catalog = Catalog::new();
        catalog.upsert(LowerName::new(&name("test")), vec![Arc::new(self.handler)]);
        let mut server = Server::new(catalog);
        // The OS picks a free UDP port; TCP (for truncated answers) must get the same one,
        // so pick again if it is taken for TCP.
        for _ in 0..20 {
            let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let address = udp.local_addr().unwrap();
            let Ok(tcp) = TcpListener::bind(address).await else {
                continue;
            };
            server.register_socket(udp);
            server.register_listener(tcp, Duration::from_secs(10), 4096);
            return TestDns {
                address,
                _server: server,
            };
        }
        panic!("no port free for both UDP and TCP");
    }
}

/// An address where nothing answers DNS: a port that was just free on UDP and TCP.
pub async fn closed_port() -> SocketAddr {
    let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    udp.local_addr().unwrap()
}

/// A server that answers every query with SERVFAIL (what a recursive resolver says when
/// the authoritative servers are down or DNSSEC fails): the common real-world temperror.
pub async fn servfail_server() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let address = socket.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut buf = [0u8; 4096];
        while let Ok((len, peer)) = socket.recv_from(&mut buf).await {
            if len < 12 {
                continue;
            }
            let mut reply = buf[..len].to_vec();
            reply[2] |= 0x80; // QR: response
            reply[3] = (reply[3] & 0xf0) | 0x02 | 0x80; // RA, RCODE=SERVFAIL
            // No answer, authority or additional records (drops any EDNS OPT).
            reply[6..12].fill(0);
            let question_end = question_end(&reply).unwrap_or(len);
            reply.truncate(question_end);
            let _ = socket.send_to(&reply, peer).await;
        }
    });
    (address, task)
}

/// End of the (single) question section of a DNS message.
fn question_end(message: &[u8]) -> Option<usize> {
    let mut pos = 12;
    loop {
        let len = usize::from(*message.get(pos)?);
        pos += 1;
        if len == 0 {
            break;
        }
        pos += len;
    }
    Some(pos + 4).filter(|&end| end <= message.len())
}
