//! The durable queue on this pod's volume: a log of append-only segment files.
//!
//! Contract: [`Spool::store`] returns only once the message and its envelope are on stable
//! storage (written and `fdatasync`ed). Concurrent stores share one `fdatasync` (group
//! commit, see [`writer`]), so throughput grows with the number of sessions instead of being
//! capped at one sync per message. After a crash, [`Spool::open`] rebuilds every queued
//! message and its recipients' state from the segments alone; a torn tail record is
//! detected by its checksum and dropped, never delivered half.
//!
//! Lifecycle of a message: `store` (a `Message` record) → zero or more `update`s (an
//! `Update` record with the recipients' statuses) → `remove` (a `Done` record). A segment
//! file is deleted once every message in it is done and every older segment is gone (oldest
//! first, so no `Done` or `Update` record is lost while the message it refers to still
//! exists in an older segment).
//!
//! Compaction: a long-deferred message would keep its segment, and (oldest first) every
//! newer one, on disk until it leaves the queue. When the segments on disk hold more than
//! twice the live bytes (plus two segments of slack), [`Spool::compaction_candidates`]
//! names the messages of the oldest segment, and the scheduler relocates them
//! ([`Spool::relocate_detached`]): the writer copies each message with its current
//! envelope into the active segment as a new `Message` record with the same queue id. The
//! copy is synced before the old segment can be deleted; recovery keeps the later copy.
//! So the spool stays within about twice its live data.
//!
//! Small volumes (issue 13, item 5): a segment is at most an eighth of the volume
//! ([`segment_size_for`]), so a volume smaller than the configured `segment_size` still
//! holds several segments and finished ones can be deleted. New messages are refused
//! (`452`) while less than [`reserve_for`] bytes would stay free, so the `Update` and
//! `Done` records that let segments go always fit; and when a message is refused for
//! space while the active segment holds no live message, the writer moves to a new segment
//! so that one can be deleted too. Finished segments are deleted at start-up before
//! anything is written, and a deleted segment's read handle is closed with it.
//!
//! One owner: an open spool holds an exclusive `flock` on [`LOCK_FILE`]; a second MTA on
//! the same directory (a pod and the Job draining its volume, on one node) is refused
//! with [`Error::InUse`] before it reads anything.

mod record;
mod writer;

use crate::dense_map::DenseMap;
use crate::queue::{Envelope, QueueId, QueueIdGenerator};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot};
use writer::{Append, Durability, Writer};

/// How often the scheduler asks for [`Spool::compaction_candidates`].
pub const COMPACTION_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);

/// A segment is at most this fraction of the volume, so that finished segments can be
/// deleted while the active one is still being written.
const SEGMENTS_PER_VOLUME: u64 = 8;
/// The smallest segment, however small the volume.
const MIN_SEGMENT_SIZE: u64 = 64 * 1024;
/// Largest space kept free for status records (see [`reserve_for`]).
const MAX_RESERVE: u64 = 16 * 1024 * 1024;

/// The segment size used on a volume of `volume_size` bytes: `configured`, but at most an
/// eighth of the volume. A segment the size of the volume could never be deleted: it is
/// the active one until it is full, and it is never full before the volume is.
pub fn segment_size_for(configured: u64, volume_size: u64) -> u64 {
    if volume_size == 0 {
        // Some file systems report no size at all; nothing to adapt to.
        return configured;
    }
    configured.min((volume_size / SEGMENTS_PER_VOLUME).max(MIN_SEGMENT_SIZE))
}

/// Bytes kept free on a volume of `volume_size` bytes: a new message is refused (`452`)
/// rather than eat into them. They hold the `Update` and `Done` records of the queued
/// messages (a few dozen bytes each), without which a full volume could never record that
/// its messages are done and so never delete a segment. 1/32 of the volume, at most 16 MiB.
pub fn reserve_for(volume_size: u64) -> u64 {
    (volume_size / 32).min(MAX_RESERVE)
}

/// Size and free space of the file system holding `dir`.
#[derive(Debug, Clone, Copy)]
struct Volume {
    size: u64,
    available: u64,
}

impl Volume {
    fn of(dir: &Path) -> std::io::Result<Volume> {
        let stat = rustix::fs::statvfs(dir)?;
        Ok(Volume {
            size: stat.f_blocks.saturating_mul(stat.f_frsize),
            available: stat.f_bavail.saturating_mul(stat.f_frsize),
        })
    }
}

/// Open read handles, per segment. The writer removes a segment's handle when it deletes
/// the segment, so the file's space is freed at once rather than when the next segment is
/// first read.
type Readers = Arc<Mutex<HashMap<u32, Arc<File>>>>;

/// Why the spool could not do what was asked. Each variant's doc names the SMTP reply the
/// session sends for it (see `crate::reply`).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The volume is full (ENOSPC/EDQUOT). Reply `452 4.3.1`; nothing already accepted is
    /// affected, and the next store tries again.
    #[error("spool volume is full")]
    Full,
    /// Any other I/O failure while writing. Reply `451 4.3.0`.
    #[error("spool write failed: {0}")]
    Io(#[source] std::io::Error),
    /// The writer has stopped (shutdown). Reply `421 4.3.2`.
    #[error("spool is shut down")]
    Closed,
    /// No such message (already delivered or deleted).
    #[error("no message {0} in the spool")]
    NotFound(QueueId),
    /// A record could not be decoded while opening the spool.
    #[error("spool segment {path}: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    /// Another process has the spool open (its lock file is locked): two writers would
    /// corrupt it. In Kubernetes, a pod and the Job draining the same volume.
    #[error(
        "spool {} is in use by another petrel-mta (it holds {}); two MTAs never share a spool",
        dir.display(),
        LOCK_FILE
    )]
    InUse { dir: PathBuf },
}

/// The spool's lock file: whoever holds an exclusive `flock` on it owns the spool.
pub const LOCK_FILE: &str = "petrel-spool.lock";

/// Takes the spool's lock, or says who has it. A `flock` goes with the process: a crashed
/// MTA never leaves its spool locked.
fn lock(dir: &Path) -> Result<File, Error> {
    let file = crate::files::open_private(
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true),
        &dir.join(LOCK_FILE),
    )
    .map_err(Error::from_io)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::InUse {
            dir: dir.to_owned(),
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(Error::from_io(e)),
    }
}

impl Error {
    fn from_io(err: std::io::Error) -> Self {
        match err.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => Error::Full,
            _ => Error::Io(err),
        }
    }
}

/// Where bytes of a segment are: 12 bytes, so that the index of a million queued messages
/// stays small. Offsets fit in 32 bits because the writer never lets a segment grow past
/// [`MAX_SEGMENT_BYTES`].
#[derive(Debug, Clone, Copy)]
struct Location {
    segment: u32,
    offset: u32,
    len: u32,
}

/// Where a queued message is: its content, and its current envelope (in the `Message`
/// record, or in the latest `Update` record; always in the same segment or a newer one,
/// so it lives as long as the content does).
#[derive(Debug, Clone, Copy)]
struct Stored {
    message: Location,
    envelope: Location,
}

/// The largest a segment file gets: offsets in [`Location`] are 32-bit.
pub const MAX_SEGMENT_BYTES: u64 = u32::MAX as u64;

/// State shared by the writer thread (which owns segment lifecycle) and readers.
#[derive(Debug, Default)]
struct Index {
    messages: DenseMap<QueueId, Stored>,
    /// Live messages per segment; a segment leaves this map when its file is deleted.
    live: BTreeMap<u32, Live>,
    /// Envelopes submitted in `Update` (or relocation) records that the writer has not
    /// written yet: what [`Spool::envelope`] answers until it has, so a reader never sees
    /// an older envelope than the last one submitted. An entry goes when its record is
    /// written (the `Arc` identifies which submission), or with the message.
    pending: HashMap<QueueId, Arc<Vec<u8>>>,
}

/// What of a segment is still needed.
#[derive(Debug, Default, Clone, Copy)]
struct Live {
    messages: usize,
    bytes: u64,
}

impl Index {
    /// Takes the finished segments that may go now: oldest first, each with no live
    /// message, never `active`. The caller deletes their files (see the module doc for why
    /// the order matters).
    fn take_finished(&mut self, active: Option<u32>) -> Vec<u32> {
        let mut finished = Vec::new();
        while let Some((&oldest, live)) = self.live.first_key_value() {
            if live.messages != 0 || Some(oldest) == active {
                break;
            }
            self.live.remove(&oldest);
            finished.push(oldest);
        }
        finished
    }

    fn add(&mut self, id: QueueId, stored: Stored) {
        if let Some(old) = self.messages.insert(id, stored) {
            self.release(old.message);
        }
        let live = self.live.entry(stored.message.segment).or_default();
        live.messages += 1;
        live.bytes += u64::from(stored.message.len);
    }

    fn remove(&mut self, id: QueueId) {
        if let Some(old) = self.messages.remove(&id) {
            self.release(old.message);
        }
        self.pending.remove(&id);
    }

    /// The envelope of `id` is now at `at` (an `Update` record was written); `submitted`
    /// is that record's pending entry, dropped unless a later one replaced it.
    fn moved_envelope(&mut self, id: QueueId, at: Location, submitted: Option<&Arc<Vec<u8>>>) {
        if let Some(stored) = self.messages.get_mut(&id) {
            stored.envelope = at;
        }
        self.written(id, submitted);
    }

    fn written(&mut self, id: QueueId, submitted: Option<&Arc<Vec<u8>>>) {
        if let Some(submitted) = submitted
            && self
                .pending
                .get(&id)
                .is_some_and(|p| Arc::ptr_eq(p, submitted))
        {
            self.pending.remove(&id);
        }
    }

    fn release(&mut self, location: Location) {
        if let Some(live) = self.live.get_mut(&location.segment) {
            live.messages = live.messages.saturating_sub(1);
            live.bytes = live.bytes.saturating_sub(u64::from(location.len));
        }
    }
}

/// A message found in the spool at start-up.
#[derive(Debug)]
pub struct Recovered {
    pub id: QueueId,
    pub envelope: Envelope,
}

/// Cheap to clone handle to the spool.
#[derive(Clone, Debug)]
pub struct Spool {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    appends: mpsc::UnboundedSender<Append>,
    ids: QueueIdGenerator,
    index: Arc<Mutex<Index>>,
    readers: Readers,
    /// The last write error, until a later write succeeds.
    health: Arc<Mutex<Option<String>>>,
    segment_size: u64,
    /// The writer thread, joined when the last handle goes: a spool reopened on the same
    /// directory never races the old writer's last sync or segment deletions.
    writer: Option<std::thread::JoinHandle<()>>,
    /// The exclusive lock on [`LOCK_FILE`], held as long as the spool is open; released
    /// after the writer is joined (fields drop after `Drop::drop`).
    _lock: File,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Close the channel (this is its only sender) so the writer finishes its queue,
        // syncs and exits; then wait for it.
        let (closed, _) = mpsc::unbounded_channel();
        drop(std::mem::replace(&mut self.appends, closed));
        if let Some(writer) = self.writer.take()
            && writer.join().is_err()
        {
            tracing::error!("spool: the writer thread panicked");
        }
    }
}

/// Called by the writer after each group commit with its sync time and batch size.
pub type SyncObserver = Arc<dyn Fn(std::time::Duration, usize) + Send + Sync>;

impl Spool {
    /// Opens (creating if needed) the spool in `dir`, recovers every queued message,
    /// deletes finished segments, and starts the writer thread on a fresh segment.
    /// `segment_size` is reduced to suit a small volume ([`segment_size_for`]).
    ///
    /// Reads every queued envelope into memory: for tests and tools. The MTA opens with
    /// [`Spool::open_observed`] and reads envelopes as it schedules them.
    pub fn open(dir: &Path, segment_size: u64) -> Result<(Spool, Vec<Recovered>), Error> {
        let spool = Self::open_observed(dir, segment_size, None)?;
        let mut recovered = Vec::new();
        for id in spool.ids_after(None, usize::MAX) {
            let envelope = spool.envelope(id)?;
            recovered.push(Recovered { id, envelope });
        }
        Ok((spool, recovered))
    }

    /// Opens the spool like [`Spool::open`], reporting every group commit to `observer`
    /// (metrics). Recovery here rebuilds only the index of where each message and its
    /// envelope are ([`Spool::ids_after`], [`Spool::envelope`]); no envelope is read.
    pub fn open_observed(
        dir: &Path,
        segment_size: u64,
        observer: Option<SyncObserver>,
    ) -> Result<Spool, Error> {
        crate::files::create_private_dir_all(dir).map_err(Error::from_io)?;
        let lock = lock(dir)?;
        let (mut index, last_segment, max_id) = recover(dir)?;
        // Before anything is written: on a full volume the first write would fail, and
        // deleting waited for a successful one.
        delete_segments(dir, &index.take_finished(None));
        let volume = Volume::of(dir).map_err(Error::from_io)?;
        let configured = segment_size;
        let segment_size = segment_size_for(configured, volume.size).min(MAX_SEGMENT_BYTES / 2);
        if segment_size < configured {
            tracing::info!(
                configured,
                segment_size,
                volume_size = volume.size,
                "spool: segments limited to an eighth of the volume"
            );
        }
        let index = Arc::new(Mutex::new(index));
        let readers = Readers::default();
        let (appends, requests) = mpsc::unbounded_channel();
        let health = Arc::new(Mutex::new(None));
        let writer = Writer::start(
            writer::Setup {
                dir: dir.to_owned(),
                first_segment: last_segment + 1,
                segment_size,
                reserve: reserve_for(volume.size),
                index: index.clone(),
                readers: readers.clone(),
                health: health.clone(),
                observer,
            },
            requests,
        )
        .map_err(Error::from_io)?;
        let spool = Spool {
            inner: Arc::new(Inner {
                dir: dir.to_owned(),
                appends,
                ids: QueueIdGenerator::new(max_id),
                index,
                readers,
                health,
                segment_size,
                writer: Some(writer),
                _lock: lock,
            }),
        };
        Ok(spool)
    }

    /// The largest queued id.
    pub fn last_id(&self) -> Option<QueueId> {
        let index = self.inner.index.lock().unwrap_or_else(|e| e.into_inner());
        index.messages.last().map(|(id, _)| *id)
    }

    /// Up to `limit` queued ids after `after` (from the first with `None`), in order.
    pub fn ids_after(&self, after: Option<QueueId>, limit: usize) -> Vec<QueueId> {
        use std::ops::Bound;
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        let index = self.inner.index.lock().unwrap_or_else(|e| e.into_inner());
        index
            .messages
            .range_from(from)
            .map(|(id, _)| *id)
            .take(limit)
            .collect()
    }

    /// The current envelope of a queued message: the last one submitted through
    /// [`Spool::update`] (or [`Spool::update_detached`]), even before the writer has
    /// written it, else the one on disk. Reads the segment file (page cache, mostly), so
    /// call it for messages being worked on, not for the whole queue at once.
    pub fn envelope(&self, id: QueueId) -> Result<Envelope, Error> {
        let (pending, location) = {
            let index = self.inner.index.lock().unwrap_or_else(|e| e.into_inner());
            (
                index.pending.get(&id).cloned(),
                index.messages.get(&id).map(|s| s.envelope),
            )
        };
        let json = match (pending, location) {
            (Some(json), _) => json,
            (None, Some(location)) => Arc::new(self.read_at(location)?),
            (None, None) => return Err(Error::NotFound(id)),
        };
        serde_json::from_slice(&json).map_err(|e| Error::Corrupt {
            path: location.map_or_else(
                || self.inner.dir.clone(),
                |l| segment_path(&self.inner.dir, l.segment),
            ),
            reason: format!("envelope of {id}: {e}"),
        })
    }

    fn read_at(&self, location: Location) -> Result<Vec<u8>, Error> {
        let file = self.reader(location.segment)?;
        let mut buf = vec![0; location.len as usize];
        file.read_exact_at(&mut buf, u64::from(location.offset))
            .map_err(Error::from_io)?;
        Ok(buf)
    }

    /// A fresh queue id for a message about to be stored.
    pub fn next_id(&self) -> QueueId {
        self.inner.ids.next()
    }

    /// Stores a message durably. `message` is the content as delivered (header lines the
    /// MTA adds first, then what the client sent); it is concatenated, not copied twice.
    pub async fn store(
        &self,
        id: QueueId,
        envelope: &Envelope,
        message: &[&[u8]],
    ) -> Result<(), Error> {
        let json = envelope_json(envelope);
        let bytes = record::encode_message(id, &json, message);
        self.append(Append::message(id, bytes, json.len()), Durability::Sync)
            .await
    }

    /// Records the recipients' new statuses durably (so a restart does not redo them).
    pub async fn update(&self, id: QueueId, envelope: &Envelope) -> Result<(), Error> {
        let append = self.update_record(id, envelope);
        self.append(append, Durability::Sync).await
    }

    /// An `Update` record for the writer, its envelope pending until written.
    fn update_record(&self, id: QueueId, envelope: &Envelope) -> Append {
        let json = Arc::new(envelope_json(envelope));
        let bytes = record::encode_update(id, &json);
        self.inner
            .index
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pending
            .insert(id, json.clone());
        Append::update(id, bytes, json)
    }

    /// Marks a message finished. Not synced on its own: it rides along with the next group
    /// commit. Losing it in a crash means the message is redelivered, which local delivery
    /// detects (its Maildir file name is derived from the queue id).
    pub async fn remove(&self, id: QueueId) -> Result<(), Error> {
        let bytes = record::encode_done(id);
        self.append(Append::done(id, bytes), Durability::Lazy).await
    }

    /// Returns once every record submitted before it (the lazily written `Done` records
    /// above all) is on stable storage: one more group commit, with nothing in it. A drain
    /// calls it before it writes its "drained" marker, so a crash cannot bring back a
    /// message the marker says is gone.
    pub async fn sync(&self) -> Result<(), Error> {
        self.append(Append::other(QueueId(0), Vec::new()), Durability::Sync)
            .await
    }

    /// The directory holding the segments.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Reads a queued message's content.
    pub async fn read_message(&self, id: QueueId) -> Result<Vec<u8>, Error> {
        let location = {
            let index = self.inner.index.lock().unwrap_or_else(|e| e.into_inner());
            index.messages.get(&id).map(|s| s.message)
        }
        .ok_or(Error::NotFound(id))?;
        let file = self.reader(location.segment)?;
        tokio::task::spawn_blocking(move || {
            let mut buf = vec![0; location.len as usize];
            file.read_exact_at(&mut buf, u64::from(location.offset))
                .map(|()| buf)
                .map_err(Error::from_io)
        })
        .await
        .map_err(|e| Error::Io(std::io::Error::other(e)))?
    }

    /// `Err` with the last write error while writes are failing (disk full, I/O error).
    pub fn healthy(&self) -> Result<(), String> {
        match &*self.inner.health.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(error) => Err(error.clone()),
            None => Ok(()),
        }
    }

    /// Number of messages currently in the spool.
    pub fn len(&self) -> usize {
        let index = self.inner.index.lock().unwrap_or_else(|e| e.into_inner());
        index.messages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of segment files on disk (live or active).
    pub fn segment_count(&self) -> usize {
        std::fs::read_dir(&self.inner.dir)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok())
                    .filter(|e| segment_number(&e.path()).is_some())
                    .count()
            })
            .unwrap_or(0)
    }

    /// Number of open read handles (tests: deleted segments must not keep one).
    #[cfg(test)]
    fn open_readers(&self) -> usize {
        self.inner
            .readers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    fn reader(&self, segment: u32) -> Result<Arc<File>, Error> {
        let mut readers = self.inner.readers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(file) = readers.get(&segment) {
            return Ok(file.clone());
        }
        let file =
            Arc::new(File::open(segment_path(&self.inner.dir, segment)).map_err(Error::from_io)?);
        // Cached only while the segment exists. The writer deletes a segment (under the
        // index lock) before it drops the segment's handle (under this lock, which we hold):
        // a handle cached here is either still live or dropped by the writer afterwards.
        let exists = self
            .inner
            .index
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .live
            .contains_key(&segment);
        if exists {
            readers.insert(segment, file.clone());
        }
        Ok(file)
    }

    async fn append(&self, append: Append, durability: Durability) -> Result<(), Error> {
        self.submit(append, durability)
            .await
            .map_err(|_| Error::Closed)?
    }

    /// Queues a record for the writer and returns at once; the receiver yields the result.
    /// Records are written in the order they are submitted, whoever awaits them.
    fn submit(
        &self,
        mut append: Append,
        durability: Durability,
    ) -> oneshot::Receiver<Result<(), Error>> {
        let (done, result) = oneshot::channel();
        append.durability = durability;
        append.done = Some(done);
        // A send error means the writer is gone; dropping the sender reports `Closed`.
        let _ = self.inner.appends.send(append);
        result
    }

    /// Like [`Spool::update`], but returns once the record is queued: callers that must not
    /// wait (the scheduler loop) still get ordering with their later records.
    pub fn update_detached(&self, id: QueueId, envelope: &Envelope) {
        let append = self.update_record(id, envelope);
        log_failure(id, self.submit(append, Durability::Sync));
    }

    /// Messages to relocate (at most `max`), when the segments on disk hold more than twice
    /// the live bytes plus two segments: those of the oldest segment, which is what
    /// blocks deletion. Empty otherwise. Scans the index, so call it now and then (the
    /// scheduler does, every [`COMPACTION_INTERVAL`]), not per message.
    pub fn compaction_candidates(&self, max: usize) -> Vec<QueueId> {
        let index = self.inner.index.lock().unwrap_or_else(|e| e.into_inner());
        let segment_size = self.inner.segment_size.max(1);
        let on_disk = index.live.len() as u64 * segment_size;
        let live: u64 = index.live.values().map(|l| l.bytes).sum();
        let Some((&oldest, _)) = index.live.first_key_value() else {
            return Vec::new();
        };
        if index.live.len() < 3 || on_disk <= 2 * live + 2 * segment_size {
            return Vec::new();
        }
        index
            .messages
            .iter()
            .filter(|(_, stored)| stored.message.segment == oldest)
            .map(|(id, _)| *id)
            .take(max)
            .collect()
    }

    /// Copies a queued message, with its current envelope ([`Spool::envelope`]), into the
    /// active segment (see the module doc). Returns once the request is queued; a message
    /// already removed by then is left alone.
    pub fn relocate_detached(&self, id: QueueId) {
        log_failure(id, self.submit(Append::relocate(id), Durability::Sync));
    }

    /// Like [`Spool::remove`], but returns once the record is queued.
    pub fn remove_detached(&self, id: QueueId) {
        let bytes = record::encode_done(id);
        log_failure(id, self.submit(Append::done(id, bytes), Durability::Lazy));
    }
}

fn log_failure(id: QueueId, result: oneshot::Receiver<Result<(), Error>>) {
    tokio::spawn(async move {
        match result.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(queue_id = %id, error = %e, "spool record not written"),
            Err(_) => tracing::error!(queue_id = %id, "spool closed before record was written"),
        }
    });
}

fn envelope_json(envelope: &Envelope) -> Vec<u8> {
    // Serialising plain data with string keys cannot fail.
    serde_json::to_vec(envelope).unwrap_or_default()
}

fn segment_path(dir: &Path, segment: u32) -> PathBuf {
    dir.join(format!("{segment:010}.seg"))
}

/// Deletes the files of finished segments (see [`Index::take_finished`]).
fn delete_segments(dir: &Path, segments: &[u32]) {
    for &segment in segments {
        let path = segment_path(dir, segment);
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::warn!(error = %e, segment = %path.display(), "spool: cannot delete finished segment");
        }
    }
}

fn segment_number(path: &Path) -> Option<u32> {
    let name = path.file_name()?.to_str()?;
    name.strip_suffix(".seg")?.parse().ok()
}

/// Scans every segment in order and rebuilds the index (locations only: no envelope is
/// parsed here, so a million queued messages cost a read of the segments and a few dozen
/// bytes each). Returns the index, the highest segment number seen (0 when none) and the
/// highest queue id.
fn recover(dir: &Path) -> Result<(Index, u32, u64), Error> {
    let mut segments: Vec<u32> = std::fs::read_dir(dir)
        .map_err(Error::from_io)?
        .filter_map(|e| e.ok())
        .filter_map(|e| segment_number(&e.path()))
        .collect();
    segments.sort_unstable();

    let mut index = Index::default();
    let mut max_id = 0;
    let mut record = Vec::new();
    for &segment in &segments {
        let path = segment_path(dir, segment);
        let file = File::open(&path).map_err(Error::from_io)?;
        let size = file.metadata().map_err(Error::from_io)?.len();
        let mut reader = std::io::BufReader::with_capacity(256 * 1024, file);
        index.live.insert(segment, Live::default());
        let mut offset: u64 = 0;
        loop {
            let decoded = match read_record(&mut reader, size - offset, &mut record) {
                Ok(()) => record::decode(&record),
                Err(stop) => Err(stop),
            };
            let decoded = match decoded {
                Ok(decoded) => decoded,
                Err(record::Stop::End) => break,
                Err(record::Stop::Torn) => {
                    // A crash mid-append leaves a partial record at the tail. Cut it off so
                    // the file holds only whole records.
                    tracing::warn!(
                        segment = %path.display(),
                        offset,
                        dropped_bytes = size - offset,
                        "spool: dropping torn record at end of segment"
                    );
                    truncate(&path, offset).map_err(Error::from_io)?;
                    break;
                }
            };
            max_id = max_id.max(decoded.id.0);
            let at = |start: usize, len: usize| Location {
                segment,
                offset: (offset + start as u64) as u32,
                len: len as u32,
            };
            match decoded.kind {
                record::Kind::Message => {
                    let envelope_start = decoded.message_offset - decoded.envelope.len();
                    // A later copy (relocated by compaction) supersedes the earlier one.
                    index.add(
                        decoded.id,
                        Stored {
                            message: at(decoded.message_offset, decoded.message.len()),
                            envelope: at(envelope_start, decoded.envelope.len()),
                        },
                    );
                }
                record::Kind::Update => {
                    let start = decoded.len - decoded.envelope.len();
                    index.moved_envelope(decoded.id, at(start, decoded.envelope.len()), None);
                }
                record::Kind::Done => index.remove(decoded.id),
            }
            offset += decoded.len as u64;
        }
    }
    let last = segments.last().copied().unwrap_or(0);
    Ok((index, last, max_id))
}

/// Reads the next whole record into `buf` (header and payload), or says why not: `End` at
/// the end of the data, `Torn` for a partial record (`left` is what the file has left, so
/// a corrupt length is never allocated).
fn read_record(
    reader: &mut impl std::io::Read,
    left: u64,
    buf: &mut Vec<u8>,
) -> Result<(), record::Stop> {
    if left == 0 {
        return Err(record::Stop::End);
    }
    buf.resize(record::HEADER_LEN, 0);
    if left < record::HEADER_LEN as u64 || reader.read_exact(buf).is_err() {
        return Err(record::Stop::Torn);
    }
    let len = u64::from(u32::from_le_bytes([buf[5], buf[6], buf[7], buf[8]]));
    if len > left - record::HEADER_LEN as u64 {
        return Err(record::Stop::Torn);
    }
    buf.resize(record::HEADER_LEN + len as usize, 0);
    reader
        .read_exact(&mut buf[record::HEADER_LEN..])
        .map_err(|_| record::Stop::Torn)
}

fn truncate(path: &Path, len: u64) -> std::io::Result<()> {
    let file = std::fs::OpenOptions::new().write(true).open(path)?;
    file.set_len(len)?;
    file.sync_all()
}

#[cfg(test)]
mod tests;
