//! LMTP (RFC 2033): LHLO, and one reply per accepted recipient after the data,
//! over TCP and over a unix socket.

use mta_client::{ClientError, Connection, OutboundMessage, OutboundRecipient, Phase, Target};

use crate::server::{self, Script};
use crate::{config, tcp};

fn lmtp_script() -> Script {
    let mut script = Script::esmtp().keywords(&["PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES"]);
    script.lmtp = true;
    script
        .rcpt(|a| {
            if a.starts_with("nobody") {
                "550 5.1.1 User unknown".into()
            } else {
                "250 2.1.5 Ok".into()
            }
        })
        .final_reply(|a| {
            if a.starts_with("full") {
                "452 4.2.2 Mailbox full".into()
            } else if a.starts_with("quota") {
                "552 5.2.2 Quota exceeded".into()
            } else {
                format!("250 2.0.0 <{a}> Saved")
            }
        })
}

async fn deliver(target: Target) -> (Vec<mta_client::Reply>, Connection) {
    let mut config = config();
    config.lmtp = true;
    let mut conn = Connection::connect(&target, "localhost", &config)
        .await
        .unwrap();
    let to = [
        OutboundRecipient::new("alice@example.test"),
        OutboundRecipient::new("nobody@example.test"),
        OutboundRecipient::new("full@example.test"),
        OutboundRecipient::new("quota@example.test"),
    ];
    let mut message = OutboundMessage::new("s@example.net", &to, b"Subject: x\r\n\r\nhi\r\n");
    message.eight_bit = true;
    let replies = conn.send(&message).await.unwrap();
    (replies, conn)
}

fn check(replies: &[mta_client::Reply]) {
    let codes: Vec<u16> = replies.iter().map(|r| r.code).collect();
    assert_eq!(codes, [250, 550, 452, 552]);
    assert_eq!(replies[0].text, "<alice@example.test> Saved");
    assert_eq!(replies[1].enhanced, Some([5, 1, 1]));
    assert!(replies[2].is_transient());
    assert!(replies[3].is_permanent());
}

#[tokio::test]
async fn per_recipient_replies_over_tcp() {
    let (addr, log) = server::start(lmtp_script()).await;
    let (replies, conn) = deliver(tcp(addr)).await;
    check(&replies);
    conn.quit().await;
    let log = log.lock().unwrap();
    assert_eq!(log.verbs()[0], "LHLO");
    assert!(log.commands[1].contains("BODY=8BITMIME"));
}

#[tokio::test]
async fn per_recipient_replies_over_a_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lmtp.sock");
    let log = server::start_unix(lmtp_script(), &path).await;
    let (replies, mut conn) = deliver(Target::Unix(path)).await;
    check(&replies);
    // Reuse for a second message.
    let to = [OutboundRecipient::new("bob@example.test")];
    let replies = conn
        .send(&OutboundMessage::new("", &to, b"second\r\n"))
        .await
        .unwrap();
    assert_eq!(replies[0].text, "<bob@example.test> Saved");
    conn.quit().await;
    assert_eq!(log.lock().unwrap().messages.len(), 2);
}

#[tokio::test]
async fn lmtp_server_rejects_ehlo_so_lhlo_is_used() {
    // The scripted LMTP server answers EHLO with 500; LHLO must be what we send.
    let (addr, _) = server::start(lmtp_script()).await;
    let smtp_config = config();
    match Connection::connect(&tcp(addr), "localhost", &smtp_config).await {
        Err(ClientError::Rejected {
            phase: Phase::Ehlo, ..
        }) => {}
        other => panic!("SMTP client against an LMTP server: {other:?}"),
    }
}
