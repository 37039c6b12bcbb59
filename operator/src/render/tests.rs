//! Golden and property tests of render: every example in `manifests/examples/` renders to
//! the committed YAML under `operator/tests/golden/render/` (a `.actual` file is written
//! next to it on mismatch), and the rendered objects keep the invariants the issue names.

use super::*;
use crate::keys::FixedKeys;
use k8s_openapi::api::batch::v1::Job;
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn examples() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("manifests/examples"))
        .expect("examples dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

fn render_paths(paths: &[PathBuf]) -> Desired {
    let world = crate::input::load(paths, "default").expect("examples load");
    render(&world, &mut FixedKeys).expect("examples render")
}

/// Compares `actual` with the golden file `name`; writes `<name>.actual` on mismatch, or
/// overwrites the golden when `PETREL_BLESS=1` (after an intended change, e.g. new
/// MtaConfig fields).
fn golden(name: &str, actual: &str) -> Option<String> {
    let path = repo().join("operator/tests/golden/render").join(name);
    if std::env::var_os("PETREL_BLESS").is_some_and(|v| v == "1") {
        std::fs::write(&path, actual).expect("bless golden");
        return None;
    }
    let expected = std::fs::read_to_string(&path).ok();
    let actual_path = path.with_extension("yaml.actual");
    if expected.as_deref() == Some(actual) {
        let _ = std::fs::remove_file(&actual_path);
        None
    } else {
        std::fs::write(&actual_path, actual).expect("write .actual");
        Some(name.to_owned())
    }
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .expect("file name")
        .to_string_lossy()
        .into_owned()
}

#[test]
fn every_example_renders_to_its_golden_yaml() {
    let mut differ = Vec::new();
    for example in examples() {
        let yaml = to_yaml(&render_paths(std::slice::from_ref(&example))).expect("yaml");
        differ.extend(golden(&file_name(&example), &yaml));
    }
    let all = to_yaml(&render_paths(&[repo().join("manifests/examples")])).expect("yaml");
    differ.extend(golden("all-examples.yaml", &all));
    assert!(
        differ.is_empty(),
        "rendered YAML differs from golden files {differ:?}; inspect the .actual files and copy them over the goldens if the change is intended"
    );
}

#[test]
fn rendered_configs_pass_the_mtas_own_validation_and_parse_back() {
    let desired = render_paths(&[repo().join("manifests/examples")]);
    assert_eq!(desired.configs.len(), 2, "one config per SmtpListener");
    for (listener, config) in &desired.configs {
        config.validate().expect("valid");
        let reparsed = ::mta_config::MtaConfig::from_yaml(&config.to_yaml()).expect("parses");
        assert_eq!(&reparsed, config, "{listener}");
    }
}

#[test]
fn statefulset_is_restricted_probed_and_has_a_queue_claim_per_pod() {
    let desired = render_paths(&[repo().join("manifests/examples/01-smtplistener.yaml")]);
    let sts = desired
        .objects
        .iter()
        .find_map(|o| match o {
            Object::StatefulSet(s) => Some(s),
            _ => None,
        })
        .expect("a StatefulSet");
    assert_eq!(sts.spec.replicas, Some(2));
    let claims = sts.spec.volume_claim_templates.as_ref().expect("claims");
    assert_eq!(claims[0].metadata.name.as_deref(), Some("queue"));
    let pod = sts.spec.template.spec.as_ref().expect("pod spec");
    assert_eq!(pod.automount_service_account_token, Some(false));
    let c = &pod.containers[0];
    let sc = c.security_context.as_ref().expect("securityContext");
    assert_eq!(sc.run_as_non_root, Some(true));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(
        sc.capabilities.as_ref().and_then(|c| c.drop.clone()),
        Some(vec!["ALL".to_owned()])
    );
    assert!(c.liveness_probe.is_some() && c.readiness_probe.is_some());
    let ports: Vec<i32> = c.ports.iter().flatten().map(|p| p.container_port).collect();
    assert_eq!(
        ports,
        vec![10025, 10587, 8080],
        "unprivileged container ports"
    );
    assert!(
        sts.spec
            .template
            .metadata
            .as_ref()
            .and_then(|m| m.annotations.as_ref())
            .is_none(),
        "no config checksum on the pod template: a config change must not roll the pods"
    );
}

#[test]
fn hot_reloadable_changes_leave_the_pod_template_alone() {
    let base = repo().join("manifests/examples/01-smtplistener.yaml");
    let template = |d: &Desired| {
        d.objects.iter().find_map(|o| match o {
            Object::StatefulSet(s) => Some(serde_json::to_value(&s.spec.template).unwrap()),
            _ => None,
        })
    };
    let config = |d: &Desired| d.configs.get("mx").map(|c| c.to_yaml());
    let one = render_paths(std::slice::from_ref(&base));
    let with_domain = render_paths(&[
        base.clone(),
        repo().join("manifests/examples/02-maildomain.yaml"),
        repo().join("manifests/examples/03-dkimkey.yaml"),
    ]);
    assert_ne!(config(&one), config(&with_domain), "the config changes");
    assert_eq!(template(&one), template(&with_domain), "the pods do not");
}

#[test]
fn the_operator_wide_mta_image_applies_unless_the_listener_names_one() {
    let base = repo().join("manifests/examples/01-smtplistener.yaml");
    let mut world = crate::input::load(std::slice::from_ref(&base), "default").unwrap();
    let image = |world: &World| {
        let desired = render(world, &mut FixedKeys).unwrap();
        desired.objects.iter().find_map(|o| match o {
            Object::StatefulSet(s) => s.spec.template.spec.as_ref()?.containers[0].image.clone(),
            _ => None,
        })
    };
    assert_eq!(image(&world).as_deref(), Some(workload::DEFAULT_IMAGE));
    world.mta_image = Some("registry.example/petrel-mta:dev".into());
    assert_eq!(
        image(&world).as_deref(),
        Some("registry.example/petrel-mta:dev")
    );
    world.listeners[0].spec.image = Some("mine:1".into());
    assert_eq!(image(&world).as_deref(), Some("mine:1"));
}

#[test]
fn existing_secrets_are_reused_instead_of_regenerated() {
    let mut world =
        crate::input::load(&[repo().join("manifests/examples")], "default").expect("load");
    let first = render(&world, &mut crate::keys::SystemKeys).expect("render");
    for object in &first.objects {
        if let Object::Secret(s) = object {
            world.secrets.push(s.clone());
        }
    }
    let second = render(&world, &mut crate::keys::SystemKeys).expect("render");
    assert_eq!(first.objects, second.objects, "same keys, same objects");
}

#[test]
fn lmtp_domains_and_relay_policies_reach_the_mta_config() {
    let mut world =
        crate::input::load(&[repo().join("manifests/examples")], "default").expect("load");
    world.domains[0].spec.delivery =
        serde_json::from_value(serde_json::json!({"lmtp": {"host": "dovecot.mail.svc"}}))
            .expect("delivery");
    let desired = render(&world, &mut FixedKeys).expect("render");
    let config = desired.configs.values().next().expect("a config");
    assert!(config.local_domains.iter().any(|d| d.delivery
        == ::mta_config::LocalDelivery::Lmtp {
            address: "dovecot.mail.svc:24".into()
        }));
    assert!(
        config
            .relay
            .client_networks
            .iter()
            .any(|n| n.to_string() == "10.0.0.0/8")
    );
    assert_eq!(
        config.smtpd.auth_users_file.as_deref(),
        Some(std::path::Path::new("/etc/petrel/auth/users"))
    );
    assert_eq!(config.smtpd.rate_limits.messages_per_user, "500/1h");
}

#[test]
fn submission_without_authentication_is_not_opened_and_says_why() {
    let world = crate::input::load(
        &[repo().join("manifests/examples/01-smtplistener.yaml")],
        "default",
    )
    .expect("load");
    let desired = render(&world, &mut FixedKeys).expect("render");
    let config = desired.configs.values().next().expect("a config");
    assert!(
        config
            .listeners
            .iter()
            .all(|l| l.kind == ::mta_config::ListenerKind::Smtp)
    );
    assert!(desired.notes.iter().any(|n| n.reason == "NoAuthentication"));
}

#[test]
fn an_invalid_config_is_refused_with_the_mtas_message() {
    let mut world = crate::input::load(
        &[repo().join("manifests/examples/01-smtplistener.yaml")],
        "default",
    )
    .expect("load");
    // Two ports that map to the same container port: the MTA would refuse this config.
    world.listeners[0].spec.ports[1].port = 25;
    world.listeners[0].spec.ports[1].kind = crds::smtp_listener::ListenerPortKind::Smtp;
    let err = render(&world, &mut FixedKeys).expect_err("must refuse");
    assert!(
        err.to_string().contains("is used by another listener"),
        "{err}"
    );
}

/// A MailDomain's dkimKeyRef signs only once its key is Active (as the rotation records
/// it on the key's Secret): before that the config has no key and the domain says why;
/// after, the key file is the active selector's copy in the listener's DKIM Secret. The
/// next key, staged, is loaded without signing.
/// A shared Redis for the rate limits reaches the config, with the fleet's size for the
/// share each pod falls back to.
#[test]
fn shared_rate_limits_follow_the_fleet_size() {
    let mut world =
        crate::input::load(&[repo().join("manifests/examples")], "default").expect("load");
    let mx = world
        .listeners
        .iter_mut()
        .find(|l| l.metadata.name.as_deref() == Some("mx"))
        .expect("mx");
    mx.spec.limits.shared_rate_limits_redis = Some("redis://petrel-redis:6379/0".into());
    mx.spec.replicas = 3;
    let desired = render(&world, &mut FixedKeys).expect("render");
    let redis = desired.configs["mx"]
        .smtpd
        .rate_limits
        .redis
        .clone()
        .expect("redis");
    assert_eq!(redis.url, "redis://petrel-redis:6379/0");
    assert_eq!(redis.fleet_size, 3);
    assert!(
        desired.configs["submission"]
            .smtpd
            .rate_limits
            .redis
            .is_none()
    );
}

#[test]
fn dkim_key_signs_only_once_active() {
    use crate::render::dkim::{self, SlotPlan, SlotState};
    use crds::DkimKeyPhase;
    let mut world =
        crate::input::load(&[repo().join("manifests/examples")], "default").expect("load");
    let desired = render(&world, &mut FixedKeys).expect("render");
    let config = desired.configs.values().next().expect("a config");
    assert!(config.dkim.keys.is_empty(), "Generated: nothing signs");
    assert!(
        desired
            .notes
            .iter()
            .any(|n| n.reason == "DkimKeyNotActive" && n.name == "example-com")
    );
    let key = world.dkim_keys[0].clone();
    let generated = desired
        .objects
        .iter()
        .find_map(|o| match o {
            Object::Secret(s)
                if s.metadata.name.as_deref() == Some("example-com-ed25519-petrel-a") =>
            {
                Some(s.clone())
            }
            _ => None,
        })
        .expect("the first key, in slot a");
    assert_eq!(
        dkim::read_state(&generated).map(|s| s.phase),
        Some(DkimKeyPhase::Generated)
    );
    let private = generated.data.as_ref().unwrap()[dkim::DKIM_PRIVATE_KEY].clone();
    world.secrets.push(generated);

    // The rotation makes a Active and stages a new key in b.
    let ns = world.in_namespace("mail");
    let plans = [
        SlotPlan {
            state: Some(SlotState::entered(DkimKeyPhase::Active, 100)),
            fresh: false,
        },
        SlotPlan {
            state: Some(SlotState {
                staged: true,
                ..SlotState::entered(DkimKeyPhase::Published, 100)
            }),
            fresh: true,
        },
    ];
    let written = dkim::slot_secrets(&key, &ns, &plans, &mut FixedKeys).expect("slots");
    world.secrets.retain(|s| {
        !s.metadata
            .name
            .as_deref()
            .unwrap_or_default()
            .starts_with("example-com-ed25519-")
    });
    for object in written {
        if let Object::Secret(s) = object {
            world.secrets.push(s);
        }
    }
    let desired = render(&world, &mut FixedKeys).expect("render");
    let config = desired.configs.get("mx").expect("mx config");
    let expected = vec![
        ::mta_config::DkimKeyConfig {
            domain: "example.com".into(),
            selector: "petrel-a".into(),
            key_file: "/etc/petrel/dkim/example-com-ed25519-petrel-a.pem".into(),
            sign: true,
        },
        ::mta_config::DkimKeyConfig {
            domain: "example.com".into(),
            selector: "petrel-b".into(),
            key_file: "/etc/petrel/dkim/example-com-ed25519-petrel-b.pem".into(),
            sign: false,
        },
    ];
    assert_eq!(config.dkim.keys, expected);
    let copy = desired.objects.iter().find_map(|o| match o {
        Object::Secret(s) if s.metadata.name.as_deref() == Some("mx-dkim") => s.data.clone(),
        _ => None,
    });
    let copy = copy.expect("listener DKIM Secret");
    assert_eq!(
        copy.get("example-com-ed25519-petrel-a.pem"),
        Some(&private),
        "the listener's DKIM Secret holds the active key"
    );
    assert!(
        copy.contains_key("example-com-ed25519-petrel-b.pem"),
        "and the staged one"
    );
    let mounted = desired.objects.iter().any(|o| match o {
        Object::StatefulSet(s) if s.metadata.name.as_deref() == Some("mx") => {
            let json = serde_json::to_string(s).expect("json");
            json.contains("\"secretName\":\"mx-dkim\"")
                && json.contains("\"mountPath\":\"/etc/petrel/dkim\"")
        }
        _ => false,
    });
    assert!(
        mounted,
        "the listener's DKIM Secret is mounted at the key directory"
    );
    assert!(!desired.notes.iter().any(|n| n.reason == "DkimKeyNotActive"));
}

/// A smarthost route with a credentials Secret: the config reads user name and password
/// from the Secret's mount, and the StatefulSet mounts it there.
#[test]
fn smarthost_credentials_are_mounted_and_named_in_the_route() {
    let mut world =
        crate::input::load(&[repo().join("manifests/examples")], "default").expect("load");
    world.relay_policies[0].spec.route = serde_json::from_value(serde_json::json!({
        "mode": "Smarthost",
        "smarthost": {"host": "relay.example.net", "port": 587, "credentialsSecret": "relay-creds"}
    }))
    .expect("route");
    let desired = render(&world, &mut FixedKeys).expect("render");
    let config = desired.configs.values().next().expect("a config");
    let route = config.routes.first().expect("a route");
    assert_eq!(route.smarthost.as_deref(), Some("relay.example.net:587"));
    assert_eq!(
        route.auth,
        Some(::mta_config::RouteAuth {
            username: String::new(),
            username_file: Some("/etc/petrel/smarthost/username".into()),
            password_file: "/etc/petrel/smarthost/password".into(),
        })
    );
    config.validate().expect("the MTA accepts it");
    let set = desired
        .objects
        .iter()
        .find_map(|o| match o {
            Object::StatefulSet(s) => Some(serde_json::to_value(s).expect("json")),
            _ => None,
        })
        .expect("a StatefulSet");
    let volumes = set["spec"]["template"]["spec"]["volumes"].to_string();
    assert!(
        volumes.contains(r#""secretName":"relay-creds""#),
        "{volumes}"
    );
    let mounts = set["spec"]["template"]["spec"]["containers"][0]["volumeMounts"].to_string();
    assert!(mounts.contains("/etc/petrel/smarthost"), "{mounts}");
    assert!(
        !desired
            .notes
            .iter()
            .any(|n| n.message.contains("credentialsSecret"))
    );
}

#[test]
fn proxy_protocol_reaches_every_listener_of_the_mta_config() {
    let mut world = crate::input::load(
        &[repo().join("manifests/examples/05-autoscaled-submission.yaml")],
        "default",
    )
    .expect("load");
    let plain = render(&world, &mut FixedKeys).expect("render");
    world.listeners[0].spec.proxy_protocol = true;
    let desired = render(&world, &mut FixedKeys).expect("render");
    let config = desired.configs.values().next().expect("a config");
    assert!(!config.listeners.is_empty());
    assert!(config.listeners.iter().all(|l| l.proxy_protocol));
    assert!(
        config
            .listeners
            .iter()
            .all(|l| l.proxy_trusted_networks.is_none()),
        "any sender: the SmtpListener names no balancer addresses"
    );
    assert!(config.to_yaml().contains("proxy_protocol: true"));
    assert_eq!(
        desired.notes, plain.notes,
        "no 'not yet supported' note any more"
    );
    let off = plain.configs.values().next().expect("a config");
    assert!(off.listeners.iter().all(|l| !l.proxy_protocol));
}

/// A real self-signed certificate for `hostname` expiring `days` from `now`, valid for a
/// year (as the operator's own).
fn certificate(hostname: &str, now: i64, days: i64) -> (String, String) {
    let mut params = rcgen::CertificateParams::new(vec![hostname.to_owned()]).unwrap();
    let at = |secs: i64| {
        let t = k8s_openapi::jiff::Timestamp::from_second(secs)
            .unwrap()
            .to_zoned(k8s_openapi::jiff::tz::TimeZone::UTC);
        rcgen::date_time_ymd(
            i32::from(t.year()),
            t.month().unsigned_abs(),
            t.day().unsigned_abs(),
        )
    };
    params.not_before = at(now + (days - 365) * 86_400);
    params.not_after = at(now + days * 86_400);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// The self-signed certificate is kept while it is good, and replaced (the one planned
/// rotation of listener_tls) within 30 days of expiry or when the hostname changed; the
/// offline render (no clock) keeps whatever it is given.
#[test]
fn self_signed_certificates_are_renewed_before_expiry() {
    use k8s_openapi::ByteString;
    let now = 1_800_000_000;
    let mut world = crate::input::load(
        &[repo().join("manifests/examples/01-smtplistener.yaml")],
        "default",
    )
    .unwrap();
    let listener = world.listeners[0].clone();
    let tls_of = |world: &World| {
        let part = render_listener(&listener, world, &mut FixedKeys).expect("render");
        part.objects
            .iter()
            .find_map(|o| match o {
                Object::Secret(s) if s.metadata.name.as_deref() == Some("mx-tls") => {
                    s.data.as_ref()?.get("tls.crt").cloned()
                }
                _ => None,
            })
            .expect("tls secret")
    };
    let secret_with = |crt: &str, key: &str| k8s_openapi::api::core::v1::Secret {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some("mx-tls".into()),
            namespace: Some("mail".into()),
            ..Default::default()
        },
        data: Some(std::collections::BTreeMap::from([
            ("tls.crt".to_owned(), ByteString(crt.as_bytes().to_vec())),
            ("tls.key".to_owned(), ByteString(key.as_bytes().to_vec())),
        ])),
        ..Default::default()
    };
    let fresh = FixedKeys.tls("mx.example.com").unwrap().cert_pem;
    // (hostname on the certificate, days left, clock?, kept?)
    let cases = [
        ("mx.example.com", 200, true, true),
        ("mx.example.com", 10, true, false),
        ("mx.example.com", -5, true, false),
        ("old.example.com", 200, true, false),
        ("mx.example.com", 10, false, true),
    ];
    for (host, days, clock, kept) in cases {
        let (crt, key) = certificate(host, now, days);
        world.secrets = vec![secret_with(&crt, &key)];
        world.now = clock.then_some(now);
        let got = tls_of(&world);
        let expected = if kept {
            crt.as_bytes()
        } else {
            fresh.as_bytes()
        };
        assert_eq!(got.0, expected, "{host} {days} days, clock {clock}");
    }
    let (crt, _) = certificate("mx.example.com", now, 200);
    let facts = secrets::certificate_facts(crt.as_bytes()).expect("parses");
    assert_eq!(facts.dns_names, vec!["mx.example.com".to_owned()]);
    assert!((facts.not_after - (now + 200 * 86_400)).abs() < 2 * 86_400);
}

#[test]
fn a_volume_left_behind_gets_a_drain_job_that_no_selector_matches() {
    let mut world =
        crate::input::load(&[repo().join("manifests/examples")], "default").expect("load");
    world.volume_drains.insert("mx".into(), vec![3]);
    let desired = render(&world, &mut FixedKeys).expect("render");
    let jobs: Vec<&Job> = desired
        .objects
        .iter()
        .filter_map(|o| match o {
            Object::Job(j) => Some(j),
            _ => None,
        })
        .collect();
    assert_eq!(jobs.len(), 1, "one Job, for mx's volume 3 only");
    let job = jobs[0];
    assert_eq!(job.metadata.name.as_deref(), Some("mx-drain-3"));
    let sts = desired
        .objects
        .iter()
        .find_map(|o| match o {
            Object::StatefulSet(s) if s.metadata.name.as_deref() == Some("mx") => Some(s),
            _ => None,
        })
        .expect("mx's StatefulSet");
    let spec = job.spec.as_ref().expect("job spec");
    let pod_labels = spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .expect("pod labels");
    // Neither the Services, the PDB nor the StatefulSet select it: it takes no mail and
    // is nobody's peer.
    let selector = workload::selector_labels(&world.listeners[0]);
    let selects_it =
        |sel: &BTreeMap<String, String>| sel.iter().all(|(k, v)| pod_labels.get(k) == Some(v));
    assert!(!selects_it(&selector));
    for svc in desired.objects.iter().filter_map(|o| match o {
        Object::Service(s) => Some(s),
        _ => None,
    }) {
        let sel = svc
            .spec
            .as_ref()
            .and_then(|s| s.selector.clone())
            .unwrap_or_default();
        assert!(
            !selects_it(&sel),
            "Service {:?} selects the drain Job",
            svc.metadata.name
        );
    }
    assert_eq!(
        pod_labels
            .get(workload::DRAINS_VOLUME_LABEL)
            .map(String::as_str),
        Some("queue-mx-3")
    );
    // The pods' own container, on that volume, where the pods mount theirs.
    let pod = spec.template.spec.as_ref().expect("pod spec");
    let sts_pod = sts.spec.template.spec.as_ref().expect("sts pod spec");
    assert_eq!(pod.containers[0].image, sts_pod.containers[0].image);
    assert_eq!(pod.containers[0].args, sts_pod.containers[0].args);
    assert_eq!(
        pod.containers[0].volume_mounts,
        sts_pod.containers[0].volume_mounts
    );
    let claim = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == workload::QUEUE_VOLUME)
        .and_then(|v| v.persistent_volume_claim.as_ref())
        .expect("the queue volume");
    assert_eq!(claim.claim_name, "queue-mx-3");
    assert_eq!(pod.restart_policy.as_deref(), Some("OnFailure"));
    assert_eq!(pod.automount_service_account_token, Some(false));
}

#[test]
fn relay_policy_outbound_tls_dane_reaches_the_mta_config() {
    let mut world =
        crate::input::load(&[repo().join("manifests/examples")], "default").expect("load");
    let desired = render(&world, &mut FixedKeys).expect("render");
    assert!(
        desired.configs["mx"].smtp_client.dane,
        "DANE is on by default"
    );
    for policy in &mut world.relay_policies {
        policy.spec.outbound_tls.dane = false;
    }
    let desired = render(&world, &mut FixedKeys).expect("render");
    assert!(!desired.configs["mx"].smtp_client.dane);
    assert!(
        desired.notes.iter().all(|n| !n.message.contains("dane")),
        "no 'not enforced yet' note: {:?}",
        desired.notes
    );
}

/// Issue 17: a RelayPolicy's outboundShaping becomes queue.site_limits and queue.sites;
/// a site's limits start from the policy's defaults.
#[test]
fn relay_policy_outbound_shaping_reaches_the_mta_config() {
    let mut world =
        crate::input::load(&[repo().join("manifests/examples")], "default").expect("load");
    let desired = render(&world, &mut FixedKeys).expect("render");
    assert_eq!(
        desired.configs["mx"].queue.site_limits,
        ::mta_config::SiteLimits::default()
    );
    assert!(desired.configs["mx"].queue.sites.is_empty());
    let shaping: crds::relay_policy::OutboundShaping = serde_json::from_value(serde_json::json!({
        "defaults": {"maxConnections": 10, "recoveryInterval": "5s"},
        "sites": [{
            "name": "bigmail",
            "mx": ["*.mail.example"],
            "limits": {"maxMessageRate": {"messages": 100, "interval": "1m"}, "suspendTime": "2m"}
        }]
    }))
    .expect("shaping");
    for policy in &mut world.relay_policies {
        policy.spec.outbound_shaping = Some(shaping.clone());
    }
    let desired = render(&world, &mut FixedKeys).expect("render");
    let queue = &desired.configs["mx"].queue;
    assert_eq!(queue.site_limits.max_connections, 10);
    assert_eq!(queue.site_limits.recovery_interval.as_secs(), 5);
    assert_eq!(queue.site_limits.max_message_rate, "off");
    let site = &queue.sites[0];
    assert_eq!(
        (site.name.as_str(), site.mx.as_slice()),
        ("bigmail", &["*.mail.example".to_owned()][..])
    );
    let limits = site.limits.as_ref().expect("limits");
    assert_eq!(limits.max_connections, 10, "from the defaults");
    assert_eq!(limits.max_message_rate, "100/1m");
    assert_eq!(limits.suspend_time.as_secs(), 120);
    desired.configs["mx"].validate().expect("the MTA takes it");
}
