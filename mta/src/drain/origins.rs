//! The durable record of the messages this MTA was handed by draining peers, by origin (the
//! sending spool's identity and its queue id there), so that a resend is recognised and not
//! stored twice: after the message was delivered and removed, and across crashes on
//! either side. A sender deletes a message only after this MTA's `200`, so a crash between
//! this MTA's sync and the sender's delete makes the sender offer it again; exactly once
//! depends on recognising that offer.
//!
//! Owns the file `handoff-origins` in the spool directory: one JSON line per origin,
//! appended and `fdatasync`ed before the hand-over is acknowledged. Concurrent appends
//! share one sync (group commit, as the spool's writer does), on a thread of its own.
//!
//! At open: the file is read, a torn last line (a crash mid-append) cut off; origins whose
//! message is long expired (arrival + `queue.max_age` + a day: its sender has expired it
//! too, and can no longer offer it) are dropped by rewriting the file; and the origins of
//! messages still in the spool are added. A crash between the spool's store and the
//! append leaves the origin only in the stored envelope (`Envelope::handoff_origin`),
//! which is why the store comes first and the origin travels in the same record.
//!
//! Claims: two requests for one origin at once (a sender that gave up waiting and asked
//! again) do not both store it; the second waits for the first's outcome ([`Claim`]).
//!
//! Never: acknowledges an origin before it is on stable storage; drops an origin whose
//! message may still be offered; holds message content.

use crate::queue::HandoffOrigin;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot, watch};

/// The file's name in the spool directory.
pub const FILE_NAME: &str = "handoff-origins";

/// Kept past a message's expiry before its origin may be forgotten (clock skew between
/// pods, a sender's expiry run late).
const EXPIRY_SLACK: Duration = Duration::from_secs(24 * 3600);

/// Most appends made durable by one sync.
const MAX_BATCH: usize = 512;

/// One line of the file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Line {
    spool: String,
    id: String,
    pod: String,
    /// The message's arrival at its first MTA (seconds since the epoch): when it expires,
    /// its origin may go.
    received_at: u64,
}

/// The key an origin is known by: the pod name is left out, because a Job draining a
/// left-behind volume offers the same messages under another pod name.
fn key(origin: &HandoffOrigin) -> String {
    format!("{}\n{}", origin.spool, origin.id)
}

#[derive(Default)]
struct State {
    known: HashSet<String>,
    /// Origins being stored now, each with a channel closed when that attempt ends.
    pending: HashMap<String, watch::Sender<()>>,
}

/// A request to the writer thread.
struct Append {
    line: Vec<u8>,
    done: oneshot::Sender<io::Result<()>>,
}

/// The origins record. See the module doc.
pub struct Origins {
    path: PathBuf,
    state: Mutex<State>,
    appends: mpsc::UnboundedSender<Append>,
}

impl std::fmt::Debug for Origins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Origins").field("path", &self.path).finish()
    }
}

/// What [`Origins::claim`] found.
pub enum Claim {
    /// Already stored here once: answer "duplicate", store nothing.
    Known,
    /// Not known, and now this caller's to store: [`Claimed::record`] once stored; dropping
    /// it unrecorded (the store failed) lets the next offer try again.
    Claimed(Claimed),
}

/// The right to store one origin's message. See [`Claim::Claimed`].
pub struct Claimed {
    origins: Arc<Origins>,
    key: String,
    line: Line,
}

impl Origins {
    /// Opens (creating) the record in `dir`, forgetting origins of messages that arrived
    /// before `now − max_age − a day`, and adding `in_spool`: the origins of messages
    /// the spool holds (with their arrival times), made durable before this returns.
    pub fn open<'a>(
        dir: &Path,
        max_age: Duration,
        in_spool: impl IntoIterator<Item = (&'a HandoffOrigin, u64)>,
    ) -> io::Result<Arc<Origins>> {
        let path = dir.join(FILE_NAME);
        let now = unix_now();
        let horizon = now.saturating_sub((max_age + EXPIRY_SLACK).as_secs());
        let (lines, rewrite) = load(&path, horizon)?;
        if rewrite || !path.exists() {
            let mut text = Vec::new();
            for line in &lines {
                text.extend(encode(line));
            }
            crate::files::replace_durably(&path, &text)?;
        }
        let mut state = State::default();
        for line in &lines {
            state.known.insert(format!("{}\n{}", line.spool, line.id));
        }
        let mut file = OpenOptions::new().append(true).open(&path)?;
        let mut missing = Vec::new();
        for (origin, received_at) in in_spool {
            if state.known.insert(key(origin)) {
                missing.extend(encode(&line_for(origin, received_at)));
            }
        }
        if !missing.is_empty() {
            file.write_all(&missing)?;
            file.sync_data()?;
        }
        let (appends, requests) = mpsc::unbounded_channel();
        std::thread::Builder::new()
            .name("handoff-origins".into())
            .spawn(move || write_loop(file, requests))?;
        Ok(Arc::new(Origins {
            path,
            state: Mutex::new(state),
            appends,
        }))
    }

    /// Whether `origin`'s message was stored here before; if not, the right to store it.
    /// Waits while another request stores the same origin, then answers from its outcome.
    pub async fn claim(self: &Arc<Self>, origin: &HandoffOrigin, received_at: u64) -> Claim {
        let key = key(origin);
        loop {
            let mut busy = {
                let mut state = self.lock();
                if state.known.contains(&key) {
                    return Claim::Known;
                }
                match state.pending.get(&key) {
                    Some(busy) => busy.subscribe(),
                    None => {
                        state.pending.insert(key.clone(), watch::Sender::new(()));
                        return Claim::Claimed(Claimed {
                            origins: self.clone(),
                            key,
                            line: line_for(origin, received_at),
                        });
                    }
                }
            };
            // Ends (with an error) when the other request's claim is dropped.
            let _ = busy.changed().await;
        }
    }

    /// Adds the origins of messages the spool holds (found by start-up recovery, with
    /// their arrival times) that are not on record, durably before this returns: a message
    /// stored just before a crash lost its origin line is still known by its envelope.
    pub async fn add_in_spool(&self, in_spool: &[(HandoffOrigin, u64)]) -> io::Result<()> {
        let mut waits = Vec::new();
        for (origin, received_at) in in_spool {
            if !self.lock().known.insert(key(origin)) {
                continue;
            }
            let (done, result) = oneshot::channel();
            let line = encode(&line_for(origin, *received_at));
            if self.appends.send(Append { line, done }).is_err() {
                return Err(io::Error::other("the origins writer has stopped"));
            }
            waits.push(result);
        }
        for result in waits {
            result
                .await
                .unwrap_or_else(|_| Err(io::Error::other("the origins writer has stopped")))?;
        }
        Ok(())
    }

    /// Number of origins on record.
    pub fn len(&self) -> usize {
        self.lock().known.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Claimed {
    /// The message is stored: the origin goes on record, durably, before this returns. It
    /// is known from now on even if the append fails (the message is stored, and its
    /// envelope carries the origin for the next start); the error is returned for the log.
    pub async fn record(self) -> io::Result<()> {
        self.origins.lock().known.insert(self.key.clone());
        let (done, result) = oneshot::channel();
        let append = Append {
            line: encode(&self.line),
            done,
        };
        if self.origins.appends.send(append).is_err() {
            return Err(io::Error::other("the origins writer has stopped"));
        }
        result
            .await
            .unwrap_or_else(|_| Err(io::Error::other("the origins writer has stopped")))
    }
}

impl Drop for Claimed {
    fn drop(&mut self) {
        // Dropping the channel wakes whoever waits on this origin.
        self.origins.lock().pending.remove(&self.key);
    }
}

fn line_for(origin: &HandoffOrigin, received_at: u64) -> Line {
    Line {
        spool: origin.spool.clone(),
        id: origin.id.clone(),
        pod: origin.pod.clone(),
        received_at,
    }
}

fn encode(line: &Line) -> Vec<u8> {
    // Plain strings and a number: serialising cannot fail.
    let mut bytes = serde_json::to_vec(line).unwrap_or_default();
    bytes.push(b'\n');
    bytes
}

/// Reads the file: the lines still worth keeping, and whether the file must be rewritten
/// (expired lines dropped, or a torn or unreadable line found).
fn load(path: &Path, horizon: u64) -> io::Result<(Vec<Line>, bool)> {
    let data = match std::fs::read(path) {
        Ok(data) => data,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((Vec::new(), false)),
        Err(e) => return Err(e),
    };
    let mut lines = Vec::new();
    let mut rewrite = false;
    let mut rest = &data[..];
    while !rest.is_empty() {
        let Some(end) = memchr::memchr(b'\n', rest) else {
            // A crash mid-append: the offer it belonged to was never acknowledged.
            tracing::warn!(file = %path.display(), bytes = rest.len(), "handoff origins: dropping a torn last line");
            rewrite = true;
            break;
        };
        match serde_json::from_slice::<Line>(&rest[..end]) {
            Ok(line) if line.received_at < horizon => rewrite = true,
            Ok(line) => lines.push(line),
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "handoff origins: unreadable line dropped");
                rewrite = true;
            }
        }
        rest = &rest[end + 1..];
    }
    Ok((lines, rewrite))
}

/// The writer thread: appends whatever is queued, syncs once, answers everyone.
fn write_loop(mut file: File, mut requests: mpsc::UnboundedReceiver<Append>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = requests.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match requests.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let mut bytes = Vec::new();
        for append in &batch {
            bytes.extend_from_slice(&append.line);
        }
        let before = file.metadata().map(|m| m.len());
        let result = file.write_all(&bytes).and_then(|()| file.sync_data());
        if let Err(e) = &result {
            tracing::error!(error = %e, "handoff origins: append failed");
            // No half line before the next append.
            if let Ok(len) = before {
                let _ = file.set_len(len);
            }
        }
        for append in batch.drain(..) {
            let answer = match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
            };
            let _ = append.done.send(answer);
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(id: &str) -> HandoffOrigin {
        HandoffOrigin {
            pod: "mx-2".into(),
            spool: "5f0c".into(),
            id: id.into(),
        }
    }

    const DAY: Duration = Duration::from_secs(24 * 3600);

    async fn store(origins: &Arc<Origins>, id: &str, received_at: u64) -> bool {
        match origins.claim(&origin(id), received_at).await {
            Claim::Known => false,
            Claim::Claimed(claimed) => {
                claimed.record().await.expect("record");
                true
            }
        }
    }

    #[tokio::test]
    async fn an_origin_is_stored_once_and_remembered_across_restarts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let now = unix_now();
        let origins = Origins::open(dir.path(), 5 * DAY, []).expect("open");
        assert!(store(&origins, "A", now).await);
        assert!(!store(&origins, "A", now).await, "a resend is a duplicate");
        assert!(store(&origins, "B", now).await);
        // Same queue id from another spool: another message.
        let other = HandoffOrigin {
            spool: "77aa".into(),
            ..origin("A")
        };
        assert!(matches!(
            origins.claim(&other, now).await,
            Claim::Claimed(_)
        ));
        // Same spool under another pod name (a Job draining a left-behind volume): known.
        let renamed = HandoffOrigin {
            pod: "drain-job".into(),
            ..origin("B")
        };
        assert!(matches!(origins.claim(&renamed, now).await, Claim::Known));
        drop(origins);

        let reopened = Origins::open(dir.path(), 5 * DAY, []).expect("reopen");
        assert_eq!(reopened.len(), 2);
        assert!(!store(&reopened, "A", now).await);
        assert!(!store(&reopened, "B", now).await);
    }

    #[tokio::test]
    async fn an_unrecorded_claim_lets_the_next_offer_store_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let origins = Origins::open(dir.path(), 5 * DAY, []).expect("open");
        let Claim::Claimed(first) = origins.claim(&origin("A"), unix_now()).await else {
            panic!("new origin");
        };
        // A second offer of the same origin waits for the first one's outcome...
        let waiter = {
            let origins = origins.clone();
            tokio::spawn(async move {
                matches!(
                    origins.claim(&origin("A"), unix_now()).await,
                    Claim::Claimed(_)
                )
            })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "waits while the first is storing");
        // ...which failed to store: the second may.
        drop(first);
        assert!(waiter.await.expect("join"), "claimed after the failure");

        let Claim::Claimed(first) = origins.claim(&origin("B"), unix_now()).await else {
            panic!("new origin");
        };
        let waiter = {
            let origins = origins.clone();
            tokio::spawn(async move {
                matches!(origins.claim(&origin("B"), unix_now()).await, Claim::Known)
            })
        };
        first.record().await.expect("record");
        assert!(
            waiter.await.expect("join"),
            "known once the first stored it"
        );
    }

    #[test]
    fn torn_and_expired_lines_are_dropped_and_spool_origins_added() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(FILE_NAME);
        let now = unix_now();
        let old = now - 7 * 24 * 3600;
        let text = format!(
            "{}{}{}",
            String::from_utf8(encode(&line_for(&origin("old"), old))).expect("utf8"),
            String::from_utf8(encode(&line_for(&origin("kept"), now))).expect("utf8"),
            r#"{"spool":"5f0c","id":"torn","pod":"mx-2","rece"#,
        );
        std::fs::write(&path, text).expect("write");
        let in_spool = origin("only-in-spool");
        let origins = Origins::open(dir.path(), 5 * DAY, [(&in_spool, now)]).expect("open");
        assert_eq!(origins.len(), 2, "kept + only-in-spool");
        let on_disk = std::fs::read_to_string(&path).expect("read");
        let ids: Vec<String> = on_disk
            .lines()
            .map(|l| {
                serde_json::from_str::<Line>(l)
                    .expect("whole lines only")
                    .id
            })
            .collect();
        assert_eq!(ids, ["kept", "only-in-spool"]);
    }
}
