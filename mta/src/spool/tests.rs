use super::*;
use crate::queue::{Diagnostic, Recipient, Status};

fn envelope(rcpt: &str) -> Envelope {
    Envelope {
        recipients: vec![Recipient::new(rcpt)],
        received_at: 1,
        ..Envelope::new(
            "a@sender.test",
            "127.0.0.1".parse().expect("ip"),
            "client.test",
        )
    }
}

#[tokio::test]
async fn store_read_remove_and_recover() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (spool, recovered) = Spool::open(dir.path(), 1 << 20).expect("open");
    assert!(recovered.is_empty());

    let mut ids = Vec::new();
    for i in 0..5 {
        let id = spool.next_id();
        let body = format!("Subject: {i}\r\n\r\nbody {i}\r\n");
        spool
            .store(
                id,
                &envelope(&format!("u{i}@x.test")),
                &[b"Received: x\r\n", body.as_bytes()],
            )
            .await
            .expect("store");
        ids.push(id);
    }
    assert_eq!(
        spool.read_message(ids[2]).await.expect("read"),
        b"Received: x\r\nSubject: 2\r\n\r\nbody 2\r\n"
    );
    spool.remove(ids[0]).await.expect("remove");
    let mut updated = envelope("u1@x.test");
    updated.recipients[0].status = Status::Deferred(Diagnostic {
        code: Some(451),
        enhanced: None,
        text: "try later".into(),
        class: None,
    });
    spool.update(ids[1], &updated).await.expect("update");
    drop(spool);

    let (spool, recovered) = Spool::open(dir.path(), 1 << 20).expect("reopen");
    let got: Vec<_> = recovered.iter().map(|r| r.id).collect();
    assert_eq!(got, ids[1..]);
    assert_eq!(
        recovered[0].envelope, updated,
        "the update survives a restart"
    );
    assert_eq!(
        spool.read_message(ids[4]).await.expect("read after reopen"),
        b"Received: x\r\nSubject: 4\r\n\r\nbody 4\r\n"
    );
    assert!(
        spool.next_id() > ids[4],
        "ids keep increasing across restarts"
    );
}

#[tokio::test]
async fn torn_tail_is_dropped_and_earlier_messages_survive() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (spool, _) = Spool::open(dir.path(), 1 << 20).expect("open");
    let id = spool.next_id();
    spool
        .store(id, &envelope("a@x.test"), &[b"whole\r\n"])
        .await
        .expect("store");
    drop(spool);

    // Simulate a crash in the middle of the next append: half a record at the tail.
    let segment = std::fs::read_dir(dir.path())
        .expect("list")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| segment_number(p).is_some())
        .expect("a segment");
    let torn = record::encode_message(QueueId(id.0 + 1), b"{}", &[b"never acknowledged"]);
    let mut data = std::fs::read(&segment).expect("read");
    let whole_len = data.len();
    data.extend_from_slice(&torn[..torn.len() / 2]);
    std::fs::write(&segment, &data).expect("write torn tail");

    let (spool, recovered) = Spool::open(dir.path(), 1 << 20).expect("reopen");
    assert_eq!(recovered.len(), 1);
    assert_eq!(recovered[0].id, id);
    assert_eq!(spool.read_message(id).await.expect("read"), b"whole\r\n");
    assert_eq!(
        std::fs::metadata(&segment).expect("stat").len() as usize,
        whole_len,
        "torn tail truncated"
    );
}

#[tokio::test]
async fn finished_segments_are_deleted_oldest_first() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Tiny segments: every message rotates to a new one.
    let (spool, _) = Spool::open(dir.path(), 1).expect("open");
    let mut ids = Vec::new();
    for _ in 0..4 {
        let id = spool.next_id();
        spool
            .store(id, &envelope("a@x.test"), &[b"m\r\n"])
            .await
            .expect("store");
        ids.push(id);
    }
    assert_eq!(
        segments(dir.path())[..4],
        [1, 2, 3, 4],
        "one segment per message"
    );
    // Finishing a newer message first must not delete its segment while an older one lives.
    spool.remove(ids[1]).await.expect("remove");
    assert!(segments(dir.path()).contains(&2));
    spool.remove(ids[0]).await.expect("remove");
    let left = segments(dir.path());
    assert!(!left.contains(&1) && !left.contains(&2), "{left:?}");
    assert!(left.contains(&3) && left.contains(&4), "{left:?}");
    drop(spool);
    let (_, recovered) = Spool::open(dir.path(), 1).expect("reopen");
    let got: Vec<_> = recovered.iter().map(|r| r.id).collect();
    assert_eq!(got, ids[2..]);
}

#[tokio::test]
async fn concurrent_stores_share_syncs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (spool, _) = Spool::open(dir.path(), 64 << 20).expect("open");
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let spool = spool.clone();
            tokio::spawn(async move {
                let id = spool.next_id();
                spool
                    .store(id, &envelope("a@x.test"), &[format!("m{i}\r\n").as_bytes()])
                    .await
                    .map(|()| id)
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("join").expect("store");
    }
    assert_eq!(spool.len(), 200);
}

fn segments(dir: &Path) -> Vec<u32> {
    let mut numbers: Vec<u32> = std::fs::read_dir(dir)
        .expect("list")
        .filter_map(|e| e.ok())
        .filter_map(|e| segment_number(&e.path()))
        .collect();
    numbers.sort_unstable();
    numbers
}

/// Stores `n` messages with `body`, one recipient each, and returns their ids in order.
async fn store_many(spool: &Spool, n: usize, body: &[u8]) -> Vec<QueueId> {
    let mut ids = Vec::new();
    for i in 0..n {
        let id = spool.next_id();
        spool
            .store(id, &envelope(&format!("u{i}@x.test")), &[body])
            .await
            .expect("store");
        ids.push(id);
    }
    ids
}

/// A straggler in an old segment is relocated: the old segments are deleted, the message
/// keeps its id, content and latest envelope across a restart, and a message removed
/// before its relocation is processed stays removed.
#[tokio::test]
async fn compaction_relocates_stragglers_and_frees_old_segments() {
    let dir = tempfile::tempdir().expect("tempdir");
    let segment_size = 4096;
    let (spool, _) = Spool::open(dir.path(), segment_size).expect("open");
    let body = vec![b'x'; 1000];
    let ids = store_many(&spool, 40, &body).await;
    assert!(
        spool.compaction_candidates(100).is_empty(),
        "all live: nothing to gain"
    );
    // Everything is delivered but the first two messages (both in the first segment).
    let (straggler, removed_late) = (ids[0], ids[1]);
    for &id in &ids[2..] {
        spool.remove(id).await.expect("remove");
    }
    let segments_before = spool.segment_count();
    let mut candidates = spool.compaction_candidates(100);
    candidates.sort();
    assert_eq!(candidates, vec![straggler, removed_late]);

    let mut latest = envelope("u0@x.test");
    latest.attempts = 7;
    spool.update_detached(straggler, &latest);
    spool.relocate_detached(straggler);
    // Its Done is queued before its relocation is processed: the relocation is dropped.
    spool.remove(removed_late).await.expect("remove");
    spool.relocate_detached(removed_late);
    // A synced record behind both: when it returns, they have been handled.
    let marker = spool.next_id();
    spool
        .store(marker, &envelope("m@x.test"), &[b"marker"])
        .await
        .expect("store");

    assert!(
        spool.segment_count() < segments_before,
        "old segments deleted ({} -> {})",
        segments_before,
        spool.segment_count()
    );
    assert_eq!(spool.read_message(straggler).await.expect("read"), body);
    assert!(spool.compaction_candidates(100).is_empty());
    drop(spool);

    let (spool, recovered) = Spool::open(dir.path(), segment_size).expect("reopen");
    let got: Vec<_> = recovered.iter().map(|r| r.id).collect();
    assert_eq!(got, vec![straggler, marker]);
    assert_eq!(
        recovered[0].envelope, latest,
        "the relocated copy's envelope wins"
    );
    assert_eq!(spool.read_message(straggler).await.expect("read"), body);
}

/// A crash after a relocation was synced but before the old segments' deletion reached the
/// disk: both copies are on disk at start-up, and recovery keeps exactly one message, the
/// relocated copy with its newer envelope.
#[tokio::test]
async fn recovery_after_a_relocation_whose_old_segments_survived() {
    let dir = tempfile::tempdir().expect("tempdir");
    let segment_size = 4096;
    let (spool, _) = Spool::open(dir.path(), segment_size).expect("open");
    let body = vec![b'y'; 1000];
    let ids = store_many(&spool, 40, &body).await;
    for &id in &ids[1..] {
        spool.remove(id).await.expect("remove");
    }
    // The old segments as they are before compaction deletes them.
    let saved: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(dir.path())
        .expect("dir")
        .map(|e| e.expect("entry").path())
        .map(|p| {
            let data = std::fs::read(&p).expect("read");
            (p, data)
        })
        .collect();
    let mut latest = envelope("u0@x.test");
    latest.attempts = 3;
    spool.update_detached(ids[0], &latest);
    spool.relocate_detached(ids[0]);
    let marker = spool.next_id();
    spool
        .store(marker, &envelope("m@x.test"), &[b"marker"])
        .await
        .expect("store");
    drop(spool);
    // The deletions are lost; the relocated copy (synced) is not.
    for (path, data) in &saved {
        if !path.exists() {
            std::fs::write(path, data).expect("restore");
        }
    }

    let (spool, recovered) = Spool::open(dir.path(), segment_size).expect("reopen");
    let got: Vec<_> = recovered.iter().map(|r| r.id).collect();
    assert_eq!(
        got,
        vec![ids[0], marker],
        "one copy, no resurrected messages"
    );
    assert_eq!(recovered[0].envelope, latest);
    assert_eq!(spool.read_message(ids[0]).await.expect("read"), body);
    // And the next compaction can clean up what the crash left.
    assert_eq!(spool.len(), 2);
}

/// Issue 13, item 5: the segment size follows the volume, and the reserve for status
/// records is a small part of it.
#[test]
fn segment_size_and_reserve_follow_the_volume() {
    const MIB: u64 = 1024 * 1024;
    let cases = [
        // (configured, volume size, segment size, reserve)
        (64 * MIB, 32 * MIB, 4 * MIB, MIB),
        (64 * MIB, 3 * MIB, 384 * 1024, 96 * 1024),
        (64 * MIB, 100 * 1024, 64 * 1024, 3200),
        (64 * MIB, 10 * 1024 * MIB, 64 * MIB, 16 * MIB),
        (MIB, 32 * MIB, MIB, MIB),
        (64 * MIB, 0, 64 * MIB, 0),
    ];
    for (configured, volume, segment, reserve) in cases {
        assert_eq!(
            (segment_size_for(configured, volume), reserve_for(volume)),
            (segment, reserve),
            "configured {configured}, volume {volume}"
        );
    }
}

/// Issue 13, item 5: segments whose messages were all done before a restart are deleted
/// when the spool opens, before anything is written (on a full volume the first write
/// fails, and deletion used to wait for one that succeeded).
#[tokio::test]
async fn finished_segments_are_deleted_at_start_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (spool, _) = Spool::open(dir.path(), 1 << 20).expect("open");
    let ids = store_many(&spool, 3, b"m\r\n").await;
    for id in ids {
        spool.remove(id).await.expect("remove");
    }
    assert_eq!(segments(dir.path()), [1], "the active segment stays");
    drop(spool);
    let (spool, recovered) = Spool::open(dir.path(), 1 << 20).expect("reopen");
    assert!(recovered.is_empty());
    assert_eq!(segments(dir.path()), [2], "only the new active segment");
    assert_eq!(spool.segment_count(), 1);
}

/// Issue 13, item 5: deleting a segment closes its read handle, so its space is freed now,
/// not when another segment is first read.
#[tokio::test]
async fn deleted_segments_are_closed() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Tiny segments: every message rotates to a new one.
    let (spool, _) = Spool::open(dir.path(), 1).expect("open");
    let ids = store_many(&spool, 2, b"m\r\n").await;
    spool.read_message(ids[0]).await.expect("read");
    assert_eq!(spool.open_readers(), 1);
    spool.remove(ids[0]).await.expect("remove");
    assert!(!segments(dir.path()).contains(&1), "segment 1 deleted");
    assert_eq!(spool.open_readers(), 0, "and its handle closed");
    let deleted_but_open: Vec<_> = std::fs::read_dir("/proc/self/fd")
        .expect("fds")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.starts_with(dir.path()))
        .filter(|target| target.to_string_lossy().ends_with(" (deleted)"))
        .collect();
    assert!(deleted_but_open.is_empty(), "{deleted_but_open:?}");
}

/// A tmpfs of `size` bytes mounted on a fresh directory, unmounted on drop. `None` (the
/// test skips) when this process may not mount (not root).
struct SmallVolume {
    dir: tempfile::TempDir,
}

impl SmallVolume {
    fn mount(size: u64) -> Option<SmallVolume> {
        let dir = tempfile::tempdir().expect("tempdir");
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .ok()?;
        if !status.success() {
            eprintln!("SKIPPED: cannot mount a tmpfs (needs root)");
            return None;
        }
        Some(SmallVolume { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for SmallVolume {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Issue 13, item 5: on a volume that other files have nearly filled, the spool fills,
/// its messages are done, and it accepts again without a restart: a message refused for
/// space makes the writer leave the active segment, which holds no live message, so that
/// segment is deleted. The `Done` records fit in the reserve.
#[tokio::test]
async fn a_full_volume_accepts_again_once_its_messages_are_done() {
    let Some(volume) = SmallVolume::mount(4 << 20) else {
        return;
    };
    // Other data leaves 400 KiB, less than one segment (an eighth of 4 MiB): the active
    // segment fills the volume alone.
    std::fs::write(
        volume.path().join("filler"),
        vec![0u8; (4 << 20) - (400 << 10)],
    )
    .expect("filler");
    let dir = volume.path().join("spool");
    let (spool, _) = Spool::open(&dir, 64 << 20).expect("open");
    let body = vec![b'x'; 64 * 1024];
    let mut ids = Vec::new();
    let refusal = loop {
        let id = spool.next_id();
        match spool.store(id, &envelope("a@x.test"), &[&body]).await {
            Ok(()) => ids.push(id),
            Err(e) => break e,
        }
        assert!(ids.len() < 100, "400 KiB cannot hold 6 MiB");
    };
    assert!(matches!(refusal, Error::Full), "{refusal:?}");
    assert!(spool.healthy().is_err());
    assert!(ids.len() >= 2, "only {} messages fit", ids.len());
    assert_eq!(spool.segment_count(), 1, "all in the active segment");
    for &id in &ids {
        spool
            .remove(id)
            .await
            .expect("a Done record fits in the reserve");
    }
    let mut accepted = 0;
    for _ in 0..2 * ids.len() {
        let id = spool.next_id();
        if spool
            .store(id, &envelope("a@x.test"), &[&body])
            .await
            .is_ok()
        {
            accepted += 1;
            spool.remove(id).await.expect("remove");
        }
    }
    assert_eq!(
        accepted,
        2 * ids.len(),
        "accepted {accepted} of {} after the drain",
        2 * ids.len()
    );
    assert!(spool.healthy().is_ok());
}

#[tokio::test]
async fn a_spool_has_one_owner_at_a_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (spool, _) = Spool::open(dir.path(), 1 << 20).expect("open");
    let id = spool.next_id();
    spool
        .store(id, &envelope("u@x.test"), &[b"Subject: kept\r\n\r\nx\r\n"])
        .await
        .expect("store");
    // A second MTA on the same volume (a pod and the Job draining it) is refused, and
    // says why, before it reads or writes anything.
    match Spool::open(dir.path(), 1 << 20) {
        Err(e @ Error::InUse { .. }) => {
            let said = e.to_string();
            assert!(said.contains("in use by another petrel-mta"), "{said}");
            assert!(said.contains(LOCK_FILE), "{said}");
        }
        Err(e) => panic!("expected InUse, got {e}"),
        Ok(_) => panic!("two owners of one spool"),
    }
    // The first owner is unharmed, and once it closes the spool the next one gets it.
    assert_eq!(spool.len(), 1);
    drop(spool);
    let (_again, recovered) = Spool::open(dir.path(), 1 << 20).expect("reopen after close");
    assert_eq!(recovered.len(), 1);
}

/// A segment written before statuses were typed (`{"state": ..., "detail": "550 5.1.1
/// ..."}`, captured from that version: a `Message` record, then an `Update` with every kind
/// of status) loads into typed diagnostics whose one-line form is the old detail.
#[tokio::test]
async fn a_spool_from_before_typed_statuses_loads() {
    /// Address, state, reply code, enhanced code, one-line diagnostic, remote MTA.
    type Row<'a> = (
        &'a str,
        &'a str,
        Option<u16>,
        Option<[u8; 3]>,
        String,
        Option<&'a str>,
    );
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("0000000001.seg"),
        include_bytes!("testdata/status_detail_v1.seg"),
    )
    .expect("write segment");
    let (spool, recovered) = Spool::open(dir.path(), 1 << 20).expect("open");
    assert_eq!(recovered.len(), 1);
    let message = &recovered[0];
    assert_eq!(message.id, QueueId(0x0006_5F0A_1B2C_3D4E));
    let got: Vec<Row> = message
        .envelope
        .recipients
        .iter()
        .map(|r| {
            let d = r.status.diagnostic();
            (
                r.address.as_str(),
                r.status.state(),
                d.and_then(|d| d.code),
                d.and_then(|d| d.enhanced),
                d.map(ToString::to_string).unwrap_or_default(),
                r.remote_mta.as_deref(),
            )
        })
        .collect();
    let expected: Vec<Row> = vec![
        (
            "bob@remote.test",
            "failed",
            Some(550),
            Some([5, 1, 1]),
            "550 5.1.1 <bob@remote.test>: Recipient address rejected: User unknown".into(),
            Some("mx1.remote.test"),
        ),
        (
            "carol@remote.test",
            "deferred",
            Some(451),
            Some([4, 7, 1]),
            "451 4.7.1 Greylisted, please try again later".into(),
            Some("mx1.remote.test"),
        ),
        (
            "dave@remote.test",
            "delivered",
            Some(250),
            Some([2, 0, 0]),
            "250 2.0.0 Ok: queued as 4XyZ".into(),
            Some("mx2.remote.test"),
        ),
        (
            "erin@remote.test",
            "deferred",
            Some(451),
            Some([4, 4, 0]),
            "451 4.4.0 cannot connect to 192.0.2.9:25: Connection refused (os error 111)".into(),
            None,
        ),
        (
            "frank@remote.test",
            "failed",
            None,
            Some([5, 4, 7]),
            "5.4.7 message expired: delivery time limit exceeded (last attempt: 421 too busy)"
                .into(),
            None,
        ),
        (
            "gina@remote.test",
            "failed",
            Some(550),
            None,
            "550 no enhanced code here".into(),
            None,
        ),
        (
            "hal@remote.test",
            "scheduled",
            None,
            None,
            String::new(),
            None,
        ),
    ];
    assert_eq!(got, expected);
    assert_eq!(message.envelope.attempts, 3);
    assert_eq!(
        spool.read_message(message.id).await.expect("read"),
        b"Subject: old\r\n\r\nold spool\r\n"
    );
}

/// Issue 17: the spool, not the scheduler's memory, has a queued message's envelope. It
/// answers the last one submitted, before the writer has written it and after; after a
/// restart (the index rebuilt without reading any envelope) the latest one on disk; and
/// `ids_after` pages through the queue in id order.
#[tokio::test]
async fn envelope_is_the_latest_submitted_before_and_after_writing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (spool, _) = Spool::open(dir.path(), 1 << 20).expect("open");
    let ids = store_many(&spool, 5, b"body").await;
    assert_eq!(
        spool.envelope(ids[2]).expect("stored"),
        envelope("u2@x.test")
    );
    let mut changed = envelope("u2@x.test");
    for attempt in 1..=20 {
        changed.attempts = attempt;
        // Detached: not yet written when read back, most of the time.
        spool.update_detached(ids[2], &changed);
        assert_eq!(spool.envelope(ids[2]).expect("pending"), changed);
    }
    spool.sync().await.expect("sync");
    assert_eq!(spool.envelope(ids[2]).expect("written"), changed);
    assert!(
        spool.inner.index.lock().expect("index").pending.is_empty(),
        "written envelopes leave the pending map"
    );
    spool.remove(ids[4]).await.expect("remove");
    assert!(matches!(spool.envelope(ids[4]), Err(Error::NotFound(_))));
    assert_eq!(spool.ids_after(None, 2), vec![ids[0], ids[1]]);
    assert_eq!(spool.ids_after(Some(ids[1]), 10), vec![ids[2], ids[3]]);
    assert_eq!(spool.last_id(), Some(ids[3]));
    drop(spool);

    let spool = Spool::open_observed(dir.path(), 1 << 20, None).expect("reopen");
    assert_eq!(spool.len(), 4);
    assert_eq!(spool.envelope(ids[2]).expect("after restart"), changed);
    assert_eq!(
        spool.envelope(ids[0]).expect("never updated"),
        envelope("u0@x.test")
    );
}
