//! Issue 16, the MTA side of "drain on scale-in", on real sockets: two MTAs in one
//! process, a sender whose destination refuses connections (every message deferred) and a
//! peer it drains into over `/admin/handoff`.

use mta::qmgr::{AdminRequest, AdminResponse, QueueEntry};
use mta::queue::{QueueId, Status};
use mta::server::Server;
use mta_config::{ListenerConfig, ListenerKind, MtaConfig, RouteConfig, TlsMode};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const TOKEN: &str = "fleet-s3cret";

/// An address nothing listens on: delivery there is deferred at once.
fn closed_port() -> SocketAddr {
    let socket = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    socket.local_addr().expect("addr")
}

fn config(dir: &Path, fleet_token: Option<&Path>) -> MtaConfig {
    let mut config = MtaConfig::embedded_default();
    config.hostname = "mx.petrel.test".into();
    config.spool.path = dir.join("spool");
    config.tls = Default::default();
    config.local_domains.clear();
    config.admin.address = "127.0.0.1:0".parse().expect("addr");
    config.admin.fleet_token_file = fleet_token.map(Path::to_owned);
    config.http.address = Some("127.0.0.1:0".parse().expect("addr"));
    config.listeners = vec![ListenerConfig::new(
        "127.0.0.1:0".parse().expect("addr"),
        ListenerKind::Smtp,
    )];
    config.relay.client_networks = vec!["127.0.0.0/8".parse().expect("net")];
    config.routes = vec![RouteConfig {
        domain: "*".into(),
        smarthost: Some(closed_port().to_string()),
        tls: TlsMode::None,
        auth: None,
        dane: None,
    }];
    // One attempt on arrival, then a long wait: the messages sit deferred.
    config.queue.retry_interval = Duration::from_secs(3600);
    config.queue.delay_warning_after = None;
    config.validate().expect("valid");
    config
}

fn token_file(dir: &Path) -> PathBuf {
    let path = dir.join("fleet.token");
    std::fs::write(&path, format!("{TOKEN}\n")).expect("token");
    path
}

async fn start(config: MtaConfig) -> Server {
    Server::start(config, None).await.expect("start")
}

/// One HTTP/1.1 request on a fresh connection: (status, body).
async fn http(
    address: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String) {
    let mut stream = TcpStream::connect(address).await.expect("connect");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n{auth}\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.expect("read");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a header block");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status");
    (status, body.to_owned())
}

async fn drain_status(server: &Server) -> serde_json::Value {
    let (status, body) = http(
        server.http_address.expect("http"),
        "GET",
        "/admin/drain",
        Some(TOKEN),
        "",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("json")
}

async fn until<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    mut f: impl FnMut() -> F,
) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(value) = f().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn list(server: &Server) -> Vec<QueueEntry> {
    match server.ctx.scheduler.admin(AdminRequest::List).await {
        Some(AdminResponse::List { messages }) => messages,
        other => panic!("list: {other:?}"),
    }
}

struct Smtp {
    reader: BufReader<tokio::net::tcp::OwnedReadHalf>,
    writer: tokio::net::tcp::OwnedWriteHalf,
}

impl Smtp {
    async fn connect(address: SocketAddr) -> (Smtp, String) {
        let stream = TcpStream::connect(address).await.expect("connect");
        let (reader, writer) = stream.into_split();
        let mut smtp = Smtp {
            reader: BufReader::new(reader),
            writer,
        };
        let greeting = smtp.reply().await.unwrap_or_default();
        (smtp, greeting)
    }

    /// The last line of the next reply; empty when the server closed the connection.
    async fn reply(&mut self) -> Option<String> {
        loop {
            let mut line = String::new();
            match self.reader.read_line(&mut line).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
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

    async fn send(
        &mut self,
        from: &str,
        params: &str,
        to: &str,
        rcpt_params: &str,
        subject: &str,
    ) -> String {
        assert!(
            self.command(&format!("MAIL FROM:<{from}>{params}"))
                .await
                .starts_with("250")
        );
        assert!(
            self.command(&format!("RCPT TO:<{to}>{rcpt_params}"))
                .await
                .starts_with("250")
        );
        assert!(self.command("DATA").await.starts_with("354"));
        self.command(&format!(
            "From: <{from}>\r\nTo: <{to}>\r\nSubject: {subject}\r\n\r\nbody of {subject}\r\n."
        ))
        .await
    }
}

/// Drain: new connections and idle sessions get 421, a message in progress is finished,
/// `/readyz` says 503, and the fleet endpoints want the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_refuses_new_mail_and_leaves_the_service() {
    let dir = tempfile::tempdir().expect("tempdir");
    let token = token_file(dir.path());
    let server = start(config(dir.path(), Some(&token))).await;
    let smtp_address = server.addresses[0];
    let http_address = server.http_address.expect("http");

    assert_eq!(
        http(http_address, "GET", "/readyz", None, "").await,
        (200, "ready\n".into())
    );
    for (token, status) in [(None, 401), (Some("wrong"), 401), (Some(TOKEN), 200)] {
        let (got, body) = http(http_address, "GET", "/admin/drain", token, "").await;
        assert_eq!(got, status, "{token:?}: {body}");
    }
    let (status, body) = http(
        http_address,
        "POST",
        "/admin/drain",
        Some(TOKEN),
        r#"{"peers":["nope"]}"#,
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        drain_status(&server).await["state"],
        "serving",
        "a refused request changes nothing"
    );

    let (mut idle, greeting) = Smtp::connect(smtp_address).await;
    assert!(greeting.starts_with("220 "), "{greeting}");
    assert!(idle.command("EHLO idle.test").await.starts_with("250"));
    let (mut busy, _) = Smtp::connect(smtp_address).await;
    assert!(busy.command("EHLO busy.test").await.starts_with("250"));
    assert!(
        busy.command("MAIL FROM:<a@client.test>")
            .await
            .starts_with("250")
    );
    assert!(
        busy.command("RCPT TO:<b@remote.test>")
            .await
            .starts_with("250")
    );

    let (status, body) = http(
        http_address,
        "POST",
        "/admin/drain",
        Some(TOKEN),
        r#"{"peers":["127.0.0.1:9"],"deliver_for_secs":3600}"#,
    )
    .await;
    assert_eq!((status, body.as_str()), (202, r#"{"state":"draining"}"#));

    let draining = "421 4.3.2 mx.petrel.test draining, try another server";
    assert_eq!(
        idle.reply().await.as_deref(),
        Some(draining),
        "idle session closed"
    );
    assert_eq!(idle.reply().await, None);
    let (mut refused, greeting) = Smtp::connect(smtp_address).await;
    assert_eq!(greeting, draining, "new connection turned away");
    assert_eq!(refused.reply().await, None, "and closed");
    assert_eq!(
        http(http_address, "GET", "/readyz", None, "").await,
        (503, "not ready: draining\n".into())
    );
    // The session in a transaction finishes its message, then is closed.
    assert!(busy.command("DATA").await.starts_with("354"));
    let queued = busy
        .command("Subject: last one\r\n\r\nstill taken\r\n.")
        .await;
    assert!(queued.starts_with("250 2.0.0 Ok: queued as "), "{queued}");
    assert_eq!(busy.reply().await.as_deref(), Some(draining));

    let report = drain_status(&server).await;
    assert_eq!(report["state"], "draining");
    assert_eq!(report["left"], 1);
    assert_eq!(report["peers"], serde_json::json!(["127.0.0.1:9"]));
    assert_eq!(report["marker"], false);
    let metrics = server.ctx.metrics.encode_prometheus();
    assert!(
        metrics.contains("petrel_mta_drain_state{state=\"draining\"} 1"),
        "{metrics}"
    );

    // Cancelled: mail is taken again.
    let (status, body) = http(http_address, "DELETE", "/admin/drain", Some(TOKEN), "").await;
    assert_eq!((status, body.as_str()), (200, r#"{"state":"serving"}"#));
    let (mut again, greeting) = Smtp::connect(smtp_address).await;
    assert!(greeting.starts_with("220 "), "{greeting}");
    assert!(again.command("QUIT").await.starts_with("221"));
    assert_eq!(http(http_address, "GET", "/readyz", None, "").await.0, 200);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_fleet_token_file_the_endpoints_do_not_exist() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(config(dir.path(), None)).await;
    let http_address = server.http_address.expect("http");
    for (method, path) in [
        ("GET", "/admin/drain"),
        ("POST", "/admin/drain"),
        ("POST", "/admin/handoff"),
    ] {
        let (status, _) = http(http_address, method, path, Some(TOKEN), "{}").await;
        assert_eq!(status, 404, "{method} {path}");
    }
    assert_eq!(http(http_address, "GET", "/healthz", None, "").await.0, 200);
    server.shutdown().await;
}

/// Deferred and held messages go to the peer with their whole queue state and content;
/// the marker is written once the spool is empty, and survives a restart, which comes
/// back `drained` and still refusing mail until the drain is cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_hands_every_message_over_with_its_state() {
    const N: usize = 40;
    let sender_dir = tempfile::tempdir().expect("tempdir");
    let peer_dir = tempfile::tempdir().expect("tempdir");
    let token = token_file(sender_dir.path());
    let sender_config = config(sender_dir.path(), Some(&token));
    let sender = start(sender_config.clone()).await;
    let peer = start(config(peer_dir.path(), Some(&token))).await;

    let (mut smtp, _) = Smtp::connect(sender.addresses[0]).await;
    assert!(smtp.command("EHLO client.test").await.starts_with("250"));
    for i in 0..N {
        let (params, rcpt_params) = match i % 2 {
            0 => (
                " BODY=8BITMIME RET=HDRS ENVID=env-{i}",
                " NOTIFY=SUCCESS,DELAY ORCPT=rfc822;Orig@remote.test",
            ),
            _ => (" SIZE=400", ""),
        };
        let reply = smtp
            .send(
                &format!("s{i}@client.test"),
                &params.replace("{i}", &i.to_string()),
                &format!("r{i}@remote.test"),
                rcpt_params,
                &format!("m{i}"),
            )
            .await;
        assert!(reply.starts_with("250"), "{reply}");
    }
    assert!(smtp.command("QUIT").await.starts_with("221"));
    // Every message tried once (connection refused) and deferred.
    let before = until("every message deferred", || async {
        let messages = list(&sender).await;
        (messages.len() == N
            && messages
                .iter()
                .all(|m| m.attempts == 1 && m.state == "waiting"))
        .then_some(messages)
    })
    .await;
    let held: Vec<QueueId> = before.iter().take(3).map(|m| m.id).collect();
    for id in &held {
        sender
            .ctx
            .scheduler
            .admin(AdminRequest::Hold { id: *id })
            .await;
    }
    let mut contents = std::collections::HashMap::new();
    for m in &before {
        contents.insert(
            m.sender.clone(),
            sender.ctx.spool.read_message(m.id).await.expect("read"),
        );
    }

    // A dead peer first in the list: skipped for the live one.
    let peer_http = peer.http_address.expect("http").to_string();
    let dead = closed_port().to_string();
    let plan = serde_json::json!({"peers": [dead, peer_http], "deliver_for_secs": 0}).to_string();
    let (status, _) = http(
        sender.http_address.expect("http"),
        "POST",
        "/admin/drain",
        Some(TOKEN),
        &plan,
    )
    .await;
    assert_eq!(status, 202);
    let report = until("drained", || async {
        let report = drain_status(&sender).await;
        (report["state"] == "drained").then_some(report)
    })
    .await;
    assert_eq!(report["left"], 0);
    assert_eq!(report["handed_off"], N);
    assert_eq!(report["peers"], serde_json::json!([dead, peer_http]));
    assert_eq!(report["marker"], true);
    assert!(report.get("error").is_none(), "{report}");
    assert!(sender.ctx.spool.is_empty());
    let marker = sender_dir.path().join("spool/petrel-drained");
    assert!(marker.exists());

    // The peer has each message as the sender had it.
    let after = list(&peer).await;
    assert_eq!(after.len(), N);
    for m in &after {
        let original = before
            .iter()
            .find(|b| b.sender == m.sender)
            .expect("same sender");
        assert_eq!(m.received_at, original.received_at, "{}", m.sender);
        assert_eq!(m.attempts, 1);
        assert_eq!(m.recipients, original.recipients);
        assert!(matches!(m.recipients[0].status, Status::Deferred(_)));
        let was_held = held.contains(&original.id);
        assert_eq!(
            m.state,
            if was_held { "held" } else { "waiting" },
            "{}",
            m.sender
        );
        if !was_held {
            // The envelope keeps whole seconds (rounded up); the list shows the
            // scheduler's due time in milliseconds, rounded down.
            let (got, was) = (
                m.next_attempt_at.expect("due"),
                original.next_attempt_at.expect("due"),
            );
            assert!(got.abs_diff(was) <= 1, "{}: {got} vs {was}", m.sender);
        }
        assert_eq!(
            &peer.ctx.spool.read_message(m.id).await.expect("read"),
            &contents[&m.sender]
        );
    }
    let sent = sender.ctx.metrics.encode_prometheus();
    assert!(
        sent.contains(&format!(
            "petrel_mta_handoff_messages_total{{direction=\"sent\"}} {N}"
        )),
        "{sent}"
    );
    assert!(sent.contains("petrel_mta_drain_state{state=\"drained\"} 1"));
    let received = peer.ctx.metrics.encode_prometheus();
    assert!(received.contains(&format!(
        "petrel_mta_handoff_messages_total{{direction=\"received\"}} {N}"
    )));

    // Restart on the drained volume: still drained, still refusing mail.
    sender.shutdown().await;
    let sender = start(sender_config).await;
    let report = drain_status(&sender).await;
    assert_eq!(
        (
            report["state"].as_str(),
            report["left"].as_u64(),
            report["marker"].as_bool()
        ),
        (Some("drained"), Some(0), Some(true))
    );
    let (_, greeting) = Smtp::connect(sender.addresses[0]).await;
    assert!(greeting.starts_with("421 4.3.2"), "{greeting}");
    let (status, _) = http(
        sender.http_address.expect("http"),
        "DELETE",
        "/admin/drain",
        Some(TOKEN),
        "",
    )
    .await;
    assert_eq!(status, 200);
    assert!(!marker.exists(), "cancel removes the marker");
    let (_, greeting) = Smtp::connect(sender.addresses[0]).await;
    assert!(greeting.starts_with("220 "), "{greeting}");
    sender.shutdown().await;
    peer.shutdown().await;
}

fn handoff_body(id: &str) -> String {
    serde_json::json!({
        "version": 1,
        "origin": {"pod": "mx-2", "spool": "abc123", "id": id},
        "envelope": {
            "sender": "a@client.test",
            "recipients": [{"address": "b@remote.test", "notify": null, "orcpt": null,
                "status": {"state": "deferred", "detail": "451 4.3.0 later"}, "remote_mta": null}],
            "size": 0, "body": "seven_bit", "smtputf8": false, "dsn_ret": null,
            "dsn_envid": null, "require_tls": false, "client_ip": "192.0.2.1",
            "helo": "client.test", "received_at": 1_800_000_000u64, "attempts": 3,
            "next_attempt_at": 1_800_000_600u64, "expires_at": 4_000_000_000u64, "held": false,
            "delay_notified": false, "trace_parent": null
        },
        "content": "U3ViamVjdDogaGkNCg0KaGkNCg=="
    })
    .to_string()
}

/// The receiving side: a resend is recognised (also after a restart, and after the
/// message has left the queue), and a draining MTA takes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resend_is_recognised_and_a_draining_peer_takes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let token = token_file(dir.path());
    let peer_config = config(dir.path(), Some(&token));
    let peer = start(peer_config.clone()).await;
    let address = peer.http_address.expect("http");
    let offer = |body: String| async move {
        http(address, "POST", "/admin/handoff", Some(TOKEN), &body).await
    };

    assert_eq!(
        offer(handoff_body("0001")).await,
        (200, r#"{"stored":true}"#.into())
    );
    assert_eq!(
        offer(handoff_body("0001")).await,
        (200, r#"{"stored":false,"duplicate":true}"#.into())
    );
    let (status, body) = offer(handoff_body("0001").replace("seven_bit", "nine_bit")).await;
    assert_eq!(status, 400, "{body}");
    let (status, _) = http(
        address,
        "POST",
        "/admin/handoff",
        Some("wrong"),
        &handoff_body("0002"),
    )
    .await;
    assert_eq!(status, 401);
    let messages = list(&peer).await;
    assert_eq!(messages.len(), 1);
    assert_eq!(
        (messages[0].attempts, messages[0].received_at),
        (3, 1_800_000_000)
    );
    assert_eq!(
        peer.ctx
            .spool
            .read_message(messages[0].id)
            .await
            .expect("read"),
        b"Subject: hi\r\n\r\nhi\r\n"
    );

    // Gone from the queue (delivered, say) and the process restarted: still a duplicate.
    peer.ctx
        .scheduler
        .admin(AdminRequest::Delete { id: messages[0].id })
        .await;
    until("deleted", || async {
        peer.ctx.spool.is_empty().then_some(())
    })
    .await;
    peer.shutdown().await;
    let peer = start(peer_config).await;
    let address = peer.http_address.expect("http");
    let (status, body) = http(
        address,
        "POST",
        "/admin/handoff",
        Some(TOKEN),
        &handoff_body("0001"),
    )
    .await;
    assert_eq!(
        (status, body.as_str()),
        (200, r#"{"stored":false,"duplicate":true}"#)
    );
    assert!(peer.ctx.spool.is_empty());
    let metrics = peer.ctx.metrics.encode_prometheus();
    assert!(
        metrics.contains("petrel_mta_handoff_messages_total{direction=\"duplicate\"} 1"),
        "{metrics}"
    );

    // Draining: refuses new hand-overs (409), still recognises old ones.
    let plan = r#"{"peers":["127.0.0.1:9"],"deliver_for_secs":3600}"#;
    assert_eq!(
        http(address, "POST", "/admin/drain", Some(TOKEN), plan)
            .await
            .0,
        202
    );
    let (status, body) = http(
        address,
        "POST",
        "/admin/handoff",
        Some(TOKEN),
        &handoff_body("0002"),
    )
    .await;
    assert_eq!(status, 409, "{body}");
    let (status, _) = http(
        address,
        "POST",
        "/admin/handoff",
        Some(TOKEN),
        &handoff_body("0001"),
    )
    .await;
    assert_eq!(status, 200);
    assert!(peer.ctx.spool.is_empty());
    peer.shutdown().await;
}

/// Writes one JSON answer.
async fn respond(stream: &mut TcpStream, status_line: &str, body: &str) {
    let response = format!(
        "{status_line}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await.expect("answer");
}

/// Asks `server` to drain to `peers` at once (no delivering first).
async fn post_drain(server: &Server, peers: Vec<String>) {
    let address = server.http_address.expect("http");
    let plan = serde_json::json!({"peers": peers, "deliver_for_secs": 0}).to_string();
    assert_eq!(
        http(address, "POST", "/admin/drain", Some(TOKEN), &plan)
            .await
            .0,
        202
    );
}

/// A peer that reads each hand-over and, while `hang_up` is set (at first), hangs up
/// without answering (as if it crashed after storing, or before); then answers every
/// offer with `status_line` and `answer`. Its drain report (`GET /admin/drain`) gives
/// its spool identity.
struct ForgetfulPeer {
    address: SocketAddr,
    origins: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    hang_up: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl ForgetfulPeer {
    async fn start(status_line: &'static str, answer: &'static str) -> ForgetfulPeer {
        Self::start_as(None, status_line, answer).await
    }

    /// With spool identity `spool` (by default one of its own).
    async fn start_as(
        spool: Option<&str>,
        status_line: &'static str,
        answer: &'static str,
    ) -> ForgetfulPeer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("addr");
        let spool = spool.map_or_else(|| format!("forgetful-{}", address.port()), str::to_owned);
        let report: &'static str = Box::leak(
            serde_json::json!({"state": "serving", "left": 0, "delivered": 0,
                "handed_off": 0, "marker": false, "peers": [], "spool": spool})
            .to_string()
            .into_boxed_str(),
        );
        let origins = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let hang_up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let seen = origins.clone();
        let hanging = hang_up.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let seen = seen.clone();
                let hanging = hanging.clone();
                tokio::spawn(async move {
                    let mut reader = BufReader::new(stream);
                    loop {
                        let mut length = 0;
                        let mut get = None;
                        loop {
                            let mut line = String::new();
                            if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
                                return;
                            }
                            if get.is_none() {
                                get = Some(line.starts_with("GET "));
                            }
                            if let Some(value) =
                                line.to_ascii_lowercase().strip_prefix("content-length:")
                            {
                                length = value.trim().parse().expect("length");
                            }
                            if line == "\r\n" {
                                break;
                            }
                        }
                        let mut body = vec![0; length];
                        reader.read_exact(&mut body).await.expect("body");
                        if get == Some(true) {
                            respond(reader.get_mut(), "HTTP/1.1 200 OK", report).await;
                            continue;
                        }
                        let request: serde_json::Value =
                            serde_json::from_slice(&body).expect("json");
                        let id = request["origin"]["id"].as_str().expect("id").to_owned();
                        seen.lock().expect("lock").push(id);
                        if hanging.load(std::sync::atomic::Ordering::SeqCst) {
                            return; // hang up: the sender cannot know whether we stored it
                        }
                        respond(reader.get_mut(), status_line, answer).await;
                    }
                });
            }
        });
        ForgetfulPeer {
            address,
            origins,
            hang_up,
        }
    }

    fn answer_from_now_on(&self) {
        self.hang_up
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }

    fn offers(&self) -> Vec<String> {
        self.origins.lock().expect("lock").clone()
    }
}

/// Exactly once on the sending side: no peer reachable → the message is kept and the
/// error reported; a peer whose answer is lost gets the message again (even after the
/// sender restarts) and no other peer does, although another healthy one is listed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_whose_answer_was_lost_goes_back_to_the_same_peer_only() {
    let sender_dir = tempfile::tempdir().expect("tempdir");
    let peer_dir = tempfile::tempdir().expect("tempdir");
    let token = token_file(sender_dir.path());
    let sender_config = config(sender_dir.path(), Some(&token));
    let sender = start(sender_config.clone()).await;
    let healthy = start(config(peer_dir.path(), Some(&token))).await;
    let forgetful =
        ForgetfulPeer::start("HTTP/1.1 200 OK", r#"{"stored":false,"duplicate":true}"#).await;

    let (mut smtp, _) = Smtp::connect(sender.addresses[0]).await;
    assert!(smtp.command("EHLO client.test").await.starts_with("250"));
    assert!(
        smtp.send("a@client.test", "", "b@remote.test", "", "once")
            .await
            .starts_with("250")
    );
    until("deferred", || async {
        list(&sender)
            .await
            .first()
            .is_some_and(|m| m.attempts == 1)
            .then_some(())
    })
    .await;

    // Nobody to take it: kept, with the error reported.
    post_drain(&sender, vec![closed_port().to_string()]).await;
    let report = until("a hand-over error", || async {
        let report = drain_status(&sender).await;
        report.get("error").is_some().then_some(report)
    })
    .await;
    assert_eq!(
        (report["state"].as_str(), report["left"].as_u64()),
        (Some("handing_off"), Some(1)),
        "{report}"
    );

    // Cancelled while handing over: the kept message is back in the queue, and attempt
    // rounds run again (a flush attempts it at once).
    let (status, _) = http(
        sender.http_address.expect("http"),
        "DELETE",
        "/admin/drain",
        Some(TOKEN),
        "",
    )
    .await;
    assert_eq!(status, 200);
    until("back in the queue", || async {
        list(&sender)
            .await
            .first()
            .is_some_and(|m| m.state == "waiting")
            .then_some(())
    })
    .await;
    sender
        .ctx
        .scheduler
        .admin(AdminRequest::Flush {
            id: None,
            domain: None,
        })
        .await;
    until("attempted again", || async {
        list(&sender)
            .await
            .first()
            .is_some_and(|m| m.attempts == 2)
            .then_some(())
    })
    .await;

    // The forgetful peer reads it and hangs up: kept, pinned to that peer.
    post_drain(&sender, vec![forgetful.address.to_string()]).await;
    until("the first offer", || async {
        (!forgetful.offers().is_empty()).then_some(())
    })
    .await;
    let report = until("the lost answer reported", || async {
        let report = drain_status(&sender).await;
        report["error"]
            .as_str()
            .is_some_and(|e| e.contains("to no other"))
            .then_some(report)
    })
    .await;
    assert_eq!(report["left"], 1, "{report}");

    // Restart (the pin is on disk), then list the healthy peer first: the message still
    // goes to the forgetful one (asked again as soon as the sender is back), which says
    // it has it. Meanwhile it is not attempted here.
    sender.shutdown().await;
    let sender = start(sender_config).await;
    assert_eq!(drain_status(&sender).await["state"], "serving");
    until("offered again after the restart", || async {
        (forgetful.offers().len() >= 2).then_some(())
    })
    .await;
    until_pinned(&sender).await;
    sender
        .ctx
        .scheduler
        .admin(AdminRequest::Flush {
            id: None,
            domain: None,
        })
        .await;
    assert_not_attempted(&sender, 2).await;
    forgetful.answer_from_now_on();
    let healthy_http = healthy.http_address.expect("http").to_string();
    post_drain(&sender, vec![healthy_http, forgetful.address.to_string()]).await;
    until("drained", || async {
        (drain_status(&sender).await["state"] == "drained").then_some(())
    })
    .await;
    let offers = forgetful.offers();
    assert!(offers.len() >= 3, "{offers:?}");
    assert!(
        offers.iter().all(|o| *o == offers[0]),
        "the same message each time"
    );
    assert!(
        list(&healthy).await.is_empty(),
        "the other peer never got it"
    );
    assert!(sender.ctx.spool.is_empty());
    sender.shutdown().await;
    healthy.shutdown().await;
}

/// A pinned message (its answer lost, then the drain cancelled) is not attempted here
/// while its peer cannot say; once the peer answers that it stored nothing, it is
/// delivered from here as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_message_waits_for_its_peer_then_is_delivered_here() {
    let dir = tempfile::tempdir().expect("tempdir");
    let token = token_file(dir.path());
    let sender = start(config(dir.path(), Some(&token))).await;
    let address = sender.http_address.expect("http");
    let peer = ForgetfulPeer::start(
        "HTTP/1.1 503 Service Unavailable",
        r#"{"error":"spool volume is full"}"#,
    )
    .await;
    let (mut smtp, _) = Smtp::connect(sender.addresses[0]).await;
    assert!(smtp.command("EHLO client.test").await.starts_with("250"));
    assert!(
        smtp.send("a@client.test", "", "b@remote.test", "", "pinned")
            .await
            .starts_with("250")
    );
    until("deferred", || async {
        list(&sender)
            .await
            .first()
            .is_some_and(|m| m.attempts == 1)
            .then_some(())
    })
    .await;
    let plan = serde_json::json!({"peers": [peer.address.to_string()], "deliver_for_secs": 0});
    assert_eq!(
        http(
            address,
            "POST",
            "/admin/drain",
            Some(TOKEN),
            &plan.to_string()
        )
        .await
        .0,
        202
    );
    until("offered", || async {
        (!peer.offers().is_empty()).then_some(())
    })
    .await;
    until("kept", || async {
        drain_status(&sender)
            .await
            .get("error")
            .is_some()
            .then_some(())
    })
    .await;
    assert_eq!(
        http(address, "DELETE", "/admin/drain", Some(TOKEN), "")
            .await
            .0,
        200
    );

    // Serving, but pinned: asked again, not attempted (a flush skips it).
    until("asked again while serving", || async {
        (peer.offers().len() >= 2).then_some(())
    })
    .await;
    until_pinned(&sender).await;
    sender
        .ctx
        .scheduler
        .admin(AdminRequest::Flush {
            id: None,
            domain: None,
        })
        .await;
    assert_not_attempted(&sender, 1).await;

    // The peer says it stored nothing: unpinned, and attempted here again.
    peer.answer_from_now_on();
    until("unpinned", || async {
        list(&sender)
            .await
            .first()
            .is_some_and(|m| m.state == "waiting")
            .then_some(())
    })
    .await;
    sender
        .ctx
        .scheduler
        .admin(AdminRequest::Flush {
            id: None,
            domain: None,
        })
        .await;
    until("attempted here", || async {
        list(&sender)
            .await
            .first()
            .is_some_and(|m| m.attempts == 2)
            .then_some(())
    })
    .await;
    sender.shutdown().await;
}

async fn until_pinned(sender: &Server) {
    until("pinned", || async {
        list(sender)
            .await
            .first()
            .is_some_and(|m| m.state == "pinned")
            .then_some(())
    })
    .await;
}

/// The only message has had `attempts` attempts and is pinned (or being offered to its
/// peer again): a flush did not start a round for it.
async fn assert_not_attempted(sender: &Server, attempts: u32) {
    let listed = list(sender).await;
    assert_eq!(listed[0].attempts, attempts, "{listed:?}");
    assert!(
        ["pinned", "handing_off"].contains(&listed[0].state.as_str()),
        "{listed:?}"
    );
}

/// A pinned message whose peer comes back at another address (a restarted pod gets a new
/// IP, its spool stays on its volume) is offered to it there, found by its spool identity,
/// and to no other listed peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_peer_back_at_another_address_is_found_by_its_spool() {
    let sender_dir = tempfile::tempdir().expect("tempdir");
    let peer_dir = tempfile::tempdir().expect("tempdir");
    let token = token_file(sender_dir.path());
    let sender = start(config(sender_dir.path(), Some(&token))).await;
    let healthy = start(config(peer_dir.path(), Some(&token))).await;
    // The same spool before and after its "restart", at two addresses.
    let before = ForgetfulPeer::start_as(
        Some("spool-of-pod-2"),
        "HTTP/1.1 200 OK",
        r#"{"stored":true,"duplicate":false}"#,
    )
    .await;
    let after = ForgetfulPeer::start_as(
        Some("spool-of-pod-2"),
        "HTTP/1.1 200 OK",
        r#"{"stored":false,"duplicate":true}"#,
    )
    .await;
    after.answer_from_now_on();

    let (mut smtp, _) = Smtp::connect(sender.addresses[0]).await;
    assert!(smtp.command("EHLO client.test").await.starts_with("250"));
    // Several messages: without the spool identity each would go to either listed peer,
    // so all of them reaching the right one by chance is unlikely (1 in 2^MESSAGES).
    const MESSAGES: usize = 10;
    for n in 0..MESSAGES {
        assert!(
            smtp.send(
                "a@client.test",
                "",
                "b@remote.test",
                "",
                &format!("moved {n}")
            )
            .await
            .starts_with("250")
        );
    }
    until("deferred", || async {
        let listed = list(&sender).await;
        (listed.len() == MESSAGES && listed.iter().all(|m| m.attempts == 1)).then_some(())
    })
    .await;
    // Offered to the peer at its first address, which hangs up: the answer is lost.
    post_drain(&sender, vec![before.address.to_string()]).await;
    until("every answer lost", || async {
        (before.offers().len() >= MESSAGES
            && drain_status(&sender).await["error"]
                .as_str()
                .is_some_and(|e| e.contains("to no other")))
        .then_some(())
    })
    .await;
    let mut pinned = before.offers();
    pinned.sort();
    pinned.dedup();
    assert_eq!(pinned.len(), MESSAGES, "{pinned:?}");

    // The operator now lists a healthy peer and the same pod at its new address (the old
    // one is gone): the message goes to the pod it was offered to, which has it.
    let healthy_http = healthy.http_address.expect("http").to_string();
    post_drain(&sender, vec![healthy_http, after.address.to_string()]).await;
    until("drained", || async {
        (drain_status(&sender).await["state"] == "drained").then_some(())
    })
    .await;
    let mut offered = after.offers();
    offered.sort();
    offered.dedup();
    assert_eq!(offered, pinned, "every one offered again to the same spool");
    assert!(
        list(&healthy).await.is_empty(),
        "the other peer never got it (it would have delivered it a second time)"
    );
    assert!(sender.ctx.spool.is_empty());
    sender.shutdown().await;
    healthy.shutdown().await;
}
