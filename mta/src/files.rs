//! Files and directories only the MTA's user may read: spool segments, Maildir messages
//! and the AUTH users file hold mail and password hashes (issue 13, item 8).
//!
//! Files are created 0600 and directories 0700 whatever the process umask: the mode is
//! given at creation (the umask can only take bits away) and set again on the open file
//! or new directory, which the umask does not touch. Existing directories keep their
//! mode: an operator may have opened one up on purpose.
//!
//! [`stamp`] is how hot-reloaded files (config, certificates, tokens) notice a change.

use std::fs::{DirBuilder, File, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

pub const FILE_MODE: u32 = 0o600;
pub const DIR_MODE: u32 = 0o700;

/// `create_dir_all` with every directory it creates 0700.
pub fn create_private_dir_all(path: &Path) -> io::Result<()> {
    if path.is_dir() {
        return Ok(());
    }
    if let Some(parent) = path.parent()
        && !parent.as_os_str().is_empty()
    {
        create_private_dir_all(parent)?;
    }
    match DirBuilder::new().mode(DIR_MODE).create(path) {
        Ok(()) => std::fs::set_permissions(path, Permissions::from_mode(DIR_MODE)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => Ok(()),
        Err(e) => Err(e),
    }
}

/// Opens `options` (which must create the file) with mode 0600, and makes sure of it.
pub fn open_private(options: &mut OpenOptions, path: &Path) -> io::Result<File> {
    let file = options.mode(FILE_MODE).open(path)?;
    file.set_permissions(Permissions::from_mode(FILE_MODE))?;
    Ok(file)
}

/// Replaces `path` with `bytes`, durably: written to a temporary file (0600), synced,
/// renamed over `path`, and the directory synced, so after a crash `path` is either the
/// old file (or absent) or the new one whole.
pub fn replace_durably(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(".new");
    let temporary = path.with_file_name(name);
    match std::fs::remove_file(&temporary) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut file = open_private(OpenOptions::new().write(true).create_new(true), &temporary)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&temporary, path)?;
    sync_parent(path)
}

/// Removes `path` durably (the directory synced); a missing file is not an error.
pub fn remove_durably(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => sync_parent(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Syncs the directory holding `path`, so a file created, renamed or removed there stays
/// so after a crash.
pub fn sync_parent(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

/// A file's identity as far as reloading goes: a changed device, inode, size or
/// modification time means "read it again". A Kubernetes Secret or ConfigMap mount is
/// replaced by a symlink swap, which changes the inode seen through the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    device: u64,
    inode: u64,
    len: u64,
    modified: i64,
    modified_ns: i64,
}

/// The [`Stamp`] of `path` (following symlinks), or `None` when it cannot be read.
pub fn stamp(path: &Path) -> Option<Stamp> {
    let meta = std::fs::metadata(path).ok()?;
    Some(Stamp {
        device: meta.dev(),
        inode: meta.ino(),
        len: meta.len(),
        modified: meta.mtime(),
        modified_ns: meta.mtime_nsec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durable_replace_and_remove() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("marker");
        replace_durably(&path, b"one").expect("write");
        replace_durably(&path, b"two").expect("replace");
        assert_eq!(std::fs::read(&path).expect("read"), b"two");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, FILE_MODE);
        assert!(!dir.path().join("marker.new").exists());
        remove_durably(&path).expect("remove");
        assert!(!path.exists());
        remove_durably(&path).expect("already gone");
    }

    #[test]
    fn modes_are_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let deep = dir.path().join("a/b/c");
        create_private_dir_all(&deep).expect("mkdir");
        for d in ["a", "a/b", "a/b/c"] {
            let mode = std::fs::metadata(dir.path().join(d))
                .expect("stat")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, DIR_MODE, "{d}");
        }
        create_private_dir_all(&deep).expect("exists already");
        let file = deep.join("f");
        open_private(OpenOptions::new().write(true).create_new(true), &file).expect("open");
        let mode = std::fs::metadata(&file).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, FILE_MODE);
    }
}
