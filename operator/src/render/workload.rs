//! The MTA workload of one SmtpListener: config ConfigMap, StatefulSet (a queue PVC per
//! pod), the listener Service and the headless governing Service, PodDisruptionBudget and
//! optional HorizontalPodAutoscaler.
//!
//! Pods run under the restricted Pod Security profile: non-root, read-only root
//! filesystem, no privilege escalation, all capabilities dropped, RuntimeDefault seccomp.
//! They get no service-account token: MTA pods never talk to the Kubernetes API.
//!
//! A queue volume left by a pod that went without draining (the StatefulSet shrunk by
//! hand, or while the operator was away) gets a Job ([`volume_drain_job`]): the pods' own
//! template on that one volume, under labels no Service, PDB or StatefulSet selects, so it
//! takes no mail and only hands its queue to the listener's pods when the operator asks.

use super::mta_config::{
    AUTH_DIR, CONFIG_DIR, CONFIG_FILE, DATA_DIR, DKIM_DIR, FLEET_DIR, SMARTHOST_DIR, TLS_DIR,
    container_port,
};
use super::{labels, owned_meta};
use crds::SmtpListener;
use crds::smtp_listener::ListenerPortKind;
use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec};
use k8s_openapi::api::autoscaling::v2::{
    CrossVersionObjectReference, HorizontalPodAutoscaler, HorizontalPodAutoscalerSpec, MetricSpec,
    MetricTarget, ResourceMetricSource,
};
use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource,
    HTTPGetAction, PersistentVolumeClaim, PersistentVolumeClaimSpec,
    PersistentVolumeClaimVolumeSource, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    ResourceRequirements, SeccompProfile, SecretVolumeSource, SecurityContext, Service,
    ServicePort, ServiceSpec, Volume, VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use std::collections::BTreeMap;

/// Image used when the SmtpListener names none.
pub const DEFAULT_IMAGE: &str =
    concat!("ghcr.io/petrel-mail/petrel-mta:", env!("CARGO_PKG_VERSION"));
/// Name of the queue volume claim template: each pod's PVC is `queue-<listener>-<n>`.
pub const QUEUE_VOLUME: &str = "queue";

/// Port of the MTA's HTTP endpoint (`/healthz`, `/readyz`, `/metrics`).
pub const HTTP_PORT: i32 = 8080;
/// UID/GID the MTA runs as (the conventional "nonroot" user of distroless images).
pub const RUN_AS: i64 = 65_532;
/// Seconds a stopping pod gets to finish the SMTP sessions and deliveries in progress.
/// Its queue stays on its volume: it is handed to other pods only by a drain, which the
/// operator runs before a scale-in removes the pod (a pod that stops otherwise, e.g. in
/// a rollout, comes back on the same volume).
pub const TERMINATION_GRACE_SECONDS: i64 = 120;

/// Name of the listener's config ConfigMap.
pub fn config_map_name(listener: &SmtpListener) -> String {
    format!("{}-config", listener.name_any())
}

/// Name of the headless Service governing the StatefulSet.
pub fn headless_service_name(listener: &SmtpListener) -> String {
    format!("{}-headless", listener.name_any())
}

/// Label on a volume-drain Job and its pod: the PVC it drains.
pub const DRAINS_VOLUME_LABEL: &str = "mail.petrel.dev/drains-volume";

/// `app.kubernetes.io/name` of a volume-drain Job's pod (not `petrel-mta`: the listener's
/// selectors must not match it).
pub const VOLUME_DRAIN_NAME: &str = "petrel-volume-drain";

/// Restarts a volume-drain Job's pod may take before the Job fails (and the operator
/// says so); a failed pod leaves its queue on the volume, where the next Job finds it.
pub const VOLUME_DRAIN_BACKOFF_LIMIT: i32 = 20;

/// Name of the queue PVC of pod `ordinal` of `listener`.
pub fn queue_volume_name(listener: &SmtpListener, ordinal: i32) -> String {
    format!("{QUEUE_VOLUME}-{}-{ordinal}", listener.name_any())
}

/// Name of the Job draining the queue volume of pod `ordinal`.
pub fn volume_drain_job_name(listener: &SmtpListener, ordinal: i32) -> String {
    format!("{}-drain-{ordinal}", listener.name_any())
}

/// Labels that select the listener's pods.
pub fn selector_labels(listener: &SmtpListener) -> BTreeMap<String, String> {
    BTreeMap::from([
        (labels::NAME.to_owned(), "petrel-mta".to_owned()),
        (labels::INSTANCE.to_owned(), listener.name_any()),
    ])
}

/// The ConfigMap holding the rendered MtaConfig.
pub fn config_map(listener: &SmtpListener, yaml: &str) -> ConfigMap {
    ConfigMap {
        metadata: owned_meta(listener, config_map_name(listener), "config"),
        data: Some(BTreeMap::from([(CONFIG_FILE.to_owned(), yaml.to_owned())])),
        ..ConfigMap::default()
    }
}

fn quantity(q: &str) -> Quantity {
    Quantity(q.to_owned())
}

fn mount(name: &str, path: &str) -> VolumeMount {
    VolumeMount {
        name: name.to_owned(),
        mount_path: path.to_owned(),
        read_only: Some(true),
        ..VolumeMount::default()
    }
}

const PROBE_TIMEOUT_SECONDS: i32 = 5;

/// An HTTP probe of the MTA's observability port. Its answers are immediate, but a
/// node that is busy (a kubelet on two cores running the pod, its clients and the
/// control plane) may hold one back past the default one second: each probe waits
/// `PROBE_TIMEOUT_SECONDS`, so only an MTA that really stopped answering fails it.
fn probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::String("http".to_owned()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(PROBE_TIMEOUT_SECONDS),
        failure_threshold: Some(failures),
        ..Probe::default()
    }
}

/// A volume of the Secret `secret`; `optional` lets the pod start before it exists.
fn secret_volume(name: &str, secret: &str, optional: bool) -> Volume {
    Volume {
        name: name.to_owned(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret.to_owned()),
            optional: Some(optional),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    }
}

/// The Secrets an MTA pod mounts, by name.
#[derive(Debug, Clone, Copy)]
pub struct Mounts<'a> {
    /// Certificate and key (`tls.crt`, `tls.key`).
    pub tls: &'a str,
    /// The listener's copy of its DKIM private keys.
    pub dkim: &'a str,
    /// The token the pods share (drain and hand-off).
    pub fleet: &'a str,
    /// AUTH users file, when a RelayPolicy names one.
    pub auth: Option<&'a str>,
    /// Smarthost credentials, when the route has them.
    pub smarthost: Option<&'a str>,
}

/// The StatefulSet of MTA pods. `default_image` is used when the listener names none
/// (then [`DEFAULT_IMAGE`]).
pub fn stateful_set(
    listener: &SmtpListener,
    default_image: Option<&str>,
    secrets: &Mounts<'_>,
    replicas: i32,
) -> StatefulSet {
    let spec = &listener.spec;
    let mut pod_labels = owned_meta(listener, String::new(), "mta")
        .labels
        .unwrap_or_default();
    pod_labels.extend(selector_labels(listener));
    let mut ports: Vec<ContainerPort> = spec
        .ports
        .iter()
        .map(|p| ContainerPort {
            name: Some(p.name.clone()),
            container_port: container_port(p.port),
            protocol: Some("TCP".to_owned()),
            ..ContainerPort::default()
        })
        .collect();
    ports.push(ContainerPort {
        name: Some("http".to_owned()),
        container_port: HTTP_PORT,
        protocol: Some("TCP".to_owned()),
        ..ContainerPort::default()
    });
    let mut volumes = vec![
        Volume {
            name: "config".to_owned(),
            config_map: Some(ConfigMapVolumeSource {
                name: config_map_name(listener),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        // cert-manager may not have issued it yet; the MTA reloads it when it appears.
        secret_volume("tls", secrets.tls, spec.tls.issuer_ref.is_some()),
        secret_volume("dkim", secrets.dkim, false),
        secret_volume("fleet", secrets.fleet, false),
        Volume {
            name: "tmp".to_owned(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        },
    ];
    let mut mounts = vec![
        mount("config", CONFIG_DIR),
        mount("tls", TLS_DIR),
        mount("dkim", DKIM_DIR),
        mount("fleet", FLEET_DIR),
        VolumeMount {
            name: QUEUE_VOLUME.to_owned(),
            mount_path: DATA_DIR.to_owned(),
            ..VolumeMount::default()
        },
        VolumeMount {
            name: "tmp".to_owned(),
            mount_path: "/tmp".to_owned(),
            ..VolumeMount::default()
        },
    ];
    if let Some(secret) = secrets.auth {
        volumes.push(secret_volume("auth", secret, false));
        mounts.push(mount("auth", AUTH_DIR));
    }
    if let Some(secret) = secrets.smarthost {
        volumes.push(secret_volume("smarthost", secret, false));
        mounts.push(mount("smarthost", SMARTHOST_DIR));
    }
    let container = Container {
        name: "mta".to_owned(),
        image: Some(
            spec.image
                .as_deref()
                .or(default_image)
                .unwrap_or(DEFAULT_IMAGE)
                .to_owned(),
        ),
        args: Some(vec![
            "serve".to_owned(),
            "--config".to_owned(),
            format!("{CONFIG_DIR}/{CONFIG_FILE}"),
        ]),
        ports: Some(ports),
        liveness_probe: Some(probe("/healthz", 10, 6)),
        readiness_probe: Some(probe("/readyz", 5, 2)),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_owned(), quantity(&spec.resources.cpu)),
                ("memory".to_owned(), quantity(&spec.resources.memory)),
            ])),
            limits: Some(BTreeMap::from([(
                "memory".to_owned(),
                quantity(&spec.resources.memory),
            )])),
            ..ResourceRequirements::default()
        }),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                ..Capabilities::default()
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(mounts),
        ..Container::default()
    };
    let pod = PodSpec {
        containers: vec![container],
        volumes: Some(volumes),
        automount_service_account_token: Some(false),
        enable_service_links: Some(false),
        termination_grace_period_seconds: Some(TERMINATION_GRACE_SECONDS),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(RUN_AS),
            run_as_group: Some(RUN_AS),
            fs_group: Some(RUN_AS),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".to_owned(),
                ..SeccompProfile::default()
            }),
            ..PodSecurityContext::default()
        }),
        ..PodSpec::default()
    };
    StatefulSet {
        metadata: owned_meta(listener, listener.name_any(), "mta"),
        spec: StatefulSetSpec {
            // The operator's alone: the HPA scales the SmtpListener, and a scale-in lowers
            // this only once the pods leaving have drained.
            replicas: Some(replicas),
            service_name: Some(headless_service_name(listener)),
            pod_management_policy: Some("Parallel".to_owned()),
            selector: LabelSelector {
                match_labels: Some(selector_labels(listener)),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod),
            },
            volume_claim_templates: Some(vec![PersistentVolumeClaim {
                metadata: ObjectMeta {
                    name: Some(QUEUE_VOLUME.to_owned()),
                    labels: Some(selector_labels(listener)),
                    ..ObjectMeta::default()
                },
                spec: Some(PersistentVolumeClaimSpec {
                    access_modes: Some(vec!["ReadWriteOnce".to_owned()]),
                    storage_class_name: spec.queue.storage_class_name.clone(),
                    resources: Some(VolumeResourceRequirements {
                        requests: Some(BTreeMap::from([(
                            "storage".to_owned(),
                            quantity(&spec.queue.size),
                        )])),
                        ..VolumeResourceRequirements::default()
                    }),
                    ..PersistentVolumeClaimSpec::default()
                }),
                ..PersistentVolumeClaim::default()
            }]),
            ..StatefulSetSpec::default()
        },
        ..StatefulSet::default()
    }
}

/// The Job that drains the queue volume of pod `ordinal`, which no pod of `stateful_set`
/// mounts any more: the pods' template with that volume mounted where the pods mount
/// theirs (the spool keeps its identity, so a hand-over the pod started and this Job
/// finishes is still recognised by the peer). It runs `petrel-mta serve`, as a pod would;
/// the operator asks it to drain, and removes the Job once it reports drained. The spool's
/// lock keeps it and a pod the StatefulSet brings back from sharing the volume.
pub fn volume_drain_job(listener: &SmtpListener, stateful_set: &StatefulSet, ordinal: i32) -> Job {
    let volume = queue_volume_name(listener, ordinal);
    let mut template = stateful_set.spec.template.clone();
    let mut labels = owned_meta(listener, String::new(), "volume-drain")
        .labels
        .unwrap_or_default();
    labels.insert(labels::NAME.to_owned(), VOLUME_DRAIN_NAME.to_owned());
    labels.insert(DRAINS_VOLUME_LABEL.to_owned(), volume.clone());
    template.metadata = Some(ObjectMeta {
        labels: Some(labels),
        ..ObjectMeta::default()
    });
    if let Some(pod) = template.spec.as_mut() {
        pod.restart_policy = Some("OnFailure".to_owned());
        for container in &mut pod.containers {
            // Draining makes it unready on purpose; nothing routes to it anyway.
            container.readiness_probe = None;
        }
        pod.volumes.get_or_insert_with(Vec::new).push(Volume {
            name: QUEUE_VOLUME.to_owned(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: volume,
                read_only: None,
            }),
            ..Volume::default()
        });
    }
    Job {
        metadata: owned_meta(
            listener,
            volume_drain_job_name(listener, ordinal),
            "volume-drain",
        ),
        spec: Some(JobSpec {
            backoff_limit: Some(VOLUME_DRAIN_BACKOFF_LIMIT),
            template,
            ..JobSpec::default()
        }),
        ..Job::default()
    }
}

fn app_protocol(kind: ListenerPortKind) -> &'static str {
    match kind {
        ListenerPortKind::Smtp => "smtp",
        ListenerPortKind::Submission => "submission",
        ListenerPortKind::Smtps => "submissions",
    }
}

/// The listener Service (type from the SmtpListener) and the headless governing Service.
pub fn services(listener: &SmtpListener) -> Vec<Service> {
    let spec = &listener.spec;
    let ports: Vec<ServicePort> = spec
        .ports
        .iter()
        .map(|p| ServicePort {
            name: Some(p.name.clone()),
            port: p.port,
            target_port: Some(IntOrString::String(p.name.clone())),
            protocol: Some("TCP".to_owned()),
            app_protocol: Some(app_protocol(p.kind).to_owned()),
            ..ServicePort::default()
        })
        .collect();
    let external = spec.service.type_ != "ClusterIP";
    let mut main_meta = owned_meta(listener, listener.name_any(), "mta");
    if !spec.service.annotations.is_empty() {
        main_meta.annotations = Some(spec.service.annotations.clone());
    }
    let main = Service {
        metadata: main_meta,
        spec: Some(ServiceSpec {
            type_: Some(spec.service.type_.clone()),
            selector: Some(selector_labels(listener)),
            ports: Some(ports.clone()),
            external_traffic_policy: external.then(|| spec.service.external_traffic_policy.clone()),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    };
    let headless = Service {
        metadata: owned_meta(listener, headless_service_name(listener), "mta"),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".to_owned()),
            selector: Some(selector_labels(listener)),
            ports: Some(ports),
            // The StatefulSet's governing Service: it gives each pod its DNS name,
            // Ready or not. Nothing is handed over through it: a draining pod gets its
            // peers' addresses from the operator, which lists the pods.
            publish_not_ready_addresses: Some(true),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    };
    vec![main, headless]
}

/// At most one MTA pod down at a time for voluntary disruptions.
pub fn pdb(listener: &SmtpListener) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: owned_meta(listener, listener.name_any(), "mta"),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(listener)),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    }
}

/// The HorizontalPodAutoscaler, when autoscaling is configured.
pub fn hpa(listener: &SmtpListener) -> Option<HorizontalPodAutoscaler> {
    let autoscaling = listener.spec.autoscaling.as_ref()?;
    Some(HorizontalPodAutoscaler {
        metadata: owned_meta(listener, listener.name_any(), "mta"),
        spec: HorizontalPodAutoscalerSpec {
            // The SmtpListener's scale subresource, not the StatefulSet: every scale-in goes
            // through the operator, which drains the pods leaving first.
            scale_target_ref: CrossVersionObjectReference {
                api_version: Some("mail.petrel.dev/v1alpha1".to_owned()),
                kind: "SmtpListener".to_owned(),
                name: listener.name_any(),
            },
            min_replicas: Some(autoscaling.min_replicas),
            max_replicas: autoscaling.max_replicas,
            metrics: Some(vec![MetricSpec {
                type_: "Resource".to_owned(),
                resource: Some(ResourceMetricSource {
                    name: "cpu".to_owned(),
                    target: MetricTarget {
                        type_: "Utilization".to_owned(),
                        average_utilization: Some(autoscaling.target_cpu_utilization_percentage),
                        ..MetricTarget::default()
                    },
                }),
                ..MetricSpec::default()
            }]),
            ..HorizontalPodAutoscalerSpec::default()
        },
        ..HorizontalPodAutoscaler::default()
    })
}
