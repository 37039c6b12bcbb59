//! Pure retry and expiry maths on [`QueueConfig`]: no clock, no I/O, table-tested.
//!
//! Times are milliseconds since the Unix epoch, as the scheduler's clock reports them.

use super::{DsnNotify, Envelope, Recipient};
use mta_config::QueueConfig;
use std::time::Duration;

/// Wait after the `attempts`-th failed attempt (1-based):
/// `retry_interval × factor^(attempts−1)`, capped at `max_retry_interval`.
pub fn retry_delay(config: &QueueConfig, attempts: u32) -> Duration {
    let exponent = attempts.saturating_sub(1).min(64) as i32;
    let secs = config.retry_interval.as_secs_f64() * config.retry_backoff_factor.powi(exponent);
    let capped = secs.min(config.max_retry_interval.as_secs_f64());
    Duration::from_secs_f64(capped)
}

/// When a message received at `received_at` (seconds) expires, in milliseconds.
pub fn expires_at_ms(config: &QueueConfig, received_at: u64) -> u64 {
    received_at
        .saturating_mul(1000)
        .saturating_add(config.max_age.as_millis() as u64)
}

/// The effective NOTIFY of a recipient: RFC 3461 §4.1 leaves the default to the MTA; like
/// most, we report failures and delays when the client did not say.
pub fn notify(recipient: &Recipient) -> DsnNotify {
    recipient.notify.unwrap_or(DsnNotify {
        success: false,
        failure: true,
        delay: true,
    })
}

/// Whether a delay notice is due for `envelope` at `now_ms`: enabled, not sent before,
/// old enough, a sender to send it to, and some pending recipient that wants one.
pub fn delay_notice_due(config: &QueueConfig, envelope: &Envelope, now_ms: u64) -> bool {
    let Some(after) = config.delay_warning_after else {
        return false;
    };
    !envelope.delay_notified
        && !envelope.sender.is_empty()
        && now_ms.saturating_sub(envelope.received_at.saturating_mul(1000))
            >= after.as_millis() as u64
        && envelope
            .recipients
            .iter()
            .any(|r| !r.status.is_final() && notify(r).delay)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_table() {
        let config = QueueConfig::default(); // 5m, ×2, max 1h
        let table = [
            (1, 300),
            (2, 600),
            (3, 1200),
            (4, 2400),
            (5, 3600),
            (50, 3600),
        ];
        for (attempts, secs) in table {
            assert_eq!(
                retry_delay(&config, attempts).as_secs(),
                secs,
                "attempt {attempts}"
            );
        }
        let flat = QueueConfig {
            retry_backoff_factor: 1.0,
            ..QueueConfig::default()
        };
        assert_eq!(retry_delay(&flat, 10).as_secs(), 300);
    }

    #[test]
    fn expiry_is_received_plus_max_age() {
        let config = QueueConfig::default();
        assert_eq!(expires_at_ms(&config, 10), 10_000 + 5 * 24 * 3600 * 1000);
    }
}
