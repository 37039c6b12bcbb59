//! Assembles a running MTA from a config: opens the spool (recovering what it holds),
//! starts the scheduler, binds the listeners. Used by `petrel-mta serve` and by tests,
//! which bind port 0 and read the real addresses back.

use crate::context::Context;
use crate::drain::Drain;
use crate::qmgr::{self, SchedulerHandle};
use crate::reload::{self, Listeners};
use crate::shutdown::Trigger;
use crate::spool::{self, Spool};
use crate::tls::Certificates;
use crate::users::Users;
use mta_config::MtaConfig;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot open spool at {path}: {source}")]
    Spool {
        path: std::path::PathBuf,
        source: spool::Error,
    },
    #[error("cannot listen on {address}: {source}")]
    Bind {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("tls: {0}")]
    Tls(String),
    #[error("smtpd.auth_users_file: {0}")]
    Users(String),
    #[error("{0}")]
    Dkim(String),
    #[error("{0}")]
    RateLimits(String),
    #[error("cannot write the admin token to {path}: {source}")]
    AdminToken {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// The spool identity, the hand-over origins record or the drained marker.
    #[error("drain state in {path}: {source}")]
    Drain {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

pub struct Server {
    pub ctx: Arc<Context>,
    /// Drain on scale-in, and hand-overs from draining peers.
    pub drain: Arc<Drain>,
    trigger: Trigger,
    /// Bound addresses, in the order of `config.listeners`.
    pub addresses: Vec<SocketAddr>,
    /// Listeners, when no reloader owns them (dropping one closes it).
    _listeners: Option<Listeners>,
    /// Where `/metrics`, `/healthz` and `/readyz` are served, if anywhere.
    pub http_address: Option<SocketAddr>,
    /// Stops the HTTP endpoint (dropped at the end of shutdown).
    http_stop: Option<tokio::sync::oneshot::Sender<()>>,
    /// Where the admin endpoint listens.
    pub admin_address: Option<SocketAddr>,
    /// The file holding the admin endpoint's token (0600).
    pub admin_token_file: PathBuf,
    /// Messages found in the spool at start.
    pub recovered: usize,
}

impl Server {
    /// Starts everything. With `config_path`, the file is watched and reloaded.
    pub async fn start(
        config: MtaConfig,
        config_path: Option<PathBuf>,
    ) -> Result<Server, StartError> {
        let metrics = mta_telemetry::MtaMetrics::new();
        let certificates =
            Certificates::load(&config.tls, &config.hostname, &metrics).map_err(StartError::Tls)?;
        let users = match &config.smtpd.auth_users_file {
            Some(path) => Some(Users::load(path).map_err(StartError::Users)?),
            None => None,
        };
        let observer: crate::spool::SyncObserver = {
            let metrics = metrics.clone();
            Arc::new(move |latency, batch| metrics.spool_sync(latency, batch))
        };
        let spool = open_spool(&config, observer)
            .await
            .map_err(|source| StartError::Spool {
                path: config.spool.path.clone(),
                source,
            })?;
        let mut sockets = Vec::new();
        for listener in &config.listeners {
            let socket = TcpListener::bind(listener.address)
                .await
                .map_err(|source| StartError::Bind {
                    address: listener.address,
                    source,
                })?;
            sockets.push(socket);
        }
        let addresses = sockets
            .iter()
            .zip(&config.listeners)
            .map(|(s, l)| s.local_addr().unwrap_or(l.address))
            .collect();

        let trigger = Trigger::new();
        let (handle, commands) = SchedulerHandle::channel();
        let configured = config.listeners.clone();
        let (signer, dkim_keys) = crate::signing::signer(&config.dkim).map_err(StartError::Dkim)?;
        let verifier = if config.mail_auth.verify || !config.mail_auth.dnsbl_zones.is_empty() {
            Some(
                mta_auth::Verifier::with_query_timeout(
                    &config.dns.nameservers,
                    config.mail_auth.dns_timeout,
                )
                .map_err(|e| StartError::Dkim(format!("resolver for mail_auth: {e}")))?,
            )
        } else {
            None
        };
        let mut context = Context::new(config, spool, handle, certificates, users);
        context.verifier = verifier;
        context.metrics = metrics;
        context.limiter = crate::fleet_limits::FleetLimiter::start(
            context.config().smtpd.rate_limits.redis.as_ref(),
            context.metrics.clone(),
        )
        .map_err(StartError::RateLimits)?;
        context.metrics.set_dkim_keys(&dkim_keys);
        context.set_signer(signer);
        let ctx = Arc::new(context);
        // Everything in the spool now was recovered; the scheduler learns of it in the
        // background (crate::recovery) while mail is taken.
        let count = ctx.spool.len();
        // What start-up recovery schedules: every message in the spool now, before any
        // listener takes new mail.
        let backlog = (ctx.spool.last_id(), ctx.spool.len());
        if count > 0 {
            tracing::info!(
                messages = count,
                "queued messages in the spool: scheduling them in the background"
            );
        }
        let drain = Drain::open(ctx.clone()).map_err(|source| StartError::Drain {
            path: ctx.config().spool.path.clone(),
            source,
        })?;
        tokio::spawn(crate::recovery::run(ctx.clone(), drain.clone(), backlog));
        tokio::spawn(crate::memory::trim_periodically());
        tokio::spawn(drain.clone().run(trigger.subscribe()));
        let outbound = Arc::new(crate::delivery::Outbound::new(ctx.clone()));
        tokio::spawn(qmgr::run(
            ctx.clone(),
            outbound.clone(),
            commands,
            trigger.subscribe(),
        ));
        crate::delivery::smtp::tls_rpt::start(outbound.clone(), trigger.subscribe());
        let admin = TcpListener::bind(ctx.config().admin.address)
            .await
            .map_err(|source| StartError::Bind {
                address: ctx.config().admin.address,
                source,
            })?;
        let admin_address = admin.local_addr().ok();
        let admin_token_file = ctx.config().admin_token_file();
        let admin_token = crate::admin::Token::create(&admin_token_file).map_err(|source| {
            StartError::AdminToken {
                path: admin_token_file.clone(),
                source,
            }
        })?;
        let mut http_stop = None;
        let http_address = match ctx.config().http.address {
            Some(address) => {
                let http = TcpListener::bind(address)
                    .await
                    .map_err(|source| StartError::Bind { address, source })?;
                let bound = http.local_addr().ok();
                let readiness_ctx = ctx.clone();
                let readiness: Arc<dyn mta_telemetry::Readiness> =
                    Arc::new(move || readiness_ctx.readiness());
                // Stopped only after draining, so /readyz can say "draining" meanwhile.
                let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
                http_stop = Some(stop);
                // The fleet's /admin/drain and /admin/handoff beside the probes.
                let routes = mta_telemetry::http::router(ctx.metrics.clone(), readiness)
                    .merge(crate::drain::http::router(drain.clone()));
                tokio::spawn(async move {
                    let served = axum::serve(http, routes)
                        .with_graceful_shutdown(async move {
                            let _ = stopped.await;
                        })
                        .await;
                    if let Err(e) = served {
                        tracing::error!(error = %e, "HTTP endpoint stopped");
                    }
                });
                bound
            }
            None => None,
        };
        tokio::spawn(crate::admin::serve(
            admin,
            admin_token,
            ctx.clone(),
            drain.clone(),
            outbound,
            trigger.subscribe(),
        ));
        let mut listeners = Listeners::new();
        for (socket, configured) in sockets.into_iter().zip(configured) {
            let key = (configured.address, configured.kind);
            let running =
                reload::spawn_listener(socket, configured, ctx.clone(), trigger.subscribe());
            listeners.insert(key, running);
        }
        // Without a file there is nothing to reload: the server keeps the listeners.
        let mut kept = None;
        match config_path {
            Some(path) => {
                let base = trigger.subscribe();
                tokio::spawn(reload::watch(
                    path,
                    ctx.clone(),
                    listeners,
                    move || base.clone(),
                    trigger.subscribe(),
                ));
            }
            None => kept = Some(listeners),
        }
        Ok(Server {
            ctx,
            drain,
            trigger,
            addresses,
            admin_address,
            admin_token_file,
            http_address,
            http_stop,
            recovered: count,
            _listeners: kept,
        })
    }

    /// Stops accepting, lets sessions finish their message, waits for deliveries in
    /// progress, and returns.
    pub async fn shutdown(self) {
        self.ctx.intake.stop();
        self.trigger.shutdown().await;
        drop(self.http_stop);
    }
}

/// How long a start waits for another owner of the spool to let go of it: an MTA
/// restarting in place, or a volume-drain Job on its way out.
const SPOOL_LOCK_WAIT: Duration = Duration::from_secs(30);

/// Opens the spool, waiting up to [`SPOOL_LOCK_WAIT`] while another MTA still has it.
async fn open_spool(
    config: &MtaConfig,
    observer: crate::spool::SyncObserver,
) -> Result<Spool, crate::spool::Error> {
    let deadline = tokio::time::Instant::now() + SPOOL_LOCK_WAIT;
    let mut said = false;
    loop {
        match Spool::open_observed(
            &config.spool.path,
            config.spool.segment_size,
            Some(observer.clone()),
        ) {
            Err(crate::spool::Error::InUse { dir }) if tokio::time::Instant::now() < deadline => {
                if !said {
                    tracing::warn!(spool = %dir.display(), wait_secs = SPOOL_LOCK_WAIT.as_secs(), "spool in use by another petrel-mta: waiting for it to stop");
                    said = true;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            opened => return opened,
        }
    }
}
