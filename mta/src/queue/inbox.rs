//! The queue manager's inbox: the commands every other stage sends it (enqueue, attempt
//! results, operators' requests, drain check-outs) and the cheap handle that sends them.
//! Plain data and a channel; the task that answers is the queue manager (`qmgr`), above every stage
//! that talks to it.

use super::{Envelope, QueueId, Status};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

/// Messages to the scheduler task.
#[derive(Debug)]
pub enum Command {
    /// A message is newly in the spool (accepted, or a bounce we made).
    Enqueue { id: QueueId, envelope: Envelope },
    /// Messages recovered from the spool at start-up, a batch at a time; `done` is
    /// answered once they are scheduled (so recovery never piles up in this channel).
    EnqueueRecovered {
        messages: Vec<(QueueId, Envelope)>,
        done: oneshot::Sender<()>,
    },
    /// A destination finished its part of an attempt round.
    Attempted {
        id: QueueId,
        results: Vec<(usize, Status)>,
        /// The host that answered, when one was reached.
        remote_mta: Option<String>,
    },
    /// An operator's request (`petrel-mta queue …`).
    Admin(AdminRequest, oneshot::Sender<AdminResponse>),
    /// A drain takes up to `max` messages to hand over (see [`SchedulerHandle::check_out`]),
    /// or only pinned ones ([`SchedulerHandle::check_out_pinned`]).
    CheckOut {
        max: usize,
        only_pinned: bool,
        reply: oneshot::Sender<Vec<(QueueId, Envelope)>>,
    },
    /// A checked-out message stays here after all, with its envelope as the drain left it.
    CheckIn { id: QueueId, envelope: Envelope },
    /// A checked-out message is a peer's now: it leaves the queue and the spool.
    HandedOff { id: QueueId },
    /// Attempt rounds start again (a drain was cancelled).
    ResumeRounds,
    /// Counts, for drain progress.
    Stats(oneshot::Sender<Stats>),
}

/// What the queue holds, for drain progress.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Messages in the queue, in any state.
    pub queued: usize,
    /// Messages with an attempt round out.
    pub active: usize,
    /// Messages checked out by a drain.
    pub out: usize,
    /// Messages pinned to the peer they were last offered to (see the module doc).
    pub pinned: usize,
    /// Messages retired with every recipient final (delivered or failed) since start.
    pub finished: u64,
}

/// Queue operations, as the admin endpoint receives them.
#[derive(Debug, Clone, serde::Deserialize, Serialize)]
#[serde(rename_all = "snake_case", tag = "op")]
pub enum AdminRequest {
    /// Every message at once (in-process callers; the admin endpoint pages instead).
    List,
    /// One page of the list: up to `limit` messages with ids after `after`, by id. The
    /// admin endpoint streams `list` page by page, so a reply is never the whole queue.
    ListPage {
        after: Option<QueueId>,
        limit: usize,
    },
    Show {
        id: QueueId,
    },
    /// Attempt now: one message, every message for a recipient domain, or everything.
    Flush {
        id: Option<QueueId>,
        domain: Option<String>,
    },
    Hold {
        id: QueueId,
    },
    /// Release one held message, or (`id: None`) every held message.
    Release {
        id: Option<QueueId>,
    },
    /// Remove without notifying anyone.
    Delete {
        id: QueueId,
    },
    /// Fail every pending recipient now and notify the sender.
    Bounce {
        id: QueueId,
    },
}

/// One queued message as the admin endpoint shows it.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct QueueEntry {
    pub id: QueueId,
    /// `waiting`, `held` or `active`.
    pub state: String,
    pub sender: String,
    pub recipients: Vec<super::Recipient>,
    pub attempts: u32,
    /// Seconds since the epoch; absent while held or active.
    pub next_attempt_at: Option<u64>,
    pub received_at: u64,
    pub size: Option<u64>,
}

#[derive(Debug, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "result")]
pub enum AdminResponse {
    List {
        messages: Vec<QueueEntry>,
    },
    /// A page of the list; `more` when messages with later ids remain.
    ListPage {
        messages: Vec<QueueEntry>,
        more: bool,
    },
    Show {
        message: QueueEntry,
    },
    Done {
        affected: usize,
    },
    NotFound {
        id: QueueId,
    },
}

/// Talks to the scheduler task. Cheap to clone; never blocks.
#[derive(Clone, Debug)]
pub struct SchedulerHandle {
    commands: mpsc::UnboundedSender<Command>,
}

impl SchedulerHandle {
    pub fn channel() -> (SchedulerHandle, mpsc::UnboundedReceiver<Command>) {
        let (commands, rx) = mpsc::unbounded_channel();
        (SchedulerHandle { commands }, rx)
    }

    /// A message is in the spool and should be scheduled. After shutdown this is a no-op:
    /// the message stays in the spool for the next start.
    pub fn enqueue(&self, id: QueueId, envelope: Envelope) {
        let _ = self.commands.send(Command::Enqueue { id, envelope });
    }

    /// Schedules a batch of messages recovered from the spool; returns once they are, or
    /// `false` at shutdown. Ids the queue has already are left as they are.
    pub async fn enqueue_recovered(&self, messages: Vec<(QueueId, Envelope)>) -> bool {
        let (done, scheduled) = oneshot::channel();
        self.commands
            .send(Command::EnqueueRecovered { messages, done })
            .is_ok()
            && scheduled.await.is_ok()
    }

    pub fn attempted(
        &self,
        id: QueueId,
        results: Vec<(usize, Status)>,
        remote_mta: Option<String>,
    ) {
        let _ = self.commands.send(Command::Attempted {
            id,
            results,
            remote_mta,
        });
    }

    pub async fn admin(&self, request: AdminRequest) -> Option<AdminResponse> {
        let (reply, response) = oneshot::channel();
        self.commands.send(Command::Admin(request, reply)).ok()?;
        response.await.ok()
    }

    /// Takes up to `max` messages (oldest first) that are waiting or held, for a drain to
    /// hand over; from then on no attempt round starts until [`Self::resume_rounds`]
    /// (rounds already out finish, and their messages can be taken afterwards). Each one
    /// must come back through [`Self::check_in`] or [`Self::handed_off`]. Empty after
    /// shutdown.
    pub async fn check_out(&self, max: usize) -> Vec<(QueueId, Envelope)> {
        self.checked_out(max, false).await
    }

    /// Takes up to `max` pinned messages (oldest first) to ask their peer again; attempt
    /// rounds go on. Each comes back like those of [`Self::check_out`].
    pub async fn check_out_pinned(&self, max: usize) -> Vec<(QueueId, Envelope)> {
        self.checked_out(max, true).await
    }

    async fn checked_out(&self, max: usize, only_pinned: bool) -> Vec<(QueueId, Envelope)> {
        let (reply, response) = oneshot::channel();
        let command = Command::CheckOut {
            max,
            only_pinned,
            reply,
        };
        if self.commands.send(command).is_err() {
            return Vec::new();
        }
        response.await.unwrap_or_default()
    }

    /// A checked-out message that no peer took: it waits (or stays held) here again.
    pub fn check_in(&self, id: QueueId, envelope: Envelope) {
        let _ = self.commands.send(Command::CheckIn { id, envelope });
    }

    /// A checked-out message that a peer has stored: it leaves this queue and spool.
    pub fn handed_off(&self, id: QueueId) {
        let _ = self.commands.send(Command::HandedOff { id });
    }

    /// Attempt rounds start again (after [`Self::check_out`] paused them).
    pub fn resume_rounds(&self) {
        let _ = self.commands.send(Command::ResumeRounds);
    }

    /// The queue's counts; `None` after shutdown.
    pub async fn stats(&self) -> Option<Stats> {
        let (reply, response) = oneshot::channel();
        self.commands.send(Command::Stats(reply)).ok()?;
        response.await.ok()
    }
}
