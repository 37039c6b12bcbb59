//! The token every pod of a fleet shares (`admin.fleet_token_file`, a mounted Secret): what
//! `/admin/drain` and `/admin/handoff` require as `Authorization: Bearer …`, and what a
//! draining pod presents to its peers.
//!
//! The file is read at first use and again whenever it changes (inode, size or
//! modification time, following symlinks: the kubelet updates a Secret by swapping a
//! symlink), so a rotated token applies without a restart. The file named by the config
//! in force is used, so a config reload that sets or moves it applies too.
//!
//! Never: logs the token; accepts an empty token; compares in variable time.

use crate::files::{Stamp, stamp};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Why a request is not let in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// `admin.fleet_token_file` is not set: the endpoints do not exist (404).
    NotConfigured,
    /// Missing or wrong token, or no usable token file (401).
    Unauthorised,
}

/// The fleet token, read from its file as it changes.
#[derive(Default)]
pub struct FleetToken {
    cached: Mutex<Option<Cached>>,
}

struct Cached {
    path: PathBuf,
    stamp: Option<Stamp>,
    token: Option<Arc<str>>,
}

impl std::fmt::Debug for FleetToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FleetToken(…)")
    }
}

impl FleetToken {
    /// The token in `path` now; `None` when the file cannot be read or is empty.
    pub fn current(&self, path: &Path) -> Option<Arc<str>> {
        let now = stamp(path);
        let mut cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = cached.as_ref()
            && c.path == path
            && c.stamp == now
            && now.is_some()
        {
            return c.token.clone();
        }
        let token = match std::fs::read_to_string(path) {
            Ok(text) if !text.trim().is_empty() => Some(Arc::from(text.trim())),
            Ok(_) => {
                tracing::warn!(file = %path.display(), "admin.fleet_token_file is empty: fleet requests refused");
                None
            }
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "admin.fleet_token_file cannot be read: fleet requests refused");
                None
            }
        };
        *cached = Some(Cached {
            path: path.to_owned(),
            stamp: now,
            token: token.clone(),
        });
        token
    }

    /// Whether a request with this `Authorization` header value may use the fleet
    /// endpoints, the token file being `file` (from the config in force).
    pub fn admit(&self, file: Option<&Path>, authorization: Option<&[u8]>) -> Result<(), Refusal> {
        let file = file.ok_or(Refusal::NotConfigured)?;
        let token = self.current(file).ok_or(Refusal::Unauthorised)?;
        let given = authorization
            .and_then(|value| value.strip_prefix(b"Bearer "))
            .ok_or(Refusal::Unauthorised)?;
        use subtle::ConstantTimeEq;
        match bool::from(token.as_bytes().ct_eq(given)) {
            true => Ok(()),
            false => Err(Refusal::Unauthorised),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_the_current_token_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("token");
        let token = FleetToken::default();
        let admit = |header: Option<&str>| token.admit(Some(&file), header.map(str::as_bytes));
        assert_eq!(
            token.admit(None, Some(b"Bearer x")),
            Err(Refusal::NotConfigured)
        );
        assert_eq!(
            admit(Some("Bearer s3cret")),
            Err(Refusal::Unauthorised),
            "no file"
        );
        std::fs::write(&file, "s3cret\n").expect("write");
        assert_eq!(admit(Some("Bearer s3cret")), Ok(()));
        for wrong in [
            None,
            Some("s3cret"),
            Some("Bearer s3cre"),
            Some("Bearer s3cret2"),
            Some("Basic s3cret"),
            Some("Bearer "),
        ] {
            assert_eq!(admit(wrong), Err(Refusal::Unauthorised), "{wrong:?}");
        }
        // The Secret is updated the kubelet way: a new file renamed over the old one.
        let next = dir.path().join("token.new");
        std::fs::write(&next, "rotated").expect("write");
        std::fs::rename(&next, &file).expect("rename");
        assert_eq!(admit(Some("Bearer s3cret")), Err(Refusal::Unauthorised));
        assert_eq!(admit(Some("Bearer rotated")), Ok(()));
        std::fs::write(&file, "  \n").expect("write");
        assert_eq!(
            admit(Some("Bearer ")),
            Err(Refusal::Unauthorised),
            "empty token"
        );
    }
}
