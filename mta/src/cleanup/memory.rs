//! The in-memory store behind [`super::Cleanup::Memory`]: what session tests and the fuzz
//! harness give a session instead of the spool. It keeps each accepted message (its
//! envelope and its content as the spool would have stored it, trace and signature
//! headers included) and can be told to fail the next store with a chosen spool error, so
//! a test can see the reply the client gets.
//!
//! Built only for tests and with the `memory-cleanup` feature (the fuzz crate). Never
//! touches the disk, the spool or the scheduler; nothing kept here is ever delivered.

use crate::queue::{Envelope, QueueId};
use crate::spool;
use std::sync::Mutex;

/// Messages a [`super::Cleanup::Memory`] accepted, and the failure to give the next store.
#[derive(Debug, Default)]
pub struct Memory {
    accepted: Mutex<Vec<Accepted>>,
    fail_next: Mutex<Option<spool::Error>>,
}

/// One message as it would have been stored.
#[derive(Debug, Clone)]
pub struct Accepted {
    pub id: QueueId,
    pub envelope: Envelope,
    /// The content as stored: the headers cleanup added, then what the client sent.
    pub content: Vec<u8>,
}

impl Memory {
    /// Makes the next store fail with `error` (and keep nothing), as the spool would.
    pub fn fail_next(&self, error: spool::Error) {
        *self.fail_next.lock().unwrap_or_else(|e| e.into_inner()) = Some(error);
    }

    /// Takes every message accepted since the last call, oldest first.
    pub fn take(&self) -> Vec<Accepted> {
        std::mem::take(&mut *self.accepted.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The spool store's stand-in: the failure asked for, else keeps the message.
    pub(super) fn store(
        &self,
        id: QueueId,
        envelope: &Envelope,
        message: &[&[u8]],
    ) -> Result<(), spool::Error> {
        if let Some(error) = self
            .fail_next
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            return Err(error);
        }
        self.accepted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Accepted {
                id,
                envelope: envelope.clone(),
                content: message.concat(),
            });
        Ok(())
    }
}
