//! Rate limits: a GCRA (generic cell rate algorithm) per key, e.g. `ip:192.0.2.1` or
//! `user:alice`. A rate `N/interval` admits bursts of up to N and then one event per
//! interval/N. Memory: one timestamp per active key; stale keys are dropped as the table
//! grows.
//!
//! [`AuthFailures`] counts failed AUTH attempts per *source* (the client address, an IPv6
//! client's /64) and per source and user name, never per user name alone: failures from
//! elsewhere cannot lock a user out (issue 13, item 2).

use mta_config::Rate;
use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
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

/// AUTH failures are counted over this window, from the first failure in it.
pub const AUTH_FAILURE_WINDOW: Duration = Duration::from_secs(15 * 60);
/// Failures from one source (any user names) before its attempts are refused.
pub const MAX_AUTH_FAILURES_PER_SOURCE: u32 = 10;
/// Failures from one source against one user name before that pair is refused.
pub const MAX_AUTH_FAILURES_PER_SOURCE_USER: u32 = 5;
/// Failures from all sources in [`GLOBAL_AUTH_WINDOW`] above which a source that has
/// failed at all in its window is refused (a distributed guess gets one try per address),
/// while sources without failures still authenticate.
pub const MAX_GLOBAL_AUTH_FAILURES: u32 = 100;
pub const GLOBAL_AUTH_WINDOW: Duration = Duration::from_secs(60);
/// Keys kept before stale ones are dropped.
const MAX_AUTH_KEYS: usize = 100_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum AuthKey {
    Source(IpAddr),
    /// A source and a keyed hash of the user name (bounded memory whatever the name's
    /// length; the random key makes collisions impossible to aim for).
    SourceUser(IpAddr, u64),
}

/// Recent AUTH failures: per source, per source and user, and in total.
#[derive(Debug)]
pub struct AuthFailures {
    hasher: RandomState,
    state: Mutex<AuthFailureState>,
}

#[derive(Debug)]
struct AuthFailureState {
    /// (failures, window start) per key.
    keys: HashMap<AuthKey, (u32, Instant)>,
    /// (failures, window start) over every source.
    global: (u32, Instant),
}

impl Default for AuthFailures {
    fn default() -> Self {
        Self {
            hasher: RandomState::new(),
            state: Mutex::new(AuthFailureState {
                keys: HashMap::new(),
                global: (0, Instant::now()),
            }),
        }
    }
}

/// The unit a client is counted as: its address, or its /64 for IPv6 (one customer's
/// allocation; counting single IPv6 addresses would let a host rotate without limit).
pub fn auth_source(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(bits.into())
            }
        },
        v4 => v4,
    }
}

impl AuthFailures {
    fn keys(&self, ip: IpAddr, user: Option<&str>) -> (AuthKey, Option<AuthKey>) {
        let source = auth_source(ip);
        (
            AuthKey::Source(source),
            user.map(|u| AuthKey::SourceUser(source, self.hasher.hash_one(u))),
        )
    }

    /// Whether an AUTH attempt from `ip` (for `user`, once known) is refused for now.
    pub fn blocked(&self, ip: IpAddr, user: Option<&str>) -> bool {
        let (source, pair) = self.keys(ip, user);
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let recent = |key: &AuthKey| {
            state
                .keys
                .get(key)
                .filter(|(_, since)| since.elapsed() < AUTH_FAILURE_WINDOW)
                .map(|(n, _)| *n)
                .unwrap_or(0)
        };
        let from_source = recent(&source);
        let under_attack = state.global.1.elapsed() < GLOBAL_AUTH_WINDOW
            && state.global.0 >= MAX_GLOBAL_AUTH_FAILURES;
        from_source >= MAX_AUTH_FAILURES_PER_SOURCE
            || pair.is_some_and(|p| recent(&p) >= MAX_AUTH_FAILURES_PER_SOURCE_USER)
            || (under_attack && from_source > 0)
    }

    /// Records one failed AUTH from `ip` as `user`.
    pub fn failed(&self, ip: IpAddr, user: &str) {
        let (source, pair) = self.keys(ip, Some(user));
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.keys.len() > MAX_AUTH_KEYS {
            state
                .keys
                .retain(|_, (_, since)| since.elapsed() < AUTH_FAILURE_WINDOW);
        }
        let now = Instant::now();
        for key in std::iter::once(source).chain(pair) {
            let entry = state.keys.entry(key).or_insert((0, now));
            if entry.1.elapsed() >= AUTH_FAILURE_WINDOW {
                *entry = (0, now);
            }
            entry.0 += 1;
        }
        if state.global.1.elapsed() >= GLOBAL_AUTH_WINDOW {
            state.global = (0, now);
        }
        state.global.0 += 1;
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

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("ip")
    }

    /// Issue 13, item 2: failures against a user from many addresses do not lock the user
    /// out; a source that keeps failing is refused, for that user first, then for all.
    #[tokio::test(start_paused = true)]
    async fn auth_failures_lock_out_the_source_not_the_account() {
        let failures = AuthFailures::default();
        for n in 1..=MAX_AUTH_FAILURES_PER_SOURCE_USER {
            failures.failed(ip(&format!("192.0.2.{n}")), "alice");
        }
        assert!(
            !failures.blocked(ip("198.51.100.7"), Some("alice")),
            "a new address may still log in as alice"
        );
        assert!(
            !failures.blocked(ip("192.0.2.1"), Some("alice")),
            "one failure each"
        );

        let mallory = ip("203.0.113.9");
        for _ in 0..MAX_AUTH_FAILURES_PER_SOURCE_USER {
            failures.failed(mallory, "alice");
        }
        assert!(
            failures.blocked(mallory, Some("alice")),
            "source+user locked"
        );
        assert!(
            !failures.blocked(mallory, Some("bob")),
            "other users not yet"
        );
        assert!(!failures.blocked(mallory, None));
        for _ in MAX_AUTH_FAILURES_PER_SOURCE_USER..MAX_AUTH_FAILURES_PER_SOURCE {
            failures.failed(mallory, "bob");
        }
        assert!(failures.blocked(mallory, None), "the whole source locked");
        assert!(!failures.blocked(ip("198.51.100.7"), Some("alice")));

        // IPv6: one /64 is one source.
        let v6 = ip("2001:db8:1:2::1");
        for n in 0..MAX_AUTH_FAILURES_PER_SOURCE {
            failures.failed(ip(&format!("2001:db8:1:2::{:x}", n + 10)), &format!("u{n}"));
        }
        assert!(failures.blocked(v6, None), "same /64");
        assert!(!failures.blocked(ip("2001:db8:1:3::1"), None), "next /64");

        tokio::time::advance(AUTH_FAILURE_WINDOW).await;
        assert!(!failures.blocked(mallory, Some("alice")), "the window ends");
    }

    /// Many failures from everywhere: sources that failed at all are refused, clean ones
    /// are not.
    #[tokio::test(start_paused = true)]
    async fn global_failure_rate_refuses_failing_sources_only() {
        let failures = AuthFailures::default();
        for n in 0..MAX_GLOBAL_AUTH_FAILURES {
            let [a, b] = (n as u16).to_be_bytes();
            failures.failed(ip(&format!("10.9.{a}.{b}")), "alice");
        }
        assert!(
            failures.blocked(ip("10.9.0.1"), Some("alice")),
            "failed once"
        );
        assert!(
            !failures.blocked(ip("10.8.0.1"), Some("alice")),
            "never failed"
        );
        tokio::time::advance(GLOBAL_AUTH_WINDOW).await;
        assert!(
            !failures.blocked(ip("10.9.0.1"), Some("alice")),
            "rate back to normal"
        );
    }
}
