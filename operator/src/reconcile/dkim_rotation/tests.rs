//! The rotation's transitions one by one, then whole rotations simulated against a model
//! of two authoritative nameservers that lag, pods that take their time to load configs,
//! and a DNS outage, with the state passed between steps only through the slot Secrets
//! (so every step is also what an operator restarted at that moment would do).

use super::*;
use crate::keys::{DkimMaterial, KeyError, KeySource, TlsMaterial};
use crate::render::dkim::{self, Use};
use crate::render::{Object, World};
use crds::{ConditionStatus, DkimAlgorithm, DkimKey};
use k8s_openapi::api::core::v1::Secret;
use std::collections::BTreeMap;

fn key(period: &str, overlap: &str) -> DkimKey {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "mail.petrel.dev/v1alpha1", "kind": "DkimKey",
        "metadata": {"name": "k", "namespace": "mail", "uid": "u1", "generation": 1},
        "spec": {"domain": "example.com", "algorithm": "ed25519",
                 "rotationPeriod": period, "overlap": overlap}
    }))
    .expect("key")
}

/// Keys that differ each time, so a reused slot gets a new record.
#[derive(Default)]
struct CountingKeys(u32);

impl KeySource for CountingKeys {
    fn token(&mut self) -> Result<String, KeyError> {
        Err(KeyError::Failed("not in this test".into()))
    }
    fn tls(&mut self, _: &str) -> Result<TlsMaterial, KeyError> {
        Err(KeyError::Failed("not in this test".into()))
    }
    fn dkim(&mut self, _: DkimAlgorithm) -> Result<DkimMaterial, KeyError> {
        self.0 += 1;
        Ok(DkimMaterial {
            private_pem: format!("KEY {}\n", self.0),
            public_b64: format!("cHVi{}", self.0),
        })
    }
}

fn slot(selector: &str, state: Option<SlotState>) -> Slot {
    Slot {
        selector: selector.into(),
        secret_name: format!("k-{selector}"),
        record: state.as_ref().map(|_| "v=DKIM1; k=ed25519; p=x".into()),
        has_private_key: state
            .as_ref()
            .is_some_and(|s| s.phase != DkimKeyPhase::Revoked),
        state,
    }
}

fn st(phase: DkimKeyPhase, since: i64) -> Option<SlotState> {
    Some(SlotState::entered(phase, since))
}

const SCHEDULE: Schedule = Schedule {
    period: Some(100),
    overlap: 50,
};

fn visible() -> DnsCheck {
    DnsCheck::Visible {
        wait: 30,
        servers: 2,
    }
}

fn pods(loaded: &[&str], signing: &[&str]) -> PodReport {
    let all: BTreeSet<String> = ["p0".to_owned(), "p1".to_owned()].into();
    PodReport {
        ready: all.clone(),
        unreadable: BTreeSet::new(),
        loaded: loaded
            .iter()
            .map(|s| ((*s).to_owned(), all.clone()))
            .collect(),
        signing: signing
            .iter()
            .map(|s| ((*s).to_owned(), all.clone()))
            .collect(),
    }
}

fn run(
    slots: [Slot; 2],
    dns: [DnsCheck; 2],
    pods: &PodReport,
    now: i64,
    request: Option<&str>,
) -> Step {
    step(&Inputs {
        now,
        schedule: SCHEDULE,
        slots: &slots,
        dns: &dns,
        pods,
        rotate_request: request,
    })
}

fn phases(step: &Step) -> [Option<DkimKeyPhase>; 2] {
    [0, 1].map(|i| step.plans[i].state.as_ref().map(|s| s.phase))
}

#[test]
fn each_transition() {
    use DkimKeyPhase::*;
    let none = DnsCheck::NotChecked;
    // The first key goes into slot a.
    let s = run(
        [slot("a", None), slot("b", None)],
        [none.clone(), none.clone()],
        &pods(&[], &[]),
        0,
        None,
    );
    assert_eq!(phases(&s), [Some(Generated), None]);
    assert!(s.plans[0].fresh && !s.plans[1].fresh);

    // Generated waits for every authoritative server…
    let lagging = DnsCheck::NotVisible {
        lagging: vec!["ns2.example.com.".into()],
    };
    let s = run(
        [slot("a", st(Generated, 0)), slot("b", None)],
        [lagging, none.clone()],
        &pods(&[], &[]),
        5,
        None,
    );
    assert_eq!(phases(&s), [Some(Generated), None]);
    assert!(s.waiting[0].contains("ns2.example.com."), "{:?}", s.waiting);
    // …and is Published once all answer, loadable after the TTLs.
    let s = run(
        [slot("a", st(Generated, 0)), slot("b", None)],
        [visible(), none.clone()],
        &pods(&[], &[]),
        10,
        None,
    );
    assert_eq!(phases(&s), [Some(Published), None]);
    assert_eq!(s.plans[0].state.as_ref().unwrap().load_after, Some(40));
    assert!(!s.plans[0].fresh, "a key is generated once");

    // Not staged before load_after; staged after.
    let published = |staged| {
        Some(SlotState {
            load_after: Some(40),
            staged,
            ..SlotState::entered(Published, 10)
        })
    };
    let s = run(
        [slot("a", published(false)), slot("b", None)],
        [visible(), none.clone()],
        &pods(&[], &[]),
        39,
        None,
    );
    assert!(!s.plans[0].state.as_ref().unwrap().staged);
    assert_eq!(s.recheck, Duration::from_secs(1));
    let s = run(
        [slot("a", published(false)), slot("b", None)],
        [visible(), none.clone()],
        &pods(&[], &[]),
        40,
        None,
    );
    assert!(s.plans[0].state.as_ref().unwrap().staged);
    assert_eq!(
        phases(&s),
        [Some(Published), None],
        "staged is not yet signing"
    );

    // Active only once every Ready pod reports it loaded.
    let mut half = pods(&["a"], &[]);
    half.loaded.get_mut("a").unwrap().remove("p1");
    let s = run(
        [slot("a", published(true)), slot("b", None)],
        [visible(), none.clone()],
        &half,
        45,
        None,
    );
    assert_eq!(phases(&s), [Some(Published), None]);
    assert!(s.waiting[0].contains("p1"), "{:?}", s.waiting);
    let mut unreadable = pods(&["a"], &[]);
    unreadable.unreadable.insert("p0".into());
    let s = run(
        [slot("a", published(true)), slot("b", None)],
        [visible(), none.clone()],
        &unreadable,
        45,
        None,
    );
    assert_eq!(
        phases(&s),
        [Some(Published), None],
        "an unreadable pod is not a yes"
    );
    let s = run(
        [slot("a", published(true)), slot("b", None)],
        [visible(), none.clone()],
        &pods(&["a"], &[]),
        45,
        None,
    );
    assert_eq!(phases(&s), [Some(Active), None]);
    assert_eq!(s.next_rotation, Some(145));

    // Rotation due: the other slot gets a new key; the active one keeps signing.
    let s = run(
        [slot("a", st(Active, 45)), slot("b", None)],
        [visible(), none.clone()],
        &pods(&["a"], &["a"]),
        145,
        None,
    );
    assert_eq!(phases(&s), [Some(Active), Some(Generated)]);
    assert!(s.plans[1].fresh);
    // Not before it is due…
    let s = run(
        [slot("a", st(Active, 45)), slot("b", None)],
        [visible(), none.clone()],
        &pods(&["a"], &["a"]),
        144,
        None,
    );
    assert_eq!(phases(&s), [Some(Active), None]);
    // …unless asked, once per request value.
    let s = run(
        [slot("a", st(Active, 45)), slot("b", None)],
        [visible(), none.clone()],
        &pods(&["a"], &["a"]),
        50,
        Some("r1"),
    );
    assert_eq!(phases(&s), [Some(Active), Some(Generated)]);
    assert_eq!(
        s.plans[1].state.as_ref().unwrap().rotate_handled.as_deref(),
        Some("r1")
    );
    let answered = Some(SlotState {
        rotate_handled: Some("r1".into()),
        ..SlotState::entered(Revoked, 60)
    });
    let s = run(
        [slot("a", st(Active, 45)), slot("b", answered)],
        [visible(), none.clone()],
        &pods(&["a"], &["a"]),
        70,
        Some("r1"),
    );
    assert_eq!(
        phases(&s),
        [Some(Active), Some(Revoked)],
        "r1 was answered already"
    );

    // The switch: b (staged, loaded everywhere) signs, a retires.
    let s = run(
        [slot("a", st(Active, 45)), slot("b", published(true))],
        [visible(), visible()],
        &pods(&["a", "b"], &["a"]),
        150,
        None,
    );
    assert_eq!(phases(&s), [Some(Retiring), Some(Active)]);
    // The overlap counts from the last signature with a, not from the switch.
    let retiring = st(Retiring, 150);
    let s = run(
        [slot("a", retiring.clone()), slot("b", st(Active, 150))],
        [none.clone(), visible()],
        &pods(&["a", "b"], &["a", "b"]),
        160,
        None,
    );
    assert_eq!(s.plans[0].state.as_ref().unwrap().signing_stopped, None);
    let s = run(
        [slot("a", retiring), slot("b", st(Active, 150))],
        [none.clone(), visible()],
        &pods(&["b"], &["b"]),
        170,
        None,
    );
    assert_eq!(
        s.plans[0].state.as_ref().unwrap().signing_stopped,
        Some(170)
    );
    let stopped = Some(SlotState {
        signing_stopped: Some(170),
        ..SlotState::entered(Retiring, 150)
    });
    let s = run(
        [slot("a", stopped.clone()), slot("b", st(Active, 150))],
        [none.clone(), visible()],
        &pods(&["b"], &["b"]),
        219,
        None,
    );
    assert_eq!(phases(&s), [Some(Retiring), Some(Active)]);
    assert_eq!(s.recheck, Duration::from_secs(1));
    let s = run(
        [slot("a", stopped.clone()), slot("b", st(Active, 150))],
        [none.clone(), visible()],
        &pods(&["b"], &["b"]),
        220,
        None,
    );
    assert_eq!(phases(&s), [Some(Revoked), Some(Active)]);
    // A rotation due while the other slot still retires waits for its revocation.
    let s = run(
        [slot("a", stopped), slot("b", st(Active, 100))],
        [none.clone(), visible()],
        &pods(&["b"], &["b"]),
        205,
        None,
    );
    assert_eq!(phases(&s), [Some(Retiring), Some(Active)]);
    assert_eq!(s.next_rotation, Some(220));
    assert!(
        s.waiting.iter().any(|w| w.contains("revoked")),
        "{:?}",
        s.waiting
    );

    // Published → Generated when a server definitely no longer answers the record
    // (RecordGone): not staged, not loaded, waits to be published again.
    let gone = DnsCheck::NotVisible {
        lagging: vec!["ns2.example.com.".into()],
    };
    let s = run(
        [slot("a", st(Active, 45)), slot("b", published(true))],
        [visible(), gone],
        &pods(&["a", "b"], &["a"]),
        150,
        None,
    );
    assert_eq!(phases(&s), [Some(Active), Some(Generated)]);
    let b = s.plans[1].state.as_ref().unwrap();
    assert!(!b.staged && b.load_after.is_none(), "{b:?}");
    assert!(!s.plans[1].fresh, "the same key, published again");
    assert!(
        s.events
            .iter()
            .any(|e| e.reason == "RecordGone" && e.warning && e.message.contains("Published")),
        "{:?}",
        s.events
    );
    // Published → Generated with a new key when its Secret lost the private key
    // (KeyMissing): nothing signs with a key that is not there.
    let mut lost = slot("b", published(true));
    lost.has_private_key = false;
    let s = run(
        [slot("a", st(Active, 45)), lost],
        [visible(), visible()],
        &pods(&["a", "b"], &["a"]),
        150,
        None,
    );
    assert_eq!(phases(&s), [Some(Active), Some(Generated)]);
    assert!(s.plans[1].fresh, "a new key in the slot");
    assert!(
        s.events
            .iter()
            .any(|e| e.reason == "KeyMissing" && e.warning && e.message.contains("k-b")),
        "{:?}",
        s.events
    );
    // Two Active slots (an operator stopped between the two writes of a switch): the
    // switch is finished, the key that signed longer retires.
    let s = run(
        [slot("a", st(Active, 45)), slot("b", st(Active, 150))],
        [visible(), visible()],
        &pods(&["a", "b"], &["a", "b"]),
        151,
        None,
    );
    assert_eq!(phases(&s), [Some(Retiring), Some(Active)]);
    let s = run(
        [slot("a", st(Active, 150)), slot("b", st(Active, 45))],
        [visible(), visible()],
        &pods(&["a", "b"], &["a", "b"]),
        151,
        None,
    );
    assert_eq!(phases(&s), [Some(Active), Some(Retiring)]);
}

#[test]
fn dns_failures_pause_and_never_demote() {
    use DkimKeyPhase::*;
    let failed = DnsCheck::LookupFailed("timeout".into());
    let none = DnsCheck::NotChecked;
    for phase in [Generated, Published, Active] {
        let s = run(
            [slot("a", st(phase, 0)), slot("b", None)],
            [failed.clone(), none.clone()],
            &pods(&["a"], &[]),
            10,
            None,
        );
        assert_eq!(
            phases(&s)[0],
            Some(phase),
            "{phase:?} kept on a failed lookup"
        );
        assert!(s.paused.is_some());
    }
    // A definite "gone" takes the active key out of signing.
    let gone = DnsCheck::NotVisible {
        lagging: vec!["ns1.example.com.".into()],
    };
    let s = run(
        [slot("a", st(Active, 0)), slot("b", None)],
        [gone, none.clone()],
        &pods(&["a"], &["a"]),
        10,
        None,
    );
    assert_eq!(phases(&s), [Some(Generated), None]);
    assert!(
        s.events
            .iter()
            .any(|e| e.reason == "RecordGone" && e.warning)
    );
}

/// A pod's config: selector → (the record of the key it holds, whether it signs).
type PodConfig = BTreeMap<String, (String, bool)>;

/// Decides, from the time and how many Secrets a step changes, whether the operator
/// "crashes" after the first Secret write of that step.
type Crash = fn(i64, usize) -> bool;

/// The outside world of the simulation.
struct Model {
    world: World,
    key: DkimKey,
    keys: CountingKeys,
    /// Per nameserver: selector → (record value, time it was published there).
    servers: [BTreeMap<String, (String, i64)>; 2],
    /// Seconds each nameserver takes to publish what status asks for.
    server_lag: [i64; 2],
    /// The config each pod runs, and since when the operator's config said so (pods
    /// adopt it after their lag).
    pods: [PodConfig; 2],
    pod_lag: [i64; 2],
    desired_since: (PodConfig, i64),
    /// Every signature: (time, selector, record of the key that signed).
    signed: Vec<(i64, String, String)>,
    /// Record TTL + negative TTL the servers report.
    wait: u64,
    /// When the operator stops after the first Secret write of a step.
    crash: Crash,
    /// The steps cut short: (time, Secrets the whole step would have changed).
    crashes: Vec<(i64, usize)>,
}

impl Model {
    fn new(period: &str, overlap: &str) -> Self {
        Self {
            world: World::default(),
            key: key(period, overlap),
            keys: CountingKeys::default(),
            servers: [BTreeMap::new(), BTreeMap::new()],
            server_lag: [3, 8],
            pods: [BTreeMap::new(), BTreeMap::new()],
            pod_lag: [2, 6],
            desired_since: (BTreeMap::new(), 0),
            signed: Vec::new(),
            wait: 10,
            crash: |_, _| false,
            crashes: Vec::new(),
        }
    }

    fn dns(&self, slot: &Slot, outage: bool) -> DnsCheck {
        let (Some(record), Some(_)) = (&slot.record, &slot.state) else {
            return DnsCheck::NotChecked;
        };
        if outage {
            return DnsCheck::LookupFailed("SERVFAIL".into());
        }
        let lagging: Vec<String> = self
            .servers
            .iter()
            .enumerate()
            .filter(|(_, s)| s.get(&slot.selector).map(|(v, _)| v) != Some(record))
            .map(|(i, _)| format!("ns{}.example.com.", i + 1))
            .collect();
        if lagging.is_empty() {
            DnsCheck::Visible {
                wait: self.wait,
                servers: 2,
            }
        } else {
            DnsCheck::NotVisible { lagging }
        }
    }

    fn report(&self) -> PodReport {
        let mut r = PodReport::default();
        for (i, config) in self.pods.iter().enumerate() {
            let name = format!("p{i}");
            r.ready.insert(name.clone());
            for (selector, (_, signs)) in config {
                r.loaded
                    .entry(selector.clone())
                    .or_default()
                    .insert(name.clone());
                if *signs {
                    r.signing
                        .entry(selector.clone())
                        .or_default()
                        .insert(name.clone());
                }
            }
        }
        r
    }

    /// Whether `secret` differs from the one of that name in the world.
    fn changes(&self, secret: &Secret) -> bool {
        let name = secret.metadata.name.as_deref().unwrap_or_default();
        self.world.secret("mail", name).is_none_or(|old| {
            old.metadata.annotations != secret.metadata.annotations || old.data != secret.data
        })
    }

    /// One second of the world: the operator steps (reading only the Secrets), DNS and
    /// pods follow with their lags, and each pod signs one message.
    fn tick(&mut self, now: i64, outage: bool, request: Option<&str>) -> Step {
        let slots = dkim::read_slots(&self.key, &self.world);
        let dns = [self.dns(&slots[0], outage), self.dns(&slots[1], outage)];
        let report = self.report();
        let step = step(&Inputs {
            now,
            schedule: super::super::dkim_key::schedule(&self.key),
            slots: &slots,
            dns: &dns,
            pods: &report,
            rotate_request: request,
        });
        let secrets: Vec<Secret> =
            dkim::slot_secrets(&self.key, &self.world, &step.plans, &mut self.keys)
                .expect("render")
                .into_iter()
                .filter_map(|o| match o {
                    Object::Secret(s) => Some(s),
                    _ => None,
                })
                .collect();
        let changed = secrets.iter().filter(|s| self.changes(s)).count();
        // An operator that stops after the first write of a step (and is restarted)
        // leaves the Secrets half-way; the next step reads them as they are.
        let crashed = (self.crash)(now, changed);
        let landing = if crashed { 1 } else { secrets.len() };
        // The Secrets land one at a time, and the listener may render the pods' config
        // from any state in between: once a key signs, every one of those states has a
        // signing key.
        let signed_before = self.signs_any();
        for s in secrets.into_iter().take(landing) {
            self.world
                .secrets
                .retain(|old| old.metadata.name != s.metadata.name);
            self.world.secrets.push(s);
            assert!(
                !signed_before || self.signs_any(),
                "at {now} a partly written step leaves no signing key"
            );
        }
        let slots = dkim::read_slots(&self.key, &self.world);
        if crashed {
            self.crashes.push((now, changed));
        } else {
            // A step writes only what the Secrets can say again: read back, it is the plan.
            for (slot, plan) in slots.iter().zip(&step.plans) {
                assert_eq!(
                    slot.state, plan.state,
                    "state survives the Secret round trip"
                );
            }
        }
        // Nameservers copy the records status shows, each after its lag.
        for (i, server) in self.servers.iter_mut().enumerate() {
            for slot in &slots {
                let (Some(record), Some(state)) = (&slot.record, &slot.state) else {
                    continue;
                };
                if now - state.since >= self.server_lag[i]
                    && server.get(&slot.selector).map(|(v, _)| v) != Some(record)
                {
                    server.insert(slot.selector.clone(), (record.clone(), now));
                }
            }
        }
        // Pods adopt the operator's config after their lag.
        let desired: PodConfig = dkim::pod_keys(&slots)
            .into_iter()
            .map(|(s, u)| {
                let record = s.record.clone().expect("a loaded key has its record");
                (s.selector.clone(), (record, u == Use::Sign))
            })
            .collect();
        if desired != self.desired_since.0 {
            self.desired_since = (desired, now);
        }
        for (i, pod) in self.pods.iter_mut().enumerate() {
            if now - self.desired_since.1 >= self.pod_lag[i] {
                pod.clone_from(&self.desired_since.0);
            }
        }
        // Each pod signs a message with every key it signs with now.
        for pod in &self.pods {
            for (selector, (record, signs)) in pod {
                if *signs {
                    self.signed.push((now, selector.clone(), record.clone()));
                }
            }
        }
        step
    }

    /// Whether the pods' config rendered from the Secrets as they are now has a key that
    /// signs.
    fn signs_any(&self) -> bool {
        let slots = dkim::read_slots(&self.key, &self.world);
        dkim::pod_keys(&slots).iter().any(|(_, u)| *u == Use::Sign)
    }

    /// Whether `selector`'s record `record` has been on every nameserver for `wait`.
    fn published_long_enough(&self, selector: &str, now: i64, record: &str) -> bool {
        self.servers.iter().all(|s| {
            s.get(selector).is_some_and(|(v, at)| {
                v == record && now - at >= i64::try_from(self.wait).unwrap_or(0)
            })
        })
    }
}

/// What [`rotate_for`] saw: every key that became Active and every revocation, each as
/// (time, selector).
struct Seen {
    activations: Vec<(i64, String)>,
    revocations: Vec<(i64, String)>,
}

impl Seen {
    /// The two slots took turns at least twice each, and at least two keys were revoked.
    fn assert_two_rotations(&self, [first, second]: [&str; 2]) {
        let selectors: Vec<&str> = self.activations.iter().map(|(_, s)| s.as_str()).collect();
        assert!(
            selectors.starts_with(&[first, second, first, second]),
            "slots alternate: {:?}",
            self.activations
        );
        assert!(self.revocations.len() >= 2, "{:?}", self.revocations);
    }
}

/// Runs `m` for `seconds` with a DNS outage during `outage`, checking the invariants at
/// every second: no signature with a key whose record is not on every nameserver (for the
/// record and negative-caching TTLs); no key revoked while a signature made with it may
/// still be checked (`overlap` seconds); a revoked record has an empty `p=`; an outage
/// demotes nothing; signing never stops once it has started.
fn rotate_for(m: &mut Model, seconds: i64, outage: std::ops::Range<i64>, overlap: i64) -> Seen {
    let mut seen = Seen {
        activations: Vec::new(),
        revocations: Vec::new(),
    };
    let mut last_phase: BTreeMap<String, DkimKeyPhase> = BTreeMap::new();
    let mut last_record: BTreeMap<String, String> = BTreeMap::new();
    for now in 0..seconds {
        let step = m.tick(now, outage.contains(&now), None);
        let slots = dkim::read_slots(&m.key, &m.world);
        for slot in &slots {
            let phase = slot.state.as_ref().map(|s| s.phase);
            let before = last_phase.get(&slot.selector).copied();
            if phase == Some(DkimKeyPhase::Active) && before != Some(DkimKeyPhase::Active) {
                seen.activations.push((now, slot.selector.clone()));
            }
            if phase == Some(DkimKeyPhase::Revoked) && before != Some(DkimKeyPhase::Revoked) {
                seen.revocations.push((now, slot.selector.clone()));
                // No revocation while a signature made with this key may still be checked.
                let revoked_key = &last_record[&slot.selector];
                let last = m
                    .signed
                    .iter()
                    .filter(|(_, s, r)| *s == slot.selector && r == revoked_key)
                    .map(|(t, _, _)| *t)
                    .max()
                    .expect("it signed");
                assert!(
                    now - last >= overlap,
                    "{} revoked at {now}, signed at {last}",
                    slot.selector
                );
                assert!(!slot.has_private_key, "revoked: private key deleted");
                let record = slot.record.as_deref().expect("the revoked record stays");
                assert_eq!(
                    record.split("; ").find_map(|tag| tag.strip_prefix("p=")),
                    Some(""),
                    "revoked: empty p= in {record:?}"
                );
            }
            if outage.contains(&now) && before == Some(DkimKeyPhase::Active) {
                assert_eq!(
                    phase,
                    Some(DkimKeyPhase::Active),
                    "an outage demotes nothing"
                );
            }
            if let Some(p) = phase {
                last_phase.insert(slot.selector.clone(), p);
            }
            if let Some(r) = &slot.record {
                last_record.insert(slot.selector.clone(), r.clone());
            }
        }
        // Every signature made this second is with a key whose record every nameserver
        // has served for the record TTL + negative TTL.
        for (t, selector, record) in m.signed.iter().filter(|(t, _, _)| *t == now) {
            assert!(
                m.published_long_enough(selector, *t, record),
                "signed with {selector} ({record}) at {t} before its record was published everywhere"
            );
        }
        if outage.contains(&now) {
            assert!(step.paused.is_some(), "the outage is reported at {now}");
        }
    }
    // Signing never stopped once it had started.
    let first = m.signed.first().expect("signed").0;
    for now in first..seconds {
        assert!(
            m.signed.iter().any(|(t, _, _)| *t == now),
            "no signature at {now}"
        );
    }
    seen
}

/// Two full rotations (and the start of a third) with lagging nameservers and slow pods,
/// a DNS outage in the middle, and the invariants checked at every second.
#[test]
fn rotations_keep_every_signature_verifiable() {
    let mut m = Model::new("60s", "30s");
    let seen = rotate_for(&mut m, 400, 150..175, 30);
    seen.assert_two_rotations(["petrel-a", "petrel-b"]);
}

/// The operator stops after the first Secret write of a step (and a new one carries on
/// from the Secrets): at every step that changes both slots (the switch: the new key's
/// Secret says Active before the old one's says Retiring) and at every 7th second. The
/// invariants hold and the rotation goes on.
#[test]
fn a_crash_between_two_secret_writes_breaks_nothing() {
    let mut m = Model::new("60s", "30s");
    m.crash = |now, changed| changed > 1 || now % 7 == 0;
    let seen = rotate_for(&mut m, 400, 150..175, 30);
    let switches = m.crashes.iter().filter(|(_, changed)| *changed > 1).count();
    assert!(
        switches >= 2,
        "switches cut short after their first write: {:?}",
        m.crashes
    );
    seen.assert_two_rotations(["petrel-a", "petrel-b"]);
}

/// Selectors of the user's choosing (`spec.selectors`) name the slots, their Secrets and
/// records; keys alternate between them as with the default names.
#[test]
fn custom_selectors_rotate_like_the_default_ones() {
    let mut m = Model::new("60s", "30s");
    m.key.spec.selectors = vec!["mail2026".into(), "backup".into()];
    let seen = rotate_for(&mut m, 400, 0..0, 30);
    seen.assert_two_rotations(["mail2026", "backup"]);
    let names: Vec<String> = m
        .world
        .secrets
        .iter()
        .filter_map(|s| s.metadata.name.clone())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(names.contains(&"k-mail2026".to_owned()) && names.contains(&"k-backup".to_owned()));
    assert!(
        m.signed
            .iter()
            .all(|(_, s, _)| s == "mail2026" || s == "backup"),
        "only the chosen selectors sign"
    );
    assert_eq!(
        dkim::record_name(&m.key, "backup"),
        "backup._domainkey.example.com."
    );
}

/// Manual rotation: nothing rotates by the clock; each new annotation value rotates once.
#[test]
fn manual_rotation_follows_the_annotation() {
    let mut m = Model::new("1s", "5s");
    m.key.spec.rotation = crds::DkimRotation::Manual;
    let mut active = Vec::new();
    let mut last = None;
    for now in 0..300 {
        let request = match now {
            0..100 => None,
            100..200 => Some("first"),
            _ => Some("second"),
        };
        let step = m.tick(now, false, request);
        assert_eq!(step.next_rotation, None);
        let slots = dkim::read_slots(&m.key, &m.world);
        let current = slots
            .iter()
            .find(|s| s.state.as_ref().map(|st| st.phase) == Some(DkimKeyPhase::Active))
            .map(|s| s.selector.clone());
        if current != last {
            active.push((now, current.clone()));
            last = current;
        }
    }
    let names: Vec<Option<&str>> = active.iter().map(|(_, s)| s.as_deref()).collect();
    assert_eq!(
        names,
        vec![Some("petrel-a"), Some("petrel-b"), Some("petrel-a")],
        "{active:?}"
    );
    assert!(
        active[0].0 < 100,
        "the first key needs no request: {active:?}"
    );
    assert!(active[1].0 >= 100 && active[2].0 >= 200, "{active:?}");
}

/// The conditions `dkim_key::status` reports for what a step decided: DNS, the rotation's
/// progress (waiting, paused by a DNS outage, idle) and Ready (NotSigning until a key
/// signs).
#[test]
fn status_conditions_say_what_the_rotation_waits_for() {
    use super::super::dkim_key::{OVERLAP, ROTATION, status};
    use DkimKeyPhase::*;
    use crds::conditions::{DNS_READY, READY};
    let k = key("100s", "50s");
    let after = |s: &Step| [0, 1].map(|i| slot(["a", "b"][i], s.plans[i].state.clone()));
    let find = |st: &crds::DkimKeyStatus, type_: &str| {
        let c = st
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .unwrap_or_else(|| panic!("{type_} in {:?}", st.conditions));
        (c.status, c.reason.clone(), c.message.clone())
    };
    let now = "2026-01-01T00:00:00Z";
    // One scenario: the step from these slots, DNS answers and pods at `at`, and the
    // status it leaves.
    let scenario = |slots: [Slot; 2], dns: &[DnsCheck; 2], pods: &PodReport, at: i64| {
        let s = run(slots, dns.clone(), pods, at, None);
        let got = status(&k, &after(&s), dns, &s, &[], now);
        (s, got)
    };

    // The next key waits for a nameserver: DnsReady False naming it, Rotation Waiting,
    // Ready (the active key signs), selectors newest first.
    let dns = [
        visible(),
        DnsCheck::NotVisible {
            lagging: vec!["ns2.example.com.".into()],
        },
    ];
    let (_, got) = scenario(
        [slot("a", st(Active, 45)), slot("b", st(Generated, 145))],
        &dns,
        &pods(&["a"], &["a"]),
        150,
    );
    assert_eq!(got.phase, Generated);
    assert_eq!(got.active_selector.as_deref(), Some("a"));
    let listed: Vec<(&str, DkimKeyPhase)> = got
        .selectors
        .iter()
        .map(|s| (s.selector.as_str(), s.phase))
        .collect();
    assert_eq!(listed, vec![("b", Generated), ("a", Active)]);
    assert_eq!(
        got.selectors[0].dns.as_deref(),
        Some("not answered by ns2.example.com.")
    );
    let (state, reason, message) = find(&got, DNS_READY);
    assert_eq!(
        (state, reason.as_str()),
        (ConditionStatus::False, "RecordNotVisible")
    );
    assert!(message.contains("b._domainkey.example.com.") && message.contains("ns2"));
    let (state, reason, message) = find(&got, ROTATION);
    assert_eq!(
        (state, reason.as_str()),
        (ConditionStatus::False, "Waiting")
    );
    assert!(message.contains("publish TXT b._domainkey"), "{message}");
    assert_eq!(find(&got, READY).0, ConditionStatus::True);

    // A DNS outage: DnsReady Unknown, Rotation Unknown/DnsUnavailable saying the active
    // key keeps signing; still Ready.
    let failed = DnsCheck::LookupFailed("timeout".into());
    let dns = [failed.clone(), failed];
    let (_, got) = scenario(
        [slot("a", st(Active, 45)), slot("b", st(Generated, 145))],
        &dns,
        &pods(&["a"], &["a"]),
        150,
    );
    let (state, reason, message) = find(&got, ROTATION);
    assert_eq!(
        (state, reason.as_str()),
        (ConditionStatus::Unknown, "DnsUnavailable")
    );
    assert_eq!(
        message,
        "rotation paused, the active key keeps signing: TXT b._domainkey: timeout"
    );
    let (state, reason, message) = find(&got, DNS_READY);
    assert_eq!(
        (state, reason.as_str()),
        (ConditionStatus::Unknown, "LookupFailed")
    );
    assert!(
        message.contains("phases are kept until DNS answers"),
        "{message}"
    );
    assert_eq!(find(&got, READY).0, ConditionStatus::True);
    assert_eq!(got.phase, Generated, "the outage demotes nothing");

    // Nothing signs yet: Ready False, NotSigning, saying what it waits for.
    let dns = [
        DnsCheck::NotVisible {
            lagging: vec!["ns1.example.com.".into()],
        },
        DnsCheck::NotChecked,
    ];
    let (_, got) = scenario(
        [slot("a", st(Generated, 0)), slot("b", None)],
        &dns,
        &pods(&[], &[]),
        5,
    );
    let (state, reason, message) = find(&got, READY);
    assert_eq!(
        (state, reason.as_str()),
        (ConditionStatus::False, "NotSigning")
    );
    assert!(
        message.starts_with("no key signs yet: publish TXT a._domainkey"),
        "{message}"
    );
    assert_eq!(got.active_selector, None);

    // Idle: the next rotation's time, in the condition and in nextRotationTime.
    let dns = [visible(), DnsCheck::NotChecked];
    let (s, got) = scenario(
        [slot("a", st(Active, 45)), slot("b", None)],
        &dns,
        &pods(&["a"], &["a"]),
        50,
    );
    let (state, reason, message) = find(&got, ROTATION);
    assert_eq!((state, reason.as_str()), (ConditionStatus::True, "Idle"));
    assert_eq!(message, "next rotation at 1970-01-01T00:02:25Z");
    assert_eq!(
        got.next_rotation_time.as_deref(),
        Some("1970-01-01T00:02:25Z")
    );
    assert_eq!(find(&got, DNS_READY).1, "RecordVisible");

    // An overlap shorter than the queue lifetime (5d) is said, and changes nothing else;
    // the default (7d) and exactly 5d cover it.
    let (state, reason, message) = find(&got, OVERLAP);
    assert_eq!(
        (state, reason.as_str()),
        (ConditionStatus::False, "ShorterThanQueueLifetime")
    );
    assert!(
        message.starts_with("overlap 50s is shorter than the queue lifetime (5d)"),
        "{message}"
    );
    assert_eq!(find(&got, READY).0, ConditionStatus::True);
    for overlap in ["7d", "120h"] {
        let got = status(&key("90d", overlap), &after(&s), &dns, &s, &[], now);
        let (state, reason, message) = find(&got, OVERLAP);
        assert_eq!(
            (state, reason.as_str(), message),
            (
                ConditionStatus::True,
                "CoversQueueLifetime",
                format!("overlap {overlap} covers the queue lifetime (5d)")
            )
        );
    }
}
