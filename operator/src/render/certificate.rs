//! The cert-manager `Certificate` of a listener with `tls.issuerRef`, and the renewal
//! arithmetic every TLS source shares.
//!
//! cert-manager is not a dependency: its Certificate is a [`DynamicObject`] of
//! `cert-manager.io/v1` carrying only the fields Petrel sets. cert-manager writes the
//! issued pair into the Secret [`issued_secret_name`], which the pods mount as they mount
//! a `tls.secretName`; until it exists the listener waits (`SecretNotFound`).
//!
//! Renewal follows cert-manager's rule, so that `status.renewalTime` says the same for a
//! self-signed certificate (the operator renews it) and an issued one (cert-manager does):
//! `notAfter - renewBefore`, or `notAfter - lifetime / 3` when `renewBefore` is not shorter
//! than the certificate's lifetime.

use super::owned_meta;
use crds::SmtpListener;
use kube::ResourceExt;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};

/// cert-manager's API group (also the default group of an issuer).
pub const GROUP: &str = "cert-manager.io";

/// `tls.renewBefore` when it is absent or unreadable (the CRD defaults it to `30d`).
pub const DEFAULT_RENEW_BEFORE_SECS: i64 = 30 * 86_400;

/// The `cert-manager.io/v1` `Certificate` resource, for dynamic API calls.
pub fn api_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(GROUP, "v1", "Certificate"),
        "certificates",
    )
}

/// The Secret cert-manager fills for a listener with `tls.issuerRef`. Not the self-signed
/// `<listener>-tls`: switching from self-signed to an issuer keeps serving the old Secret
/// until cert-manager has filled the new one, and the operator never deletes a Secret that
/// cert-manager writes.
pub fn issued_secret_name(listener: &SmtpListener) -> String {
    format!("{}-issued-tls", listener.name_any())
}

/// `tls.renewBefore` in seconds.
pub fn renew_before_secs(listener: &SmtpListener) -> i64 {
    crds::parse_duration_secs(&listener.spec.tls.renew_before)
        .and_then(|s| i64::try_from(s).ok())
        .unwrap_or(DEFAULT_RENEW_BEFORE_SECS)
}

/// When a certificate valid from `not_before` to `not_after` (Unix seconds) is renewed
/// with `renew_before`: cert-manager's `RenewalTime`.
pub fn renewal_time(not_before: i64, not_after: i64, renew_before: i64) -> i64 {
    let lifetime = not_after - not_before;
    let before = if renew_before < lifetime {
        renew_before
    } else {
        lifetime / 3
    };
    not_after - before
}

/// `secs` as a Go duration (what cert-manager's `renewBefore` takes): `30d` is `720h`.
pub fn go_duration(secs: i64) -> String {
    if secs != 0 && secs % 3600 == 0 {
        format!("{}h", secs / 3600)
    } else if secs != 0 && secs % 60 == 0 {
        format!("{}m", secs / 60)
    } else {
        format!("{secs}s")
    }
}

/// The Certificate asking `tls.issuerRef` for a certificate naming the listener's
/// hostname, or `None` without an issuer. Named after the listener and owned by it.
pub fn listener_certificate(listener: &SmtpListener) -> Option<DynamicObject> {
    let issuer = listener.spec.tls.issuer_ref.as_ref()?;
    let name = listener.name_any();
    let mut certificate = DynamicObject::new(&name, &api_resource()).data(serde_json::json!({
        "spec": {
            "secretName": issued_secret_name(listener),
            "dnsNames": [listener.spec.hostname],
            "issuerRef": {
                "name": issuer.name,
                "kind": issuer.kind,
                "group": issuer.group.as_deref().unwrap_or(GROUP),
            },
            "renewBefore": go_duration(renew_before_secs(listener)),
            // A new key with every certificate (the default only from cert-manager 1.18).
            "privateKey": {"rotationPolicy": "Always"},
        }
    }));
    certificate.metadata = owned_meta(listener, name, "tls");
    Some(certificate)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{FixedKeys, KeySource};
    use crate::render::{Object, World, render_listener, secrets};
    use k8s_openapi::ByteString;
    use k8s_openapi::api::core::v1::Secret;

    const DAY: i64 = 86_400;

    fn listener(tls: serde_json::Value) -> SmtpListener {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "mail.petrel.dev/v1alpha1", "kind": "SmtpListener",
            "metadata": {"name": "mx", "namespace": "mail"},
            "spec": {"hostname": "mx.example.com", "tls": tls}
        }))
        .unwrap()
    }

    #[test]
    fn renewal_time_follows_cert_managers_rule() {
        // (lifetime in days, renewBefore in days, renewal in days before expiry)
        let cases = [
            (90, 30, 30),
            (365, 30, 30),
            (365, 200, 200),
            (90, 90, 30),  // not shorter than the lifetime: a third of it
            (90, 120, 30), // same
            (30, 30, 10),  // same
            (365, 0, 0),   // at expiry
        ];
        let not_before = 1_800_000_000;
        for (lifetime, before, expected) in cases {
            let not_after = not_before + lifetime * DAY;
            assert_eq!(
                not_after - renewal_time(not_before, not_after, before * DAY),
                expected * DAY,
                "lifetime {lifetime}d, renewBefore {before}d"
            );
        }
    }

    #[test]
    fn durations_for_cert_manager() {
        for (secs, go) in [
            (30 * DAY, "720h"),
            (3600, "1h"),
            (90 * 60, "90m"),
            (45, "45s"),
            (0, "0s"),
        ] {
            assert_eq!(go_duration(secs), go);
        }
        for (written, secs) in [("30d", 30 * DAY), ("720h", 30 * DAY), ("5m", 300)] {
            let l = listener(serde_json::json!({"renewBefore": written}));
            assert_eq!(renew_before_secs(&l), secs, "{written}");
        }
        let l = listener(serde_json::json!({}));
        assert_eq!(
            renew_before_secs(&l),
            DEFAULT_RENEW_BEFORE_SECS,
            "the default"
        );
    }

    /// The Certificate exists exactly when `tls.issuerRef` does, and carries the hostname,
    /// the issuer (group defaulted), the Secret the pods mount and `renewBefore` as a Go
    /// duration.
    #[test]
    fn certificate_table() {
        let cases = [
            (serde_json::json!({}), None),
            (serde_json::json!({"secretName": "own"}), None),
            (
                serde_json::json!({"issuerRef": {"name": "le"}}),
                Some(serde_json::json!({
                    "secretName": "mx-issued-tls", "dnsNames": ["mx.example.com"],
                    "issuerRef": {"name": "le", "kind": "Issuer", "group": "cert-manager.io"},
                    "renewBefore": "720h", "privateKey": {"rotationPolicy": "Always"}})),
            ),
            (
                serde_json::json!({"issuerRef": {"name": "vault", "kind": "ClusterIssuer",
                    "group": "vault.example.com"}, "renewBefore": "10d"}),
                Some(serde_json::json!({
                    "secretName": "mx-issued-tls", "dnsNames": ["mx.example.com"],
                    "issuerRef": {"name": "vault", "kind": "ClusterIssuer",
                        "group": "vault.example.com"},
                    "renewBefore": "240h", "privateKey": {"rotationPolicy": "Always"}})),
            ),
        ];
        for (tls, expected) in cases {
            let l = listener(tls.clone());
            let got = listener_certificate(&l).map(|c| {
                let json = serde_json::to_value(&c).unwrap();
                assert_eq!(json["apiVersion"], "cert-manager.io/v1");
                assert_eq!(json["kind"], "Certificate");
                assert_eq!(json["metadata"]["name"], "mx");
                assert_eq!(json["metadata"]["namespace"], "mail");
                assert_eq!(
                    json["metadata"]["labels"]["mail.petrel.dev/owner-kind"],
                    "SmtpListener"
                );
                json["spec"].clone()
            });
            assert_eq!(got, expected, "{tls}");

            // The render agrees: the Certificate is among the objects, the pods mount
            // its Secret, and no self-signed Secret is made.
            let part = render_listener(&l, &World::default(), &mut FixedKeys).unwrap();
            let certificates = part
                .objects
                .iter()
                .filter(|o| matches!(o, Object::Certificate(_)))
                .count();
            assert_eq!(certificates, usize::from(expected.is_some()), "{tls}");
            let self_signed = part.objects.iter().any(|o| o.name() == "mx-tls");
            assert_eq!(self_signed, tls.as_object().unwrap().is_empty(), "{tls}");
            assert!(part.notes.is_empty(), "{tls}: {:?}", part.notes);
        }
    }

    /// A self-signed certificate is kept until `tls.renewBefore` before its expiry.
    #[test]
    fn self_signed_renewal_follows_renew_before() {
        let now = 1_800_000_000;
        // A certificate for the hostname with `days` left, valid for a year.
        let secret_with = |days: i64| {
            let mut params =
                rcgen::CertificateParams::new(vec!["mx.example.com".to_owned()]).unwrap();
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
            params.not_before = at(now + days * DAY - 365 * DAY);
            params.not_after = at(now + days * DAY);
            let key = rcgen::KeyPair::generate().unwrap();
            let crt = params.self_signed(&key).unwrap().pem();
            Secret {
                metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                    name: Some("mx-tls".into()),
                    namespace: Some("mail".into()),
                    ..Default::default()
                },
                data: Some(std::collections::BTreeMap::from([
                    ("tls.crt".to_owned(), ByteString(crt.into_bytes())),
                    (
                        "tls.key".to_owned(),
                        ByteString(key.serialize_pem().into_bytes()),
                    ),
                ])),
                ..Default::default()
            }
        };
        let fresh = FixedKeys.tls("mx.example.com").unwrap().cert_pem;
        // (renewBefore, days left, kept?)
        let cases = [
            ("30d", 40, true),
            ("30d", 20, false),
            ("60d", 40, false),
            ("1000h", 40, false),
            ("10d", 20, true),
            ("400d", 130, true), // longer than the lifetime: renewed at a third (121.7 d)
            ("400d", 110, false),
        ];
        for (renew_before, days, kept) in cases {
            let secret = secret_with(days);
            let original = secret.data.as_ref().unwrap()["tls.crt"].clone();
            let world = World {
                secrets: vec![secret],
                now: Some(now),
                ..World::default()
            };
            let l = listener(serde_json::json!({"renewBefore": renew_before}));
            let part = render_listener(&l, &world, &mut FixedKeys).unwrap();
            let got = part
                .objects
                .iter()
                .find_map(|o| match o {
                    Object::Secret(s) if o.name() == secrets::tls_secret_name(&l) => {
                        s.data.as_ref()?.get("tls.crt").cloned()
                    }
                    _ => None,
                })
                .expect("the self-signed Secret");
            let expected = if kept {
                original
            } else {
                ByteString(fresh.clone().into_bytes())
            };
            assert_eq!(
                got, expected,
                "renewBefore {renew_before}, {days} days left"
            );
        }
    }
}
