//! What every stage shares: the current config, the spool, the scheduler's inbox and the
//! connection counters.

use crate::fleet_limits::FleetLimiter;
use crate::queue::inbox::SchedulerHandle;
use crate::spool::Spool;
use crate::tls::Certificates;
use crate::users::Users;
use mta_config::MtaConfig;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};

pub struct Context {
    config: RwLock<Arc<MtaConfig>>,
    pub spool: Spool,
    pub scheduler: SchedulerHandle,
    /// The TLS certificate, when one is configured.
    pub certificates: Option<Certificates>,
    /// AUTH credentials, when `smtpd.auth_users_file` is set.
    pub users: Option<Arc<Users>>,
    /// Message and recipient rates: this pod's, or the fleet's when
    /// `smtpd.rate_limits.redis` is set (replaced at start, see [`FleetLimiter::start`]).
    pub limiter: FleetLimiter,
    /// DKIM signer for the configured keys; replaced on config reload.
    signer: RwLock<Option<Arc<mta_auth::Signer>>>,
    /// SPF/DKIM/DMARC and DNSBL checks, when any are configured at start.
    pub verifier: Option<mta_auth::Verifier>,
    /// Counters and histograms (Prometheus and OTLP).
    pub metrics: mta_telemetry::MtaMetrics,
    /// Whether new mail is taken: not while draining (a drain, or shutdown).
    pub intake: Intake,
    /// Outcome of the last config reload.
    pub reload: ReloadState,
    /// Recent AUTH failures per source and per source and user.
    auth_failures: crate::limits::AuthFailures,
    /// Password checks running at once (each Argon2 check holds its memory cost, 19 MiB
    /// by default): taken before the check starts, granted in arrival order.
    pub password_checks: Arc<tokio::sync::Semaphore>,
    connections: Mutex<Connections>,
    /// Open sessions, for closing the one waiting longest when `max_connections` is
    /// reached (issue 13, item 6).
    pub sessions: Arc<crate::pressure::Sessions>,
}

/// The outcome of the last config reload, for health reporting.
#[derive(Debug, Default)]
pub struct ReloadState {
    /// Why the newest config file was refused; `None` when the config in force is the
    /// newest one.
    pub last_error: Mutex<Option<String>>,
}

impl ReloadState {
    pub fn error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
    pub fn set(&self, error: Option<String>) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = error;
    }
}

/// Whether this MTA takes new mail. While draining (a drain was asked for, or shutdown has
/// begun), new SMTP connections get `421 4.3.2 … draining`, a session waiting for its
/// next command is closed with the same reply (one in the middle of a message finishes
/// it), and `/readyz` says `503 not ready: draining`.
#[derive(Debug)]
pub struct Intake {
    draining: tokio::sync::watch::Sender<bool>,
}

impl Default for Intake {
    fn default() -> Self {
        Self {
            draining: tokio::sync::watch::Sender::new(false),
        }
    }
}

impl Intake {
    /// Stops taking new mail.
    pub fn stop(&self) {
        self.draining.send_replace(true);
    }

    /// Takes new mail again (a drain was cancelled).
    pub fn resume(&self) {
        self.draining.send_replace(false);
    }

    pub fn is_draining(&self) -> bool {
        *self.draining.borrow()
    }

    /// Completes once draining (at once if already).
    pub async fn draining(&self) {
        let mut watch = self.draining.subscribe();
        let _ = watch.wait_for(|draining| *draining).await;
    }
}

#[derive(Default)]
struct Connections {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// Why a connection was refused before its session started.
#[derive(Debug, PartialEq, Eq)]
pub enum ConnectionRefused {
    /// `smtpd.max_connections` reached.
    Total,
    /// `smtpd.max_connections_per_ip` reached for this address.
    PerIp,
}

/// Counts one open connection until dropped: against `smtpd.max_connections` always, and
/// against `smtpd.max_connections_per_ip` once its client address is known.
pub struct ConnectionSlot {
    ctx: Arc<Context>,
    ip: Option<IpAddr>,
}

impl ConnectionSlot {
    /// Counts this connection for client `ip` too, or says that `ip` has too many. On a
    /// `proxy_protocol` listener this happens after the header, with the client's address
    /// rather than the proxy's. Counts once: a second call does nothing.
    pub fn count_ip(&mut self, ip: IpAddr) -> Result<(), ConnectionRefused> {
        if self.ip.is_some() {
            return Ok(());
        }
        let config = self.ctx.config();
        let max = config.smtpd.max_connections_per_ip;
        // Trusted clients are counted but not limited (issue 13, item 11).
        let exempt = config.limits_exempt(ip);
        let mut conns = self.ctx.connections();
        if !exempt && conns.per_ip.get(&ip).is_some_and(|n| *n >= max) {
            return Err(ConnectionRefused::PerIp);
        }
        *conns.per_ip.entry(ip).or_default() += 1;
        self.ip = Some(ip);
        Ok(())
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut conns = self.ctx.connections();
        conns.total -= 1;
        if let Some(ip) = self.ip
            && let Some(n) = conns.per_ip.get_mut(&ip)
        {
            *n -= 1;
            if *n == 0 {
                conns.per_ip.remove(&ip);
            }
        }
    }
}

impl Context {
    pub fn new(
        config: MtaConfig,
        spool: Spool,
        scheduler: SchedulerHandle,
        certificates: Option<Certificates>,
        users: Option<Users>,
    ) -> Self {
        Self {
            config: RwLock::new(Arc::new(config)),
            spool,
            scheduler,
            certificates,
            users: users.map(Arc::new),
            limiter: FleetLimiter::default(),
            signer: RwLock::new(None),
            verifier: None,
            metrics: mta_telemetry::MtaMetrics::new(),
            intake: Intake::default(),
            reload: ReloadState::default(),
            auth_failures: Default::default(),
            password_checks: Arc::new(tokio::sync::Semaphore::new(
                crate::users::MAX_CONCURRENT_CHECKS,
            )),
            connections: Mutex::new(Connections::default()),
            sessions: Default::default(),
        }
    }

    /// The config in force now. Sessions keep the snapshot they started with.
    pub fn config(&self) -> Arc<MtaConfig> {
        self.config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replaces the config (hot reload). The caller has validated it.
    pub fn set_config(&self, config: MtaConfig) {
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
    }

    /// Takes a connection slot for `ip`, or says which limit refuses it.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<ConnectionSlot, ConnectionRefused> {
        let mut slot = self.admit_connection()?;
        slot.count_ip(ip)?;
        Ok(slot)
    }

    /// Takes a connection slot whose client address is not known yet (a `proxy_protocol`
    /// listener before the header); [`ConnectionSlot::count_ip`] adds it later.
    pub fn admit_connection(self: &Arc<Self>) -> Result<ConnectionSlot, ConnectionRefused> {
        let max = self.config().smtpd.max_connections;
        let mut conns = self.connections();
        if conns.total >= max {
            return Err(ConnectionRefused::Total);
        }
        conns.total += 1;
        Ok(ConnectionSlot {
            ctx: self.clone(),
            ip: None,
        })
    }

    /// Why this MTA should not get new traffic now, if it should not: draining, spool not
    /// writable, or a refused config file (what `/readyz` reports).
    pub fn readiness(&self) -> Result<(), String> {
        if self.intake.is_draining() {
            return Err("draining".into());
        }
        self.spool
            .healthy()
            .map_err(|e| format!("spool not writable: {e}"))?;
        if let Some(e) = self.reload.error() {
            return Err(format!("config file refused: {e}"));
        }
        Ok(())
    }

    /// The DKIM signer in force.
    pub fn signer(&self) -> Option<Arc<mta_auth::Signer>> {
        self.signer
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replaces the DKIM signer (start-up and config reload).
    pub fn set_signer(&self, signer: Option<mta_auth::Signer>) {
        *self.signer.write().unwrap_or_else(|e| e.into_inner()) = signer.map(Arc::new);
    }

    /// Whether AUTH attempts from `ip` (as `user`, once known) are refused for now: too
    /// many failures from that source, or from it against that user, or (while failures
    /// everywhere run high) any recent failure from it. Never because of failures that
    /// other sources caused.
    pub fn auth_blocked(&self, ip: IpAddr, user: Option<&str>) -> bool {
        self.auth_failures.blocked(ip, user)
    }

    /// Records a failed AUTH.
    pub fn auth_failed(&self, ip: IpAddr, user: &str) {
        self.auth_failures.failed(ip, user);
    }

    /// SMTP connections open now (sessions, and connections waiting for their PROXY
    /// header or TLS handshake).
    pub fn open_connections(&self) -> usize {
        self.connections().total
    }

    fn connections(&self) -> std::sync::MutexGuard<'_, Connections> {
        self.connections.lock().unwrap_or_else(|e| e.into_inner())
    }
}
