//! Rate limits shared by the fleet (issue 16): owns the choice, for every rate check,
//! between the fleet's counters in Redis and this pod's own [`RateLimiter`], and the
//! connection to that Redis.
//!
//! Without `smtpd.rate_limits.redis` every check is the local limiter's, unchanged. With
//! it, a check runs one Lua GCRA script on Redis, keyed like the local limiter and timed
//! by Redis's own clock (`TIME`), so pods with skewed clocks still share one schedule.
//! While Redis cannot answer (no connection yet, an error, or no reply within
//! `timeout`) a check is answered at once by the local limiter with this pod's share of
//! the rate (`N / fleet_size`, see [`Rate::share`]): the fleet stays within N. A
//! background task pings Redis every [`PROBE_INTERVAL`] while it is up, and tries to
//! reconnect as often while it is down, so a Redis that comes back is used again within
//! about that long. The backend in use is the gauge `petrel_mta_rate_limit_backend`;
//! each switch to local counts in `petrel_mta_rate_limit_fallbacks_total` and is logged
//! once.
//!
//! It must never make mail wait on Redis longer than the configured timeout, never
//! retry a Redis call in the path of a session, and never put a message, an address
//! other than the limiter's key, or the Redis password into a log or a metric.

use crate::limits::RateLimiter;
use mta_config::{Rate, RedisLimitsConfig};
use mta_telemetry::{MtaMetrics, RateLimitBackend};
use redis::aio::MultiplexedConnection;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

/// How often Redis is pinged while up, and reconnected to while down.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// Prefix of the Redis keys (`petrel:rate:messages_per_ip:192.0.2.1`).
const KEY_PREFIX: &str = "petrel:rate:";

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

/// Every rate check of the pod: local, or the fleet's in Redis with a local fallback.
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
        let shared = Arc::new(Shared {
            client,
            url: config.url.clone(),
            timeout: config.timeout,
            fleet_size: AtomicU32::new(config.fleet_size),
            script: redis::Script::new(GCRA),
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

    /// The fleet's answer, or `None` when Redis is down or does not answer in time.
    async fn allow(&self, key: &str, rate: Rate) -> Option<bool> {
        let (generation, mut conn) = self.lock().conn.clone()?;
        let emission = (rate.interval / rate.count).as_micros().max(1);
        let burst = rate.interval.as_micros();
        let mut call = self.script.key(format!("{KEY_PREFIX}{key}"));
        call.arg(emission.to_string()).arg(burst.to_string());
        match tokio::time::timeout(self.timeout, call.invoke_async::<i64>(&mut conn)).await {
            Ok(Ok(admitted)) => Some(admitted == 1),
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

    /// Redis failed on connection `generation`: count alone until the probe reconnects.
    /// A failure on a connection already replaced changes nothing.
    fn down(&self, generation: u64, reason: &str) {
        let mut state = self.lock();
        if state.conn.as_ref().is_none_or(|(g, _)| *g != generation) {
            return;
        }
        state.conn = None;
        state.warned = true;
        drop(state);
        self.metrics.set_rate_limit_backend(RateLimitBackend::Local);
        self.metrics.rate_limit_fallback();
        tracing::warn!(
            reason,
            fleet_size = self.fleet_size.load(Ordering::Relaxed),
            "rate limits: Redis unreachable, this pod now allows its local share (1/fleet_size) of each rate"
        );
    }

    /// One probe: ping the connection in use, or open one.
    async fn probe(&self) {
        let current = self.lock().conn.clone();
        if let Some((generation, mut conn)) = current {
            let ping = redis::cmd("PING");
            match tokio::time::timeout(self.timeout, ping.query_async::<String>(&mut conn)).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => self.down(generation, &e.to_string()),
                Err(_) => self.down(generation, &format!("no reply within {:?}", self.timeout)),
            }
            return;
        }
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
                state.warned = false;
                drop(state);
                self.metrics.set_rate_limit_backend(RateLimitBackend::Redis);
                tracing::info!("rate limits: Redis reachable, rates are the fleet's");
            }
            Ok(Err(_)) | Err(_) if state.warned => {}
            Ok(Err(e)) => {
                state.warned = true;
                drop(state);
                tracing::warn!(
                    reason = %e,
                    fleet_size = self.fleet_size.load(Ordering::Relaxed),
                    "rate limits: Redis unreachable, this pod allows its local share (1/fleet_size) of each rate"
                );
            }
            Err(_) => {
                state.warned = true;
                drop(state);
                tracing::warn!(
                    fleet_size = self.fleet_size.load(Ordering::Relaxed),
                    "rate limits: Redis unreachable (no connection within the timeout), this pod allows its local share (1/fleet_size) of each rate"
                );
            }
        }
    }
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
}
