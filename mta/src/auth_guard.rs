//! The AUTH guard: whether AUTH is available, whether a source may try a password now,
//! and the password checks themselves, bounded in number (each Argon2 check holds its
//! memory cost, 19 MiB by default) and granted in arrival order.
//!
//! Owns the credentials, the failure counts ([`AuthFailures`]) and the check permits. It
//! never speaks SMTP: the session maps its answers to replies, and its tarpit and
//! per-session failure limit stay in the session.

use crate::limits::AuthFailures;
use crate::users::{MAX_CONCURRENT_CHECKS, User, Users};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

/// Longest wait for a password-check permit before the client is told to come back
/// (`454 4.7.0`).
const MAX_CHECK_QUEUE_WAIT: Duration = Duration::from_secs(60);

pub struct AuthGuard {
    /// AUTH credentials, when `smtpd.auth_users_file` is set.
    users: Option<Arc<Users>>,
    /// Recent AUTH failures per source and per source and user.
    failures: AuthFailures,
    /// Password checks running at once: taken before the check starts, granted in arrival
    /// order (tokio's semaphore is fair).
    checks: Arc<Semaphore>,
}

/// Why a password check did not authenticate.
#[derive(Debug, PartialEq, Eq)]
pub enum AuthRefused {
    /// This MTA has no users file.
    Unavailable,
    /// Too many recent failures from this source (or from it for this user).
    Blocked,
    /// No check permit within [`MAX_CHECK_QUEUE_WAIT`].
    Busy,
    /// Wrong user name or password; counted as a failure.
    Wrong,
}

impl AuthGuard {
    pub fn new(users: Option<Users>) -> Self {
        Self {
            users: users.map(Arc::new),
            failures: AuthFailures::default(),
            checks: Arc::new(Semaphore::new(MAX_CONCURRENT_CHECKS)),
        }
    }

    /// Whether this MTA has credentials to check (AUTH may be offered at all).
    pub fn available(&self) -> bool {
        self.users.is_some()
    }

    /// Whether AUTH attempts from `ip` (as `user`, once known) are refused for now: too
    /// many failures from that source, or from it against that user, or (while failures
    /// everywhere run high) any recent failure from it. Never because of failures that
    /// other sources caused.
    pub fn blocked(&self, ip: IpAddr, user: Option<&str>) -> bool {
        self.failures.blocked(ip, user)
    }

    /// Records a failed AUTH that never reached a password check (e.g. an empty name).
    pub fn failed(&self, ip: IpAddr, user: &str) {
        self.failures.failed(ip, user);
    }

    /// Checks `name`'s `password` for a client at `ip`, off the async threads. A wrong
    /// pair is recorded as a failure of that source.
    pub async fn verify(
        &self,
        ip: IpAddr,
        name: &str,
        password: String,
    ) -> Result<User, AuthRefused> {
        if self.blocked(ip, Some(name)) {
            return Err(AuthRefused::Blocked);
        }
        let Some(users) = self.users.clone() else {
            return Err(AuthRefused::Unavailable);
        };
        let Ok(Ok(permit)) =
            tokio::time::timeout(MAX_CHECK_QUEUE_WAIT, self.checks.clone().acquire_owned()).await
        else {
            return Err(AuthRefused::Busy);
        };
        let lookup = name.to_owned();
        let verified = tokio::task::spawn_blocking(move || {
            let user = users.verify(&lookup, &password);
            drop(permit);
            user
        })
        .await
        .ok()
        .flatten();
        verified.ok_or_else(|| {
            self.failed(ip, name);
            AuthRefused::Wrong
        })
    }
}
