//! Tests of the generated CRDs: the committed YAML matches the types, and the CEL rules
//! accept good resources and refuse the mistakes they are meant to catch.

use super::*;
use kube::core::cel::validate_cel;
use std::path::PathBuf;

/// Where the generated CRD YAML is committed: the plain manifests and the Helm chart's
/// `crds/` folder (same content; Helm installs those files before the chart's templates).
const CRD_DIRS: [&str; 2] = ["manifests/crds", "charts/petrel/crds"];

/// The committed `manifests/crds/*.yaml` and `charts/petrel/crds/*.yaml` must equal what the
/// types generate. On mismatch, `<file>.actual` is written next to the committed file;
/// regenerate both with `cargo run -p crds --bin crdgen`.
#[test]
fn committed_crd_yaml_matches_the_types() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut stale = Vec::new();
    for dir in CRD_DIRS {
        for (file, crd) in all() {
            let generated = to_yaml(&crd).expect("CRD serialises");
            let path = root.join(dir).join(file);
            let committed = std::fs::read_to_string(&path).unwrap_or_default();
            let actual = path.with_extension("yaml.actual");
            if committed == generated {
                let _ = std::fs::remove_file(&actual);
            } else {
                if let Some(parent) = actual.parent() {
                    std::fs::create_dir_all(parent).expect("create the CRD folder");
                }
                std::fs::write(&actual, &generated).expect("write .actual");
                stale.push(format!("{dir}/{file}"));
            }
        }
    }
    assert!(
        stale.is_empty(),
        "committed CRDs differ from the types: {stale:?}; see the .actual files or run `cargo run -p crds --bin crdgen`"
    );
}

/// The API server estimates the worst-case cost of every CEL rule from the declared bounds
/// and refuses the whole CRD when a rule (times the most items it can run on) exceeds its
/// budget. An unbounded string, list or map makes that estimate huge, so every one of them
/// under `.spec` (and under any node carrying a rule, status included) must declare
/// `maxLength` (or `enum`/`format`), `maxItems` or `maxProperties`.
#[test]
fn every_spec_string_list_and_map_is_bounded() {
    let mut unbounded = Vec::new();
    for (file, crd) in all() {
        let schema = serde_json::to_value(&crd.spec.versions[0].schema).expect("schema");
        let mut found = Vec::new();
        find_unbounded(&schema["openAPIV3Schema"], "", false, &mut found);
        unbounded.extend(found.into_iter().map(|f| format!("{file}: {f}")));
    }
    assert!(
        unbounded.is_empty(),
        "unbounded values make the API server refuse the CEL rules: {unbounded:#?}"
    );
}

/// Collects the JSON paths (`.spec.aliases[].to`) of strings without `maxLength`/`enum`/
/// `format`, arrays without `maxItems` and maps (`additionalProperties`) without
/// `maxProperties`, inside `.spec` or inside a node with `x-kubernetes-validations`.
fn find_unbounded(schema: &serde_json::Value, path: &str, inside: bool, out: &mut Vec<String>) {
    let inside = inside || path == ".spec" || schema.get("x-kubernetes-validations").is_some();
    let has = |key: &str| schema.get(key).is_some();
    if inside {
        let here = if path.is_empty() { "." } else { path };
        match schema.get("type").and_then(|t| t.as_str()) {
            Some("string") if !(has("maxLength") || has("enum") || has("format")) => {
                out.push(format!("{here}: string without maxLength"));
            }
            Some("array") if !has("maxItems") => {
                out.push(format!("{here}: array without maxItems"));
            }
            Some("object")
                if schema
                    .get("additionalProperties")
                    .is_some_and(|a| a.is_object())
                    && !has("maxProperties") =>
            {
                out.push(format!("{here}: map without maxProperties"));
            }
            _ => {}
        }
    }
    if let Some(props) = schema.get("properties").and_then(|p| p.as_object()) {
        for (name, prop) in props {
            find_unbounded(prop, &format!("{path}.{name}"), inside, out);
        }
    }
    if let Some(items) = schema.get("items") {
        find_unbounded(items, &format!("{path}[]"), inside, out);
    }
    if let Some(values) = schema.get("additionalProperties").filter(|a| a.is_object()) {
        find_unbounded(values, &format!("{path}.*"), inside, out);
    }
    for key in ["allOf", "anyOf", "oneOf"] {
        for (i, sub) in schema
            .get(key)
            .and_then(|s| s.as_array())
            .into_iter()
            .flatten()
            .enumerate()
        {
            find_unbounded(sub, &format!("{path}<{key}[{i}]>"), inside, out);
        }
    }
}

#[test]
fn every_crd_has_status_subresource_printer_columns_and_documented_fields() {
    for (file, crd) in all() {
        let version = &crd.spec.versions[0];
        assert_eq!(crd.spec.group, GROUP, "{file}");
        assert_eq!(version.name, VERSION, "{file}");
        assert_eq!(crd.spec.scope, "Namespaced", "{file}");
        assert!(
            version
                .subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some(),
            "{file}: status subresource"
        );
        let columns = version
            .additional_printer_columns
            .as_ref()
            .expect("printer columns");
        assert!(
            columns.iter().any(|c| c.name == "Age"),
            "{file}: Age column"
        );
        let schema = serde_json::to_value(&version.schema).expect("schema");
        let spec = &schema["openAPIV3Schema"]["properties"]["spec"];
        let mut undocumented = Vec::new();
        find_undocumented(spec, "spec", &mut undocumented);
        assert!(
            undocumented.is_empty(),
            "{file}: fields without a description: {undocumented:?}"
        );
    }
}

/// Collects the paths of object properties that have no `description` (shown by
/// `kubectl explain`).
fn find_undocumented(schema: &serde_json::Value, path: &str, out: &mut Vec<String>) {
    if let Some(props) = schema.get("properties").and_then(|p| p.as_object()) {
        for (name, prop) in props {
            let here = format!("{path}.{name}");
            if prop.get("description").is_none() {
                out.push(here.clone());
            }
            find_undocumented(prop, &here, out);
        }
    }
    if let Some(items) = schema.get("items") {
        find_undocumented(items, &format!("{path}[]"), out);
    }
}

fn domain(spec: serde_json::Value) -> MailDomain {
    let mut md = MailDomain::new(
        "example",
        serde_json::from_value(spec).expect("spec deserialises"),
    );
    md.metadata.namespace = Some("mail".into());
    md
}

fn errors_of<T: kube::CustomResourceExt + serde::Serialize>(obj: &T) -> String {
    match validate_cel(obj) {
        Ok(()) => String::new(),
        Err(e) => format!("{e:?}"),
    }
}

#[test]
fn mail_domain_cel_accepts_a_good_domain() {
    let md = domain(serde_json::json!({
        "domain": "example.com",
        "delivery": {"maildir": {}},
        "recipients": ["alice", "bob"],
        "aliases": [{"name": "postmaster", "to": ["alice@example.com"]}],
        "dmarc": {"policy": "reject", "rua": ["mailto:dmarc@example.com"]},
    }));
    assert_eq!(errors_of(&md), "");
}

#[test]
fn mail_domain_cel_refuses_user_mistakes() {
    let cases = [
        (
            serde_json::json!({"domain": "Example.COM", "delivery": {"maildir": {}}}),
            "lower-case DNS domain",
        ),
        (
            serde_json::json!({"domain": "example.com", "delivery": {}}),
            "exactly one of delivery",
        ),
        (
            serde_json::json!({"domain": "example.com",
                "delivery": {"maildir": {}, "lmtp": {"host": "dovecot"}}}),
            "exactly one of delivery",
        ),
        (
            serde_json::json!({"domain": "example.com", "delivery": {"maildir": {}},
                "catchAll": "nobody"}),
            "catchAll must be an address",
        ),
        (
            serde_json::json!({"domain": "example.com", "delivery": {"maildir": {}},
                "aliases": [{"name": "x", "to": ["not-an-address"]}]}),
            "alias targets must be full addresses",
        ),
        (
            serde_json::json!({"domain": "example.com",
                "delivery": {"maildir": {"subPath": "../etc"}}}),
            "may not contain '..'",
        ),
    ];
    for (spec, expected) in cases {
        let errors = errors_of(&domain(spec.clone()));
        assert!(
            errors.contains(expected),
            "{spec}: expected {expected:?}, got {errors:?}"
        );
    }
}

#[test]
fn mail_domain_domain_is_immutable() {
    let old = domain(serde_json::json!({"domain": "example.com", "delivery": {"maildir": {}}}));
    let new = domain(serde_json::json!({"domain": "example.org", "delivery": {"maildir": {}}}));
    let errors = kube::core::cel::validate_cel_update(&new, &old).expect_err("must refuse");
    assert!(format!("{errors:?}").contains("domain is immutable"));
}

fn relay(spec: serde_json::Value) -> RelayPolicy {
    RelayPolicy::new(
        "relay",
        serde_json::from_value(spec).expect("spec deserialises"),
    )
}

#[test]
fn relay_policy_cel_refuses_open_relays_and_empty_policies() {
    let good = relay(serde_json::json!({"clientNetworks": ["10.0.0.0/8"]}));
    assert_eq!(errors_of(&good), "");
    let cases = [
        (serde_json::json!({}), "permits nobody"),
        (
            serde_json::json!({"clientNetworks": ["0.0.0.0/0"]}),
            "open relay",
        ),
        (
            serde_json::json!({"clientNetworks": ["::/0"]}),
            "open relay",
        ),
        (
            serde_json::json!({"clientNetworks": ["10.0.0.300/8"]}),
            "must be CIDRs",
        ),
        (
            serde_json::json!({"clientNetworks": ["10.0.0.0/8"], "route": {"mode": "Smarthost"}}),
            "smarthost is required",
        ),
        (
            serde_json::json!({"clientNetworks": ["10.0.0.0/8"],
                "rateLimits": {"perClientIp": {"messages": 10, "interval": "1 minute"}}}),
            "interval is a duration",
        ),
    ];
    for (spec, expected) in cases {
        let errors = errors_of(&relay(spec.clone()));
        assert!(
            errors.contains(expected),
            "{spec}: expected {expected:?}, got {errors:?}"
        );
    }
}

#[test]
fn smtp_listener_cel_refuses_duplicate_ports_and_bad_autoscaling() {
    let listener = |spec: serde_json::Value| {
        SmtpListener::new(
            "mx",
            serde_json::from_value(spec).expect("spec deserialises"),
        )
    };
    let good = listener(serde_json::json!({"hostname": "mx.example.com",
        "ports": [{"name": "smtp", "kind": "smtp", "port": 25},
                  {"name": "submission", "kind": "submission", "port": 587}]}));
    assert_eq!(errors_of(&good), "");
    assert_eq!(good.spec.tls.renew_before, "30d", "the default");
    let issued = listener(serde_json::json!({"hostname": "mx.example.com",
        "tls": {"issuerRef": {"name": "le", "kind": "ClusterIssuer"}, "renewBefore": "720h"}}));
    assert_eq!(errors_of(&issued), "");
    let cases = [
        (
            serde_json::json!({"hostname": "mx.example.com",
                "ports": [{"name": "a", "kind": "smtp", "port": 25},
                          {"name": "b", "kind": "submission", "port": 25}]}),
            "port numbers must be unique",
        ),
        (
            serde_json::json!({"hostname": "mx.example.com",
                "autoscaling": {"minReplicas": 4, "maxReplicas": 2}}),
            "maxReplicas must be at least minReplicas",
        ),
        (
            serde_json::json!({"hostname": "mx.example.com",
                "tls": {"secretName": "a", "issuerRef": {"name": "b"}}}),
            "at most one of tls.secretName",
        ),
        (
            serde_json::json!({"hostname": "mx.example.com", "service": {"type": "External"}}),
            "type is ClusterIP, NodePort or LoadBalancer",
        ),
        (
            serde_json::json!({"hostname": "mx.example.com", "tls": {"renewBefore": "1 month"}}),
            "renewBefore is a duration like 30d or 720h",
        ),
        (
            serde_json::json!({"hostname": "mx.example.com",
                "tls": {"issuerRef": {"name": "le", "kind": "Vault"}}}),
            "kind is Issuer or ClusterIssuer",
        ),
    ];
    for (spec, expected) in cases {
        let errors = errors_of(&listener(spec.clone()));
        assert!(
            errors.contains(expected),
            "{spec}: expected {expected:?}, got {errors:?}"
        );
    }
}

#[test]
fn dkim_key_cel_refuses_bad_durations_and_selectors() {
    let key = |spec: serde_json::Value| {
        DkimKey::new(
            "k",
            serde_json::from_value(spec).expect("spec deserialises"),
        )
    };
    let good = key(serde_json::json!({"domain": "example.com", "algorithm": "ed25519"}));
    assert_eq!(errors_of(&good), "");
    let bad = key(
        serde_json::json!({"domain": "example.com", "algorithm": "ed25519",
        "rotationPeriod": "3 months", "selectorPrefix": "Bad_Prefix"}),
    );
    let errors = errors_of(&bad);
    assert!(errors.contains("rotationPeriod is a duration"), "{errors}");
    assert!(errors.contains("selectorPrefix must be"), "{errors}");
}

#[test]
fn dkim_key_cel_checks_custom_selectors() {
    let key = |selectors: serde_json::Value| {
        DkimKey::new(
            "k",
            serde_json::from_value(serde_json::json!({"domain": "example.com",
                "algorithm": "ed25519", "selectors": selectors}))
            .expect("spec deserialises"),
        )
    };
    let good = key(serde_json::json!(["mail2026", "backup"]));
    assert_eq!(errors_of(&good), "");
    assert_eq!(good.spec.selectors, ["mail2026", "backup"]);
    for bad in [
        serde_json::json!(["same", "same"]),
        serde_json::json!(["only-one"]),
        serde_json::json!(["a", "b", "c"]),
    ] {
        let errors = errors_of(&key(bad.clone()));
        assert!(
            errors.contains("selectors names exactly two distinct selectors"),
            "{bad}: {errors}"
        );
    }
    // The names themselves are checked by the schema (a pattern and a length, enforced by
    // the API server's OpenAPI validation, not by CEL).
    let crd = serde_json::to_value(DkimKey::crd()).expect("crd");
    let selectors = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
        ["properties"]["selectors"];
    assert_eq!(selectors["minItems"], 2, "{selectors}");
    assert_eq!(selectors["maxItems"], 2, "{selectors}");
    assert_eq!(selectors["items"]["maxLength"], 63, "{selectors}");
    assert_eq!(
        selectors["items"]["pattern"], "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        "{selectors}"
    );
}

#[test]
fn durations_parse_to_seconds() {
    assert_eq!(parse_duration_secs("90d"), Some(90 * 86_400));
    assert_eq!(parse_duration_secs("12h"), Some(12 * 3600));
    assert_eq!(parse_duration_secs("30m"), Some(1800));
    assert_eq!(parse_duration_secs("45s"), Some(45));
    assert_eq!(parse_duration_secs("3 months"), None);
    assert_eq!(parse_duration_secs(""), None);
}

#[test]
fn merge_keeps_transition_time_when_status_is_unchanged() {
    use crate::conditions::{READY, merge};
    let old = vec![Condition::new(
        READY,
        ConditionStatus::True,
        "Reconciled",
        "",
        Some(1),
        "2026-01-01T00:00:00Z",
    )];
    let same = vec![Condition::new(
        READY,
        ConditionStatus::True,
        "Reconciled",
        "",
        Some(2),
        "2026-02-02T00:00:00Z",
    )];
    assert_eq!(
        merge(&old, same)[0].last_transition_time,
        "2026-01-01T00:00:00Z"
    );
    let flipped = vec![Condition::new(
        READY,
        ConditionStatus::False,
        "Failed",
        "",
        Some(2),
        "2026-02-02T00:00:00Z",
    )];
    assert_eq!(
        merge(&old, flipped)[0].last_transition_time,
        "2026-02-02T00:00:00Z"
    );
}

#[test]
fn relay_policy_cel_checks_outbound_shaping_sites() {
    let with_sites = |sites: serde_json::Value| {
        relay(serde_json::json!({
            "clientNetworks": ["10.0.0.0/8"],
            "outboundShaping": {"defaults": {"recoveryInterval": "2s"}, "sites": sites}
        }))
    };
    assert_eq!(
        errors_of(&with_sites(
            serde_json::json!([{"name": "bigmail", "mx": ["*.mail.example"]}])
        )),
        ""
    );
    assert!(
        errors_of(&with_sites(serde_json::json!([{"name": "bigmail"}]))).contains("domains or mx")
    );
    assert!(
        errors_of(&with_sites(
            serde_json::json!([{"name": "big mail", "domains": ["a.example"]}])
        ))
        .contains("name is letters")
    );
    let bad_interval = relay(serde_json::json!({
        "clientNetworks": ["10.0.0.0/8"],
        "outboundShaping": {"defaults": {"recoveryInterval": "soon"}}
    }));
    assert!(errors_of(&bad_interval).contains("recoveryInterval"));
}
