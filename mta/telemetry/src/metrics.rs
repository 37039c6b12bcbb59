//! The MTA's instruments: one prometheus-client registry served on `/metrics`, mirrored
//! into OpenTelemetry instruments that the OTLP exporter pushes when it is configured.
//!
//! Every method records into both. The OpenTelemetry side uses the global meter provider
//! as it is when [`MtaMetrics::new`] runs: call [`crate::init`] first. Without an OTLP
//! endpoint that provider is the no-op one, and the mirror costs a virtual call.
//!
//! Names follow the OpenTelemetry semantic conventions where they exist (there are none
//! for SMTP), otherwise `petrel_mta_*` with the unit as suffix. Labels are closed sets
//! (`&'static str` or enums): never an address, a host name or a queue id.
//!
//! | Prometheus | labels | OTLP |
//! |---|---|---|
//! | `petrel_mta_smtp_sessions_total` | | `petrel.mta.smtp.sessions` |
//! | `petrel_mta_smtp_sessions_active` | | `petrel.mta.smtp.sessions.active` |
//! | `petrel_mta_smtp_replies_total` | `command`, `class` | `petrel.mta.smtp.replies` |
//! | `petrel_mta_messages_accepted_total` | | `petrel.mta.messages.accepted` |
//! | `petrel_mta_message_size_bytes` | | `petrel.mta.message.size` |
//! | `petrel_mta_accept_duration_seconds` | | `petrel.mta.accept.duration` |
//! | `petrel_mta_delivery_attempts_total` | `outcome` | `petrel.mta.delivery.attempts` |
//! | `petrel_mta_delivery_duration_seconds` | `outcome` | `petrel.mta.delivery.duration` |
//! | `petrel_mta_delivery_failures_total` | `outcome`, `class` | `petrel.mta.delivery.failures` |
//! | `petrel_mta_messages_bounced_total` | | `petrel.mta.messages.bounced` |
//! | `petrel_mta_messages_expired_total` | | `petrel.mta.messages.expired` |
//! | `petrel_mta_queue_messages` | `state` | `petrel.mta.queue.messages` |
//! | `petrel_mta_spool_sync_duration_seconds` | | `petrel.mta.spool.sync.duration` |
//! | `petrel_mta_spool_sync_batch_messages` | | `petrel.mta.spool.sync.batch` |
//! | `petrel_mta_tls_handshakes_total` | `result` | `petrel.mta.tls.handshakes` |
//! | `petrel_mta_tls_certificate_expiry_seconds` | | `petrel.mta.tls.certificate.expiry` |
//! | `petrel_mta_tls_reloads_total` | `result` | `petrel.mta.tls.reloads` |
//! | `petrel_mta_proxy_headers_total` | `result` | `petrel.mta.proxy.headers` |
//! | `petrel_mta_auth_failures_total` | | `petrel.mta.auth.failures` |
//! | `petrel_mta_rate_limited_total` | `limit` | `petrel.mta.rate_limited` |
//! | `petrel_mta_dkim_keys` | `domain`, `selector`, `signing` | `petrel.mta.dkim.keys` |
//! | `petrel_mta_drain_state` | `state` | `petrel.mta.drain.state` |
//! | `petrel_mta_handoff_messages_total` | `direction` | `petrel.mta.handoff.messages` |
//! | `petrel_mta_rate_limit_backend` | `backend` | `petrel.mta.rate_limit.backend` |
//! | `petrel_mta_rate_limit_fallbacks_total` | | `petrel.mta.rate_limit.fallbacks` |
//! | `petrel_mta_site_throttles_total` | `site` | `petrel.mta.site.throttles` |
//! | `petrel_mta_site_suspensions_total` | `site` | `petrel.mta.site.suspensions` |
//! | `petrel_mta_site_connections_limit` | `site` | `petrel.mta.site.connections.limit` |
//! | `petrel_mta_site_message_rate_limit` | `site` | `petrel.mta.site.message_rate.limit` |
//!
//! `site` (outbound shaping) is the name of a `queue.sites` rule, a closed set the config
//! chooses; the counters put every site found by MX rollup under `other`, and the gauges
//! exist only for named sites, since MX sets are as many as the destinations.
//! | `petrel_mta_otel_spans_dropped_total` | `reason` | (not mirrored) |
//! | `petrel_mta_otel_spans_exported_total` | | (not mirrored) |

use std::sync::Arc;
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{
    Counter as OtelCounter, Gauge as OtelGauge, Histogram as OtelHistogram, UpDownCounter,
};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use std::sync::atomic::AtomicU64;

use crate::export;

/// What one delivery attempt came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The next hop took responsibility (2xx), or the local store has it.
    Delivered,
    /// Temporary failure (4xx, timeout, DNS): retried later.
    Deferred,
    /// Permanent failure (5xx): the sender gets a notice.
    Failed,
}

impl Outcome {
    /// The label value: `delivered`, `deferred`, `failed`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Delivered => "delivered",
            Outcome::Deferred => "deferred",
            Outcome::Failed => "failed",
        }
    }
}

/// The states a queued message can be in, for the queue depth gauge.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QueueState {
    /// Waiting for its next attempt.
    Waiting,
    /// Held by an administrator.
    Held,
    /// Being delivered right now.
    Active,
    /// In the spool since before a restart and not scheduled yet: start-up recovery
    /// schedules the queue in the background, so until it ends the other states count
    /// only part of it.
    Recovering,
}

impl QueueState {
    /// The label value: `waiting`, `held`, `active`, `recovering`.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueState::Waiting => "waiting",
            QueueState::Held => "held",
            QueueState::Active => "active",
            QueueState::Recovering => "recovering",
        }
    }
}

/// What became of a certificate pair that changed on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TlsReload {
    /// The new pair is served from the next handshake on.
    Loaded,
    /// The new pair did not load (unreadable, or key and certificate do not match):
    /// the previous one is still served.
    Refused,
}

impl TlsReload {
    /// The label value: `loaded`, `refused`.
    pub fn as_str(self) -> &'static str {
        match self {
            TlsReload::Loaded => "loaded",
            TlsReload::Refused => "refused",
        }
    }
}

/// Where a drain (issue 16) stands. `petrel_mta_drain_state` has one series per state, 1
/// for the current one and 0 for the others (the state-set convention), so
/// `petrel_mta_drain_state{state="drained"} == 1` says it in a query.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DrainState {
    /// Taking mail as usual.
    Serving,
    /// Refusing new mail, delivering as usual until the drain's deadline.
    Draining,
    /// Handing what is left to peers.
    HandingOff,
    /// Nothing left; the drained marker is written.
    Drained,
}

impl DrainState {
    pub const ALL: [DrainState; 4] = [
        DrainState::Serving,
        DrainState::Draining,
        DrainState::HandingOff,
        DrainState::Drained,
    ];

    /// The label value (and the state in `GET /admin/drain`): `serving`, `draining`,
    /// `handing_off`, `drained`.
    pub fn as_str(self) -> &'static str {
        match self {
            DrainState::Serving => "serving",
            DrainState::Draining => "draining",
            DrainState::HandingOff => "handing_off",
            DrainState::Drained => "drained",
        }
    }
}

/// Where rate limits and outbound connections per destination are counted (issue 16):
/// `petrel_mta_rate_limit_backend` is 1 for the backend in use and 0 for the other.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RateLimitBackend {
    /// The fleet's counters and connection leases in Redis.
    Redis,
    /// This pod's own counters (no Redis configured, or Redis unreachable: then with the
    /// pod's share of each rate and of each destination's connections).
    Local,
}

impl RateLimitBackend {
    pub const ALL: [RateLimitBackend; 2] = [RateLimitBackend::Redis, RateLimitBackend::Local];

    /// The label value: `redis` or `local`.
    pub fn as_str(self) -> &'static str {
        match self {
            RateLimitBackend::Redis => "redis",
            RateLimitBackend::Local => "local",
        }
    }
}

/// Which way a handed-over message went, for `petrel_mta_handoff_messages_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HandoffDirection {
    /// This MTA handed a message to a peer, which stored it (or already had it).
    Sent,
    /// This MTA stored a message a peer handed over.
    Received,
    /// This MTA was handed a message it already had (a resend after a crash), and did not
    /// store it again.
    Duplicate,
}

impl HandoffDirection {
    /// The label value: `sent`, `received`, `duplicate`.
    pub fn as_str(self) -> &'static str {
        match self {
            HandoffDirection::Sent => "sent",
            HandoffDirection::Received => "received",
            HandoffDirection::Duplicate => "duplicate",
        }
    }
}

/// The class of an SMTP reply code, as a label value.
pub fn reply_class(code: u16) -> &'static str {
    match code / 100 {
        2 => "2xx",
        3 => "3xx",
        4 => "4xx",
        5 => "5xx",
        _ => "other",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReplyLabels {
    command: &'static str,
    class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    outcome: &'static str,
    class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DkimKeyLabels {
    domain: String,
    selector: String,
    signing: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SiteLabels {
    site: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    backend: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Latency buckets for the accept path: 1 ms to 16 s.
const ACCEPT_BUCKETS: (f64, f64, u16) = (0.001, 2.0, 15);
/// Latency buckets for delivery attempts: 10 ms to about 160 s.
const DELIVERY_BUCKETS: (f64, f64, u16) = (0.01, 2.0, 15);
/// Message size buckets: 1 KiB to 64 MiB.
const SIZE_BUCKETS: (f64, f64, u16) = (1024.0, 4.0, 9);
/// fdatasync latency buckets: 100 µs to about 1.6 s.
const SYNC_BUCKETS: (f64, f64, u16) = (0.0001, 2.0, 15);
/// Group-commit batch size buckets: 1 to 512 messages.
const BATCH_BUCKETS: (f64, f64, u16) = (1.0, 2.0, 10);

fn buckets((start, factor, n): (f64, f64, u16)) -> Vec<f64> {
    exponential_buckets(start, factor, n).collect()
}

fn delivery_histogram() -> Histogram {
    Histogram::new(buckets(DELIVERY_BUCKETS))
}

/// The `result` label values of `petrel_mta_proxy_headers_total`: a header read (`ok`,
/// `local`), or why a connection was closed without one.
pub const PROXY_HEADER_RESULTS: [&str; 7] = [
    "ok",
    "local",
    "untrusted",
    "closed",
    "malformed",
    "timeout",
    "io_error",
];

/// The MTA's metrics. Cheap to clone: every clone records into the same instruments.
#[derive(Clone)]
pub struct MtaMetrics {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for MtaMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MtaMetrics").finish_non_exhaustive()
    }
}

struct Inner {
    registry: Registry,
    prom: Prom,
    otel: Otel,
}

struct Prom {
    sessions: Counter,
    sessions_active: Gauge,
    replies: Family<ReplyLabels, Counter>,
    accepted: Counter,
    message_size: Histogram,
    accept_duration: Histogram,
    delivery_attempts: Family<OutcomeLabels, Counter>,
    delivery_duration: HistogramFamily<OutcomeLabels>,
    delivery_failures: Family<FailureLabels, Counter>,
    bounced: Counter,
    expired: Counter,
    queue: Family<StateLabels, Gauge>,
    sync_duration: Histogram,
    sync_batch: Histogram,
    tls_handshakes: Family<ResultLabels, Counter>,
    tls_certificate_expiry: Gauge,
    tls_reloads: Family<ResultLabels, Counter>,
    proxy_headers: Family<ResultLabels, Counter>,
    auth_failures: Counter,
    rate_limited: Family<LimitLabels, Counter>,
    dkim_keys: Family<DkimKeyLabels, Gauge>,
    drain_state: Family<StateLabels, Gauge>,
    handoff_messages: Family<DirectionLabels, Counter>,
    rate_limit_backend: Family<BackendLabels, Gauge>,
    rate_limit_fallbacks: Counter,
    site_throttles: Family<SiteLabels, Counter>,
    site_suspensions: Family<SiteLabels, Counter>,
    site_connections_limit: Family<SiteLabels, Gauge>,
    site_message_rate_limit: Family<SiteLabels, Gauge<f64, AtomicU64>>,
}

struct Otel {
    sessions: OtelCounter<u64>,
    sessions_active: UpDownCounter<i64>,
    replies: OtelCounter<u64>,
    accepted: OtelCounter<u64>,
    message_size: OtelHistogram<u64>,
    accept_duration: OtelHistogram<f64>,
    delivery_attempts: OtelCounter<u64>,
    delivery_duration: OtelHistogram<f64>,
    delivery_failures: OtelCounter<u64>,
    bounced: OtelCounter<u64>,
    expired: OtelCounter<u64>,
    queue: OtelGauge<u64>,
    sync_duration: OtelHistogram<f64>,
    sync_batch: OtelHistogram<u64>,
    tls_handshakes: OtelCounter<u64>,
    tls_certificate_expiry: OtelGauge<i64>,
    tls_reloads: OtelCounter<u64>,
    proxy_headers: OtelCounter<u64>,
    auth_failures: OtelCounter<u64>,
    rate_limited: OtelCounter<u64>,
    dkim_keys: OtelGauge<u64>,
    drain_state: OtelGauge<u64>,
    handoff_messages: OtelCounter<u64>,
    rate_limit_backend: OtelGauge<u64>,
    rate_limit_fallbacks: OtelCounter<u64>,
    site_throttles: OtelCounter<u64>,
    site_suspensions: OtelCounter<u64>,
    site_connections_limit: OtelGauge<u64>,
    site_message_rate_limit: OtelGauge<f64>,
}

impl Default for MtaMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl MtaMetrics {
    /// A fresh registry with every instrument registered (and zero), plus the
    /// OpenTelemetry mirror on the current global meter provider.
    pub fn new() -> Self {
        let prom = Prom {
            sessions: Counter::default(),
            sessions_active: Gauge::default(),
            replies: Family::default(),
            accepted: Counter::default(),
            message_size: Histogram::new(buckets(SIZE_BUCKETS)),
            accept_duration: Histogram::new(buckets(ACCEPT_BUCKETS)),
            delivery_attempts: Family::default(),
            delivery_duration: Family::new_with_constructor(delivery_histogram),
            delivery_failures: Family::default(),
            bounced: Counter::default(),
            expired: Counter::default(),
            queue: Family::default(),
            sync_duration: Histogram::new(buckets(SYNC_BUCKETS)),
            sync_batch: Histogram::new(buckets(BATCH_BUCKETS)),
            tls_handshakes: Family::default(),
            tls_certificate_expiry: Gauge::default(),
            tls_reloads: Family::default(),
            proxy_headers: Family::default(),
            auth_failures: Counter::default(),
            rate_limited: Family::default(),
            dkim_keys: Family::default(),
            drain_state: Family::default(),
            handoff_messages: Family::default(),
            rate_limit_backend: Family::default(),
            rate_limit_fallbacks: Counter::default(),
            site_throttles: Family::default(),
            site_suspensions: Family::default(),
            site_connections_limit: Family::default(),
            site_message_rate_limit: Family::default(),
        };
        // Known label values start at zero, so a scraper sees the series before the
        // first event and `rate()` works from the start.
        for outcome in [Outcome::Delivered, Outcome::Deferred, Outcome::Failed] {
            let _ = prom.delivery_attempts.get_or_create(&OutcomeLabels {
                outcome: outcome.as_str(),
            });
        }
        for state in [QueueState::Waiting, QueueState::Held, QueueState::Active] {
            let _ = prom.queue.get_or_create(&StateLabels {
                state: state.as_str(),
            });
        }
        for result in ["ok", "error"] {
            let _ = prom.tls_handshakes.get_or_create(&ResultLabels { result });
        }
        for result in [TlsReload::Loaded, TlsReload::Refused] {
            let _ = prom.tls_reloads.get_or_create(&ResultLabels {
                result: result.as_str(),
            });
        }
        for result in PROXY_HEADER_RESULTS {
            let _ = prom.proxy_headers.get_or_create(&ResultLabels { result });
        }
        for state in DrainState::ALL {
            let current = i64::from(state == DrainState::Serving);
            prom.drain_state
                .get_or_create(&StateLabels {
                    state: state.as_str(),
                })
                .set(current);
        }
        for direction in [
            HandoffDirection::Sent,
            HandoffDirection::Received,
            HandoffDirection::Duplicate,
        ] {
            let _ = prom.handoff_messages.get_or_create(&DirectionLabels {
                direction: direction.as_str(),
            });
        }
        for backend in RateLimitBackend::ALL {
            prom.rate_limit_backend
                .get_or_create(&BackendLabels {
                    backend: backend.as_str(),
                })
                .set(i64::from(backend == RateLimitBackend::Local));
        }

        let mut registry = Registry::default();
        let r = registry.sub_registry_with_prefix("petrel_mta");
        r.register(
            "smtp_sessions",
            "SMTP sessions started",
            prom.sessions.clone(),
        );
        r.register(
            "smtp_sessions_active",
            "SMTP sessions in progress",
            prom.sessions_active.clone(),
        );
        r.register(
            "smtp_replies",
            "SMTP replies sent, by command and reply class",
            prom.replies.clone(),
        );
        r.register(
            "messages_accepted",
            "Messages accepted (250 after DATA/BDAT, spooled)",
            prom.accepted.clone(),
        );
        r.register_with_unit(
            "message_size",
            "Size of accepted messages",
            Unit::Bytes,
            prom.message_size.clone(),
        );
        r.register_with_unit(
            "accept_duration",
            "From end of data to the 250 reply (spool write and sync)",
            Unit::Seconds,
            prom.accept_duration.clone(),
        );
        r.register(
            "delivery_attempts",
            "Delivery attempts, by outcome",
            prom.delivery_attempts.clone(),
        );
        r.register_with_unit(
            "delivery_duration",
            "Duration of delivery attempts, by outcome",
            Unit::Seconds,
            prom.delivery_duration.clone(),
        );
        r.register(
            "delivery_failures",
            "Recipients deferred or failed by a delivery attempt, by outcome and class (a fixed set of names)",
            prom.delivery_failures.clone(),
        );
        r.register(
            "messages_bounced",
            "Non-delivery notices generated",
            prom.bounced.clone(),
        );
        r.register(
            "messages_expired",
            "Messages that reached the queue lifetime",
            prom.expired.clone(),
        );
        r.register(
            "queue_messages",
            "Messages in the queue, by state",
            prom.queue.clone(),
        );
        r.register_with_unit(
            "spool_sync_duration",
            "Latency of one group-commit fdatasync",
            Unit::Seconds,
            prom.sync_duration.clone(),
        );
        r.register(
            "spool_sync_batch_messages",
            "Messages made durable by one group-commit fdatasync",
            prom.sync_batch.clone(),
        );
        r.register(
            "tls_handshakes",
            "Inbound TLS handshakes, by result",
            prom.tls_handshakes.clone(),
        );
        r.register_with_unit(
            "tls_certificate_expiry",
            "notAfter of the served TLS certificate, as Unix time (0: none loaded)",
            Unit::Seconds,
            prom.tls_certificate_expiry.clone(),
        );
        r.register(
            "tls_reloads",
            "Changed certificate files seen, by result (a refused pair leaves the old one in use)",
            prom.tls_reloads.clone(),
        );
        r.register(
            "proxy_headers",
            "PROXY protocol headers on proxy_protocol listeners, by result",
            prom.proxy_headers.clone(),
        );
        r.register(
            "auth_failures",
            "Failed SMTP AUTH attempts",
            prom.auth_failures.clone(),
        );
        r.register(
            "rate_limited",
            "Commands refused by a rate limit, by limit",
            prom.rate_limited.clone(),
        );
        r.register(
            "dkim_keys",
            "DKIM keys loaded from the config (1 each), with whether mail is signed with them",
            prom.dkim_keys.clone(),
        );
        r.register(
            "drain_state",
            "Where a drain stands: 1 for the current state (serving, draining, handing_off, drained), 0 for the others",
            prom.drain_state.clone(),
        );
        r.register(
            "handoff_messages",
            "Messages handed over between peers by drains: sent (a peer took it), received (stored from a peer), duplicate (a resend recognised, not stored again)",
            prom.handoff_messages.clone(),
        );
        r.register(
            "rate_limit_backend",
            "Where rate limits and connections per destination are counted: 1 for the backend in use (redis: the fleet's counters and leases; local: this pod's, with its share of each rate and of each destination's connections while Redis is unreachable), 0 for the other",
            prom.rate_limit_backend.clone(),
        );
        r.register(
            "rate_limit_fallbacks",
            "Switches from the fleet's Redis counters and leases to this pod's share (Redis unreachable or too slow)",
            prom.rate_limit_fallbacks.clone(),
        );
        r.register(
            "site_throttles",
            "Throttle replies (too many connections, rate limited) that lowered a site's limits, by site (a queue.sites name, or other)",
            prom.site_throttles.clone(),
        );
        r.register(
            "site_suspensions",
            "Sites suspended after repeated throttles or connection failures, by site (a queue.sites name, or other)",
            prom.site_suspensions.clone(),
        );
        r.register(
            "site_connections_limit",
            "Connections a named site (queue.sites) may have open from this pod now",
            prom.site_connections_limit.clone(),
        );
        r.register(
            "site_message_rate_limit",
            "Messages per second a named site (queue.sites) is sent now; 0: no limit",
            prom.site_message_rate_limit.clone(),
        );
        export::register(r);

        Self {
            inner: Arc::new(Inner {
                registry,
                prom,
                otel: Otel::new(),
            }),
        }
    }

    /// An SMTP session started (connection accepted).
    pub fn session_started(&self) {
        let i = &self.inner;
        i.prom.sessions.inc();
        i.prom.sessions_active.inc();
        i.otel.sessions.add(1, &[]);
        i.otel.sessions_active.add(1, &[]);
    }

    /// An SMTP session ended, for any reason.
    pub fn session_ended(&self) {
        let i = &self.inner;
        i.prom.sessions_active.dec();
        i.otel.sessions_active.add(-1, &[]);
    }

    /// A reply was sent to `command` (an upper-case verb such as `"RCPT"`, or a
    /// pseudo-command such as `"CONNECT"` or `"DATA-END"`; keep the set closed).
    pub fn reply(&self, command: &'static str, code: u16) {
        let i = &self.inner;
        let class = reply_class(code);
        i.prom
            .replies
            .get_or_create(&ReplyLabels { command, class })
            .inc();
        i.otel.replies.add(
            1,
            &[
                KeyValue::new("command", command),
                KeyValue::new("class", class),
            ],
        );
    }

    /// A message was accepted: `size` bytes, `accept_latency` from end of data to `250`.
    pub fn message_accepted(&self, size: u64, accept_latency: Duration) {
        let i = &self.inner;
        i.prom.accepted.inc();
        i.prom.message_size.observe(size as f64);
        i.prom.accept_duration.observe(accept_latency.as_secs_f64());
        i.otel.accepted.add(1, &[]);
        i.otel.message_size.record(size, &[]);
        i.otel
            .accept_duration
            .record(accept_latency.as_secs_f64(), &[]);
    }

    /// One delivery attempt ended with `outcome` after `latency`.
    /// A recipient deferred or failed by an attempt, with its class: one of a fixed set
    /// of names chosen by the caller (never reply text), so the series stay bounded.
    pub fn delivery_failure(&self, outcome: Outcome, class: &'static str) {
        let i = &self.inner;
        let labels = FailureLabels {
            outcome: outcome.as_str(),
            class,
        };
        i.prom.delivery_failures.get_or_create(&labels).inc();
        let attrs = [
            KeyValue::new("outcome", outcome.as_str()),
            KeyValue::new("class", class),
        ];
        i.otel.delivery_failures.add(1, &attrs);
    }

    pub fn delivery_attempt(&self, outcome: Outcome, latency: Duration) {
        let i = &self.inner;
        let labels = OutcomeLabels {
            outcome: outcome.as_str(),
        };
        i.prom.delivery_attempts.get_or_create(&labels).inc();
        i.prom
            .delivery_duration
            .get_or_create(&labels)
            .observe(latency.as_secs_f64());
        let attrs = [KeyValue::new("outcome", outcome.as_str())];
        i.otel.delivery_attempts.add(1, &attrs);
        i.otel
            .delivery_duration
            .record(latency.as_secs_f64(), &attrs);
    }

    /// A non-delivery notice was generated.
    pub fn message_bounced(&self) {
        self.inner.prom.bounced.inc();
        self.inner.otel.bounced.add(1, &[]);
    }

    /// A message reached its queue lifetime.
    pub fn message_expired(&self) {
        self.inner.prom.expired.inc();
        self.inner.otel.expired.add(1, &[]);
    }

    /// There are now `n` messages in `state`.
    pub fn set_queue_depth(&self, state: QueueState, n: u64) {
        let i = &self.inner;
        i.prom
            .queue
            .get_or_create(&StateLabels {
                state: state.as_str(),
            })
            .set(i64::try_from(n).unwrap_or(i64::MAX));
        i.otel
            .queue
            .record(n, &[KeyValue::new("state", state.as_str())]);
    }

    /// One group commit: `fdatasync` took `latency` and made `batch_size` messages durable.
    pub fn spool_sync(&self, latency: Duration, batch_size: usize) {
        let i = &self.inner;
        i.prom.sync_duration.observe(latency.as_secs_f64());
        i.prom.sync_batch.observe(batch_size as f64);
        i.otel.sync_duration.record(latency.as_secs_f64(), &[]);
        i.otel.sync_batch.record(batch_size as u64, &[]);
    }

    /// An inbound TLS handshake finished (`ok`) or failed.
    pub fn tls_handshake(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.inner
            .prom
            .tls_handshakes
            .get_or_create(&ResultLabels { result })
            .inc();
        self.inner
            .otel
            .tls_handshakes
            .add(1, &[KeyValue::new("result", result)]);
    }

    /// The certificate now served expires at `not_after` (Unix seconds).
    pub fn set_tls_certificate_expiry(&self, not_after: i64) {
        self.inner.prom.tls_certificate_expiry.set(not_after);
        self.inner
            .otel
            .tls_certificate_expiry
            .record(not_after, &[]);
    }

    /// The certificate files changed on disk and the new pair was loaded or refused.
    pub fn tls_reload(&self, result: TlsReload) {
        self.inner
            .prom
            .tls_reloads
            .get_or_create(&ResultLabels {
                result: result.as_str(),
            })
            .inc();
        self.inner
            .otel
            .tls_reloads
            .add(1, &[KeyValue::new("result", result.as_str())]);
    }

    /// A connection to a `proxy_protocol` listener got its header (`ok`, or `local` when
    /// the header names no client) or was closed for the want of one; `result` is one of
    /// [`PROXY_HEADER_RESULTS`].
    pub fn proxy_header(&self, result: &'static str) {
        debug_assert!(PROXY_HEADER_RESULTS.contains(&result), "{result}");
        self.inner
            .prom
            .proxy_headers
            .get_or_create(&ResultLabels { result })
            .inc();
        self.inner
            .otel
            .proxy_headers
            .add(1, &[KeyValue::new("result", result)]);
    }

    /// An AUTH attempt failed.
    pub fn auth_failure(&self) {
        self.inner.prom.auth_failures.inc();
        self.inner.otel.auth_failures.add(1, &[]);
    }

    /// A rate limit refused something; `limit` names the limit (`"client_ip"`, `"user"`, ...).
    pub fn rate_limited(&self, limit: &'static str) {
        self.inner
            .prom
            .rate_limited
            .get_or_create(&LimitLabels { limit })
            .inc();
        self.inner
            .otel
            .rate_limited
            .add(1, &[KeyValue::new("limit", limit)]);
    }

    /// The DKIM keys now loaded: `(domain, selector, signs)`. Replaces the previous set,
    /// so a key taken out of the config disappears from the scrape (the operator reads
    /// this to know every pod has a key before it makes it sign, and has stopped signing
    /// with the old one before its retirement clock starts). The labels come from the
    /// config, so their number is bounded by it.
    pub fn set_dkim_keys(&self, keys: &[(String, String, bool)]) {
        let i = &self.inner;
        i.prom.dkim_keys.clear();
        for (domain, selector, signs) in keys {
            let signing = if *signs { "true" } else { "false" };
            i.prom
                .dkim_keys
                .get_or_create(&DkimKeyLabels {
                    domain: domain.clone(),
                    selector: selector.clone(),
                    signing,
                })
                .set(1);
            i.otel.dkim_keys.record(
                1,
                &[
                    KeyValue::new("domain", domain.clone()),
                    KeyValue::new("selector", selector.clone()),
                    KeyValue::new("signing", signing),
                ],
            );
        }
    }

    /// The drain is now in `state`.
    pub fn set_drain_state(&self, state: DrainState) {
        let i = &self.inner;
        for each in DrainState::ALL {
            let current = u64::from(each == state);
            i.prom
                .drain_state
                .get_or_create(&StateLabels {
                    state: each.as_str(),
                })
                .set(current as i64);
            i.otel
                .drain_state
                .record(current, &[KeyValue::new("state", each.as_str())]);
        }
    }

    /// Rate limits are now counted in `backend`.
    pub fn set_rate_limit_backend(&self, backend: RateLimitBackend) {
        let i = &self.inner;
        for each in RateLimitBackend::ALL {
            let current = u64::from(each == backend);
            i.prom
                .rate_limit_backend
                .get_or_create(&BackendLabels {
                    backend: each.as_str(),
                })
                .set(current as i64);
            i.otel
                .rate_limit_backend
                .record(current, &[KeyValue::new("backend", each.as_str())]);
        }
    }

    /// Redis failed: this pod counts alone, with its share of each rate.
    pub fn rate_limit_fallback(&self) {
        self.inner.prom.rate_limit_fallbacks.inc();
        self.inner.otel.rate_limit_fallbacks.add(1, &[]);
    }

    /// A message was handed over (`direction` says which way it went).
    pub fn handoff(&self, direction: HandoffDirection) {
        self.inner
            .prom
            .handoff_messages
            .get_or_create(&DirectionLabels {
                direction: direction.as_str(),
            })
            .inc();
        self.inner
            .otel
            .handoff_messages
            .add(1, &[KeyValue::new("direction", direction.as_str())]);
    }

    /// A throttle lowered the limits of `site` (a `queue.sites` name, or `other`).
    pub fn site_throttled(&self, site: &str) {
        let i = &self.inner;
        let labels = SiteLabels { site: site.into() };
        i.prom.site_throttles.get_or_create(&labels).inc();
        i.otel
            .site_throttles
            .add(1, &[KeyValue::new("site", site.to_owned())]);
    }

    /// `site` (a `queue.sites` name, or `other`) was suspended.
    pub fn site_suspended(&self, site: &str) {
        let i = &self.inner;
        let labels = SiteLabels { site: site.into() };
        i.prom.site_suspensions.get_or_create(&labels).inc();
        i.otel
            .site_suspensions
            .add(1, &[KeyValue::new("site", site.to_owned())]);
    }

    /// The limits of a named site now: connections, and messages per second (`None`: no
    /// limit, shown as 0).
    pub fn set_site_limits(&self, site: &str, connections: usize, rate: Option<f64>) {
        let i = &self.inner;
        let labels = SiteLabels { site: site.into() };
        let connections = u64::try_from(connections).unwrap_or(u64::MAX);
        let rate = rate.unwrap_or(0.0);
        i.prom
            .site_connections_limit
            .get_or_create(&labels)
            .set(i64::try_from(connections).unwrap_or(i64::MAX));
        i.prom
            .site_message_rate_limit
            .get_or_create(&labels)
            .set(rate);
        let attrs = [KeyValue::new("site", site.to_owned())];
        i.otel.site_connections_limit.record(connections, &attrs);
        i.otel.site_message_rate_limit.record(rate, &attrs);
    }

    /// The registry in the text exposition format (OpenMetrics 1.0, which Prometheus
    /// scrapes natively; it ends with `# EOF`).
    pub fn encode_prometheus(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.inner.registry);
        out
    }
}

impl Otel {
    fn new() -> Self {
        let m = opentelemetry::global::meter("petrel-mta");
        let seconds =
            |name: &'static str, description: &'static str, (start, factor, n): (f64, f64, u16)| {
                m.f64_histogram(name)
                    .with_unit("s")
                    .with_description(description)
                    .with_boundaries(exponential_buckets(start, factor, n).collect())
                    .build()
            };
        Otel {
            sessions: m
                .u64_counter("petrel.mta.smtp.sessions")
                .with_unit("{session}")
                .build(),
            sessions_active: m
                .i64_up_down_counter("petrel.mta.smtp.sessions.active")
                .with_unit("{session}")
                .build(),
            replies: m
                .u64_counter("petrel.mta.smtp.replies")
                .with_unit("{reply}")
                .build(),
            accepted: m
                .u64_counter("petrel.mta.messages.accepted")
                .with_unit("{message}")
                .build(),
            message_size: m
                .u64_histogram("petrel.mta.message.size")
                .with_unit("By")
                .with_boundaries(buckets(SIZE_BUCKETS))
                .build(),
            accept_duration: seconds(
                "petrel.mta.accept.duration",
                "End of data to the 250 reply",
                ACCEPT_BUCKETS,
            ),
            delivery_attempts: m
                .u64_counter("petrel.mta.delivery.attempts")
                .with_unit("{attempt}")
                .build(),
            delivery_duration: seconds(
                "petrel.mta.delivery.duration",
                "Duration of delivery attempts",
                DELIVERY_BUCKETS,
            ),
            delivery_failures: m
                .u64_counter("petrel.mta.delivery.failures")
                .with_unit("{recipient}")
                .build(),
            bounced: m
                .u64_counter("petrel.mta.messages.bounced")
                .with_unit("{message}")
                .build(),
            expired: m
                .u64_counter("petrel.mta.messages.expired")
                .with_unit("{message}")
                .build(),
            queue: m
                .u64_gauge("petrel.mta.queue.messages")
                .with_unit("{message}")
                .build(),
            sync_duration: seconds(
                "petrel.mta.spool.sync.duration",
                "Latency of one group-commit fdatasync",
                SYNC_BUCKETS,
            ),
            sync_batch: m
                .u64_histogram("petrel.mta.spool.sync.batch")
                .with_unit("{message}")
                .with_boundaries(buckets(BATCH_BUCKETS))
                .build(),
            tls_handshakes: m
                .u64_counter("petrel.mta.tls.handshakes")
                .with_unit("{handshake}")
                .build(),
            tls_certificate_expiry: m
                .i64_gauge("petrel.mta.tls.certificate.expiry")
                .with_unit("s")
                .with_description("notAfter of the served TLS certificate, as Unix time")
                .build(),
            tls_reloads: m
                .u64_counter("petrel.mta.tls.reloads")
                .with_unit("{reload}")
                .build(),
            proxy_headers: m
                .u64_counter("petrel.mta.proxy.headers")
                .with_unit("{connection}")
                .build(),
            auth_failures: m
                .u64_counter("petrel.mta.auth.failures")
                .with_unit("{failure}")
                .build(),
            rate_limited: m
                .u64_counter("petrel.mta.rate_limited")
                .with_unit("{refusal}")
                .build(),
            dkim_keys: m
                .u64_gauge("petrel.mta.dkim.keys")
                .with_unit("{key}")
                .build(),
            drain_state: m
                .u64_gauge("petrel.mta.drain.state")
                .with_description("1 for the drain's current state, 0 for the others")
                .build(),
            handoff_messages: m
                .u64_counter("petrel.mta.handoff.messages")
                .with_unit("{message}")
                .build(),
            rate_limit_backend: m
                .u64_gauge("petrel.mta.rate_limit.backend")
                .with_description(
                    "1 for where rate limits are counted (redis, local), 0 for the other",
                )
                .build(),
            rate_limit_fallbacks: m
                .u64_counter("petrel.mta.rate_limit.fallbacks")
                .with_unit("{fallback}")
                .build(),
            site_throttles: m
                .u64_counter("petrel.mta.site.throttles")
                .with_unit("{throttle}")
                .build(),
            site_suspensions: m
                .u64_counter("petrel.mta.site.suspensions")
                .with_unit("{suspension}")
                .build(),
            site_connections_limit: m
                .u64_gauge("petrel.mta.site.connections.limit")
                .with_unit("{connection}")
                .build(),
            site_message_rate_limit: m
                .f64_gauge("petrel.mta.site.message_rate.limit")
                .with_unit("{message}/s")
                .build(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
        text.lines().find(|l| l.starts_with(prefix))
    }

    fn value(text: &str, series: &str) -> f64 {
        let l = line(text, &format!("{series} "))
            .unwrap_or_else(|| panic!("no series {series} in\n{text}"));
        l.rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .expect("a number")
    }

    #[test]
    fn drain_state_is_a_state_set_and_handoffs_count_by_direction() {
        let m = MtaMetrics::new();
        let state =
            |text: &str, s: &str| value(text, &format!(r#"petrel_mta_drain_state{{state="{s}"}}"#));
        let text = m.encode_prometheus();
        assert_eq!(state(&text, "serving"), 1.0);
        assert_eq!(state(&text, "drained"), 0.0);
        let handoffs = |text: &str, d: &str| {
            value(
                text,
                &format!(r#"petrel_mta_handoff_messages_total{{direction="{d}"}}"#),
            )
        };
        assert_eq!(
            handoffs(&text, "duplicate"),
            0.0,
            "known series start at zero"
        );
        m.set_drain_state(DrainState::HandingOff);
        m.handoff(HandoffDirection::Sent);
        m.handoff(HandoffDirection::Sent);
        m.handoff(HandoffDirection::Duplicate);
        let text = m.encode_prometheus();
        for s in DrainState::ALL {
            let expected = if s == DrainState::HandingOff {
                1.0
            } else {
                0.0
            };
            assert_eq!(state(&text, s.as_str()), expected, "{s:?}");
        }
        assert_eq!(handoffs(&text, "sent"), 2.0);
        assert_eq!(handoffs(&text, "received"), 0.0);
        assert_eq!(handoffs(&text, "duplicate"), 1.0);
    }

    #[test]
    fn rate_limit_backend_is_a_state_set_and_fallbacks_count() {
        let m = MtaMetrics::new();
        let backend = |text: &str, b: &str| {
            value(
                text,
                &format!(r#"petrel_mta_rate_limit_backend{{backend="{b}"}}"#),
            )
        };
        let text = m.encode_prometheus();
        assert_eq!(backend(&text, "local"), 1.0, "local until Redis answers");
        assert_eq!(backend(&text, "redis"), 0.0);
        assert_eq!(value(&text, "petrel_mta_rate_limit_fallbacks_total"), 0.0);
        m.set_rate_limit_backend(RateLimitBackend::Redis);
        let text = m.encode_prometheus();
        assert_eq!(backend(&text, "redis"), 1.0);
        assert_eq!(backend(&text, "local"), 0.0);
        m.set_rate_limit_backend(RateLimitBackend::Local);
        m.rate_limit_fallback();
        let text = m.encode_prometheus();
        assert_eq!(backend(&text, "local"), 1.0);
        assert_eq!(value(&text, "petrel_mta_rate_limit_fallbacks_total"), 1.0);
    }

    #[test]
    fn site_series_carry_only_the_names_they_are_given() {
        let m = MtaMetrics::new();
        m.site_throttled("other");
        m.site_throttled("bigmail");
        m.site_suspended("bigmail");
        m.set_site_limits("bigmail", 2, Some(4.75));
        let text = m.encode_prometheus();
        for expected in [
            r#"petrel_mta_site_throttles_total{site="other"} 1"#,
            r#"petrel_mta_site_throttles_total{site="bigmail"} 1"#,
            r#"petrel_mta_site_suspensions_total{site="bigmail"} 1"#,
            r#"petrel_mta_site_connections_limit{site="bigmail"} 2"#,
            r#"petrel_mta_site_message_rate_limit{site="bigmail"} 4.75"#,
        ] {
            assert!(text.contains(expected), "{expected} in\n{text}");
        }
    }

    #[test]
    fn dkim_keys_replace_the_previous_set() {
        let m = MtaMetrics::new();
        m.set_dkim_keys(&[
            ("example.com".into(), "petrel-a".into(), true),
            ("example.com".into(), "petrel-b".into(), false),
        ]);
        let text = m.encode_prometheus();
        let series = |selector: &str, signing: &str| {
            format!(
                r#"petrel_mta_dkim_keys{{domain="example.com",selector="{selector}",signing="{signing}"}}"#
            )
        };
        assert_eq!(value(&text, &series("petrel-a", "true")), 1.0);
        assert_eq!(value(&text, &series("petrel-b", "false")), 1.0);
        // The switch: b signs, a is gone from the config and from the scrape.
        m.set_dkim_keys(&[("example.com".into(), "petrel-b".into(), true)]);
        let text = m.encode_prometheus();
        assert_eq!(value(&text, &series("petrel-b", "true")), 1.0);
        assert!(!text.contains("petrel-a"), "{text}");
        assert!(!text.contains(&series("petrel-b", "false")), "{text}");
    }

    #[test]
    fn a_known_sequence_shows_up_in_the_exposition() {
        let m = MtaMetrics::new();
        m.session_started();
        m.session_started();
        m.session_ended();
        m.reply("CONNECT", 220);
        m.reply("RCPT", 250);
        m.reply("RCPT", 250);
        m.reply("RCPT", 550);
        m.reply("DATA", 354);
        m.message_accepted(2000, Duration::from_millis(3));
        m.delivery_attempt(Outcome::Delivered, Duration::from_millis(20));
        m.delivery_attempt(Outcome::Deferred, Duration::from_secs(2));
        m.delivery_attempt(Outcome::Deferred, Duration::from_secs(3));
        m.delivery_failure(Outcome::Deferred, "rate_limit");
        m.delivery_failure(Outcome::Deferred, "rate_limit");
        m.delivery_failure(Outcome::Failed, "bad_mailbox");
        m.message_bounced();
        m.message_expired();
        m.message_expired();
        m.set_queue_depth(QueueState::Waiting, 7);
        m.set_queue_depth(QueueState::Waiting, 5);
        m.set_queue_depth(QueueState::Held, 1);
        m.spool_sync(Duration::from_micros(800), 12);
        m.tls_handshake(true);
        m.tls_handshake(false);
        m.tls_handshake(false);
        m.auth_failure();
        m.rate_limited("client_ip");
        m.set_tls_certificate_expiry(1_800_000_000);
        m.tls_reload(TlsReload::Refused);

        let text = m.encode_prometheus();
        assert_eq!(value(&text, "petrel_mta_smtp_sessions_total"), 2.0);
        assert_eq!(value(&text, "petrel_mta_smtp_sessions_active"), 1.0);
        assert_eq!(
            value(
                &text,
                r#"petrel_mta_smtp_replies_total{command="RCPT",class="2xx"}"#
            ),
            2.0
        );
        assert_eq!(
            value(
                &text,
                r#"petrel_mta_smtp_replies_total{command="RCPT",class="5xx"}"#
            ),
            1.0
        );
        assert_eq!(
            value(
                &text,
                r#"petrel_mta_smtp_replies_total{command="DATA",class="3xx"}"#
            ),
            1.0
        );
        assert_eq!(value(&text, "petrel_mta_messages_accepted_total"), 1.0);
        assert_eq!(value(&text, "petrel_mta_message_size_bytes_sum"), 2000.0);
        assert_eq!(value(&text, "petrel_mta_message_size_bytes_count"), 1.0);
        assert_eq!(
            value(
                &text,
                r#"petrel_mta_message_size_bytes_bucket{le="1024.0"}"#
            ),
            0.0
        );
        assert_eq!(
            value(
                &text,
                r#"petrel_mta_message_size_bytes_bucket{le="4096.0"}"#
            ),
            1.0
        );
        assert_eq!(
            value(&text, "petrel_mta_accept_duration_seconds_count"),
            1.0
        );
        assert_eq!(
            value(
                &text,
                r#"petrel_mta_delivery_attempts_total{outcome="delivered"}"#
            ),
            1.0
        );
        assert_eq!(
            value(
                &text,
                r#"petrel_mta_delivery_attempts_total{outcome="deferred"}"#
            ),
            2.0
        );
        assert_eq!(
            value(
                &text,
                r#"petrel_mta_delivery_failures_total{outcome="deferred",class="rate_limit"}"#
            ),
            2.0
        );
        assert_eq!(
            value(
                &text,
                r#"petrel_mta_delivery_failures_total{outcome="failed",class="bad_mailbox"}"#
            ),
            1.0
        );
        assert_eq!(
            value(
                &text,
                r#"petrel_mta_delivery_attempts_total{outcome="failed"}"#
            ),
            0.0
        );
        assert_eq!(
            value(
                &text,
                r#"petrel_mta_delivery_duration_seconds_sum{outcome="deferred"}"#
            ),
            5.0
        );
        assert_eq!(value(&text, "petrel_mta_messages_bounced_total"), 1.0);
        assert_eq!(value(&text, "petrel_mta_messages_expired_total"), 2.0);
        assert_eq!(
            value(&text, r#"petrel_mta_queue_messages{state="waiting"}"#),
            5.0
        );
        assert_eq!(
            value(&text, r#"petrel_mta_queue_messages{state="held"}"#),
            1.0
        );
        assert_eq!(
            value(&text, r#"petrel_mta_queue_messages{state="active"}"#),
            0.0
        );
        assert_eq!(
            value(&text, "petrel_mta_spool_sync_batch_messages_sum"),
            12.0
        );
        assert_eq!(
            value(&text, "petrel_mta_spool_sync_duration_seconds_count"),
            1.0
        );
        assert_eq!(
            value(&text, r#"petrel_mta_tls_handshakes_total{result="ok"}"#),
            1.0
        );
        assert_eq!(
            value(&text, r#"petrel_mta_tls_handshakes_total{result="error"}"#),
            2.0
        );
        assert_eq!(
            value(&text, "petrel_mta_tls_certificate_expiry_seconds"),
            1_800_000_000.0
        );
        assert_eq!(
            value(&text, r#"petrel_mta_tls_reloads_total{result="refused"}"#),
            1.0
        );
        assert_eq!(
            value(&text, r#"petrel_mta_tls_reloads_total{result="loaded"}"#),
            0.0
        );
        assert_eq!(value(&text, "petrel_mta_auth_failures_total"), 1.0);
        assert_eq!(
            value(&text, r#"petrel_mta_rate_limited_total{limit="client_ip"}"#),
            1.0
        );
        assert!(
            line(&text, "petrel_mta_otel_spans_dropped_total").is_some(),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn clones_share_instruments_and_registries_are_separate() {
        let a = MtaMetrics::new();
        let b = MtaMetrics::new();
        a.clone().auth_failure();
        assert_eq!(
            value(&a.encode_prometheus(), "petrel_mta_auth_failures_total"),
            1.0
        );
        assert_eq!(
            value(&b.encode_prometheus(), "petrel_mta_auth_failures_total"),
            0.0
        );
    }

    #[test]
    fn reply_classes() {
        assert_eq!(reply_class(220), "2xx");
        assert_eq!(reply_class(334), "3xx");
        assert_eq!(reply_class(421), "4xx");
        assert_eq!(reply_class(554), "5xx");
        assert_eq!(reply_class(99), "other");
    }
}
