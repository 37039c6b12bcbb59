//! Interop with Python's aiosmtpd, a server nobody here wrote. Skipped (with a
//! message) when `python3` or the `aiosmtpd` module is missing.

use std::process::Stdio;

use mta_client::{Connection, OutboundMessage, OutboundRecipient};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::{config, tcp};

/// Binds 127.0.0.1:0, prints the port, then prints one line per message:
/// sender, recipients, mail options and content, tab-separated, content in hex.
const SINK: &str = r#"
import asyncio, sys
from aiosmtpd.smtp import SMTP

class Sink:
    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.startswith("reject"):
            return "550 5.1.1 No such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        print("\t".join([envelope.mail_from, ",".join(envelope.rcpt_tos),
                         " ".join(envelope.mail_options), envelope.original_content.hex()]),
              flush=True)
        return "250 2.0.0 Message accepted"

async def main():
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(Sink(), hostname="sink.example.test", enable_SMTPUTF8=True),
        host="127.0.0.1", port=0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()

asyncio.run(main())
"#;

fn aiosmtpd_available() -> bool {
    std::process::Command::new("python3")
        .args(["-c", "import aiosmtpd"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn unhex(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

#[tokio::test]
async fn delivers_to_aiosmtpd() {
    if !aiosmtpd_available() {
        println!("skipping delivers_to_aiosmtpd: python3 with aiosmtpd is not installed");
        return;
    }
    let mut child = Command::new("python3")
        .args(["-c", SINK])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let port: u16 = lines
        .next_line()
        .await
        .unwrap()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));

    let mut conn = Connection::connect(&tcp(addr), "sink.example.test", &config())
        .await
        .unwrap();
    assert!(conn.capabilities().eight_bit_mime);
    assert!(conn.capabilities().smtputf8);
    let to = [
        OutboundRecipient::new("alice@example.test"),
        OutboundRecipient::new("reject@example.test"),
        OutboundRecipient::new("bob@example.test"),
    ];
    let content = "Subject: caf\u{e9}\r\n\r\n.dot line\r\nend".as_bytes();
    let mut message = OutboundMessage::new("sender@example.net", &to, content);
    message.eight_bit = true;
    let replies = conn.send(&message).await.unwrap();
    let codes: Vec<u16> = replies.iter().map(|r| r.code).collect();
    assert_eq!(codes, [250, 550, 250]);
    assert_eq!(replies[0].text, "Message accepted");
    conn.quit().await;

    let record = lines.next_line().await.unwrap().unwrap();
    let fields: Vec<&str> = record.split('\t').collect();
    assert_eq!(fields[0], "sender@example.net");
    assert_eq!(fields[1], "alice@example.test,bob@example.test");
    assert!(fields[2].contains("BODY=8BITMIME"), "{}", fields[2]);
    assert!(
        fields[2].contains(&format!("SIZE={}", content.len())),
        "{}",
        fields[2]
    );
    let mut expected = content.to_vec();
    expected.extend_from_slice(b"\r\n");
    assert_eq!(unhex(fields[3]), expected);
    child.kill().await.unwrap();
}
