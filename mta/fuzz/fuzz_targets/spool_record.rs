//! Spool segment recovery on arbitrary bytes.
//!
//! The record decoder (`mta::spool::record`) is private, so this goes through the public
//! API instead: the input is written as segment `0000000001.seg` of an empty spool
//! directory and `Spool::open` recovers it (decode, checksum, torn-tail truncation, envelope
//! JSON, the index of message locations), then every recovered message is read back.
//!
//! Asserted, against an independent model of the documented record format
//! (`magic "PTRL" | kind | len u32 LE | crc32(kind+payload) | payload`):
//! * `Spool::open` fails only with `Error::Corrupt`, and exactly when the model finds a bad
//!   envelope JSON before the first invalid record;
//! * otherwise the recovered ids and envelopes and every message's bytes (via
//!   `read_message`) are what the model says, and the segment file was cut to exactly the
//!   valid prefix of whole records.
//!
//! Files are slow to fuzz compared with a pure decoder, but on tmpfs this still runs at
//! a few thousand inputs per second.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mta::queue::{Envelope, QueueId};
use mta::spool::{Error, Spool};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::OnceLock;

struct Harness {
    rt: tokio::runtime::Runtime,
    dir: PathBuf,
}

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let base = std::env::var_os("PETREL_FUZZ_TMP")
            .map(PathBuf::from)
            .or_else(|| {
                let shm = PathBuf::from("/dev/shm");
                shm.is_dir().then_some(shm)
            })
            .unwrap_or_else(std::env::temp_dir);
        let dir = base.join(format!("petrel-fuzz-spool-{}", std::process::id()));
        extern "C" fn cleanup() {
            if let Some(h) = HARNESS.get() {
                let _ = std::fs::remove_dir_all(&h.dir);
            }
        }
        // SAFETY: registering a plain `extern "C" fn()` with atexit.
        unsafe {
            libc_atexit(cleanup);
        }
        Harness {
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime"),
            dir,
        }
    })
}

unsafe extern "C" {
    #[link_name = "atexit"]
    fn libc_atexit(f: extern "C" fn()) -> i32;
}

/// What recovery should find.
enum Model {
    /// Bad envelope JSON in a record before the first invalid one.
    Corrupt,
    Recovered {
        /// Length of the valid prefix (the file is truncated to it).
        valid: usize,
        messages: BTreeMap<u64, (Envelope, Vec<u8>)>,
    },
}

fn model(data: &[u8]) -> Model {
    let mut messages: BTreeMap<u64, (Envelope, Vec<u8>)> = BTreeMap::new();
    let mut offset = 0;
    loop {
        let rest = &data[offset..];
        if rest.len() < 13 || rest[..4] != *b"PTRL" || !(1..=3).contains(&rest[4]) {
            break;
        }
        let kind = rest[4];
        let len = u32::from_le_bytes(rest[5..9].try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(rest[9..13].try_into().unwrap());
        if rest.len() - 13 < len {
            break;
        }
        let payload = &rest[13..13 + len];
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&[kind]);
        hasher.update(payload);
        if hasher.finalize() != crc || len < 8 {
            break;
        }
        let id = u64::from_le_bytes(payload[..8].try_into().unwrap());
        let body = &payload[8..];
        match kind {
            1 => {
                if body.len() < 4 {
                    break;
                }
                let env_len = u32::from_le_bytes(body[..4].try_into().unwrap()) as usize;
                if body.len() - 4 < env_len {
                    break;
                }
                let Ok(envelope) = serde_json::from_slice::<Envelope>(&body[4..4 + env_len])
                else {
                    return Model::Corrupt;
                };
                messages.insert(id, (envelope, body[4 + env_len..].to_vec()));
            }
            2 => {
                if let Some(entry) = messages.get_mut(&id) {
                    let Ok(envelope) = serde_json::from_slice::<Envelope>(body) else {
                        return Model::Corrupt;
                    };
                    entry.0 = envelope;
                }
            }
            _ => {
                messages.remove(&id);
            }
        }
        offset += 13 + len;
    }
    Model::Recovered {
        valid: offset,
        messages,
    }
}

fuzz_target!(|data: &[u8]| {
    let h = harness();
    let _ = std::fs::remove_dir_all(&h.dir);
    std::fs::create_dir_all(&h.dir).expect("spool dir");
    let segment = h.dir.join("0000000001.seg");
    std::fs::write(&segment, data).expect("write segment");

    let expected = model(data);
    let opened = Spool::open(&h.dir, 1 << 20);
    let (spool, recovered) = match (opened, &expected) {
        (Err(Error::Corrupt { .. }), Model::Corrupt) => return,
        (Err(e), Model::Corrupt) => panic!("expected Corrupt, got {e:?}"),
        (Err(e), Model::Recovered { .. }) => panic!("recovery failed: {e:?}"),
        (Ok(_), Model::Corrupt) => panic!("a record with a bad envelope was accepted"),
        (Ok(ok), Model::Recovered { .. }) => ok,
    };
    let Model::Recovered { valid, messages } = expected else {
        unreachable!()
    };
    let on_disk = std::fs::read(&segment).expect("read segment back");
    assert_eq!(on_disk.len(), valid, "segment not cut to its valid prefix");
    assert_eq!(&on_disk[..], &data[..valid]);
    let ids: Vec<u64> = recovered.iter().map(|r| r.id.0).collect();
    let want: Vec<u64> = messages.keys().copied().collect();
    assert_eq!(ids, want, "recovered ids");
    assert_eq!(spool.len(), messages.len(), "index size");
    for r in &recovered {
        let (envelope, bytes) = &messages[&r.id.0];
        assert_eq!(&r.envelope, envelope, "envelope of {}", r.id);
        let read = h
            .rt
            .block_on(spool.read_message(QueueId(r.id.0)))
            .unwrap_or_else(|e| panic!("read_message({}) failed: {e}", r.id));
        assert_eq!(&read, bytes, "message bytes of {}", r.id);
    }
    // A fresh id is above every recovered one.
    if let Some(max) = ids.iter().max() {
        assert!(spool.next_id().0 > *max);
    }
});
