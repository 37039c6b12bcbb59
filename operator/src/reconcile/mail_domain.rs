//! MailDomain reconciler: computes the DNS records the domain needs, asks live DNS which
//! of them are served, and writes both into the status (with the notes on fields that do
//! not take effect, such as a DkimKey that is not Active yet). Writes no other object: the
//! domain reaches the MTAs through the SmtpListener reconciler's config.

use super::{RESYNC, finish, load_world, namespace_of, patch_status};
use crate::context::Context;
use crate::dns::{self, Guidance};
use crate::render::{self, Note};
use crate::{Result, status};
use crds::conditions::{Condition, DNS_READY};
use crds::mail_domain::MailDomainStatus;
use crds::{ConditionStatus, MailDomain};
use kube::runtime::controller::Action;
use std::sync::Arc;

/// The `DnsReady` condition for the answers `matches` (one per record; `None` = not
/// checked or the lookup failed).
pub fn dns_condition(matches: &[Option<bool>], generation: Option<i64>, now: &str) -> Condition {
    let checked: Vec<bool> = matches.iter().flatten().copied().collect();
    let all_match = !checked.is_empty() && checked.iter().all(|m| *m);
    let missing = checked.iter().filter(|m| !**m).count();
    let (state, reason, message) = if all_match {
        (ConditionStatus::True, "RecordsMatch", String::new())
    } else if checked.is_empty() {
        (ConditionStatus::Unknown, "NotChecked", String::new())
    } else {
        (
            ConditionStatus::False,
            "RecordsMissing",
            format!(
                "{missing} of {} checked records do not match live DNS; see status.dns",
                checked.len()
            ),
        )
    };
    Condition::new(DNS_READY, state, reason, message, generation, now)
}

/// The status of `obj` after a reconcile. Pure.
pub fn status(
    obj: &MailDomain,
    guidance: &Guidance,
    matches: &[Option<bool>],
    notes: &[&Note],
    now: &str,
) -> MailDomainStatus {
    let previous = obj.status.clone().unwrap_or_default();
    let generation = obj.metadata.generation;
    MailDomainStatus {
        conditions: status::reconciled(
            &previous.conditions,
            generation,
            notes,
            None,
            vec![dns_condition(matches, generation, now)],
            now,
        ),
        observed_generation: generation,
        dns: dns::to_status(&guidance.records, matches),
        mta_sts_policy: guidance.mta_sts_policy.clone(),
    }
}

/// Reconciles one MailDomain.
#[tracing::instrument(name = "reconcile", skip_all, fields(kind = "MailDomain", namespace = obj.metadata.namespace.as_deref().unwrap_or_default(), name = obj.metadata.name.as_deref().unwrap_or_default()))]
pub async fn reconcile(obj: Arc<MailDomain>, ctx: Arc<Context>) -> Result<Action> {
    let _measure = ctx.metrics.measure("MailDomain");
    let result = apply_domain(&obj, &ctx).await;
    finish(
        &*obj,
        &ctx,
        result,
        |conditions| MailDomainStatus {
            conditions,
            observed_generation: obj.metadata.generation,
            ..obj.status.clone().unwrap_or_default()
        },
        obj.status.as_ref().map(|s| &s.conditions[..]),
    )
    .await
}

async fn apply_domain(obj: &MailDomain, ctx: &Context) -> Result<Action> {
    let ns = namespace_of(obj)?;
    let world = load_world(ctx, &ns);
    let guidance = dns::guidance(obj, &world, &[]);
    let matches = if ctx.check_dns {
        match dns::resolver(ctx.dns_server) {
            Ok(r) => dns::check(&r, &guidance.records).await,
            Err(e) => {
                tracing::warn!(error = %e, "no DNS resolver; records not checked");
                vec![None; guidance.records.len()]
            }
        }
    } else {
        vec![None; guidance.records.len()]
    };
    let mut notes = Vec::new();
    let _ = render::mta_config::local_domain(obj, &mut notes);
    let _ = render::mta_config::signing_keys_of(obj, &world, &mut notes);
    let notes: Vec<&Note> = notes.iter().collect();
    let status = status(obj, &guidance, &matches, &notes, &status::now());
    patch_status(&ctx.client, obj, obj.status.as_ref(), &status).await?;
    Ok(Action::requeue(RESYNC))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_condition_table() {
        let now = "2026-11-30T00:00:00Z";
        let cases: [(&[Option<bool>], ConditionStatus, &str); 5] = [
            (&[], ConditionStatus::Unknown, "NotChecked"),
            (&[None, None], ConditionStatus::Unknown, "NotChecked"),
            (
                &[Some(true), Some(true)],
                ConditionStatus::True,
                "RecordsMatch",
            ),
            (&[Some(true), None], ConditionStatus::True, "RecordsMatch"),
            (
                &[Some(true), Some(false)],
                ConditionStatus::False,
                "RecordsMissing",
            ),
        ];
        for (matches, state, reason) in cases {
            let c = dns_condition(matches, Some(1), now);
            assert_eq!(
                (c.status, c.reason.as_str()),
                (state, reason),
                "{matches:?}"
            );
        }
        let c = dns_condition(&[Some(false), Some(true), None], Some(1), now);
        assert!(
            c.message.starts_with("1 of 2 checked records"),
            "{}",
            c.message
        );
    }
}
