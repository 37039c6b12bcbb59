//! Arbitrary bytes from an SMTP client, fed to a real `Session` over `tokio::io::duplex`.
//!
//! Each input is played twice against the same process-wide context, with the in-memory
//! cleanup (`cleanup::Memory`, the `memory-cleanup` feature): the messages a session
//! accepts go through the real checks, `Received:` stamping and signing, and are kept in
//! memory instead of the spool, so an input costs no disk I/O. (The context still opens a
//! spool in a temporary directory once, at start; nothing is written to it.)
//!
//! 1. from an outsider address (`192.0.2.1`, may not relay), through a 64 KiB pipe, so the
//!    session mostly sees large reads;
//! 2. from a relay-network address (`10.1.2.3`), through a pipe of 1..=16 bytes (chosen from
//!    the input length), so every command, DATA terminator and BDAT chunk boundary is also
//!    split across reads.
//!
//! Asserted: no panic; the session ends within 10 s of the client closing its side; every
//! message the outsider got accepted is for local domains only (never an open relay) and its
//! recipients map to safe Maildir names; no accepted message contains a bare CR or LF; after
//! `421 4.5.0` (a BDAT refused without reading its chunk, issue 13) no further reply.
//!
//! The config uses small limits (message size 2 KiB, 3 recipients) and a high error limit
//! so that the limit paths and the states after many errors are all reachable. Rate limits
//! are off (they would otherwise start refusing after a few hundred inputs). No TLS
//! certificate and no AUTH users file: STARTTLS and AUTH answer their "not available"
//! replies (AUTH failures sleep 500 ms each, which would make fuzzing useless).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mta::cleanup::{Cleanup, Memory};
use mta::context::Context;
use mta::qmgr::SchedulerHandle;
use mta::session::Session;
use mta::shutdown::Trigger;
use mta::spool::Spool;
use mta::stream::Stream;
use mta_config::{ListenerKind, MtaConfig};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Harness {
    rt: tokio::runtime::Runtime,
    ctx: Arc<Context>,
    /// What the sessions accepted (they never queue: no scheduler runs here).
    memory: Arc<Memory>,
    _dir: PathBuf,
}

/// The spool lives in `$PETREL_FUZZ_TMP`, else `/dev/shm` (fsync is free on tmpfs), else the
/// system temporary directory; one directory per process, removed at normal exit.
fn scratch_dir(name: &str) -> PathBuf {
    let base = std::env::var_os("PETREL_FUZZ_TMP")
        .map(PathBuf::from)
        .or_else(|| {
            let shm = PathBuf::from("/dev/shm");
            shm.is_dir().then_some(shm)
        })
        .unwrap_or_else(std::env::temp_dir);
    let dir = base.join(format!("petrel-fuzz-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

fn config(dir: &std::path::Path) -> MtaConfig {
    let mut config = MtaConfig::embedded_default();
    config.hostname = "mx.fuzz.test".into();
    config.spool.path = dir.join("spool");
    config.spool.segment_size = 1 << 20;
    config.tls.cert_file = None;
    config.tls.key_file = None;
    config.tls.generate_self_signed = false;
    config.smtpd.max_message_size = 2048;
    config.smtpd.max_recipients = 3;
    config.smtpd.max_errors = 64;
    config.smtpd.command_timeout = Duration::from_secs(30);
    config.smtpd.data_timeout = Duration::from_secs(30);
    config.smtpd.rate_limits.messages_per_ip = "off".into();
    config.smtpd.rate_limits.recipients_per_ip = "off".into();
    config.smtpd.rate_limits.messages_per_user = "off".into();
    config.smtpd.rate_limits.recipients_per_domain = "off".into();
    config.relay.client_networks = vec!["10.0.0.0/8".parse().expect("net")];
    config.local_domains.push(mta_config::LocalDomainConfig {
        name: "closed.test".into(),
        delivery: mta_config::LocalDelivery::Maildir {
            root: dir.join("maildir"),
        },
        recipients: Some(vec!["alice".into()]),
        aliases: [("team".to_owned(), vec!["alice@closed.test".to_owned()])].into(),
        catch_all: None,
    });
    config
}

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let dir = scratch_dir("session");
        let config = config(&dir);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let (spool, _) = rt
            .block_on(async { Spool::open(&config.spool.path, config.spool.segment_size) })
            .expect("spool");
        let (handle, _jobs) = SchedulerHandle::channel();
        let ctx = Arc::new(Context::new(config, spool, handle, None, None));
        extern "C" fn cleanup() {
            if let Some(h) = HARNESS.get() {
                let _ = std::fs::remove_dir_all(&h._dir);
            }
        }
        // SAFETY: registering a plain `extern "C" fn()` with atexit.
        unsafe {
            libc_atexit(cleanup);
        }
        Harness {
            rt,
            ctx,
            memory: Arc::default(),
            _dir: dir,
        }
    })
}

unsafe extern "C" {
    #[link_name = "atexit"]
    fn libc_atexit(f: extern "C" fn()) -> i32;
}

/// One conversation: writes `data`, closes the client's sending side, reads every reply.
async fn converse(h: &Harness, data: &[u8], peer: SocketAddr, pipe: usize) -> Vec<u8> {
    let (client, server) = tokio::io::duplex(pipe);
    let trigger = Trigger::new();
    let session = Session::new(
        Stream::Plain(server),
        h.ctx.clone(),
        peer,
        ListenerKind::Smtp,
    )
    .with_cleanup(Cleanup::Memory(h.memory.clone()));
    let session = tokio::spawn(session.run(trigger.subscribe()));
    let (mut read, mut write) = tokio::io::split(client);
    let reader = tokio::spawn(async move {
        let mut replies = Vec::new();
        // An error only means the session closed the pipe.
        let _ = read.read_to_end(&mut replies).await;
        replies
    });
    // Errors mean the session ended first (QUIT, too many errors): fine.
    let _ = write.write_all(data).await;
    let _ = write.shutdown().await;
    match tokio::time::timeout(Duration::from_secs(10), session).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => std::panic::resume_unwind(e.into_panic()),
        Err(_) => panic!("session did not end within 10 s after the client closed its side"),
    }
    drop(write);
    match tokio::time::timeout(Duration::from_secs(10), reader).await {
        Ok(Ok(replies)) => replies,
        Ok(Err(e)) => std::panic::resume_unwind(e.into_panic()),
        Err(_) => panic!("reply stream did not end after the session ended"),
    }
}

fn has_bare_line_ending(content: &[u8]) -> Option<usize> {
    for (i, &b) in content.iter().enumerate() {
        match b {
            b'\r' if content.get(i + 1) != Some(&b'\n') => return Some(i),
            b'\n' if i == 0 || content[i - 1] != b'\r' => return Some(i),
            _ => {}
        }
    }
    None
}

/// Checks and forgets (so memory does not grow) every message the sessions accepted.
fn drain(h: &Harness, outsider: bool, data: &[u8]) {
    let config = h.ctx.config();
    for accepted in h.memory.take() {
        if outsider {
            for rcpt in &accepted.envelope.recipients {
                let (local, domain) = mta::queue::split_address(&rcpt.address)
                    .unwrap_or_else(|| panic!("accepted recipient without @: {:?}", rcpt.address));
                assert!(
                    config.local_domain(domain).is_some(),
                    "OPEN RELAY: outsider got {:?} accepted; input {:?}",
                    rcpt.address,
                    String::from_utf8_lossy(data)
                );
                let mailbox = mta::local::mailbox_name(local).unwrap_or_else(|| {
                    panic!(
                        "accepted local recipient {:?} has no Maildir name",
                        rcpt.address
                    )
                });
                assert!(
                    !mailbox.contains('/') && !mailbox.starts_with('.') && !mailbox.contains('\0')
                );
            }
        }
        if let Some(at) = has_bare_line_ending(&accepted.content) {
            panic!(
                "SMUGGLING: accepted message {} has a bare CR/LF at byte {at}: {:?}",
                accepted.id,
                String::from_utf8_lossy(&accepted.content)
            );
        }
    }
}

/// After a refused BDAT whose chunk is not read (`421 4.5.0`, issue 13) the session says
/// nothing more: the bytes that followed were never taken for commands.
fn check_chunk_not_read_is_last(replies: &[u8], data: &[u8]) {
    let text = String::from_utf8_lossy(replies);
    let lines: Vec<&str> = text.split_terminator("\r\n").collect();
    if let Some(at) = lines.iter().position(|l| l.starts_with("421 4.5.0 ")) {
        assert_eq!(
            at + 1,
            lines.len(),
            "replies after 421 4.5.0 (chunk not read): {:?}; input {:?}",
            &lines[at..],
            String::from_utf8_lossy(data)
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let h = harness();
    h.rt.block_on(async {
        let outsider: SocketAddr = "192.0.2.1:4000".parse().expect("addr");
        let replies = converse(h, data, outsider, 64 * 1024).await;
        check_chunk_not_read_is_last(&replies, data);
        drain(h, true, data);
        let insider: SocketAddr = "10.1.2.3:4000".parse().expect("addr");
        let replies = converse(h, data, insider, 1 + data.len() % 16).await;
        check_chunk_not_read_is_last(&replies, data);
        drain(h, false, data);
    });
});
