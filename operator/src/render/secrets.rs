//! Key-material Secrets: the listener's self-signed TLS certificate, and the copy of the
//! DKIM keys its pods load (the DkimKeys' own Secrets are `super::dkim`'s).
//!
//! Invariant: an existing Secret with the expected keys is reused byte for byte, so a
//! reconcile never rotates a key by accident and applying it again changes nothing. Fresh
//! material comes from the [`KeySource`] only when no such Secret exists, or (the one
//! planned rotation) when the self-signed certificate is due for renewal (`tls.renewBefore`
//! before expiry, see [`super::certificate::renewal_time`]) or no longer names the
//! listener's hostname.

use super::{RenderError, World, owned_meta};
use crate::keys::KeySource;
use crds::SmtpListener;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use std::collections::BTreeMap;

/// Which Secret the listener's pods mount for TLS.
#[derive(Debug)]
pub enum TlsSecret {
    /// A Secret this render produces (self-signed).
    Render(Box<Secret>),
    /// A Secret someone else provides (`tls.secretName`, or cert-manager's).
    Existing(String),
}

/// Name of the self-signed TLS Secret of a listener (cert-manager fills another one,
/// [`super::certificate::issued_secret_name`]).
pub fn tls_secret_name(listener: &SmtpListener) -> String {
    format!("{}-tls", listener.name_any())
}

/// Decides the listener's TLS Secret; renders a self-signed one when none is named.
pub fn listener_tls(
    listener: &SmtpListener,
    world: &World,
    keys: &mut dyn KeySource,
) -> Result<TlsSecret, RenderError> {
    if let Some(name) = &listener.spec.tls.secret_name {
        return Ok(TlsSecret::Existing(name.clone()));
    }
    if listener.spec.tls.issuer_ref.is_some() {
        return Ok(TlsSecret::Existing(super::certificate::issued_secret_name(
            listener,
        )));
    }
    let name = tls_secret_name(listener);
    let ns = listener.namespace().unwrap_or_default();
    let renew_before = super::certificate::renew_before_secs(listener);
    let current = reuse(world, &ns, &name, &["tls.crt", "tls.key"])
        .filter(|data| still_good(data, &listener.spec.hostname, renew_before, world.now));
    let data = match current {
        Some(data) => data,
        None => {
            let tls = keys
                .tls(&listener.spec.hostname)
                .map_err(|source| RenderError::Keys {
                    kind: "SmtpListener",
                    name: listener.name_any(),
                    source,
                })?;
            BTreeMap::from([
                ("tls.crt".to_owned(), ByteString(tls.cert_pem.into_bytes())),
                ("tls.key".to_owned(), ByteString(tls.key_pem.into_bytes())),
            ])
        }
    };
    Ok(TlsSecret::Render(Box::new(Secret {
        metadata: owned_meta(listener, name, "tls"),
        type_: Some("kubernetes.io/tls".to_owned()),
        data: Some(data),
        ..Secret::default()
    })))
}

/// What a PEM certificate says about itself: validity (Unix seconds) and DNS names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateFacts {
    /// `notBefore`, in Unix seconds.
    pub not_before: i64,
    /// `notAfter`, in Unix seconds.
    pub not_after: i64,
    /// The DNS names of its subjectAltName extension.
    pub dns_names: Vec<String>,
}

/// Parses the first certificate of `pem`; `None` when it is not one.
pub fn certificate_facts(pem: &[u8]) -> Option<CertificateFacts> {
    let (_, block) = x509_parser::pem::parse_x509_pem(pem).ok()?;
    let cert = block.parse_x509().ok()?;
    let dns_names = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => Some((*d).to_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    Some(CertificateFacts {
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        dns_names,
    })
}

/// Whether an existing self-signed Secret can stay: without a clock (offline render)
/// always; otherwise only a certificate that parses, names `hostname` and has not reached
/// its renewal time (`renew_before` seconds before expiry, see
/// [`super::certificate::renewal_time`]). Anything else is replaced by a fresh one (the
/// MTA reloads the mounted files; sessions in progress keep the certificate they started
/// with).
fn still_good(
    data: &BTreeMap<String, ByteString>,
    hostname: &str,
    renew_before: i64,
    now: Option<i64>,
) -> bool {
    let Some(now) = now else {
        return true;
    };
    data.get("tls.crt")
        .and_then(|crt| certificate_facts(&crt.0))
        .is_some_and(|facts| {
            now < super::certificate::renewal_time(facts.not_before, facts.not_after, renew_before)
                && facts
                    .dns_names
                    .iter()
                    .any(|n| n.eq_ignore_ascii_case(hostname))
        })
}

/// The data of an observed Secret when it has every key in `required`.
fn reuse(
    world: &World,
    namespace: &str,
    name: &str,
    required: &[&str],
) -> Option<BTreeMap<String, ByteString>> {
    let data = world.secret(namespace, name)?.data.clone()?;
    required
        .iter()
        .all(|k| data.contains_key(*k))
        .then_some(data)
}

/// Name of the Secret holding the token a listener's pods share (drain and hand-off).
pub fn listener_fleet_secret_name(listener: &SmtpListener) -> String {
    format!("{}-fleet", listener.name_any())
}

/// Key of the token in the fleet Secret.
pub const FLEET_TOKEN: &str = "token";

/// The listener's fleet Secret: a random token every pod mounts (`admin.fleet_token_file`)
/// and the operator presents to drain a pod before scale-in. Reused once made.
pub fn listener_fleet(
    listener: &SmtpListener,
    world: &World,
    keys: &mut dyn KeySource,
) -> Result<Secret, RenderError> {
    let ns = listener.namespace().unwrap_or_default();
    let name = listener_fleet_secret_name(listener);
    let data = match reuse(world, &ns, &name, &[FLEET_TOKEN]) {
        Some(data) => data,
        None => {
            let token = keys.token().map_err(|source| RenderError::Keys {
                kind: "SmtpListener",
                name: listener.name_any(),
                source,
            })?;
            BTreeMap::from([(FLEET_TOKEN.to_owned(), ByteString(token.into_bytes()))])
        }
    };
    Ok(Secret {
        metadata: owned_meta(listener, name, "fleet-token"),
        type_: Some("Opaque".to_owned()),
        data: Some(data),
        ..Secret::default()
    })
}

/// Name of a listener's DKIM Secret: a copy of every private key its pods sign with.
pub fn listener_dkim_secret_name(listener: &SmtpListener) -> String {
    format!("{}-dkim", listener.name_any())
}

/// The listener's DKIM Secret: for each key in `signing`, the private key copied from the
/// DkimKey's Secret, as the file [`super::mta_config::dkim_key_file`] expects. One Secret
/// mounted whole means a key that becomes Active (or retires) changes file contents the
/// MTA hot-reloads, never the pod template: no pod restarts for a DKIM change.
pub fn listener_dkim(
    listener: &SmtpListener,
    world: &World,
    signing: &[super::mta_config::SigningKey],
) -> Secret {
    let ns = listener.namespace().unwrap_or_default();
    let data: BTreeMap<String, ByteString> = signing
        .iter()
        .filter_map(|key| {
            let pem = world
                .secret(&ns, &key.secret)?
                .data
                .as_ref()?
                .get(super::dkim::DKIM_PRIVATE_KEY)?
                .clone();
            Some((format!("{}.pem", key.secret), pem))
        })
        .collect();
    Secret {
        metadata: owned_meta(listener, listener_dkim_secret_name(listener), "dkim-keys"),
        type_: Some("Opaque".to_owned()),
        data: Some(data),
        ..Secret::default()
    }
}
