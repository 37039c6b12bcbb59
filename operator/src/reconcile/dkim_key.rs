//! DkimKey reconciler: makes (or reuses) the key Secret, asks live DNS whether the public
//! TXT record is served, and sets the phase: `Pending` (no key) → `Published` (record in
//! status, not yet visible: nothing signs with it) → `Active` (visible: listeners sign).
//!
//! A lookup that fails (timeout, SERVFAIL, no resolver) is not an answer: the key keeps
//! the phase it had, and `DnsReady=Unknown` says why. Only a definite answer (no such
//! record, or a different value) takes an Active key out of signing, so one flaky lookup
//! never changes the config or rolls anything.

use super::{RESYNC, converge, finish, load_world, namespace_of, notes_for, patch_status, publish};
use crate::context::Context;
use crate::keys::SystemKeys;
use crate::render::{Note, Object, secrets};
use crate::{Result, dns, status};
use crds::conditions::{Condition, DNS_READY};
use crds::dkim_key::{DkimKeyPhase, DkimKeyStatus, DkimSelector};
use crds::{ConditionStatus, DkimKey};
use kube::ResourceExt;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use std::sync::Arc;
use std::time::Duration;

/// How soon a key whose record is not visible yet is checked again.
pub const DNS_RECHECK: Duration = Duration::from_secs(15);

/// What live DNS said about the key's TXT record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordCheck {
    /// Served with the expected value.
    Visible,
    /// Definitely not served (no such record, or another value).
    NotVisible,
    /// The lookup failed; DNS said nothing.
    LookupFailed,
    /// Not asked (DNS checks off).
    NotChecked,
}

impl From<Option<bool>> for RecordCheck {
    fn from(answer: Option<bool>) -> Self {
        match answer {
            Some(true) => Self::Visible,
            Some(false) => Self::NotVisible,
            None => Self::LookupFailed,
        }
    }
}

/// The key's current selector and its public record, once key material exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Selector, e.g. `petrel-1`.
    pub selector: String,
    /// Owner name, e.g. `petrel-1._domainkey.example.com.`.
    pub name: String,
    /// TXT value, e.g. `v=DKIM1; k=ed25519; p=…`.
    pub value: String,
}

/// The phase that follows from `check`, given the status the key had.
pub fn phase(
    previous: &DkimKeyStatus,
    record: Option<&Record>,
    check: RecordCheck,
) -> DkimKeyPhase {
    let Some(record) = record else {
        return DkimKeyPhase::Pending;
    };
    match check {
        RecordCheck::Visible => DkimKeyPhase::Active,
        RecordCheck::NotVisible => DkimKeyPhase::Published,
        RecordCheck::LookupFailed | RecordCheck::NotChecked => {
            let was_active = previous.phase == DkimKeyPhase::Active
                && previous.active_selector.as_deref() == Some(record.selector.as_str());
            if was_active {
                DkimKeyPhase::Active
            } else {
                DkimKeyPhase::Published
            }
        }
    }
}

/// The status of `obj` after a reconcile. Pure.
pub fn status(
    obj: &DkimKey,
    record: Option<&Record>,
    check: RecordCheck,
    notes: &[&Note],
    now: &str,
) -> DkimKeyStatus {
    let previous = obj.status.clone().unwrap_or_default();
    let phase = phase(&previous, record, check);
    let generation = obj.metadata.generation;
    let mut extra = Vec::new();
    let mut pending = None;
    if let Some(record) = record {
        let (state, reason, message) = match check {
            RecordCheck::Visible => (
                ConditionStatus::True,
                "RecordVisible",
                format!("TXT {}", record.name),
            ),
            RecordCheck::NotVisible => (
                ConditionStatus::False,
                "RecordNotVisible",
                format!("TXT {}", record.name),
            ),
            RecordCheck::LookupFailed => (
                ConditionStatus::Unknown,
                "LookupFailed",
                format!(
                    "the DNS lookup of TXT {} failed; phase {phase:?} is kept until DNS answers",
                    record.name
                ),
            ),
            RecordCheck::NotChecked => (
                ConditionStatus::Unknown,
                "NotChecked",
                format!("TXT {} is not checked (DNS checks are off)", record.name),
            ),
        };
        extra.push(Condition::new(
            DNS_READY, state, reason, message, generation, now,
        ));
        if phase == DkimKeyPhase::Published {
            pending = Some((
                "AwaitingDns",
                format!(
                    "publish TXT {} (see status.selectors); nothing is signed with this key until it is visible",
                    record.name
                ),
            ));
        }
    }
    let selectors = record
        .map(|r| {
            vec![DkimSelector {
                selector: r.selector.clone(),
                phase,
                record_name: r.name.clone(),
                record_value: r.value.clone(),
                secret_name: secrets::dkim_secret_name(obj, &r.selector),
            }]
        })
        .unwrap_or_default();
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
        active_selector: record
            .filter(|_| phase == DkimKeyPhase::Active)
            .map(|r| r.selector.clone()),
        selectors,
        next_rotation_time: None,
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

async fn check_record(ctx: &Context, record: &Record) -> RecordCheck {
    if !ctx.check_dns {
        return RecordCheck::NotChecked;
    }
    let records = [dns::DnsRecord {
        name: record.name.clone(),
        type_: "TXT",
        value: record.value.clone(),
        purpose: String::new(),
    }];
    match dns::resolver(ctx.dns_server) {
        Ok(r) => dns::check(&r, &records)
            .await
            .first()
            .copied()
            .flatten()
            .into(),
        Err(e) => {
            tracing::warn!(error = %e, "no DNS resolver; DKIM record not checked");
            RecordCheck::LookupFailed
        }
    }
}

async fn apply_key(obj: &DkimKey, ctx: &Context) -> Result<Action> {
    let ns = namespace_of(obj)?;
    let world = load_world(ctx, &ns);
    // Generating a key (RSA-2048 takes a good fraction of a second) stays off the async
    // workers, which serve every other reconcile meanwhile.
    let key = obj.clone();
    let rendered =
        tokio::task::spawn_blocking(move || secrets::dkim_key(&key, &world, &mut SystemKeys)).await;
    let desired = match rendered {
        Ok(desired) => desired?,
        Err(join) => std::panic::resume_unwind(join.into_panic()),
    };
    let changed = converge(&ctx.client, obj, &desired.objects).await?;
    if !changed.is_empty() {
        publish(
            ctx,
            obj,
            EventType::Normal,
            "KeyGenerated",
            changed.join(", "),
        )
        .await;
    }
    let selector = secrets::first_selector(obj);
    let record = desired.objects.iter().find_map(|o| match o {
        Object::Secret(s) => s
            .data
            .as_ref()
            .and_then(|d| d.get(secrets::DKIM_RECORD))
            .map(|v| Record {
                name: format!("{selector}._domainkey.{}.", obj.spec.domain),
                selector: selector.clone(),
                value: String::from_utf8_lossy(&v.0).into_owned(),
            }),
        _ => None,
    });
    let check = match &record {
        Some(r) => check_record(ctx, r).await,
        None => RecordCheck::NotChecked,
    };
    let notes = notes_for(&desired.notes, "DkimKey", &obj.name_any());
    let status = status(obj, record.as_ref(), check, &notes, &status::now());
    let before = obj.status.as_ref().map(|s| s.phase);
    if before != Some(status.phase) {
        publish(
            ctx,
            obj,
            EventType::Normal,
            &format!("{:?}", status.phase),
            format!("DkimKey is {:?}", status.phase),
        )
        .await;
    }
    let requeue = if status.phase == DkimKeyPhase::Published {
        DNS_RECHECK
    } else {
        RESYNC
    };
    patch_status(&ctx.client, obj, obj.status.as_ref(), &status).await?;
    Ok(Action::requeue(requeue))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        Record {
            selector: "petrel-1".into(),
            name: "petrel-1._domainkey.example.com.".into(),
            value: "v=DKIM1; k=ed25519; p=abc".into(),
        }
    }

    fn was(phase: DkimKeyPhase, active: Option<&str>) -> DkimKeyStatus {
        DkimKeyStatus {
            phase,
            active_selector: active.map(str::to_owned),
            ..DkimKeyStatus::default()
        }
    }

    #[test]
    fn phase_table() {
        use DkimKeyPhase::*;
        use RecordCheck::*;
        let r = record();
        let cases = [
            // (previous, record present, check, expected)
            (was(Pending, None), false, NotChecked, Pending),
            (was(Pending, None), true, NotVisible, Published),
            (was(Published, None), true, Visible, Active),
            (was(Published, None), true, LookupFailed, Published),
            // A failed lookup never demotes an Active key…
            (was(Active, Some("petrel-1")), true, LookupFailed, Active),
            (was(Active, Some("petrel-1")), true, NotChecked, Active),
            // …but a definite answer that the record is gone does.
            (was(Active, Some("petrel-1")), true, NotVisible, Published),
            // Active under another selector is no reason to sign with this one.
            (was(Active, Some("petrel-0")), true, LookupFailed, Published),
        ];
        for (previous, has_record, check, expected) in cases {
            let got = phase(&previous, has_record.then_some(&r), check);
            assert_eq!(got, expected, "{previous:?} {check:?}");
        }
    }

    #[test]
    fn a_failed_lookup_keeps_signing_and_says_so() {
        let mut key: DkimKey = serde_json::from_value(serde_json::json!({
            "apiVersion": "mail.petrel.dev/v1alpha1", "kind": "DkimKey",
            "metadata": {"name": "k", "namespace": "mail", "generation": 1},
            "spec": {"domain": "example.com", "algorithm": "ed25519"}
        }))
        .unwrap();
        key.status = Some(was(DkimKeyPhase::Active, Some("petrel-1")));
        let s = status(
            &key,
            Some(&record()),
            RecordCheck::LookupFailed,
            &[],
            "2026-11-30T00:00:00Z",
        );
        assert_eq!(s.phase, DkimKeyPhase::Active);
        assert_eq!(s.active_selector.as_deref(), Some("petrel-1"));
        let dns = s.conditions.iter().find(|c| c.type_ == DNS_READY).unwrap();
        assert_eq!(
            (dns.status, dns.reason.as_str()),
            (ConditionStatus::Unknown, "LookupFailed")
        );
        let ready = s.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(ready.status, ConditionStatus::True);
    }
}
