//! Status conditions for the four kinds: `Ready`/`Degraded` (+ `DnsReady`), always with
//! `observedGeneration`, and `lastTransitionTime` kept when a condition's status does not
//! change. Notes from render (fields that cannot take effect yet) make `Ready` false with
//! their reason, so nobody mistakes an unsupported setting for a working one.

use crate::render::Note;
use crds::ConditionStatus;
use crds::conditions::{self, Condition, DEGRADED, READY};

/// The current time as RFC 3339, to the second.
pub fn now() -> String {
    let secs = k8s_openapi::jiff::Timestamp::now().as_second();
    k8s_openapi::jiff::Timestamp::from_second(secs)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// Conditions after a successful reconcile: Ready unless notes say something does not
/// take effect, or `pending` says why it is not ready yet.
pub fn reconciled(
    previous: &[Condition],
    generation: Option<i64>,
    notes: &[&Note],
    pending: Option<(&str, String)>,
    extra: Vec<Condition>,
    now: &str,
) -> Vec<Condition> {
    let ready = if !notes.is_empty() {
        let message = notes
            .iter()
            .map(|n| n.message.as_str())
            .collect::<Vec<_>>()
            .join("; ");
        Condition::new(
            READY,
            ConditionStatus::False,
            notes[0].reason,
            message,
            generation,
            now,
        )
    } else if let Some((reason, message)) = pending {
        Condition::new(
            READY,
            ConditionStatus::False,
            reason,
            message,
            generation,
            now,
        )
    } else {
        Condition::new(
            READY,
            ConditionStatus::True,
            "Reconciled",
            "",
            generation,
            now,
        )
    };
    let degraded = Condition::new(
        DEGRADED,
        ConditionStatus::False,
        "Reconciled",
        "",
        generation,
        now,
    );
    let mut fresh = vec![ready, degraded];
    fresh.extend(extra);
    conditions::merge(previous, fresh)
}

/// Conditions after a failed reconcile: Degraded with the error's label as reason.
pub fn failed(
    previous: &[Condition],
    generation: Option<i64>,
    error: &crate::Error,
    now: &str,
) -> Vec<Condition> {
    let reason = error.metric_label();
    let fresh = vec![
        Condition::new(
            READY,
            ConditionStatus::False,
            reason,
            error.to_string(),
            generation,
            now,
        ),
        Condition::new(
            DEGRADED,
            ConditionStatus::True,
            reason,
            error.to_string(),
            generation,
            now,
        ),
    ];
    conditions::merge(previous, fresh)
}

/// Whether two condition lists say the same thing (ignoring transition times).
pub fn same(a: &[Condition], b: &[Condition]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.same_as(y))
}
