//! A DkimKey's two selector slots and their Secrets: which selectors a key uses, how a
//! slot's rotation state is written on (and read back from) its Secret, and which keys a
//! listener's pods load and sign with.
//!
//! The Secrets are the rotation's memory: phase, the time it was entered, whether the key
//! is staged on the pods, when the last pod stopped signing with it. An operator that
//! restarts mid-rotation reads them back and carries on; DkimKey status is only a report.
//! The public TXT record is stored beside the private key it is derived from, never apart.
//!
//! Deciding the next state is not done here (see `reconcile::dkim_rotation`); this module
//! only encodes states, and never generates a key except where a plan asks for a fresh one.

use super::{Object, RenderError, World, owned_meta};
use crate::keys::KeySource;
use crds::{DkimKey, DkimKeyPhase};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use std::collections::BTreeMap;

/// Key of the DKIM private key (PKCS#8 PEM) in a slot Secret.
pub const DKIM_PRIVATE_KEY: &str = "private.pem";
/// Key of the public TXT record value in a slot Secret (derived from the private key).
pub const DKIM_RECORD: &str = "dns.txt";
/// Key of the selector name in a slot Secret.
pub const DKIM_SELECTOR: &str = "selector";

/// Annotations on a slot Secret that hold its rotation state.
pub mod annotations {
    /// The key's phase (`Generated`, `Published`, `Active`, `Retiring`, `Revoked`).
    pub const PHASE: &str = "mail.petrel.dev/dkim-phase";
    /// When the phase was entered (RFC 3339).
    pub const SINCE: &str = "mail.petrel.dev/dkim-since";
    /// Published: earliest time the pods may load the key (record and negative-caching
    /// TTLs waited out), RFC 3339.
    pub const LOAD_AFTER: &str = "mail.petrel.dev/dkim-load-after";
    /// Published: `"true"` once the pods are told to load the key (without signing).
    pub const STAGED: &str = "mail.petrel.dev/dkim-staged";
    /// Retiring: when no Ready pod signed with it any more (RFC 3339); the overlap counts
    /// from here.
    pub const SIGNING_STOPPED: &str = "mail.petrel.dev/dkim-signing-stopped";
    /// The value of the DkimKey's `mail.petrel.dev/rotate` annotation this key answered.
    pub const ROTATE_HANDLED: &str = "mail.petrel.dev/dkim-rotate-handled";
}

/// The two selectors of `key`: `spec.selectors`, else `<selectorPrefix>-a`/`-b`.
pub fn selectors(key: &DkimKey) -> [String; 2] {
    match key.spec.selectors.as_slice() {
        [a, b] => [a.clone(), b.clone()],
        _ => ["a", "b"].map(|s| format!("{}-{s}", key.spec.selector_prefix)),
    }
}

/// Name of the Secret of `selector` of `key`.
pub fn secret_name(key: &DkimKey, selector: &str) -> String {
    format!("{}-{selector}", key.name_any())
}

/// Owner name of the TXT record of `selector`, fully qualified.
pub fn record_name(key: &DkimKey, selector: &str) -> String {
    format!("{selector}._domainkey.{}.", key.spec.domain)
}

/// The TXT record value publishing `public_b64` for `key`; an empty `public_b64` is the
/// revoked record.
pub fn record_value(key: &DkimKey, public_b64: &str) -> String {
    format!(
        "v=DKIM1; k={}; p={public_b64}",
        key.spec.algorithm.key_type()
    )
}

/// A slot's rotation state, as its Secret's annotations hold it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotState {
    /// Phase (never `Pending`: a slot without a key has no state).
    pub phase: DkimKeyPhase,
    /// When `phase` was entered (Unix seconds).
    pub since: i64,
    /// Published: earliest time the pods may load the key.
    pub load_after: Option<i64>,
    /// Published: the pods are told to load it (without signing).
    pub staged: bool,
    /// Retiring: when the last pod stopped signing with it.
    pub signing_stopped: Option<i64>,
    /// The rotate request this key answered, if any.
    pub rotate_handled: Option<String>,
}

impl SlotState {
    /// A state entered at `now`, with nothing else set.
    pub fn entered(phase: DkimKeyPhase, now: i64) -> Self {
        Self {
            phase,
            since: now,
            load_after: None,
            staged: false,
            signing_stopped: None,
            rotate_handled: None,
        }
    }
}

/// One selector slot of a key, as found in the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    /// Selector, e.g. `petrel-a`.
    pub selector: String,
    /// Its Secret's name.
    pub secret_name: String,
    /// Its state; `None` when the slot has never held a key (or its Secret is unreadable).
    pub state: Option<SlotState>,
    /// The TXT record value stored with the key.
    pub record: Option<String>,
    /// Whether the Secret holds the private key.
    pub has_private_key: bool,
}

fn time(value: Option<&String>) -> Option<i64> {
    value?.parse::<Timestamp>().ok().map(|t| t.as_second())
}

/// RFC 3339 for Unix seconds.
pub fn rfc3339(secs: i64) -> String {
    Timestamp::from_second(secs)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

fn phase_name(phase: DkimKeyPhase) -> &'static str {
    match phase {
        DkimKeyPhase::Pending => "Pending",
        DkimKeyPhase::Generated => "Generated",
        DkimKeyPhase::Published => "Published",
        DkimKeyPhase::Active => "Active",
        DkimKeyPhase::Retiring => "Retiring",
        DkimKeyPhase::Revoked => "Revoked",
    }
}

fn parse_phase(name: &str) -> Option<DkimKeyPhase> {
    [
        DkimKeyPhase::Generated,
        DkimKeyPhase::Published,
        DkimKeyPhase::Active,
        DkimKeyPhase::Retiring,
        DkimKeyPhase::Revoked,
    ]
    .into_iter()
    .find(|p| phase_name(*p) == name)
}

/// Reads the state of a slot Secret. A Secret with a key but no state annotations (made
/// before rotation existed, or by hand) reads as `Generated` since the epoch: it is checked
/// in DNS like a new key, never trusted to be published.
pub fn read_state(secret: &Secret) -> Option<SlotState> {
    let notes = secret.metadata.annotations.clone().unwrap_or_default();
    let phase = match notes.get(annotations::PHASE) {
        Some(name) => parse_phase(name)?,
        None => {
            let has_key = secret
                .data
                .as_ref()
                .is_some_and(|d| d.contains_key(DKIM_PRIVATE_KEY));
            if !has_key {
                return None;
            }
            DkimKeyPhase::Generated
        }
    };
    Some(SlotState {
        phase,
        since: time(notes.get(annotations::SINCE)).unwrap_or(0),
        load_after: time(notes.get(annotations::LOAD_AFTER)),
        staged: notes.get(annotations::STAGED).is_some_and(|v| v == "true"),
        signing_stopped: time(notes.get(annotations::SIGNING_STOPPED)),
        rotate_handled: notes.get(annotations::ROTATE_HANDLED).cloned(),
    })
}

/// The two slots of `key` as `world` holds them.
pub fn read_slots(key: &DkimKey, world: &World) -> [Slot; 2] {
    let ns = key.namespace().unwrap_or_default();
    selectors(key).map(|selector| {
        let secret_name = secret_name(key, &selector);
        let secret = world.secret(&ns, &secret_name);
        let data = secret.and_then(|s| s.data.as_ref());
        Slot {
            state: secret.and_then(read_state),
            record: data
                .and_then(|d| d.get(DKIM_RECORD))
                .map(|v| String::from_utf8_lossy(&v.0).into_owned()),
            has_private_key: data.is_some_and(|d| d.contains_key(DKIM_PRIVATE_KEY)),
            selector,
            secret_name,
        }
    })
}

/// What a slot's Secret should hold after a step: its new state, and whether it needs a
/// fresh key (the slot is (re)used for the next key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotPlan {
    /// The state to write; `None` leaves the slot empty (no Secret).
    pub state: Option<SlotState>,
    /// Generate a new key into this slot.
    pub fresh: bool,
}

/// The slot Secrets of `key` for `plans`: existing key material is copied from `world`
/// (never regenerated), a fresh key is asked of `keys` only where a plan says so, and a
/// Revoked slot keeps only its revoked record.
///
/// The Secrets are written one at a time and the listener renders its pods' config from
/// whatever it sees in between, so the order matters: the Active slot comes first. At a
/// switch the new key then signs before the old one stops (for a moment both sign, both
/// published); the other order would leave a window in which nothing signs.
pub fn slot_secrets(
    key: &DkimKey,
    world: &World,
    plans: &[SlotPlan; 2],
    keys: &mut dyn KeySource,
) -> Result<Vec<Object>, RenderError> {
    let ns = key.namespace().unwrap_or_default();
    let mut objects = Vec::new();
    let names = selectors(key);
    let mut order: Vec<(&String, &SlotPlan)> = names.iter().zip(plans).collect();
    order.sort_by_key(|(_, plan)| {
        plan.state
            .as_ref()
            .is_none_or(|s| s.phase != DkimKeyPhase::Active)
    });
    for (selector, plan) in order {
        let Some(state) = &plan.state else { continue };
        let name = secret_name(key, selector);
        let mut data: BTreeMap<String, ByteString> = if plan.fresh {
            let material = keys
                .dkim(key.spec.algorithm)
                .map_err(|source| RenderError::Keys {
                    kind: "DkimKey",
                    name: key.name_any(),
                    source,
                })?;
            BTreeMap::from([
                (
                    DKIM_PRIVATE_KEY.to_owned(),
                    ByteString(material.private_pem.into_bytes()),
                ),
                (
                    DKIM_RECORD.to_owned(),
                    ByteString(record_value(key, &material.public_b64).into_bytes()),
                ),
            ])
        } else {
            world
                .secret(&ns, &name)
                .and_then(|s| s.data.clone())
                .unwrap_or_default()
        };
        data.insert(
            DKIM_SELECTOR.to_owned(),
            ByteString(selector.clone().into_bytes()),
        );
        if state.phase == DkimKeyPhase::Revoked {
            data.remove(DKIM_PRIVATE_KEY);
            data.insert(
                DKIM_RECORD.to_owned(),
                ByteString(record_value(key, "").into_bytes()),
            );
        }
        let mut metadata = owned_meta(key, name, "dkim-key");
        let mut notes = BTreeMap::from([
            (
                annotations::PHASE.to_owned(),
                phase_name(state.phase).to_owned(),
            ),
            (annotations::SINCE.to_owned(), rfc3339(state.since)),
        ]);
        if let Some(t) = state.load_after {
            notes.insert(annotations::LOAD_AFTER.to_owned(), rfc3339(t));
        }
        if state.staged {
            notes.insert(annotations::STAGED.to_owned(), "true".to_owned());
        }
        if let Some(t) = state.signing_stopped {
            notes.insert(annotations::SIGNING_STOPPED.to_owned(), rfc3339(t));
        }
        if let Some(v) = &state.rotate_handled {
            notes.insert(annotations::ROTATE_HANDLED.to_owned(), v.clone());
        }
        metadata.annotations = Some(notes);
        objects.push(Object::Secret(Secret {
            metadata,
            type_: Some("Opaque".to_owned()),
            data: Some(data),
            ..Secret::default()
        }));
    }
    Ok(objects)
}

/// The slot plans that keep every slot as it is, except that a key without any key
/// material gets its first key in slot `a` (`Generated` at `now`). What the offline
/// `render` and a first reconcile produce.
pub fn initial_plans(slots: &[Slot; 2], now: i64) -> [SlotPlan; 2] {
    let mut plans = slots.clone().map(|s| SlotPlan {
        state: s.state,
        fresh: false,
    });
    if slots.iter().all(|s| s.state.is_none()) {
        plans[0] = SlotPlan {
            state: Some(SlotState::entered(DkimKeyPhase::Generated, now)),
            fresh: true,
        };
    }
    plans
}

/// How a listener's pods use one selector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    /// Loaded and signing.
    Sign,
    /// Loaded only (the next key, staged before the switch).
    Load,
}

/// The selectors of `key` the pods load, with their use: the Active key signs, a staged
/// Published key is loaded. Only slots whose Secret holds the private key.
pub fn pod_keys(slots: &[Slot; 2]) -> Vec<(&Slot, Use)> {
    slots
        .iter()
        .filter(|s| s.has_private_key)
        .filter_map(|s| {
            let state = s.state.as_ref()?;
            match state.phase {
                DkimKeyPhase::Active => Some((s, Use::Sign)),
                DkimKeyPhase::Published if state.staged => Some((s, Use::Load)),
                _ => None,
            }
        })
        .collect()
}
