//! Server-side apply of rendered objects with one field manager, skipping objects the
//! cluster already holds as desired (so an unchanged world sees no writes), and pruning of
//! objects this operator made for an owner that are no longer desired.
//!
//! Apply refuses to take over an object it did not make (no `managed-by` label): with
//! RBAC that must allow writing Secrets, this is what keeps a user's Secret safe.
//! Prune selects on the `app.kubernetes.io/managed-by`, `app.kubernetes.io/instance` and
//! `mail.petrel.dev/owner-kind` labels, so it never touches objects someone else made.
//!
//! cert-manager `Certificate`s go through the dynamic API: when the API server does not
//! serve the kind (cert-manager is not installed), applying one is
//! [`crate::Error::CertManagerMissing`] and pruning has nothing to look at.

use crate::render::{Object, certificate, labels};
use crate::{FIELD_MANAGER, Result};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fmt::Debug;

/// What applying one object did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// The cluster already had it; nothing was sent.
    Unchanged,
    /// It was created or updated.
    Patched,
}

/// Whether the API server stores `value` by leaving the field out: null, and empty maps
/// and lists (a Secret with no keys comes back without `data`).
fn omitted(value: &serde_json::Value) -> bool {
    match value {
        serde_json::Value::Null => true,
        serde_json::Value::Object(m) => m.is_empty(),
        serde_json::Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

/// Whether `existing` already contains everything in `desired` (fields the API server
/// adds or defaults are ignored; lists must match element by element).
pub fn contains(existing: &serde_json::Value, desired: &serde_json::Value) -> bool {
    use serde_json::Value;
    match (existing, desired) {
        (Value::Object(e), Value::Object(d)) => d
            .iter()
            .all(|(k, dv)| e.get(k).is_some_and(|ev| contains(ev, dv)) || omitted(dv)),
        (Value::Array(e), Value::Array(d)) => {
            e.len() == d.len() && e.iter().zip(d).all(|(ev, dv)| contains(ev, dv))
        }
        (e, d) => e == d,
    }
}

async fn apply_typed<K>(client: &Client, object: &K) -> Result<Applied>
where
    K: Resource<DynamicType = ()> + Clone + Debug + Serialize + DeserializeOwned,
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
{
    let ns = object
        .meta()
        .namespace
        .clone()
        .ok_or(crate::Error::MissingField("metadata.namespace"))?;
    let name = object.name_any();
    let api: Api<K> = Api::namespaced(client.clone(), &ns);
    let desired = serde_json::to_value(object)?;
    if let Some(existing) = api.get_opt(&name).await? {
        if !is_managed(existing.meta()) {
            return Err(crate::Error::NotOwned {
                kind: K::kind(&()).into_owned(),
                name,
            });
        }
        if contains(&serde_json::to_value(&existing)?, &desired) {
            return Ok(Applied::Unchanged);
        }
    }
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&desired),
    )
    .await?;
    Ok(Applied::Patched)
}

/// Whether an API error says the kind (or object) is not there.
fn not_found(error: &kube::Error) -> bool {
    // An API group the server does not serve answers a bare `404 page not found`, not a
    // Status with reason NotFound: the code is what both have in common.
    matches!(error, kube::Error::Api(status) if status.is_not_found() || status.code == 404)
}

/// [`apply_typed`] for a cert-manager Certificate.
async fn apply_certificate(client: &Client, object: &DynamicObject) -> Result<Applied> {
    let ns = object
        .metadata
        .namespace
        .clone()
        .ok_or(crate::Error::MissingField("metadata.namespace"))?;
    let name = object.name_any();
    let api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &ns, &certificate::api_resource());
    let desired = serde_json::to_value(object)?;
    // An unknown kind answers 404 to the GET as well (and not as a Status `get_opt`
    // recognises): taken as "no such object", the apply below says what it means.
    let existing = match api.get(&name).await {
        Ok(existing) => Some(existing),
        Err(e) if not_found(&e) => None,
        Err(e) => return Err(e.into()),
    };
    if let Some(existing) = existing {
        if !is_managed(&existing.metadata) {
            return Err(crate::Error::NotOwned {
                kind: "Certificate".to_owned(),
                name,
            });
        }
        if contains(&serde_json::to_value(&existing)?, &desired) {
            return Ok(Applied::Unchanged);
        }
    }
    match api
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&desired),
        )
        .await
    {
        Ok(_) => Ok(Applied::Patched),
        Err(e) if not_found(&e) => Err(crate::Error::CertManagerMissing),
        Err(e) => Err(e.into()),
    }
}

/// Deletes our Certificates selected by `selector` that are not in `keep`; none when the
/// API server does not serve the kind.
async fn prune_certificates(
    client: &Client,
    namespace: &str,
    selector: &str,
    keep: &[(&str, &str)],
) -> Result<Vec<String>> {
    let api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), namespace, &certificate::api_resource());
    let existing = match api.list(&ListParams::default().labels(selector)).await {
        Ok(list) => list,
        Err(e) if not_found(&e) => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let mut deleted = Vec::new();
    for certificate in existing {
        let name = certificate.name_any();
        if !keep.contains(&("Certificate", name.as_str())) {
            api.delete(&name, &DeleteParams::background()).await?;
            deleted.push(format!("Certificate/{name}"));
        }
    }
    Ok(deleted)
}

/// Whether this operator made the object (its `managed-by` label says so).
pub fn is_managed(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> bool {
    meta.labels
        .as_ref()
        .and_then(|l| l.get(labels::MANAGED_BY))
        .is_some_and(|v| v == labels::MANAGER)
}

/// Applies one rendered object. An existing object of the same name that this operator
/// did not make is never overwritten ([`crate::Error::NotOwned`]).
pub async fn apply(client: &Client, object: &Object) -> Result<Applied> {
    match object {
        Object::ConfigMap(o) => apply_typed(client, o).await,
        Object::Secret(o) => apply_typed(client, o).await,
        Object::StatefulSet(o) => apply_typed(client, o).await,
        Object::Service(o) => apply_typed(client, o).await,
        Object::PodDisruptionBudget(o) => apply_typed(client, o).await,
        Object::HorizontalPodAutoscaler(o) => apply_typed(client, o).await,
        Object::Certificate(o) => apply_certificate(client, o).await,
        Object::Job(o) => create_job(client, o).await,
    }
}

/// A Job is created, never updated: its pod template is immutable, and a drain in
/// progress is not restarted because the listener changed meanwhile.
async fn create_job(client: &Client, job: &Job) -> Result<Applied> {
    let ns = job
        .metadata
        .namespace
        .clone()
        .ok_or(crate::Error::MissingField("metadata.namespace"))?;
    let name = job.name_any();
    let api: Api<Job> = Api::namespaced(client.clone(), &ns);
    if let Some(existing) = api.get_opt(&name).await? {
        if !is_managed(&existing.metadata) {
            return Err(crate::Error::NotOwned {
                kind: "Job".to_owned(),
                name,
            });
        }
        return Ok(Applied::Unchanged);
    }
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(job),
    )
    .await?;
    Ok(Applied::Patched)
}

fn owner_selector(owner_kind: &str, instance: &str) -> String {
    format!(
        "{}={},{}={instance},{}={owner_kind}",
        labels::MANAGED_BY,
        labels::MANAGER,
        labels::INSTANCE,
        labels::OWNER_KIND
    )
}

async fn prune_typed<K>(
    client: &Client,
    namespace: &str,
    selector: &str,
    keep: &[(&str, &str)],
) -> Result<Vec<String>>
where
    K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned,
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    let kind = K::kind(&());
    let mut deleted = Vec::new();
    for existing in api.list(&ListParams::default().labels(selector)).await? {
        let name = existing.name_any();
        if !keep.contains(&(kind.as_ref(), name.as_str())) {
            api.delete(&name, &DeleteParams::background()).await?;
            deleted.push(format!("{kind}/{name}"));
        }
    }
    Ok(deleted)
}

/// Deletes objects made for `owner_kind`/`instance` in `namespace` that are not in
/// `desired`. Returns `Kind/name` of each deleted object.
pub async fn prune(
    client: &Client,
    namespace: &str,
    owner_kind: &str,
    instance: &str,
    desired: &[Object],
) -> Result<Vec<String>> {
    let keep: Vec<(&str, &str)> = desired.iter().map(|o| (o.kind(), o.name())).collect();
    let selector = owner_selector(owner_kind, instance);
    let mut deleted = Vec::new();
    deleted.extend(prune_typed::<ConfigMap>(client, namespace, &selector, &keep).await?);
    deleted.extend(prune_typed::<Secret>(client, namespace, &selector, &keep).await?);
    if owner_kind == "SmtpListener" {
        deleted.extend(prune_typed::<StatefulSet>(client, namespace, &selector, &keep).await?);
        deleted.extend(prune_typed::<Service>(client, namespace, &selector, &keep).await?);
        deleted
            .extend(prune_typed::<PodDisruptionBudget>(client, namespace, &selector, &keep).await?);
        deleted.extend(
            prune_typed::<HorizontalPodAutoscaler>(client, namespace, &selector, &keep).await?,
        );
        deleted.extend(prune_certificates(client, namespace, &selector, &keep).await?);
        // Background propagation: the Job's pod goes with it, and only then is the volume
        // it mounted free to be deleted.
        deleted.extend(prune_typed::<Job>(client, namespace, &selector, &keep).await?);
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::contains;
    use serde_json::json;

    #[test]
    fn server_defaults_do_not_count_as_drift_but_changes_do() {
        let desired = json!({"spec": {"replicas": 2, "ports": [{"port": 25}]}});
        let existing = json!({"spec": {"replicas": 2, "revisionHistoryLimit": 10,
            "ports": [{"port": 25, "protocol": "TCP"}]}, "status": {"ready": 1}});
        assert!(contains(&existing, &desired));
        assert!(!contains(&existing, &json!({"spec": {"replicas": 3}})));
        assert!(!contains(
            &existing,
            &json!({"spec": {"ports": [{"port": 25}, {"port": 587}]}})
        ));
        assert!(!contains(&json!({}), &json!({"data": {"a": "b"}})));
        assert!(
            contains(
                &json!({"kind": "Secret"}),
                &json!({"kind": "Secret", "data": {}})
            ),
            "an empty map comes back as an absent field"
        );
    }
}
