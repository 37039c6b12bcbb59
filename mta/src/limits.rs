//! Rate limits: a GCRA (generic cell rate algorithm) per key, e.g. `ip:192.0.2.1` or
//! `user:alice`. A rate `N/interval` admits bursts of up to N and then one event per
//! interval/N. Memory: one timestamp per active key; stale keys are dropped as the table
//! grows.

use mta_config::Rate;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

#[derive(Debug)]
pub struct RateLimiter {
    start: Instant,
    /// Theoretical arrival time per key, in nanoseconds since `start`.
    tat: Mutex<HashMap<String, u128>>,
}

impl Default for RateLimiter {
    fn default() -> Self {
        Self {
            start: Instant::now(),
            tat: Mutex::new(HashMap::new()),
        }
    }
}

impl RateLimiter {
    /// Counts one event for `key`; `false` when it would exceed `rate`.
    pub fn allow(&self, key: &str, rate: Rate) -> bool {
        let now = self.start.elapsed().as_nanos();
        let emission = (rate.interval / rate.count).as_nanos().max(1);
        let burst = rate.interval.as_nanos();
        let mut table = self.tat.lock().unwrap_or_else(|e| e.into_inner());
        if table.len() > 100_000 {
            table.retain(|_, tat| *tat > now);
        }
        let tat = table.get(key).copied().unwrap_or(now).max(now);
        let next = tat + emission;
        if next - now > burst {
            return false;
        }
        table.insert(key.to_owned(), next);
        true
    }
}

/// Helper for callers holding a config string.
pub fn parse(text: &str) -> Option<Rate> {
    Rate::parse(text).ok().flatten()
}

/// How long to wait before a retry would pass; for logs.
pub fn interval_per_event(rate: Rate) -> Duration {
    rate.interval / rate.count
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn burst_then_steady_rate() {
        let limiter = RateLimiter::default();
        let rate = Rate {
            count: 3,
            interval: Duration::from_secs(60),
        };
        assert!((0..3).all(|_| limiter.allow("ip:a", rate)), "a burst of 3");
        assert!(!limiter.allow("ip:a", rate), "the 4th is refused");
        assert!(limiter.allow("ip:b", rate), "other keys are independent");
        tokio::time::advance(interval_per_event(rate)).await;
        assert!(limiter.allow("ip:a", rate), "one more after 20s");
        assert!(!limiter.allow("ip:a", rate));
    }
}
