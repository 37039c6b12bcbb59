//! The queue manager: decides when each queued message is attempted, hands the attempts to
//! per-destination delivery queues, applies the per-recipient results, and retires
//! messages (delivered, bounced, expired, deleted).
//!
//! One task owns all scheduling state; everything else talks to it through
//! [`SchedulerHandle`]. Due times and expiry times live in ordered sets keyed by time, so
//! each event costs O(log n) and nothing ever scans the whole queue; the memory per queued
//! message is its envelope (bodies stay in the spool).
//!
//! A message's life: `enqueue` → waiting (in `due`) or held → an attempt round: its pending
//! recipients are grouped by destination and queued there ([`crate::delivery`]) → each
//! group reports back → when the round is complete, either every recipient is final (the
//! message is retired, with a bounce for failures) or it waits again with backoff
//! ([`crate::queue::schedule`]). Expiry (`queue.max_age`) fires whatever state the message is in:
//! waiting, held, or in the middle of a round (then it takes effect when the round ends).
//!
//! Drain (issue 16): a draining MTA checks messages *out* ([`SchedulerHandle::check_out`])
//! to hand them to a peer. A checked-out message is in no attempt round and starts none
//! (and once a drain checks messages out, no new rounds start at all); it comes back with
//! [`SchedulerHandle::check_in`] when no peer took it, or leaves the queue and the spool
//! with [`SchedulerHandle::handed_off`] once a peer has stored it. So a message is never
//! delivered here and handed over at the same time. A message with a `handoff_peer` (it
//! was offered to that peer and the answer was lost, or this MTA stopped before it came)
//! is *pinned*: it starts no round here, because that peer may have it and deliver it;
//! the drain asks that peer again ([`SchedulerHandle::check_out_pinned`]) and checks it in
//! unpinned only once the peer has said it does not have it (or an operator releases it).
//!
//! The clock is tokio's, anchored to the wall clock at start, so tests drive retries and
//! expiry with paused time. After a restart, all of this is rebuilt from the spool: each
//! envelope carries its attempts, next attempt time, hold flag and recipient statuses.

use crate::context::Context;
use crate::delivery::outcome::{self, GaveUp};
use crate::delivery::{self, Destinations, WorkItem};
use crate::dense_map::{DenseMap, DenseSet};
use crate::dsn;
pub use crate::queue::inbox::{
    AdminRequest, AdminResponse, Command, QueueEntry, SchedulerHandle, Stats,
};
use crate::queue::schedule;
use crate::queue::{Envelope, QueueId, Status};
use crate::shutdown::Shutdown;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Messages released at a time by `release --all`.
const RELEASE_PAGE: usize = 4096;

/// Most messages relocated per compaction tick (each is read and rewritten by the spool
/// writer, between group commits).
const MAX_RELOCATIONS_PER_TICK: usize = 1000;

/// Wall-clock milliseconds derived from tokio's clock (so paused time moves it).
#[derive(Debug, Clone, Copy)]
struct Clock {
    wall_ms: u64,
    instant: Instant,
}

impl Clock {
    fn start() -> Self {
        let wall_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        Self {
            wall_ms,
            instant: Instant::now(),
        }
    }
    fn now_ms(&self) -> u64 {
        self.wall_ms + self.instant.elapsed().as_millis() as u64
    }
    fn instant_at(&self, ms: u64) -> Instant {
        self.instant + Duration::from_millis(ms.saturating_sub(self.wall_ms))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// In `due` at this time.
    Waiting(u64),
    Held,
    /// An attempt round is out, with this many destination groups still to report.
    Active(usize),
    /// Checked out by a drain, being handed to a peer.
    Out,
    /// Offered to its `handoff_peer` with the outcome unknown: no rounds until the drain
    /// learns whether that peer has it.
    Pinned,
}

/// What the scheduler keeps of a queued message: 16 bytes (issue 17: a million queued
/// messages must not cost more than a few dozen bytes each). The envelope stays in the
/// spool and is read when the message is worked on.
struct Entry {
    /// The due time (ms) while waiting, the destination groups still to report while
    /// active; 0 otherwise.
    at: u64,
    /// When `queue.max_age` (or the envelope's own expiry) retires it, in seconds.
    expires_s: u32,
    phase: PhaseKind,
    /// Expiry, deletion or bounce requested during a round (or while checked out);
    /// applied when the round ends (or the message is checked in).
    retire_after_round: Option<Retirement>,
    /// Hold requested during a round (or while checked out); applied likewise.
    hold_after_round: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PhaseKind {
    Waiting,
    Held,
    Active,
    Out,
    Pinned,
}

impl Entry {
    fn new(phase: Phase, expires_s: u32) -> Self {
        let mut entry = Entry {
            at: 0,
            expires_s,
            phase: PhaseKind::Held,
            retire_after_round: None,
            hold_after_round: false,
        };
        entry.set(phase);
        entry
    }

    fn phase(&self) -> Phase {
        match self.phase {
            PhaseKind::Waiting => Phase::Waiting(self.at),
            PhaseKind::Held => Phase::Held,
            PhaseKind::Active => Phase::Active(self.at as usize),
            PhaseKind::Out => Phase::Out,
            PhaseKind::Pinned => Phase::Pinned,
        }
    }

    fn set(&mut self, phase: Phase) {
        (self.phase, self.at) = match phase {
            Phase::Waiting(at) => (PhaseKind::Waiting, at),
            Phase::Held => (PhaseKind::Held, 0),
            Phase::Active(left) => (PhaseKind::Active, left as u64),
            Phase::Out => (PhaseKind::Out, 0),
            Phase::Pinned => (PhaseKind::Pinned, 0),
        };
    }

    /// The key of this message in the expiry index.
    fn expiry_key(&self, id: QueueId) -> (u64, QueueId) {
        (u64::from(self.expires_s) * 1000, id)
    }
}

/// Most messages with an attempt round out at once (Postfix's
/// `qmgr_message_active_limit`): their envelopes are in memory, everyone else's on disk.
/// A flush of a million messages starts rounds as earlier ones end.
const MAX_ACTIVE: usize = 5_000;

struct Scheduler {
    ctx: Arc<Context>,
    clock: Clock,
    /// By id: pages of the admin list and drain check-outs walk it in order.
    messages: DenseMap<QueueId, Entry>,
    due: DenseSet<(u64, QueueId)>,
    expiry: DenseSet<(u64, QueueId)>,
    /// The envelopes of messages with a round out (at most [`MAX_ACTIVE`]).
    loaded: HashMap<QueueId, Envelope>,
    destinations: Destinations,
    /// Messages with an attempt round out.
    active: usize,
    /// Messages checked out by a drain.
    out: usize,
    /// A drain has checked messages out: no new attempt rounds.
    rounds_paused: bool,
    /// Messages retired with every recipient final, since start.
    finished: u64,
}

/// Runs until shutdown; deliveries in progress are then left to finish on their own (their
/// results are recorded if they arrive in time, and the spool has the rest).
pub async fn run(
    ctx: Arc<Context>,
    outbound: Arc<delivery::Outbound>,
    mut commands: mpsc::UnboundedReceiver<Command>,
    mut shutdown: Shutdown,
) {
    let mut scheduler = Scheduler {
        destinations: Destinations::new(outbound, shutdown.clone()),
        ctx,
        clock: Clock::start(),
        messages: DenseMap::new(),
        due: DenseSet::new(),
        expiry: DenseSet::new(),
        loaded: HashMap::new(),
        active: 0,
        out: 0,
        rounds_paused: false,
        finished: 0,
    };
    let mut compaction = tokio::time::interval(crate::spool::COMPACTION_INTERVAL);
    compaction.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        scheduler.report_depth();
        let wake = scheduler.next_wake();
        tokio::select! {
            command = commands.recv() => match command {
                Some(command) => scheduler.handle(command),
                None => break,
            },
            () = sleep_until(wake) => scheduler.fire_timers(),
            _ = compaction.tick() => scheduler.compact(),
            () = shutdown.recv() => break,
        }
    }
}

async fn sleep_until(wake: Option<Instant>) {
    match wake {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl Scheduler {
    /// Queue depth gauges, O(1): waiting messages are exactly the `due` index, active ones
    /// are counted as rounds start and end, the rest are held.
    fn report_depth(&self) {
        use mta_telemetry::QueueState;
        let metrics = &self.ctx.metrics;
        let waiting = self.due.len();
        let total = self.messages.len();
        // Being handed to a peer is being delivered, as far as the gauge goes.
        let active = self.active + self.out;
        metrics.set_queue_depth(QueueState::Waiting, waiting as u64);
        metrics.set_queue_depth(QueueState::Active, active as u64);
        metrics.set_queue_depth(
            QueueState::Held,
            total.saturating_sub(waiting + active) as u64,
        );
    }

    fn next_wake(&self) -> Option<Instant> {
        let due = match self.rounds_paused || self.active >= MAX_ACTIVE {
            true => None,
            false => self.due.first().map(|(ms, _)| *ms),
        };
        let expiry = self.expiry.first().map(|(ms, _)| *ms);
        let next = match (due, expiry) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b)?,
        };
        Some(self.clock.instant_at(next))
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Enqueue { id, envelope } => self.enqueue(id, &envelope),
            Command::EnqueueRecovered { messages, done } => {
                for (id, envelope) in messages {
                    if !self.messages.contains_key(&id) {
                        self.enqueue(id, &envelope);
                    }
                }
                let _ = done.send(());
            }
            Command::Attempted {
                id,
                results,
                remote_mta,
            } => self.attempted(id, results, remote_mta),
            Command::Admin(request, reply) => {
                let response = self.admin(request);
                let _ = reply.send(response);
            }
            Command::CheckOut {
                max,
                only_pinned,
                reply,
            } => {
                let taken = self.check_out(max, only_pinned);
                if let Err(taken) = reply.send(taken) {
                    // The drain went away: nothing was handed over.
                    for (id, envelope) in taken {
                        self.check_in(id, envelope);
                    }
                }
            }
            Command::CheckIn { id, envelope } => self.check_in(id, envelope),
            Command::HandedOff { id } => self.handed_off(id),
            Command::ResumeRounds => self.rounds_paused = false,
            Command::Stats(reply) => {
                let _ = reply.send(Stats {
                    queued: self.messages.len(),
                    active: self.active,
                    out: self.out,
                    pinned: self
                        .messages
                        .iter()
                        .filter(|(_, e)| e.phase == PhaseKind::Pinned)
                        .count(),
                    finished: self.finished,
                });
            }
        }
    }

    /// Schedules a message; its envelope is not kept (the spool has it).
    fn enqueue(&mut self, id: QueueId, envelope: &Envelope) {
        let config = self.ctx.config();
        let expires_ms = match envelope.expires_at {
            Some(at) => at.saturating_mul(1000),
            None => schedule::expires_at_ms(&config.queue, envelope.received_at),
        };
        let expires_s = u32::try_from(expires_ms.div_ceil(1000)).unwrap_or(u32::MAX);
        let phase = self.resting_phase(id, envelope);
        let entry = Entry::new(phase, expires_s);
        self.expiry.insert(entry.expiry_key(id));
        self.messages.insert(id, entry);
    }

    /// The current envelope of a queued message: in memory while a round is out, else read
    /// from the spool. `None` (logged) when the spool cannot give it.
    fn envelope(&self, id: QueueId) -> Option<Envelope> {
        if let Some(envelope) = self.loaded.get(&id) {
            return Some(envelope.clone());
        }
        match self.ctx.spool.envelope(id) {
            Ok(envelope) => Some(envelope),
            Err(e) => {
                tracing::error!(queue_id = %id, error = %e, "queued message's envelope unreadable");
                None
            }
        }
    }

    fn fire_timers(&mut self) {
        let now = self.clock.now_ms();
        while let Some(&(ms, id)) = self.expiry.first() {
            if ms > now {
                break;
            }
            self.expiry.pop_first();
            self.expire(id);
        }
        if self.rounds_paused {
            return;
        }
        while let Some(&(ms, id)) = self.due.first() {
            if ms > now || self.active >= MAX_ACTIVE {
                break;
            }
            self.due.pop_first();
            self.start_round(id);
        }
    }

    /// Sends every pending recipient of `id` to its destination.
    fn start_round(&mut self, id: QueueId) {
        if !self.messages.contains_key(&id) {
            return;
        }
        let Some(mut loaded) = self.envelope(id) else {
            // Held, so that it is not tried again and again; `queue show` has it.
            if let Some(entry) = self.messages.get_mut(&id) {
                entry.set(Phase::Held);
            }
            return;
        };
        if loaded.held {
            // Released since it was held (see `release`): the round's end writes it so
            // (a delivered message is simply done).
            loaded.held = false;
        }
        let config = self.ctx.config();
        let envelope = Arc::new(loaded.clone());
        self.loaded.insert(id, loaded);
        let groups = delivery::group_by_destination(&config, &envelope);
        let Some(entry) = self.messages.get_mut(&id) else {
            return;
        };
        if groups.is_empty() {
            // Nothing pending (e.g. recovered after the last recipient was recorded).
            entry.set(Phase::Active(0));
            self.active += 1;
            self.end_round(id);
            return;
        }
        entry.set(Phase::Active(groups.len()));
        self.active += 1;
        for (destination, recipients) in groups {
            self.destinations.push(
                destination,
                WorkItem {
                    id,
                    envelope: envelope.clone(),
                    recipients,
                },
            );
        }
    }

    fn attempted(
        &mut self,
        id: QueueId,
        results: Vec<(usize, Status)>,
        remote_mta: Option<String>,
    ) {
        let Some(entry) = self.messages.get_mut(&id) else {
            return;
        };
        if let Some(envelope) = self.loaded.get_mut(&id) {
            for (index, status) in results {
                if let Some(recipient) = envelope.recipients.get_mut(index) {
                    recipient.status = status;
                    recipient.remote_mta.clone_from(&remote_mta);
                }
            }
        }
        if let Phase::Active(left) = entry.phase() {
            let left = left.saturating_sub(1);
            entry.set(Phase::Active(left));
            if left == 0 {
                self.end_round(id);
            }
        }
    }

    /// An attempt round is complete: retire the message or schedule the next round.
    fn end_round(&mut self, id: QueueId) {
        self.active = self.active.saturating_sub(1);
        let now = self.clock.now_ms();
        let config = self.ctx.config();
        let Some(entry) = self.messages.get(&id) else {
            self.loaded.remove(&id);
            return;
        };
        if let Some(how) = entry.retire_after_round {
            self.retire(id, how);
            return;
        }
        let Some(mut envelope) = self.loaded.remove(&id).or_else(|| self.envelope(id)) else {
            // Unreadable: held, for an operator (`queue show` says so).
            if let Some(entry) = self.messages.get_mut(&id) {
                entry.set(Phase::Held);
            }
            return;
        };
        let Some(entry) = self.messages.get_mut(&id) else {
            return;
        };
        if envelope.recipients.iter().all(|r| r.status.is_final()) {
            self.loaded.insert(id, envelope);
            self.retire(id, Retirement::Finished);
            return;
        }
        envelope.attempts += 1;
        let delay = schedule::retry_delay(&config.queue, envelope.attempts);
        let at = now + delay.as_millis() as u64;
        envelope.next_attempt_at = at.div_ceil(1000);
        if schedule::delay_notice_due(&config.queue, &envelope, now) {
            envelope.delay_notified = true;
            dsn::send_notice(&self.ctx, id, envelope.clone(), dsn::Kind::Delay);
        }
        tracing::info!(
            queue_id = %id,
            attempts = envelope.attempts,
            next_attempt_in = %humantime::format_duration(Duration::from_secs(delay.as_secs())),
            "deferred"
        );
        if entry.hold_after_round {
            entry.hold_after_round = false;
            envelope.held = true;
            entry.set(Phase::Held);
        } else {
            entry.set(Phase::Waiting(at));
            self.due.insert((at, id));
        }
        self.ctx.spool.update_detached(id, &envelope);
    }

    /// Relocates the messages that keep old spool segments on disk (see the `spool`
    /// module doc), with their current envelopes.
    fn compact(&mut self) {
        let mut moved = 0;
        for id in self
            .ctx
            .spool
            .compaction_candidates(MAX_RELOCATIONS_PER_TICK)
        {
            // One the scheduler does not know (yet) is left for a later tick, and so is
            // one checked out: the drain owns its envelope (it may be recording a peer).
            if let Some(entry) = self.messages.get(&id)
                && entry.phase != PhaseKind::Out
            {
                self.ctx.spool.relocate_detached(id);
                moved += 1;
            }
        }
        if moved > 0 {
            tracing::info!(
                messages = moved,
                "spool: relocating messages out of the oldest segment"
            );
        }
    }

    /// Takes a message off hold (a no-op for one that is not held): due at once. A pinned
    /// one is unpinned: delivered from here, whether or not its peer has it too.
    fn release(&mut self, id: QueueId) {
        let now = self.clock.now_ms();
        let Some(entry) = self.messages.get_mut(&id) else {
            return;
        };
        entry.hold_after_round = false;
        match entry.phase {
            PhaseKind::Held => {
                // The envelope on disk still says held until its round ends (see
                // `start_round`): `release --all` of a million messages writes nothing
                // at once, and a crash before a message's round ends brings it back held.
                entry.set(Phase::Waiting(now));
                self.due.insert((now, id));
            }
            PhaseKind::Pinned => {
                let Some(mut envelope) = self.envelope(id) else {
                    return;
                };
                tracing::warn!(queue_id = %id, peer = envelope.handoff_peer.as_deref().unwrap_or("-"), "released while pinned to a peer: delivered from here (the peer may deliver it too)");
                envelope.handoff_peer = None;
                envelope.handoff_peer_spool = None;
                envelope.held = false;
                if let Some(entry) = self.messages.get_mut(&id) {
                    entry.set(Phase::Waiting(now));
                }
                self.due.insert((now, id));
                self.ctx.spool.update_detached(id, &envelope);
            }
            _ => {}
        }
    }

    /// The phase of a message that is in no round: pinned, held, or waiting (then in
    /// `due`) for its next attempt.
    fn resting_phase(&mut self, id: QueueId, envelope: &Envelope) -> Phase {
        if envelope.handoff_peer.is_some() {
            Phase::Pinned
        } else if envelope.held {
            Phase::Held
        } else {
            let at = self
                .clock
                .now_ms()
                .max(envelope.next_attempt_at.saturating_mul(1000));
            self.due.insert((at, id));
            Phase::Waiting(at)
        }
    }

    /// Up to `max` waiting, held or pinned messages (only pinned ones with `only_pinned`),
    /// oldest first, checked out for a drain. Unless `only_pinned`, pauses attempt rounds:
    /// what is still waiting is handed over by a later check-out rather than attempted
    /// meanwhile.
    fn check_out(&mut self, max: usize, only_pinned: bool) -> Vec<(QueueId, Envelope)> {
        self.rounds_paused |= !only_pinned;
        // Oldest first: ids grow with time, and the map is ordered by id.
        let ids: Vec<QueueId> = self
            .messages
            .iter()
            .filter(|(_, e)| match e.phase {
                PhaseKind::Pinned => true,
                PhaseKind::Waiting | PhaseKind::Held => !only_pinned,
                PhaseKind::Active | PhaseKind::Out => false,
            })
            .map(|(id, _)| *id)
            .take(max)
            .collect();
        let mut taken = Vec::with_capacity(ids.len());
        for id in ids {
            let Some(mut envelope) = self.envelope(id) else {
                continue;
            };
            if self
                .messages
                .get(&id)
                .is_some_and(|e| e.phase == PhaseKind::Waiting)
            {
                // Released, with its round not started yet (see `release`).
                envelope.held = false;
            }
            let Some(entry) = self.messages.get_mut(&id) else {
                continue;
            };
            if let Phase::Waiting(at) = entry.phase() {
                self.due.remove(&(at, id));
            }
            entry.set(Phase::Out);
            self.out += 1;
            taken.push((id, envelope));
        }
        taken
    }

    /// A checked-out message back from a drain: pinned, held or waiting for its next
    /// attempt, or retired now if that was asked for while it was out.
    fn check_in(&mut self, id: QueueId, mut envelope: Envelope) {
        let Some(entry) = self.messages.get_mut(&id) else {
            return;
        };
        if entry.phase != PhaseKind::Out {
            return;
        }
        self.out = self.out.saturating_sub(1);
        // Not in `due` while out: retire() must not look for it there.
        entry.set(Phase::Held);
        if let Some(how) = entry.retire_after_round.take() {
            self.loaded.insert(id, envelope);
            self.retire(id, how);
            return;
        }
        if entry.hold_after_round {
            entry.hold_after_round = false;
            envelope.held = true;
        }
        // The drain may have changed it (a pin it took back): the spool has what counts.
        if self.ctx.spool.envelope(id).ok().as_ref() != Some(&envelope) {
            self.ctx.spool.update_detached(id, &envelope);
        }
        let phase = self.resting_phase(id, &envelope);
        if let Some(entry) = self.messages.get_mut(&id) {
            entry.set(phase);
        }
    }

    /// A checked-out message a peer has stored: it is the peer's now. Its `Done` record
    /// rides with the next group commit; should it be lost in a crash, the message comes
    /// back with its `handoff_peer`, goes to that peer again, and the peer answers that it
    /// has it already.
    fn handed_off(&mut self, id: QueueId) {
        let Some(entry) = self.messages.get(&id) else {
            return;
        };
        if entry.phase != PhaseKind::Out {
            return;
        }
        let Some(entry) = self.messages.remove(&id) else {
            return;
        };
        self.out = self.out.saturating_sub(1);
        self.expiry.remove(&entry.expiry_key(id));
        if let Some(how) = entry.retire_after_round {
            tracing::warn!(queue_id = %id, ?how, "handed off before a requested retirement: the peer delivers it");
        }
        tracing::info!(queue_id = %id, "handed off");
        self.ctx.spool.remove_detached(id);
    }

    fn expire(&mut self, id: QueueId) {
        let Some(entry) = self.messages.get_mut(&id) else {
            return;
        };
        match entry.phase() {
            Phase::Active(_) | Phase::Out => entry.retire_after_round = Some(Retirement::Expired),
            Phase::Waiting(at) => {
                self.due.remove(&(at, id));
                self.retire(id, Retirement::Expired);
            }
            Phase::Held | Phase::Pinned => self.retire(id, Retirement::Expired),
        }
    }

    /// Removes a message from the queue for good, notifying the sender as its recipients'
    /// statuses and NOTIFY settings require.
    fn retire(&mut self, id: QueueId, how: Retirement) {
        let Some(entry) = self.messages.remove(&id) else {
            self.loaded.remove(&id);
            return;
        };
        self.expiry.remove(&entry.expiry_key(id));
        if let Phase::Waiting(at) = entry.phase() {
            self.due.remove(&(at, id));
        }
        let loaded = self.loaded.remove(&id);
        if matches!(how, Retirement::Finished) {
            self.finished += 1;
        }
        let gave_up = match how {
            Retirement::Finished | Retirement::Deleted => None,
            Retirement::Expired => Some(GaveUp::Expired),
            Retirement::Bounced => Some(GaveUp::Bounced),
        };
        if matches!(how, Retirement::Deleted) {
            tracing::warn!(queue_id = %id, "deleted by operator");
            self.ctx.spool.remove_detached(id);
            return;
        }
        let Some(mut envelope) = loaded.or_else(|| self.envelope(id)) else {
            // Accepted mail never goes without its notice: it stays, held, for an operator
            // (`queue show` says why); no timer brings it back here.
            self.messages
                .insert(id, Entry::new(Phase::Held, entry.expires_s));
            return;
        };
        if let Some(why) = gave_up {
            for recipient in &mut envelope.recipients {
                if !recipient.status.is_final() {
                    recipient.status = outcome::gave_up(why, &recipient.status);
                }
            }
            let reason = outcome::gave_up(why, &Status::Scheduled)
                .diagnostic()
                .map(ToString::to_string)
                .unwrap_or_default();
            tracing::warn!(queue_id = %id, reason, "retired undelivered");
            if matches!(how, Retirement::Expired) {
                self.ctx.metrics.message_expired();
            }
        }
        dsn::retire(&self.ctx, id, envelope);
    }

    fn admin(&mut self, request: AdminRequest) -> AdminResponse {
        match request {
            AdminRequest::List => AdminResponse::List {
                messages: self
                    .messages
                    .iter()
                    .filter_map(|(id, entry)| self.describe(*id, entry))
                    .collect(),
            },
            AdminRequest::ListPage { after, limit } => {
                use std::ops::Bound;
                let from = after.map_or(Bound::Unbounded, Bound::Excluded);
                let mut page = self.messages.range_from(from);
                // Envelopes are read from the spool, a page at a time.
                let messages: Vec<QueueEntry> = page
                    .by_ref()
                    .take(limit.max(1))
                    .filter_map(|(id, entry)| self.describe(*id, entry))
                    .collect();
                AdminResponse::ListPage {
                    messages,
                    more: page.next().is_some(),
                }
            }
            AdminRequest::Show { id } => {
                match self.messages.get(&id).and_then(|e| self.describe(id, e)) {
                    Some(message) => AdminResponse::Show { message },
                    None => AdminResponse::NotFound { id },
                }
            }
            AdminRequest::Flush { id, domain } => {
                if let Some(want) = id
                    && !self.messages.contains_key(&want)
                {
                    return AdminResponse::NotFound { id: want };
                }
                let now = self.clock.now_ms();
                let waiting: Vec<(u64, QueueId)> = self
                    .messages
                    .iter()
                    .filter_map(|(mid, entry)| match entry.phase() {
                        Phase::Waiting(at) if id.is_none_or(|want| want == *mid) => {
                            Some((at, *mid))
                        }
                        _ => None,
                    })
                    .collect();
                // By domain: each waiting message's envelope is read from the spool.
                let chosen: Vec<(u64, QueueId)> = waiting
                    .into_iter()
                    .filter(|(_, mid)| {
                        domain.as_ref().is_none_or(|d| {
                            self.envelope(*mid).is_some_and(|envelope| {
                                envelope.recipients.iter().any(|r| {
                                    !r.status.is_final()
                                        && crate::queue::split_address(&r.address)
                                            .is_some_and(|(_, rd)| rd.eq_ignore_ascii_case(d))
                                })
                            })
                        })
                    })
                    .collect();
                for (at, mid) in &chosen {
                    self.due.remove(&(*at, *mid));
                    self.due.insert((now, *mid));
                    if let Some(entry) = self.messages.get_mut(mid) {
                        entry.set(Phase::Waiting(now));
                    }
                }
                AdminResponse::Done {
                    affected: chosen.len(),
                }
            }
            AdminRequest::Hold { id } => {
                let Some(entry) = self.messages.get_mut(&id) else {
                    return AdminResponse::NotFound { id };
                };
                match entry.phase() {
                    Phase::Active(_) | Phase::Out => entry.hold_after_round = true,
                    Phase::Held => {}
                    // Pinned: held once its peer has said it does not have it.
                    phase @ (Phase::Waiting(_) | Phase::Pinned) => {
                        let Some(mut envelope) = self.envelope(id) else {
                            return AdminResponse::NotFound { id };
                        };
                        if let Phase::Waiting(at) = phase {
                            self.due.remove(&(at, id));
                            if let Some(entry) = self.messages.get_mut(&id) {
                                entry.set(Phase::Held);
                            }
                        }
                        envelope.held = true;
                        self.ctx.spool.update_detached(id, &envelope);
                    }
                }
                AdminResponse::Done { affected: 1 }
            }
            AdminRequest::Release { id: Some(id) } => {
                if !self.messages.contains_key(&id) {
                    return AdminResponse::NotFound { id };
                }
                self.release(id);
                AdminResponse::Done { affected: 1 }
            }
            AdminRequest::Release { id: None } => {
                // A page at a time: no list of a million ids.
                use std::ops::Bound;
                let (mut after, mut affected) = (Bound::Unbounded, 0);
                loop {
                    let held: Vec<QueueId> = self
                        .messages
                        .range_from(after)
                        .filter(|(_, e)| e.phase == PhaseKind::Held || e.hold_after_round)
                        .map(|(id, _)| *id)
                        .take(RELEASE_PAGE)
                        .collect();
                    let Some(&last) = held.last() else {
                        break;
                    };
                    for &id in &held {
                        self.release(id);
                    }
                    affected += held.len();
                    after = Bound::Excluded(last);
                }
                AdminResponse::Done { affected }
            }
            AdminRequest::Delete { id } | AdminRequest::Bounce { id } => {
                let Some(entry) = self.messages.get_mut(&id) else {
                    return AdminResponse::NotFound { id };
                };
                let how = if matches!(request, AdminRequest::Bounce { .. }) {
                    Retirement::Bounced
                } else {
                    Retirement::Deleted
                };
                if let PhaseKind::Active | PhaseKind::Out = entry.phase {
                    // Results of the round in progress still count; retire when it ends
                    // (or, for a message being handed over, when it comes back; one a
                    // peer took is the peer's to deliver).
                    entry.retire_after_round = Some(how);
                    return AdminResponse::Done { affected: 1 };
                }
                self.retire(id, how);
                AdminResponse::Done { affected: 1 }
            }
        }
    }

    /// A message as `queue list`/`show` print it, with its envelope read from the spool
    /// (or memory, while a round is out). `None` when the envelope cannot be read.
    fn describe(&self, id: QueueId, entry: &Entry) -> Option<QueueEntry> {
        let (state, next) = match entry.phase() {
            Phase::Waiting(at) => ("waiting", Some(at / 1000)),
            Phase::Held => ("held", None),
            Phase::Active(_) => ("active", None),
            Phase::Out => ("handing_off", None),
            Phase::Pinned => ("pinned", None),
        };
        let envelope = self.envelope(id)?;
        Some(QueueEntry {
            id,
            state: state.into(),
            sender: envelope.sender,
            recipients: envelope.recipients,
            attempts: envelope.attempts,
            next_attempt_at: next,
            received_at: envelope.received_at,
            size: None,
        })
    }
}

#[derive(Debug, Clone, Copy)]
enum Retirement {
    /// Every recipient is final.
    Finished,
    /// `queue.max_age` passed.
    Expired,
    /// An operator bounced it.
    Bounced,
    /// An operator deleted it (no notice).
    Deleted,
}
