//! `petrel-operator dns` on what `kubectl get maildomains,dkimkeys,secrets -o yaml` prints
//! (one `kind: List`) in the middle of a rotation: every DKIM record that must exist now is
//! in the zone fragment, each with its slot's phase.

use std::process::Command;

/// A slot Secret as kubectl prints it: data in base64, the rotation state in annotations.
fn slot_secret(name: &str, selector: &str, phase: &str, record: &str) -> String {
    let b64 = |s: &str| {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(s)
    };
    format!(
        r#"- apiVersion: v1
  kind: Secret
  type: Opaque
  metadata:
    name: {name}
    namespace: mail
    resourceVersion: "1234"
    uid: 5e0b8f0c-0000-4000-8000-{uid:0>12}
    creationTimestamp: "2026-01-01T00:00:00Z"
    labels:
      app.kubernetes.io/managed-by: petrel-operator
    annotations:
      mail.petrel.dev/dkim-phase: {phase}
      mail.petrel.dev/dkim-since: "2026-01-01T00:00:00Z"
  data:
    private.pem: {key}
    dns.txt: {record}
    selector: {selector_b64}
"#,
        uid = name.len(),
        key = b64("-----BEGIN PRIVATE KEY-----\n...\n-----END PRIVATE KEY-----\n"),
        record = b64(record),
        selector_b64 = b64(selector),
    )
}

#[test]
fn dns_reads_a_kubectl_list_and_shows_each_slots_phase() {
    let mut list = String::from(
        r#"apiVersion: v1
kind: List
metadata:
  resourceVersion: ""
items:
- apiVersion: mail.petrel.dev/v1alpha1
  kind: MailDomain
  metadata:
    name: example-com
    namespace: mail
    generation: 1
    resourceVersion: "1200"
  spec:
    domain: example.com
    delivery:
      maildir: {}
    dkimKeyRef: example-com-ed25519
- apiVersion: mail.petrel.dev/v1alpha1
  kind: DkimKey
  metadata:
    name: example-com-ed25519
    namespace: mail
    generation: 2
  spec:
    domain: example.com
    algorithm: ed25519
    rotationPeriod: 90d
    overlap: 7d
  status:
    phase: Active
    activeSelector: petrel-b
- apiVersion: mail.petrel.dev/v1alpha1
  kind: DkimKey
  metadata:
    name: example-com-rsa
    namespace: mail
  spec:
    domain: example.com
    algorithm: rsa-2048
    selectorPrefix: rsa
"#,
    );
    list.push_str(&slot_secret(
        "example-com-ed25519-petrel-a",
        "petrel-a",
        "Retiring",
        "v=DKIM1; k=ed25519; p=T0xE",
    ));
    list.push_str(&slot_secret(
        "example-com-ed25519-petrel-b",
        "petrel-b",
        "Active",
        "v=DKIM1; k=ed25519; p=TkVX",
    ));
    list.push_str(&slot_secret(
        "example-com-rsa-rsa-a",
        "rsa-a",
        "Generated",
        "v=DKIM1; k=rsa; p=TkVYVA",
    ));
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("kubectl-get.yaml");
    std::fs::write(&file, &list).expect("write");

    let out = Command::new(env!("CARGO_BIN_EXE_petrel-operator"))
        .arg("dns")
        .arg(&file)
        .output()
        .expect("run petrel-operator dns");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (phase, selector, value) in [
        ("Retiring", "petrel-a", "v=DKIM1; k=ed25519; p=T0xE"),
        ("Active", "petrel-b", "v=DKIM1; k=ed25519; p=TkVX"),
        ("Generated", "rsa-a", "v=DKIM1; k=rsa; p=TkVYVA"),
    ] {
        let expected = format!(
            "; DKIM selector {selector} ({phase})\n{selector}._domainkey.example.com. 3600 IN TXT \"{value}\"\n"
        );
        assert!(stdout.contains(&expected), "{expected}\nnot in\n{stdout}");
    }
    assert!(!stdout.contains("key not generated yet"), "{stdout}");
}

#[test]
fn dns_names_the_list_item_it_cannot_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("list.yaml");
    std::fs::write(
        &file,
        "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: ConfigMap\n  metadata:\n    name: x\n",
    )
    .expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_petrel-operator"))
        .arg("dns")
        .arg(&file)
        .output()
        .expect("run petrel-operator dns");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("document 0, item 0 has unsupported kind \"ConfigMap\""),
        "{stderr}"
    );
}
