//! Delivery: per-destination queues of work, and the workers that empty them.
//!
//! The scheduler groups a message's pending recipients by [`Route`] (its destination) and
//! pushes one [`WorkItem`] per group. Each destination runs at most
//! `queue.max_connections_per_destination` workers; a worker takes items one after
//! another, reusing its connection for up to `queue.max_messages_per_connection` messages,
//! and reports each item's per-recipient [`Status`] back to the scheduler. A worker with
//! nothing left to do exits, so an idle destination costs nothing.
//!
//! With `smtpd.rate_limits.redis` set, the SMTP destinations' limit is the fleet's (issue
//! 16): before its first item a worker takes a [`ConnectionLease`] on one of the
//! destination's N connections ([`crate::fleet_limits`]) and holds it until it exits,
//! after its last connection has closed, so the leases held bound the connections open
//! across every pod. While all N are taken one worker per destination waits, asking again
//! every [`SLOT_RETRY_INTERVAL`] (jittered); the others leave, and the waiter starts the
//! next one once it has a slot. Items wait in the queue meanwhile: a full destination is
//! not an attempt, and never defers or bounces mail. Maildir and LMTP routes are this
//! pod's own and are not shared.
//!
//! Outbound shaping (issue 17): besides its destination's limit, an SMTP worker takes a
//! permit of its *site* ([`site`]: the domains sharing one MX host set and TLS policy)
//! once it knows the hosts, and a site rate token before each message; the site's limits
//! adapt to the throttle replies it gets. A worker whose site others are waiting for
//! does not keep its connection open idle: it hands the permit over at once.
//!
//! Routes: local Maildir ([`crate::local`]), LMTP, and SMTP to a smarthost or to the
//! domain's MX hosts ([`route`] resolves them; [`dane`] and [`mta_sts`] say which of them
//! may be used and how; [`smtp`] speaks to them).

pub mod classify;
pub mod dane;
pub mod https;
pub mod mta_sts;
pub mod outbound;
pub mod outcome;
pub mod route;
pub mod site;
pub mod smtp;

use crate::fleet_limits::ConnectionLease;
use crate::local::{self, Delivered};
use crate::queue::{Envelope, QueueId, Status, split_address};
use crate::shutdown::Shutdown;
use mta_config::{LocalDelivery, MtaConfig, RouteAuth, TlsMode};
use mta_telemetry::Outcome;
use mta_telemetry::spans::field;
pub use outbound::Outbound;
use outcome::DeliveryError;
use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tracing::Instrument;

/// Where a group of recipients goes. Two recipients with equal routes share connections.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Route {
    Maildir {
        root: PathBuf,
    },
    Lmtp {
        address: String,
    },
    Smtp {
        next_hop: NextHop,
        tls: TlsMode,
        auth: Option<RouteAuth>,
    },
    /// The recipient cannot be routed; the detail says why. Reported without any I/O.
    Unroutable {
        status: Status,
    },
}

impl Route {
    /// A low-cardinality description for spans: the kind and the next hop.
    pub fn label(&self) -> String {
        match self {
            Route::Maildir { .. } => "maildir".into(),
            Route::Lmtp { address } => format!("lmtp:{address}"),
            Route::Smtp {
                next_hop: NextHop::Mx { domain },
                ..
            } => format!("mx:{domain}"),
            Route::Smtp {
                next_hop: NextHop::Smarthost { host_port },
                ..
            } => format!("smarthost:{host_port}"),
            Route::Unroutable { .. } => "unroutable".into(),
        }
    }

    /// The name of the destination whose connections the fleet shares
    /// (`mx:example.com`, `smarthost:relay.example.net:587`): routes to the same next hop
    /// share it whatever their TLS or credentials. `None` for local routes (Maildir,
    /// LMTP), whose connections are this pod's own.
    pub fn fleet_destination(&self) -> Option<String> {
        match self {
            Route::Smtp {
                next_hop: NextHop::Mx { domain },
                ..
            } => Some(format!("mx:{}", domain.to_ascii_lowercase())),
            Route::Smtp {
                next_hop: NextHop::Smarthost { host_port },
                ..
            } => Some(format!("smarthost:{}", host_port.to_ascii_lowercase())),
            Route::Maildir { .. } | Route::Lmtp { .. } | Route::Unroutable { .. } => None,
        }
    }
}

/// The SMTP next hop.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NextHop {
    /// The recipient domain's MX hosts (RFC 5321 §5.1).
    Mx { domain: String },
    /// A fixed `host:port`.
    Smarthost { host_port: String },
}

/// One message's recipients for one destination.
#[derive(Debug, Clone)]
pub struct WorkItem {
    pub id: QueueId,
    pub envelope: Arc<Envelope>,
    /// Indices into `envelope.recipients`.
    pub recipients: Vec<usize>,
}

/// Decides the route of every pending recipient and groups them, in recipient order.
pub fn group_by_destination(config: &MtaConfig, envelope: &Envelope) -> Vec<(Route, Vec<usize>)> {
    let mut groups: Vec<(Route, Vec<usize>)> = Vec::new();
    for (index, recipient) in envelope.recipients.iter().enumerate() {
        if recipient.status.is_final() {
            continue;
        }
        let route = route_for(config, &recipient.address);
        match groups.iter_mut().find(|(r, _)| *r == route) {
            Some((_, members)) => members.push(index),
            None => groups.push((route, vec![index])),
        }
    }
    groups
}

fn route_for(config: &MtaConfig, address: &str) -> Route {
    let Some((_, domain)) = split_address(address) else {
        return Route::Unroutable {
            status: DeliveryError::AddressWithoutDomain.status(),
        };
    };
    if let Some(local) = config.local_domain(domain) {
        return match &local.delivery {
            LocalDelivery::Maildir { root } => Route::Maildir { root: root.clone() },
            LocalDelivery::Lmtp { address } => Route::Lmtp {
                address: address.clone(),
            },
            LocalDelivery::Relay { host, tls } => Route::Smtp {
                next_hop: NextHop::Smarthost {
                    host_port: host.clone(),
                },
                tls: *tls,
                auth: None,
            },
        };
    }
    let route = config.route(domain);
    Route::Smtp {
        next_hop: match route.and_then(|r| r.smarthost.clone()) {
            Some(host_port) => NextHop::Smarthost { host_port },
            None => NextHop::Mx {
                domain: domain.to_ascii_lowercase(),
            },
        },
        tls: route.map(|r| r.tls).unwrap_or_default(),
        auth: route.and_then(|r| r.auth.clone()),
    }
}

/// All destinations with work or workers.
pub struct Destinations {
    ctx: Arc<Outbound>,
    shutdown: Shutdown,
    queues: HashMap<Route, Arc<Destination>>,
    /// Idle destinations are forgotten when the map grows past this size (so the work
    /// per push stays constant on average, whatever the number of destinations).
    prune_at: usize,
}

struct Destination {
    route: Route,
    /// [`Route::fleet_destination`], computed once.
    fleet_destination: Option<String>,
    state: Mutex<DestinationState>,
    /// Wakes an idle worker when an item arrives.
    arrived: Notify,
}

#[derive(Default)]
struct DestinationState {
    items: VecDeque<WorkItem>,
    workers: usize,
    /// Workers waiting for an item with their connection still open.
    idle: usize,
    /// A worker is waiting for one of the fleet's connection slots: no other starts
    /// until it has one.
    waiting_for_slot: bool,
}

/// Whether a worker with nothing to do keeps its connection open a while for more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Linger {
    Yes,
    No,
}

/// How long a worker keeps its connection open waiting for more work (Postfix's
/// connection cache time is 2s too).
const IDLE_CONNECTION_TIME: Duration = Duration::from_secs(2);

/// How often a worker asks again for a connection slot while the fleet's are all taken
/// (plus up to as much again at random, so that the pods waiting do not ask in step).
pub const SLOT_RETRY_INTERVAL: Duration = Duration::from_millis(100);

impl Destinations {
    pub fn new(ctx: Arc<Outbound>, shutdown: Shutdown) -> Self {
        Self {
            ctx,
            shutdown,
            queues: HashMap::new(),
            prune_at: 64,
        }
    }

    /// Queues an item and starts a worker if the destination has room for one more.
    pub fn push(&mut self, route: Route, item: WorkItem) {
        let limit = self.ctx.config().queue.max_connections_per_destination;
        let destination = self
            .queues
            .entry(route.clone())
            .or_insert_with(|| {
                Arc::new(Destination {
                    fleet_destination: route.fleet_destination(),
                    route,
                    state: Mutex::new(DestinationState::default()),
                    arrived: Notify::new(),
                })
            })
            .clone();
        let start_worker = {
            let mut state = destination.lock();
            state.items.push_back(item);
            let wanted =
                state.workers < limit && state.items.len() > state.idle && !state.waiting_for_slot;
            if wanted {
                state.workers += 1;
            }
            wanted
        };
        destination.arrived.notify_one();
        if start_worker {
            tokio::spawn(worker(self.ctx.clone(), destination, self.shutdown.clone()));
        }
        // Forget destinations that have gone idle, so the map does not grow forever.
        if self.queues.len() > self.prune_at {
            self.queues.retain(|_, d| {
                let state = d.lock();
                state.workers > 0 || !state.items.is_empty()
            });
            self.prune_at = (self.queues.len() * 2).max(64);
        }
    }
}

impl Destination {
    fn lock(&self) -> std::sync::MutexGuard<'_, DestinationState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A connection slot for a new worker: at once for routes the fleet does not share
    /// (and for every route without Redis); else one of the fleet's, waiting for it as
    /// the only waiter of this destination. `None` after the worker has been counted
    /// out: another worker is already waiting, the items are gone, or shutdown.
    async fn connection_slot(
        self: &Arc<Self>,
        ctx: &Arc<Outbound>,
        shutdown: &mut Shutdown,
    ) -> Option<ConnectionLease> {
        let Some(destination) = &self.fleet_destination else {
            return Some(ConnectionLease::unshared());
        };
        let mut waiter = false;
        loop {
            let limit = ctx.config().queue.max_connections_per_destination;
            if let Some(lease) = ctx.limiter.connection_lease(destination, limit).await {
                {
                    let mut state = self.lock();
                    if waiter {
                        state.waiting_for_slot = false;
                    }
                    if state.items.is_empty() {
                        // Another worker took them: give the slot back at once rather
                        // than hold it through an idle wait.
                        state.workers -= 1;
                        return None;
                    }
                }
                if waiter {
                    // Items may be waiting for more workers than there are: the next
                    // one takes its chance (or becomes the waiter).
                    self.start_worker_if_wanted(ctx, shutdown, limit);
                }
                return Some(lease);
            }
            {
                let mut state = self.lock();
                if shutdown.is_shutdown()
                    || state.items.is_empty()
                    || (state.waiting_for_slot && !waiter)
                {
                    if waiter {
                        state.waiting_for_slot = false;
                    }
                    state.workers -= 1;
                    return None;
                }
                state.waiting_for_slot = true;
                waiter = true;
            }
            let jitter = SLOT_RETRY_INTERVAL.mul_f64(rand::random::<f64>());
            tokio::select! {
                () = tokio::time::sleep(SLOT_RETRY_INTERVAL + jitter) => {}
                () = shutdown.recv() => {}
            }
        }
    }

    /// Starts one more worker when items outnumber the workers that could take them
    /// (the caller, holding a slot but no item yet, counts as one that will).
    fn start_worker_if_wanted(
        self: &Arc<Self>,
        ctx: &Arc<Outbound>,
        shutdown: &Shutdown,
        limit: usize,
    ) {
        let start = {
            let mut state = self.lock();
            let wanted = state.workers < limit
                && state.items.len() > state.idle + 1
                && !state.waiting_for_slot;
            if wanted {
                state.workers += 1;
            }
            wanted
        };
        if start {
            tokio::spawn(worker(ctx.clone(), self.clone(), shutdown.clone()));
        }
    }

    /// The next item, waiting up to [`IDLE_CONNECTION_TIME`] for one unless
    /// [`Linger::No`] or until another worker wants the connection's `site`; `None` after
    /// the worker has been counted out.
    async fn next(
        &self,
        shutdown: &mut Shutdown,
        linger: Linger,
        site: Option<&site::Site>,
    ) -> Option<WorkItem> {
        let mut waited = linger == Linger::No;
        loop {
            {
                let mut state = self.lock();
                let item = if shutdown.is_shutdown() {
                    None
                } else {
                    state.items.pop_front()
                };
                if item.is_some() {
                    return item;
                }
                if waited || shutdown.is_shutdown() {
                    state.workers -= 1;
                    return None;
                }
                state.idle += 1;
            }
            let wanted = async {
                match site {
                    Some(site) => site.wanted().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = tokio::time::timeout(IDLE_CONNECTION_TIME, self.arrived.notified()) => {}
                () = shutdown.recv() => {}
                () = wanted => {}
            }
            self.lock().idle -= 1;
            waited = true;
        }
    }
}

async fn worker(ctx: Arc<Outbound>, destination: Arc<Destination>, mut shutdown: Shutdown) {
    // Held until the connection below has closed.
    let Some(slot) = destination.connection_slot(&ctx, &mut shutdown).await else {
        return;
    };
    let mut connection = smtp::Session::new(shutdown.clone());
    loop {
        // Others wait for this connection's site (other domains of the same MX hosts):
        // hand the connection over rather than hold it open idle.
        let linger = if connection.site_contended() {
            Linger::No
        } else {
            Linger::Yes
        };
        let site = connection.site().cloned();
        let Some(item) = destination
            .next(&mut shutdown, linger, site.as_deref())
            .await
        else {
            break;
        };
        let span = mta_telemetry::spans::delivery_attempt(
            &item.id.to_string(),
            &destination.route.label(),
            item.envelope.trace_parent.as_deref(),
        );
        span.record(field::ATTEMPT, i64::from(item.envelope.attempts) + 1);
        span.record(field::RECIPIENTS, item.recipients.len() as i64);
        let began = std::time::Instant::now();
        let results = deliver(&ctx, &destination.route, &item, &mut connection)
            .instrument(span.clone())
            .await;
        let latency = began.elapsed();
        for (index, status) in &results {
            log_result(item.id, &item.envelope.recipients[*index].address, status);
            if let Some(outcome) = metric_outcome(status) {
                ctx.metrics.delivery_attempt(outcome, latency);
                if let Some(verdict) = classify::verdict(status) {
                    ctx.metrics
                        .delivery_failure(outcome, verdict.class.as_str());
                }
            }
        }
        record_outcome(&span, &results);
        let remote_mta = match destination.route {
            Route::Maildir { .. } | Route::Unroutable { .. } => None,
            Route::Lmtp { .. } | Route::Smtp { .. } => connection.remote_host().map(String::from),
        };
        ctx.scheduler.attempted(item.id, results, remote_mta);
    }
    connection.close().await;
    drop(slot);
}

async fn deliver(
    ctx: &Arc<Outbound>,
    route: &Route,
    item: &WorkItem,
    connection: &mut smtp::Session,
) -> Vec<(usize, Status)> {
    if let Route::Unroutable { status } = route {
        return item
            .recipients
            .iter()
            .map(|&i| (i, status.clone()))
            .collect();
    }
    let message = match ctx.spool.read_message(item.id).await {
        Ok(message) => Arc::new(message),
        Err(e) => {
            let status = DeliveryError::Local {
                detail: format!("cannot read queued message: {e}"),
            }
            .status();
            return item
                .recipients
                .iter()
                .map(|&i| (i, status.clone()))
                .collect();
        }
    };
    match route {
        Route::Maildir { root } => deliver_maildir(ctx, root, item, message).await,
        Route::Lmtp { .. } | Route::Smtp { .. } => {
            connection.deliver(ctx, route, item, &message).await
        }
        Route::Unroutable { .. } => Vec::new(),
    }
}

async fn deliver_maildir(
    ctx: &Arc<Outbound>,
    root: &std::path::Path,
    item: &WorkItem,
    message: Arc<Vec<u8>>,
) -> Vec<(usize, Status)> {
    let hostname = ctx.config().hostname.clone();
    let mut results = Vec::with_capacity(item.recipients.len());
    for &index in &item.recipients {
        let address = &item.envelope.recipients[index].address;
        let local_part = split_address(address).map(|(l, _)| l).unwrap_or(address);
        let Some(mailbox) = local::mailbox_name(local_part) else {
            results.push((index, DeliveryError::LocalPartNotAcceptable.status()));
            continue;
        };
        let (root, hostname, message, id) =
            (root.to_owned(), hostname.clone(), message.clone(), item.id);
        let sender = item.envelope.sender.clone();
        let result = tokio::task::spawn_blocking(move || {
            local::deliver(&root, &mailbox, id, index, &hostname, &sender, &message)
        })
        .await;
        let status = match result {
            Ok(Ok(Delivered::New(path))) => {
                outcome::delivered_locally(format!("delivered to {}", path.display()))
            }
            Ok(Ok(Delivered::AlreadyThere(path))) => {
                outcome::delivered_locally(format!("already delivered to {}", path.display()))
            }
            Ok(Err(e)) => DeliveryError::Local {
                detail: format!("maildir write failed: {e}"),
            }
            .status(),
            Err(e) => DeliveryError::Local {
                detail: format!("delivery task failed: {e}"),
            }
            .status(),
        };
        results.push((index, status));
    }
    results
}

fn metric_outcome(status: &Status) -> Option<Outcome> {
    match status {
        Status::Delivered(_) => Some(Outcome::Delivered),
        Status::Deferred(_) => Some(Outcome::Deferred),
        Status::Failed(_) => Some(Outcome::Failed),
        Status::Scheduled => None,
    }
}

/// The attempt's outcome on its span: failed if any recipient failed, deferred if any was
/// deferred, else delivered; the reply code is the first recipient's.
fn record_outcome(span: &tracing::Span, results: &[(usize, Status)]) {
    let outcome = if results.iter().any(|(_, s)| matches!(s, Status::Failed(_))) {
        Outcome::Failed
    } else if results
        .iter()
        .any(|(_, s)| matches!(s, Status::Deferred(_)))
    {
        Outcome::Deferred
    } else {
        Outcome::Delivered
    };
    span.record(field::OUTCOME, outcome.as_str());
    if outcome != Outcome::Delivered {
        span.record(field::STATUS, "error");
    }
    let code = results
        .first()
        .and_then(|(_, s)| s.diagnostic())
        .and_then(|d| d.code);
    if let Some(code) = code {
        span.record(field::REPLY_CODE, i64::from(code));
    }
}

/// One log line per recipient disposition, with the queue id (`grep ID` tells the story)
/// and, for failures, their class and disposition.
fn log_result(id: QueueId, to: &str, status: &Status) {
    let verdict = classify::verdict(status);
    let class = verdict.map(|v| v.class.as_str()).unwrap_or_default();
    let disposition = verdict.map(|v| v.disposition.as_str()).unwrap_or_default();
    match status {
        Status::Delivered(d) => tracing::info!(queue_id = %id, to, detail = %d, "delivered"),
        Status::Deferred(d) => {
            tracing::info!(queue_id = %id, to, detail = %d, class, disposition, "attempt deferred")
        }
        Status::Failed(d) => {
            tracing::warn!(queue_id = %id, to, detail = %d, class, disposition, "failed")
        }
        Status::Scheduled => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smtp(next_hop: NextHop, tls: TlsMode) -> Route {
        Route::Smtp {
            next_hop,
            tls,
            auth: None,
        }
    }

    /// The fleet shares a destination per next hop, whatever the TLS; local routes are
    /// each pod's own.
    #[test]
    fn fleet_destinations_are_next_hops() {
        let mx = |domain: &str| NextHop::Mx {
            domain: domain.into(),
        };
        assert_eq!(
            smtp(mx("example.com"), TlsMode::Opportunistic).fleet_destination(),
            Some("mx:example.com".into())
        );
        assert_eq!(
            smtp(mx("example.com"), TlsMode::Verified).fleet_destination(),
            smtp(mx("Example.COM"), TlsMode::None).fleet_destination()
        );
        let relay = NextHop::Smarthost {
            host_port: "Relay.Example.net:587".into(),
        };
        assert_eq!(
            smtp(relay, TlsMode::Required).fleet_destination(),
            Some("smarthost:relay.example.net:587".into())
        );
        assert_eq!(
            Route::Lmtp {
                address: "127.0.0.1:24".into()
            }
            .fleet_destination(),
            None
        );
        assert_eq!(
            Route::Maildir { root: "/m".into() }.fleet_destination(),
            None
        );
    }
}
