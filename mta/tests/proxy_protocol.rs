//! A `proxy_protocol` listener on a real socket: every connection comes from 127.0.0.1
//! (the "proxy"), and the header decides which client each one stands for.

use mta::server::Server;
use mta_config::{ListenerConfig, ListenerKind, MtaConfig};
use std::net::SocketAddr;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

async fn start(dir: &tempfile::TempDir) -> (Server, SocketAddr) {
    let mut config = MtaConfig::embedded_default();
    config.spool.path = dir.path().join("spool");
    config.tls = Default::default();
    config.local_domains.clear();
    config.admin.address = "127.0.0.1:0".parse().expect("addr");
    let mut listener =
        ListenerConfig::new("127.0.0.1:0".parse().expect("addr"), ListenerKind::Smtp);
    listener.proxy_protocol = true;
    config.listeners = vec![listener];
    config.smtpd.max_connections_per_ip = 1;
    config.relay.client_networks = vec!["192.0.2.0/24".parse().expect("net")];
    config.validate().expect("valid");
    let server = Server::start(config, None).await.expect("start");
    let address = server.addresses[0];
    (server, address)
}

struct Client {
    reader: BufReader<tokio::net::tcp::OwnedReadHalf>,
    writer: tokio::net::tcp::OwnedWriteHalf,
}

impl Client {
    async fn connect(address: SocketAddr, header: &[u8]) -> Client {
        let stream = TcpStream::connect(address).await.expect("connect");
        let (reader, mut writer) = stream.into_split();
        writer.write_all(header).await.expect("header");
        Client {
            reader: BufReader::new(reader),
            writer,
        }
    }

    /// The last line of the next reply, or `None` when the server closed the connection
    /// (a reset when it closed with our bytes unread).
    async fn reply(&mut self) -> Option<String> {
        loop {
            let mut line = String::new();
            match self.reader.read_line(&mut line).await {
                Ok(0) => return None,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
                Err(e) => panic!("read: {e}"),
            }
            if line.as_bytes().get(3) != Some(&b'-') {
                return Some(line.trim_end().to_owned());
            }
        }
    }

    async fn command(&mut self, line: &str) -> String {
        self.writer
            .write_all(format!("{line}\r\n").as_bytes())
            .await
            .expect("write");
        self.reply().await.expect("a reply")
    }
}

fn v1(client: &str) -> Vec<u8> {
    format!("PROXY TCP4 {client} 127.0.0.1 40000 25\r\n").into_bytes()
}

/// Built by hand from proxy-protocol.txt §2.2: signature, PROXY command, TCP over IPv4.
fn v2(client: [u8; 4]) -> Vec<u8> {
    let mut out = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
    out.extend_from_slice(&client);
    out.extend_from_slice(&[127, 0, 0, 1, 0x9c, 0x40, 0, 25]);
    out
}

#[tokio::test]
async fn the_header_address_is_the_client_for_limits_and_relay() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, address) = start(&dir).await;

    let mut first = Client::connect(address, &v1("192.0.2.1")).await;
    assert!(first.reply().await.expect("greeting").starts_with("220 "));
    // Same client again: its one connection is taken. The proxy's own address is not
    // what is counted, or the v2 client below would be refused too.
    let mut second = Client::connect(address, &v1("192.0.2.1")).await;
    assert!(
        second
            .reply()
            .await
            .expect("refusal")
            .starts_with("421 4.7.0")
    );
    let mut other = Client::connect(address, &v2([198, 51, 100, 7])).await;
    assert!(other.reply().await.expect("greeting").starts_with("220 "));

    // relay.client_networks is matched against the header's address.
    for (client, rcpt) in [(&mut first, "250 "), (&mut other, "550 5.7.1")] {
        assert!(client.command("EHLO client.test").await.starts_with("250 "));
        assert!(
            client
                .command("MAIL FROM:<a@client.test>")
                .await
                .starts_with("250 ")
        );
        let reply = client.command("RCPT TO:<b@remote.test>").await;
        assert!(reply.starts_with(rcpt), "{reply}");
    }
    // Sessions in a transaction are finished before shutdown: end them first.
    drop((first, second, other));
    server.shutdown().await;
}

#[tokio::test]
async fn a_connection_without_a_header_is_closed_and_others_go_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, address) = start(&dir).await;

    let mut plain = Client::connect(address, b"EHLO plain.test\r\n").await;
    assert_eq!(plain.reply().await, None, "closed without a greeting");
    let mut cut = Client::connect(address, b"PROXY TCP4 192.0.2.1").await;
    cut.writer.shutdown().await.expect("half close");
    assert_eq!(cut.reply().await, None);

    // A v2 LOCAL header (a health check) keeps the socket's address.
    let mut local = Client::connect(address, b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00").await;
    assert!(local.reply().await.expect("greeting").starts_with("220 "));
    let mut proxied = Client::connect(address, &v2([192, 0, 2, 9])).await;
    assert!(proxied.reply().await.expect("greeting").starts_with("220 "));
    assert!(proxied.command("QUIT").await.starts_with("221 "));

    let metrics = server.ctx.metrics.encode_prometheus();
    for line in [
        "petrel_mta_proxy_headers_total{result=\"malformed\"} 1",
        "petrel_mta_proxy_headers_total{result=\"closed\"} 1",
        "petrel_mta_proxy_headers_total{result=\"local\"} 1",
        "petrel_mta_proxy_headers_total{result=\"ok\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn a_reload_turns_the_header_off_without_a_rebind() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, address) = start(&dir).await;
    let mut plain = Client::connect(address, b"").await;
    plain.writer.shutdown().await.expect("half close");
    assert_eq!(plain.reply().await, None, "no header: closed");

    // The listener looks its settings up in the config in force at each accept.
    let mut config = (*server.ctx.config()).clone();
    config.listeners[0].proxy_protocol = false;
    server.ctx.set_config(config);
    let mut plain = Client::connect(address, b"").await;
    assert!(plain.reply().await.expect("greeting").starts_with("220 "));
    assert!(plain.command("QUIT").await.starts_with("221 "));
    server.shutdown().await;
}
