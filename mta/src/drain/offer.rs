//! One worker of a drain's pass: offers messages, one at a time, to the peers in their
//! order until one takes each, and keeps the others for a later offer.
//!
//! The pin: before a message is offered to a peer, that peer is written into its envelope
//! (`handoff_peer`, synced). An offer whose outcome is unknown (the request may have
//! reached the peer) leaves the pin, and a pinned message is offered to its peer first and,
//! unless that peer answers that it stored nothing, to no other: only that peer can tell
//! whether it has the message, and another would deliver it a second time. A peer that is
//! unreachable or refuses goes last for every other message for a while ([`PeerHealth`]).
//!
//! A pin names the peer by address and, when the peer told (its `GET /admin/drain`), by
//! its spool identity. A peer pod that comes back at another address (a restart gives it
//! a new IP; its spool and its record of what it stored are on its volume) is found by
//! that identity among the listed peers and asked again there. A pinned peer that is
//! neither listed nor found is given up on: the message goes elsewhere (a duplicate is
//! possible, never a loss).
//!
//! Never: removes a message here (the scheduler does, on [`Drain::handed_over`]); offers a
//! pinned message to a second peer while the first may have it.

use super::{Drain, handoff};
use crate::queue::{Envelope, QueueId, schedule};
use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// A peer that failed is tried after the others for this long.
const PEER_PENALTY: Duration = Duration::from_secs(5);

/// What a pass is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    /// A drain: every message to the first peer that takes it.
    HandOver,
    /// Serving: pinned messages to their own peer only; one the peer does not have is
    /// unpinned and delivered from here.
    Resolve,
}

/// One worker of a pass.
pub(super) struct Offer {
    pub(super) drain: Arc<Drain>,
    pub(super) peers: Arc<[String]>,
    pub(super) health: Arc<PeerHealth>,
    /// The listed peers' spool identities, learnt once per pass.
    pub(super) identities: Arc<Identities>,
    pub(super) generation: u64,
    pub(super) mode: Mode,
}

/// What one message's offers came to.
enum Offered {
    /// A peer has it.
    Taken,
    /// No peer took it (the last error).
    Kept(Box<Envelope>, String),
}

impl Offer {
    /// Offers messages from `work` until it is empty; returns the last error.
    pub(super) async fn work(
        self,
        work: &Mutex<VecDeque<(QueueId, Envelope)>>,
        token: &str,
    ) -> Option<String> {
        let mut client = handoff::Client::new(token);
        let mut last_error = None;
        loop {
            let next = work.lock().unwrap_or_else(|e| e.into_inner()).pop_front();
            let Some((id, envelope)) = next else {
                return last_error;
            };
            if self.mode == Mode::HandOver && !self.drain.current(self.generation) {
                // Cancelled: not offered, back to the queue.
                self.drain.ctx.scheduler.check_in(id, envelope);
                continue;
            }
            match self.offer(&mut client, id, envelope).await {
                Offered::Taken => self.drain.handed_over(id),
                Offered::Kept(envelope, error) => {
                    tracing::warn!(queue_id = %id, error, "hand-over: kept for another offer");
                    last_error = Some(error);
                    self.drain.keep(self.generation, id, *envelope);
                }
            }
        }
    }

    /// Offers one message to the peers in its order until one takes it. See the module
    /// doc for the pin.
    async fn offer(
        &self,
        client: &mut handoff::Client,
        id: QueueId,
        mut envelope: Envelope,
    ) -> Offered {
        let ctx = &self.drain.ctx;
        let content = match ctx.spool.read_message(id).await {
            Ok(content) => content,
            Err(e) => {
                return Offered::Kept(Box::new(envelope), format!("cannot read the message: {e}"));
            }
        };
        let expires_at = envelope.expires_at.unwrap_or_else(|| {
            schedule::expires_at_ms(&ctx.config().queue, envelope.received_at) / 1000
        });
        let request = handoff::Request::new(self.drain.origin(id), &envelope, expires_at, &content);
        let body = match serde_json::to_vec(&request) {
            Ok(body) => Bytes::from(body),
            Err(e) => {
                return Offered::Kept(
                    Box::new(envelope),
                    format!("cannot encode the message: {e}"),
                );
            }
        };
        drop(request);
        let mut order = self.health.order(&self.peers, id);
        if let Some(pinned) = envelope.handoff_peer.clone() {
            if self.peers.contains(&pinned) {
                order.retain(|p| *p != pinned);
                order.insert(0, pinned);
            } else if let Some(moved) = self.find_moved(client, &envelope).await {
                // The same peer at another address: only it can say whether it has it.
                tracing::info!(queue_id = %id, from = %pinned, to = %moved, "hand-over: the peer last offered this message is back at another address");
                envelope.handoff_peer = Some(moved.clone());
                if let Err(e) = ctx.spool.update(id, &envelope).await {
                    envelope.handoff_peer = Some(pinned);
                    return Offered::Kept(
                        Box::new(envelope),
                        format!("cannot record the peer's new address: {e}"),
                    );
                }
                order.retain(|p| *p != moved);
                order.insert(0, moved);
            } else {
                // Gone from the operator's list of Ready peers: if it had the message it
                // delivers it, and this copy would be a second one; but it may as well
                // never have had it, and mail must not stay here for ever.
                tracing::warn!(queue_id = %id, peer = %pinned, "hand-over: the peer last offered this message is no longer listed; offering it elsewhere");
                envelope.handoff_peer = None;
                envelope.handoff_peer_spool = None;
            }
        }
        if self.mode == Mode::Resolve {
            // Its own peer only: if that one has it not, it is delivered from here.
            order.truncate(1);
        }
        let mut last_error = "no peer".to_owned();
        for peer in order {
            // Offered to it before with the outcome unknown: only it can say.
            let pinned_earlier = envelope.handoff_peer.as_deref() == Some(peer.as_str());
            if let Err(e) = client.connect(&peer).await {
                self.health.failed(&peer);
                last_error = e;
                if pinned_earlier {
                    break;
                }
                continue;
            }
            if !pinned_earlier {
                let spool = self.identities.of(client, &peer).await;
                let before = (
                    envelope.handoff_peer.replace(peer.clone()),
                    std::mem::replace(&mut envelope.handoff_peer_spool, spool),
                );
                if let Err(e) = ctx.spool.update(id, &envelope).await {
                    // Nothing sent: either pin on disk is as good.
                    (envelope.handoff_peer, envelope.handoff_peer_spool) = before;
                    return Offered::Kept(
                        Box::new(envelope),
                        format!("cannot record the peer: {e}"),
                    );
                }
            }
            match client.send(&peer, body.clone()).await {
                handoff::Outcome::Stored | handoff::Outcome::Duplicate => return Offered::Taken,
                handoff::Outcome::NotSent(e) => {
                    self.health.failed(&peer);
                    last_error = e;
                    if pinned_earlier {
                        break;
                    }
                    // Not sent this time: the pin on disk is stale but harmless (after
                    // a crash that peer is asked first, and answers).
                    envelope.handoff_peer = None;
                    envelope.handoff_peer_spool = None;
                }
                handoff::Outcome::Refused { detail, .. } => {
                    // It stored nothing: the message is free to go elsewhere.
                    self.health.failed(&peer);
                    envelope.handoff_peer = None;
                    envelope.handoff_peer_spool = None;
                    ctx.spool.update_detached(id, &envelope);
                    last_error = detail;
                }
                handoff::Outcome::Unknown(e) => {
                    self.health.failed(&peer);
                    return Offered::Kept(
                        Box::new(envelope),
                        format!("{e} (offered to this peer again, to no other)"),
                    );
                }
            }
        }
        Offered::Kept(Box::new(envelope), last_error)
    }
}

impl Offer {
    /// The listed peer whose spool is the one `envelope` is pinned to, if any.
    async fn find_moved(
        &self,
        client: &mut handoff::Client,
        envelope: &Envelope,
    ) -> Option<String> {
        let wanted = envelope.handoff_peer_spool.as_deref()?;
        for peer in self.peers.iter() {
            if self.identities.of(client, peer).await.as_deref() == Some(wanted) {
                return Some(peer.clone());
            }
        }
        None
    }
}

/// The spool identities of a pass's peers, each asked once (a failure too is remembered
/// for the pass: the pin then names the address only).
#[derive(Default)]
pub(super) struct Identities {
    known: Mutex<HashMap<String, Option<String>>>,
}

impl Identities {
    async fn of(&self, client: &mut handoff::Client, peer: &str) -> Option<String> {
        if let Some(known) = self
            .known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(peer)
        {
            return known.clone();
        }
        let learnt = match client.connect(peer).await {
            Ok(()) => client.identity(peer).await,
            Err(e) => Err(e),
        };
        let spool = match learnt {
            Ok(spool) => Some(spool),
            Err(e) => {
                tracing::debug!(
                    peer,
                    error = e,
                    "hand-over: the peer's spool identity is unknown"
                );
                None
            }
        };
        self.known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(peer.to_owned(), spool.clone());
        spool
    }
}

/// Peers that failed lately in a pass go last.
#[derive(Default)]
pub(super) struct PeerHealth {
    failed_until: Mutex<HashMap<String, Instant>>,
}

impl PeerHealth {
    fn failed(&self, peer: &str) {
        let now = Instant::now();
        let mut failed = self.failed_until.lock().unwrap_or_else(|e| e.into_inner());
        failed.retain(|_, until| *until > now);
        failed.insert(peer.to_owned(), now + PEER_PENALTY);
    }

    /// The peers in the order to offer message `id`: healthy before failing, then by
    /// rendezvous hashing, so messages spread over the peers and each message has the
    /// same first choice every time.
    fn order(&self, peers: &[String], id: QueueId) -> Vec<String> {
        use std::hash::{Hash, Hasher};
        let now = Instant::now();
        let failed = self.failed_until.lock().unwrap_or_else(|e| e.into_inner());
        let mut ranked: Vec<(bool, u64, &String)> = peers
            .iter()
            .map(|peer| {
                let mut hasher = std::hash::DefaultHasher::new();
                (peer, id.0).hash(&mut hasher);
                let failing = failed.get(peer).is_some_and(|until| *until > now);
                (failing, hasher.finish(), peer)
            })
            .collect();
        ranked.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        ranked
            .into_iter()
            .map(|(_, _, peer)| peer.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_order_is_stable_per_message_and_spreads() {
        let peers: Vec<String> = ["a:1", "b:1", "c:1"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let health = PeerHealth::default();
        let first = health.order(&peers, QueueId(42));
        assert_eq!(
            health.order(&peers, QueueId(42)),
            first,
            "same order every time"
        );
        let mut firsts = std::collections::HashSet::new();
        for id in 0..100 {
            firsts.insert(health.order(&peers, QueueId(id))[0].clone());
        }
        assert_eq!(firsts.len(), 3, "every peer is somebody's first choice");
        health.failed(&first[0]);
        let after = health.order(&peers, QueueId(42));
        assert_eq!(after.last(), Some(&first[0]), "a failing peer goes last");
    }
}
