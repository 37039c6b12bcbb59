//! Hot reload of the config file.
//!
//! The file is checked every [`POLL_INTERVAL`] (a mounted ConfigMap changes by a symlink
//! swap, which inotify on the path would miss) and on SIGHUP. A changed file is parsed and
//! validated with the same code as at start-up:
//! * valid: it becomes the config for new sessions, scheduling decisions and deliveries at
//!   once; listeners that disappeared stop accepting (their sessions finish), new ones are
//!   bound. Settings that need a restart (spool path, TLS and users file *names*, admin
//!   address, the rate limits' Redis URL and timeout) are logged as such; the *contents* of the TLS and users files are reloaded
//!   on their own.
//! * invalid: refused with a log line; the old config stays, and the error is kept in
//!   [`crate::context::ReloadState`] for the health endpoint.

use crate::context::Context;
use crate::files::stamp;
use crate::shutdown::Shutdown;
use mta_config::{ListenerConfig, ListenerKind, MtaConfig};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

pub const POLL_INTERVAL: Duration = Duration::from_secs(2);

/// A running listener and how to stop it.
pub struct RunningListener {
    pub bound: SocketAddr,
    pub stop: oneshot::Sender<()>,
}

/// The listeners currently open, by their configured (address, kind).
pub type Listeners = HashMap<(SocketAddr, ListenerKind), RunningListener>;

/// Starts a listener task that ends on shutdown or when its `stop` fires.
pub fn spawn_listener(
    socket: TcpListener,
    configured: ListenerConfig,
    ctx: Arc<Context>,
    shutdown: Shutdown,
) -> RunningListener {
    let bound = socket
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let (stop, stopped) = oneshot::channel();
    tokio::spawn(async move {
        tokio::select! {
            () = crate::listener::run(socket, configured, ctx, shutdown) => {}
            _ = stopped => tracing::info!(%bound, "listener closed by config reload"),
        }
    });
    RunningListener { bound, stop }
}

/// Watches `path` until shutdown.
pub async fn watch(
    path: PathBuf,
    ctx: Arc<Context>,
    mut listeners: Listeners,
    subscribe: impl Fn() -> Shutdown + Send + 'static,
    mut shutdown: Shutdown,
) {
    let mut seen = stamp(&path);
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        let forced = tokio::select! {
            () = tokio::time::sleep(POLL_INTERVAL) => false,
            _ = async { match hangup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
            () = shutdown.recv() => return,
        };
        let now = stamp(&path);
        // A refused file is tried again on every poll: what it names may appear later (a
        // DKIM key Secret mounted after the ConfigMap that refers to it).
        let refused = ctx.reload.error().is_some();
        if now == seen && !forced && !refused {
            continue;
        }
        seen = now;
        // DKIM keys are loaded before anything changes: a config naming an unreadable key
        // is refused whole, like any other invalid config.
        let loaded = MtaConfig::from_file(&path)
            .map_err(|e| e.to_string())
            .and_then(|config| crate::signing::signer(&config.dkim).map(|signer| (config, signer)));
        match loaded {
            Ok((config, (signer, keys))) => {
                ctx.set_signer(signer);
                ctx.metrics.set_dkim_keys(&keys);
                apply(&ctx, config, &mut listeners, &subscribe).await;
            }
            Err(e) => {
                // Logged once per distinct problem, not on every retry.
                if ctx.reload.error().as_deref() != Some(e.as_str()) {
                    tracing::error!(file = %path.display(), error = %e, "config reload refused; keeping the running config");
                }
                ctx.reload.set(Some(e));
            }
        }
    }
}

/// Makes `config` the running config and reconciles the listeners.
pub async fn apply(
    ctx: &Arc<Context>,
    config: MtaConfig,
    listeners: &mut Listeners,
    subscribe: &impl Fn() -> Shutdown,
) {
    let old = ctx.config();
    let redis_changed = ctx
        .limiter
        .reconfigure(config.smtpd.rate_limits.redis.as_ref());
    for (what, changed) in [
        ("spool.path", old.spool.path != config.spool.path),
        ("tls file names", old.tls != config.tls),
        (
            "smtpd.auth_users_file",
            old.smtpd.auth_users_file != config.smtpd.auth_users_file,
        ),
        ("admin (address, token_file)", old.admin != config.admin),
        ("smtpd.rate_limits.redis (url, timeout)", redis_changed),
    ] {
        if changed {
            tracing::warn!(
                setting = what,
                "changed in the config file; takes effect after a restart"
            );
        }
    }
    // Listeners are keyed by address and kind; their other settings (PROXY protocol) are
    // read from the config in force at each accept, so a change needs no rebind.
    let wanted: Vec<ListenerConfig> = config.listeners.clone();
    ctx.set_config(config);
    ctx.reload.set(None);

    listeners.retain(|key, _| wanted.iter().any(|l| (l.address, l.kind) == *key));
    // Dropping a RunningListener fires its stop channel.
    for listener in wanted {
        let key = (listener.address, listener.kind);
        if listeners.contains_key(&key) {
            continue;
        }
        match TcpListener::bind(key.0).await {
            Ok(socket) => {
                let running = spawn_listener(socket, listener, ctx.clone(), subscribe());
                tracing::info!(address = %running.bound, kind = ?key.1, "listener opened by config reload");
                println!("petrel-mta: listening for SMTP on {}", running.bound);
                listeners.insert(key, running);
            }
            Err(e) => {
                tracing::error!(address = %key.0, error = %e, "cannot open listener from reloaded config");
                ctx.reload
                    .set(Some(format!("cannot listen on {}: {e}", key.0)));
            }
        }
    }
    tracing::info!("config reloaded");
}
