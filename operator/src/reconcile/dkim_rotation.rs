//! DKIM key rotation as a pure function: the two slots' states (read from their Secrets),
//! what the zone's authoritative nameservers answer, what the pods report and the clock
//! in; the slots' next states and the events to publish out.
//!
//! A key moves Generated → Published → Active → Retiring → Revoked, and its slot takes the
//! next key after that. The rules that keep mail verifiable:
//! * a key is Published only once *every* authoritative nameserver answers its record, and
//!   the pods load it only after the record TTL and the zone's negative-caching TTL;
//! * a key signs (Active) only once every Ready pod reports it has loaded it;
//! * a Retiring key's overlap counts from the moment no Ready pod signs with it any more,
//!   and only then is it Revoked (record kept, with an empty `p=`);
//! * a failed lookup is not an answer: it pauses the rotation, never demotes a key.
//!
//! Nothing here does I/O or keeps memory between calls: an operator restarted in the
//! middle of a rotation reads the same Secrets and takes the same step.

use crate::render::dkim::{Slot, SlotPlan, SlotState, rfc3339};
use crds::DkimKeyPhase;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// How soon a rotation waiting on DNS or on the pods looks again.
pub const RECHECK: Duration = Duration::from_secs(5);

/// What the authoritative nameservers said about one slot's record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DnsCheck {
    /// Every authoritative server answers the expected value; `wait` is the record TTL
    /// plus the zone's negative-caching TTL, in seconds.
    Visible {
        /// Seconds to wait before a resolver can no longer hold an older answer.
        wait: u64,
        /// How many servers answered.
        servers: usize,
    },
    /// At least one server definitely does not answer it (missing or another value).
    NotVisible {
        /// The servers that do not.
        lagging: Vec<String>,
    },
    /// Nothing is known: a lookup failed.
    LookupFailed(String),
    /// Not asked (DNS checks off, or nothing to check in this slot).
    NotChecked,
}

/// What the Ready MTA pods that load this key report (their `petrel_mta_dkim_keys`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodReport {
    /// Ready pods whose config includes this key's domain.
    pub ready: BTreeSet<String>,
    /// Ready pods whose report could not be read (they count as "not yet").
    pub unreadable: BTreeSet<String>,
    /// Selector → pods that have it loaded (signing or not).
    pub loaded: BTreeMap<String, BTreeSet<String>>,
    /// Selector → pods signing with it.
    pub signing: BTreeMap<String, BTreeSet<String>>,
}

impl PodReport {
    /// `Ok` when every Ready pod has `selector` loaded, else which pods do not.
    pub fn all_loaded(&self, selector: &str) -> Result<(), String> {
        let have = self.loaded.get(selector).cloned().unwrap_or_default();
        let missing: Vec<&str> = self
            .ready
            .iter()
            .filter(|p| !have.contains(*p) || self.unreadable.contains(*p))
            .map(String::as_str)
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "pods that have not loaded {selector} yet: {}",
                missing.join(", ")
            ))
        }
    }

    /// Whether no Ready pod signs with `selector` (and every report was read).
    pub fn none_signing(&self, selector: &str) -> bool {
        self.unreadable.is_empty() && self.signing.get(selector).is_none_or(BTreeSet::is_empty)
    }
}

/// The key's schedule, from its spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    /// Seconds between rotations; `None` with `rotation: Manual`.
    pub period: Option<i64>,
    /// Seconds a retired key's record stays after the last pod stopped signing with it.
    pub overlap: i64,
}

/// Everything one step looks at.
#[derive(Debug, Clone)]
pub struct Inputs<'a> {
    /// Now (Unix seconds).
    pub now: i64,
    /// Period and overlap.
    pub schedule: Schedule,
    /// The two slots as their Secrets hold them.
    pub slots: &'a [Slot; 2],
    /// DNS answers per slot.
    pub dns: &'a [DnsCheck; 2],
    /// The pods' reports.
    pub pods: &'a PodReport,
    /// The DkimKey's `mail.petrel.dev/rotate` annotation.
    pub rotate_request: Option<&'a str>,
}

/// An Event to publish on the DkimKey.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Reason (the phase entered, or what went wrong).
    pub reason: &'static str,
    /// Message.
    pub message: String,
    /// A Warning rather than a Normal event.
    pub warning: bool,
}

/// What one step decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// The slots' next states.
    pub plans: [SlotPlan; 2],
    /// Events, in order.
    pub events: Vec<Event>,
    /// Why the rotation is not moving by itself (publish a record, pods to load a key…).
    pub waiting: Vec<String>,
    /// Set when a DNS lookup failed: the rotation is paused, the active key keeps signing.
    pub paused: Option<String>,
    /// When the next rotation starts (Unix seconds); `None` with `rotation: Manual`.
    pub next_rotation: Option<i64>,
    /// When to look again.
    pub recheck: Duration,
}

fn phase(state: &Option<SlotState>) -> Option<DkimKeyPhase> {
    state.as_ref().map(|s| s.phase)
}

/// One step of the rotation. Pure.
pub fn step(input: &Inputs<'_>) -> Step {
    let now = input.now;
    let slots = input.slots;
    let mut states: [Option<SlotState>; 2] = [slots[0].state.clone(), slots[1].state.clone()];
    let mut fresh = [false, false];
    let mut events = Vec::new();
    let mut waiting = Vec::new();
    let mut paused = None;
    let mut deadlines: Vec<i64> = Vec::new();
    let mut soon = false;
    // A slot whose lookup failed does not move: nothing is known about its record.
    let blocked = [0, 1].map(|i| matches!(input.dns[i], DnsCheck::LookupFailed(_)));
    let event = |reason, message: String, warning| Event {
        reason,
        message,
        warning,
    };

    // A slot whose key material vanished (Secret edited by hand) cannot sign or publish:
    // it starts over.
    for (i, slot) in slots.iter().enumerate() {
        let needs_key = matches!(
            phase(&states[i]),
            Some(DkimKeyPhase::Generated | DkimKeyPhase::Published | DkimKeyPhase::Active)
        );
        if needs_key && !slot.has_private_key {
            events.push(event(
                "KeyMissing",
                format!(
                    "Secret {} lost its private key; selector {} starts over",
                    slot.secret_name, slot.selector
                ),
                true,
            ));
            states[i] = None;
        }
    }

    // Two Active slots: an operator stopped between the two writes of a switch (the new
    // key's Secret is written first, so that something always signs). Finish the switch:
    // the key that has signed longer retires; both are published, both may sign meanwhile.
    if let [Some(a), Some(b)] = &states
        && a.phase == DkimKeyPhase::Active
        && b.phase == DkimKeyPhase::Active
    {
        let older = usize::from(b.since < a.since);
        states[older] = states[older]
            .as_ref()
            .map(|p| SlotState::entered(DkimKeyPhase::Retiring, now).keep_request(p));
        events.push(event(
            "Retiring",
            format!(
                "{} no longer signs ({} took over); its record stays for the overlap once no pod signs with it",
                slots[older].selector,
                slots[1 - older].selector
            ),
            false,
        ));
        soon = true;
    }

    // DNS: publish what every authoritative server answers; take out what one definitely
    // no longer does; pause on failed lookups.
    for (i, slot) in slots.iter().enumerate() {
        let Some(state) = states[i].as_mut() else {
            continue;
        };
        let record = format!("TXT {}._domainkey", slot.selector);
        match (&input.dns[i], state.phase) {
            (DnsCheck::Visible { wait, servers }, DkimKeyPhase::Generated) => {
                let load_after = now + i64::try_from(*wait).unwrap_or(i64::MAX / 4);
                *state = SlotState {
                    load_after: Some(load_after),
                    ..SlotState::entered(DkimKeyPhase::Published, now)
                }
                .keep_request(state);
                events.push(event(
                    "Published",
                    format!(
                        "{record} is answered by all {servers} authoritative nameservers; the pods load {} after {} (record and negative-caching TTLs)",
                        slot.selector,
                        rfc3339(load_after)
                    ),
                    false,
                ));
            }
            (DnsCheck::NotVisible { lagging }, DkimKeyPhase::Generated) => {
                waiting.push(format!(
                    "publish {record} (value in status.selectors); not answered by {}",
                    lagging.join(", ")
                ));
                soon = true;
            }
            (DnsCheck::NotVisible { lagging }, DkimKeyPhase::Published | DkimKeyPhase::Active) => {
                let was = state.phase;
                *state = SlotState::entered(DkimKeyPhase::Generated, now).keep_request(state);
                events.push(event(
                    "RecordGone",
                    format!(
                        "{record} is no longer answered by {} ({was:?} before); {} does not sign until it is again",
                        lagging.join(", "),
                        slot.selector
                    ),
                    true,
                ));
                soon = true;
            }
            (DnsCheck::LookupFailed(why), DkimKeyPhase::Generated | DkimKeyPhase::Published) => {
                paused = Some(format!("{record}: {why}"));
                soon = true;
            }
            (DnsCheck::LookupFailed(why), DkimKeyPhase::Active) => {
                paused.get_or_insert(format!("{record}: {why}"));
            }
            (DnsCheck::NotChecked, DkimKeyPhase::Generated) => {
                waiting.push(format!(
                    "{record} is not checked (DNS checks are off), so the key is never published"
                ));
            }
            _ => {}
        }
    }

    // Stage a published key on the pods once the TTLs have passed.
    for (i, slot) in slots.iter().enumerate() {
        let Some(state) = states[i].as_mut() else {
            continue;
        };
        if state.phase != DkimKeyPhase::Published || state.staged || blocked[i] {
            continue;
        }
        let load_after = state.load_after.unwrap_or(state.since);
        if now >= load_after {
            state.staged = true;
            events.push(event(
                "Staged",
                format!(
                    "the pods load {} (not signing yet) and report it",
                    slot.selector
                ),
                false,
            ));
            soon = true;
        } else {
            waiting.push(format!(
                "{}: waiting out DNS caches until {}",
                slot.selector,
                rfc3339(load_after)
            ));
            deadlines.push(load_after);
        }
    }

    // Switch: a staged key every Ready pod has loaded signs; the previous key retires.
    for i in 0..2 {
        let staged = states[i]
            .as_ref()
            .is_some_and(|s| s.phase == DkimKeyPhase::Published && s.staged);
        if !staged || blocked[i] {
            continue;
        }
        let selector = &slots[i].selector;
        match input.pods.all_loaded(selector) {
            Ok(()) => {
                let previous = states[i].take();
                states[i] = previous
                    .as_ref()
                    .map(|p| SlotState::entered(DkimKeyPhase::Active, now).keep_request(p));
                events.push(event(
                    "Active",
                    format!(
                        "every Ready pod ({}) has loaded {selector}; it signs from now on",
                        input.pods.ready.len()
                    ),
                    false,
                ));
                let other = 1 - i;
                if phase(&states[other]) == Some(DkimKeyPhase::Active) {
                    states[other] = states[other]
                        .as_ref()
                        .map(|p| SlotState::entered(DkimKeyPhase::Retiring, now).keep_request(p));
                    events.push(event(
                        "Retiring",
                        format!(
                            "{} no longer signs; its record stays for the overlap once no pod signs with it",
                            slots[other].selector
                        ),
                        false,
                    ));
                }
                soon = true;
            }
            Err(why) => {
                waiting.push(why);
                soon = true;
            }
        }
    }

    // Retire: the overlap counts from the last signature, then the key is revoked.
    for (i, slot) in slots.iter().enumerate() {
        let Some(state) = states[i].as_mut() else {
            continue;
        };
        if state.phase != DkimKeyPhase::Retiring || state.since == now {
            continue;
        }
        if state.signing_stopped.is_none() {
            if input.pods.none_signing(&slot.selector) {
                state.signing_stopped = Some(now);
            } else {
                soon = true;
                continue;
            }
        }
        let revoke_at = state.signing_stopped.unwrap_or(now) + input.schedule.overlap;
        if now >= revoke_at {
            *state = SlotState::entered(DkimKeyPhase::Revoked, now).keep_request(state);
            events.push(event(
                "Revoked",
                format!(
                    "{} is revoked: private key deleted, record kept with an empty p= until the slot takes the next key",
                    slot.selector
                ),
                false,
            ));
        } else {
            deadlines.push(revoke_at);
        }
    }

    // Rotate: a new key in the other slot when due or asked for; the very first key (or a
    // fresh start after every key was lost) in the first free slot.
    let active = (0..2).find(|&i| phase(&states[i]) == Some(DkimKeyPhase::Active));
    let incoming = (0..2).any(|i| {
        matches!(
            phase(&states[i]),
            Some(DkimKeyPhase::Generated | DkimKeyPhase::Published)
        )
    });
    let request = input.rotate_request.filter(|r| {
        !states
            .iter()
            .chain(slots.iter().map(|s| &s.state))
            .flatten()
            .any(|s| s.rotate_handled.as_deref() == Some(*r))
    });
    let free = |s: &Option<SlotState>| s.is_none() || phase(s) == Some(DkimKeyPhase::Revoked);
    let mut next_rotation = None;
    match active {
        Some(a) => {
            let other = 1 - a;
            let due = input
                .schedule
                .period
                .map(|p| states[a].as_ref().map_or(now, |s| s.since) + p);
            let revoke_at = states[other]
                .as_ref()
                .filter(|s| s.phase == DkimKeyPhase::Retiring)
                .map(|s| s.signing_stopped.unwrap_or(now) + input.schedule.overlap);
            next_rotation = due.map(|d| d.max(revoke_at.unwrap_or(d)));
            let wanted = due.is_some_and(|d| now >= d) || request.is_some();
            if wanted && !incoming {
                if free(&states[other]) {
                    let mut state = SlotState::entered(DkimKeyPhase::Generated, now);
                    state.rotate_handled = request.map(str::to_owned);
                    states[other] = Some(state);
                    fresh[other] = true;
                    events.push(event(
                        "Generated",
                        format!(
                            "rotation{}: a new key in selector {}; publish its record",
                            if request.is_some() {
                                " (asked for)"
                            } else {
                                ""
                            },
                            slots[other].selector
                        ),
                        false,
                    ));
                    soon = true;
                } else if let Some(at) = revoke_at {
                    waiting.push(format!(
                        "the next key waits for selector {} to be revoked at {}",
                        slots[other].selector,
                        rfc3339(at)
                    ));
                }
            } else if let Some(at) = next_rotation {
                deadlines.push(at);
            }
        }
        None if !incoming => {
            if let Some(i) = (0..2).find(|&i| free(&states[i])) {
                let mut state = SlotState::entered(DkimKeyPhase::Generated, now);
                state.rotate_handled = request.map(str::to_owned);
                states[i] = Some(state);
                fresh[i] = true;
                events.push(event(
                    "Generated",
                    format!(
                        "a new key in selector {}; publish its record",
                        slots[i].selector
                    ),
                    false,
                ));
                soon = true;
            } else {
                waiting.push(
                    "no free selector slot: waiting for the retiring key to be revoked".to_owned(),
                );
            }
        }
        None => {}
    }

    let mut recheck = super::RESYNC;
    if soon || paused.is_some() {
        recheck = recheck.min(RECHECK);
    }
    for at in deadlines {
        let secs = u64::try_from((at - now).max(1)).unwrap_or(1);
        recheck = recheck.min(Duration::from_secs(secs));
    }
    let [a, b] = states;
    Step {
        plans: [
            SlotPlan {
                state: a,
                fresh: fresh[0],
            },
            SlotPlan {
                state: b,
                fresh: fresh[1],
            },
        ],
        events,
        waiting,
        paused,
        next_rotation,
        recheck,
    }
}

impl SlotState {
    /// `self`, keeping the rotate request `previous` answered.
    fn keep_request(mut self, previous: &SlotState) -> Self {
        self.rotate_handled = previous.rotate_handled.clone();
        self
    }
}

#[cfg(test)]
mod tests;
