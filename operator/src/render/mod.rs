//! The pure heart of the operator: Petrel resources plus observed facts in, desired
//! Kubernetes objects out.
//!
//! Input is a [`World`]: the CRs of one namespace and the Secrets already there (so keys and
//! certificates are reused, never regenerated). Output is a [`Desired`]: every object to
//! apply, the validated [`MtaConfig`] of each listener, and [`Note`]s for resource fields
//! that cannot take effect yet. No client is in scope here; fresh key material comes from a
//! [`KeySource`] so tests are deterministic. The same function backs the reconciler and
//! `petrel-operator render`.

pub mod certificate;
pub mod dkim;
pub mod mta_config;
pub mod secrets;
pub mod workload;

use crate::keys::KeySource;
use ::mta_config::MtaConfig;
use crds::{DkimKey, MailDomain, RelayPolicy, SmtpListener};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::DynamicObject;
use kube::{Resource, ResourceExt};
use std::collections::BTreeMap;

/// Label keys and values put on every rendered object.
pub mod labels {
    /// `app.kubernetes.io/name`
    pub const NAME: &str = "app.kubernetes.io/name";
    /// `app.kubernetes.io/instance`: the owning resource's name.
    pub const INSTANCE: &str = "app.kubernetes.io/instance";
    /// `app.kubernetes.io/component`
    pub const COMPONENT: &str = "app.kubernetes.io/component";
    /// `app.kubernetes.io/part-of`
    pub const PART_OF: &str = "app.kubernetes.io/part-of";
    /// `app.kubernetes.io/managed-by`: what prune selects on.
    pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
    /// Value of [`MANAGED_BY`].
    pub const MANAGER: &str = "petrel-operator";
    /// Kind of the owning Petrel resource (`SmtpListener`, `DkimKey`), for prune.
    pub const OWNER_KIND: &str = "mail.petrel.dev/owner-kind";
}

/// The resources of one namespace and what is already there.
#[derive(Debug, Clone, Default)]
pub struct World {
    /// SmtpListeners.
    pub listeners: Vec<SmtpListener>,
    /// MailDomains.
    pub domains: Vec<MailDomain>,
    /// RelayPolicies.
    pub relay_policies: Vec<RelayPolicy>,
    /// DkimKeys.
    pub dkim_keys: Vec<DkimKey>,
    /// Secrets that exist (observed): reused instead of generating new keys.
    pub secrets: Vec<Secret>,
    /// The `petrel-mta` image for SmtpListeners that name none (the operator's
    /// `PETREL_MTA_IMAGE`); `None` is [`workload::DEFAULT_IMAGE`].
    pub mta_image: Option<String>,
    /// The time of the reconcile (Unix seconds), for certificate renewal; `None` (the
    /// offline `render`) keeps every certificate it is given.
    pub now: Option<i64>,
    /// StatefulSet sizes decided by the scale-in plan, by listener name: during a scale-in
    /// the pods leaving stay until they have drained. Absent: [`desired_replicas`].
    pub statefulset_replicas: BTreeMap<String, i32>,
    /// Queue volumes left by pods that went without draining, by listener name: their
    /// ordinals, each drained by a Job ([`workload::volume_drain_job`]) until it reports
    /// drained.
    pub volume_drains: BTreeMap<String, Vec<i32>>,
}

/// The pods a listener asks for: `spec.replicas`, kept within the autoscaling bounds.
pub fn desired_replicas(listener: &SmtpListener) -> i32 {
    let spec = &listener.spec;
    match &spec.autoscaling {
        Some(a) => spec
            .replicas
            .clamp(a.min_replicas, a.max_replicas.max(a.min_replicas)),
        None => spec.replicas,
    }
}

impl World {
    /// Sorts every list by name, so output order never depends on listing order.
    pub fn sort(&mut self) {
        self.listeners
            .sort_by_key(|r| (r.namespace(), r.name_any()));
        self.domains
            .sort_by(|a, b| a.spec.domain.cmp(&b.spec.domain));
        self.relay_policies
            .sort_by_key(|r| (r.namespace(), r.name_any()));
        self.dkim_keys
            .sort_by_key(|r| (r.namespace(), r.name_any()));
        self.secrets.sort_by_key(|r| (r.namespace(), r.name_any()));
    }

    /// The observed Secret named `name` in `namespace`.
    pub fn secret(&self, namespace: &str, name: &str) -> Option<&Secret> {
        self.secrets
            .iter()
            .find(|s| s.namespace().as_deref() == Some(namespace) && s.name_any() == name)
    }

    /// Resources of the world in `namespace` only.
    pub fn in_namespace(&self, namespace: &str) -> World {
        let ns = |m: &ObjectMeta| m.namespace.as_deref() == Some(namespace);
        World {
            listeners: keep(&self.listeners, |r| ns(&r.metadata)),
            domains: keep(&self.domains, |r| ns(&r.metadata)),
            relay_policies: keep(&self.relay_policies, |r| ns(&r.metadata)),
            dkim_keys: keep(&self.dkim_keys, |r| ns(&r.metadata)),
            secrets: keep(&self.secrets, |r| ns(&r.metadata)),
            mta_image: self.mta_image.clone(),
            now: self.now,
            statefulset_replicas: self.statefulset_replicas.clone(),
            volume_drains: self.volume_drains.clone(),
        }
    }

    /// Every namespace that holds a Petrel resource, sorted.
    pub fn namespaces(&self) -> Vec<String> {
        let mut all: Vec<String> = self
            .listeners
            .iter()
            .map(|r| r.namespace())
            .chain(self.domains.iter().map(|r| r.namespace()))
            .chain(self.relay_policies.iter().map(|r| r.namespace()))
            .chain(self.dkim_keys.iter().map(|r| r.namespace()))
            .flatten()
            .collect();
        all.sort();
        all.dedup();
        all
    }
}

fn keep<T: Clone>(items: &[T], f: impl Fn(&T) -> bool) -> Vec<T> {
    items.iter().filter(|i| f(i)).cloned().collect()
}

/// One object to apply.
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)] // a handful per reconcile; boxing buys nothing
pub enum Object {
    /// The MtaConfig of a listener.
    ConfigMap(ConfigMap),
    /// TLS or DKIM key material.
    Secret(Secret),
    /// The MTA pods.
    StatefulSet(StatefulSet),
    /// Listener ports (and the headless governing Service).
    Service(Service),
    /// Keeps all but one pod up during voluntary disruptions.
    PodDisruptionBudget(PodDisruptionBudget),
    /// CPU-based autoscaling.
    HorizontalPodAutoscaler(HorizontalPodAutoscaler),
    /// A cert-manager `Certificate` (`tls.issuerRef`), see [`certificate`].
    Certificate(DynamicObject),
    /// Drains a queue volume left by a pod that went without draining.
    Job(Job),
}

impl Object {
    /// Metadata of the object.
    pub fn meta(&self) -> &ObjectMeta {
        match self {
            Self::ConfigMap(o) => &o.metadata,
            Self::Secret(o) => &o.metadata,
            Self::StatefulSet(o) => &o.metadata,
            Self::Service(o) => &o.metadata,
            Self::PodDisruptionBudget(o) => &o.metadata,
            Self::HorizontalPodAutoscaler(o) => &o.metadata,
            Self::Certificate(o) => &o.metadata,
            Self::Job(o) => &o.metadata,
        }
    }

    /// Kind, e.g. `StatefulSet`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::ConfigMap(_) => "ConfigMap",
            Self::Secret(_) => "Secret",
            Self::StatefulSet(_) => "StatefulSet",
            Self::Service(_) => "Service",
            Self::PodDisruptionBudget(_) => "PodDisruptionBudget",
            Self::HorizontalPodAutoscaler(_) => "HorizontalPodAutoscaler",
            Self::Certificate(_) => "Certificate",
            Self::Job(_) => "Job",
        }
    }

    /// Object name.
    pub fn name(&self) -> &str {
        self.meta().name.as_deref().unwrap_or_default()
    }

    /// Full JSON (with apiVersion and kind), as sent to the API server.
    pub fn to_json(&self) -> Result<serde_json::Value, serde_json::Error> {
        match self {
            Self::ConfigMap(o) => serde_json::to_value(o),
            Self::Secret(o) => serde_json::to_value(o),
            Self::StatefulSet(o) => serde_json::to_value(o),
            Self::Service(o) => serde_json::to_value(o),
            Self::PodDisruptionBudget(o) => serde_json::to_value(o),
            Self::HorizontalPodAutoscaler(o) => serde_json::to_value(o),
            Self::Certificate(o) => serde_json::to_value(o),
            Self::Job(o) => serde_json::to_value(o),
        }
    }
}

/// Something in a resource that renders but does not take effect yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// Kind of the resource, e.g. `MailDomain`.
    pub kind: &'static str,
    /// Its name.
    pub name: String,
    /// PascalCase reason, used as the condition reason.
    pub reason: &'static str,
    /// What does not take effect, for people.
    pub message: String,
}

/// Everything render decided.
#[derive(Debug, Clone, Default)]
pub struct Desired {
    /// Objects to apply, in a stable order.
    pub objects: Vec<Object>,
    /// The validated MtaConfig of each listener, by listener name.
    pub configs: BTreeMap<String, MtaConfig>,
    /// Fields that cannot take effect yet.
    pub notes: Vec<Note>,
}

/// Why resources cannot be rendered.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// The MtaConfig built from the resources fails the MTA's own validation.
    #[error("SmtpListener {listener}: the rendered MtaConfig is invalid: {message}")]
    InvalidConfig {
        /// Listener name.
        listener: String,
        /// The validation problems.
        message: String,
    },
    /// A resource lacks a name or namespace.
    #[error("a {kind} has no {field}")]
    MissingField {
        /// Kind of the resource.
        kind: &'static str,
        /// The missing field.
        field: &'static str,
    },
    /// Generating key material failed (not merely unsupported).
    #[error("{kind} {name}: {source}")]
    Keys {
        /// Kind of the resource.
        kind: &'static str,
        /// Its name.
        name: String,
        /// The failure.
        source: crate::keys::KeyError,
    },
}

/// Renders everything in `world` (all namespaces).
pub fn render(world: &World, keys: &mut dyn KeySource) -> Result<Desired, RenderError> {
    let mut desired = Desired::default();
    for ns in world.namespaces() {
        let mut local = world.in_namespace(&ns);
        for key in local.dkim_keys.clone() {
            // Offline, keys stay as they are; a key without any gets its first one. The
            // operator moves them through their phases (`reconcile::dkim_rotation`).
            let slots = dkim::read_slots(&key, &local);
            let plans = dkim::initial_plans(&slots, local.now.unwrap_or(0));
            let part = Desired {
                objects: dkim::slot_secrets(&key, &local, &plans, keys)?,
                ..Desired::default()
            };
            // The listeners rendered next see the key Secrets about to exist, as the
            // operator's listeners see them once applied.
            for object in &part.objects {
                if let Object::Secret(secret) = object
                    && local.secret(&ns, object.name()).is_none()
                {
                    local.secrets.push(secret.clone());
                }
            }
            desired.objects.extend(part.objects);
            desired.notes.extend(part.notes);
        }
        for listener in &local.listeners {
            let part = render_listener(listener, &local, keys)?;
            desired.objects.extend(part.objects);
            desired.configs.extend(part.configs);
            desired.notes.extend(part.notes);
        }
    }
    desired.notes.dedup();
    Ok(desired)
}

/// Renders one SmtpListener: its config, TLS secret, workload and services. `world` holds
/// the listener's namespace.
pub fn render_listener(
    listener: &SmtpListener,
    world: &World,
    keys: &mut dyn KeySource,
) -> Result<Desired, RenderError> {
    let name = listener
        .metadata
        .name
        .clone()
        .ok_or(RenderError::MissingField {
            kind: "SmtpListener",
            field: "metadata.name",
        })?;
    let mut notes = Vec::new();
    let config = mta_config::for_listener(listener, world, &mut notes)?;
    config.validate().map_err(|e| RenderError::InvalidConfig {
        listener: name.clone(),
        message: e.to_string(),
    })?;
    let yaml = config.to_yaml();
    let mut objects = vec![Object::ConfigMap(workload::config_map(listener, &yaml))];
    if let Some(certificate) = certificate::listener_certificate(listener) {
        objects.push(Object::Certificate(certificate));
    }
    let tls_secret = match secrets::listener_tls(listener, world, keys)? {
        secrets::TlsSecret::Render(secret) => {
            let name = secret.metadata.name.clone().unwrap_or_default();
            objects.push(Object::Secret(*secret));
            name
        }
        secrets::TlsSecret::Existing(name) => name,
    };
    let signing = mta_config::signing_keys(world, &mut Vec::new());
    let dkim = secrets::listener_dkim(listener, world, &signing);
    let dkim_secret = dkim.metadata.name.clone().unwrap_or_default();
    objects.push(Object::Secret(dkim));
    let fleet = secrets::listener_fleet(listener, world, keys)?;
    let fleet_secret = fleet.metadata.name.clone().unwrap_or_default();
    objects.push(Object::Secret(fleet));
    let auth_secret = mta_config::auth_secret(world).map(|(name, _)| name);
    let smarthost_secret = mta_config::smarthost_secret(world);
    // The pod template holds only what needs a restart (image, ports, which Secrets are
    // mounted): the config and the DKIM keys reach running pods as file updates, which
    // the MTA hot-reloads.
    let stateful_set = workload::stateful_set(
        listener,
        world.mta_image.as_deref(),
        &workload::Mounts {
            tls: &tls_secret,
            dkim: &dkim_secret,
            fleet: &fleet_secret,
            auth: auth_secret.as_deref(),
            smarthost: smarthost_secret.as_deref(),
        },
        world
            .statefulset_replicas
            .get(&name)
            .copied()
            .unwrap_or_else(|| desired_replicas(listener)),
    );
    // Volumes left behind are drained by Jobs running the pods' own template.
    for ordinal in world.volume_drains.get(&name).into_iter().flatten() {
        objects.push(Object::Job(workload::volume_drain_job(
            listener,
            &stateful_set,
            *ordinal,
        )));
    }
    objects.push(Object::StatefulSet(stateful_set));
    objects.extend(
        workload::services(listener)
            .into_iter()
            .map(Object::Service),
    );
    objects.push(Object::PodDisruptionBudget(workload::pdb(listener)));
    if let Some(hpa) = workload::hpa(listener) {
        objects.push(Object::HorizontalPodAutoscaler(hpa));
    }
    let mut configs = BTreeMap::new();
    configs.insert(name, config);
    Ok(Desired {
        objects,
        configs,
        notes,
    })
}

/// A checksum of the files the pods of `listener` mount that change without a restart:
/// its config (ConfigMap) and its DKIM keys (Secret). Data only, never metadata.
pub fn mounted_files_checksum(listener: &SmtpListener, objects: &[Object]) -> String {
    let mounted = [
        workload::config_map_name(listener),
        secrets::listener_dkim_secret_name(listener),
    ];
    let mut text = String::new();
    for object in objects {
        if !mounted.iter().any(|m| m == object.name()) {
            continue;
        }
        match object {
            Object::ConfigMap(c) => text.push_str(&format!("{:?}", c.data)),
            Object::Secret(s) => {
                for (k, v) in s.data.iter().flatten() {
                    text.push_str(k);
                    text.push_str(&sha256_hex(&v.0));
                }
            }
            _ => {}
        }
    }
    sha256_hex(text.as_bytes())
}

/// Lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Metadata for an object owned by `owner`: name, namespace, the standard labels and, when
/// the owner has a uid (it came from the API server), a controller owner reference.
pub fn owned_meta<K: Resource<DynamicType = ()>>(
    owner: &K,
    name: String,
    component: &str,
) -> ObjectMeta {
    let instance = owner.meta().name.clone().unwrap_or_default();
    ObjectMeta {
        name: Some(name),
        namespace: owner.meta().namespace.clone(),
        labels: Some(BTreeMap::from([
            (labels::NAME.to_owned(), "petrel-mta".to_owned()),
            (labels::INSTANCE.to_owned(), instance),
            (labels::COMPONENT.to_owned(), component.to_owned()),
            (labels::PART_OF.to_owned(), "petrel".to_owned()),
            (labels::MANAGED_BY.to_owned(), labels::MANAGER.to_owned()),
            (labels::OWNER_KIND.to_owned(), K::kind(&()).into_owned()),
        ])),
        owner_references: owner.controller_owner_ref(&()).map(|r| vec![r]),
        ..ObjectMeta::default()
    }
}

/// Renders `desired` as a multi-document YAML stream: objects first, then (as comments)
/// the notes.
pub fn to_yaml(desired: &Desired) -> Result<String, RenderError> {
    let mut out = String::new();
    for object in &desired.objects {
        let json = object.to_json().map_err(|e| RenderError::InvalidConfig {
            listener: object.name().to_owned(),
            message: e.to_string(),
        })?;
        out.push_str("---\n");
        out.push_str(
            &serde_saphyr::to_string(&json).map_err(|e| RenderError::InvalidConfig {
                listener: object.name().to_owned(),
                message: e.to_string(),
            })?,
        );
    }
    for note in &desired.notes {
        out.push_str(&format!(
            "# note: {} {}: {}: {}\n",
            note.kind, note.name, note.reason, note.message
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
