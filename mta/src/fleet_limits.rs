//! Limits shared by the fleet (issue 16): owns the choice, for every rate check and every
//! outbound connection, between the fleet's counters in Redis and this pod's own, and the
//! one connection to that Redis both use. Other fleet-wide state (TLS-RPT's counts and
//! report locks, issue 18) borrows that connection through [`FleetLimiter::query`], with
//! the same timeout and the same up/down tracking.
//!
//! Without `smtpd.rate_limits.redis` every rate check is the local [`RateLimiter`]'s and
//! every connection slot is granted at once (delivery's own per-pod cap,
//! `queue.max_connections_per_destination`, applies alone), unchanged.
//!
//! With it:
//! - **Rates**: a check runs one Lua GCRA script on Redis, keyed like the local limiter
//!   and timed by Redis's own clock (`TIME`), so pods with skewed clocks still share one
//!   schedule.
//! - **Connections per destination**: a delivery worker holds a [`ConnectionLease`] for
//!   as long as it may have a connection open to its destination (MX domain or
//!   smarthost). The leases are a counting semaphore in Redis: one sorted set per
//!   destination (`petrel:conn:mx:example.com`), a member per lease
//!   (`<pod id>:<lease id>`) scored by its expiry on Redis's clock. One script drops the
//!   expired members and admits a lease only while fewer than N remain. Held leases are
//!   renewed every [`LEASE_RENEW_INTERVAL`] by the probe task, and removed (`ZREM`) when
//!   dropped; a crashed pod's leases lapse by themselves after [`LEASE_TTL`]. A refused
//!   lease is not an error: the caller tries again a little later. Rejected alternative:
//!   `INCR`/`DECR` counters, which a crash leaves wrong forever.
//!
//! While Redis cannot answer (no connection yet, an error, or no reply within `timeout`)
//! a rate check is answered at once by the local limiter with this pod's share of the
//! rate (`N / fleet_size`, see [`Rate::share`]), and a connection lease is granted while
//! this pod holds fewer than its share of the destination's connections
//! ([`connection_share`], `N / fleet_size`, at least 1: rounded down like the rates', so
//! the fleet stays within N whenever N is at least the fleet's size). Connections already
//! open stay open. Leases granted alone are written to Redis by the first renewal after
//! it answers again (as are all held leases after a Redis restart), so the fleet's count
//! matches the connections really open, and new ones wait until it is below N.
//!
//! A background task pings Redis every [`PROBE_INTERVAL`] while it is up, and tries to
//! reconnect as often while it is down, so a Redis that comes back is used again within
//! about that long. The backend in use is the gauge `petrel_mta_rate_limit_backend` (for
//! rates and connections alike: they share the connection and so its state); each switch
//! to local counts in `petrel_mta_rate_limit_fallbacks_total` and is logged once.
//!
//! It must never make mail wait on Redis longer than the configured timeout, never
//! retry a Redis call in the path of a session or a delivery, never close a delivery
//! connection because of Redis, and never put a message, an address other than the
//! limiter's key, or the Redis password into a log or a metric.

use crate::limits::RateLimiter;
use mta_config::{Rate, RedisLimitsConfig};
use mta_telemetry::{MtaMetrics, RateLimitBackend};
use redis::aio::MultiplexedConnection;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::time::Instant;

/// How often Redis is pinged while up, and reconnected to while down.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// How long a connection lease lives in Redis unless renewed: how long a crashed pod's
/// connections still count against their destination's limit.
pub const LEASE_TTL: Duration = Duration::from_secs(15);

/// How often held leases are renewed: a third of [`LEASE_TTL`], so one late or failed
/// renewal does not let a lease lapse while its connection is open.
pub const LEASE_RENEW_INTERVAL: Duration = Duration::from_secs(5);

/// Prefix of the Redis keys (`petrel:rate:messages_per_ip:192.0.2.1`).
const KEY_PREFIX: &str = "petrel:rate:";

/// Prefix of the connection lease sets (`petrel:conn:mx:example.com`).
const CONNECTION_KEY_PREFIX: &str = "petrel:conn:";

/// GCRA with Redis's clock, in microseconds. KEYS[1]: the key; ARGV[1]: the emission
/// interval (interval / N); ARGV[2]: the burst tolerance (the interval). Returns 1 when
/// the event is admitted (and counted), 0 when it would exceed the rate. The stored
/// theoretical arrival time expires once it is in the past. Numbers are written with
/// `%.0f`: Lua's default conversion would round a time in microseconds to 14 digits.
/// `replicate_commands` lets a Redis before 5 write after `TIME` (later ones always do).
const GCRA: &str = r"
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local emission = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local nxt = tat + emission
if nxt - now > burst then return 0 end
redis.call('SET', KEYS[1], string.format('%.0f', nxt), 'PX',
  string.format('%.0f', math.ceil((nxt - now) / 1000) + 1))
return 1
";

/// Takes a connection lease with Redis's clock, in milliseconds. KEYS[1]: the
/// destination's lease set; ARGV[1]: the limit N; ARGV[2]: the lease TTL; ARGV[3]: the
/// lease's member. Drops the lapsed leases, then admits (returns 1, the member scored by
/// its expiry) while fewer than N remain; else returns 0. A member already present (a
/// retry whose first reply was lost) is renewed and admitted.
const ACQUIRE: &str = r"
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
local expiry = string.format('%.0f', now + ttl)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.0f', now))
if not redis.call('ZSCORE', KEYS[1], ARGV[3])
  and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('ZADD', KEYS[1], expiry, ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
";

/// Renews held leases with Redis's clock. KEYS: one lease set per lease (repeated for
/// several leases of one destination); ARGV[1]: the lease TTL in milliseconds;
/// ARGV[1 + i]: the member of KEYS[i]. Every lease is written whether present or not:
/// leases taken while Redis was unreachable, or lost with a restarted or flushed Redis,
/// count again from the next renewal.
const RENEW: &str = r"
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expiry = string.format('%.0f', now + tonumber(ARGV[1]))
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, expiry, ARGV[i + 1])
  redis.call('PEXPIRE', key, ARGV[1])
end
return #KEYS
";

/// The Redis key of `destination`'s connection leases.
pub fn connection_key(destination: &str) -> String {
    format!("{CONNECTION_KEY_PREFIX}{destination}")
}

/// This pod's share of a destination's `limit` connections while it counts alone:
/// `limit / fleet_size` rounded down, at least 1. Rounded down like [`Rate::share`], so
/// the fleet stays within `limit` whenever `limit` is at least the fleet's size; at least
/// 1, so no pod ever stops delivering.
pub fn connection_share(limit: usize, fleet_size: u32) -> usize {
    let pods = usize::try_from(fleet_size.max(1)).unwrap_or(usize::MAX);
    (limit / pods).max(1)
}

/// Every rate check of the pod, and its outbound connection slots: local, or the
/// fleet's in Redis with a local fallback.
#[derive(Default)]
pub struct FleetLimiter {
    local: RateLimiter,
    shared: Option<Arc<Shared>>,
}

impl std::fmt::Debug for FleetLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetLimiter")
            .field("shared", &self.shared.is_some())
            .finish()
    }
}

struct Shared {
    client: redis::Client,
    /// The URL the client was made for (a change needs a restart).
    url: String,
    timeout: Duration,
    /// Follows config reloads: the operator changes it as the fleet scales.
    fleet_size: AtomicU32,
    script: redis::Script,
    acquire: redis::Script,
    renew: redis::Script,
    /// Names this process's leases among the fleet's: the pod's name and a random part
    /// (a restarted pod must not renew its predecessor's leases).
    pod_id: String,
    next_lease: AtomicU64,
    /// The leases this pod holds, per destination: what the local share counts, and
    /// what the renewals write.
    leases: Mutex<HashMap<String, HashSet<u64>>>,
    metrics: MtaMetrics,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The connection in use and its generation, while Redis is up.
    conn: Option<(u64, MultiplexedConnection)>,
    generation: u64,
    /// Whether "Redis unreachable" has been logged since it was last up.
    warned: bool,
    /// When the held leases were last written on this connection; `None` until they
    /// have been written once on it (so a new connection writes them at once).
    renewed: Option<Instant>,
}

/// One of the connections the fleet may have open to a destination, held until dropped
/// (then given back to Redis at once, or left to lapse if Redis cannot be reached).
#[must_use = "the slot is given back when the lease is dropped"]
pub struct ConnectionLease {
    held: Option<Held>,
}

struct Held {
    shared: Arc<Shared>,
    destination: String,
    id: u64,
}

impl ConnectionLease {
    /// A lease that counts nothing: for connections no fleet limit applies to.
    pub fn unshared() -> Self {
        Self { held: None }
    }
}

impl std::fmt::Debug for ConnectionLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.held {
            Some(held) => f
                .debug_struct("ConnectionLease")
                .field("destination", &held.destination)
                .field("id", &held.id)
                .finish(),
            None => f.write_str("ConnectionLease(unshared)"),
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.shared.release(&self.destination, self.id);
    }
}

impl FleetLimiter {
    /// A limiter for `config`: local only when it is `None`; otherwise shared through
    /// Redis, with the probe task started on the current runtime (it ends when the
    /// limiter is dropped). Fails only on a URL the client cannot parse.
    pub fn start(config: Option<&RedisLimitsConfig>, metrics: MtaMetrics) -> Result<Self, String> {
        let Some(config) = config else {
            return Ok(Self::default());
        };
        let client = redis::Client::open(config.url.as_str())
            .map_err(|e| format!("smtpd.rate_limits.redis.url: {e}"))?;
        let pod = std::env::var("HOSTNAME").unwrap_or_else(|_| "petrel-mta".into());
        let shared = Arc::new(Shared {
            client,
            url: config.url.clone(),
            timeout: config.timeout,
            fleet_size: AtomicU32::new(config.fleet_size),
            script: redis::Script::new(GCRA),
            acquire: redis::Script::new(ACQUIRE),
            renew: redis::Script::new(RENEW),
            pod_id: format!("{pod}/{:016x}", rand::random::<u64>()),
            next_lease: AtomicU64::new(0),
            leases: Mutex::new(HashMap::new()),
            metrics,
            state: Mutex::new(State::default()),
        });
        // Until the first connection: the pod's share.
        shared
            .metrics
            .set_rate_limit_backend(RateLimitBackend::Local);
        tokio::spawn(probe(Arc::downgrade(&shared)));
        Ok(Self {
            local: RateLimiter::default(),
            shared: Some(shared),
        })
    }

    /// Counts one event for `key`; `false` when it would exceed `rate` (the fleet's, or
    /// this pod's share of it while Redis is unreachable). Waits at most the configured
    /// Redis timeout; without Redis it does not wait at all.
    pub async fn allow(&self, key: &str, rate: Rate) -> bool {
        let Some(shared) = &self.shared else {
            return self.local.allow(key, rate);
        };
        match shared.allow(key, rate).await {
            Some(admitted) => admitted,
            None => self
                .local
                .allow(key, rate.share(shared.fleet_size.load(Ordering::Relaxed))),
        }
    }

    /// One of the `limit` connections the fleet may have open to `destination` (a
    /// [`connection_key`] suffix such as `mx:example.com`), or `None` while they are all
    /// taken: the caller tries again later. Without Redis every call gets a lease that
    /// counts nothing (the caller's own per-pod cap applies). Waits at most the
    /// configured Redis timeout; while Redis is unreachable, this pod's
    /// [`connection_share`] of `limit` applies, without waiting.
    pub async fn connection_lease(
        &self,
        destination: &str,
        limit: usize,
    ) -> Option<ConnectionLease> {
        match &self.shared {
            None => Some(ConnectionLease::unshared()),
            Some(shared) => Shared::lease(shared, destination, limit).await,
        }
    }

    /// Whether the fleet shares a Redis (`smtpd.rate_limits.redis` was set at start).
    pub fn has_redis(&self) -> bool {
        self.shared.is_some()
    }

    /// Runs `pipe` on the fleet's Redis connection, bounded by its timeout, for other
    /// fleet-wide state (TLS-RPT counts). `None` without Redis, while it is down, or when
    /// the call fails (Redis is then marked down, as for a failed rate check).
    pub async fn query<T: redis::FromRedisValue>(&self, pipe: &redis::Pipeline) -> Option<T> {
        let shared = self.shared.as_ref()?;
        let (generation, mut conn) = shared.lock().conn.clone()?;
        shared
            .bounded(generation, pipe.query_async::<T>(&mut conn))
            .await
    }

    /// Takes a reloaded `smtpd.rate_limits.redis`: a new `fleet_size` applies at once (the
    /// share follows the fleet's size without a restart). Returns whether something else
    /// changed (Redis added or removed, its URL or timeout), which needs a restart.
    pub fn reconfigure(&self, config: Option<&RedisLimitsConfig>) -> bool {
        match (&self.shared, config) {
            (None, None) => false,
            (Some(shared), Some(config)) => {
                shared
                    .fleet_size
                    .store(config.fleet_size, Ordering::Relaxed);
                shared.url != config.url || shared.timeout != config.timeout
            }
            _ => true,
        }
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn leases(&self) -> std::sync::MutexGuard<'_, HashMap<String, HashSet<u64>>> {
        self.leases.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The Redis member of this pod's lease `id`.
    fn member(&self, id: u64) -> String {
        format!("{}:{id}", self.pod_id)
    }

    /// Runs one Redis call on connection `generation`, bounded by the timeout; `None`
    /// (and Redis marked down) when it fails or does not answer in time.
    async fn bounded<T>(
        &self,
        generation: u64,
        call: impl Future<Output = redis::RedisResult<T>>,
    ) -> Option<T> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(value)) => Some(value),
            Ok(Err(e)) => {
                self.down(generation, &e.to_string());
                None
            }
            Err(_) => {
                self.down(generation, &format!("no reply within {:?}", self.timeout));
                None
            }
        }
    }

    /// The fleet's answer, or `None` when Redis is down or does not answer in time.
    async fn allow(&self, key: &str, rate: Rate) -> Option<bool> {
        let (generation, mut conn) = self.lock().conn.clone()?;
        let emission = (rate.interval / rate.count).as_micros().max(1);
        let burst = rate.interval.as_micros();
        let mut call = self.script.key(format!("{KEY_PREFIX}{key}"));
        call.arg(emission.to_string()).arg(burst.to_string());
        self.bounded(generation, call.invoke_async::<i64>(&mut conn))
            .await
            .map(|admitted| admitted == 1)
    }

    /// A lease from Redis, or from this pod's share while Redis cannot answer.
    async fn lease(self: &Arc<Self>, destination: &str, limit: usize) -> Option<ConnectionLease> {
        let id = self.next_lease.fetch_add(1, Ordering::Relaxed);
        let admitted = match self.acquire_in_redis(destination, id, limit).await {
            Some(true) => {
                self.leases()
                    .entry(destination.to_owned())
                    .or_default()
                    .insert(id);
                true
            }
            Some(false) => false,
            None => {
                let share = connection_share(limit, self.fleet_size.load(Ordering::Relaxed));
                let mut leases = self.leases();
                let held = leases.entry(destination.to_owned()).or_default();
                let admitted = held.len() < share;
                if admitted {
                    held.insert(id);
                } else if held.is_empty() {
                    leases.remove(destination);
                }
                admitted
            }
        };
        admitted.then(|| ConnectionLease {
            held: Some(Held {
                shared: self.clone(),
                destination: destination.to_owned(),
                id,
            }),
        })
    }

    /// Redis's answer for lease `id`, or `None` when Redis is down or too slow (a lease
    /// the script wrote before the reply was lost lapses by itself, or is renewed if this
    /// pod grants it from its share).
    async fn acquire_in_redis(&self, destination: &str, id: u64, limit: usize) -> Option<bool> {
        let (generation, mut conn) = self.lock().conn.clone()?;
        let mut call = self.acquire.key(connection_key(destination));
        call.arg(limit).arg(millis(LEASE_TTL)).arg(self.member(id));
        self.bounded(generation, call.invoke_async::<i64>(&mut conn))
            .await
            .map(|admitted| admitted == 1)
    }

    /// Forgets lease `id` and removes it from Redis in the background (never waiting on
    /// Redis where the lease is dropped); left to lapse when Redis is down.
    fn release(self: &Arc<Self>, destination: &str, id: u64) {
        {
            let mut leases = self.leases();
            if let Some(held) = leases.get_mut(destination) {
                held.remove(&id);
                if held.is_empty() {
                    leases.remove(destination);
                }
            }
        }
        let Some((generation, mut conn)) = self.lock().conn.clone() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let shared = self.clone();
        let mut zrem = redis::cmd("ZREM");
        zrem.arg(connection_key(destination)).arg(self.member(id));
        runtime.spawn(async move {
            shared
                .bounded(generation, zrem.query_async::<i64>(&mut conn))
                .await;
        });
    }

    /// Writes the held leases with a new expiry when due: every
    /// [`LEASE_RENEW_INTERVAL`], and at once on a new connection.
    async fn renew(&self) {
        let (generation, mut conn) = {
            let state = self.lock();
            match (&state.conn, state.renewed) {
                (None, _) => return,
                (Some(_), Some(at)) if at.elapsed() < LEASE_RENEW_INTERVAL => return,
                (Some((generation, conn)), _) => (*generation, conn.clone()),
            }
        };
        let held = self.held();
        if !held.is_empty() {
            let mut call = self.renew.prepare_invoke();
            call.arg(millis(LEASE_TTL));
            for (destination, id) in &held {
                call.key(connection_key(destination)).arg(self.member(*id));
            }
            let written = self.bounded(generation, call.invoke_async::<i64>(&mut conn));
            if written.await.is_none() {
                return;
            }
            self.remove_released(generation, &mut conn, &held).await;
        }
        let mut state = self.lock();
        if state.conn.as_ref().is_some_and(|(g, _)| *g == generation) {
            state.renewed = Some(Instant::now());
        }
    }

    /// Every lease held now, as (destination, id).
    fn held(&self) -> Vec<(String, u64)> {
        self.leases()
            .iter()
            .flat_map(|(destination, ids)| ids.iter().map(move |id| (destination.clone(), *id)))
            .collect()
    }

    /// Removes again the leases of `renewed` released while their renewal was on its
    /// way: their own `ZREM` may have reached Redis before the renewal wrote them back.
    async fn remove_released(
        &self,
        generation: u64,
        conn: &mut MultiplexedConnection,
        renewed: &[(String, u64)],
    ) {
        let released: Vec<&(String, u64)> = {
            let leases = self.leases();
            renewed
                .iter()
                .filter(|(destination, id)| {
                    leases.get(destination).is_none_or(|ids| !ids.contains(id))
                })
                .collect()
        };
        if released.is_empty() {
            return;
        }
        let mut pipe = redis::pipe();
        for (destination, id) in released {
            pipe.zrem(connection_key(destination), self.member(*id))
                .ignore();
        }
        self.bounded(generation, pipe.query_async::<()>(conn)).await;
    }

    /// Redis failed on connection `generation`: count alone until the probe reconnects.
    /// A failure on a connection already replaced changes nothing.
    fn down(&self, generation: u64, reason: &str) {
        let mut state = self.lock();
        if state.conn.as_ref().is_none_or(|(g, _)| *g != generation) {
            return;
        }
        state.conn = None;
        state.renewed = None;
        state.warned = true;
        drop(state);
        self.metrics.set_rate_limit_backend(RateLimitBackend::Local);
        self.metrics.rate_limit_fallback();
        tracing::warn!(
            reason,
            fleet_size = self.fleet_size.load(Ordering::Relaxed),
            "fleet limits: Redis unreachable, this pod now allows its local share (1/fleet_size) of each rate and of each destination's connections"
        );
    }

    /// One probe: ping the connection in use, or open one; then renew the held leases
    /// if that is due.
    async fn probe(&self) {
        let current = self.lock().conn.clone();
        let up = match current {
            Some((generation, mut conn)) => {
                let ping = redis::cmd("PING");
                self.bounded(generation, ping.query_async::<String>(&mut conn))
                    .await
                    .is_some()
            }
            None => self.connect().await,
        };
        if up {
            self.renew().await;
        }
    }

    /// Opens a connection; whether that worked.
    async fn connect(&self) -> bool {
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        // The connection and the handshake (SELECT, AUTH) together within the timeout.
        let opened = tokio::time::timeout(
            self.timeout * 2,
            self.client
                .get_multiplexed_async_connection_with_config(&config),
        )
        .await;
        let mut state = self.lock();
        match opened {
            Ok(Ok(conn)) => {
                state.generation += 1;
                state.conn = Some((state.generation, conn));
                state.renewed = None;
                state.warned = false;
                drop(state);
                self.metrics.set_rate_limit_backend(RateLimitBackend::Redis);
                tracing::info!(
                    "fleet limits: Redis reachable, rates and connections per destination are the fleet's"
                );
                return true;
            }
            Ok(Err(_)) | Err(_) if state.warned => {}
            Ok(Err(e)) => {
                state.warned = true;
                drop(state);
                tracing::warn!(
                    reason = %e,
                    fleet_size = self.fleet_size.load(Ordering::Relaxed),
                    "fleet limits: Redis unreachable, this pod allows its local share (1/fleet_size) of each rate and of each destination's connections"
                );
            }
            Err(_) => {
                state.warned = true;
                drop(state);
                tracing::warn!(
                    fleet_size = self.fleet_size.load(Ordering::Relaxed),
                    "fleet limits: Redis unreachable (no connection within the timeout), this pod allows its local share (1/fleet_size) of each rate and of each destination's connections"
                );
            }
        }
        false
    }
}

/// `duration` in whole milliseconds, for Redis.
fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Pings or reconnects every [`PROBE_INTERVAL`] until the limiter is dropped.
async fn probe(shared: Weak<Shared>) {
    let mut every = tokio::time::interval(PROBE_INTERVAL);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        shared.probe().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(count: u32) -> Rate {
        Rate {
            count,
            interval: Duration::from_secs(60),
        }
    }

    /// Without Redis the local limiter decides, with the whole rate.
    #[tokio::test]
    async fn without_redis_the_whole_rate_is_local() {
        let limiter = FleetLimiter::start(None, MtaMetrics::new()).expect("local");
        let admitted = {
            let mut n = 0;
            for _ in 0..20 {
                n += u32::from(limiter.allow("messages_per_ip:192.0.2.1", rate(12)).await);
            }
            n
        };
        assert_eq!(admitted, 12);
    }

    /// A reload changes the share at once; a new URL or timeout asks for a restart.
    #[tokio::test]
    async fn fleet_size_follows_reloads() {
        let config = RedisLimitsConfig {
            url: "redis://127.0.0.1:1/0".into(),
            timeout: Duration::from_millis(50),
            fleet_size: 3,
        };
        let limiter = FleetLimiter::start(Some(&config), MtaMetrics::new()).expect("limiter");
        let six = RedisLimitsConfig {
            fleet_size: 6,
            ..config.clone()
        };
        assert!(!limiter.reconfigure(Some(&six)));
        let mut admitted = 0;
        for _ in 0..20 {
            admitted += u32::from(limiter.allow("user:alice", rate(12)).await);
        }
        assert_eq!(admitted, 2);
        let moved = RedisLimitsConfig {
            url: "redis://127.0.0.1:2/0".into(),
            ..config.clone()
        };
        assert!(limiter.reconfigure(Some(&moved)));
        assert!(limiter.reconfigure(None));
        assert!(!FleetLimiter::default().reconfigure(None));
        assert!(FleetLimiter::default().reconfigure(Some(&config)));
    }

    /// Redis unreachable (nothing listens): each check is answered at once with the
    /// pod's share, `12 / 3 = 4`, and the metrics say so.
    #[tokio::test]
    async fn unreachable_redis_falls_back_to_the_share() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = closed.local_addr().expect("address").port();
        drop(closed);
        let metrics = MtaMetrics::new();
        let config = RedisLimitsConfig {
            url: format!("redis://127.0.0.1:{port}/0"),
            timeout: Duration::from_millis(50),
            fleet_size: 3,
        };
        let limiter = FleetLimiter::start(Some(&config), metrics.clone()).expect("limiter");
        let started = std::time::Instant::now();
        let mut admitted = 0;
        for _ in 0..20 {
            admitted += u32::from(limiter.allow("messages_per_ip:192.0.2.1", rate(12)).await);
        }
        assert_eq!(admitted, 4);
        assert!(started.elapsed() < Duration::from_secs(1));
        let scrape = metrics.encode_prometheus();
        assert!(
            scrape.contains("petrel_mta_rate_limit_backend{backend=\"local\"} 1"),
            "{scrape}"
        );
    }

    /// The pod's share of a destination's connections: rounded down, at least 1.
    #[test]
    fn connection_share_is_rounded_down_and_at_least_one() {
        for (limit, fleet, share) in [
            (2, 3, 1),
            (10, 3, 3),
            (12, 3, 4),
            (1, 5, 1),
            (5, 1, 5),
            (5, 0, 5),
        ] {
            assert_eq!(connection_share(limit, fleet), share, "{limit} / {fleet}");
        }
    }

    #[test]
    fn connection_keys_name_the_destination() {
        assert_eq!(
            connection_key("mx:example.com"),
            "petrel:conn:mx:example.com"
        );
        assert_eq!(
            connection_key("smarthost:relay.test:587"),
            "petrel:conn:smarthost:relay.test:587"
        );
    }

    /// Without Redis every lease is granted and counts nothing.
    #[tokio::test]
    async fn without_redis_connection_leases_count_nothing() {
        let limiter = FleetLimiter::start(None, MtaMetrics::new()).expect("local");
        let mut leases = Vec::new();
        for _ in 0..5 {
            leases.push(limiter.connection_lease("mx:example.com", 1).await);
        }
        assert!(leases.iter().all(Option::is_some));
    }

    fn unreachable_config(fleet_size: u32) -> RedisLimitsConfig {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = closed.local_addr().expect("address").port();
        drop(closed);
        RedisLimitsConfig {
            url: format!("redis://127.0.0.1:{port}/0"),
            timeout: Duration::from_millis(50),
            fleet_size,
        }
    }

    /// Redis unreachable: each destination gets this pod's share of its connections,
    /// `6 / 3 = 2`, at once; a dropped lease frees its slot.
    #[tokio::test]
    async fn unreachable_redis_leases_the_share_per_destination() {
        let limiter =
            FleetLimiter::start(Some(&unreachable_config(3)), MtaMetrics::new()).expect("limiter");
        let started = std::time::Instant::now();
        let first = limiter.connection_lease("mx:a.test", 6).await;
        let second = limiter.connection_lease("mx:a.test", 6).await;
        assert!(first.is_some() && second.is_some());
        assert!(limiter.connection_lease("mx:a.test", 6).await.is_none());
        let other = limiter.connection_lease("mx:b.test", 6).await;
        assert!(other.is_some(), "each destination has its own share");
        drop(first);
        let again = limiter.connection_lease("mx:a.test", 6).await;
        assert!(again.is_some(), "a dropped lease frees its slot");
        assert!(limiter.connection_lease("mx:a.test", 6).await.is_none());
        // Fewer connections than pods: still one each, never none.
        let one = limiter.connection_lease("mx:c.test", 2).await;
        assert!(one.is_some());
        assert!(limiter.connection_lease("mx:c.test", 2).await.is_none());
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    /// A redis-server on a port of its own, when the machine has one (Debian's
    /// `redis-server`); the test is skipped, saying so, when it has not.
    struct RedisServer {
        binary: &'static str,
        process: std::process::Child,
        port: u16,
        dir: tempfile::TempDir,
    }

    impl RedisServer {
        fn start() -> Option<Self> {
            let binary = ["/usr/bin/redis-server", "/usr/local/bin/redis-server"]
                .into_iter()
                .find(|p| std::path::Path::new(p).exists())?;
            let dir = tempfile::tempdir().expect("tempdir");
            let free = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            let port = free.local_addr().expect("address").port();
            drop(free);
            let process = Self::spawn(binary, port, dir.path());
            Some(Self {
                binary,
                process,
                port,
                dir,
            })
        }

        fn spawn(binary: &str, port: u16, dir: &std::path::Path) -> std::process::Child {
            std::process::Command::new(binary)
                .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(dir)
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("redis-server")
        }

        /// Kills it and starts an empty one on the same port (nothing is persisted).
        fn restart(&mut self) {
            let _ = self.process.kill();
            let _ = self.process.wait();
            self.process = Self::spawn(self.binary, self.port, self.dir.path());
        }

        fn config(&self) -> RedisLimitsConfig {
            RedisLimitsConfig {
                url: format!("redis://127.0.0.1:{}/0", self.port),
                timeout: Duration::from_secs(1),
                fleet_size: 2,
            }
        }

        /// The leases of `destination` in Redis; empty while it does not answer.
        async fn members(&self, destination: &str) -> Vec<String> {
            let client = redis::Client::open(self.config().url).expect("client");
            let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
                return Vec::new();
            };
            redis::cmd("ZRANGE")
                .arg(connection_key(destination))
                .arg(0)
                .arg(-1)
                .query_async(&mut conn)
                .await
                .unwrap_or_default()
        }

        async fn until_members(&self, destination: &str, count: usize) {
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while self.members(destination).await.len() != count {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{destination} never had {count} leases in Redis"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    impl Drop for RedisServer {
        fn drop(&mut self) {
            let _ = self.process.kill();
            let _ = self.process.wait();
        }
    }

    async fn until_shared(metrics: &MtaMetrics) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !metrics
            .encode_prometheus()
            .contains("petrel_mta_rate_limit_backend{backend=\"redis\"} 1")
        {
            assert!(std::time::Instant::now() < deadline, "never reached Redis");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Two pods sharing a real Redis share 3 connections to a destination: the fourth is
    /// refused whichever pod asks, a dropped lease is removed from Redis at once and its
    /// slot goes to the other pod.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_pods_share_a_destinations_connections_in_redis() {
        let Some(redis) = RedisServer::start() else {
            eprintln!("skipped: no redis-server on this machine");
            return;
        };
        let (metrics_a, metrics_b) = (MtaMetrics::new(), MtaMetrics::new());
        let a = FleetLimiter::start(Some(&redis.config()), metrics_a.clone()).expect("a");
        let b = FleetLimiter::start(Some(&redis.config()), metrics_b.clone()).expect("b");
        until_shared(&metrics_a).await;
        until_shared(&metrics_b).await;
        let destination = "smarthost:relay.test:25";
        let a1 = a.connection_lease(destination, 3).await.expect("a1");
        let a2 = a.connection_lease(destination, 3).await.expect("a2");
        let b1 = b.connection_lease(destination, 3).await.expect("b1");
        assert!(b.connection_lease(destination, 3).await.is_none());
        assert!(a.connection_lease(destination, 3).await.is_none());
        assert_eq!(redis.members(destination).await.len(), 3);
        drop(a1);
        redis.until_members(destination, 2).await;
        let b2 = b.connection_lease(destination, 3).await.expect("b2");
        assert!(a.connection_lease(destination, 3).await.is_none());
        // A destination's own limit: another one is not affected.
        assert!(a.connection_lease("mx:other.test", 1).await.is_some());
        assert_eq!(redis.members(destination).await.len(), 3);
        drop((a2, b1, b2));
        assert!(
            metrics_a
                .encode_prometheus()
                .contains("petrel_mta_rate_limit_fallbacks_total 0"),
            "no fallback while Redis answered"
        );
    }

    /// The leases held when Redis restarts empty are written again as soon as the pod
    /// reconnects, so the connections still open keep counting; one dropped meanwhile
    /// is not.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn held_leases_are_written_again_after_a_redis_restart() {
        let Some(mut redis) = RedisServer::start() else {
            eprintln!("skipped: no redis-server on this machine");
            return;
        };
        let metrics = MtaMetrics::new();
        let pod = FleetLimiter::start(Some(&redis.config()), metrics.clone()).expect("pod");
        until_shared(&metrics).await;
        let destination = "mx:example.test";
        let kept = pod.connection_lease(destination, 2).await.expect("kept");
        let dropped = pod.connection_lease(destination, 2).await.expect("dropped");
        redis.until_members(destination, 2).await;
        redis.restart();
        drop(dropped);
        redis.until_members(destination, 1).await;
        until_shared(&metrics).await;
        assert!(
            pod.connection_lease(destination, 2).await.is_some(),
            "one slot of two is free"
        );
        drop(kept);
    }
}
