//! One reconcile per kind: load the namespace's world -> render -> apply -> prune ->
//! status, and an `error_policy` with exponential backoff.
//!
//! Writes happen only when something differs: objects the cluster already holds as
//! rendered are not re-applied, and status is patched only when it changes, so a second
//! reconcile of an unchanged world sends no write at all. No finalizers: every object is
//! owned (ownerReferences), so Kubernetes' garbage collector cleans up on delete.

use crate::apply::{self, Applied};
use crate::context::Context;
use crate::keys::SystemKeys;
use crate::render::{self, Note, Object, World, secrets};
use crate::{Error, FIELD_MANAGER, Result, dns, status};
use crds::conditions::{Condition, DNS_READY};
use crds::dkim_key::{DkimKeyPhase, DkimKeyStatus, DkimSelector};
use crds::mail_domain::MailDomainStatus;
use crds::relay_policy::RelayPolicyStatus;
use crds::smtp_listener::SmtpListenerStatus;
use crds::{ConditionStatus, DkimKey, MailDomain, RelayPolicy, SmtpListener};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ListParams, Patch, PatchParams};
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

/// Lists the Petrel resources of `namespace` and the Secrets this operator made there.
pub async fn load_world(client: &Client, namespace: &str) -> Result<World> {
    let lp = ListParams::default();
    let mut world = World {
        listeners: Api::<SmtpListener>::namespaced(client.clone(), namespace)
            .list(&lp)
            .await?
            .items,
        domains: Api::<MailDomain>::namespaced(client.clone(), namespace)
            .list(&lp)
            .await?
            .items,
        relay_policies: Api::<RelayPolicy>::namespaced(client.clone(), namespace)
            .list(&lp)
            .await?
            .items,
        dkim_keys: Api::<DkimKey>::namespaced(client.clone(), namespace)
            .list(&lp)
            .await?
            .items,
        secrets: Api::<Secret>::namespaced(client.clone(), namespace)
            .list(&ListParams::default().labels(&format!(
                "{}={}",
                render::labels::MANAGED_BY,
                render::labels::MANAGER
            )))
            .await?
            .items,
    };
    world.sort();
    Ok(world)
}

fn namespace_of<K: Resource>(obj: &K) -> Result<String> {
    obj.meta()
        .namespace
        .clone()
        .ok_or(Error::MissingField("metadata.namespace"))
}

/// Applies `objects` and prunes what `owner` no longer needs; returns what changed.
async fn converge<K: Resource<DynamicType = ()>>(
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
async fn patch_status<K, S>(
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

async fn publish<K: Resource<DynamicType = ()>>(
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

fn notes_for<'a>(notes: &'a [Note], kind: &str, name: &str) -> Vec<&'a Note> {
    notes
        .iter()
        .filter(|n| n.kind == kind && n.name == name)
        .collect()
}

/// Reconciles one SmtpListener: config, TLS Secret, workload, Services; status.
#[tracing::instrument(name = "reconcile", skip_all, fields(kind = "SmtpListener", namespace = obj.metadata.namespace.as_deref().unwrap_or_default(), name = obj.metadata.name.as_deref().unwrap_or_default()))]
pub async fn listener(obj: Arc<SmtpListener>, ctx: Arc<Context>) -> Result<Action> {
    let _measure = ctx.metrics.measure("SmtpListener");
    let result = listener_inner(&obj, &ctx).await;
    finish(
        &*obj,
        &ctx,
        result,
        |conditions| SmtpListenerStatus {
            conditions,
            observed_generation: obj.metadata.generation,
            ..obj.status.clone().unwrap_or_default()
        },
        obj.status.as_ref().map(|s| &s.conditions[..]),
    )
    .await
}

async fn listener_inner(obj: &SmtpListener, ctx: &Context) -> Result<Action> {
    let ns = namespace_of(obj)?;
    let world = load_world(&ctx.client, &ns).await?;
    let desired = render::render_listener(obj, &world, &mut SystemKeys)?;
    let changed = converge(&ctx.client, obj, &desired.objects).await?;
    if !changed.is_empty() {
        publish(ctx, obj, EventType::Normal, "Applied", changed.join(", ")).await;
    }
    let sts = Api::<StatefulSet>::namespaced(ctx.client.clone(), &ns)
        .get_opt(&obj.name_any())
        .await?;
    let want = obj
        .spec
        .autoscaling
        .as_ref()
        .map_or(obj.spec.replicas, |a| a.min_replicas);
    let desired_replicas = sts.as_ref().and_then(|s| s.spec.replicas).or(Some(want));
    let ready = sts
        .as_ref()
        .and_then(|s| s.status.as_ref())
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0);
    let pending = (ready < desired_replicas.unwrap_or(want)).then(|| {
        (
            "RollingOut",
            format!(
                "{ready} of {} MTA pods ready",
                desired_replicas.unwrap_or(want)
            ),
        )
    });
    let name = obj.name_any();
    let notes = notes_for(&desired.notes, "SmtpListener", &name);
    let previous = obj.status.clone().unwrap_or_default();
    let checksum = desired
        .configs
        .get(&name)
        .map(|c| render::sha256_hex(c.to_yaml().as_bytes()));
    let status = SmtpListenerStatus {
        conditions: status::reconciled(
            &previous.conditions,
            obj.metadata.generation,
            &notes,
            pending,
            Vec::new(),
            &status::now(),
        ),
        observed_generation: obj.metadata.generation,
        desired_replicas,
        ready_replicas: Some(ready),
        config_checksum: checksum,
        ..previous.clone()
    };
    patch_status(&ctx.client, obj, obj.status.as_ref(), &status).await?;
    Ok(Action::requeue(RESYNC))
}

/// Shared ending: on success forget failures; on error write a Degraded status (best
/// effort), publish a Warning and hand the error to `error_policy`.
async fn finish<K, S>(
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

/// Reconciles one DkimKey: its key Secret and status (phase, public record).
#[tracing::instrument(name = "reconcile", skip_all, fields(kind = "DkimKey", namespace = obj.metadata.namespace.as_deref().unwrap_or_default(), name = obj.metadata.name.as_deref().unwrap_or_default()))]
pub async fn dkim_key(obj: Arc<DkimKey>, ctx: Arc<Context>) -> Result<Action> {
    let _measure = ctx.metrics.measure("DkimKey");
    let result = dkim_key_inner(&obj, &ctx).await;
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

async fn dkim_key_inner(obj: &DkimKey, ctx: &Context) -> Result<Action> {
    let ns = namespace_of(obj)?;
    let world = load_world(&ctx.client, &ns).await?;
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
            "KeyPublished",
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
            .map(|v| String::from_utf8_lossy(&v.0).into_owned()),
        _ => None,
    });
    let record_name = format!("{selector}._domainkey.{}.", obj.spec.domain);
    let mut extra = Vec::new();
    let (phase, selectors) = match &record {
        Some(value) => {
            let live = if ctx.check_dns {
                let records = [dns::DnsRecord {
                    name: record_name.clone(),
                    type_: "TXT",
                    value: value.clone(),
                    purpose: String::new(),
                }];
                match dns::resolver(ctx.dns_server) {
                    Ok(r) => dns::check(&r, &records).await.first().copied().flatten(),
                    Err(_) => None,
                }
            } else {
                None
            };
            let phase = if live == Some(true) {
                DkimKeyPhase::Active
            } else {
                DkimKeyPhase::Published
            };
            extra.push(Condition::new(
                DNS_READY,
                if live == Some(true) {
                    ConditionStatus::True
                } else {
                    ConditionStatus::False
                },
                if live == Some(true) {
                    "RecordVisible"
                } else {
                    "RecordNotVisible"
                },
                format!("TXT {record_name}"),
                obj.metadata.generation,
                &status::now(),
            ));
            let entry = DkimSelector {
                selector: selector.clone(),
                phase,
                record_name: record_name.clone(),
                record_value: value.clone(),
                secret_name: secrets::dkim_secret_name(obj, &selector),
            };
            (phase, vec![entry])
        }
        None => (DkimKeyPhase::Pending, Vec::new()),
    };
    let notes = notes_for(&desired.notes, "DkimKey", &obj.name_any());
    let previous = obj.status.clone().unwrap_or_default();
    let pending = (phase == DkimKeyPhase::Published).then(|| {
        (
            "AwaitingDns",
            format!("publish TXT {record_name} (see status.selectors); nothing is signed with this key until it is visible"),
        )
    });
    let status = DkimKeyStatus {
        conditions: status::reconciled(
            &previous.conditions,
            obj.metadata.generation,
            &notes,
            pending,
            extra,
            &status::now(),
        ),
        observed_generation: obj.metadata.generation,
        phase,
        active_selector: (phase == DkimKeyPhase::Active).then_some(selector),
        selectors,
        next_rotation_time: None,
    };
    patch_status(&ctx.client, obj, obj.status.as_ref(), &status).await?;
    Ok(Action::requeue(RESYNC))
}

/// Reconciles one MailDomain: DNS guidance and its live check, and status.
#[tracing::instrument(name = "reconcile", skip_all, fields(kind = "MailDomain", namespace = obj.metadata.namespace.as_deref().unwrap_or_default(), name = obj.metadata.name.as_deref().unwrap_or_default()))]
pub async fn mail_domain(obj: Arc<MailDomain>, ctx: Arc<Context>) -> Result<Action> {
    let _measure = ctx.metrics.measure("MailDomain");
    let result = mail_domain_inner(&obj, &ctx).await;
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

async fn mail_domain_inner(obj: &MailDomain, ctx: &Context) -> Result<Action> {
    let ns = namespace_of(obj)?;
    let world = load_world(&ctx.client, &ns).await?;
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
    let checked: Vec<bool> = matches.iter().flatten().copied().collect();
    let all_match = !checked.is_empty() && checked.iter().all(|m| *m);
    let missing = checked.iter().filter(|m| !**m).count();
    let dns_condition = Condition::new(
        DNS_READY,
        if all_match {
            ConditionStatus::True
        } else {
            ConditionStatus::False
        },
        if all_match {
            "RecordsMatch"
        } else if checked.is_empty() {
            "NotChecked"
        } else {
            "RecordsMissing"
        },
        if all_match {
            String::new()
        } else {
            format!(
                "{missing} of {} checked records do not match live DNS; see status.dns",
                checked.len()
            )
        },
        obj.metadata.generation,
        &status::now(),
    );
    let mut notes = Vec::new();
    let _ = render::mta_config::local_domain(obj, &mut notes);
    let _ = render::mta_config::signing_key(obj, &world, &mut notes);
    let notes: Vec<&Note> = notes.iter().collect();
    let previous = obj.status.clone().unwrap_or_default();
    let status = MailDomainStatus {
        conditions: status::reconciled(
            &previous.conditions,
            obj.metadata.generation,
            &notes,
            None,
            vec![dns_condition],
            &status::now(),
        ),
        observed_generation: obj.metadata.generation,
        dns: dns::to_status(&guidance.records, &matches),
        mta_sts_policy: guidance.mta_sts_policy.clone(),
    };
    patch_status(&ctx.client, obj, obj.status.as_ref(), &status).await?;
    Ok(Action::requeue(RESYNC))
}

/// Reconciles one RelayPolicy: status only (nothing of it reaches the MTA yet).
#[tracing::instrument(name = "reconcile", skip_all, fields(kind = "RelayPolicy", namespace = obj.metadata.namespace.as_deref().unwrap_or_default(), name = obj.metadata.name.as_deref().unwrap_or_default()))]
pub async fn relay_policy(obj: Arc<RelayPolicy>, ctx: Arc<Context>) -> Result<Action> {
    let _measure = ctx.metrics.measure("RelayPolicy");
    let world = World {
        relay_policies: vec![(*obj).clone()],
        ..World::default()
    };
    let notes = render::mta_config::relay_policy_notes(&world);
    let notes: Vec<&Note> = notes.iter().collect();
    let previous = obj.status.clone().unwrap_or_default();
    let status = RelayPolicyStatus {
        conditions: status::reconciled(
            &previous.conditions,
            obj.metadata.generation,
            &notes,
            None,
            Vec::new(),
            &status::now(),
        ),
        observed_generation: obj.metadata.generation,
    };
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
mod tests;
