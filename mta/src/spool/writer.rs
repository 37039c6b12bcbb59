//! The spool's single writer: a dedicated OS thread that appends records to the active
//! segment and makes them durable in groups.
//!
//! Group commit: the thread blocks for one request, then takes every request already
//! queued behind it (up to a batch cap), appends them all, and calls `fdatasync` once if
//! any of them asked for durability. While that sync runs, new requests pile up and form
//! the next batch. So with N concurrent sessions one sync acknowledges up to N messages,
//! and an idle spool still answers a single message after one sync.
//!
//! A failed append (disk full, I/O error) truncates the segment back to where the batch
//! began, so the file never holds a record whose writer was told "failed"; every request
//! of that batch gets the error. A failed `fdatasync` is treated as losing the segment's
//! page-cache state (Linux may drop the dirty pages): the batch fails and writing moves on
//! to a new segment.
//!
//! The writer also owns segment lifecycle: rotation past `segment_size` and deletion of
//! fully-done segments, oldest first.
//!
//! Space: before appending new messages it checks the volume's free space; messages that
//! would leave less than `reserve` free get `Full` (`452`) without being written, while
//! the batch's status records still are (see the `spool` module doc).

use super::{Error, Index, Location, Readers, Stored, Volume, segment_path};
use crate::queue::QueueId;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot};

/// Most requests handled in one group commit.
const MAX_BATCH: usize = 512;
/// Most bytes taken into one group commit (beyond the first request): a batch always
/// fits in a segment's 32-bit offsets.
const MAX_BATCH_BYTES: usize = 256 * 1024 * 1024;

/// Whether the caller waits for the record to reach stable storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Reply after `fdatasync`.
    Sync,
    /// Reply after the write; synced with the next group commit.
    Lazy,
}

#[derive(Debug, Clone, Copy)]
enum Effect {
    /// A new message: index it. Carries the envelope length to find the message bytes.
    Insert { envelope_len: usize },
    /// The message is finished: unindex it.
    Remove,
    /// A status update: the message's envelope is now in this record.
    Update,
    /// Nothing to index.
    None,
    /// Compaction: the writer reads the message and its current envelope from where the
    /// index has them and turns this into an `Insert` in the active segment.
    Relocate,
}

/// One request to the writer.
#[derive(Debug)]
pub struct Append {
    id: QueueId,
    bytes: Vec<u8>,
    effect: Effect,
    /// The envelope this record carries, as pending in the index until written.
    submitted: Option<Arc<Vec<u8>>>,
    pub durability: Durability,
    pub done: Option<oneshot::Sender<Result<(), Error>>>,
}

impl Append {
    pub fn message(id: QueueId, bytes: Vec<u8>, envelope_len: usize) -> Self {
        Self::new(id, bytes, Effect::Insert { envelope_len })
    }
    pub fn done(id: QueueId, bytes: Vec<u8>) -> Self {
        Self::new(id, bytes, Effect::Remove)
    }
    pub fn other(id: QueueId, bytes: Vec<u8>) -> Self {
        Self::new(id, bytes, Effect::None)
    }
    pub fn update(id: QueueId, bytes: Vec<u8>, envelope: Arc<Vec<u8>>) -> Self {
        Self {
            submitted: Some(envelope),
            ..Self::new(id, bytes, Effect::Update)
        }
    }
    pub fn relocate(id: QueueId) -> Self {
        Self::new(id, Vec::new(), Effect::Relocate)
    }
    fn new(id: QueueId, bytes: Vec<u8>, effect: Effect) -> Self {
        Self {
            id,
            bytes,
            effect,
            submitted: None,
            durability: Durability::Sync,
            done: None,
        }
    }
}

pub struct Writer {
    dir: PathBuf,
    segment: u32,
    file: File,
    offset: u64,
    segment_size: u64,
    reserve: u64,
    index: Arc<Mutex<Index>>,
    readers: Readers,
    health: Arc<Mutex<Option<String>>>,
    observer: Option<super::SyncObserver>,
}

/// What the writer is started with.
pub struct Setup {
    pub dir: PathBuf,
    pub first_segment: u32,
    pub segment_size: u64,
    /// Bytes of the volume new messages must leave free ([`super::reserve_for`]).
    pub reserve: u64,
    pub index: Arc<Mutex<Index>>,
    pub readers: Readers,
    pub health: Arc<Mutex<Option<String>>>,
    pub observer: Option<super::SyncObserver>,
}

impl Writer {
    /// Creates segment `first_segment` and runs the writer on its own thread until every
    /// sender is dropped.
    pub fn start(
        setup: Setup,
        requests: mpsc::UnboundedReceiver<Append>,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        let file = create_segment(&setup.dir, setup.first_segment)?;
        lock(&setup.index)
            .live
            .insert(setup.first_segment, Default::default());
        let writer = Writer {
            dir: setup.dir,
            segment: setup.first_segment,
            file,
            offset: 0,
            segment_size: setup.segment_size,
            reserve: setup.reserve,
            index: setup.index,
            readers: setup.readers,
            health: setup.health,
            observer: setup.observer,
        };
        std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || writer.run(requests))
    }

    fn run(mut self, mut requests: mpsc::UnboundedReceiver<Append>) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        while let Some(first) = requests.blocking_recv() {
            let mut bytes = first.bytes.len();
            batch.push(first);
            while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
                match requests.try_recv() {
                    Ok(next) => {
                        bytes += next.bytes.len();
                        batch.push(next);
                    }
                    Err(_) => break,
                }
            }
            self.commit(&mut batch);
        }
        // Shutdown: make lazily written records durable too.
        if let Err(e) = self.file.sync_data() {
            tracing::error!(error = %e, "spool: final sync failed");
        }
    }

    fn commit(&mut self, batch: &mut Vec<Append>) {
        self.prepare_relocations(batch);
        self.refuse_messages_without_space(batch);
        if batch.is_empty() {
            return;
        }
        // Offsets in the index are 32-bit: a batch that would reach past that starts a
        // new segment.
        let bytes: u64 = batch.iter().map(|a| a.bytes.len() as u64).sum();
        if self.offset > 0 && self.offset + bytes > super::MAX_SEGMENT_BYTES {
            self.open_next_segment();
        }
        let start = self.offset;
        let began = std::time::Instant::now();
        let result = self.write_all(batch).and_then(|()| {
            if batch.iter().any(|a| a.durability == Durability::Sync) {
                self.file.sync_data().map_err(SyncFailed)
            } else {
                Ok(())
            }
        });
        if let Some(observer) = &self.observer {
            observer(began.elapsed(), batch.len());
        }
        // Health follows message stores: a small status record fitting after a failed
        // message does not make the spool writable again for mail.
        let stored_message = batch
            .iter()
            .any(|a| matches!(a.effect, Effect::Insert { .. }));
        let mut health = self.health.lock().unwrap_or_else(|e| e.into_inner());
        match &result {
            Ok(()) if stored_message => *health = None,
            Ok(()) => {}
            Err(SyncFailed(e)) => *health = Some(e.to_string()),
        }
        drop(health);
        match result {
            Ok(()) => {
                self.index_batch(batch, start);
                for append in batch.drain(..) {
                    if let Some(done) = append.done {
                        let _ = done.send(Ok(()));
                    }
                }
                self.maybe_rotate();
            }
            Err(SyncFailed(err)) => {
                tracing::error!(error = %err, segment = self.segment, "spool: append or sync failed");
                let kind = err.raw_os_error();
                self.recover_from_failure(start);
                if matches!(kind, Some(libc::ENOSPC) | Some(libc::EDQUOT)) {
                    // The next store finds the space, if this segment held it.
                    self.leave_finished_segment();
                }
                for append in batch.drain(..) {
                    if let Some(done) = append.done {
                        let err = match kind {
                            Some(code) => std::io::Error::from_raw_os_error(code),
                            None => std::io::Error::other(err.to_string()),
                        };
                        let _ = done.send(Err(Error::from_io(err)));
                    }
                }
            }
        }
    }

    /// Answers `Full` to the batch's new messages, and takes them out of it, when writing
    /// them would leave less than the reserve free: the reserve is for the status records
    /// that let finished segments go. First, though, leaves an active segment that holds
    /// no live message, which frees its space.
    fn refuse_messages_without_space(&mut self, batch: &mut Vec<Append>) {
        let needed: u64 = batch
            .iter()
            .filter(|a| matches!(a.effect, Effect::Insert { .. }))
            .map(|a| a.bytes.len() as u64)
            .sum();
        if needed == 0 {
            return;
        }
        let Some(mut reason) = self.lacks_space(needed) else {
            return;
        };
        if self.leave_finished_segment() {
            match self.lacks_space(needed) {
                Some(still) => reason = still,
                None => return,
            }
        }
        tracing::warn!(segment = self.segment, "{reason}");
        *self.health.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason);
        let (refused, kept): (Vec<Append>, Vec<Append>) = batch
            .drain(..)
            .partition(|a| matches!(a.effect, Effect::Insert { .. }));
        batch.extend(kept);
        for append in refused {
            if let Some(done) = append.done {
                let _ = done.send(Err(Error::Full));
            }
        }
    }

    /// Why `needed` more bytes would eat into the reserve, or `None` when they fit (or the
    /// free space cannot be read: then the write itself reports a full volume).
    fn lacks_space(&self, needed: u64) -> Option<String> {
        let volume = Volume::of(&self.dir).ok()?;
        (volume.available < needed.saturating_add(self.reserve)).then(|| {
            format!(
                "spool volume is full: {} bytes free, {} needed and {} kept for status records",
                volume.available, needed, self.reserve
            )
        })
    }

    /// Out of space: when the active segment holds no live message, moves to a new one so
    /// this one can be deleted (it may be the only segment, on a volume it fills alone).
    /// Returns whether it moved.
    fn leave_finished_segment(&mut self) -> bool {
        let holds_live = lock(&self.index)
            .live
            .get(&self.segment)
            .is_some_and(|l| l.messages != 0);
        if holds_live || self.offset == 0 {
            return false;
        }
        let before = self.segment;
        self.open_next_segment();
        self.delete_finished_segments();
        self.segment != before
    }

    /// Turns each `Relocate` into a message record for the active segment, with the
    /// message's current envelope (pending or written), or into nothing when the message
    /// is gone (its `Done` came first) or already in the active segment.
    fn prepare_relocations(&mut self, batch: &mut [Append]) {
        for append in batch
            .iter_mut()
            .filter(|a| matches!(a.effect, Effect::Relocate))
        {
            append.effect = Effect::None;
            let (stored, pending) = {
                let index = lock(&self.index);
                (
                    index.messages.get(&append.id).copied(),
                    index.pending.get(&append.id).cloned(),
                )
            };
            let Some(stored) = stored.filter(|s| s.message.segment != self.segment) else {
                continue;
            };
            let read = read_at(&self.dir, stored.message).and_then(|content| {
                let envelope = match &pending {
                    Some(json) => json.to_vec(),
                    None => read_at(&self.dir, stored.envelope)?,
                };
                Ok((content, envelope))
            });
            match read {
                Ok((content, envelope)) => {
                    append.bytes = super::record::encode_message(append.id, &envelope, &[&content]);
                    append.effect = Effect::Insert {
                        envelope_len: envelope.len(),
                    };
                    append.submitted = pending;
                }
                Err(e) => {
                    tracing::warn!(queue_id = %append.id, error = %e, "spool: cannot relocate message");
                }
            }
        }
    }

    fn write_all(&mut self, batch: &[Append]) -> Result<(), SyncFailed> {
        for append in batch {
            self.file.write_all(&append.bytes).map_err(SyncFailed)?;
        }
        Ok(())
    }

    /// Updates the read index after a successful commit and deletes reclaimable segments.
    fn index_batch(&mut self, batch: &[Append], start: u64) {
        let mut index = lock(&self.index);
        let mut offset = start;
        for append in batch {
            let at = |start: usize, len: usize| Location {
                segment: self.segment,
                offset: (offset + start as u64) as u32,
                len: len as u32,
            };
            match append.effect {
                Effect::Insert { envelope_len } => {
                    let message_offset = super::record::message_offset(envelope_len);
                    let stored = Stored {
                        message: at(message_offset, append.bytes.len() - message_offset),
                        envelope: at(message_offset - envelope_len, envelope_len),
                    };
                    index.add(append.id, stored);
                    index.written(append.id, append.submitted.as_ref());
                }
                Effect::Update => {
                    let start = super::record::UPDATE_ENVELOPE_OFFSET;
                    let envelope = at(start, append.bytes.len() - start);
                    index.moved_envelope(append.id, envelope, append.submitted.as_ref());
                }
                Effect::Remove => index.remove(append.id),
                Effect::None | Effect::Relocate => {}
            }
            offset += append.bytes.len() as u64;
        }
        self.offset = offset;
        drop(index);
        self.delete_finished_segments();
    }

    /// Deletes the segments whose messages are all done (oldest first, never the active
    /// one) and closes their read handles, so their space is freed now.
    fn delete_finished_segments(&mut self) {
        let finished = lock(&self.index).take_finished(Some(self.segment));
        if finished.is_empty() {
            return;
        }
        super::delete_segments(&self.dir, &finished);
        // After the index no longer lists them: see `Spool::reader`.
        let mut readers = self.readers.lock().unwrap_or_else(|e| e.into_inner());
        for segment in &finished {
            readers.remove(segment);
        }
    }

    fn maybe_rotate(&mut self) {
        if self.offset >= self.segment_size {
            self.open_next_segment();
        }
    }

    fn recover_from_failure(&mut self, start: u64) {
        // Remove whatever part of the batch reached the file, so a later successful batch
        // is not preceded by records whose writers were told "failed".
        let truncated = self.file.set_len(start).is_ok()
            && std::io::Seek::seek(&mut self.file, std::io::SeekFrom::Start(start)).is_ok();
        if truncated {
            self.offset = start;
        } else {
            self.open_next_segment();
        }
    }

    fn open_next_segment(&mut self) {
        let next = self.segment + 1;
        match create_segment(&self.dir, next) {
            Ok(file) => {
                // Lazily written records of the old segment become durable now.
                if let Err(e) = self.file.sync_data() {
                    tracing::error!(error = %e, "spool: sync of full segment failed");
                }
                self.file = file;
                self.segment = next;
                self.offset = 0;
                lock(&self.index).live.insert(next, Default::default());
            }
            Err(e) => {
                // Keep appending to the current segment; the next rotation retries.
                tracing::error!(error = %e, segment = next, "spool: cannot create segment");
            }
        }
    }
}

/// An I/O error from appending or syncing a batch.
struct SyncFailed(std::io::Error);

fn create_segment(dir: &std::path::Path, segment: u32) -> std::io::Result<File> {
    let file = crate::files::open_private(
        OpenOptions::new().create_new(true).append(true),
        &segment_path(dir, segment),
    )?;
    // The new directory entry must be durable before records in it are acknowledged.
    File::open(dir)?.sync_all()?;
    Ok(file)
}

/// A message's bytes from its segment file.
fn read_at(dir: &std::path::Path, location: Location) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let file = File::open(segment_path(dir, location.segment))?;
    let mut buf = vec![0; location.len as usize];
    file.read_exact_at(&mut buf, u64::from(location.offset))?;
    Ok(buf)
}

fn lock(index: &Mutex<Index>) -> std::sync::MutexGuard<'_, Index> {
    index.lock().unwrap_or_else(|e| e.into_inner())
}
