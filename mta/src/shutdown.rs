//! Graceful shutdown: one signal every task listens to, and a way to wait until they have
//! all finished (mini-redis's broadcast + completion-channel pattern, with a `watch`).

use tokio::sync::{mpsc, watch};

/// Held by every long-running task; `recv` completes once shutdown has begun.
#[derive(Clone, Debug)]
pub struct Shutdown {
    signal: watch::Receiver<bool>,
    /// Dropped when the task ends; [`Trigger::wait`] returns once every copy is gone.
    _alive: mpsc::Sender<()>,
}

impl Shutdown {
    /// Completes when shutdown has begun (at once if it already has).
    pub async fn recv(&mut self) {
        let _ = self.signal.wait_for(|stop| *stop).await;
    }

    pub fn is_shutdown(&self) -> bool {
        *self.signal.borrow()
    }
}

/// Owned by `main`: starts shutdown and waits for the tasks to finish.
#[derive(Debug)]
pub struct Trigger {
    signal: watch::Sender<bool>,
    alive: mpsc::Sender<()>,
    finished: mpsc::Receiver<()>,
}

impl Default for Trigger {
    fn default() -> Self {
        Self::new()
    }
}

impl Trigger {
    pub fn new() -> Self {
        let (signal, _) = watch::channel(false);
        let (alive, finished) = mpsc::channel(1);
        Self {
            signal,
            alive,
            finished,
        }
    }

    /// A handle for a new task.
    pub fn subscribe(&self) -> Shutdown {
        Shutdown {
            signal: self.signal.subscribe(),
            _alive: self.alive.clone(),
        }
    }

    /// Signals shutdown and waits until every [`Shutdown`] handle has been dropped.
    pub async fn shutdown(self) {
        let Trigger {
            signal,
            alive,
            mut finished,
        } = self;
        let _ = signal.send(true);
        drop(alive);
        let _ = finished.recv().await;
    }
}
