//! Plain SMTP: pipelining, lock-step, per-recipient outcomes, typed errors,
//! extension negotiation, timeouts.

use std::time::Duration;

use mta_client::{
    ClientError, Connection, OutboundMessage, OutboundRecipient, Phase, Timeouts, TlsMode,
};

use crate::server::{self, Script};
use crate::{config, tcp};

const CONTENT: &[u8] = b"Subject: test\r\n\r\n.leading dot\r\n..two dots\r\nlast line";

fn rcpts<'a>(addresses: &[&'a str]) -> Vec<OutboundRecipient<'a>> {
    addresses
        .iter()
        .map(|a| OutboundRecipient::new(a))
        .collect()
}

#[tokio::test]
async fn pipelined_delivery_sends_one_batch_and_dot_stuffs() {
    // The server holds MAIL/RCPT replies until it sees DATA: a client that
    // waited for them would time out.
    let (addr, log) = server::start(Script::esmtp()).await;
    let mut conn = Connection::connect(&tcp(addr), "mx.example.test", &config())
        .await
        .unwrap();
    assert!(conn.capabilities().pipelining);
    assert!(!conn.tls_active());
    let to = rcpts(&["a@example.org", "b@example.org"]);
    let replies = conn
        .send(&OutboundMessage::new("s@example.net", &to, CONTENT))
        .await
        .unwrap();
    assert_eq!(replies.len(), 2);
    for reply in &replies {
        assert_eq!(reply.code, 250);
        assert_eq!(reply.enhanced, Some([2, 0, 0]));
        assert_eq!(reply.text, "Ok: queued as 42");
    }
    conn.quit().await;

    let log = log.lock().unwrap();
    assert_eq!(
        log.messages,
        vec![b"Subject: test\r\n\r\n.leading dot\r\n..two dots\r\nlast line\r\n".to_vec()]
    );
    assert_eq!(
        log.commands[1..5],
        [
            format!("MAIL FROM:<s@example.net> SIZE={}", CONTENT.len()),
            "RCPT TO:<a@example.org>".to_string(),
            "RCPT TO:<b@example.org>".to_string(),
            "DATA".to_string(),
        ]
    );
    assert_eq!(log.verbs().last().unwrap(), "QUIT");
}

#[tokio::test]
async fn one_recipient_deferred_the_others_delivered() {
    let script = Script::esmtp().rcpt(|a| {
        if a.starts_with("busy") {
            "451 4.2.1 Mailbox busy, try later".into()
        } else {
            "250 2.1.5 Ok".into()
        }
    });
    let (addr, log) = server::start(script).await;
    let mut conn = Connection::connect(&tcp(addr), "mx.example.test", &config())
        .await
        .unwrap();
    let to = rcpts(&["a@example.org", "busy@example.org", "c@example.org"]);
    let replies = conn
        .send(&OutboundMessage::new("s@example.net", &to, CONTENT))
        .await
        .unwrap();
    let codes: Vec<u16> = replies.iter().map(|r| r.code).collect();
    assert_eq!(codes, [250, 451, 250]);
    assert!(replies[1].is_transient());
    assert_eq!(replies[1].enhanced, Some([4, 2, 1]));
    assert_eq!(log.lock().unwrap().messages.len(), 1);
}

#[tokio::test]
async fn mail_rejected_then_connection_reused_after_reset() {
    let mut script = Script::esmtp();
    script.mail_reply = "550 5.7.1 Sender blocked".into();
    let (addr, _) = server::start(script).await;
    let mut conn = Connection::connect(&tcp(addr), "mx.example.test", &config())
        .await
        .unwrap();
    let to = rcpts(&["a@example.org"]);
    match conn
        .send(&OutboundMessage::new("s@example.net", &to, CONTENT))
        .await
    {
        Err(ClientError::Rejected {
            phase: Phase::Mail,
            reply,
        }) => {
            assert!(reply.is_permanent());
            assert_eq!(reply.code, 550);
        }
        other => panic!("expected a MAIL rejection, got {other:?}"),
    }
    assert!(conn.is_usable());
    conn.reset().await.unwrap();
    conn.quit().await;
}

#[tokio::test]
async fn several_messages_over_one_connection() {
    let (addr, log) = server::start(Script::esmtp()).await;
    let mut conn = Connection::connect(&tcp(addr), "mx.example.test", &config())
        .await
        .unwrap();
    let to = rcpts(&["a@example.org"]);
    for i in 0..3 {
        let body = format!("Subject: {i}\r\n\r\nbody {i}\r\n");
        let replies = conn
            .send(&OutboundMessage::new("s@example.net", &to, body.as_bytes()))
            .await
            .unwrap();
        assert!(replies[0].is_positive());
    }
    conn.quit().await;
    assert_eq!(log.lock().unwrap().messages.len(), 3);
}

#[tokio::test]
async fn lockstep_without_pipelining() {
    let script = Script::esmtp().keywords(&["SIZE 1000000", "8BITMIME"]);
    let (addr, log) = server::start(script).await;
    let mut conn = Connection::connect(&tcp(addr), "mx.example.test", &config())
        .await
        .unwrap();
    assert!(!conn.capabilities().pipelining);
    let to = rcpts(&["a@example.org", "b@example.org"]);
    let replies = conn
        .send(&OutboundMessage::new("s@example.net", &to, CONTENT))
        .await
        .unwrap();
    assert!(replies.iter().all(|r| r.code == 250));
    conn.quit().await;
    let log = log.lock().unwrap();
    assert_eq!(log.lockstep_violations, 0, "{:?}", log.commands);
    assert_eq!(log.messages.len(), 1);
}

#[tokio::test]
async fn every_recipient_rejected_sends_no_content_and_resets() {
    for keywords in [
        &["PIPELINING", "8BITMIME"][..],
        &["8BITMIME"][..], // lock-step
    ] {
        let script = Script::esmtp()
            .keywords(keywords)
            .rcpt(|_| "550 5.1.1 No such user".into());
        let (addr, log) = server::start(script).await;
        let mut conn = Connection::connect(&tcp(addr), "mx.example.test", &config())
            .await
            .unwrap();
        let to = rcpts(&["x@example.org", "y@example.org"]);
        let replies = conn
            .send(&OutboundMessage::new("s@example.net", &to, CONTENT))
            .await
            .unwrap();
        assert!(replies.iter().all(|r| r.code == 550 && r.is_permanent()));
        // The connection is still good for the next message.
        conn.reset().await.unwrap();
        conn.quit().await;
        let log = log.lock().unwrap();
        assert!(log.messages.is_empty());
        assert!(log.verbs().contains(&"RSET".to_string()), "{keywords:?}");
    }
}

#[tokio::test]
async fn helo_only_server() {
    let mut script = Script::esmtp();
    script.ehlo = None;
    script.strict_pipelining = false;
    let (addr, log) = server::start(script).await;
    let mut conn = Connection::connect(&tcp(addr), "mx.example.test", &config())
        .await
        .unwrap();
    assert_eq!(conn.capabilities(), &mta_client::Capabilities::default());
    let to = rcpts(&["a@example.org"]);
    let replies = conn
        .send(&OutboundMessage::new("s@example.net", &to, CONTENT))
        .await
        .unwrap();
    assert_eq!(replies[0].code, 250);
    conn.quit().await;
    let log = log.lock().unwrap();
    assert_eq!(log.verbs()[..2], ["EHLO", "HELO"]);
    // No SIZE= to a server that did not offer SIZE.
    assert_eq!(log.commands[2], "MAIL FROM:<s@example.net>");
    assert_eq!(log.lockstep_violations, 0);
}

#[tokio::test]
async fn what_the_peer_cannot_take_fails_before_any_command() {
    let script = Script::esmtp().keywords(&["PIPELINING", "SIZE 20"]);
    let (addr, log) = server::start(script).await;
    let mut conn = Connection::connect(&tcp(addr), "mx.example.test", &config())
        .await
        .unwrap();
    let to = rcpts(&["a@example.org"]);

    let mut eight_bit = OutboundMessage::new("s@example.net", &to, b"caf\xc3\xa9\r\n");
    eight_bit.eight_bit = true;
    assert!(matches!(
        conn.send(&eight_bit).await,
        Err(ClientError::EightBitUnsupported)
    ));

    let utf8_to = rcpts(&["j\u{f6}rg@example.org"]);
    let utf8 = OutboundMessage::new("s@example.net", &utf8_to, b"x\r\n");
    assert!(matches!(
        conn.send(&utf8).await,
        Err(ClientError::Smtputf8Unsupported)
    ));

    let big = vec![b'x'; 100];
    assert!(matches!(
        conn.send(&OutboundMessage::new("s@example.net", &to, &big))
            .await,
        Err(ClientError::MessageTooBig { limit: 20 })
    ));

    // None of that cost the connection anything.
    assert!(conn.is_usable());
    let replies = conn
        .send(&OutboundMessage::new("s@example.net", &to, b"small\r\n"))
        .await
        .unwrap();
    assert_eq!(replies[0].code, 250);
    let log = log.lock().unwrap();
    assert_eq!(log.verbs().iter().filter(|v| *v == "MAIL").count(), 1);
}

#[tokio::test]
async fn extension_parameters_when_offered() {
    let script = Script::esmtp().keywords(&["PIPELINING", "SIZE", "8BITMIME", "SMTPUTF8", "DSN"]);
    let (addr, log) = server::start(script).await;
    let mut conn = Connection::connect(&tcp(addr), "mx.example.test", &config())
        .await
        .unwrap();
    let to = [OutboundRecipient {
        address: "j\u{f6}rg@example.org",
        notify: Some((false, true, true)),
        orcpt: Some("alias+x@example.org"),
    }];
    let content = "Subject: gr\u{fc}\u{df}e\r\n\r\nhi\r\n".as_bytes();
    let mut message = OutboundMessage::new("s@example.net", &to, content);
    message.eight_bit = true;
    message.smtputf8 = true;
    message.dsn_ret_full = Some(true);
    message.dsn_envid = Some("Q1=2");
    let replies = conn.send(&message).await.unwrap();
    assert_eq!(replies[0].code, 250);
    let log = log.lock().unwrap();
    assert_eq!(
        log.commands[1],
        format!(
            "MAIL FROM:<s@example.net> SIZE={} BODY=8BITMIME SMTPUTF8 RET=FULL ENVID=Q1+3D2",
            content.len()
        )
    );
    assert_eq!(
        log.commands[2],
        "RCPT TO:<j\u{f6}rg@example.org> NOTIFY=FAILURE,DELAY ORCPT=rfc822;alias+2Bx@example.org"
    );
    assert_eq!(log.messages[0], content);
}

#[tokio::test]
async fn unsendable_addresses_get_local_replies() {
    let (addr, log) = server::start(Script::esmtp()).await;
    let mut conn = Connection::connect(&tcp(addr), "mx.example.test", &config())
        .await
        .unwrap();
    let to = rcpts(&["a@example.org", "b@example.org>\r\nRSET"]);
    let replies = conn
        .send(&OutboundMessage::new("s@example.net", &to, CONTENT))
        .await
        .unwrap();
    assert_eq!(replies[0].code, 250);
    assert_eq!(
        (replies[1].code, replies[1].enhanced),
        (501, Some([5, 1, 3]))
    );
    assert!(matches!(
        conn.send(&OutboundMessage::new("s\r\n@x", &to, CONTENT)).await,
        Err(ClientError::Rejected { phase: Phase::Mail, reply }) if reply.code == 501
    ));
    assert!(
        !log.lock()
            .unwrap()
            .commands
            .iter()
            .any(|c| c.contains("RSET"))
    );
}

#[tokio::test]
async fn greeting_rejection() {
    let mut script = Script::esmtp();
    script.greeting = "554 5.7.1 No SMTP service here".into();
    let (addr, _) = server::start(script).await;
    match Connection::connect(&tcp(addr), "mx.example.test", &config()).await {
        Err(ClientError::Rejected {
            phase: Phase::Greeting,
            reply,
        }) => assert_eq!(reply.code, 554),
        other => panic!("expected a greeting rejection, got {other:?}"),
    }
}

#[tokio::test]
async fn final_reply_rejection_is_for_the_whole_message() {
    let script = Script::esmtp().final_reply(|_| "554 5.7.1 Spam".into());
    let (addr, _) = server::start(script).await;
    let mut conn = Connection::connect(&tcp(addr), "mx.example.test", &config())
        .await
        .unwrap();
    let to = rcpts(&["a@example.org"]);
    match conn
        .send(&OutboundMessage::new("s@example.net", &to, CONTENT))
        .await
    {
        Err(ClientError::Rejected {
            phase: Phase::DataDone,
            reply,
        }) => assert_eq!(reply.code, 554),
        other => panic!("expected a final-reply rejection, got {other:?}"),
    }
    assert!(conn.is_usable());
}

#[tokio::test]
async fn connection_refused() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    match Connection::connect(&tcp(addr), "mx.example.test", &config()).await {
        Err(ClientError::Connect { target, .. }) => assert_eq!(target, addr.to_string()),
        other => panic!("expected a connect error, got {other:?}"),
    }
}

#[tokio::test]
async fn silent_server_times_out_in_greeting() {
    let mut script = Script::esmtp();
    script.silent = true;
    let (addr, _) = server::start(script).await;
    let mut config = config();
    config.timeouts.greeting = Duration::from_millis(200);
    match Connection::connect(&tcp(addr), "mx.example.test", &config).await {
        Err(ClientError::Timeout {
            phase: Phase::Greeting,
            after,
        }) => assert_eq!(after, Duration::from_millis(200)),
        other => panic!("expected a greeting timeout, got {other:?}"),
    }
}

#[tokio::test]
async fn server_that_stops_answering_times_out_in_the_right_phase() {
    let mut script = Script::esmtp().keywords(&["8BITMIME"]);
    script.mute_after_commands = Some(2); // EHLO and MAIL answered, RCPT not
    let (addr, _) = server::start(script).await;
    let mut config = config();
    config.timeouts = Timeouts {
        rcpt: Duration::from_millis(200),
        ..config.timeouts
    };
    let mut conn = Connection::connect(&tcp(addr), "mx.example.test", &config)
        .await
        .unwrap();
    let to = rcpts(&["a@example.org"]);
    match conn
        .send(&OutboundMessage::new("s@example.net", &to, CONTENT))
        .await
    {
        Err(ClientError::Timeout {
            phase: Phase::Rcpt, ..
        }) => {}
        other => panic!("expected an RCPT timeout, got {other:?}"),
    }
    assert!(!conn.is_usable());
    assert!(matches!(
        conn.reset().await,
        Err(ClientError::Io {
            phase: Phase::Rset,
            ..
        })
    ));
}

#[tokio::test]
async fn dropped_connection_is_an_io_error() {
    // A "server" that greets and then closes.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        use tokio::io::AsyncWriteExt;
        stream.write_all(b"220 hi\r\n").await.unwrap();
    });
    match Connection::connect(&tcp(addr), "mx.example.test", &config()).await {
        Err(ClientError::Io {
            phase: Phase::Ehlo, ..
        }) => {}
        other => panic!("expected an I/O error in EHLO, got {other:?}"),
    }
}

#[tokio::test]
async fn auth_in_plain_text_only_when_tls_is_off() {
    let mut script = Script::esmtp().keywords(&["PIPELINING", "AUTH LOGIN"]);
    script.credentials = Some(("user".into(), "secret".into()));
    let (addr, _) = server::start(script).await;
    let mut config = config();
    config.auth = Some(mta_client::Credentials {
        username: "user".into(),
        password: "secret".into(),
    });

    // Opportunistic without STARTTLS: the password does not go out in the clear.
    assert!(matches!(
        Connection::connect(&tcp(addr), "mx.example.test", &config).await,
        Err(ClientError::TlsUnavailable)
    ));

    config.tls = TlsMode::None;
    let conn = Connection::connect(&tcp(addr), "mx.example.test", &config)
        .await
        .unwrap();
    conn.quit().await;

    config.auth.as_mut().unwrap().password = "wrong".into();
    match Connection::connect(&tcp(addr), "mx.example.test", &config).await {
        Err(ClientError::AuthFailed { reply }) => assert_eq!(reply.code, 535),
        other => panic!("expected an auth failure, got {other:?}"),
    }
}

#[tokio::test]
async fn credentials_without_auth_offered() {
    let (addr, _) = server::start(Script::esmtp()).await;
    let mut config = config();
    config.tls = TlsMode::None;
    config.auth = Some(mta_client::Credentials {
        username: "user".into(),
        password: "secret".into(),
    });
    assert!(matches!(
        Connection::connect(&tcp(addr), "mx.example.test", &config).await,
        Err(ClientError::AuthUnavailable)
    ));
}
