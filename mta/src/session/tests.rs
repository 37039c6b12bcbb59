//! Session conversations without sockets: a `tokio::io::duplex` pipe and, for tests of the
//! SMTP dialogue, an in-memory cleanup ([`cleanup::Memory`]) whose kept messages are
//! inspected directly. [`connect_to_spool`] gives a session the real cleanup instead (a
//! spool in a temporary directory, the scheduler's inbox inspected): the durable path.

use super::*;
use crate::cleanup::{self, Accepted};
use crate::qmgr::{Command, SchedulerHandle};
use crate::queue::{Envelope, QueueId};
use crate::shutdown::Trigger;
use crate::spool::Spool;
use crate::stream::Stream;
use tokio::io::{AsyncBufReadExt, BufReader, DuplexStream};
use tokio::sync::mpsc;

struct Client {
    reader: BufReader<tokio::io::ReadHalf<DuplexStream>>,
    writer: tokio::io::WriteHalf<DuplexStream>,
    jobs: mpsc::UnboundedReceiver<Command>,
    ctx: Arc<Context>,
    /// What the session's cleanup kept; `None` when it stores into the spool.
    memory: Option<Arc<cleanup::Memory>>,
    _trigger: Trigger,
    _dir: tempfile::TempDir,
}

async fn connect_with(adjust: impl FnOnce(&mut MtaConfig)) -> Client {
    connect_via(64 * 1024, adjust).await
}

/// A session behind a pipe of `pipe` bytes: with 1, every read the session makes returns
/// one byte, so every command line and chunk arrives split.
async fn connect_via(pipe: usize, adjust: impl FnOnce(&mut MtaConfig)) -> Client {
    open(pipe, Some(Arc::default()), adjust).await
}

/// A session whose messages go through the real cleanup into the spool, then the queue.
async fn connect_to_spool() -> Client {
    open(64 * 1024, None, |_| {}).await
}

/// A session with the in-memory cleanup `memory`, else the spool's. The context always
/// has a spool (in a temporary directory); only the spool's cleanup writes to it.
async fn open(
    pipe: usize,
    memory: Option<Arc<cleanup::Memory>>,
    adjust: impl FnOnce(&mut MtaConfig),
) -> Client {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = MtaConfig::embedded_default();
    config.spool.path = dir.path().join("spool");
    adjust(&mut config);
    let (spool, _) = Spool::open(&config.spool.path, 1 << 20).expect("spool");
    let (handle, jobs) = SchedulerHandle::channel();
    let ctx = Arc::new(Context::new(config, spool, handle, None, None));
    let (client, server) = tokio::io::duplex(pipe);
    let trigger = Trigger::new();
    let session = Session::new(
        Stream::Plain(server),
        ctx.clone(),
        "127.0.0.9:4000".parse().expect("addr"),
        mta_config::ListenerKind::Smtp,
    );
    let session = match &memory {
        Some(memory) => session.with_cleanup(Cleanup::Memory(memory.clone())),
        None => session,
    };
    tokio::spawn(session.run(trigger.subscribe()));
    let (read, writer) = tokio::io::split(client);
    let mut client = Client {
        reader: BufReader::new(read),
        writer,
        jobs,
        ctx,
        memory,
        _trigger: trigger,
        _dir: dir,
    };
    client.expect("220").await;
    client
}

async fn connect() -> Client {
    connect_with(|_| {}).await
}

impl Client {
    async fn send(&mut self, bytes: &str) {
        self.writer
            .write_all(bytes.as_bytes())
            .await
            .expect("write");
    }

    /// Reads one whole (possibly multi-line) reply and returns its last line.
    async fn reply(&mut self) -> String {
        loop {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line).await.expect("read");
            assert!(n > 0, "connection closed while waiting for a reply");
            if line.as_bytes().get(3) != Some(&b'-') {
                return line.trim_end().to_owned();
            }
        }
    }

    /// Reads one reply and checks that it starts with `prefix` (code and enhanced code).
    async fn expect(&mut self, prefix: &str) -> String {
        let line = self.reply().await;
        assert!(
            line.starts_with(prefix),
            "expected {prefix:?}, got {line:?}"
        );
        line
    }

    /// The next message the session handed to the scheduler (real cleanup only).
    async fn queued(&mut self) -> (QueueId, Envelope) {
        match self.jobs.recv().await {
            Some(Command::Enqueue { id, envelope }) => (id, envelope),
            other => panic!("expected an enqueued message, got {other:?}"),
        }
    }

    /// Every message the in-memory cleanup kept since the last call.
    fn accepted(&self) -> Vec<Accepted> {
        self.memory.as_ref().expect("in-memory cleanup").take()
    }

    /// The one message the in-memory cleanup kept since the last call.
    fn only_accepted(&self) -> Accepted {
        let mut accepted = self.accepted();
        assert_eq!(accepted.len(), 1, "{accepted:?}");
        accepted.remove(0)
    }

    /// True when nothing was kept in memory or queued since the last look.
    fn nothing_accepted(&mut self) -> bool {
        let kept = self.memory.as_ref().map(|m| m.take()).unwrap_or_default();
        kept.is_empty() && self.jobs.try_recv().is_err()
    }

    async fn closed(&mut self) -> bool {
        let mut line = String::new();
        matches!(self.reader.read_line(&mut line).await, Ok(0) | Err(_))
    }

    async fn ehlo_mail_rcpt(&mut self) {
        self.send("EHLO client.test\r\n").await;
        self.expect("250 HELP").await;
        self.send("MAIL FROM:<a@sender.test>\r\n").await;
        self.expect("250 2.1.0").await;
        self.send("RCPT TO:<bob@example.test>\r\n").await;
        self.expect("250 2.1.5").await;
    }
}

/// Malformed and out-of-order input: each line gets its precise reply, and the session
/// still serves a good transaction afterwards.
#[tokio::test]
async fn malformed_and_out_of_order_table() {
    let long_line = format!("NOOP {}\r\n", "x".repeat(5000));
    let cases: &[(&str, &str)] = &[
        ("MAIL FROM:<a@sender.test>\r\n", "503 5.5.1"),
        ("RCPT TO:<bob@example.test>\r\n", "503 5.5.1"),
        ("DATA\r\n", "503 5.5.1"),
        ("BLAH\r\n", "500 5.5.2"),
        ("EXPN staff\r\n", "502 5.5.1"),
        ("VRFY bob\r\n", "252 2.5.0"),
        ("HELP\r\n", "214 2.0.0"),
        ("NOOP\r\n", "250 2.0.0"),
        ("EHLO\r\n", "501"),
        ("EHLO client.test\r\n", "250 HELP"),
        ("MAIL FROM:<a@sender.test> FOO=BAR\r\n", "555 5.5.4"),
        ("MAIL FROM:<a@sender.test> SIZE=999999999\r\n", "552 5.3.4"),
        ("MAIL FROM:<no-domain>\r\n", "501 5.1.7"),
        // Issue 13: smtp-proto 0.2.5 reads 23 nines as 999.
        (
            "MAIL FROM:<a@sender.test> SIZE=99999999999999999999999\r\n",
            "552 5.3.4",
        ),
        ("MAIL FROM:<a@sender.test> SIZE=1x\r\n", "501 5.5.4"),
        ("MAIL FROM:<a@sender.test>\r\n", "250 2.1.0"),
        ("MAIL FROM:<a@sender.test>\r\n", "503 5.5.1"),
        ("RCPT TO:<x@remote.test>\r\n", "550 5.7.1"),
        ("DATA\r\n", "554 5.5.1"),
        ("RSET\r\n", "250 2.0.0"),
        (long_line.as_str(), "500 5.5.2"),
    ];
    let mut client = connect_with(|c| c.smtpd.max_errors = 100).await;
    for (input, expected) in cases {
        client.send(input).await;
        let got = client.reply().await;
        let shown: String = input.chars().take(60).collect();
        assert!(
            got.starts_with(expected),
            "{shown:?}: expected {expected}, got {got:?}"
        );
    }
    client.ehlo_mail_rcpt().await;
    client.send("DATA\r\n").await;
    client.expect("354").await;
    client.send("Subject: t\r\n\r\nhello\r\n.\r\n").await;
    let line = client.expect("250 2.0.0 Ok: queued as").await;
    let accepted = client.only_accepted();
    assert!(line.ends_with(&accepted.id.to_string()), "{line}");
    assert!(accepted.content.ends_with(b"Subject: t\r\n\r\nhello\r\n"));
}

#[tokio::test]
/// The durable path: the real cleanup stores the message in the spool, then queues it.
async fn pipelined_transaction_is_stored_with_its_parameters() {
    let mut client = connect_to_spool().await;
    client
        .send(concat!(
            "EHLO client.test\r\n",
            "MAIL FROM:<a@sender.test> SIZE=100 BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=e1\r\n",
            "RCPT TO:<bob@example.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob@example.test\r\n",
            "RCPT TO:<carol@example.test>\r\n",
            "DATA\r\n"
        ))
        .await;
    client.expect("250 HELP").await;
    client.expect("250 2.1.0").await;
    client.expect("250 2.1.5").await;
    client.expect("250 2.1.5").await;
    client.expect("354").await;
    client
        .send("Subject: t\r\n\r\n..dot-stuffed\r\n.\r\n")
        .await;
    let line = client.expect("250 2.0.0 Ok: queued as ").await;
    let id: crate::queue::QueueId = line
        .rsplit(' ')
        .next()
        .and_then(|s| s.parse().ok())
        .expect("queue id in reply");

    let (queued_id, env) = client.queued().await;
    assert_eq!(queued_id, id);
    let env = &env;
    assert_eq!(env.sender, "a@sender.test");
    assert_eq!(env.declared_size, 100);
    assert_eq!(env.body, crate::queue::BodyType::EightBitMime);
    assert!(env.smtputf8);
    assert_eq!(env.dsn_ret, Some(crate::queue::DsnReturn::Headers));
    assert_eq!(env.dsn_envid.as_deref(), Some("e1"));
    assert_eq!(env.recipients.len(), 2);
    let notify = env.recipients[0].notify.expect("NOTIFY kept");
    assert!(notify.success && notify.failure && !notify.delay);
    assert_eq!(
        env.recipients[0].orcpt.as_deref(),
        Some("bob@example.test"),
        "smtp-proto decodes ORCPT to the address (type rfc822)"
    );
    assert_eq!(env.recipients[1].notify, None);

    let stored = client.ctx.spool.read_message(id).await.expect("in spool");
    let text = String::from_utf8(stored).expect("utf8");
    assert!(
        text.starts_with("Received: from client.test ([127.0.0.9])"),
        "{text}"
    );
    assert!(text.contains(&format!("with UTF8ESMTP id {id}")), "{text}");
    assert!(
        text.ends_with("Subject: t\r\n\r\n.dot-stuffed\r\n"),
        "{text}"
    );
}

#[tokio::test]
async fn bdat_chunks_make_one_message() {
    let mut client = connect().await;
    client.ehlo_mail_rcpt().await;
    client.send("BDAT 12\r\nSubject: t\r\n").await;
    client.expect("250 2.0.0 12 octets").await;
    client.send("BDAT 9 LAST\r\n\r\nhello\r\n").await;
    let line = client.expect("250 2.0.0 Ok: queued as").await;
    let accepted = client.only_accepted();
    assert!(line.ends_with(&accepted.id.to_string()));
    assert!(accepted.content.ends_with(b"Subject: t\r\n\r\nhello\r\n"));

    // DATA after BDAT in one transaction is a sequence error; BDAT 0 LAST works.
    client
        .send("MAIL FROM:<a@sender.test>\r\nRCPT TO:<b@example.test>\r\n")
        .await;
    client.expect("250").await;
    client.expect("250").await;
    client.send("BDAT 3\r\nab\n").await;
    client.expect("250").await;
    client.send("DATA\r\n").await;
    client.expect("503 5.5.1").await;
    client.send("BDAT 0 LAST\r\n").await;
    client.expect("554 5.6.0").await;
    assert!(client.nothing_accepted(), "the bare LF is refused");
}

#[tokio::test]
async fn too_many_recipients_and_too_big() {
    let mut client = connect_with(|c| {
        c.smtpd.max_recipients = 2;
        c.smtpd.max_message_size = 2048;
    })
    .await;
    client.ehlo_mail_rcpt().await;
    client.send("RCPT TO:<c@example.test>\r\n").await;
    client.expect("250 2.1.5").await;
    client.send("RCPT TO:<d@example.test>\r\n").await;
    client.expect("452 4.5.3").await;
    client.send("DATA\r\n").await;
    client.expect("354").await;
    let line = format!("{}\r\n", "y".repeat(70));
    for _ in 0..100 {
        client.send(&line).await;
    }
    client.send(".\r\n").await;
    client.expect("552 5.3.4").await;
    // The session goes on; the transaction is gone.
    client.send("RCPT TO:<c@example.test>\r\n").await;
    client.expect("503 5.5.1").await;
    assert!(client.nothing_accepted(), "nothing was accepted");
}

/// The smuggling matrix: content with a non-standard end-of-data sequence followed by a
/// "second transaction". Only <CRLF>.<CRLF> ends DATA, and the content (which contains the
/// bare line ending) is refused whole: the smuggled MAIL/RCPT/DATA never run.
#[tokio::test]
async fn smuggled_commands_never_run() {
    for ending in ["\n.\n", "\r.\r", "\n.\r\n", "\r\n.\n", "\r.\r\n", "\r\n.\r"] {
        let mut client = connect().await;
        client.ehlo_mail_rcpt().await;
        client.send("DATA\r\n").await;
        client.expect("354").await;
        client
            .send(&format!(
                "Subject: a\r\n\r\nfirst{ending}MAIL FROM:<evil@sender.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\nSubject: smuggled\r\n\r\nx\r\n.\r\n"
            ))
            .await;
        client.expect("554 5.6.0").await;
        client.send("NOOP\r\n").await;
        client.expect("250 2.0.0 Ok").await;
        assert!(
            client.nothing_accepted(),
            "{ending:?}: nothing may be accepted"
        );
    }
}

#[tokio::test]
async fn too_many_errors_closes() {
    let mut client = connect_with(|c| c.smtpd.max_errors = 3).await;
    for _ in 0..2 {
        client.send("BOGUS\r\n").await;
        client.expect("500 5.5.2").await;
    }
    client.send("BOGUS\r\n").await;
    client.expect("500 5.5.2").await;
    client.expect("421 4.7.0").await;
    assert!(client.closed().await);
}

#[tokio::test(start_paused = true)]
async fn idle_client_times_out() {
    let mut client = connect().await;
    // Paused time: the runtime jumps to the timeout as soon as everything is idle.
    client.expect("421 4.4.2").await;
    assert!(client.closed().await);
}

#[tokio::test]
async fn shutdown_interrupts_idle_session_only() {
    let mut client = connect().await;
    client.ehlo_mail_rcpt().await;
    client.send("DATA\r\n").await;
    client.expect("354").await;
    let trigger = std::mem::take(&mut client._trigger);
    let stopping = tokio::spawn(trigger.shutdown());
    // The message in progress is finished and acknowledged...
    client.send("Subject: t\r\n\r\nbody\r\n.\r\n").await;
    client.expect("250 2.0.0 Ok: queued").await;
    assert_eq!(client.accepted().len(), 1);
    // ...then the idle session is told to go away.
    client.expect("421 4.3.2").await;
    stopping.await.expect("shutdown completes");
}

/// Issue 13, item 3: a BDAT whose chunk size does not fit (smtp-proto 0.2.5 reads 23 nines
/// as 999), is malformed, or exceeds `max_message_size` is refused and the connection
/// closed: the bytes after it (here a forged second transaction after a 999-byte "chunk")
/// are never read as commands, and nothing is queued.
#[tokio::test]
async fn bdat_overflow_is_refused_and_closes() {
    let nines = "9".repeat(23);
    let cases = [
        (format!("BDAT {nines} LAST\r\n"), "552 5.3.4"),
        (format!("BDAT {nines}\r\n"), "552 5.3.4"),
        (format!("BDAT {} 5 LAST\r\n", "9".repeat(20)), "501 5.5.4"),
        ("BDAT 12x LAST\r\n".to_owned(), "501 5.5.4"),
        ("BDAT 4096 LAST\r\n".to_owned(), "552 5.3.4"),
    ];
    let chunk = format!("Subject: first\r\n\r\n{}\r\n", "x".repeat(999 - 18 - 2));
    assert_eq!(chunk.len(), 999);
    let smuggled = concat!(
        "MAIL FROM:<evil@sender.test>\r\n",
        "RCPT TO:<victim@example.test>\r\n",
        "BDAT 20 LAST\r\n",
        "Subject: forged\r\n\r\nx\r\n",
    );
    for (command, expected) in cases {
        let mut client = connect_with(|c| c.smtpd.max_message_size = 2048).await;
        client.ehlo_mail_rcpt().await;
        // Errors writing mean the session already closed: fine.
        let payload = format!("{command}{chunk}{smuggled}");
        let _ = client.writer.write_all(payload.as_bytes()).await;
        client.expect(expected).await;
        client.expect("421 4.5.0").await;
        assert!(client.closed().await, "{command:?}: the session closes");
        assert!(
            client.nothing_accepted(),
            "{command:?}: nothing may be accepted"
        );
    }
}

/// The raw-line check sees the whole command even when it arrives one byte at a time.
#[tokio::test]
async fn numbers_checked_across_split_reads() {
    let mut client = connect_via(1, |_| {}).await;
    client.send("EHLO client.test\r\n").await;
    client.expect("250 HELP").await;
    client.send("MAIL FROM:<a@sender.test> SIZE=21\r\n").await;
    client.expect("250 2.1.0").await;
    client.send("RCPT TO:<bob@example.test>\r\n").await;
    client.expect("250 2.1.5").await;
    client.send("BDAT 12\r\nSubject: t\r\n").await;
    client.expect("250 2.0.0 12 octets").await;
    client.send("BDAT 9 LAST\r\n\r\nhello\r\n").await;
    client.expect("250 2.0.0 Ok: queued as").await;
    assert_eq!(client.only_accepted().envelope.declared_size, 21);
    client
        .send("MAIL FROM:<a@sender.test> SIZE=99999999999999999999999\r\n")
        .await;
    client.expect("552 5.3.4").await;
    client.send("BDAT 99999999999999999999999 LAST\r\n").await;
    client.expect("552 5.3.4").await;
    client.expect("421 4.5.0").await;
    assert!(client.closed().await);
}

/// What [`Client::drip`] saw.
#[derive(Debug)]
struct Drip {
    /// The `421` that ended the session while dripping, if one did.
    reply: Option<String>,
    /// Bytes written before it arrived.
    sent: usize,
}

impl Client {
    /// Writes `text` one byte every `every` (paused time: no real waiting), reading the
    /// replies as they come, and stops at a `421`.
    async fn drip(&mut self, text: &[u8], every: std::time::Duration) -> Drip {
        let mut sent = 0;
        let mut bytes = text.iter();
        loop {
            tokio::select! {
                biased;
                // `fill_buf` only looks: the reply is read here, whole.
                _ = self.reader.fill_buf() => {
                    let reply = self.reply().await;
                    if reply.starts_with("421") {
                        return Drip { reply: Some(reply), sent };
                    }
                }
                () = tokio::time::sleep(every) => {
                    let Some(&byte) = bytes.next() else {
                        return Drip { reply: None, sent };
                    };
                    if self.writer.write_all(&[byte]).await.is_err() {
                        return Drip { reply: None, sent };
                    }
                    sent += 1;
                }
            }
        }
    }
}

/// Issue 13, item 6: time limits are totals, so a byte now and then does not hold a
/// session. Each case drips one byte every 10 s (paused time) with the default limits
/// (`command_timeout` 5m, `transaction_timeout` 10m, `min_data_rate` 500 B/s) and must be
/// cut off with `421 4.4.2` within the bound; before, every byte restarted the timer and
/// none of them was ever cut off.
#[tokio::test(start_paused = true)]
async fn slow_clients_are_cut_off() {
    let every = std::time::Duration::from_secs(10);
    let long_line = format!("EHLO {}\r\n", "c".repeat(60));
    let body = vec![b'x'; 500];
    // (what precedes the drip, what is dripped, most bytes that may get through)
    let cases: [(&str, &[u8], usize); 3] = [
        // One command line: at most 5 minutes, 30 bytes.
        ("", long_line.as_bytes(), 31),
        // Message content: 10 minutes plus 1/500 s per byte.
        ("DATA\r\n", &body, 61),
        // An envelope dragged out over many command lines: the transaction's 10 minutes.
        ("", &b"RCPT TO:<a@example.test>\r\n".repeat(4), 61),
    ];
    for (before, dripped, bound) in cases {
        let mut client = connect().await;
        client.ehlo_mail_rcpt().await;
        if !before.is_empty() {
            client.send(before).await;
            client.expect("354").await;
        }
        let drip = client.drip(dripped, every).await;
        let reply = drip.reply.as_deref().unwrap_or("no reply");
        assert!(
            reply.starts_with("421 4.4.2") && drip.sent <= bound,
            "{before:?}: {drip:?}, at most {bound} bytes should get through"
        );
        assert!(client.closed().await);
    }
}

/// Issue 13, item 6: a client sending content at least at `min_data_rate` is never cut
/// off, however long the transaction takes.
#[tokio::test(start_paused = true)]
async fn content_at_the_minimum_rate_is_accepted() {
    let mut client = connect_with(|c| {
        c.smtpd.transaction_timeout = std::time::Duration::from_secs(60);
        c.smtpd.min_data_rate = 100;
    })
    .await;
    client.ehlo_mail_rcpt().await;
    client.send("DATA\r\n").await;
    client.expect("354").await;
    client.send("Subject: slow\r\n\r\n").await;
    // 200 bytes every 2 s (100 B/s) for 10 minutes: ten times the transaction's time.
    let line = format!("{}\r\n", "y".repeat(198));
    for _ in 0..300 {
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        client.send(&line).await;
    }
    client.send(".\r\n").await;
    client.expect("250 2.0.0 Ok: queued").await;
    assert_eq!(client.accepted().len(), 1);
}

impl Client {
    async fn send_bytes(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).await.expect("write");
    }
}

/// Issue 13, item 10: RFC conformance at MAIL and RCPT. `<postmaster>` without a domain
/// is accepted (RFC 5321 §4.5.1) and goes to a local postmaster; a MAIL or RCPT line that
/// is not valid UTF-8 is a syntax error (smtp-proto would pass U+FFFD in its place).
#[tokio::test]
async fn conformance_table() {
    let cases: &[(&[u8], &str)] = &[
        (b"RCPT TO:<postmaster>\r\n", "250 2.1.5"),
        (b"RCPT TO:<PostMaster>\r\n", "250 2.1.5"),
        (b"RCPT TO:<\xff\xfe@example.test>\r\n", "501 5.1.3"),
        (b"RCPT TO:<j\xc3@example.test>\r\n", "501 5.1.3"),
        // Valid UTF-8 passes to the policy, which keeps Maildir folder names ASCII.
        ("RCPT TO:<jürgen@example.test>\r\n".as_bytes(), "553 5.1.3"),
        (b"MAIL FROM:<a\xff@sender.test> SMTPUTF8\r\n", "501 5.1.7"),
    ];
    for (line, expected) in cases {
        let mut client = connect().await;
        client.send("EHLO client.test\r\n").await;
        client.expect("250 HELP").await;
        if line.starts_with(b"RCPT") {
            client.send("MAIL FROM:<a@sender.test> SMTPUTF8\r\n").await;
            client.expect("250 2.1.0").await;
        }
        client.send_bytes(line).await;
        let got = client.reply().await;
        assert!(
            got.starts_with(expected),
            "{}: expected {expected:?}, got {got:?}",
            String::from_utf8_lossy(line)
        );
    }
}

/// Issue 13, item 10: `<postmaster>` reaches the host's own postmaster, and the EHLO
/// argument reaches `Received:` only with the characters of a host name.
#[tokio::test]
async fn postmaster_delivery_and_a_sanitised_received_header() {
    let mut client = connect_with(|c| c.hostname = "example.test".into()).await;
    client
        .send("EHLO evil(trusted.test;[10.0.0.1])\x1b[0m\r\n")
        .await;
    client.expect("250 HELP").await;
    client.send("MAIL FROM:<a@sender.test>\r\n").await;
    client.expect("250 2.1.0").await;
    client.send("RCPT TO:<postmaster>\r\n").await;
    client.expect("250 2.1.5").await;
    client.send("DATA\r\n").await;
    client.expect("354").await;
    client.send("Subject: t\r\n\r\nbody\r\n.\r\n").await;
    client.expect("250 2.0.0").await;
    let accepted = client.only_accepted();
    assert_eq!(
        accepted.envelope.recipients[0].address,
        "postmaster@example.test"
    );
    let header = String::from_utf8_lossy(&accepted.content);
    assert!(
        header.starts_with("Received: from evil?trusted.test??10.0.0.1????0m ([127.0.0.9])\r\n"),
        "{header}"
    );
}

/// A store that fails gets the spool error's reply from the table (STYLE A.3), and nothing
/// is kept or queued. A full spool is worth retrying in this session; a shut-down one
/// closes it.
#[tokio::test]
async fn failed_store_replies_and_keeps_nothing() {
    let cases = [
        (crate::spool::Error::Full, "452 4.3.1", false),
        (crate::spool::Error::Closed, "421 4.3.2", true),
        (
            crate::spool::Error::Io(std::io::ErrorKind::Other.into()),
            "451 4.3.0",
            false,
        ),
    ];
    for (error, expected, closes) in cases {
        let shown = error.to_string();
        let mut client = connect().await;
        client.ehlo_mail_rcpt().await;
        client.send("DATA\r\n").await;
        client.expect("354").await;
        client
            .memory
            .as_ref()
            .expect("in-memory cleanup")
            .fail_next(error);
        client.send("Subject: t\r\n\r\nbody\r\n.\r\n").await;
        client.expect(expected).await;
        assert!(client.nothing_accepted(), "{shown}: nothing may be kept");
        if closes {
            assert!(client.closed().await, "{shown}: the session closes");
            continue;
        }
        // The failure was for that store only: the client may try again.
        client.ehlo_mail_rcpt().await;
        client.send("DATA\r\n").await;
        client.expect("354").await;
        client.send("Subject: t\r\n\r\nagain\r\n.\r\n").await;
        client.expect("250 2.0.0 Ok: queued as").await;
        let accepted = client.only_accepted();
        assert!(accepted.content.ends_with(b"again\r\n"), "{shown}");
    }
}
