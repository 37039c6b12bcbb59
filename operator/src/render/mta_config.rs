//! SmtpListener + MailDomains -> the `MtaConfig` its pods run (the `mta-config` type the MTA
//! itself parses; validated by the caller with the MTA's own `validate`).
//!
//! Carries what `MtaConfig` can express today: hostname, one listener per port, session
//! limits, the spool on the queue volume, and Maildir domains with their recipients.
//! Everything else a resource asks for becomes a [`Note`], never a silent drop.

use super::{Note, RenderError, World};
use crds::SmtpListener;
use crds::mail_domain::MailDomain;
use crds::smtp_listener::ListenerPortKind;
use kube::ResourceExt;
use mta_config::{
    ListenerConfig, ListenerKind, LocalDelivery, LocalDomainConfig, MtaConfig, SpoolConfig,
};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

/// Mount point of the per-pod queue volume.
pub const DATA_DIR: &str = "/var/lib/petrel";
/// Mount point of the config ConfigMap.
pub const CONFIG_DIR: &str = "/etc/petrel/config";
/// File name of the config inside the ConfigMap.
pub const CONFIG_FILE: &str = "mta.yaml";
/// Mount point of the TLS Secret (`tls.crt`, `tls.key`).
pub const TLS_DIR: &str = "/etc/petrel/tls";
/// Parent of the DKIM key Secrets' mount points (one directory per Secret).
pub const DKIM_DIR: &str = "/etc/petrel/dkim";

/// Container port for a Service port: ports below 1024 move to `10000 + port` so the pods
/// need no privilege (restricted Pod Security forbids it); others stay as they are.
pub fn container_port(port: i32) -> i32 {
    if port < 1024 { 10_000 + port } else { port }
}

/// Builds the MtaConfig of `listener` from the MailDomains in `world`.
pub fn for_listener(
    listener: &SmtpListener,
    world: &World,
    notes: &mut Vec<Note>,
) -> Result<MtaConfig, RenderError> {
    let spec = &listener.spec;
    let listeners = spec
        .ports
        .iter()
        .map(|p| ListenerConfig {
            address: SocketAddr::from((
                Ipv4Addr::UNSPECIFIED,
                u16::try_from(container_port(p.port)).unwrap_or(u16::MAX),
            )),
            kind: match p.kind {
                ListenerPortKind::Smtp => ListenerKind::Smtp,
                ListenerPortKind::Submission => ListenerKind::Submission,
                ListenerPortKind::Smtps => ListenerKind::Smtps,
            },
        })
        .collect();
    let mut config = MtaConfig {
        hostname: spec.hostname.clone(),
        listeners,
        spool: SpoolConfig {
            path: PathBuf::from(DATA_DIR).join("spool"),
            ..SpoolConfig::default()
        },
        local_domains: Vec::new(),
        ..MtaConfig::default()
    };
    let limits = &spec.limits;
    if let Some(v) = limits.max_message_size {
        config.smtpd.max_message_size = v;
    }
    if let Some(v) = limits.max_recipients {
        config.smtpd.max_recipients = v as usize;
    }
    if let Some(v) = limits.max_connections {
        config.smtpd.max_connections = v as usize;
    }
    if let Some(v) = limits.max_connections_per_ip {
        config.smtpd.max_connections_per_ip = v as usize;
    }
    for domain in &world.domains {
        if let Some(local) = local_domain(domain, notes) {
            config.local_domains.push(local);
        }
    }
    Ok(config)
}

/// The local-domain entry of `domain`, or `None` (with a note) when its delivery target
/// cannot be expressed yet. Notes also record fields that do not take effect.
pub fn local_domain(domain: &MailDomain, notes: &mut Vec<Note>) -> Option<LocalDomainConfig> {
    let spec = &domain.spec;
    let mut note = |message: String| {
        notes.push(Note {
            kind: "MailDomain",
            name: domain.name_any(),
            reason: "NotYetSupported",
            message,
        });
    };
    let mut unsupported = Vec::new();
    if !spec.aliases.is_empty() {
        unsupported.push("aliases");
    }
    if spec.catch_all.is_some() {
        unsupported.push("catchAll");
    }
    if spec.dkim_key_ref.is_some() {
        unsupported.push("dkimKeyRef (signing)");
    }
    if !unsupported.is_empty() {
        note(format!(
            "not carried into the MTA config yet: {}",
            unsupported.join(", ")
        ));
    }
    let delivery = &spec.delivery;
    let Some(maildir) = &delivery.maildir else {
        let target = if delivery.lmtp.is_some() {
            "delivery.lmtp"
        } else {
            "delivery.relay"
        };
        note(format!(
            "{target} is not supported by the MTA config yet; mail for {} is not accepted",
            spec.domain
        ));
        return None;
    };
    let sub_path = maildir
        .sub_path
        .clone()
        .unwrap_or_else(|| format!("maildir/{}", spec.domain));
    Some(LocalDomainConfig {
        name: spec.domain.clone(),
        delivery: LocalDelivery::Maildir {
            root: PathBuf::from(DATA_DIR).join(sub_path),
        },
        recipients: spec.recipients.clone(),
    })
}

/// RelayPolicies render nothing into MtaConfig yet: one note per policy says so.
pub fn relay_policy_notes(world: &World) -> Vec<Note> {
    world
        .relay_policies
        .iter()
        .map(|policy| Note {
            kind: "RelayPolicy",
            name: policy.name_any(),
            reason: "NotYetSupported",
            message: "relay permissions, rate limits and routes are not carried into the MTA config yet; nothing is relayed".to_owned(),
        })
        .collect()
}
