//! SMTP and LMTP delivery for one worker: resolves the route's hosts (and, for MX routes,
//! applies DANE, else the domain's MTA-STS policy), keeps one client [`Connection`] open across
//! messages (up to `queue.max_messages_per_connection`), and turns replies and errors into
//! per-recipient statuses ([`super::outcome`]). Connections to domains that ask for TLS
//! reports are counted by [`tls_rpt`] (RFC 8460).

pub mod tls_rpt;

use super::dane::{self, HostPolicy, TlsaSet};
use super::mta_sts::{self, Mode, Policy};
use super::outcome::DeliveryError;
use super::route::{self, Target};
use super::site::{SiteKey, SitePermit, TlsPolicy};
use super::{NextHop, Route, WorkItem, outcome};
use crate::delivery::Outbound;
use crate::queue::{BodyType, DsnReturn, Status};
use crate::shutdown::Shutdown;
use mta_client::{
    ClientConfig, ClientError, Connection, Credentials, OutboundMessage, OutboundRecipient,
    Timeouts,
};
use mta_config::{DaneMode, MtaConfig, RouteAuth, TlsMode};
use std::sync::Arc;
use tls_rpt::PolicyKey;

/// A worker's connection, reused while it delivers to the same destination.
#[derive(Default)]
pub struct Session {
    connection: Option<Connection>,
    /// Messages sent over `connection`.
    sent: usize,
    /// `connection` was made with verified TLS (it may carry REQUIRETLS messages).
    verified: bool,
    /// The host of the connection the last message went to (kept after an error, since
    /// that host's failure is what gets reported); `None` when no host was reached.
    remote_host: Option<String>,
    /// The site's permit for `connection` ([`super::site`]), held while it is open.
    site: Option<SitePermit>,
    /// Ends waits for a site's permit or rate token.
    shutdown: Option<Shutdown>,
    /// Whether `connection` was made without the recipient domain's DANE or MTA-STS
    /// policy (for a TLS-RPT report): no other message may use it.
    domain_policy: DomainPolicy,
}

/// Whether a delivery by MX applies the recipient domain's TLS policy (DANE, MTA-STS).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum DomainPolicy {
    #[default]
    Apply,
    /// RFC 8460 §5.3: a TLS-RPT report goes despite TLS policy failures. It says
    /// `TLS-Required: No` (RFC 8689 §5), so it goes as without a policy: opportunistic TLS
    /// (TLS whenever STARTTLS is offered), or the route's configured TLS mode.
    Ignore,
}

impl Session {
    pub fn new(shutdown: Shutdown) -> Self {
        Session {
            shutdown: Some(shutdown),
            ..Session::default()
        }
    }

    pub async fn deliver(
        &mut self,
        ctx: &Arc<Outbound>,
        route: &Route,
        item: &WorkItem,
        message: &[u8],
    ) -> Vec<(usize, Status)> {
        let config = ctx.config();
        let all = |status: Status| -> Vec<(usize, Status)> {
            item.recipients
                .iter()
                .map(|&i| (i, status.clone()))
                .collect()
        };
        // RFC 8689: a REQUIRETLS message goes only over TLS verified for the next hop.
        let require_tls = item.envelope.require_tls;
        // TLS-RPT: a report is never counted in one, and goes despite TLS policy failures
        // (RFC 8460 §5.3). Only our own reports are let off the domain's policy, and only
        // when they ask for it with `TLS-Required: No`, as every report does.
        let is_report = item.envelope.sender == tls_rpt::report_sender(&config);
        let domain_policy = if is_report && tls_required_no(message) {
            DomainPolicy::Ignore
        } else {
            DomainPolicy::Apply
        };
        if self.sent >= config.queue.max_messages_per_connection
            || (require_tls && !self.verified)
            || self.domain_policy != domain_policy
        {
            self.close().await;
        }
        if let Some(connection) = self.connection.as_mut()
            && connection.reset().await.is_err()
        {
            // The peer dropped the idle connection: start a new one.
            self.connection = None;
        }
        if self.connection.is_none() {
            // A worker holds one site permit at most: give it back before asking again.
            self.site = None;
            let report = config.smtp_client.tls_rpt.enabled && !is_report;
            let shutdown = self.shutdown.as_mut();
            let wanted = Wanted {
                require_tls,
                report,
                domain_policy,
            };
            match connect(ctx, &config, route, wanted, shutdown).await {
                Ok((connection, verified, host, site)) => {
                    self.connection = Some(connection);
                    self.site = site;
                    self.sent = 0;
                    self.verified = verified;
                    self.remote_host = Some(host);
                    self.domain_policy = domain_policy;
                }
                Err(status) => {
                    self.remote_host = None;
                    return all(status);
                }
            }
        }
        // A site suspended since this connection was opened gets nothing more over it.
        if let Some(Err(status)) = self.site.as_ref().map(|p| p.site().check_suspended()) {
            self.close().await;
            return all(status);
        }
        let sent = match &self.site {
            Some(permit) => Some(permit.site().rate_token(self.shutdown.as_mut()).await),
            None => None,
        };
        let Some(connection) = self.connection.as_mut() else {
            return Vec::new();
        };

        let envelope = &item.envelope;
        let recipients: Vec<OutboundRecipient<'_>> = item
            .recipients
            .iter()
            .map(|&i| {
                let r = &envelope.recipients[i];
                OutboundRecipient {
                    address: &r.address,
                    notify: r.notify.map(|n| (n.success, n.failure, n.delay)),
                    orcpt: r.orcpt.as_deref(),
                }
            })
            .collect();
        let outbound = OutboundMessage {
            sender: &envelope.sender,
            recipients: &recipients,
            content: message,
            eight_bit: envelope.body == BodyType::EightBitMime,
            smtputf8: envelope.smtputf8,
            dsn_ret_full: envelope.dsn_ret.map(|r| r == DsnReturn::Full),
            dsn_envid: envelope.dsn_envid.as_deref(),
        };
        let results = match connection.send(&outbound).await {
            Ok(replies) => {
                self.sent += 1;
                item.recipients
                    .iter()
                    .zip(replies.iter())
                    .map(|(&i, reply)| (i, outcome::from_reply(reply)))
                    .collect()
            }
            Err(error) => {
                // After an error the connection's state is unknown: never reuse it.
                if let Some(connection) = self.connection.take() {
                    if let Some(permit) = self.site.as_mut() {
                        permit.closing();
                    }
                    connection.quit().await;
                }
                all(outcome::from_error(&error))
            }
        };
        if let (Some(permit), Some(sent)) = (&self.site, sent) {
            permit.site().observe(&results, sent);
        }
        if self.connection.is_none() {
            self.site = None;
        }
        results
    }

    /// Others wait for this connection's site: it should not stay open idle.
    pub fn site_contended(&self) -> bool {
        self.site.as_ref().is_some_and(|p| p.site().contended())
    }

    /// The site of the open connection, if it has one.
    pub fn site(&self) -> Option<&Arc<super::site::Site>> {
        self.site.as_ref().map(|p| p.site())
    }

    /// See [`Session::remote_host`]'s field.
    pub fn remote_host(&self) -> Option<&str> {
        self.remote_host.as_deref()
    }

    pub async fn close(&mut self) {
        if let Some(connection) = self.connection.take() {
            if let Some(permit) = self.site.as_mut() {
                permit.closing();
            }
            connection.quit().await;
        }
        self.site = None;
        self.sent = 0;
        self.verified = false;
        self.domain_policy = DomainPolicy::Apply;
    }
}

/// Whether the message's header section has `TLS-Required: No` (RFC 8689 §5).
fn tls_required_no(message: &[u8]) -> bool {
    mail_parser::MessageParser::default()
        .parse_headers(message)
        .and_then(|m| {
            m.header_raw("TLS-Required")
                .map(|v| v.trim().eq_ignore_ascii_case("no"))
        })
        .unwrap_or(false)
}

/// What one delivery asks of its connection.
#[derive(Clone, Copy)]
struct Wanted {
    /// REQUIRETLS (RFC 8689): verified TLS only.
    require_tls: bool,
    /// The connection attempts are counted for TLS-RPT (not for a report's own delivery).
    report: bool,
    domain_policy: DomainPolicy,
}

/// How MTA-STS (RFC 8461, [`mta_sts`]) shapes the connection attempts of one delivery.
enum Sts {
    /// No policy applies (no policy, `mode: none`, MTA-STS off, not an MX route, or DANE
    /// applies: RFC 8461 §2).
    Off,
    /// `enforce`: the targets are already those the policy allows and the client asks
    /// for verified TLS; TLS failures are reported as MTA-STS deferrals.
    Enforce,
    /// `testing`: mail goes as configured; what `enforce` would refuse is logged.
    Testing { policy: Arc<Policy>, domain: String },
}

/// Resolves the route and connects to the first host that answers. Also says whether the
/// connection's TLS was verified (REQUIRETLS messages need that), and the host's name.
async fn connect(
    ctx: &Arc<Outbound>,
    config: &MtaConfig,
    route: &Route,
    wanted: Wanted,
    shutdown: Option<&mut Shutdown>,
) -> Result<Connected, Status> {
    let Wanted {
        require_tls,
        report,
        domain_policy,
    } = wanted;
    let (targets, client, sts): (Vec<Target>, _, _) = match route {
        Route::Lmtp { address } => {
            let client = client_config(config, true, TlsMode::None, None)?;
            if address.starts_with('/') {
                let target = mta_client::Target::Unix(address.into());
                // A local socket needs no TLS, even for REQUIRETLS.
                return Connection::connect(&target, "localhost", &client)
                    .await
                    .map(|c| (c, true, address.clone(), None))
                    .map_err(|e| outcome::from_error(&e));
            }
            let resolver = ctx.resolver()?;
            let targets = route::host_port_targets(&resolver, address).await?;
            (targets, client, Sts::Off)
        }
        Route::Smtp {
            next_hop,
            tls,
            auth,
        } => {
            let resolver = ctx.resolver()?;
            let mut mode = if require_tls { TlsMode::Verified } else { *tls };
            let (targets, sts, rpt) = match next_hop {
                NextHop::Mx { domain } if domain_policy == DomainPolicy::Ignore => {
                    tracing::info!(domain = %mta_telemetry::Escaped(domain.as_str()), "TLS-RPT report: TLS-Required: No, the domain's DANE and MTA-STS policies do not apply");
                    let port = config.smtp_client.port;
                    (
                        route::mx_targets(&resolver, domain, port).await?,
                        Sts::Off,
                        None,
                    )
                }
                NextHop::Mx { domain } => {
                    let rua = if report {
                        ctx.tls_rpt.rua(&resolver, domain).await
                    } else {
                        None
                    };
                    let rpt = rua.map(|rua| Rpt {
                        ctx,
                        domain,
                        rua,
                        sts: PolicyKey::none(),
                    });
                    let dane_mode = dane::mode(config, domain);
                    let validating = if dane_mode != DaneMode::Off {
                        let validating = ctx.dane.get(config)?;
                        ctx.dane
                            .validation_available(config, &validating)
                            .await
                            .then_some(validating)
                    } else {
                        None
                    };
                    let required = dane_mode == DaneMode::Required;
                    if required && validating.is_none() {
                        // Mandatory DANE with no validation to be had: nothing could be
                        // checked, so nothing goes. For TLS-RPT the resolver gave no
                        // valid answer (`dnssec-invalid`), as for a bogus MX set.
                        if let Some(rpt) = &rpt {
                            rpt.record_dns_problems(&[dane::DnsProblem { host: None }]);
                        }
                        return Err(dane::required_but(
                            domain,
                            "DNSSEC validation is unavailable through the configured resolvers",
                        ));
                    }
                    let targets = if let Some(validating) = validating {
                        let mut problems = Vec::new();
                        let plan =
                            dane::plan(&validating, domain, config.smtp_client.port, &mut problems)
                                .await;
                        if let Some(rpt) = &rpt {
                            rpt.record_dns_problems(&problems);
                        }
                        let plan = plan?;
                        if required || plan.applies() {
                            let hosts = if required {
                                // RFC 7672 §6: only hosts with usable TLSA records; no
                                // MTA-STS, no opportunistic TLS for the others.
                                let mandatory = plan.mandatory();
                                if let Some(rpt) = &rpt {
                                    rpt.record_dane_required(&mandatory.refused);
                                }
                                for (host, why) in &mandatory.refused {
                                    tracing::info!(domain = %mta_telemetry::Escaped(domain.as_str()), host = %mta_telemetry::Escaped(host), reason = ?why, "DANE required: MX host refused");
                                }
                                mandatory.into_hosts(domain)?
                            } else {
                                plan.hosts
                            };
                            // RFC 8461 §2: where DANE applies, MTA-STS does not.
                            tracing::info!(domain = %mta_telemetry::Escaped(domain.as_str()), "DANE: TLSA records apply");
                            let client = client_config(config, false, mode, auth.as_ref())?;
                            let gate = Gate {
                                ctx,
                                config,
                                domain: Some(domain),
                                shutdown,
                            };
                            let sts = Sts::Off;
                            return try_targets(hosts, &client, require_tls, sts, rpt, Some(gate))
                                .await;
                        }
                        plan.hosts.into_iter().map(|(target, _)| target).collect()
                    } else {
                        route::mx_targets(&resolver, domain, config.smtp_client.port).await?
                    };
                    let discovery = if config.smtp_client.mta_sts {
                        ctx.mta_sts
                            .policy(&resolver, &config.smtp_client, domain)
                            .await
                    } else {
                        Default::default()
                    };
                    if let (Some(rpt), Some(failure)) = (&rpt, discovery.failure) {
                        rpt.record_sts_failure(failure);
                    }
                    let policy = discovery.policy;
                    let rpt = rpt.map(|rpt| Rpt {
                        sts: match &policy {
                            Some(policy) if policy.mode != Mode::None => sts_key(policy),
                            Some(_) | None => PolicyKey::none(),
                        },
                        ..rpt
                    });
                    let (targets, sts) = match policy {
                        Some(policy) if policy.mode == Mode::Enforce => {
                            mode = TlsMode::Verified;
                            let targets = mta_sts::enforce_hosts(&policy, domain, targets)?;
                            (targets, Sts::Enforce)
                        }
                        Some(policy) if policy.mode == Mode::Testing => (
                            targets,
                            Sts::Testing {
                                policy,
                                domain: domain.clone(),
                            },
                        ),
                        Some(_) | None => (targets, Sts::Off),
                    };
                    (targets, sts, rpt)
                }
                NextHop::Smarthost { host_port } => (
                    route::host_port_targets(&resolver, host_port).await?,
                    Sts::Off,
                    None,
                ),
            };
            let targets = targets.into_iter().map(|t| (t, HostPolicy::None)).collect();
            let client = client_config(config, false, mode, auth.as_ref())?;
            let gate = Gate {
                ctx,
                config,
                domain: match next_hop {
                    NextHop::Mx { domain } => Some(domain.as_str()),
                    NextHop::Smarthost { .. } => None,
                },
                shutdown,
            };
            return try_targets(targets, &client, require_tls, sts, rpt, Some(gate)).await;
        }
        Route::Maildir { .. } | Route::Unroutable { .. } => {
            return Err(DeliveryError::Local {
                detail: "internal error: not an SMTP route".into(),
            }
            .into());
        }
    };
    let targets = targets.into_iter().map(|t| (t, HostPolicy::None)).collect();
    try_targets(targets, &client, require_tls, sts, None, None).await
}

/// A connection, whether its TLS was verified, its host's name, and its site's permit.
type Connected = (Connection, bool, String, Option<SitePermit>);

/// What an SMTP delivery needs to take its site's permit ([`super::site`]) once its hosts
/// are known; LMTP has none.
struct Gate<'a> {
    ctx: &'a Arc<Outbound>,
    config: &'a MtaConfig,
    /// The recipient domain (none for a smarthost).
    domain: Option<&'a str>,
    shutdown: Option<&'a mut Shutdown>,
}

impl Gate<'_> {
    /// Waits for a permit of the site of `targets` under the TLS policy in force.
    async fn permit(
        self,
        targets: &[(Target, HostPolicy)],
        client: &ClientConfig,
        require_tls: bool,
        sts: &Sts,
    ) -> Result<SitePermit, Status> {
        let tls = if targets.iter().any(|(_, dane)| dane.applies()) {
            TlsPolicy::Dane
        } else if require_tls {
            TlsPolicy::RequireTls
        } else if matches!(sts, Sts::Enforce) {
            TlsPolicy::MtaSts
        } else {
            match client.tls {
                mta_client::TlsMode::Verified => TlsPolicy::Verified,
                mta_client::TlsMode::Required => TlsPolicy::Required,
                mta_client::TlsMode::Opportunistic => TlsPolicy::Opportunistic,
                mta_client::TlsMode::None => TlsPolicy::Plain,
            }
        };
        let hosts: Vec<&str> = targets.iter().map(|(t, _)| t.name.as_str()).collect();
        let key = SiteKey::new(self.config, self.domain, &hosts, tls);
        let site = self.ctx.sites.get(self.config, key);
        site.acquire(self.shutdown).await
    }
}

/// Where TLS-RPT results of one delivery by MX go: the domain asked for reports at `rua`.
struct Rpt<'a> {
    ctx: &'a Arc<Outbound>,
    domain: &'a str,
    rua: Vec<String>,
    /// The policy of hosts DANE does not govern: MTA-STS's, or none.
    sts: PolicyKey,
}

impl Rpt<'_> {
    fn count(&self, policy: PolicyKey, outcome: tls_rpt::Outcome) {
        self.ctx
            .tls_rpt
            .record(self.ctx, self.domain, &self.rua, policy, outcome);
    }

    /// Counts DANE's DNSSEC lookups that gave no valid answer (RFC 8460 §4.3.2.1
    /// `dnssec-invalid`), one failed session each, before any connection.
    fn record_dns_problems(&self, problems: &[dane::DnsProblem]) {
        for problem in problems {
            let policy = PolicyKey {
                kind: tls_rpt::PolicyType::Tlsa,
                strings: Vec::new(),
                mx_hosts: problem.host.iter().cloned().collect(),
            };
            let failure = tls_rpt::Failure {
                result: tls_rpt::ResultType::DnssecInvalid,
                mx_host: problem.host.clone(),
                receiving_ip: None,
            };
            self.count(policy, tls_rpt::Outcome::Failure(failure));
        }
    }

    /// Counts the MX hosts that mandatory DANE (a route's `dane: required`) refused,
    /// one failed session each, before any connection. RFC 8460 §4.3.2.1 `dane-required`
    /// is for a host with no DNSSEC-validated TLSA records; as no DANE policy (and, on
    /// such a route, no MTA-STS policy either: it is not consulted) was found for it, the
    /// session counts under `no-policy-found` (§4.4), with the host in the failure
    /// details. A host whose signed TLSA records are all unusable did publish a DANE
    /// policy: it counts under `tlsa` as `tlsa-invalid`, as it does without mandatory
    /// DANE.
    fn record_dane_required(&self, refused: &[(String, dane::NoDane)]) {
        for (host, why) in refused {
            let (policy, result) = match why {
                dane::NoDane::UnusableTlsa => (
                    PolicyKey {
                        kind: tls_rpt::PolicyType::Tlsa,
                        strings: Vec::new(),
                        mx_hosts: vec![host.clone()],
                    },
                    tls_rpt::ResultType::TlsaInvalid,
                ),
                dane::NoDane::MxInsecure
                | dane::NoDane::AddressesInsecure
                | dane::NoDane::NoTlsa => (PolicyKey::none(), tls_rpt::ResultType::DaneRequired),
            };
            let failure = tls_rpt::Failure {
                result,
                mx_host: Some(host.clone()),
                receiving_ip: None,
            };
            self.count(policy, tls_rpt::Outcome::Failure(failure));
        }
    }

    /// Counts a delivery that went without the domain's MTA-STS policy because it could
    /// not be fetched or was invalid (RFC 8460 §4.3.2.2), before any connection; the
    /// connections then count under the policy that did apply.
    fn record_sts_failure(&self, failure: mta_sts::StsFailure) {
        let policy = PolicyKey {
            kind: tls_rpt::PolicyType::Sts,
            strings: Vec::new(),
            mx_hosts: Vec::new(),
        };
        let failure = tls_rpt::Failure {
            result: tls_rpt::ResultType::of_sts_failure(failure),
            mx_host: None,
            receiving_ip: None,
        };
        self.count(policy, tls_rpt::Outcome::Failure(failure));
    }

    /// Counts one attempt: a TLS session is a success, anything that kept TLS from being
    /// negotiated (as the policy wants it) a failure; other failures (no connection, a
    /// timeout) are not about TLS and are not counted.
    fn record(
        &self,
        dane: &HostPolicy,
        host: &str,
        address: std::net::SocketAddr,
        attempt: &Result<(Connection, bool), ClientError>,
    ) {
        use tls_rpt::{Outcome, ResultType, UnderDane};
        let policy = match dane {
            HostPolicy::Dane(set) => PolicyKey {
                kind: tls_rpt::PolicyType::Tlsa,
                strings: set
                    .records
                    .iter()
                    .map(|t| {
                        let hex: String = t.data.iter().map(|b| format!("{b:02x}")).collect();
                        format!("{} {} {} {hex}", t.usage, t.selector, t.matching)
                    })
                    .collect(),
                mx_hosts: vec![host.to_owned()],
            },
            HostPolicy::TlsRequired => PolicyKey {
                kind: tls_rpt::PolicyType::Tlsa,
                strings: Vec::new(),
                mx_hosts: vec![host.to_owned()],
            },
            HostPolicy::None => self.sts.clone(),
        };
        let failure = |result| {
            Outcome::Failure(tls_rpt::Failure {
                result,
                mx_host: Some(host.to_owned()),
                receiving_ip: Some(address.ip()),
            })
        };
        let under_dane = match dane {
            HostPolicy::Dane(_) => UnderDane::Yes,
            HostPolicy::TlsRequired | HostPolicy::None => UnderDane::No,
        };
        let outcome = match attempt {
            // RFC 8460 §4.3.2.1: TLSA records that are all unusable could not be
            // checked; the session is not a DANE success.
            Ok((connection, _)) if connection.tls_active() && *dane == HostPolicy::TlsRequired => {
                failure(ResultType::TlsaInvalid)
            }
            Ok((connection, _)) if connection.tls_active() => Outcome::Success,
            Ok(_) | Err(ClientError::TlsUnavailable) => failure(ResultType::StartTlsNotSupported),
            Err(ClientError::Tls { cause, .. }) => {
                failure(ResultType::of_tls_failure(*cause, under_dane))
            }
            Err(
                ClientError::Connect { .. }
                | ClientError::Timeout { .. }
                | ClientError::Io { .. }
                | ClientError::Protocol { .. }
                | ClientError::AuthFailed { .. }
                | ClientError::AuthUnavailable
                | ClientError::Rejected { .. }
                | ClientError::MessageTooBig { .. }
                | ClientError::EightBitUnsupported
                | ClientError::Smtputf8Unsupported,
            ) => return,
        };
        self.count(policy, outcome);
    }
}

/// The TLS-RPT `policy` of an MTA-STS policy (RFC 8460 §4.4): its lines, its patterns.
fn sts_key(policy: &Policy) -> PolicyKey {
    let mut strings = vec![
        "version: STSv1".to_owned(),
        format!("mode: {}", policy.mode),
    ];
    strings.extend(policy.mx.iter().map(|mx| format!("mx: {mx}")));
    strings.push(format!("max_age: {}", policy.max_age.as_secs()));
    PolicyKey {
        kind: tls_rpt::PolicyType::Sts,
        strings,
        mx_hosts: policy.mx.clone(),
    }
}

/// Connects to the first target that answers, each as DANE ([`HostPolicy`]) or else the
/// MTA-STS policy asks.
async fn try_targets(
    targets: Vec<(Target, HostPolicy)>,
    client: &ClientConfig,
    require_tls: bool,
    sts: Sts,
    rpt: Option<Rpt<'_>>,
    gate: Option<Gate<'_>>,
) -> Result<Connected, Status> {
    let mut permit = match gate {
        Some(gate) => Some(gate.permit(&targets, client, require_tls, &sts).await?),
        None => None,
    };
    let verified = client.tls == mta_client::TlsMode::Verified;
    let mut last = None;
    for (Target { name, address }, dane) in targets {
        let target = mta_client::Target::Tcp(address);
        let mut testing_failure = None;
        let attempt = match (&dane, &sts) {
            (HostPolicy::Dane(tlsa), _) => connect_dane(tlsa, &target, &name, client).await,
            (HostPolicy::TlsRequired, _) => {
                // RFC 7672 §2.2: unusable TLSA records still make TLS mandatory.
                let mut required = client.clone();
                if required.tls != mta_client::TlsMode::Verified {
                    required.tls = mta_client::TlsMode::Required;
                }
                Connection::connect(&target, &name, &required)
                    .await
                    .map(|c| (c, verified))
            }
            (HostPolicy::None, Sts::Testing { policy, domain }) => {
                let failure = &mut testing_failure;
                connect_testing(policy, domain, &target, &name, client, failure).await
            }
            (HostPolicy::None, Sts::Off | Sts::Enforce) => {
                Connection::connect(&target, &name, client)
                    .await
                    .map(|c| (c, verified))
            }
        };
        if let Some(rpt) = &rpt {
            match testing_failure.take() {
                // RFC 8460 §4.3: under a `testing` policy, what `enforce` would refuse is
                // reported as the failure it is, although the mail then goes without it.
                Some(error) if attempt.is_ok() => rpt.record(&dane, &name, address, &Err(error)),
                Some(_) | None => rpt.record(&dane, &name, address, &attempt),
            }
        }
        match attempt {
            Ok((connection, verified)) => {
                let span = tracing::Span::current();
                span.record(mta_telemetry::spans::field::MX_HOST, name.as_str());
                span.record(
                    mta_telemetry::spans::field::SERVER_PORT,
                    i64::from(address.port()),
                );
                if let Some(version) = connection.tls_version() {
                    span.record(mta_telemetry::spans::field::TLS_VERSION, version);
                }
                if let Some(permit) = permit.as_mut() {
                    permit.connected();
                }
                return Ok((connection, verified, name, permit));
            }
            Err(error) => {
                tracing::info!(host = %mta_telemetry::Escaped(name.as_str()), %address, error = %mta_telemetry::Escaped(&error.to_string()), "connection attempt failed");
                last = Some((name, error, dane.applies()));
            }
        }
    }
    let status = match last {
        Some((_, error, _)) if require_tls => outcome::from_error_requiring_tls(&error),
        Some((host, error, true)) => outcome::from_error_under_dane(&error, &host),
        Some((host, error, false)) if matches!(sts, Sts::Enforce) => {
            outcome::from_error_under_mta_sts(&error, &host)
        }
        Some((_, error, _)) => outcome::from_error(&error),
        None => DeliveryError::NoHost.status(),
    };
    if let Some(permit) = &permit {
        permit.site().connect_failed(&status);
    }
    Err(status)
}

/// One attempt to a host with usable TLSA records: TLS is mandatory and the certificate
/// is judged by those records alone ([`dane::DaneVerifier`]), in a rustls configuration
/// made for this connection. Such a connection counts as verified (REQUIRETLS, RFC 8689).
async fn connect_dane(
    tlsa: &Arc<TlsaSet>,
    target: &mta_client::Target,
    name: &str,
    client: &ClientConfig,
) -> Result<(Connection, bool), ClientError> {
    let mut dane = client.clone();
    dane.tls = mta_client::TlsMode::Verified;
    dane.rustls =
        Some(
            dane::tls_config(tlsa.clone(), name).map_err(|detail| ClientError::Tls {
                cause: mta_client::TlsFailure::Setup,
                detail,
            })?,
        );
    let connection = Connection::connect(target, name, &dane).await?;
    tracing::info!(host = %mta_telemetry::Escaped(name), "DANE: certificate matches the TLSA records");
    Ok((connection, true))
}

/// One attempt under an MTA-STS `testing` policy (RFC 8461 §5): to a host the policy
/// allows, verified TLS is tried first; when that fails on TLS, or when the host is not
/// allowed, a warning says what `enforce` would have done and the configured TLS mode is
/// used. Returns the connection and whether its TLS was verified; the verified attempt's
/// TLS error, if any, goes to `would_fail` (for TLS-RPT).
async fn connect_testing(
    policy: &Policy,
    domain: &str,
    target: &mta_client::Target,
    name: &str,
    client: &ClientConfig,
    would_fail: &mut Option<ClientError>,
) -> Result<(Connection, bool), ClientError> {
    let configured_verified = client.tls == mta_client::TlsMode::Verified;
    if !policy.allows(name) {
        tracing::warn!(
            domain,
            host = name,
            "MTA-STS testing: MX host not in the policy; enforce would skip it"
        );
    } else if !configured_verified {
        let mut strict = client.clone();
        strict.tls = mta_client::TlsMode::Verified;
        match Connection::connect(target, name, &strict).await {
            Ok(connection) => return Ok((connection, true)),
            Err(error @ (ClientError::Tls { .. } | ClientError::TlsUnavailable)) => {
                tracing::warn!(
                    domain,
                    host = name,
                    %error,
                    "MTA-STS testing: no verified TLS to the MX host; enforce would defer"
                );
                *would_fail = Some(error);
            }
            Err(error) => return Err(error),
        }
    }
    Connection::connect(target, name, client)
        .await
        .map(|c| (c, configured_verified))
}

fn client_config(
    config: &MtaConfig,
    lmtp: bool,
    tls: TlsMode,
    auth: Option<&RouteAuth>,
) -> Result<ClientConfig, Status> {
    let c = &config.smtp_client;
    let extra_roots_pem = match &c.ca_file {
        Some(path) => Some(std::fs::read(path).map_err(|e| DeliveryError::LocalFile {
            detail: format!("cannot read smtp_client.ca_file {}: {e}", path.display()),
        })?),
        None => None,
    };
    let read = |path: &std::path::Path| {
        std::fs::read_to_string(path)
            .map(|text| text.trim_end_matches(['\r', '\n']).to_owned())
            .map_err(|e| {
                DeliveryError::LocalFile {
                    detail: format!("cannot read {}: {e}", path.display()),
                }
                .status()
            })
    };
    let auth = match auth {
        Some(auth) => Some(Credentials {
            username: match &auth.username_file {
                Some(path) => read(path)?,
                None => auth.username.clone(),
            },
            password: read(&auth.password_file)?,
        }),
        None => None,
    };
    let mut client = ClientConfig::new(config.hostname.clone());
    client.lmtp = lmtp;
    client.tls = match tls {
        TlsMode::None => mta_client::TlsMode::None,
        TlsMode::Opportunistic => mta_client::TlsMode::Opportunistic,
        TlsMode::Required => mta_client::TlsMode::Required,
        TlsMode::Verified => mta_client::TlsMode::Verified,
    };
    client.extra_roots_pem = extra_roots_pem;
    client.auth = auth;
    client.timeouts = Timeouts {
        connect: c.connect_timeout,
        greeting: c.command_timeout,
        ehlo: c.command_timeout,
        starttls: c.command_timeout,
        auth: c.command_timeout,
        mail: c.command_timeout,
        rcpt: c.command_timeout,
        data_init: c.data_init_timeout,
        data_block: c.data_block_timeout,
        data_done: c.data_done_timeout,
        rset: c.command_timeout,
        quit: c.command_timeout,
    };
    Ok(client)
}

#[cfg(test)]
mod tests {
    use super::tls_required_no;

    #[test]
    fn tls_required_no_is_read_from_the_header_section_only() {
        let cases: &[(&[u8], bool)] = &[
            (b"From: a@b\r\nTLS-Required: No\r\n\r\nbody\r\n", true),
            (b"tls-required:no\n\nbody\n", true),
            (b"TLS-Required:   NO  \r\n\r\n", true),
            (b"From: a@b\r\n\r\nTLS-Required: No\r\n", false),
            (b"TLS-Required: Yes\r\n\r\n", false),
            (b"X-TLS-Required: No\r\n\r\n", false),
            (b"Subject: TLS-Required: No\r\n\r\n", false),
            (b"", false),
        ];
        for (message, expected) in cases {
            assert_eq!(
                tls_required_no(message),
                *expected,
                "{}",
                String::from_utf8_lossy(message)
            );
        }
    }
}
