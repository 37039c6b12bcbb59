//! SmtpListener reconciler: checks that every Secret the listener's pods would mount
//! exists, renders the listener's config, TLS and DKIM Secrets, StatefulSet, Services,
//! PDB and HPA, applies and prunes them, and writes the status.
//!
//! A Secret that a user must provide and that is missing stops the apply: the pods that
//! already run keep running as they are (a new pod template naming a missing Secret would
//! take a pod down at the rolling update), and `Ready=False` with reason `SecretNotFound`
//! names the Secret and who refers to it.
//!
//! With `tls.issuerRef`, the cert-manager `Certificate` is applied before that check (its
//! Secret cannot exist before it), and the listener waits for cert-manager as for any
//! missing Secret, with cert-manager's own word on the Certificate in the message. When
//! the API server does not serve Certificates at all, `Ready=False` says
//! `CertManagerMissing` and nothing else is applied.
//!
//! The status carries the served certificate's `certificateNotAfter` and `renewalTime`,
//! read from the rendered self-signed Secret or from the Secret the pods mount.

use super::scale_in::{self, PodDrain};
use super::{converge, finish, load_world, namespace_of, notes_for, patch_status, publish};
use crate::apply::{self, Applied};
use crate::context::Context;
use crate::keys::SystemKeys;
use crate::pods;
use crate::render::{self, Note, World, certificate, mta_config};
use crate::{Error, Result, status};
use crds::conditions::Condition;
use crds::smtp_listener::{PodQueueDepth, SmtpListenerStatus};
use crds::{ConditionStatus, SmtpListener};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Secret};
use kube::api::DynamicObject;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// How soon a listener waiting for a user's Secret is looked at again (a user's Secret is
/// not watched: the operator watches only the Secrets it made).
pub const SECRET_RECHECK: Duration = Duration::from_secs(20);

/// A Secret the listener's pods mount but the operator does not make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretRef {
    /// The Secret's name, in the listener's namespace.
    pub name: String,
    /// Which resource field names it, for people.
    pub referrer: String,
}

/// Every user-provided Secret the pods of `listener` would mount.
pub fn referenced_secrets(listener: &SmtpListener, world: &World) -> Vec<SecretRef> {
    let mut refs = Vec::new();
    if listener.spec.tls.issuer_ref.is_some() {
        refs.push(SecretRef {
            name: certificate::issued_secret_name(listener),
            referrer: format!(
                "SmtpListener {0} tls.issuerRef, to be filled by cert-manager for Certificate {0}",
                listener.name_any()
            ),
        });
    }
    if let Some(name) = &listener.spec.tls.secret_name {
        refs.push(SecretRef {
            name: name.clone(),
            referrer: format!("SmtpListener {} tls.secretName", listener.name_any()),
        });
    }
    if let (Some(policy), Some((name, _))) = (
        mta_config::auth_policy(world),
        mta_config::auth_secret(world),
    ) {
        refs.push(SecretRef {
            name,
            referrer: format!(
                "RelayPolicy {} authentication.secretName",
                policy.name_any()
            ),
        });
    }
    if let (Some(policy), Some(name)) = (
        mta_config::route_policy(world),
        mta_config::smarthost_secret(world),
    ) {
        refs.push(SecretRef {
            name,
            referrer: format!(
                "RelayPolicy {} route.smarthost.credentialsSecret",
                policy.name_any()
            ),
        });
    }
    refs
}

/// What a reconcile found, from which the status follows.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    /// Render notes about this listener (fields that do not take effect).
    pub notes: Vec<Note>,
    /// User Secrets that do not exist; nothing was applied.
    pub missing_secrets: Vec<SecretRef>,
    /// `tls.issuerRef` is set and the API server does not serve cert-manager
    /// Certificates; nothing was applied.
    pub cert_manager_missing: bool,
    /// The StatefulSet's replica count (or what the spec asks for).
    pub desired_replicas: i32,
    /// Pods ready.
    pub ready_replicas: i32,
    /// Pods running the current pod template.
    pub updated_replicas: i32,
    /// Whether the StatefulSet controller has seen the StatefulSet's latest spec.
    pub rollout_observed: bool,
    /// SHA-256 of the rendered MtaConfig, when rendered.
    pub config_checksum: Option<String>,
    /// Expiry of the certificate the pods serve (RFC 3339), when known.
    pub certificate_not_after: Option<String>,
    /// When that certificate is due for renewal (RFC 3339).
    pub renewal_time: Option<String>,
    /// Pods the StatefulSet runs (its status).
    pub replicas: i32,
    /// The pods' label selector, for the scale subresource.
    pub selector: String,
    /// A scale-in in progress: what the leaving pods report.
    pub scaling_in: Option<String>,
    /// Queue volumes left by pods that went without draining, each drained by a Job:
    /// what each one reports (they are kept until drained, never deleted before).
    pub volume_drains: Vec<String>,
    /// Queue depth of each pod that answered, with its drain state while scaling in.
    pub queue_depth: Vec<crds::smtp_listener::PodQueueDepth>,
    /// Pods counting rate limits alone because the shared Redis is unreachable.
    pub rate_limits_local: Vec<String>,
}

/// The status of `obj` after a reconcile that found `observed`. Pure.
pub fn status(obj: &SmtpListener, observed: &Observed, now: &str) -> SmtpListenerStatus {
    let previous = obj.status.clone().unwrap_or_default();
    let namespace = obj.namespace().unwrap_or_default();
    let mut notes: Vec<Note> = observed
        .missing_secrets
        .iter()
        .map(|s| Note {
            kind: "SmtpListener",
            name: obj.name_any(),
            reason: "SecretNotFound",
            message: format!(
                "Secret {} ({}) not found in namespace {namespace}; nothing is applied until it exists",
                s.name, s.referrer
            ),
        })
        .collect();
    if observed.cert_manager_missing {
        notes.insert(
            0,
            Note {
                kind: "SmtpListener",
                name: obj.name_any(),
                reason: "CertManagerMissing",
                message: format!(
                    "{}; nothing is applied until it does",
                    Error::CertManagerMissing
                ),
            },
        );
    }
    notes.extend(observed.notes.iter().cloned());
    let notes: Vec<&Note> = notes.iter().collect();
    let rolled_out = observed.rollout_observed
        && observed.updated_replicas >= observed.desired_replicas
        && observed.ready_replicas >= observed.desired_replicas;
    let pending = (!rolled_out).then(|| {
        (
            "RollingOut",
            format!(
                "{} of {} MTA pods ready, {} on the current pod template",
                observed.ready_replicas, observed.desired_replicas, observed.updated_replicas
            ),
        )
    });
    let (state, reason, message) = match (&observed.scaling_in, &observed.volume_drains[..]) {
        (Some(progress), _) => (ConditionStatus::True, "Draining", progress.clone()),
        (None, []) => (ConditionStatus::False, "Idle", String::new()),
        (None, volumes) => (
            ConditionStatus::True,
            "DrainingVolumes",
            format!(
                "queue volumes left by pods that went without draining are drained by Jobs before they are deleted: {}",
                volumes.join("; ")
            ),
        ),
    };
    let scaling = Condition::new(
        SCALING_IN,
        state,
        reason,
        message,
        obj.metadata.generation,
        now,
    );
    let mut extra = vec![scaling];
    if obj.spec.limits.shared_rate_limits_redis.is_some() {
        extra.push(if observed.rate_limits_local.is_empty() {
            Condition::new(
                SHARED_RATE_LIMITS,
                ConditionStatus::True,
                "Shared",
                "the pods count rate limits in the shared Redis".to_owned(),
                obj.metadata.generation,
                now,
            )
        } else {
            Condition::new(
                SHARED_RATE_LIMITS,
                ConditionStatus::False,
                "RedisUnreachable",
                format!(
                    "Redis unreachable from {}: each counts its share of every rate (rate / pods) until it answers again",
                    observed.rate_limits_local.join(", ")
                ),
                obj.metadata.generation,
                now,
            )
        });
    }
    SmtpListenerStatus {
        conditions: status::reconciled(
            &previous.conditions,
            obj.metadata.generation,
            &notes,
            pending,
            extra,
            now,
        ),
        observed_generation: obj.metadata.generation,
        desired_replicas: Some(observed.desired_replicas),
        ready_replicas: Some(observed.ready_replicas),
        replicas: Some(observed.replicas),
        selector: (!observed.selector.is_empty()).then(|| observed.selector.clone()),
        queue_depth: observed.queue_depth.clone(),
        config_checksum: observed
            .config_checksum
            .clone()
            .or(previous.config_checksum.clone()),
        certificate_not_after: observed
            .certificate_not_after
            .clone()
            .or(previous.certificate_not_after.clone()),
        renewal_time: observed
            .renewal_time
            .clone()
            .or(previous.renewal_time.clone()),
    }
}

/// Reconciles one SmtpListener.
#[tracing::instrument(name = "reconcile", skip_all, fields(kind = "SmtpListener", namespace = obj.metadata.namespace.as_deref().unwrap_or_default(), name = obj.metadata.name.as_deref().unwrap_or_default()))]
pub async fn reconcile(obj: Arc<SmtpListener>, ctx: Arc<Context>) -> Result<Action> {
    let _measure = ctx.metrics.measure("SmtpListener");
    let result = apply_listener(&obj, &ctx).await;
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

fn rfc3339(secs: i64) -> Option<String> {
    k8s_openapi::jiff::Timestamp::from_second(secs)
        .ok()
        .map(|t| t.to_string())
}

/// `(certificateNotAfter, renewalTime)` of the PEM certificate `crt` renewed
/// `renew_before` seconds ahead. Pure.
pub fn certificate_times(crt: &[u8], renew_before: i64) -> Option<(String, String)> {
    let facts = render::secrets::certificate_facts(crt)?;
    let renewal = certificate::renewal_time(facts.not_before, facts.not_after, renew_before);
    Some((rfc3339(facts.not_after)?, rfc3339(renewal)?))
}

/// The certificate the pods serve: the rendered self-signed Secret's, else the one in the
/// Secret they mount (`tls.secretName`, or cert-manager's), read from the API server.
async fn served_certificate(
    ctx: &Context,
    obj: &SmtpListener,
    ns: &str,
    objects: &[render::Object],
) -> Result<Option<(String, String)>> {
    let renew_before = certificate::renew_before_secs(obj);
    let self_signed = render::secrets::tls_secret_name(obj);
    let rendered = objects.iter().find_map(|o| match o {
        render::Object::Secret(s) if s.metadata.name.as_deref() == Some(self_signed.as_str()) => {
            s.data.as_ref()?.get("tls.crt").cloned()
        }
        _ => None,
    });
    let crt = match rendered {
        Some(crt) => Some(crt),
        None => {
            let mounted = match &obj.spec.tls.secret_name {
                Some(name) => Some(name.clone()),
                None => obj
                    .spec
                    .tls
                    .issuer_ref
                    .as_ref()
                    .map(|_| certificate::issued_secret_name(obj)),
            };
            match mounted {
                Some(name) => Api::<Secret>::namespaced(ctx.client.clone(), ns)
                    .get_opt(&name)
                    .await?
                    .and_then(|s| s.data?.remove("tls.crt")),
                None => None,
            }
        }
    };
    Ok(crt.and_then(|crt| certificate_times(&crt.0, renew_before)))
}

/// What cert-manager says on the listener's Certificate (its `Ready` condition), for the
/// message of a listener waiting for the issued Secret.
async fn certificate_ready(ctx: &Context, ns: &str, name: &str) -> Option<String> {
    let api: Api<DynamicObject> =
        Api::namespaced_with(ctx.client.clone(), ns, &certificate::api_resource());
    let found = api.get_opt(name).await.ok()??;
    let conditions = found.data.get("status")?.get("conditions")?.as_array()?;
    let ready = conditions.iter().find(|c| c["type"] == "Ready")?;
    Some(format!(
        "Ready={} ({}: {})",
        ready["status"].as_str().unwrap_or("Unknown"),
        ready["reason"].as_str().unwrap_or_default(),
        ready["message"].as_str().unwrap_or_default()
    ))
}

async fn missing_secrets(ctx: &Context, ns: &str, refs: Vec<SecretRef>) -> Result<Vec<SecretRef>> {
    let api = Api::<Secret>::namespaced(ctx.client.clone(), ns);
    let mut missing = Vec::new();
    for r in refs {
        if api.get_metadata_opt(&r.name).await?.is_none() {
            missing.push(r);
        }
    }
    Ok(missing)
}

/// Condition type of a scale-in in progress (and of queue volumes left undrained).
pub const SCALING_IN: &str = "ScalingIn";

/// Condition type saying whether the pods share their rate limits through Redis (only
/// with `limits.sharedRateLimitsRedis`).
pub const SHARED_RATE_LIMITS: &str = "SharedRateLimits";

/// How often a listener is looked at when nothing happens: its pods' queue depths
/// (`status.queueDepth`) change without any event.
const QUEUE_DEPTH_REFRESH: Duration = Duration::from_secs(30);

/// How soon a scale-in in progress is looked at again.
const SCALE_IN_RECHECK: Duration = Duration::from_secs(5);

/// Every pod of `listener` that has an IP, by ordinal.
async fn listener_pods(ctx: &Context, listener: &SmtpListener) -> Result<BTreeMap<i32, Pod>> {
    let name = listener.name_any();
    Ok(pods::list(&ctx.client, listener)
        .await?
        .into_iter()
        .filter_map(|p| Some((scale_in::ordinal(p.metadata.name.as_deref()?, &name)?, p)))
        .collect())
}

fn pod_ip(pod: &Pod) -> Option<std::net::IpAddr> {
    pod.status.as_ref()?.pod_ip.as_deref()?.parse().ok()
}

fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The token the listener's pods share, once its Secret exists.
fn fleet_token(world: &World, listener: &SmtpListener) -> Option<String> {
    let ns = listener.namespace().unwrap_or_default();
    world
        .secret(&ns, &render::secrets::listener_fleet_secret_name(listener))
        .and_then(|s| s.data.as_ref()?.get(render::secrets::FLEET_TOKEN).cloned())
        .map(|t| String::from_utf8_lossy(&t.0).into_owned())
}

/// Pods that stay (ordinal < `desired`) but are not Ready may be draining from a scale-in
/// that was undone, or be drained pods brought back: they take mail again.
async fn cancel_stale_drains(
    world: &World,
    listener: &SmtpListener,
    pods_by_ordinal: &BTreeMap<i32, Pod>,
    desired: i32,
) {
    let Some(token) = fleet_token(world, listener) else {
        return;
    };
    for (ordinal, pod) in pods_by_ordinal.range(..desired) {
        let Some(ip) = pod_ip(pod).filter(|_| !pod_ready(pod)) else {
            continue;
        };
        match pods::cancel_drain(ip, &token).await {
            Ok(true) => tracing::info!(ordinal, "drain cancelled: the pod stays"),
            Ok(false) => {}
            Err(e) => tracing::debug!(ordinal, error = e, "drain state unreadable"),
        }
    }
}

/// Asks each leaving pod (ordinal ≥ `desired`) to drain to the Ready pods that stay.
async fn drain_leaving(
    world: &World,
    listener: &SmtpListener,
    pods_by_ordinal: &BTreeMap<i32, Pod>,
    desired: i32,
    current: i32,
) -> BTreeMap<i32, PodDrain> {
    let token = fleet_token(world, listener);
    let peers = staying_peers(pods_by_ordinal, desired);
    let mut reports = BTreeMap::new();
    for ordinal in desired..current {
        let report = match (pods_by_ordinal.get(&ordinal).and_then(pod_ip), &token) {
            (_, None) => PodDrain::Unreachable("the fleet token Secret is not there yet".into()),
            (None, _) => PodDrain::Unreachable("pod not running".into()),
            (Some(_), _) if peers.is_empty() => {
                PodDrain::Unreachable("no Ready pod to hand its queue to".into())
            }
            (Some(ip), Some(token)) => {
                match pods::drain(ip, token, &peers, scale_in::DELIVER_FOR_SECS).await {
                    Ok(r) => PodDrain::Report(r),
                    Err(e) => PodDrain::Unreachable(e),
                }
            }
        };
        reports.insert(ordinal, report);
    }
    reports
}

/// The hand-over endpoints of the Ready pods that stay (ordinal < `desired`) and are not
/// terminating: a pod being deleted may still show Ready, but it is shutting down; a
/// hand-over to it would be cut off, and what it took would wait on its volume.
fn staying_peers(pods_by_ordinal: &BTreeMap<i32, Pod>, desired: i32) -> Vec<String> {
    pods_by_ordinal
        .iter()
        .filter(|(i, p)| **i < desired && pod_ready(p) && p.metadata.deletion_timestamp.is_none())
        .filter_map(|(_, p)| Some(format!("{}:{}", pod_ip(p)?, render::workload::HTTP_PORT)))
        .collect()
}

/// Asks the Job pod on each left-behind volume of `ordinals` to drain to the pods that
/// stay, marks the volumes of those that report drained, and says how each one is doing.
async fn drain_volumes(
    ctx: &Context,
    world: &World,
    listener: &SmtpListener,
    pods_by_ordinal: &BTreeMap<i32, Pod>,
    desired: i32,
    ordinals: &[i32],
) -> Result<Vec<String>> {
    let ns = listener.namespace().unwrap_or_default();
    let token = fleet_token(world, listener);
    let peers = staying_peers(pods_by_ordinal, desired);
    let pod_api = Api::<Pod>::namespaced(ctx.client.clone(), &ns);
    let job_api = Api::<Job>::namespaced(ctx.client.clone(), &ns);
    let mut progress = Vec::new();
    for &ordinal in ordinals {
        let volume = render::workload::queue_volume_name(listener, ordinal);
        let job = render::workload::volume_drain_job_name(listener, ordinal);
        let failed = job_api.get_opt(&job).await?.is_some_and(|j| {
            j.status
                .and_then(|s| s.conditions)
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Failed" && c.status == "True"))
        });
        let selector = format!("{}={volume}", render::workload::DRAINS_VOLUME_LABEL);
        let running = pod_api
            .list(&ListParams::default().labels(&selector))
            .await?
            .items
            .into_iter()
            .find(|p| p.metadata.deletion_timestamp.is_none() && pod_ip(p).is_some());
        let said = match (failed, running.as_ref().and_then(pod_ip), &token) {
            (true, _, _) => format!(
                "Job {job} failed (its pods' logs say why); the volume is kept: delete the Job to try again"
            ),
            (_, None, _) => format!("Job {job} starting"),
            (_, Some(_), None) => "the fleet token Secret is not there yet".to_owned(),
            (_, Some(_), Some(_)) if peers.is_empty() => {
                "no Ready pod to hand its queue to".to_owned()
            }
            (_, Some(ip), Some(token)) => {
                match pods::drain(ip, token, &peers, scale_in::DELIVER_FOR_SECS).await {
                    Ok(r) if r.done() => {
                        set_drained(ctx, listener, &[ordinal], true).await?;
                        tracing::info!(pvc = volume, job, "left-behind queue volume drained");
                        format!(
                            "drained ({} handed off); the Job goes, then the volume",
                            r.handed_off
                        )
                    }
                    Ok(r) => r.to_string(),
                    Err(e) => format!("not reachable: {e}"),
                }
            }
        };
        progress.push(format!("{volume} by Job {job}: {said}"));
    }
    Ok(progress)
}

/// Marks the queue volumes of `ordinals` drained (before the StatefulSet shrinks), or
/// removes the mark (`drained` false: a pod takes mail on them again).
async fn set_drained(
    ctx: &Context,
    listener: &SmtpListener,
    ordinals: &[i32],
    drained: bool,
) -> Result<()> {
    let ns = listener.namespace().unwrap_or_default();
    let api = Api::<PersistentVolumeClaim>::namespaced(ctx.client.clone(), &ns);
    // A JSON merge patch removes a key set to null.
    let value = drained.then_some("true");
    let patch =
        serde_json::json!({"metadata": {"annotations": {scale_in::DRAINED_ANNOTATION: value}}});
    for ordinal in ordinals {
        let pvc = format!(
            "{}-{}-{ordinal}",
            render::workload::QUEUE_VOLUME,
            listener.name_any()
        );
        match api
            .patch(&pvc, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) if !drained => {
                tracing::info!(pvc, "drained mark removed: a pod takes mail on it again")
            }
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// The listener's queue volumes by ordinal: whether each is marked drained.
async fn queue_volumes(ctx: &Context, listener: &SmtpListener) -> Result<BTreeMap<i32, bool>> {
    let ns = listener.namespace().unwrap_or_default();
    let api = Api::<PersistentVolumeClaim>::namespaced(ctx.client.clone(), &ns);
    let prefix = format!("{}-{}", render::workload::QUEUE_VOLUME, listener.name_any());
    Ok(api
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter_map(|pvc| {
            let ordinal = scale_in::ordinal(pvc.metadata.name.as_deref()?, &prefix)?;
            let drained = pvc
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(scale_in::DRAINED_ANNOTATION))
                .is_some_and(|v| v == "true");
            Some((ordinal, drained))
        })
        .collect())
}

/// Deletes the queue volumes of removed pods that are marked drained (a volume still
/// mounted by a Job's pod goes once that pod is gone).
async fn delete_drained_volumes(
    ctx: &Context,
    listener: &SmtpListener,
    ordinals: &[i32],
) -> Result<()> {
    let ns = listener.namespace().unwrap_or_default();
    let api = Api::<PersistentVolumeClaim>::namespaced(ctx.client.clone(), &ns);
    for &ordinal in ordinals {
        let name = render::workload::queue_volume_name(listener, ordinal);
        match api.delete(&name, &DeleteParams::background()).await {
            Ok(_) => tracing::info!(pvc = name, "drained queue volume deleted"),
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Queue depth of each pod that answers its `/metrics`, with its drain state; and the
/// pods that count rate limits alone (their shared Redis unreachable).
async fn queue_depths(
    pods_by_ordinal: &BTreeMap<i32, Pod>,
    reports: &BTreeMap<i32, PodDrain>,
) -> (Vec<PodQueueDepth>, Vec<String>) {
    let scrapes = futures::future::join_all(pods_by_ordinal.iter().map(|(i, p)| async move {
        let text = match pod_ip(p) {
            Some(ip) => pods::scrape(ip, pods::SCRAPE_TIMEOUT).await.ok(),
            None => None,
        };
        (*i, p.metadata.name.clone().unwrap_or_default(), text)
    }))
    .await;
    let local = scrapes
        .iter()
        .filter(|(_, _, text)| text.as_deref().is_some_and(pods::rate_limits_local))
        .map(|(_, pod, _)| pod.clone())
        .collect();
    let depths = scrapes
        .into_iter()
        .filter_map(|(i, pod, text)| {
            let messages = pods::queue_depth(&text?)?;
            let drain = match reports.get(&i) {
                Some(PodDrain::Report(r)) => Some(r.state.clone()),
                _ => None,
            };
            Some(PodQueueDepth {
                pod,
                messages,
                drain,
            })
        })
        .collect();
    (depths, local)
}

async fn apply_listener(obj: &SmtpListener, ctx: &Context) -> Result<Action> {
    let ns = namespace_of(obj)?;
    let name = obj.name_any();
    let mut world = load_world(ctx, &ns);
    let desired = render::desired_replicas(obj);
    let mut observed = Observed {
        desired_replicas: desired,
        ..Observed::default()
    };
    // Scale-in: the StatefulSet keeps its pods until those leaving have drained.
    let sts_api = Api::<StatefulSet>::namespaced(ctx.client.clone(), &ns);
    let current = sts_api.get_opt(&name).await?.and_then(|s| s.spec.replicas);
    let pods_by_ordinal = listener_pods(ctx, obj).await?;
    let reports = match current {
        Some(current) if current > desired => {
            drain_leaving(&world, obj, &pods_by_ordinal, desired, current).await
        }
        _ => BTreeMap::new(),
    };
    // A volume a staying pod takes mail on is not drained, whatever a scale-in undone
    // since marked on it: unmarked before that pod is put back to work.
    let mut marks = queue_volumes(ctx, obj).await?;
    set_drained(ctx, obj, &scale_in::stale_marks(&mut marks, desired), false).await?;
    cancel_stale_drains(&world, obj, &pods_by_ordinal, desired).await;
    let plan = scale_in::plan(&name, desired, current, &reports);
    set_drained(ctx, obj, &plan.drained, true).await?;
    for ordinal in &plan.drained {
        if let Some(drained) = marks.get_mut(ordinal) {
            *drained = true;
        }
    }
    world
        .statefulset_replicas
        .insert(name.clone(), plan.statefulset_replicas);
    // Volumes no pod of the StatefulSet will mount again: deleted once drained, drained
    // by a Job until then.
    let volumes = scale_in::left_behind(
        &marks,
        plan.statefulset_replicas,
        &pods_by_ordinal.keys().copied().collect::<Vec<_>>(),
    );
    world
        .volume_drains
        .insert(name.clone(), volumes.undrained.clone());
    observed.scaling_in = plan.progress.clone();
    (observed.queue_depth, observed.rate_limits_local) =
        queue_depths(&pods_by_ordinal, &reports).await;
    // The Certificate comes first: cert-manager fills the Secret the pods will mount only
    // once it exists.
    let mut changed = Vec::new();
    if let Some(certificate) = certificate::listener_certificate(obj) {
        let object = render::Object::Certificate(certificate);
        match apply::apply(&ctx.client, &object).await {
            Ok(Applied::Patched) => changed.push(format!("Certificate/{}", object.name())),
            Ok(Applied::Unchanged) => {}
            Err(Error::CertManagerMissing) => observed.cert_manager_missing = true,
            Err(e) => return Err(e),
        }
    }
    let issued = certificate::issued_secret_name(obj);
    let mut refs = referenced_secrets(obj, &world);
    if observed.cert_manager_missing {
        refs.retain(|r| r.name != issued);
    }
    observed.missing_secrets = missing_secrets(ctx, &ns, refs).await?;
    for missing in &mut observed.missing_secrets {
        if missing.name == issued
            && let Some(said) = certificate_ready(ctx, &ns, &name).await
        {
            missing
                .referrer
                .push_str(&format!("; the Certificate is {said}"));
        }
    }
    let requeue = if observed.missing_secrets.is_empty() && !observed.cert_manager_missing {
        let desired = render::render_listener(obj, &world, &mut SystemKeys)?;
        changed.extend(converge(&ctx.client, obj, &desired.objects).await?);
        observed.notes = notes_for(&desired.notes, "SmtpListener", &name)
            .into_iter()
            .cloned()
            .collect();
        observed.config_checksum = desired
            .configs
            .get(&name)
            .map(|c| render::sha256_hex(c.to_yaml().as_bytes()));
        // The pods pick up a new config or DKIM key now, not at the kubelet's next sync:
        // the DKIM rotation waits on them.
        let mounted = render::mounted_files_checksum(obj, &desired.objects);
        let nudged = pods::nudge(&ctx.client, pods_by_ordinal.values(), &mounted).await?;
        if nudged > 0 {
            tracing::debug!(pods = nudged, "pods told to re-sync their mounted files");
        }
        if let Some((not_after, renewal)) =
            served_certificate(ctx, obj, &ns, &desired.objects).await?
        {
            observed.certificate_not_after = Some(not_after);
            observed.renewal_time = Some(renewal);
        }
        QUEUE_DEPTH_REFRESH
    } else {
        SECRET_RECHECK
    };
    if !changed.is_empty() {
        publish(ctx, obj, EventType::Normal, "Applied", changed.join(", ")).await;
    }
    let sts = sts_api.get_opt(&name).await?;
    let sts_status = sts.as_ref().and_then(|s| s.status.as_ref());
    observed.replicas = sts_status.map_or(0, |s| s.replicas);
    observed.selector = pods::selector(obj);
    delete_drained_volumes(ctx, obj, &volumes.drained).await?;
    observed.volume_drains = drain_volumes(
        ctx,
        &world,
        obj,
        &pods_by_ordinal,
        desired,
        &volumes.undrained,
    )
    .await?;
    let requeue = if plan.progress.is_some() || !observed.volume_drains.is_empty() {
        requeue.min(SCALE_IN_RECHECK)
    } else {
        requeue
    };
    observed.ready_replicas = sts_status.and_then(|s| s.ready_replicas).unwrap_or(0);
    observed.updated_replicas = sts_status.and_then(|s| s.updated_replicas).unwrap_or(0);
    observed.rollout_observed = sts.as_ref().is_some_and(|s| {
        s.status.as_ref().and_then(|st| st.observed_generation) == s.metadata.generation
            && s.status.as_ref().is_some_and(|st| {
                st.update_revision.is_none() || st.update_revision == st.current_revision
            })
    });
    let status = status(obj, &observed, &status::now());
    patch_status(&ctx.client, obj, obj.status.as_ref(), &status).await?;
    Ok(Action::requeue(requeue))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crds::ConditionStatus;

    fn listener() -> SmtpListener {
        let mut l: SmtpListener = serde_json::from_value(serde_json::json!({
            "apiVersion": "mail.petrel.dev/v1alpha1", "kind": "SmtpListener",
            "metadata": {"name": "mx", "namespace": "mail", "generation": 3},
            "spec": {"hostname": "mx.example.com"}
        }))
        .unwrap();
        l.status = None;
        l
    }

    fn rolled_out() -> Observed {
        Observed {
            updated_replicas: 2,
            rollout_observed: true,
            ..Observed::default()
        }
    }

    fn ready(s: &SmtpListenerStatus) -> (ConditionStatus, String, String) {
        let c = s.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
        (c.status, c.reason.clone(), c.message.clone())
    }

    #[test]
    fn status_table() {
        let missing = vec![SecretRef {
            name: "mail-users".into(),
            referrer: "RelayPolicy internal authentication.secretName".into(),
        }];
        let note = Note {
            kind: "SmtpListener",
            name: "mx".into(),
            reason: "NoAuthentication",
            message: "port 587 is not opened".into(),
        };
        // (observed, ready status, reason, message fragment)
        let cases = [
            (
                Observed {
                    desired_replicas: 2,
                    ready_replicas: 2,
                    ..rolled_out()
                },
                ConditionStatus::True,
                "Reconciled",
                "",
            ),
            (
                Observed {
                    desired_replicas: 2,
                    ready_replicas: 1,
                    ..rolled_out()
                },
                ConditionStatus::False,
                "RollingOut",
                "1 of 2 MTA pods ready",
            ),
            (
                Observed {
                    desired_replicas: 2,
                    ready_replicas: 2,
                    missing_secrets: missing.clone(),
                    notes: vec![note.clone()],
                    ..rolled_out()
                },
                ConditionStatus::False,
                "SecretNotFound",
                "Secret mail-users (RelayPolicy internal authentication.secretName) not found in namespace mail",
            ),
            (
                Observed {
                    desired_replicas: 2,
                    ready_replicas: 2,
                    missing_secrets: missing.clone(),
                    cert_manager_missing: true,
                    ..rolled_out()
                },
                ConditionStatus::False,
                "CertManagerMissing",
                "install cert-manager",
            ),
            (
                Observed {
                    desired_replicas: 2,
                    ready_replicas: 2,
                    notes: vec![note],
                    ..rolled_out()
                },
                ConditionStatus::False,
                "NoAuthentication",
                "port 587",
            ),
            (
                Observed {
                    desired_replicas: 2,
                    ready_replicas: 2,
                    updated_replicas: 1,
                    ..rolled_out()
                },
                ConditionStatus::False,
                "RollingOut",
                "1 on the current pod template",
            ),
            (
                Observed {
                    desired_replicas: 2,
                    ready_replicas: 2,
                    rollout_observed: false,
                    ..rolled_out()
                },
                ConditionStatus::False,
                "RollingOut",
                "2 of 2 MTA pods ready",
            ),
        ];
        for (observed, want_status, want_reason, want_message) in cases {
            let s = status(&listener(), &observed, "2026-11-30T00:00:00Z");
            let (st, reason, message) = ready(&s);
            assert_eq!(
                (st, reason.as_str()),
                (want_status, want_reason),
                "{observed:?}"
            );
            assert!(message.contains(want_message), "{message}");
            assert_eq!(s.observed_generation, Some(3));
            assert_eq!(s.desired_replicas, Some(observed.desired_replicas));
        }
    }

    #[test]
    fn scaling_in_and_shared_rate_limits_conditions() {
        let find = |s: &SmtpListenerStatus, t: &str| {
            s.conditions
                .iter()
                .find(|c| c.type_ == t)
                .map(|c| (c.status, c.reason.clone(), c.message.clone()))
        };
        let mut l = listener();
        let now = "2026-11-30T00:00:00Z";
        let idle = status(&l, &Observed::default(), now);
        assert_eq!(
            find(&idle, SCALING_IN).map(|c| (c.0, c.1)),
            Some((ConditionStatus::False, "Idle".into()))
        );
        assert_eq!(
            find(&idle, SHARED_RATE_LIMITS),
            None,
            "no Redis, no condition"
        );

        let draining = Observed {
            scaling_in: Some("3 -> 1 pods once drained: mx-2 draining".into()),
            ..Observed::default()
        };
        let s = status(&l, &draining, now);
        let c = find(&s, SCALING_IN).unwrap();
        assert_eq!((c.0, c.1.as_str()), (ConditionStatus::True, "Draining"));
        assert!(c.2.contains("mx-2 draining"));

        let left = Observed {
            volume_drains: vec!["queue-mx-4 by Job mx-drain-4: handing_off (7 left)".into()],
            ..Observed::default()
        };
        let c = find(&status(&l, &left, now), SCALING_IN).unwrap();
        assert_eq!(
            (c.0, c.1.as_str()),
            (ConditionStatus::True, "DrainingVolumes")
        );
        assert!(c.2.contains("queue-mx-4 by Job mx-drain-4") && c.2.contains("7 left"));

        l.spec.limits.shared_rate_limits_redis = Some("redis://redis:6379/0".into());
        let c = find(&status(&l, &Observed::default(), now), SHARED_RATE_LIMITS).unwrap();
        assert_eq!((c.0, c.1.as_str()), (ConditionStatus::True, "Shared"));
        let alone = Observed {
            rate_limits_local: vec!["mx-1".into()],
            ..Observed::default()
        };
        let c = find(&status(&l, &alone, now), SHARED_RATE_LIMITS).unwrap();
        assert_eq!(
            (c.0, c.1.as_str()),
            (ConditionStatus::False, "RedisUnreachable")
        );
        assert!(c.2.contains("mx-1"));
    }

    #[test]
    fn a_failed_render_keeps_the_last_checksum() {
        let mut l = listener();
        l.status = Some(SmtpListenerStatus {
            config_checksum: Some("abc".into()),
            certificate_not_after: Some("2027-01-01T00:00:00Z".into()),
            renewal_time: Some("2026-12-02T00:00:00Z".into()),
            ..SmtpListenerStatus::default()
        });
        let s = status(&l, &Observed::default(), "2026-11-30T00:00:00Z");
        assert_eq!(s.config_checksum.as_deref(), Some("abc"));
        assert_eq!(
            s.certificate_not_after.as_deref(),
            Some("2027-01-01T00:00:00Z")
        );
        assert_eq!(s.renewal_time.as_deref(), Some("2026-12-02T00:00:00Z"));
    }

    /// `certificateNotAfter` and `renewalTime` of a PEM certificate: notAfter minus
    /// renewBefore, or a third of the lifetime when renewBefore is not shorter.
    #[test]
    fn certificate_times_table() {
        let mut params = rcgen::CertificateParams::new(vec!["mx.example.com".into()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2026, 1, 1);
        params.not_after = rcgen::date_time_ymd(2026, 4, 1);
        let key = rcgen::KeyPair::generate().unwrap();
        let crt = params.self_signed(&key).unwrap().pem();
        let day = 86_400;
        for (renew_before, renewal) in [
            (30 * day, "2026-03-02T00:00:00Z"),
            (day, "2026-03-31T00:00:00Z"),
            (90 * day, "2026-03-02T00:00:00Z"),
            (365 * day, "2026-03-02T00:00:00Z"),
        ] {
            assert_eq!(
                certificate_times(crt.as_bytes(), renew_before),
                Some(("2026-04-01T00:00:00Z".to_owned(), renewal.to_owned())),
                "{renew_before}"
            );
        }
        assert_eq!(certificate_times(b"not a certificate", day), None);
    }

    #[test]
    fn peers_are_the_ready_staying_pods_not_terminating() {
        let pod = |ip: &str, ready: bool, terminating: bool| -> Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": {
                    "name": "mx",
                    "deletionTimestamp": terminating.then_some("2026-01-01T00:00:00Z"),
                },
                "status": {
                    "podIP": ip,
                    "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
                },
            }))
            .expect("a pod")
        };
        let pods = BTreeMap::from([
            (0, pod("10.0.0.1", true, false)),
            (1, pod("10.0.0.2", true, true)),
            (2, pod("10.0.0.3", false, false)),
            (3, pod("10.0.0.4", true, false)),
            (4, pod("10.0.0.5", true, false)),
        ]);
        // 1 terminating, 2 not Ready, 4 leaving.
        assert_eq!(
            staying_peers(&pods, 4),
            vec!["10.0.0.1:8080".to_owned(), "10.0.0.4:8080".to_owned()]
        );
    }
}
