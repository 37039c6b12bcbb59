//! Drain on scale-in (issue 16): this MTA stops taking mail, keeps delivering for a while,
//! hands every message left to a peer, and says when its spool is empty with a durable
//! marker on its volume, so the operator can remove the pod and its volume without
//! stranding mail. Also the receiving side: storing what a draining peer hands over.
//!
//! States ([`State`]): `serving` → (drain asked) `draining`: new mail refused (see
//! `context::Intake`), delivery as usual → (after `deliver_for_secs`, or at once when
//! nothing is left) `handing_off`: no new attempt rounds, messages checked out of the
//! queue and offered to peers → (spool empty) `drained`: the marker is written. Asking
//! again in any state updates the peers and keeps going (idempotent). [`Drain::cancel`]
//! returns to `serving`. A restart comes back `serving` (the operator asks again), or
//! `drained` when the marker is there.
//!
//! What is handed over: every queued message not in an attempt round, waiting, deferred
//! and held alike, with its whole queue state (see [`handoff`]). Held ones stay held at
//! the peer: an operator held them for a reason; delivering them would overrule that and
//! dropping them would lose mail. A message in a round is handed over when its round ends.
//!
//! Exactly once, on this side: a message leaves this spool only after a peer answered that
//! it stored it (or already had it). Before a message is offered to a peer, that peer is
//! written into its envelope (`handoff_peer`, synced): when the answer is lost (a timeout,
//! a crash on either side) the message is offered to that same peer again, which
//! recognises it ([`origins`]), and to no other, which would deliver it a second time. A
//! peer that fails is skipped for the next one for every other message; a message whose
//! fate at a peer is unknown waits for that peer (or for the operator to drop it from the
//! peer list). When no peer takes a message, it is kept and offered again a second later;
//! the last error is reported. Such a *pinned* message found while serving (after a
//! restart, or a cancelled drain) starts no attempt round here: the drain offers it to its
//! peer only, until the peer takes it (or had it) or answers that it stored nothing (then
//! it is delivered here as usual).
//!
//! The marker (`<spool dir>/petrel-drained`) is written (synced, with its directory) only
//! when the queue and the spool are empty, no SMTP connection is open, and the spool's
//! records are synced: after a crash it never claims an empty spool that recovery would
//! refill. A pod that starts with its marker and an empty spool reports `drained` and
//! keeps refusing mail: it is about to be removed with its volume, and mail taken now
//! would go with it. [`Drain::cancel`] (`DELETE /admin/drain`, `petrel-mta queue drain
//! --cancel`) removes the marker and takes mail again.
//!
//! Never: deletes a message no peer has acknowledged; offers a message whose fate at one
//! peer is unknown to another; writes the marker while anything is queued; takes a
//! hand-over while draining (two draining pods would pass messages back and forth).

pub mod handoff;
pub mod http;
mod offer;
pub mod origins;
pub mod token;

use crate::cleanup;
use crate::context::Context;
use crate::queue::{Envelope, HandoffOrigin, QueueId};
use crate::shutdown::Shutdown;
use mta_telemetry::{DrainState, HandoffDirection};
use offer::{Mode, Offer, PeerHealth};
use origins::{Claim, Origins};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use token::FleetToken;
use tokio::sync::Notify;
use tokio::time::Instant;

/// The marker's name in the spool directory.
pub const MARKER: &str = "petrel-drained";

/// The spool identity's file name in the spool directory.
pub const SPOOL_ID: &str = "petrel-spool-id";

/// `deliver_for_secs` when a request does not say.
pub const DEFAULT_DELIVER_FOR_SECS: u64 = 30;

/// Messages offered per pass (checked out of the queue at once).
const BATCH: usize = 256;

/// Offers in flight at once (each with its own connection per peer).
const WORKERS: usize = 16;

/// How long a kept message waits before it is offered again.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Pinned messages wait this much longer for a fleet token to ask their peer with.
const PINNED_WITHOUT_TOKEN: Duration = Duration::from_secs(9);

/// How often progress is looked at while nothing else wakes the drain.
const POLL: Duration = Duration::from_millis(200);

/// Most peers in one request.
const MAX_PEERS: usize = 64;

/// Where a drain stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Taking mail as usual.
    Serving,
    /// Refusing new mail; delivering as usual until the deadline.
    Draining,
    /// Handing what is left to peers.
    HandingOff,
    /// Spool empty, marker written.
    Drained,
}

impl State {
    fn metric(self) -> DrainState {
        match self {
            State::Serving => DrainState::Serving,
            State::Draining => DrainState::Draining,
            State::HandingOff => DrainState::HandingOff,
            State::Drained => DrainState::Drained,
        }
    }
}

/// What a drain request asks (`POST /admin/drain`, `petrel-mta queue drain`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// Peers to hand over to: the other Ready pods' HTTP ports, `host:port`.
    #[serde(default)]
    pub peers: Vec<String>,
    /// How long to keep delivering before handing over. Default: 30.
    #[serde(default = "default_deliver_for")]
    pub deliver_for_secs: u64,
}

fn default_deliver_for() -> u64 {
    DEFAULT_DELIVER_FOR_SECS
}

/// Progress, as `GET /admin/drain` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub state: State,
    /// Messages in the spool.
    pub left: u64,
    /// Messages delivered (every recipient final) since the drain began.
    pub delivered: u64,
    /// Messages peers took since the drain began (in this process).
    pub handed_off: u64,
    /// The marker file exists.
    pub marker: bool,
    pub peers: Vec<String>,
    /// The last hand-over error, while messages are kept for a retry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// This spool's identity: how a draining peer recognises this MTA at a new address.
    #[serde(default)]
    pub spool: String,
}

/// Drain operations on the loopback admin endpoint (`petrel-mta queue drain`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "op")]
pub enum AdminDrain {
    /// Start or update a drain.
    Drain(Plan),
    /// Report progress.
    DrainStatus,
    /// Stop draining: take mail again, remove the marker.
    DrainCancel,
}

/// What became of a hand-over offered to this MTA.
#[derive(Debug)]
pub enum Received {
    /// Stored (synced), origin on record, queued.
    Stored(QueueId),
    /// Stored here before: nothing done.
    Duplicate,
    /// This MTA drains: it takes none.
    Draining,
    /// The spool refused it: nothing stored.
    NotStored(String),
}

/// A message the drain keeps checked out for another offer.
struct Kept {
    id: QueueId,
    envelope: Envelope,
    at: Instant,
}

struct Progress {
    state: State,
    peers: Vec<String>,
    deadline: Option<Instant>,
    /// The scheduler's `finished` count when the drain began.
    delivered_base: u64,
    handed_off: u64,
    error: Option<String>,
    /// Bumped by every start and cancel: work begun under an older one does not change
    /// the state.
    generation: u64,
    retry: Vec<Kept>,
}

/// The drain controller and hand-over receiver. See the module doc.
pub struct Drain {
    ctx: Arc<Context>,
    origins: Arc<Origins>,
    token: FleetToken,
    /// This pod's name and spool identity: the origin of what it hands over.
    pod: String,
    spool_id: String,
    marker: PathBuf,
    progress: Mutex<Progress>,
    /// Peers that failed lately go last, across passes: a peer that is gone (a deleted
    /// pod's address may not even refuse the connection) costs one wait, not one per pass.
    health: Arc<PeerHealth>,
    changed: Notify,
    /// Held while the marker is written or removed with the state that goes with it.
    marker_lock: tokio::sync::Mutex<()>,
    /// True once start-up recovery has scheduled every queued message and put their
    /// origins on record: hand-overs wait for it, so a resend of a message this spool
    /// holds is always recognised.
    recovered: tokio::sync::watch::Sender<bool>,
}

impl std::fmt::Debug for Drain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Drain")
            .field("pod", &self.pod)
            .field("spool_id", &self.spool_id)
            .finish_non_exhaustive()
    }
}

/// Where the drain task stands after one step.
enum Step {
    /// Go on at once.
    Continue,
    /// Wait for a request, or until then.
    Wait(Option<Instant>),
}

impl Drain {
    /// Sets up the drain of the MTA whose spool `ctx` holds: reads (or creates) the
    /// spool's identity, opens the origins record, and looks for the marker. Start-up
    /// recovery then adds the origins of the messages it finds
    /// ([`Drain::recovered_origins`]) and says when it is done
    /// ([`Drain::recovery_complete`]); hand-overs wait for that.
    pub fn open(ctx: Arc<Context>) -> std::io::Result<Arc<Drain>> {
        let config = ctx.config();
        let dir = ctx.spool.dir().to_owned();
        let spool_id = spool_identity(&dir)?;
        let origins = Origins::open(&dir, config.queue.max_age, std::iter::empty())?;
        let queued = ctx.spool.len();
        let marker = dir.join(MARKER);
        let mut state = State::Serving;
        if marker.exists() {
            if queued == 0 {
                tracing::info!(marker = %marker.display(), "drained marker found: not taking mail (petrel-mta queue drain --cancel takes it again)");
                ctx.intake.stop();
                state = State::Drained;
            } else {
                tracing::warn!(marker = %marker.display(), messages = queued, "drained marker found beside queued messages: removed");
                crate::files::remove_durably(&marker)?;
            }
        }
        ctx.metrics.set_drain_state(state.metric());
        Ok(Arc::new(Drain {
            pod: pod_name(&config.hostname),
            ctx,
            origins,
            token: FleetToken::default(),
            spool_id,
            marker,
            progress: Mutex::new(Progress {
                state,
                peers: Vec::new(),
                deadline: None,
                delivered_base: 0,
                handed_off: 0,
                error: None,
                generation: 0,
                retry: Vec::new(),
            }),
            health: Arc::default(),
            changed: Notify::new(),
            marker_lock: tokio::sync::Mutex::new(()),
            recovered: tokio::sync::watch::Sender::new(false),
        }))
    }

    /// Start-up recovery found these messages with hand-over origins in the spool: the
    /// origins go on record (durably) before the messages are scheduled.
    pub async fn recovered_origins(
        &self,
        in_spool: &[(HandoffOrigin, u64)],
    ) -> std::io::Result<()> {
        self.origins.add_in_spool(in_spool).await
    }

    /// Returns once start-up recovery has scheduled every message the spool held.
    pub async fn recovered(&self) {
        let _ = self.recovered.subscribe().wait_for(|done| *done).await;
    }

    /// Start-up recovery is over: hand-overs are taken from now on.
    pub fn recovery_complete(&self) {
        self.recovered.send_replace(true);
        // Its first look at the queue after recovery finds the pinned messages.
        self.changed.notify_one();
    }

    /// The fleet token (for the HTTP endpoints).
    pub fn token(&self) -> &FleetToken {
        &self.token
    }

    /// The config in force.
    pub fn config(&self) -> Arc<mta_config::MtaConfig> {
        self.ctx.config()
    }

    pub fn state(&self) -> State {
        self.lock().state
    }

    /// Starts a drain, or updates the peers of the one going on. Returns the state, or why
    /// the request is refused (a malformed peer).
    pub async fn start(&self, plan: Plan) -> Result<State, String> {
        let peers = check_peers(&plan.peers)?;
        let finished = self
            .ctx
            .scheduler
            .stats()
            .await
            .map(|s| s.finished)
            .unwrap_or(0);
        let now = Instant::now();
        let deadline = now + Duration::from_secs(plan.deliver_for_secs.min(365 * 24 * 3600));
        let state = {
            let mut p = self.lock();
            match p.state {
                State::Serving => {
                    self.ctx.intake.stop();
                    p.state = State::Draining;
                    p.deadline = Some(deadline);
                    p.delivered_base = finished;
                    p.handed_off = 0;
                    p.error = None;
                    p.generation += 1;
                    tracing::info!(
                        ?peers,
                        deliver_for_secs = plan.deliver_for_secs,
                        "draining: new mail refused"
                    );
                }
                // Asked again: may hurry the hand-over, never delays it.
                State::Draining => p.deadline = p.deadline.map(|d| d.min(deadline)),
                // New peers: offer the kept messages again now.
                State::HandingOff => {
                    for kept in &mut p.retry {
                        kept.at = now;
                    }
                }
                State::Drained => {}
            }
            p.peers = peers;
            p.state
        };
        self.ctx.metrics.set_drain_state(state.metric());
        self.changed.notify_one();
        Ok(state)
    }

    /// Stops draining: mail is taken again, attempt rounds resume, the messages kept for
    /// another offer go back to the queue, and the marker is removed.
    pub async fn cancel(&self) -> Result<State, String> {
        let _marker = self.marker_lock.lock().await;
        let kept = {
            let mut p = self.lock();
            p.state = State::Serving;
            p.generation += 1;
            p.deadline = None;
            p.error = None;
            std::mem::take(&mut p.retry)
        };
        for kept in kept {
            self.ctx.scheduler.check_in(kept.id, kept.envelope);
        }
        self.ctx.scheduler.resume_rounds();
        self.ctx.intake.resume();
        self.ctx.metrics.set_drain_state(DrainState::Serving);
        self.changed.notify_one();
        let marker = self.marker.clone();
        tokio::task::spawn_blocking(move || crate::files::remove_durably(&marker))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("cannot remove the drained marker: {e}"))?;
        tracing::info!("drain cancelled: taking mail again");
        Ok(State::Serving)
    }

    /// Progress.
    pub async fn report(&self) -> Report {
        let finished = self.ctx.scheduler.stats().await.map(|s| s.finished);
        let p = self.lock();
        let delivered = match (p.state, finished) {
            (State::Serving, _) | (_, None) => 0,
            (_, Some(finished)) => finished.saturating_sub(p.delivered_base),
        };
        Report {
            state: p.state,
            left: self.ctx.spool.len() as u64,
            delivered,
            handed_off: p.handed_off,
            marker: self.marker.exists(),
            peers: p.peers.clone(),
            error: p.error.clone(),
            spool: self.spool_id.clone(),
        }
    }

    /// The loopback admin endpoint's drain operations.
    pub async fn admin(&self, op: AdminDrain) -> Result<Report, String> {
        match op {
            AdminDrain::Drain(plan) => {
                self.start(plan).await?;
            }
            AdminDrain::DrainStatus => {}
            AdminDrain::DrainCancel => {
                self.cancel().await?;
            }
        }
        Ok(self.report().await)
    }

    /// Stores a message a draining peer hands over, unless it was stored here before
    /// (by origin) or this MTA drains itself. Run it to completion (spawned): the origin
    /// goes on record only after the store, and the message is queued only after that.
    pub async fn receive(
        &self,
        origin: HandoffOrigin,
        envelope: Envelope,
        content: Vec<u8>,
    ) -> Received {
        // Until recovery has put every origin in the spool on record, a resend could look
        // new.
        self.recovered().await;
        let claimed = match self.origins.claim(&origin, envelope.received_at).await {
            Claim::Known => {
                tracing::info!(origin_pod = %origin.pod, origin_id = %origin.id, "hand-over already stored here: duplicate");
                self.ctx.metrics.handoff(HandoffDirection::Duplicate);
                return Received::Duplicate;
            }
            Claim::Claimed(claimed) => claimed,
        };
        if self.state() != State::Serving {
            return Received::Draining;
        }
        match cleanup::store_handed_off(&self.ctx, envelope, &content).await {
            Err(e) => Received::NotStored(e.to_string()),
            Ok(stored) => {
                if let Err(e) = claimed.record().await {
                    // Still known in memory, and in the stored envelope for the next start.
                    tracing::error!(queue_id = %stored.id(), error = %e, "hand-over origin not recorded");
                }
                let id = stored.enqueue(&self.ctx);
                self.ctx.metrics.handoff(HandoffDirection::Received);
                Received::Stored(id)
            }
        }
    }

    /// The drain task: idle while serving, and runs the drain when asked. Ends at shutdown
    /// (messages out for an offer stay in the spool, pinned to their peer).
    pub async fn run(self: Arc<Self>, mut shutdown: Shutdown) {
        loop {
            let step = self.step().await;
            let wake = match step {
                Step::Continue => continue,
                Step::Wait(wake) => wake,
            };
            tokio::select! {
                () = self.changed.notified() => {}
                () = sleep_until(wake) => {}
                () = shutdown.recv() => return,
            }
        }
    }

    async fn step(self: &Arc<Self>) -> Step {
        let (state, deadline, generation) = {
            let p = self.lock();
            (p.state, p.deadline, p.generation)
        };
        let now = Instant::now();
        match state {
            State::Serving => self.resolve_pinned().await,
            State::Drained => Step::Wait(None),
            State::Draining => {
                if deadline.is_some_and(|d| d <= now) || self.nothing_left().await {
                    self.advance(generation, State::HandingOff);
                    return Step::Continue;
                }
                let poll = now + POLL;
                Step::Wait(Some(deadline.map_or(poll, |d| d.min(poll))))
            }
            State::HandingOff => {
                if self.nothing_left().await {
                    return match self.finish(generation).await {
                        Ok(()) => Step::Continue,
                        Err(e) => {
                            self.set_error(generation, e);
                            Step::Wait(Some(now + RETRY_AFTER))
                        }
                    };
                }
                self.pass(generation).await
            }
        }
    }

    /// Nothing queued, nothing in the spool, no SMTP connection that could still bring a
    /// message.
    async fn nothing_left(&self) -> bool {
        if !self.ctx.spool.is_empty() || self.ctx.admission.open() > 0 {
            return false;
        }
        self.ctx
            .scheduler
            .stats()
            .await
            .is_some_and(|s| s.queued == 0)
    }

    /// Writes the marker once the spool is synced and still empty, and reports `drained`.
    async fn finish(&self, generation: u64) -> Result<(), String> {
        let _marker = self.marker_lock.lock().await;
        self.ctx
            .spool
            .sync()
            .await
            .map_err(|e| format!("spool sync before the marker: {e}"))?;
        if !self.nothing_left().await || self.lock().generation != generation {
            return Ok(());
        }
        let (handed_off, delivered_base) = {
            let p = self.lock();
            (p.handed_off, p.delivered_base)
        };
        let finished = self.ctx.scheduler.stats().await.map_or(0, |s| s.finished);
        let text = serde_json::json!({
            "drained_at": unix_now(),
            "handed_off": handed_off,
            "delivered": finished.saturating_sub(delivered_base),
        })
        .to_string()
            + "\n";
        let marker = self.marker.clone();
        tokio::task::spawn_blocking(move || {
            crate::files::replace_durably(&marker, text.as_bytes())
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("cannot write the drained marker: {e}"))?;
        if self.advance(generation, State::Drained) {
            tracing::info!(marker = %self.marker.display(), handed_off, "drained: spool empty, marker written");
        }
        Ok(())
    }

    /// Moves to `state` unless a newer request came in meanwhile.
    fn advance(&self, generation: u64, state: State) -> bool {
        let mut p = self.lock();
        if p.generation != generation {
            return false;
        }
        p.state = state;
        if state == State::Drained {
            p.error = None;
        }
        drop(p);
        self.ctx.metrics.set_drain_state(state.metric());
        if state == State::HandingOff {
            tracing::info!("draining: handing the queue over to peers");
        }
        true
    }

    fn set_error(&self, generation: u64, error: String) {
        let mut p = self.lock();
        if p.generation == generation {
            p.error = Some(error);
        }
    }

    /// One round of offers: the kept messages that are due, plus as many more from the
    /// queue as fit in a batch, offered by [`WORKERS`] workers.
    async fn pass(self: &Arc<Self>, generation: u64) -> Step {
        let now = Instant::now();
        let peers: Arc<[String]> = self.lock().peers.clone().into();
        let token = match (self.fleet_token(), peers.is_empty()) {
            (Err(e), _) => Err(e),
            (Ok(_), true) => {
                Err("no peers to hand over to (POST /admin/drain with peers)".to_owned())
            }
            (Ok(token), false) => Ok(token),
        };
        let token = match token {
            Ok(token) => token,
            Err(e) => {
                self.set_error(generation, e);
                return Step::Wait(Some(now + RETRY_AFTER));
            }
        };
        let (mut work, next_retry) = {
            let mut p = self.lock();
            p.retry.sort_by_key(|k| std::cmp::Reverse(k.at));
            let mut due = VecDeque::new();
            while due.len() < BATCH && p.retry.last().is_some_and(|k| k.at <= now) {
                if let Some(kept) = p.retry.pop() {
                    due.push_back((kept.id, kept.envelope));
                }
            }
            (due, p.retry.last().map(|k| k.at))
        };
        let room = BATCH.saturating_sub(work.len());
        if room > 0 {
            work.extend(self.ctx.scheduler.check_out(room).await);
        }
        if !self.current(generation) {
            // Cancelled (or asked anew) meanwhile: what was taken goes back, and rounds
            // resume (the check-out above may have paused them after the cancel).
            for (id, envelope) in work {
                self.ctx.scheduler.check_in(id, envelope);
            }
            if self.state() == State::Serving {
                self.ctx.scheduler.resume_rounds();
            }
            return Step::Continue;
        }
        if work.is_empty() {
            // Everything left is kept for later, or in a round that has not ended.
            let poll = now + POLL;
            return Step::Wait(Some(next_retry.map_or(poll, |r| r.min(poll))));
        }
        let last_error = self
            .offer_all(work, peers, token, generation, Mode::HandOver)
            .await;
        let mut p = self.lock();
        if p.generation == generation {
            p.error = last_error;
        }
        Step::Continue
    }

    /// While serving: pinned messages (offered before a restart or a cancel, the answer
    /// lost) are offered to their peer again, and to it only, so that whether it has
    /// them is known before they are attempted here.
    async fn resolve_pinned(self: &Arc<Self>) -> Step {
        let pinned = self.ctx.scheduler.stats().await.map_or(0, |s| s.pinned);
        if pinned == 0 {
            return Step::Wait(None);
        }
        let retry = Instant::now() + RETRY_AFTER;
        let token = match self.fleet_token() {
            Ok(token) => token,
            Err(e) => {
                tracing::warn!(
                    pinned,
                    "{e}: pinned messages wait (petrel-mta queue release <id> delivers one from here)"
                );
                return Step::Wait(Some(retry + PINNED_WITHOUT_TOKEN));
            }
        };
        let work: VecDeque<(QueueId, Envelope)> =
            self.ctx.scheduler.check_out_pinned(BATCH).await.into();
        let mut peers: Vec<String> = work
            .iter()
            .filter_map(|(_, e)| e.handoff_peer.clone())
            .collect();
        peers.sort_unstable();
        peers.dedup();
        let generation = self.lock().generation;
        if !work.is_empty() {
            self.offer_all(work, peers.into(), token, generation, Mode::Resolve)
                .await;
        }
        Step::Wait(Some(retry))
    }

    /// Offers `work` with [`WORKERS`] workers; returns the last error.
    async fn offer_all(
        self: &Arc<Self>,
        work: VecDeque<(QueueId, Envelope)>,
        peers: Arc<[String]>,
        token: Arc<str>,
        generation: u64,
        mode: Mode,
    ) -> Option<String> {
        let workers = WORKERS.min(work.len());
        let work = Arc::new(Mutex::new(work));
        let health = self.health.clone();
        let identities = Arc::new(offer::Identities::default());
        let mut running = tokio::task::JoinSet::new();
        for _ in 0..workers {
            let offer = Offer {
                drain: self.clone(),
                peers: peers.clone(),
                health: health.clone(),
                identities: identities.clone(),
                generation,
                mode,
            };
            let work = work.clone();
            let token = token.clone();
            running.spawn(async move { offer.work(&work, &token).await });
        }
        let mut last_error = None;
        while let Some(done) = running.join_next().await {
            match done {
                Ok(Some(error)) => last_error = Some(error),
                Ok(None) => {}
                Err(e) => last_error = Some(format!("hand-over worker failed: {e}")),
            }
        }
        last_error
    }

    /// The fleet token peers want, or why there is none.
    fn fleet_token(&self) -> Result<Arc<str>, String> {
        match &self.ctx.config().admin.fleet_token_file {
            None => Err("admin.fleet_token_file is not set: no peer would take a hand-over".into()),
            Some(file) => self.token.current(file).ok_or_else(|| {
                format!(
                    "no fleet token in {}: no peer would take a hand-over",
                    file.display()
                )
            }),
        }
    }

    /// Whether `generation` is still the drain in force (no cancel or new drain since).
    fn current(&self, generation: u64) -> bool {
        let p = self.lock();
        p.generation == generation && p.state == State::HandingOff
    }

    /// A message no peer took: kept for another offer, or back to the queue when the
    /// drain was cancelled meanwhile.
    fn keep(&self, generation: u64, id: QueueId, envelope: Envelope) {
        let mut p = self.lock();
        if p.generation == generation && p.state == State::HandingOff {
            p.retry.push(Kept {
                id,
                envelope,
                at: Instant::now() + RETRY_AFTER,
            });
        } else {
            drop(p);
            self.ctx.scheduler.check_in(id, envelope);
        }
    }

    fn handed_over(&self, id: QueueId) {
        self.ctx.scheduler.handed_off(id);
        self.ctx.metrics.handoff(HandoffDirection::Sent);
        self.lock().handed_off += 1;
    }

    fn origin(&self, id: QueueId) -> HandoffOrigin {
        HandoffOrigin {
            pod: self.pod.clone(),
            spool: self.spool_id.clone(),
            id: id.to_string(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Checks `host:port` peers and drops repeats.
fn check_peers(peers: &[String]) -> Result<Vec<String>, String> {
    if peers.len() > MAX_PEERS {
        return Err(format!("at most {MAX_PEERS} peers"));
    }
    let mut checked: Vec<String> = Vec::with_capacity(peers.len());
    for peer in peers {
        let valid = peer.rsplit_once(':').is_some_and(|(host, port)| {
            let bracketed = host.starts_with('[') == host.ends_with(']');
            !host.is_empty()
                && host.len() <= 253
                && bracketed
                && host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || ".-_:[]".contains(c))
                && port.parse::<u16>().is_ok_and(|p| p != 0)
        });
        if !valid {
            return Err(format!("peer {peer:?} is not host:port"));
        }
        if !checked.contains(peer) {
            checked.push(peer.clone());
        }
    }
    Ok(checked)
}

/// This pod's name: `POD_NAME` (the downward API), else `HOSTNAME` (a pod's name by
/// default), else the MTA's host name.
fn pod_name(hostname: &str) -> String {
    ["POD_NAME", "HOSTNAME"]
        .iter()
        .find_map(|name| std::env::var(name).ok().filter(|v| !v.trim().is_empty()))
        .unwrap_or_else(|| hostname.to_owned())
}

/// The spool's identity: random, written once into the spool directory, so that origins
/// are unique in the fleet whatever pods are called.
fn spool_identity(dir: &Path) -> std::io::Result<String> {
    let path = dir.join(SPOOL_ID);
    match std::fs::read_to_string(&path) {
        Ok(text) if !text.trim().is_empty() => return Ok(text.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let bytes: [u8; 16] = rand::random();
    let id: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    crate::files::replace_durably(&path, format!("{id}\n").as_bytes())?;
    Ok(id)
}

async fn sleep_until(wake: Option<Instant>) {
    match wake {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_are_host_port() {
        let ok = |p: &[&str]| check_peers(&p.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(
            ok(&[
                "10.0.0.5:8080",
                "mx-1.peers.mail.svc:8080",
                "[::1]:8080",
                "10.0.0.5:8080"
            ]),
            Ok(vec![
                "10.0.0.5:8080".into(),
                "mx-1.peers.mail.svc:8080".into(),
                "[::1]:8080".into()
            ])
        );
        for bad in [
            "10.0.0.5",
            ":8080",
            "10.0.0.5:0",
            "10.0.0.5:http",
            "a b:80",
            "x/y:80",
            "[::1:80",
            "http://x:80",
        ] {
            assert!(ok(&[bad]).is_err(), "{bad}");
        }
    }

    #[test]
    fn admin_drain_lines() {
        let parse =
            |line: &str| serde_json::from_str::<AdminDrain>(line).map_err(|e| e.to_string());
        assert_eq!(
            parse(r#"{"op":"drain","peers":["10.0.0.5:8080"],"deliver_for_secs":5}"#),
            Ok(AdminDrain::Drain(Plan {
                peers: vec!["10.0.0.5:8080".into()],
                deliver_for_secs: 5
            }))
        );
        assert_eq!(
            parse(r#"{"op":"drain"}"#),
            Ok(AdminDrain::Drain(Plan {
                peers: vec![],
                deliver_for_secs: DEFAULT_DELIVER_FOR_SECS
            }))
        );
        assert_eq!(
            parse(r#"{"op":"drain_status"}"#),
            Ok(AdminDrain::DrainStatus)
        );
        assert_eq!(
            parse(r#"{"op":"drain_cancel"}"#),
            Ok(AdminDrain::DrainCancel)
        );
        assert!(
            parse(r#"{"op":"drain","peer":"x:1"}"#).is_err(),
            "unknown field"
        );
        let report = Report {
            state: State::HandingOff,
            left: 3,
            delivered: 1,
            handed_off: 7,
            marker: false,
            peers: vec!["10.0.0.5:8080".into()],
            error: None,
            spool: "d1f0".into(),
        };
        assert_eq!(
            serde_json::to_value(&report).expect("json"),
            serde_json::json!({"state": "handing_off", "left": 3, "delivered": 1,
                "handed_off": 7, "marker": false, "peers": ["10.0.0.5:8080"],
                "spool": "d1f0"})
        );
    }
}
