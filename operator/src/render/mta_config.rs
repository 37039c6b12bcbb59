//! SmtpListener + MailDomains -> the `MtaConfig` its pods run (the `mta-config` type the MTA
//! itself parses; validated by the caller with the MTA's own `validate`).
//!
//! Carries: hostname, one listener per port (with PROXY protocol when the SmtpListener
//! asks), session limits, the spool on the queue volume, the TLS Secret's files, Maildir,
//! LMTP and relay domains with their recipients, aliases and catch-all, the DKIM key of each
//! MailDomain once it is Active, and the RelayPolicies of the namespace (client networks,
//! AUTH users Secret, rate limits, outbound route, TLS and MTA-STS, smarthost credentials).
//! Everything else a resource asks for becomes a [`Note`], never a silent drop.

use super::{Note, RenderError, World};
use crds::RelayPolicy;
use crds::SmtpListener;
use crds::mail_domain::MailDomain;
use crds::relay_policy::{OutboundTlsMode, RouteMode};
use crds::smtp_listener::ListenerPortKind;
use kube::ResourceExt;
use mta_config::{
    DkimKeyConfig, HttpConfig, ListenerConfig, ListenerKind, LocalDelivery, LocalDomainConfig,
    MtaConfig, RouteAuth, RouteConfig, SpoolConfig, TlsConfig, TlsMode,
};
use std::collections::BTreeMap;
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
/// Mount point of the AUTH users Secret (key `users`, written by `petrel-mta passwd`).
pub const AUTH_DIR: &str = "/etc/petrel/auth";

/// Mount point of the smarthost credentials Secret (keys `username`, `password`).
pub const SMARTHOST_DIR: &str = "/etc/petrel/smarthost";
/// Mount point of the fleet Secret (the token the pods share for drain and hand-off).
pub const FLEET_DIR: &str = "/etc/petrel/fleet";

/// The RelayPolicy whose route is in force in the namespace: the first by name.
pub fn route_policy(world: &World) -> Option<&RelayPolicy> {
    world.relay_policies.first()
}

/// The RelayPolicy whose AUTH users the namespace uses: the first (by name) that names a
/// users Secret.
pub fn auth_policy(world: &World) -> Option<&RelayPolicy> {
    world
        .relay_policies
        .iter()
        .find(|p| p.spec.authentication.is_some())
}

/// The smarthost credentials Secret of the namespace's route ([`route_policy`]).
pub fn smarthost_secret(world: &World) -> Option<String> {
    let route = &route_policy(world)?.spec.route;
    match (&route.mode, &route.smarthost) {
        (RouteMode::Smarthost, Some(host)) => host.credentials_secret.clone(),
        _ => None,
    }
}

/// The Secret holding AUTH users for this namespace ([`auth_policy`]), and whether AUTH is
/// offered without TLS.
pub fn auth_secret(world: &World) -> Option<(String, bool)> {
    let auth = auth_policy(world)?.spec.authentication.as_ref()?;
    Some((auth.secret_name.clone(), auth.allow_plaintext))
}

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
    let auth = auth_secret(world);
    let listeners = spec
        .ports
        .iter()
        .filter(|p| {
            // Submission requires AUTH: without users, the port is not opened.
            let needs_auth = p.kind != ListenerPortKind::Smtp;
            if needs_auth && auth.is_none() {
                notes.push(Note {
                    kind: "SmtpListener",
                    name: listener.name_any(),
                    reason: "NoAuthentication",
                    message: format!(
                        "port {} ({:?}) is not opened: no RelayPolicy in the namespace names an authentication Secret",
                        p.port, p.kind
                    ),
                });
            }
            !needs_auth || auth.is_some()
        })
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
            // The load balancer in front of the Service sends the header on every port.
            // Any sender is trusted: the SmtpListener names no balancer addresses (a cloud
            // balancer's are neither known here nor stable).
            proxy_protocol: spec.proxy_protocol,
            proxy_trusted_networks: None,
            inbound_checks: true,
        })
        .collect();
    let mut config = MtaConfig {
        hostname: spec.hostname.clone(),
        listeners,
        admin: ::mta_config::AdminConfig {
            fleet_token_file: Some(PathBuf::from(FLEET_DIR).join(super::secrets::FLEET_TOKEN)),
            ..::mta_config::AdminConfig::default()
        },
        spool: SpoolConfig {
            path: PathBuf::from(DATA_DIR).join("spool"),
            ..SpoolConfig::default()
        },
        local_domains: Vec::new(),
        // The kubelet probes /healthz and /readyz here; Prometheus scrapes /metrics.
        http: HttpConfig {
            address: Some(SocketAddr::from((
                Ipv4Addr::UNSPECIFIED,
                u16::try_from(super::workload::HTTP_PORT).unwrap_or(8080),
            ))),
        },
        tls: TlsConfig {
            cert_file: Some(PathBuf::from(TLS_DIR).join("tls.crt")),
            key_file: Some(PathBuf::from(TLS_DIR).join("tls.key")),
            generate_self_signed: false,
        },
        ..MtaConfig::default()
    };
    if let Some((_, allow_plaintext)) = &auth {
        config.smtpd.auth_users_file = Some(PathBuf::from(AUTH_DIR).join("users"));
        config.smtpd.auth_allow_plaintext = *allow_plaintext;
    }
    apply_relay_policies(&mut config, world, notes);
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
    if let Some(url) = &limits.shared_rate_limits_redis {
        // The share each pod falls back to follows the fleet's size: a scale changes
        // the config, which the pods reload.
        config.smtpd.rate_limits.redis = Some(::mta_config::RedisLimitsConfig {
            url: url.clone(),
            timeout: std::time::Duration::from_millis(50),
            fleet_size: u32::try_from(super::desired_replicas(listener).max(1)).unwrap_or(1),
        });
    }
    for domain in &world.domains {
        if let Some(local) = local_domain(domain, notes) {
            config.local_domains.push(local);
        }
        for key in signing_keys_of(domain, world, notes) {
            config.dkim.keys.push(key.config);
        }
    }
    Ok(config)
}

/// A DKIM key a listener signs with, and the key Secret it is copied from.
#[derive(Debug, Clone, PartialEq)]
pub struct SigningKey {
    /// The MtaConfig entry; its `key_file` is [`dkim_key_file`] of `secret`.
    pub config: DkimKeyConfig,
    /// The DkimKey's Secret holding the private key.
    pub secret: String,
}

/// Where a listener's pods find the private key copied from the key Secret `secret`: one
/// file per key in the listener's DKIM Secret, mounted as a whole at [`DKIM_DIR`], so a
/// key that becomes Active changes that Secret's content and never the pod template.
pub fn dkim_key_file(secret: &str) -> PathBuf {
    PathBuf::from(DKIM_DIR).join(format!("{secret}.pem"))
}

/// Every key the listeners of `world` load (see [`signing_keys_of`]), in domain order.
pub fn signing_keys(world: &World, notes: &mut Vec<Note>) -> Vec<SigningKey> {
    world
        .domains
        .iter()
        .flat_map(|d| signing_keys_of(d, world, notes))
        .collect()
}

/// The DKIM keys the pods load for `domain` (its `dkimKeyRef`), read from the listener's
/// DKIM Secret mount: the Active key signs; the next key of a rotation, once published and
/// staged, is loaded without signing (so every pod has it before the switch). None (with
/// a note) while no key is Active: nothing is signed with an unpublished key.
pub fn signing_keys_of(
    domain: &MailDomain,
    world: &World,
    notes: &mut Vec<Note>,
) -> Vec<SigningKey> {
    let Some(wanted) = domain.spec.dkim_key_ref.as_ref() else {
        return Vec::new();
    };
    let mut note = |reason: &'static str, message: String| {
        notes.push(Note {
            kind: "MailDomain",
            name: domain.name_any(),
            reason,
            message,
        });
    };
    let Some(key) = world.dkim_keys.iter().find(|k| k.name_any() == *wanted) else {
        note(
            "DkimKeyNotFound",
            format!("dkimKeyRef {wanted}: no such DkimKey in the namespace; mail is not signed"),
        );
        return Vec::new();
    };
    if !key.spec.domain.eq_ignore_ascii_case(&domain.spec.domain) {
        note(
            "DkimKeyDomainMismatch",
            format!(
                "dkimKeyRef {wanted} signs for {}, not {}; mail is not signed",
                key.spec.domain, domain.spec.domain
            ),
        );
        return Vec::new();
    }
    let slots = super::dkim::read_slots(key, world);
    let loaded = super::dkim::pod_keys(&slots);
    if !loaded.iter().any(|(_, u)| *u == super::dkim::Use::Sign) {
        note(
            "DkimKeyNotActive",
            format!(
                "DkimKey {wanted} is not Active yet (its TXT record is not answered by every authoritative nameserver, or the pods have not loaded it); mail from {} is not signed until it is",
                domain.spec.domain
            ),
        );
    }
    loaded
        .into_iter()
        .map(|(slot, used)| SigningKey {
            config: DkimKeyConfig {
                domain: domain.spec.domain.clone(),
                selector: slot.selector.clone(),
                key_file: dkim_key_file(&slot.secret_name),
                sign: used == super::dkim::Use::Sign,
            },
            secret: slot.secret_name.clone(),
        })
        .collect()
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
    let mut aliases: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for alias in &spec.aliases {
        aliases
            .entry(alias.name.to_ascii_lowercase())
            .or_default()
            .extend(alias.to.iter().cloned());
    }
    let catch_all = match (&spec.catch_all, &spec.recipients) {
        (Some(_), None) => {
            note("catchAll has no effect without recipients: every local part exists".into());
            None
        }
        (catch_all, _) => catch_all.clone(),
    };
    let delivery = &spec.delivery;
    let delivery = if let Some(lmtp) = &delivery.lmtp {
        LocalDelivery::Lmtp {
            address: format!("{}:{}", lmtp.host, lmtp.port),
        }
    } else if let Some(relay) = &delivery.relay {
        LocalDelivery::Relay {
            host: format!("{}:{}", relay.host, relay.port),
            tls: TlsMode::Opportunistic,
        }
    } else if let Some(maildir) = &delivery.maildir {
        let sub_path = maildir
            .sub_path
            .clone()
            .unwrap_or_else(|| format!("maildir/{}", spec.domain));
        LocalDelivery::Maildir {
            root: PathBuf::from(DATA_DIR).join(sub_path),
        }
    } else {
        note(format!(
            "delivery names no target; mail for {} is not accepted",
            spec.domain
        ));
        return None;
    };
    Some(LocalDomainConfig {
        name: spec.domain.clone(),
        delivery,
        recipients: spec.recipients.clone(),
        aliases,
        catch_all,
    })
}

/// What of the namespace's RelayPolicies does not take effect (for their status).
pub fn relay_policy_notes(world: &World) -> Vec<Note> {
    let mut notes = Vec::new();
    apply_relay_policies(&mut MtaConfig::default(), world, &mut notes);
    notes
}

/// Folds the namespace's RelayPolicies into the config: the union of their client
/// networks, the strictest message size, the first policy's rate limits and route.
fn apply_relay_policies(config: &mut MtaConfig, world: &World, notes: &mut Vec<Note>) {
    let mut route_set = false;
    for policy in &world.relay_policies {
        let spec = &policy.spec;
        let mut note = |message: String| {
            notes.push(Note {
                kind: "RelayPolicy",
                name: policy.name_any(),
                reason: "NotYetSupported",
                message,
            });
        };
        for network in &spec.client_networks {
            match network.parse() {
                Ok(net) => config.relay.client_networks.push(net),
                Err(e) => note(format!("clientNetworks: {network:?}: {e}")),
            }
        }
        if let Some(size) = spec.max_message_size {
            config.smtpd.max_message_size = config.smtpd.max_message_size.min(size);
        }
        let limits = &spec.rate_limits;
        if let Some(rate) = &limits.per_client_ip {
            config.smtpd.rate_limits.messages_per_ip =
                format!("{}/{}", rate.messages, rate.interval);
        }
        if let Some(rate) = &limits.per_user {
            config.smtpd.rate_limits.messages_per_user =
                format!("{}/{}", rate.messages, rate.interval);
        }
        if let Some(rate) = &limits.per_recipient_domain {
            config.smtpd.rate_limits.recipients_per_domain =
                format!("{}/{}", rate.messages, rate.interval);
        }
        if route_set {
            continue;
        }
        route_set = true;
        if let Some(shaping) = &spec.outbound_shaping {
            apply_outbound_shaping(config, shaping, &mut note);
        }
        // MTA-STS and DANE are switches for the whole MTA: the route's policy sets them.
        config.smtp_client.mta_sts = spec.outbound_tls.mta_sts;
        config.smtp_client.dane = spec.outbound_tls.dane;
        let tls = match spec.outbound_tls.mode {
            OutboundTlsMode::Opportunistic => TlsMode::Opportunistic,
            OutboundTlsMode::Required => TlsMode::Required,
        };
        let (smarthost, auth) = match (&spec.route.mode, &spec.route.smarthost) {
            (RouteMode::Smarthost, Some(host)) => (
                Some(format!("{}:{}", host.host, host.port)),
                // The Secret is mounted at SMARTHOST_DIR (see `smarthost_secret`).
                host.credentials_secret.as_ref().map(|_| RouteAuth {
                    username: String::new(),
                    username_file: Some(PathBuf::from(SMARTHOST_DIR).join("username")),
                    password_file: PathBuf::from(SMARTHOST_DIR).join("password"),
                }),
            ),
            _ => (None, None),
        };
        if smarthost.is_some() || tls != TlsMode::Opportunistic {
            config.routes.push(RouteConfig {
                domain: "*".to_owned(),
                smarthost,
                tls,
                auth,
                dane: None,
            });
        }
    }
}

/// A RelayPolicy's `outboundShaping` as `queue.site_limits` and `queue.sites`: members
/// left out keep the MTA's defaults (a site's, the policy's `defaults`).
fn apply_outbound_shaping(
    config: &mut MtaConfig,
    shaping: &crds::relay_policy::OutboundShaping,
    note: &mut impl FnMut(String),
) {
    let defaults = site_limits(
        mta_config::SiteLimits::default(),
        &shaping.defaults,
        "outboundShaping.defaults",
        note,
    );
    config.queue.site_limits = defaults.clone();
    config.queue.sites = shaping
        .sites
        .iter()
        .enumerate()
        .map(|(i, site)| mta_config::SiteRule {
            name: site.name.clone(),
            domains: site.domains.clone(),
            mx: site.mx.clone(),
            limits: site.limits.as_ref().map(|limits| {
                let key = format!("outboundShaping.sites[{i}].limits");
                site_limits(defaults.clone(), limits, &key, note)
            }),
        })
        .collect();
}

/// `base` with the members `limits` sets.
fn site_limits(
    mut base: mta_config::SiteLimits,
    limits: &crds::relay_policy::SiteLimits,
    key: &str,
    note: &mut impl FnMut(String),
) -> mta_config::SiteLimits {
    let mut duration = |field: &str, text: &Option<String>| {
        let text = text.as_ref()?;
        match crds::parse_duration_secs(text) {
            Some(secs) => Some(std::time::Duration::from_secs(secs)),
            None => {
                note(format!("{key}.{field}: {text:?} is not a duration"));
                None
            }
        }
    };
    if let Some(interval) = duration("recoveryInterval", &limits.recovery_interval) {
        base.recovery_interval = interval;
        base.throttle_memory = base.throttle_memory.max(interval);
    }
    if let Some(time) = duration("suspendTime", &limits.suspend_time) {
        base.suspend_time = time;
        base.max_suspend_time = base.max_suspend_time.max(time);
    }
    if let Some(n) = limits.max_connections {
        base.max_connections = n as usize;
    }
    if let Some(rate) = &limits.max_message_rate {
        base.max_message_rate = format!("{}/{}", rate.messages, rate.interval);
    }
    if let Some(n) = limits.suspend_after {
        base.suspend_after = n;
    }
    base
}
