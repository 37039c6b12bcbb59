//! Local delivery into Maildirs (the `tmp` → `new` protocol).
//!
//! A message for recipient number `index` of queue id `ID` is written to
//! `<root>/<mailbox>/tmp/ID.index.<host>`, fsynced, hard-linked into `new/` under the same
//! name, and the `new/` directory is fsynced before delivery is reported. Because the name
//! is derived from the queue id, a redelivery after a crash finds the link already there
//! (`EEXIST`) and does not create a second copy. (If the user has meanwhile moved the
//! message to `cur/`, a redelivery would be a second copy; this only happens when the MTA
//! crashed between delivering and recording it.)

use crate::queue::QueueId;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};

/// Result of one Maildir delivery.
#[derive(Debug, PartialEq, Eq)]
pub enum Delivered {
    /// The message is now in `new/`.
    New(PathBuf),
    /// An earlier attempt had already delivered it (redelivery after a crash).
    AlreadyThere(PathBuf),
}

/// The Maildir folder for a local part: lower-cased, `+detail` removed, or `None` when the
/// local part is not safe to use as a directory name.
pub fn mailbox_name(local_part: &str) -> Option<String> {
    let base = local_part.split('+').next().unwrap_or(local_part);
    let lower = base.to_ascii_lowercase();
    mta_config::is_maildir_safe_local_part(&lower).then_some(lower)
}

/// Delivers `message` into `root/mailbox`, with a `Return-Path:` header naming the
/// envelope sender first (RFC 5321 §4.4: added at final delivery). Blocking: call from a
/// blocking thread.
pub fn deliver(
    root: &Path,
    mailbox: &str,
    id: QueueId,
    index: usize,
    hostname: &str,
    sender: &str,
    message: &[u8],
) -> std::io::Result<Delivered> {
    let maildir = root.join(mailbox);
    for sub in ["tmp", "new", "cur"] {
        crate::files::create_private_dir_all(&maildir.join(sub))?;
    }
    let host: String = hostname
        .chars()
        .map(|c| if c == '/' || c == ':' { '_' } else { c })
        .collect();
    let name = format!("{id}.{index}.{host}");
    let tmp = maildir.join("tmp").join(&name);
    let new = maildir.join("new").join(&name);

    let mut file = crate::files::open_private(
        OpenOptions::new().write(true).create(true).truncate(true),
        &tmp,
    )?;
    file.write_all(format!("Return-Path: <{sender}>\r\n").as_bytes())?;
    file.write_all(message)?;
    file.sync_all()?;
    drop(file);

    let outcome = match fs::hard_link(&tmp, &new) {
        Ok(()) => Delivered::New(new),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Delivered::AlreadyThere(new),
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
    };
    File::open(maildir.join("new"))?.sync_all()?;
    fs::remove_file(&tmp)?;
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivers_once_even_when_repeated() {
        let root = tempfile::tempdir().expect("tempdir");
        let id = QueueId(0xABC);
        let first = deliver(
            root.path(),
            "alice",
            id,
            0,
            "mx.test",
            "s@x.test",
            b"m1\r\n",
        )
        .expect("deliver");
        let Delivered::New(path) = first else {
            panic!("first delivery must be new: {first:?}")
        };
        assert_eq!(
            fs::read(&path).expect("read"),
            b"Return-Path: <s@x.test>\r\nm1\r\n"
        );
        let again = deliver(
            root.path(),
            "alice",
            id,
            0,
            "mx.test",
            "s@x.test",
            b"m1\r\n",
        )
        .expect("again");
        assert_eq!(again, Delivered::AlreadyThere(path));
        let entries = fs::read_dir(root.path().join("alice/new"))
            .expect("ls")
            .count();
        assert_eq!(entries, 1);
        let tmp_left = fs::read_dir(root.path().join("alice/tmp"))
            .expect("ls")
            .count();
        assert_eq!(tmp_left, 0);
    }

    #[test]
    fn mailbox_names() {
        assert_eq!(mailbox_name("Alice+news").as_deref(), Some("alice"));
        assert_eq!(mailbox_name("a.b-c_d").as_deref(), Some("a.b-c_d"));
        assert_eq!(mailbox_name("../x"), None);
        assert_eq!(mailbox_name("a/b"), None);
        assert_eq!(mailbox_name("a%b"), None);
        assert_eq!(mailbox_name(""), None);
    }
}
