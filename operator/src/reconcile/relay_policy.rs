//! RelayPolicy reconciler: status only. The policy reaches the MTAs through the
//! SmtpListener reconciler's config; here the notes say which of its fields cannot take
//! effect.

use super::{RESYNC, finish, patch_status};
use crate::context::Context;
use crate::render::{self, Note, World};
use crate::{Result, status};
use crds::RelayPolicy;
use crds::relay_policy::RelayPolicyStatus;
use kube::runtime::controller::Action;
use std::sync::Arc;

/// The status of `obj` given the render notes about it. Pure.
pub fn status(obj: &RelayPolicy, notes: &[&Note], now: &str) -> RelayPolicyStatus {
    let previous = obj.status.clone().unwrap_or_default();
    RelayPolicyStatus {
        conditions: status::reconciled(
            &previous.conditions,
            obj.metadata.generation,
            notes,
            None,
            Vec::new(),
            now,
        ),
        observed_generation: obj.metadata.generation,
    }
}

/// Reconciles one RelayPolicy.
#[tracing::instrument(name = "reconcile", skip_all, fields(kind = "RelayPolicy", namespace = obj.metadata.namespace.as_deref().unwrap_or_default(), name = obj.metadata.name.as_deref().unwrap_or_default()))]
pub async fn reconcile(obj: Arc<RelayPolicy>, ctx: Arc<Context>) -> Result<Action> {
    let _measure = ctx.metrics.measure("RelayPolicy");
    let world = World {
        relay_policies: vec![(*obj).clone()],
        ..World::default()
    };
    let notes = render::mta_config::relay_policy_notes(&world);
    let notes: Vec<&Note> = notes.iter().collect();
    let status = status(&obj, &notes, &status::now());
    let result = patch_status(&ctx.client, &*obj, obj.status.as_ref(), &status)
        .await
        .map(|_| Action::requeue(RESYNC));
    finish(
        &*obj,
        &ctx,
        result,
        |conditions| RelayPolicyStatus {
            conditions,
            observed_generation: obj.metadata.generation,
        },
        obj.status.as_ref().map(|s| &s.conditions[..]),
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crds::ConditionStatus;

    #[test]
    fn status_table() {
        let policy: RelayPolicy = serde_json::from_value(serde_json::json!({
            "apiVersion": "mail.petrel.dev/v1alpha1", "kind": "RelayPolicy",
            "metadata": {"name": "p", "namespace": "mail", "generation": 4},
            "spec": {"clientNetworks": ["10.0.0.0/8"]}
        }))
        .unwrap();
        let note = Note {
            kind: "RelayPolicy",
            name: "p".into(),
            reason: "NotYetSupported",
            message: "rateLimits.perRecipientDomain does not take effect".into(),
        };
        for (notes, state, reason) in [
            (vec![], ConditionStatus::True, "Reconciled"),
            (vec![&note], ConditionStatus::False, "NotYetSupported"),
        ] {
            let s = status(&policy, &notes, "2026-11-30T00:00:00Z");
            assert_eq!(s.observed_generation, Some(4));
            let ready = s.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
            assert_eq!((ready.status, ready.reason.as_str()), (state, reason));
        }
    }
}
