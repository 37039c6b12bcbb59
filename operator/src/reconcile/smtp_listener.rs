//! SmtpListener reconciler: checks that every Secret the listener's pods would mount
//! exists, renders the listener's config, TLS and DKIM Secrets, StatefulSet, Services,
//! PDB and HPA, applies and prunes them, and writes the status.
//!
//! A Secret that a user must provide and that is missing stops the apply: the pods that
//! already run keep running as they are (a new pod template naming a missing Secret would
//! take a pod down at the rolling update), and `Ready=False` with reason `SecretNotFound`
//! names the Secret and who refers to it.

use super::{RESYNC, converge, finish, load_world, namespace_of, notes_for, patch_status, publish};
use crate::context::Context;
use crate::keys::SystemKeys;
use crate::render::{self, Note, World, mta_config};
use crate::{Result, status};
use crds::SmtpListener;
use crds::smtp_listener::SmtpListenerStatus;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
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
    /// Expiry of the certificate the operator made for the listener (RFC 3339).
    pub certificate_not_after: Option<String>,
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
    SmtpListenerStatus {
        conditions: status::reconciled(
            &previous.conditions,
            obj.metadata.generation,
            &notes,
            pending,
            Vec::new(),
            now,
        ),
        observed_generation: obj.metadata.generation,
        desired_replicas: Some(observed.desired_replicas),
        ready_replicas: Some(observed.ready_replicas),
        config_checksum: observed
            .config_checksum
            .clone()
            .or(previous.config_checksum.clone()),
        certificate_not_after: observed
            .certificate_not_after
            .clone()
            .or(previous.certificate_not_after.clone()),
        ..previous
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

/// Expiry of the self-signed certificate in the rendered TLS Secret, as RFC 3339.
fn certificate_not_after(obj: &SmtpListener, objects: &[render::Object]) -> Option<String> {
    let name = render::secrets::tls_secret_name(obj);
    objects.iter().find_map(|o| match o {
        render::Object::Secret(s) if s.metadata.name.as_deref() == Some(name.as_str()) => {
            let crt = s.data.as_ref()?.get("tls.crt")?;
            let facts = render::secrets::certificate_facts(&crt.0)?;
            k8s_openapi::jiff::Timestamp::from_second(facts.not_after)
                .ok()
                .map(|t| t.to_string())
        }
        _ => None,
    })
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

async fn apply_listener(obj: &SmtpListener, ctx: &Context) -> Result<Action> {
    let ns = namespace_of(obj)?;
    let name = obj.name_any();
    let world = load_world(ctx, &ns);
    let want = obj
        .spec
        .autoscaling
        .as_ref()
        .map_or(obj.spec.replicas, |a| a.min_replicas);
    let mut observed = Observed {
        desired_replicas: want,
        missing_secrets: missing_secrets(ctx, &ns, referenced_secrets(obj, &world)).await?,
        ..Observed::default()
    };
    let requeue = if observed.missing_secrets.is_empty() {
        let desired = render::render_listener(obj, &world, &mut SystemKeys)?;
        let changed = converge(&ctx.client, obj, &desired.objects).await?;
        if !changed.is_empty() {
            publish(ctx, obj, EventType::Normal, "Applied", changed.join(", ")).await;
        }
        observed.notes = notes_for(&desired.notes, "SmtpListener", &name)
            .into_iter()
            .cloned()
            .collect();
        observed.config_checksum = desired
            .configs
            .get(&name)
            .map(|c| render::sha256_hex(c.to_yaml().as_bytes()));
        observed.certificate_not_after = certificate_not_after(obj, &desired.objects);
        RESYNC
    } else {
        SECRET_RECHECK
    };
    let sts = Api::<StatefulSet>::namespaced(ctx.client.clone(), &ns)
        .get_opt(&name)
        .await?;
    if let Some(replicas) = sts.as_ref().and_then(|s| s.spec.replicas) {
        observed.desired_replicas = replicas;
    }
    let sts_status = sts.as_ref().and_then(|s| s.status.as_ref());
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
    fn a_failed_render_keeps_the_last_checksum() {
        let mut l = listener();
        l.status = Some(SmtpListenerStatus {
            config_checksum: Some("abc".into()),
            ..SmtpListenerStatus::default()
        });
        let s = status(&l, &Observed::default(), "2026-11-30T00:00:00Z");
        assert_eq!(s.config_checksum.as_deref(), Some("abc"));
    }
}
