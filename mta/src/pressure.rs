//! Connection pressure (issue 13, item 6): when `smtpd.max_connections` is reached, the
//! session that has waited longest for a command line is closed to admit the new
//! connection, instead of refusing the newcomer while slow clients hold every slot.
//!
//! Every session registers here ([`Sessions::register`]) and says, as it goes, whether it
//! is waiting for a command line (and since when) or receiving message content (never
//! chosen: content has its own minimum rate, see `smtpd.min_data_rate`). The listener,
//! refused by the limit, asks [`Sessions::evict_longest_waiting`] for a session that has
//! waited at least `smtpd.pressure_idle_timeout`; that session is told to close (it
//! answers `421 4.4.2`), and the listener admits the newcomer once the session's
//! connection slot is free ([`Evicted`] resolves after the [`Registration`] is dropped,
//! which the listener does after the slot).
//!
//! Never closes a session that is not waiting for a command, and never closes more
//! sessions than connections arrive.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::{Notify, oneshot};
use tokio::time::{Duration, Instant};

/// The open sessions of this MTA (one per MTA context).
#[derive(Debug, Default)]
pub struct Sessions {
    registry: Mutex<Registry>,
}

#[derive(Debug, Default)]
struct Registry {
    next: u64,
    entries: HashMap<u64, Arc<Entry>>,
}

#[derive(Debug, Default)]
struct Entry {
    state: Mutex<State>,
    /// Told once, when the session is chosen to close.
    close: Notify,
}

#[derive(Debug, Default)]
struct State {
    /// When the session began waiting for its current command line; `None` while it
    /// receives content or once it has been chosen.
    waiting_since: Option<Instant>,
    /// Dropped with the entry: wakes the listener waiting to admit a newcomer.
    ended: Option<oneshot::Sender<()>>,
}

/// Resolves once an evicted session's connection slot is free.
pub type Evicted = oneshot::Receiver<()>;

impl Sessions {
    /// Registers a new session, waiting for its first command from now.
    pub fn register(self: &Arc<Self>) -> Registration {
        let entry = Arc::new(Entry::default());
        lock(&entry.state).waiting_since = Some(Instant::now());
        let mut registry = lock(&self.registry);
        let id = registry.next;
        registry.next += 1;
        registry.entries.insert(id, entry.clone());
        Registration {
            sessions: self.clone(),
            id,
            handle: Handle { entry },
        }
    }

    /// Chooses the session that has waited longest for a command line, if it has waited
    /// at least `min_wait`, and tells it to close. The result resolves once its slot is
    /// free.
    pub fn evict_longest_waiting(&self, min_wait: Duration) -> Option<Evicted> {
        let now = Instant::now();
        let registry = lock(&self.registry);
        let (entry, _) = registry
            .entries
            .values()
            .filter_map(|entry| Some((entry, lock(&entry.state).waiting_since?)))
            .filter(|(_, since)| now.saturating_duration_since(*since) >= min_wait)
            .min_by_key(|(_, since)| *since)?;
        let (ended, evicted) = oneshot::channel();
        {
            let mut state = lock(&entry.state);
            state.waiting_since = None;
            state.ended = Some(ended);
        }
        entry.close.notify_one();
        Some(evicted)
    }

    /// Number of registered sessions.
    #[cfg(test)]
    fn registered(&self) -> usize {
        lock(&self.registry).entries.len()
    }
}

/// Keeps a session registered until dropped. Drop it after the session's connection slot,
/// so a listener woken by the drop finds the slot free.
#[derive(Debug)]
pub struct Registration {
    sessions: Arc<Sessions>,
    id: u64,
    handle: Handle,
}

impl Registration {
    /// What the session uses to report its state and learn it must close.
    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        lock(&self.sessions.registry).entries.remove(&self.id);
        // Wakes the listener that evicted this session, if one did.
        lock(&self.handle.entry.state).ended.take();
    }
}

/// A session's side of its registration.
#[derive(Debug, Clone)]
pub struct Handle {
    entry: Arc<Entry>,
}

impl Handle {
    /// The session waits for a command line that began at `since`. Does nothing once the
    /// session has been chosen to close.
    pub fn waiting(&self, since: Instant) {
        let mut state = lock(&self.entry.state);
        if state.ended.is_none() {
            state.waiting_since = Some(since);
        }
    }

    /// The session receives message content: not to be chosen.
    pub fn busy(&self) {
        lock(&self.entry.state).waiting_since = None;
    }

    /// Resolves when the session has been chosen to close.
    pub async fn closed(&self) {
        self.entry.close.notified().await;
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_session_waiting_longest_is_chosen_and_never_a_busy_one() {
        let sessions = Arc::new(Sessions::default());
        let oldest = sessions.register();
        tokio::time::advance(Duration::from_secs(5)).await;
        let busy = sessions.register();
        busy.handle().busy();
        let newer = sessions.register();
        tokio::time::advance(Duration::from_secs(5)).await;
        let busy_since_long = sessions.register();
        busy_since_long.handle().busy();
        tokio::time::advance(Duration::from_secs(20)).await;

        // Nobody has waited a minute.
        assert!(
            sessions
                .evict_longest_waiting(Duration::from_secs(60))
                .is_none()
        );

        let mut evicted = sessions
            .evict_longest_waiting(Duration::from_secs(10))
            .expect("one has waited 30 s");
        tokio::time::timeout(Duration::from_secs(1), oldest.handle().closed())
            .await
            .expect("the oldest is told to close");
        assert!(evicted.try_recv().is_err(), "not ended yet");
        drop(oldest);
        tokio::time::timeout(Duration::from_secs(1), evicted)
            .await
            .expect("resolves once the registration is dropped")
            .expect_err("dropped, not sent");

        // The next choice is the newer waiting one; busy sessions are never chosen.
        let evicted = sessions.evict_longest_waiting(Duration::from_secs(10));
        assert!(evicted.is_some());
        tokio::time::timeout(Duration::from_secs(1), newer.handle().closed())
            .await
            .expect("the newer one is told to close");
        assert!(
            sessions
                .evict_longest_waiting(Duration::from_secs(10))
                .is_none(),
            "only busy sessions (and one already chosen) are left"
        );
        assert_eq!(sessions.registered(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_command_resets_the_wait() {
        let sessions = Arc::new(Sessions::default());
        let session = sessions.register();
        tokio::time::advance(Duration::from_secs(30)).await;
        session.handle().waiting(Instant::now());
        assert!(
            sessions
                .evict_longest_waiting(Duration::from_secs(10))
                .is_none()
        );
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(
            sessions
                .evict_longest_waiting(Duration::from_secs(10))
                .is_some()
        );
    }
}
