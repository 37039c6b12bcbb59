//! What every stage shares: the current config, the spool, the scheduler's inbox, and the
//! handles that own their own state (connection admission, the AUTH guard, the rate
//! limiter, the intake switch). Built once, in `server.rs`; holds no logic of its own
//! beyond choosing between them (readiness).
//!
//! Every stage may read the spool through it, but only `cleanup` puts new messages there.
//! The cleanup handle a session stores its messages through is not kept here: cleanup
//! reads the context, so naming it here would make an import cycle. A session is given
//! its handle when it is built (`Session::with_cleanup`; the spool's by default).

use crate::admission::Admission;
use crate::auth_guard::AuthGuard;
use crate::fleet_limits::FleetLimiter;
use crate::queue::inbox::SchedulerHandle;
use crate::spool::Spool;
use crate::tls::Certificates;
use crate::users::Users;
use mta_config::MtaConfig;
use std::sync::{Arc, Mutex, RwLock};

pub struct Context {
    config: RwLock<Arc<MtaConfig>>,
    /// Read by any stage; new messages are written only by cleanup.
    pub spool: Spool,
    pub scheduler: SchedulerHandle,
    /// The TLS certificate, when one is configured.
    pub certificates: Option<Certificates>,
    /// AUTH: credentials, failure counts and password-check permits.
    pub auth: AuthGuard,
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
    /// Open SMTP connections and sessions, against the connection limits.
    pub admission: Arc<Admission>,
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
            auth: AuthGuard::new(users),
            limiter: FleetLimiter::default(),
            signer: RwLock::new(None),
            verifier: None,
            metrics: mta_telemetry::MtaMetrics::new(),
            intake: Intake::default(),
            reload: ReloadState::default(),
            admission: Arc::default(),
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
}
