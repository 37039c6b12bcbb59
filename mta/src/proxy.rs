//! The PROXY protocol (HAProxy's `proxy-protocol.txt`: the v1 text line and the v2 binary
//! header) on listeners with `proxy_protocol: true`.
//!
//! Owns: reading the one header a load balancer sends at the start of a connection, and
//! turning it into the client address that the limits, the policy, the session and the
//! logs see ([`Origin`]). Parsing itself is the `ppp` crate's; this module decides how
//! much is read, what counts as complete, and what a header means.
//!
//! Invariants:
//! * Never consumes a byte past the header. Bytes are peeked, and only the header's own
//!   bytes are read off the socket, so the SMTP session (or, on `smtps`, the TLS
//!   handshake) starts at the first byte after it and no buffer needs handing on.
//! * Bounded: a v1 line is at most 107 bytes and a v2 header at most 16 + 65535; the
//!   caller puts one deadline on the whole read (`smtpd.proxy_header_timeout`).
//! * Any failure ([`Error`]) concerns that one connection: the caller logs it, counts it
//!   and closes the socket without a reply, since the peer is a proxy (or something that
//!   should not be talking to this port), not an SMTP client.
//!
//! Never decides trust by itself beyond [`trusted`]: a `proxy_protocol` listener believes
//! whatever address a trusted sender puts in the header.

use mta_config::ListenerConfig;
use ppp::PartialResult;
use std::net::{IpAddr, SocketAddr};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// Longest header there is: a v2 header's 16 fixed bytes plus the largest length its
/// 16-bit field can give (v1 lines stop at 107 bytes). A parse never answers
/// [`Parsed::Incomplete`] for this many bytes.
pub const MAX_HEADER: usize = 16 + 0xFFFF;

/// Bytes looked at per peek. Covers a v1 line and a v2 header for IPv6 with the usual
/// TLVs in one go; larger v2 headers take a few more rounds.
const PEEK_CHUNK: usize = 512;

/// Which address a connection stands for, according to its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The client's address and port, as the proxy saw them.
    Client(SocketAddr),
    /// The header gives no client: a v2 `LOCAL` command (the proxy's own health check),
    /// v1 `UNKNOWN`, or a v2 address family that is not IP. The socket's peer stands.
    Socket,
}

impl Origin {
    /// The address to use for a connection whose socket peer is `socket`.
    pub fn resolve(self, socket: SocketAddr) -> SocketAddr {
        match self {
            Origin::Client(client) => client,
            Origin::Socket => socket,
        }
    }
}

/// Why a connection's header was refused. The connection is closed without a reply.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket's peer is not in `proxy_trusted_networks`; nothing was read.
    #[error("PROXY header not accepted from {0} (not in proxy_trusted_networks)")]
    Untrusted(IpAddr),
    /// End of stream before a whole header.
    #[error("connection closed before a complete PROXY header")]
    Closed,
    /// Bytes that are no PROXY header (e.g. a plain SMTP client's `EHLO`), or a broken one.
    #[error("no valid PROXY header: {0}")]
    Malformed(String),
    /// No whole header within `smtpd.proxy_header_timeout`.
    #[error("no complete PROXY header within {0:?}")]
    Timeout(std::time::Duration),
    #[error("reading the PROXY header: {0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    /// The `result` label of `petrel_mta_proxy_headers_total`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Untrusted(_) => "untrusted",
            Error::Closed => "closed",
            Error::Malformed(_) => "malformed",
            Error::Timeout(_) => "timeout",
            Error::Io(_) => "io_error",
        }
    }
}

/// Whether `peer` may send a PROXY header to `listener` (absent list: anyone).
pub fn trusted(listener: &ListenerConfig, peer: IpAddr) -> bool {
    let peer = peer.to_canonical();
    listener
        .proxy_trusted_networks
        .as_ref()
        .is_none_or(|networks| networks.iter().any(|n| n.contains(&peer)))
}

/// What the bytes received so far amount to.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A whole header, the first `length` bytes of the input.
    Complete { origin: Origin, length: usize },
    /// A proper beginning of a header: more bytes are needed.
    Incomplete,
    /// Not a header, and no more bytes can make it one.
    Invalid(String),
}

/// The start of every v1 line.
const V1_PREFIX: &[u8] = b"PROXY ";
/// Longest v1 line, CRLF included (proxy-protocol.txt §2.1).
const V1_MAX: usize = 107;

/// Parses the start of a connection's byte stream; bytes after the header are ignored.
pub fn parse(bytes: &[u8]) -> Parsed {
    let v2 = ppp::v2::PROTOCOL_PREFIX;
    let n = bytes.len().min(v2.len());
    if bytes[..n] == v2[..n] {
        // Bounded by its own 16-bit length field: at most MAX_HEADER bytes.
        return parse_v2(bytes);
    }
    let n = bytes.len().min(V1_PREFIX.len());
    if bytes[..n] != V1_PREFIX[..n] {
        return Parsed::Invalid("neither a v1 nor a v2 PROXY header".into());
    }
    parse_v1(bytes)
}

fn parse_v2(bytes: &[u8]) -> Parsed {
    match ppp::v2::Header::try_from(bytes) {
        Ok(header) => Parsed::Complete {
            origin: v2_origin(header.command, header.addresses),
            length: header.len(),
        },
        Err(e) if e.is_incomplete() => Parsed::Incomplete,
        Err(e) => Parsed::Invalid(format!("v2: {e}")),
    }
}

/// A v1 line is handed to `ppp` only once its end is here: `ppp` takes some proper
/// prefixes (one ending in a space) for broken headers.
fn parse_v1(bytes: &[u8]) -> Parsed {
    let window = &bytes[..bytes.len().min(V1_MAX)];
    let Some(lf) = window.iter().position(|&b| b == b'\n') else {
        return if bytes.len() >= V1_MAX {
            Parsed::Invalid(format!("v1: no CRLF within {V1_MAX} bytes"))
        } else {
            Parsed::Incomplete
        };
    };
    if lf == 0 || window[lf - 1] != b'\r' {
        return Parsed::Invalid("v1: line ends in a bare LF".into());
    }
    let line = &window[..=lf];
    match ppp::v1::Header::try_from(line) {
        Ok(header) => Parsed::Complete {
            origin: v1_origin(header.addresses),
            length: line.len(),
        },
        Err(e) => Parsed::Invalid(format!("v1: {e}")),
    }
}

fn v1_origin(addresses: ppp::v1::Addresses) -> Origin {
    match addresses {
        ppp::v1::Addresses::Tcp4(a) => client(a.source_address.into(), a.source_port),
        ppp::v1::Addresses::Tcp6(a) => client(a.source_address.into(), a.source_port),
        // "the receiver must ignore anything presented before the CRLF is found" and use
        // the real connection's addresses (proxy-protocol.txt §2.1).
        ppp::v1::Addresses::Unknown => Origin::Socket,
    }
}

fn v2_origin(command: ppp::v2::Command, addresses: ppp::v2::Addresses) -> Origin {
    // LOCAL: "the receiver must accept this connection as valid and must use the real
    // connection endpoints and discard the protocol block" (proxy-protocol.txt §2.2).
    if command == ppp::v2::Command::Local {
        return Origin::Socket;
    }
    match addresses {
        ppp::v2::Addresses::IPv4(a) => client(a.source_address.into(), a.source_port),
        ppp::v2::Addresses::IPv6(a) => client(a.source_address.into(), a.source_port),
        ppp::v2::Addresses::Unspecified | ppp::v2::Addresses::Unix(_) => Origin::Socket,
    }
}

/// An IPv4 client behind a dual-stack proxy arrives as `::ffff:a.b.c.d`; it is the IPv4
/// address for limits, `client_networks` and `Received:`.
fn client(ip: IpAddr, port: u16) -> Origin {
    Origin::Client(SocketAddr::new(ip.to_canonical(), port))
}

/// Reads the PROXY header at the start of `stream`, consuming exactly its bytes.
///
/// Peeks at what has arrived; while that is only part of a header, those bytes (all of
/// them header) are consumed and the next peek waits for more. Once the header is whole,
/// only its remaining bytes are consumed. The caller bounds the time.
pub async fn read_header(stream: &mut TcpStream) -> Result<Origin, Error> {
    let mut header = Vec::new();
    let mut chunk = [0u8; PEEK_CHUNK];
    loop {
        // `header` stays under MAX_HEADER bytes: `parse` never asks for more beyond it.
        let n = stream.peek(&mut chunk).await?;
        if n == 0 {
            return Err(Error::Closed);
        }
        let seen = header.len();
        header.extend_from_slice(&chunk[..n]);
        match parse(&header) {
            Parsed::Complete { origin, length } => {
                stream.read_exact(&mut chunk[..length - seen]).await?;
                return Ok(origin);
            }
            Parsed::Incomplete => {
                stream.read_exact(&mut chunk[..n]).await?;
            }
            Parsed::Invalid(why) => return Err(Error::Malformed(why)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

    /// A v2 header built by hand from the spec: signature, version/command, family/protocol,
    /// length, addresses, then `tlvs`.
    fn v2(command: u8, family: u8, addresses: &[u8], tlvs: &[u8]) -> Vec<u8> {
        let mut out = V2_SIGNATURE.to_vec();
        out.push(0x20 | command);
        out.push(family);
        let length = u16::try_from(addresses.len() + tlvs.len()).expect("fits");
        out.extend_from_slice(&length.to_be_bytes());
        out.extend_from_slice(addresses);
        out.extend_from_slice(tlvs);
        out
    }

    fn v2_tcp4(src: [u8; 4], src_port: u16) -> Vec<u8> {
        let mut addresses = src.to_vec();
        addresses.extend_from_slice(&[10, 0, 0, 1]);
        addresses.extend_from_slice(&src_port.to_be_bytes());
        addresses.extend_from_slice(&25u16.to_be_bytes());
        v2(0x1, 0x11, &addresses, &[])
    }

    fn addr(text: &str) -> SocketAddr {
        text.parse().expect("socket address")
    }

    #[test]
    fn v1_headers() {
        for (input, origin) in [
            (
                "PROXY TCP4 192.0.2.7 10.0.0.1 40000 25\r\nEHLO x\r\n",
                Origin::Client(addr("192.0.2.7:40000")),
            ),
            (
                "PROXY TCP6 2001:db8::7 2001:db8::1 40000 25\r\n",
                Origin::Client(addr("[2001:db8::7]:40000")),
            ),
            (
                "PROXY TCP6 ::ffff:192.0.2.7 ::1 40000 25\r\n",
                Origin::Client(addr("192.0.2.7:40000")),
            ),
            ("PROXY UNKNOWN\r\n\x16\x03\x01", Origin::Socket),
            (
                "PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n",
                Origin::Socket,
            ),
        ] {
            let length = input.find("\r\n").expect("CRLF") + 2;
            assert_eq!(
                parse(input.as_bytes()),
                Parsed::Complete { origin, length },
                "{input:?}"
            );
        }
    }

    #[test]
    fn v2_headers() {
        let tcp4 = v2_tcp4([192, 0, 2, 7], 40000);
        assert_eq!(
            parse(&tcp4),
            Parsed::Complete {
                origin: Origin::Client(addr("192.0.2.7:40000")),
                length: 28
            }
        );
        let mut tcp6 = Vec::new();
        tcp6.extend_from_slice(
            &"2001:db8::7"
                .parse::<std::net::Ipv6Addr>()
                .expect("ip")
                .octets(),
        );
        tcp6.extend_from_slice(&[0; 16]);
        tcp6.extend_from_slice(&[0x9c, 0x40, 0, 25]);
        // A NOOP TLV (type 0x04) and an AWS-style custom TLV after the addresses.
        let tlvs = [0x04, 0, 2, 0, 0, 0xEA, 0, 3, b'v', b'p', b'c'];
        let header = v2(0x1, 0x21, &tcp6, &tlvs);
        let mut stream = header.clone();
        stream.extend_from_slice(b"EHLO x\r\n");
        assert_eq!(
            parse(&stream),
            Parsed::Complete {
                origin: Origin::Client(addr("[2001:db8::7]:40000")),
                length: header.len()
            }
        );
        // LOCAL (health check), with or without addresses; UNSPEC and UNIX families.
        for header in [
            v2(0x0, 0x00, &[], &[]),
            v2(0x0, 0x11, &tcp4[16..], &[]),
            v2(0x1, 0x00, &[], &[]),
            v2(0x1, 0x31, &[0; 216], &[]),
        ] {
            assert_eq!(
                parse(&header),
                Parsed::Complete {
                    origin: Origin::Socket,
                    length: header.len()
                }
            );
        }
    }

    #[test]
    fn the_largest_v2_header_is_complete() {
        let mut header = v2(0x1, 0x11, &[0; 12], &[]);
        header[14..16].copy_from_slice(&0xFFFFu16.to_be_bytes());
        header.resize(MAX_HEADER, 0);
        assert_eq!(parse(&header[..MAX_HEADER - 1]), Parsed::Incomplete);
        header.extend_from_slice(b"EHLO");
        assert!(matches!(
            parse(&header),
            Parsed::Complete {
                length: MAX_HEADER,
                ..
            }
        ));
    }

    #[test]
    fn every_proper_prefix_is_incomplete() {
        let v1 = b"PROXY TCP4 192.0.2.7 10.0.0.1 40000 25\r\n".to_vec();
        let v2 = v2_tcp4([192, 0, 2, 7], 40000);
        for header in [v1, v2] {
            for end in 0..header.len() {
                assert_eq!(parse(&header[..end]), Parsed::Incomplete, "{end} bytes");
            }
        }
    }

    #[test]
    fn garbage_is_invalid_at_once() {
        let mut long_v1 = b"PROXY UNKNOWN ".to_vec();
        long_v1.resize(120, b'x');
        for input in [
            &b"EHLO client.example\r\n"[..],
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
            b"PROXY TCP4 192.0.2.700 10.0.0.1 40000 25\r\n",
            b"PROXY TCP4 192.0.2.7 10.0.0.1 40000 25\n",
            b"PROXY TCP5 192.0.2.7 10.0.0.1 40000 25\r\n",
            &long_v1,
            // v2 signature, version 1 in the high nibble.
            b"\r\n\r\n\0\r\nQUIT\n\x11\x11\x00\x0c",
            // v2, IPv4 family but a length too short for the addresses.
            b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x04\x01\x02\x03\x04",
        ] {
            assert!(
                matches!(parse(input), Parsed::Invalid(_)),
                "{input:?} gave {:?}",
                parse(input)
            );
        }
    }

    #[test]
    fn trust_follows_the_listed_networks() {
        let mut listener =
            ListenerConfig::new(addr("127.0.0.1:25"), mta_config::ListenerKind::Smtp);
        listener.proxy_protocol = true;
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert!(
            trusted(&listener, ip("203.0.113.9")),
            "absent list trusts anyone"
        );
        listener.proxy_trusted_networks = Some(vec!["10.0.0.0/8".parse().expect("net")]);
        assert!(trusted(&listener, ip("10.1.2.3")));
        assert!(trusted(&listener, ip("::ffff:10.1.2.3")), "v4-mapped");
        assert!(!trusted(&listener, ip("203.0.113.9")));
    }

    /// A real socket: the header arrives in pieces, the bytes after it stay unread.
    async fn through_socket(pieces: Vec<Vec<u8>>) -> (Result<Origin, Error>, Vec<u8>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("addr");
        let client = tokio::spawn(async move {
            let mut socket = TcpStream::connect(address).await.expect("connect");
            socket.set_nodelay(true).expect("nodelay");
            // The pauses only make separate segments likely; the outcome does not
            // depend on them.
            for piece in pieces {
                socket.write_all(&piece).await.expect("write");
                socket.flush().await.expect("flush");
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            socket.shutdown().await.expect("shutdown");
        });
        let (mut stream, _) = listener.accept().await.expect("accept");
        let result = read_header(&mut stream).await;
        let mut rest = Vec::new();
        if result.is_ok() {
            stream.read_to_end(&mut rest).await.expect("rest");
        }
        client.await.expect("client");
        (result, rest)
    }

    #[tokio::test]
    async fn reads_exactly_the_header_even_in_pieces() {
        let (result, rest) = through_socket(vec![
            b"PROX".to_vec(),
            b"Y TCP4 192.0.2.7 10.0.0.1 4".to_vec(),
            b"0000 25\r\nEHLO x\r\n".to_vec(),
        ])
        .await;
        assert_eq!(
            result.expect("header"),
            Origin::Client(addr("192.0.2.7:40000"))
        );
        assert_eq!(rest, b"EHLO x\r\n");

        let header = v2_tcp4([198, 51, 100, 1], 1234);
        let (first, second) = header.split_at(14);
        let mut second = second.to_vec();
        second.extend_from_slice(b"\x16\x03\x01");
        let (result, rest) = through_socket(vec![first.to_vec(), second]).await;
        assert_eq!(
            result.expect("header"),
            Origin::Client(addr("198.51.100.1:1234"))
        );
        assert_eq!(
            rest, b"\x16\x03\x01",
            "a TLS ClientHello after the header is untouched"
        );
    }

    #[tokio::test]
    async fn a_missing_or_cut_header_is_an_error() {
        let (result, _) = through_socket(vec![b"EHLO plain.client\r\n".to_vec()]).await;
        assert!(matches!(result, Err(Error::Malformed(_))), "{result:?}");
        let (result, _) = through_socket(vec![b"PROXY TCP4 192.0.2.7".to_vec()]).await;
        assert!(matches!(result, Err(Error::Closed)), "{result:?}");
    }
}
