//! Status conditions shared by all four kinds: the standard Kubernetes shape (type, status,
//! reason, message, lastTransitionTime, observedGeneration), the condition types Petrel
//! sets, and the one helper that keeps `lastTransitionTime` honest.
//!
//! Reasons are PascalCase, machine-readable and stable; messages are for people.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// `Ready`: the resource is fully reconciled and in effect.
pub const READY: &str = "Ready";
/// `Progressing`: the operator is still rolling the resource out.
pub const PROGRESSING: &str = "Progressing";
/// `Degraded`: reconciling failed; `reason` names the error.
pub const DEGRADED: &str = "Degraded";
/// `DnsReady` (MailDomain, DkimKey): every record the resource needs is visible in live DNS.
pub const DNS_READY: &str = "DnsReady";

/// Whether a condition holds.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ConditionStatus {
    /// The condition holds.
    True,
    /// The condition does not hold.
    False,
    /// The operator cannot tell yet.
    Unknown,
}

/// One observation about a resource, in the standard Kubernetes shape.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Condition type, e.g. `Ready`, `Degraded`, `DnsReady`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: ConditionStatus,
    /// Machine-readable PascalCase cause of the last transition, e.g. `Reconciled`.
    pub reason: String,
    /// Human-readable detail.
    #[serde(default)]
    pub message: String,
    /// When `status` last changed (RFC 3339).
    pub last_transition_time: String,
    /// The `metadata.generation` this condition was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

impl Condition {
    /// A condition observed now (`now` is an RFC 3339 timestamp supplied by the caller).
    pub fn new(
        type_: &str,
        status: ConditionStatus,
        reason: &str,
        message: impl Into<String>,
        observed_generation: Option<i64>,
        now: &str,
    ) -> Self {
        Self {
            type_: type_.to_owned(),
            status,
            reason: reason.to_owned(),
            message: message.into(),
            last_transition_time: now.to_owned(),
            observed_generation,
        }
    }

    /// Whether `self` and `other` say the same thing, ignoring `lastTransitionTime`.
    pub fn same_as(&self, other: &Self) -> bool {
        self.type_ == other.type_
            && self.status == other.status
            && self.reason == other.reason
            && self.message == other.message
            && self.observed_generation == other.observed_generation
    }
}

/// Merges freshly computed conditions into the previous ones: a condition whose `status` did
/// not change keeps its old `lastTransitionTime`, as the Kubernetes API conventions require.
/// Conditions of types not present in `fresh` are dropped.
pub fn merge(previous: &[Condition], fresh: Vec<Condition>) -> Vec<Condition> {
    fresh
        .into_iter()
        .map(|mut c| {
            if let Some(old) = previous.iter().find(|o| o.type_ == c.type_)
                && old.status == c.status
            {
                c.last_transition_time.clone_from(&old.last_transition_time);
            }
            c
        })
        .collect()
}

/// The condition of `type_` in `conditions`, if any.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}
