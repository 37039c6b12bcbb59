//! DkimKey reconciler: gathers what the rotation needs (the two slot Secrets, what every
//! authoritative nameserver answers for each record, which keys the Ready MTA pods report
//! loaded and signing), takes one [`dkim_rotation::step`], writes the slot Secrets (the
//! rotation's state) and then the status that reports it.
//!
//! A lookup that fails (timeout, SERVFAIL, no resolver) is not an answer: the rotation
//! pauses and says so (`Rotation=Unknown`, reason `DnsUnavailable`), and the active key
//! keeps signing. Only a definite answer takes a key out of signing.

use super::dkim_rotation::{self, DnsCheck, Inputs, PodReport, Schedule, Step};
use super::{finish, load_world, namespace_of, patch_status, publish};
use crate::context::Context;
use crate::dns::authoritative;
use crate::keys::SystemKeys;
use crate::render::World;
use crate::render::dkim::{self, Slot, rfc3339};
use crate::{Result, dns, pods, status};
use crds::conditions::{Condition, DNS_READY};
use crds::dkim_key::{DkimKeyPhase, DkimKeyStatus, DkimRotation, DkimSelector, ROTATE_ANNOTATION};
use crds::{ConditionStatus, DkimKey};
use kube::ResourceExt;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use std::sync::Arc;
use std::time::Duration;

/// Condition type reporting the rotation's progress.
pub const ROTATION: &str = "Rotation";

/// Condition type saying whether `overlap` keeps a retired key's record published for as
/// long as the pods may still hold mail it signed.
pub const OVERLAP: &str = "OverlapCoversQueue";

/// How long one authoritative query may take.
const DNS_TIMEOUT: Duration = Duration::from_secs(3);

/// The key's period and overlap, from its spec (the CRD admits only valid durations; an
/// unparsable one falls back to the defaults).
pub fn schedule(key: &DkimKey) -> Schedule {
    let secs = |text: &str, default: u64| {
        i64::try_from(crds::parse_duration_secs(text).unwrap_or(default)).unwrap_or(i64::MAX / 4)
    };
    Schedule {
        period: (key.spec.rotation == DkimRotation::Automatic)
            .then(|| secs(&key.spec.rotation_period, 90 * 86_400).max(1)),
        overlap: secs(&key.spec.overlap, 7 * 86_400),
    }
}

/// Whether `overlap` covers the MTA's queue lifetime (`queue.max_age`, which the operator
/// leaves at its default): a message signed just before its key retires may wait that
/// long in a queue before a receiver verifies it. A shorter overlap is allowed (tests, or
/// a sender that never queues for long) but said plainly; rotation goes on.
fn overlap_condition(key: &DkimKey) -> (ConditionStatus, &'static str, String) {
    let lifetime = mta_config::QueueConfig::default().max_age.as_secs();
    let overlap = crds::parse_duration_secs(&key.spec.overlap).unwrap_or(7 * 86_400);
    let lifetime_text = match lifetime % 86_400 {
        0 => format!("{}d", lifetime / 86_400),
        _ => format!("{lifetime}s"),
    };
    let overlap_text = &key.spec.overlap;
    if overlap >= lifetime {
        (
            ConditionStatus::True,
            "CoversQueueLifetime",
            format!("overlap {overlap_text} covers the queue lifetime ({lifetime_text})"),
        )
    } else {
        (
            ConditionStatus::False,
            "ShorterThanQueueLifetime",
            format!(
                "overlap {overlap_text} is shorter than the queue lifetime ({lifetime_text}): \
                 mail signed just before a key retires may still be queued when its record is \
                 revoked, and then fail DKIM; make overlap at least {lifetime_text} plus the \
                 time receivers take to verify"
            ),
        )
    }
}

fn dns_text(check: &DnsCheck) -> Option<String> {
    match check {
        DnsCheck::Visible { servers, .. } => Some(format!(
            "answered by all {servers} authoritative nameservers"
        )),
        DnsCheck::NotVisible { lagging } => Some(format!("not answered by {}", lagging.join(", "))),
        DnsCheck::LookupFailed(why) => Some(format!("lookup failed: {why}")),
        DnsCheck::NotChecked => None,
    }
}

/// The newest key's phase: one coming in, else the active one, else whatever is left.
fn overall_phase(slots: &[Slot; 2]) -> DkimKeyPhase {
    use DkimKeyPhase::*;
    let phases: Vec<DkimKeyPhase> = slots
        .iter()
        .filter_map(|s| s.state.as_ref().map(|st| st.phase))
        .collect();
    [Generated, Published, Active, Retiring, Revoked]
        .into_iter()
        .find(|p| phases.contains(p))
        .unwrap_or(Pending)
}

/// The status after `step`, given the slots as they now are. Pure.
pub fn status(
    obj: &DkimKey,
    slots: &[Slot; 2],
    dns: &[DnsCheck; 2],
    step: &Step,
    notes: &[&crate::render::Note],
    now: &str,
) -> DkimKeyStatus {
    let previous = obj.status.clone().unwrap_or_default();
    let generation = obj.metadata.generation;
    let phase = overall_phase(slots);
    let active = slots
        .iter()
        .find(|s| s.state.as_ref().map(|st| st.phase) == Some(DkimKeyPhase::Active));
    let mut selectors: Vec<(i64, DkimSelector)> = slots
        .iter()
        .zip(dns)
        .filter_map(|(slot, check)| {
            let state = slot.state.as_ref()?;
            Some((
                state.since,
                DkimSelector {
                    selector: slot.selector.clone(),
                    phase: state.phase,
                    since: Some(rfc3339(state.since)),
                    dns: dns_text(check),
                    record_name: dkim::record_name(obj, &slot.selector),
                    record_value: slot.record.clone().unwrap_or_default(),
                    secret_name: slot.secret_name.clone(),
                },
            ))
        })
        .collect();
    selectors.sort_by_key(|s| std::cmp::Reverse(s.0));

    let mut extra = Vec::new();
    // DnsReady: the record of the key that matters most now (incoming, else active).
    let watched = slots
        .iter()
        .zip(dns)
        .filter(|(s, _)| {
            matches!(
                s.state.as_ref().map(|st| st.phase),
                Some(DkimKeyPhase::Generated | DkimKeyPhase::Published)
            )
        })
        .chain(
            slots
                .iter()
                .zip(dns)
                .filter(|(s, _)| s.state.as_ref().map(|st| st.phase) == Some(DkimKeyPhase::Active)),
        )
        .next();
    if let Some((slot, check)) = watched {
        let name = dkim::record_name(obj, &slot.selector);
        let (state, reason, message) = match check {
            DnsCheck::Visible { servers, .. } => (
                ConditionStatus::True,
                "RecordVisible",
                format!("TXT {name} is answered by all {servers} authoritative nameservers"),
            ),
            DnsCheck::NotVisible { lagging } => (
                ConditionStatus::False,
                "RecordNotVisible",
                format!("TXT {name} is not answered by {}", lagging.join(", ")),
            ),
            DnsCheck::LookupFailed(why) => (
                ConditionStatus::Unknown,
                "LookupFailed",
                format!("TXT {name}: {why}; phases are kept until DNS answers"),
            ),
            DnsCheck::NotChecked => (
                ConditionStatus::Unknown,
                "NotChecked",
                format!("TXT {name} is not checked (DNS checks are off)"),
            ),
        };
        extra.push(Condition::new(
            DNS_READY, state, reason, message, generation, now,
        ));
    }
    let (state, reason, message) = if let Some(why) = &step.paused {
        (
            ConditionStatus::Unknown,
            "DnsUnavailable",
            format!("rotation paused, the active key keeps signing: {why}"),
        )
    } else if !step.waiting.is_empty() {
        (ConditionStatus::False, "Waiting", step.waiting.join("; "))
    } else if matches!(phase, DkimKeyPhase::Generated | DkimKeyPhase::Published) {
        (
            ConditionStatus::True,
            "InProgress",
            format!("the next key is {phase:?}"),
        )
    } else {
        (
            ConditionStatus::True,
            "Idle",
            step.next_rotation.map_or_else(
                || "rotation: Manual; annotate mail.petrel.dev/rotate to rotate".to_owned(),
                |t| format!("next rotation at {}", rfc3339(t)),
            ),
        )
    };
    extra.push(Condition::new(
        ROTATION, state, reason, message, generation, now,
    ));
    let (state, reason, message) = overlap_condition(obj);
    extra.push(Condition::new(
        OVERLAP, state, reason, message, generation, now,
    ));
    let pending = active.is_none().then(|| {
        (
            "NotSigning",
            format!(
                "no key signs yet: {}",
                if step.waiting.is_empty() {
                    "the first key is on its way".to_owned()
                } else {
                    step.waiting.join("; ")
                }
            ),
        )
    });
    DkimKeyStatus {
        conditions: status::reconciled(
            &previous.conditions,
            generation,
            notes,
            pending,
            extra,
            now,
        ),
        observed_generation: generation,
        phase,
        active_selector: active.map(|s| s.selector.clone()),
        selectors: selectors.into_iter().map(|(_, s)| s).collect(),
        next_rotation_time: step.next_rotation.map(rfc3339),
    }
}

/// Reconciles one DkimKey.
#[tracing::instrument(name = "reconcile", skip_all, fields(kind = "DkimKey", namespace = obj.metadata.namespace.as_deref().unwrap_or_default(), name = obj.metadata.name.as_deref().unwrap_or_default()))]
pub async fn reconcile(obj: Arc<DkimKey>, ctx: Arc<Context>) -> Result<Action> {
    let _measure = ctx.metrics.measure("DkimKey");
    let result = apply_key(&obj, &ctx).await;
    finish(
        &*obj,
        &ctx,
        result,
        |conditions| DkimKeyStatus {
            conditions,
            observed_generation: obj.metadata.generation,
            ..obj.status.clone().unwrap_or_default()
        },
        obj.status.as_ref().map(|s| &s.conditions[..]),
    )
    .await
}

/// What every authoritative nameserver answers for the record of `slot`, when the slot
/// holds a key whose record matters for the next step.
async fn check_slot(ctx: &Context, key: &DkimKey, slot: &Slot) -> DnsCheck {
    let wanted = slot.state.as_ref().is_some_and(|s| {
        matches!(
            s.phase,
            DkimKeyPhase::Generated | DkimKeyPhase::Published | DkimKeyPhase::Active
        )
    });
    let (true, Some(record)) = (wanted, &slot.record) else {
        return DnsCheck::NotChecked;
    };
    if !ctx.check_dns {
        return DnsCheck::NotChecked;
    }
    let resolver = match dns::resolver(ctx.dns_server) {
        Ok(r) => r,
        Err(e) => return DnsCheck::LookupFailed(format!("no DNS resolver: {e}")),
    };
    let name = dkim::record_name(key, &slot.selector);
    let check = authoritative::check_txt(
        &resolver,
        &name,
        record,
        ctx.authoritative_port,
        DNS_TIMEOUT,
    )
    .await;
    match check.verdict() {
        authoritative::Verdict::Visible { wait } => DnsCheck::Visible {
            wait: wait.as_secs(),
            servers: check.servers.len(),
        },
        authoritative::Verdict::NotVisible { lagging } => DnsCheck::NotVisible { lagging },
        authoritative::Verdict::LookupFailed(why) => DnsCheck::LookupFailed(why),
    }
}

/// What the Ready pods that load this key report. Pods load it when a MailDomain of the
/// namespace names it; then every listener of the namespace does.
async fn pod_report(ctx: &Context, key: &DkimKey, world: &World) -> PodReport {
    let mut report = PodReport::default();
    let used = world.domains.iter().any(|d| {
        d.spec.dkim_key_ref.as_deref() == Some(key.name_any().as_str())
            && d.spec.domain.eq_ignore_ascii_case(&key.spec.domain)
    });
    if !used {
        return report;
    }
    for listener in &world.listeners {
        let ready = match pods::ready_pods(&ctx.client, listener).await {
            Ok(p) => p,
            Err(e) => {
                report
                    .unreadable
                    .insert(format!("pods of {} ({e})", listener.name_any()));
                continue;
            }
        };
        let scrapes = futures::future::join_all(
            ready
                .iter()
                .map(|pod| pods::scrape(pod.ip, pods::SCRAPE_TIMEOUT)),
        )
        .await;
        for (pod, scraped) in ready.iter().zip(scrapes) {
            report.ready.insert(pod.name.clone());
            let text = match scraped {
                Ok(text) => text,
                Err(e) => {
                    tracing::debug!(pod = pod.name, error = e, "metrics unreadable");
                    report.unreadable.insert(pod.name.clone());
                    continue;
                }
            };
            for loaded in pods::dkim_keys(&text) {
                if !loaded.domain.eq_ignore_ascii_case(&key.spec.domain) {
                    continue;
                }
                report
                    .loaded
                    .entry(loaded.selector.clone())
                    .or_default()
                    .insert(pod.name.clone());
                if loaded.signing {
                    report
                        .signing
                        .entry(loaded.selector)
                        .or_default()
                        .insert(pod.name.clone());
                }
            }
        }
    }
    report
}

async fn apply_key(obj: &DkimKey, ctx: &Context) -> Result<Action> {
    let ns = namespace_of(obj)?;
    let world = load_world(ctx, &ns);
    let now = world
        .now
        .unwrap_or_else(|| k8s_openapi::jiff::Timestamp::now().as_second());
    let slots = dkim::read_slots(obj, &world);
    let (dns_a, dns_b) = futures::join!(
        check_slot(ctx, obj, &slots[0]),
        check_slot(ctx, obj, &slots[1])
    );
    let dns = [dns_a, dns_b];
    let pods = pod_report(ctx, obj, &world).await;
    let request = obj.annotations().get(ROTATE_ANNOTATION).cloned();
    let step = dkim_rotation::step(&Inputs {
        now,
        schedule: schedule(obj),
        slots: &slots,
        dns: &dns,
        pods: &pods,
        rotate_request: request.as_deref(),
    });

    // Generating a key (RSA-2048 takes a good fraction of a second) stays off the async
    // workers, which serve every other reconcile meanwhile.
    let (key, plans, source) = (obj.clone(), step.plans.clone(), world.clone());
    let rendered = tokio::task::spawn_blocking(move || {
        dkim::slot_secrets(&key, &source, &plans, &mut SystemKeys)
    })
    .await;
    let objects = match rendered {
        Ok(objects) => objects?,
        Err(join) => std::panic::resume_unwind(join.into_panic()),
    };
    // The Secrets are the rotation's memory: they are written before anything reports
    // the step.
    super::converge(&ctx.client, obj, &objects).await?;
    for event in &step.events {
        let type_ = if event.warning {
            EventType::Warning
        } else {
            EventType::Normal
        };
        publish(ctx, obj, type_, event.reason, event.message.clone()).await;
    }
    // Status reports the slots as just written (the store catches up a moment later).
    let mut after = world.clone();
    let slot_secrets: Vec<&str> = slots.iter().map(|s| s.secret_name.as_str()).collect();
    after
        .secrets
        .retain(|s| !slot_secrets.contains(&s.metadata.name.as_deref().unwrap_or_default()));
    after.secrets.extend(objects.iter().filter_map(|o| match o {
        crate::render::Object::Secret(s) => Some(s.clone()),
        _ => None,
    }));
    let slots_after = dkim::read_slots(obj, &after);
    let status = status(obj, &slots_after, &dns, &step, &[], &status::now());
    patch_status(&ctx.client, obj, obj.status.as_ref(), &status).await?;
    Ok(Action::requeue(step.recheck))
}
