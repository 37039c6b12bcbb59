//! Reconcile scenarios against the fake API server: apply, status update, idempotence
//! (a second reconcile of an unchanged world writes nothing), prune, a config change, and
//! the error path with backoff.

use super::dkim_key::reconcile as dkim_key;
use super::mail_domain::reconcile as mail_domain;
use super::relay_policy::reconcile as relay_policy;
use super::smtp_listener::reconcile as listener;
use super::*;
use crate::fixtures::{FakeApi, examples, object_path};
use crds::SmtpListener;
use serde_json::Value;

const NS: &str = "/namespaces/mail";

fn seeded() -> (FakeApi, Arc<Context>) {
    let (fake, ctx) = FakeApi::start();
    for example in examples() {
        fake.seed(example);
    }
    // The Secrets the examples name and a user provides.
    for name in ["mail-users", "smtp-example-com-tls"] {
        fake.seed(serde_json::json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": name, "namespace": "mail"}, "data": {}}));
    }
    (fake, ctx)
}

fn typed<K: DeserializeOwned>(fake: &FakeApi, path: &str) -> Arc<K> {
    Arc::new(serde_json::from_value(fake.get(path).expect("stored")).expect("typed"))
}

/// The condition of `type_` in a stored object's status.
fn condition(status: &Value, type_: &str) -> Value {
    status["conditions"]
        .as_array()
        .expect("conditions")
        .iter()
        .find(|c| c["type"] == type_)
        .cloned()
        .expect("condition")
}

fn listener_path() -> String {
    format!("/apis/mail.petrel.dev/v1alpha1{NS}/smtplisteners/mx")
}

#[tokio::test]
async fn listener_apply_writes_objects_status_and_an_event_then_nothing() {
    let (fake, ctx) = seeded();
    let mx: Arc<SmtpListener> = typed(&fake, &listener_path());
    let action = listener(mx, ctx.clone()).await.expect("reconciles");
    assert_eq!(action, Action::requeue(std::time::Duration::from_secs(30)));
    let writes = fake.take_writes();
    for expected in [
        format!("PATCH /api/v1{NS}/configmaps/mx-config"),
        format!("PATCH /api/v1{NS}/secrets/mx-tls"),
        format!("PATCH /api/v1{NS}/secrets/mx-dkim"),
        format!("PATCH /api/v1{NS}/secrets/mx-fleet"),
        format!("PATCH /apis/apps/v1{NS}/statefulsets/mx"),
        format!("PATCH /api/v1{NS}/services/mx"),
        format!("PATCH /api/v1{NS}/services/mx-headless"),
        format!("PATCH /apis/policy/v1{NS}/poddisruptionbudgets/mx"),
        format!("PATCH {}/status", listener_path()),
        format!("POST /apis/events.k8s.io/v1{NS}/events"),
    ] {
        assert!(
            writes.contains(&expected),
            "missing {expected} in {writes:#?}"
        );
    }
    assert_eq!(writes.len(), 10, "{writes:#?}");

    // Owner reference, labels and the rendered config landed.
    let cm = fake
        .get(&format!("/api/v1{NS}/configmaps/mx-config"))
        .unwrap();
    let listener_uid = fake.get(&listener_path()).unwrap()["metadata"]["uid"].clone();
    assert_eq!(cm["metadata"]["ownerReferences"][0]["uid"], listener_uid);
    assert_eq!(cm["metadata"]["ownerReferences"][0]["controller"], true);
    assert_eq!(
        cm["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "petrel-operator"
    );
    assert!(
        cm["data"]["mta.yaml"]
            .as_str()
            .unwrap()
            .contains("name: example.com")
    );

    // Status: observedGeneration, conditions, replicas.
    let status = &fake.get(&listener_path()).unwrap()["status"];
    assert_eq!(status["observedGeneration"], 1);
    assert_eq!(status["desiredReplicas"], 2);
    let not_after = status["certificateNotAfter"]
        .as_str()
        .expect("certificate expiry");
    assert!(not_after.starts_with("20"), "RFC 3339: {not_after}");
    let ready = condition(status, "Ready");
    assert_eq!(ready["status"], "False");
    assert_eq!(ready["reason"], "RollingOut");
    assert_eq!(ready["observedGeneration"], 1);

    // Second reconcile of the unchanged world (as the watch would deliver it): no writes.
    let mx: Arc<SmtpListener> = typed(&fake, &listener_path());
    listener(mx, ctx).await.expect("reconciles again");
    assert_eq!(fake.take_writes(), Vec::<String>::new());
}

#[tokio::test]
async fn prune_deletes_only_our_stale_objects() {
    let (fake, ctx) = seeded();
    let ours = serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {
        "name": "mx-old", "namespace": "mail", "labels": {
            "app.kubernetes.io/managed-by": "petrel-operator",
            "app.kubernetes.io/instance": "mx",
            "mail.petrel.dev/owner-kind": "SmtpListener"}}, "data": {}});
    let theirs = serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {
        "name": "mx-notes", "namespace": "mail", "labels": {"app.kubernetes.io/instance": "mx"}}});
    let other_listener = serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {
        "name": "submission-config", "namespace": "mail", "labels": {
            "app.kubernetes.io/managed-by": "petrel-operator",
            "app.kubernetes.io/instance": "submission",
            "mail.petrel.dev/owner-kind": "SmtpListener"}}});
    for o in [&ours, &theirs, &other_listener] {
        fake.seed(o.clone());
    }
    let mx: Arc<SmtpListener> = typed(&fake, &listener_path());
    listener(mx, ctx).await.expect("reconciles");
    let deletes: Vec<String> = fake
        .take_writes()
        .into_iter()
        .filter(|w| w.starts_with("DELETE"))
        .collect();
    assert_eq!(
        deletes,
        vec![format!("DELETE /api/v1{NS}/configmaps/mx-old")]
    );
    assert!(fake.get(&object_path(&theirs)).is_some());
    assert!(fake.get(&object_path(&other_listener)).is_some());
}

#[tokio::test]
async fn a_spec_change_reapplies_only_what_it_changes() {
    let (fake, ctx) = seeded();
    let mx: Arc<SmtpListener> = typed(&fake, &listener_path());
    listener(mx, ctx.clone()).await.expect("reconciles");
    fake.take_writes();
    let mut changed: Value = fake.get(&listener_path()).unwrap();
    changed["spec"]["limits"]["maxRecipients"] = 50.into();
    changed["metadata"]["generation"] = 2.into();
    fake.seed(changed);
    let mx: Arc<SmtpListener> = typed(&fake, &listener_path());
    listener(mx, ctx).await.expect("reconciles");
    let writes = fake.take_writes();
    let (events, objects): (Vec<String>, Vec<String>) =
        writes.into_iter().partition(|w| w.contains("/events"));
    assert_eq!(
        objects,
        vec![
            format!("PATCH /api/v1{NS}/configmaps/mx-config"),
            format!("PATCH {}/status", listener_path()),
        ],
        "only the config changes: the MTA hot-reloads it, so the pod template stays"
    );
    assert_eq!(
        events.len(),
        1,
        "one Applied event (the recorder may patch its series)"
    );
    assert_eq!(
        fake.get(&listener_path()).unwrap()["status"]["observedGeneration"],
        2
    );
}

#[tokio::test]
async fn api_errors_mark_the_resource_degraded_and_back_off() {
    let (fake, ctx) = seeded();
    fake.fail_patches
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let mx: Arc<SmtpListener> = typed(&fake, &listener_path());
    let err = listener(mx.clone(), ctx.clone())
        .await
        .expect_err("must fail");
    assert_eq!(err.metric_label(), "KubeApiError");
    let metrics = ctx.metrics.encode();
    assert!(
        metrics.contains(
            "petrel_operator_reconcile_failures_total{kind=\"SmtpListener\",error=\"KubeApiError\"} 1"
        ),
        "{metrics}"
    );
    assert!(metrics.contains("petrel_operator_reconcile_runs_total{kind=\"SmtpListener\"} 1"));
    let writes = fake.take_writes();
    assert!(
        writes.contains(&format!("PATCH {}/status", listener_path())),
        "tried to record Degraded: {writes:#?}"
    );
    assert!(
        writes.contains(&format!("POST /apis/events.k8s.io/v1{NS}/events")),
        "warning event: {writes:#?}"
    );
    assert_eq!(
        error_policy(mx.clone(), &err, ctx.clone()),
        Action::requeue(Duration::from_secs(5))
    );
    assert_eq!(
        error_policy(mx.clone(), &err, ctx.clone()),
        Action::requeue(Duration::from_secs(10))
    );

    // Once the API recovers, Degraded status is written and failures are forgotten.
    fake.fail_patches
        .store(false, std::sync::atomic::Ordering::SeqCst);
    listener(mx.clone(), ctx.clone()).await.expect("recovers");
    assert_eq!(
        error_policy(mx, &err, ctx),
        Action::requeue(Duration::from_secs(5))
    );
}

#[tokio::test]
async fn degraded_condition_names_the_error() {
    let (fake, ctx) = seeded();
    // An SmtpListener whose ports collide after mapping: the MTA's validation refuses it.
    let mut bad: Value = fake.get(&listener_path()).unwrap();
    bad["spec"]["ports"][1]["port"] = 25.into();
    fake.seed(bad);
    let mx: Arc<SmtpListener> = typed(&fake, &listener_path());
    let err = listener(mx, ctx).await.expect_err("invalid config");
    assert_eq!(err.metric_label(), "RenderFailed");
    let status = &fake.get(&listener_path()).unwrap()["status"];
    let degraded = condition(status, "Degraded");
    assert_eq!(degraded["status"], "True");
    assert_eq!(degraded["reason"], "RenderFailed");
    assert!(
        degraded["message"]
            .as_str()
            .unwrap()
            .contains("is used by another listener")
    );
    assert!(
        fake.get(&format!("/apis/apps/v1{NS}/statefulsets/mx"))
            .is_none(),
        "nothing applied"
    );
}

#[tokio::test]
async fn dkim_key_gets_a_secret_and_a_record_to_publish_then_nothing() {
    let (fake, ctx) = seeded();
    let path = format!("/apis/mail.petrel.dev/v1alpha1{NS}/dkimkeys/example-com-ed25519");
    dkim_key(typed(&fake, &path), ctx.clone())
        .await
        .expect("reconciles");
    let secret = fake
        .get(&format!("/api/v1{NS}/secrets/example-com-ed25519-petrel-a"))
        .expect("secret");
    assert_eq!(
        secret["metadata"]["labels"]["mail.petrel.dev/owner-kind"],
        "DkimKey"
    );
    let status = &fake.get(&path).unwrap()["status"];
    assert_eq!(status["phase"], "Generated");
    assert_eq!(
        status["selectors"][0]["recordName"],
        "petrel-a._domainkey.example.com."
    );
    assert!(
        status["selectors"][0]["recordValue"]
            .as_str()
            .unwrap()
            .starts_with("v=DKIM1; k=ed25519; p=")
    );
    fake.take_writes();
    // The second look knows what the first could not (the new key's record is not
    // checked) and says so; the key itself is not touched.
    dkim_key(typed(&fake, &path), ctx.clone())
        .await
        .expect("again");
    let writes = fake.take_writes();
    assert!(writes.iter().all(|w| w.ends_with("/status")), "{writes:?}");
    let status = &fake.get(&path).unwrap()["status"];
    assert_eq!(condition(status, "Rotation")["reason"], "Waiting");
    dkim_key(typed(&fake, &path), ctx).await.expect("again");
    assert_eq!(
        fake.take_writes(),
        Vec::<String>::new(),
        "key is reused, status unchanged"
    );
}

#[tokio::test]
async fn mail_domain_status_carries_dns_guidance() {
    let (fake, ctx) = seeded();
    let path = format!("/apis/mail.petrel.dev/v1alpha1{NS}/maildomains/example-com");
    mail_domain(typed(&fake, &path), ctx.clone())
        .await
        .expect("reconciles");
    let status = &fake.get(&path).unwrap()["status"];
    let records = status["dns"].as_array().unwrap();
    assert!(
        records
            .iter()
            .any(|r| r["type"] == "MX" && r["value"] == "10 mx.example.com.")
    );
    assert!(records.iter().any(|r| r["name"] == "_dmarc.example.com."));
    assert!(
        status["mtaStsPolicy"]
            .as_str()
            .unwrap()
            .contains("mode: testing")
    );
    let conditions = status["conditions"].as_array().unwrap();
    let dns = conditions.iter().find(|c| c["type"] == "DnsReady").unwrap();
    assert_eq!(dns["reason"], "NotChecked");
    let ready = conditions.iter().find(|c| c["type"] == "Ready").unwrap();
    assert_eq!(
        ready["reason"], "DkimKeyNotActive",
        "the DkimKey's record is not visible yet: nothing is signed"
    );
    fake.take_writes();
    mail_domain(typed(&fake, &path), ctx).await.expect("again");
    assert_eq!(fake.take_writes(), Vec::<String>::new());
}

#[tokio::test]
async fn relay_policy_is_ready_when_all_of_it_takes_effect() {
    let (fake, ctx) = seeded();
    let path = format!("/apis/mail.petrel.dev/v1alpha1{NS}/relaypolicies/internal");
    relay_policy(typed(&fake, &path), ctx)
        .await
        .expect("reconciles");
    let status = &fake.get(&path).unwrap()["status"];
    assert_eq!(status["conditions"][0]["type"], "Ready");
    assert_eq!(status["conditions"][0]["status"], "True");
    assert_eq!(status["conditions"][0]["reason"], "Reconciled");
}

#[test]
fn backoff_doubles_up_to_five_minutes() {
    let secs: Vec<u64> = (1..=9).map(|n| backoff(n).as_secs()).collect();
    assert_eq!(secs, vec![5, 10, 20, 40, 80, 160, 300, 300, 300]);
}

#[tokio::test]
async fn a_users_object_with_our_name_is_never_taken_over() {
    let (fake, ctx) = seeded();
    let theirs = serde_json::json!({"apiVersion": "v1", "kind": "Secret", "metadata": {
        "name": "mx-tls", "namespace": "mail"}, "data": {"tls.crt": "dXNlcg=="}});
    fake.seed(theirs.clone());
    let mx: Arc<SmtpListener> = typed(&fake, &listener_path());
    let err = listener(mx, ctx).await.expect_err("must refuse");
    assert_eq!(err.metric_label(), "ObjectNotOwned");
    assert!(err.to_string().contains("Secret mx-tls"), "{err}");
    let stored = fake.get(&object_path(&theirs)).unwrap();
    assert_eq!(stored["data"], theirs["data"], "untouched");
    assert!(stored["metadata"]["labels"].is_null(), "not relabelled");
}

#[tokio::test]
async fn a_missing_user_secret_applies_nothing_and_names_it() {
    let (fake, ctx) = FakeApi::start();
    for example in examples() {
        fake.seed(example);
    }
    let mx: Arc<SmtpListener> = typed(&fake, &listener_path());
    let action = listener(mx, ctx).await.expect("reconciles");
    assert_eq!(
        action,
        Action::requeue(super::smtp_listener::SECRET_RECHECK)
    );
    let writes = fake.take_writes();
    assert_eq!(
        writes,
        vec![format!("PATCH {}/status", listener_path())],
        "nothing applied"
    );
    let status = &fake.get(&listener_path()).unwrap()["status"];
    let ready = condition(status, "Ready");
    assert_eq!(ready["status"], "False");
    assert_eq!(ready["reason"], "SecretNotFound");
    assert!(
        ready["message"]
            .as_str()
            .unwrap()
            .contains("Secret mail-users (RelayPolicy internal authentication.secretName)"),
        "{ready}"
    );
}

/// A certificate for mx.example.com valid from 2026-01-01 to 2026-04-01 (90 days), PEM,
/// with its key, as a `kubernetes.io/tls` Secret named `name` in `mail`.
fn tls_secret(name: &str) -> Value {
    let mut params = rcgen::CertificateParams::new(vec!["mx.example.com".to_owned()]).unwrap();
    params.not_before = rcgen::date_time_ymd(2026, 1, 1);
    params.not_after = rcgen::date_time_ymd(2026, 4, 1);
    let key = rcgen::KeyPair::generate().unwrap();
    let crt = params.self_signed(&key).unwrap().pem();
    let b64 = |s: String| serde_json::to_value(k8s_openapi::ByteString(s.into_bytes())).unwrap();
    serde_json::json!({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": {"name": name, "namespace": "mail"},
        "data": {"tls.crt": b64(crt), "tls.key": b64(key.serialize_pem())}})
}

fn certificate_path() -> String {
    format!("/apis/cert-manager.io/v1{NS}/certificates/mx")
}

/// `tls.issuerRef`: the Certificate is applied first and the listener waits for
/// cert-manager (with its word on the Certificate); once the Secret is there the pods
/// mount it and the status carries its expiry and renewal time; a second reconcile writes
/// nothing; going back to self-signed prunes the Certificate.
#[tokio::test]
async fn issuer_ref_applies_a_certificate_and_waits_for_its_secret() {
    let (fake, ctx) = seeded();
    let mut mx = fake.get(&listener_path()).unwrap();
    mx["spec"]["tls"] = serde_json::json!({"issuerRef": {"name": "letsencrypt",
        "kind": "ClusterIssuer"}, "renewBefore": "720h"});
    fake.seed(mx.clone());
    let listener_uid = mx["metadata"]["uid"].clone();

    // 1. No Secret yet: only the Certificate, and the listener waits for it.
    let action = listener(typed(&fake, &listener_path()), ctx.clone())
        .await
        .expect("reconciles");
    assert_eq!(
        action,
        Action::requeue(super::smtp_listener::SECRET_RECHECK)
    );
    assert_eq!(
        fake.take_writes(),
        vec![
            format!("PATCH {}", certificate_path()),
            format!("POST /apis/events.k8s.io/v1{NS}/events"),
            format!("PATCH {}/status", listener_path()),
        ]
    );
    let certificate = fake.get(&certificate_path()).expect("Certificate applied");
    assert_eq!(certificate["apiVersion"], "cert-manager.io/v1");
    assert_eq!(certificate["kind"], "Certificate");
    assert_eq!(
        certificate["spec"],
        serde_json::json!({
            "secretName": "mx-issued-tls",
            "dnsNames": ["mx.example.com"],
            "issuerRef": {"name": "letsencrypt", "kind": "ClusterIssuer", "group": "cert-manager.io"},
            "renewBefore": "720h",
            "privateKey": {"rotationPolicy": "Always"},
        })
    );
    assert_eq!(
        certificate["metadata"]["ownerReferences"][0]["uid"],
        listener_uid
    );
    assert_eq!(
        certificate["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "petrel-operator"
    );
    let ready = condition(&fake.get(&listener_path()).unwrap()["status"], "Ready");
    assert_eq!(ready["reason"], "SecretNotFound");
    let message = ready["message"].as_str().unwrap().to_owned();
    assert!(
        message.contains("Secret mx-issued-tls (SmtpListener mx tls.issuerRef"),
        "{message}"
    );

    // cert-manager's word on the Certificate reaches the message.
    let mut certificate = fake.get(&certificate_path()).unwrap();
    certificate["status"] = serde_json::json!({"conditions": [{"type": "Ready",
        "status": "False", "reason": "DoesNotExist",
        "message": "Issuing certificate as Secret does not exist"}]});
    fake.seed(certificate);
    listener(typed(&fake, &listener_path()), ctx.clone())
        .await
        .expect("reconciles");
    assert_eq!(
        fake.take_writes(),
        vec![format!("PATCH {}/status", listener_path())]
    );
    let ready = condition(&fake.get(&listener_path()).unwrap()["status"], "Ready");
    assert!(
        ready["message"].as_str().unwrap().contains(
            "the Certificate is Ready=False (DoesNotExist: Issuing certificate as Secret does not exist)"
        ),
        "{ready}"
    );

    // 2. cert-manager filled the Secret: everything is applied, the pods mount it.
    fake.seed(tls_secret("mx-issued-tls"));
    let action = listener(typed(&fake, &listener_path()), ctx.clone())
        .await
        .expect("reconciles");
    assert_eq!(action, Action::requeue(std::time::Duration::from_secs(30)));
    let writes = fake.take_writes();
    assert!(
        writes.contains(&format!("PATCH /apis/apps/v1{NS}/statefulsets/mx")),
        "{writes:#?}"
    );
    assert!(
        !writes.iter().any(|w| w.contains("secrets/mx-tls")),
        "no self-signed Secret: {writes:#?}"
    );
    let sts = fake
        .get(&format!("/apis/apps/v1{NS}/statefulsets/mx"))
        .unwrap();
    let volumes = sts["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap();
    let tls = volumes.iter().find(|v| v["name"] == "tls").unwrap();
    assert_eq!(tls["secret"]["secretName"], "mx-issued-tls");
    let status = &fake.get(&listener_path()).unwrap()["status"];
    assert_eq!(status["certificateNotAfter"], "2026-04-01T00:00:00Z");
    assert_eq!(status["renewalTime"], "2026-03-02T00:00:00Z", "720h before");

    // 3. Nothing changed: nothing written.
    listener(typed(&fake, &listener_path()), ctx.clone())
        .await
        .expect("reconciles");
    assert_eq!(fake.take_writes(), Vec::<String>::new());

    // 4. Back to self-signed: the Certificate goes, cert-manager's Secret stays (it is
    //    cert-manager's), the operator's own Secret comes.
    let mut mx = fake.get(&listener_path()).unwrap();
    mx["spec"]["tls"] = serde_json::json!({});
    fake.seed(mx);
    listener(typed(&fake, &listener_path()), ctx)
        .await
        .expect("reconciles");
    let writes = fake.take_writes();
    assert!(
        writes.contains(&format!("DELETE {}", certificate_path())),
        "{writes:#?}"
    );
    assert!(
        writes.contains(&format!("PATCH /api/v1{NS}/secrets/mx-tls")),
        "{writes:#?}"
    );
    assert!(
        fake.get(&format!("/api/v1{NS}/secrets/mx-issued-tls"))
            .is_some()
    );
}

/// Without cert-manager, a listener with `tls.issuerRef` says so (`CertManagerMissing`)
/// and applies nothing; a listener without it does not notice.
#[tokio::test]
async fn a_missing_cert_manager_is_named_and_applies_nothing() {
    let (fake, ctx) = seeded();
    fake.without_cert_manager
        .store(true, std::sync::atomic::Ordering::SeqCst);
    listener(typed(&fake, &listener_path()), ctx.clone())
        .await
        .expect("a self-signed listener reconciles without cert-manager");
    fake.take_writes();

    let mut mx = fake.get(&listener_path()).unwrap();
    mx["spec"]["tls"] = serde_json::json!({"issuerRef": {"name": "letsencrypt"}});
    mx["metadata"]["generation"] = serde_json::json!(2);
    fake.seed(mx);
    let action = listener(typed(&fake, &listener_path()), ctx)
        .await
        .expect("reconciles");
    assert_eq!(
        action,
        Action::requeue(super::smtp_listener::SECRET_RECHECK)
    );
    assert_eq!(
        fake.take_writes(),
        vec![
            format!("PATCH {}", certificate_path()),
            format!("PATCH {}/status", listener_path()),
        ],
        "the attempt, then nothing but the status"
    );
    let status = &fake.get(&listener_path()).unwrap()["status"];
    let ready = condition(status, "Ready");
    assert_eq!(ready["status"], "False");
    assert_eq!(ready["reason"], "CertManagerMissing");
    let message = ready["message"].as_str().unwrap();
    assert!(
        message.contains("certificates.cert-manager.io/v1")
            && message.contains("install cert-manager"),
        "{message}"
    );
    assert!(
        !message.contains("mx-issued-tls"),
        "the Secret is not the problem: {message}"
    );
    assert_eq!(condition(status, "Degraded")["status"], "False");
}
