//! One reconciler per kind, in flow order: [`smtp_listener`] (config, Secrets, workload),
//! [`dkim_key`] (key Secret, DNS check, phase), [`mail_domain`] (DNS guidance) and
//! [`relay_policy`] (status). Each loads its namespace's world from the reflector stores,
//! renders, applies, prunes, and writes a status built by a pure function of what it found.
//! This module holds what they share: apply-and-prune, status patching, Events, and the
//! `error_policy` with exponential backoff.
//!
//! Writes happen only when something differs: objects the cluster already holds as
//! rendered are not re-applied, and status is patched only when it changes, so a second
//! reconcile of an unchanged world sends no write at all. No finalizers: every object is
//! owned (ownerReferences), so Kubernetes' garbage collector cleans up on delete.

pub mod dkim_key;
pub mod dkim_rotation;
pub mod mail_domain;
pub mod relay_policy;
pub mod scale_in;
pub mod smtp_listener;

use crate::apply::{self, Applied};
use crate::context::Context;
use crate::render::{Note, Object, World};
use crate::{Error, FIELD_MANAGER, Result, status};
use crds::conditions::Condition;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

/// How often a healthy resource is looked at again (DNS and pod readiness change without
/// any watch event).
pub const RESYNC: Duration = Duration::from_secs(300);

/// The world of `namespace` as the reflector stores hold it, with the operator-wide
/// defaults and the current time.
pub fn load_world(ctx: &Context, namespace: &str) -> World {
    World {
        mta_image: ctx.mta_image.clone(),
        now: Some(k8s_openapi::jiff::Timestamp::now().as_second()),
        ..ctx.stores.world(namespace)
    }
}

pub(crate) fn namespace_of<K: Resource>(obj: &K) -> Result<String> {
    obj.meta()
        .namespace
        .clone()
        .ok_or(Error::MissingField("metadata.namespace"))
}

/// Applies `objects` and prunes what `owner` no longer needs; returns what changed.
pub(crate) async fn converge<K: Resource<DynamicType = ()>>(
    client: &Client,
    owner: &K,
    objects: &[Object],
) -> Result<Vec<String>> {
    let mut changed = Vec::new();
    for object in objects {
        if apply::apply(client, object).await? == Applied::Patched {
            changed.push(format!("{}/{}", object.kind(), object.name()));
        }
    }
    let ns = namespace_of(owner)?;
    let pruned = apply::prune(client, &ns, &K::kind(&()), &owner.name_any(), objects).await?;
    changed.extend(pruned.into_iter().map(|p| format!("{p} (pruned)")));
    Ok(changed)
}

/// Patches `.status` with server-side apply when it differs from `current`.
pub(crate) async fn patch_status<K, S>(
    client: &Client,
    obj: &K,
    current: Option<&S>,
    status: &S,
) -> Result<bool>
where
    K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned,
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    S: Serialize + PartialEq,
{
    if current == Some(status) {
        return Ok(false);
    }
    let api: Api<K> = Api::namespaced(client.clone(), &namespace_of(obj)?);
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    api.patch_status(
        &obj.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(true)
}

pub(crate) async fn publish<K: Resource<DynamicType = ()>>(
    ctx: &Context,
    obj: &K,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.to_owned(),
        note: Some(note.chars().take(1000).collect()),
        action: "Reconcile".to_owned(),
        secondary: None,
    };
    // Events are best effort: failing to record one must not fail the reconcile.
    if let Err(e) = ctx.recorder.publish(&event, &obj.object_ref(&())).await {
        tracing::warn!(error = %e, "cannot publish event");
    }
}

pub(crate) fn notes_for<'a>(notes: &'a [Note], kind: &str, name: &str) -> Vec<&'a Note> {
    notes
        .iter()
        .filter(|n| n.kind == kind && n.name == name)
        .collect()
}

/// Shared ending: on success forget failures; on error write a Degraded status (best
/// effort), publish a Warning and hand the error to `error_policy`.
pub(crate) async fn finish<K, S>(
    obj: &K,
    ctx: &Context,
    result: Result<Action>,
    failed_status: impl FnOnce(Vec<Condition>) -> S,
    previous: Option<&[Condition]>,
) -> Result<Action>
where
    K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned,
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    S: Serialize + PartialEq,
{
    let key = failure_key(obj);
    if let Err(error) = &result {
        ctx.metrics.failed(&K::kind(&()), error.metric_label());
    }
    match result {
        Ok(action) => {
            ctx.succeeded(&key);
            Ok(action)
        }
        Err(error) => {
            let conditions = status::failed(
                previous.unwrap_or_default(),
                obj.meta().generation,
                &error,
                &status::now(),
            );
            let status = failed_status(conditions);
            if let Err(e) = patch_status(&ctx.client, obj, None, &status).await {
                tracing::warn!(error = %e, "cannot record Degraded status");
            }
            publish(
                ctx,
                obj,
                EventType::Warning,
                error.metric_label(),
                error.to_string(),
            )
            .await;
            Err(error)
        }
    }
}

fn failure_key<K: Resource<DynamicType = ()>>(obj: &K) -> String {
    format!(
        "{}/{}/{}",
        K::kind(&()),
        obj.meta().namespace.as_deref().unwrap_or_default(),
        obj.name_any()
    )
}

/// Backoff after consecutive failures: 5 s doubling to at most 5 minutes.
pub fn backoff(failures: u32) -> Duration {
    let secs = 5u64.saturating_mul(1u64 << failures.saturating_sub(1).min(6));
    Duration::from_secs(secs.min(300))
}

/// The `error_policy` of every controller: log, count, requeue with backoff.
pub fn error_policy<K: Resource<DynamicType = ()>>(
    obj: Arc<K>,
    error: &Error,
    ctx: Arc<Context>,
) -> Action {
    let failures = ctx.failed(&failure_key(&*obj));
    let delay = backoff(failures);
    tracing::warn!(
        object = %failure_key(&*obj),
        reason = error.metric_label(),
        %error,
        failures,
        retry_in = ?delay,
        "reconcile failed"
    );
    Action::requeue(delay)
}

#[cfg(test)]
mod tests;
