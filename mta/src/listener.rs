//! Accepts TCP connections on one listening socket, applies the connection limits, reads
//! the PROXY protocol header where the listener expects one, and starts a [`Session`] per
//! connection.
//!
//! Never blocks the accept loop: a refused connection gets its `421 4.7.0` from a task of
//! its own, the PROXY header and the implicit TLS handshake are read in the connection's
//! task, and accept errors (e.g. out of file descriptors) are logged and retried after a
//! short pause instead of ending the listener.
//!
//! While the MTA drains (issue 16), every new connection gets `421 4.3.2 <host> draining,
//! try another server` at once and is closed, before any limit or header: it takes no
//! slot and starts no session.
//!
//! Order on a connection: `smtpd.max_connections` at accept → the PROXY header (when
//! `proxy_protocol` is on) → `smtpd.max_connections_per_ip` on the client address →
//! the TLS handshake (`smtps`) → the session. Behind a proxy the per-IP limit must wait
//! for the header: at accept, every connection comes from the proxy's address, and
//! limiting that would cap the whole service at one client's share.
//!
//! At `smtpd.max_connections`, a new connection is admitted in place of the session that
//! has waited longest for a command, when one has waited `smtpd.pressure_idle_timeout`
//! (see `crate::pressure`); otherwise it is refused.

use crate::admission::{ConnectionRefused, ConnectionSlot};
use crate::context::Context;
use crate::pressure::Evicted;
use crate::proxy;
use crate::session::{Reply, Session};
use crate::shutdown::Shutdown;
use crate::stream::Stream;
use mta_config::{ListenerConfig, ListenerKind, MtaConfig};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

/// Serves `listener`, configured as `configured`. Settings that can change on reload
/// without rebinding (PROXY protocol) are looked up in the config in force at each accept.
pub async fn run(
    listener: TcpListener,
    configured: ListenerConfig,
    ctx: Arc<Context>,
    mut shutdown: Shutdown,
) {
    let kind = configured.kind;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.recv() => return,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let config = ctx.config();
        if ctx.intake.is_draining() {
            tracing::debug!(peer = %peer, "connection turned away: draining");
            tokio::spawn(turn_away(stream, Reply::draining(&config.hostname)));
            continue;
        }
        let current = current_settings(&config, &configured);
        let inbound_checks = current.inbound_checks;
        let proxied = match expects_proxy_header(current, peer) {
            Ok(proxied) => proxied,
            Err(e) => {
                ctx.metrics.proxy_header(e.metric_label());
                tracing::warn!(peer = %peer, error = %e, "connection closed");
                continue;
            }
        };
        let admitted = match proxied {
            ProxyHeader::Expected => ctx.admission.admit_connection(&config),
            ProxyHeader::NotExpected => ctx.admission.admit(&config, peer.ip()),
        };
        match admitted {
            Ok(slot) => {
                let ctx = ctx.clone();
                let shutdown = shutdown.clone();
                tokio::spawn(async move {
                    let connection = Connection {
                        stream,
                        socket_peer: peer,
                        kind,
                        inbound_checks,
                        slot,
                    };
                    connection.serve(proxied, ctx, shutdown).await;
                });
            }
            Err(ConnectionRefused::Total) => {
                // Connection pressure: make room by closing the session that has waited
                // longest for a command, if one has waited long enough.
                let min_wait = config.smtpd.pressure_idle_timeout;
                let Some(evicted) = ctx.admission.sessions.evict_longest_waiting(min_wait) else {
                    tracing::warn!(peer = %peer, refused = ?ConnectionRefused::Total, "connection refused by limit");
                    tokio::spawn(refuse(stream, ConnectionRefused::Total));
                    continue;
                };
                let connection = Pending {
                    stream,
                    peer,
                    kind,
                    inbound_checks,
                    proxied,
                };
                tokio::spawn(connection.admit_after(evicted, ctx.clone(), shutdown.clone()));
            }
            Err(refused) => {
                tracing::warn!(peer = %peer, ?refused, "connection refused by limit");
                tokio::spawn(refuse(stream, refused));
            }
        }
    }
}

/// A connection refused by `max_connections` for which a waiting session is closing.
struct Pending {
    stream: TcpStream,
    peer: SocketAddr,
    kind: ListenerKind,
    inbound_checks: bool,
    proxied: ProxyHeader,
}

impl Pending {
    /// Admits the connection once the evicted session's slot is free (refuses it if
    /// another connection took the slot first).
    async fn admit_after(self, evicted: Evicted, ctx: Arc<Context>, shutdown: Shutdown) {
        // The session answers and closes at once; the bound only guards against a peer
        // that does not read its reply (the write is bounded by `command_timeout`).
        let _ = tokio::time::timeout(EVICTION_WAIT, evicted).await;
        let config = ctx.config();
        let admitted = match self.proxied {
            ProxyHeader::Expected => ctx.admission.admit_connection(&config),
            ProxyHeader::NotExpected => ctx.admission.admit(&config, self.peer.ip()),
        };
        match admitted {
            Ok(slot) => {
                tracing::info!(peer = %self.peer, "connection admitted in place of a waiting session");
                let connection = Connection {
                    stream: self.stream,
                    socket_peer: self.peer,
                    kind: self.kind,
                    inbound_checks: self.inbound_checks,
                    slot,
                };
                connection.serve(self.proxied, ctx, shutdown).await;
            }
            Err(refused) => {
                tracing::warn!(peer = %self.peer, ?refused, "connection refused by limit");
                refuse(self.stream, refused).await;
            }
        }
    }
}

/// Longest wait for an evicted session to give up its slot.
const EVICTION_WAIT: Duration = Duration::from_secs(10);

/// Whether a connection starts with a PROXY header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProxyHeader {
    Expected,
    NotExpected,
}

/// The listener's settings in the config in force now, so a reload changes them without a
/// rebind. A listener is only removed by a reload after the new config is in force, so for
/// a moment it may not be in the config: it then keeps the settings it started with.
fn current_settings<'a>(
    config: &'a MtaConfig,
    configured: &'a ListenerConfig,
) -> &'a ListenerConfig {
    config
        .listeners
        .iter()
        .find(|l| l.address == configured.address && l.kind == configured.kind)
        .unwrap_or(configured)
}

/// Whether a connection from `peer` starts with a PROXY header; an error when the
/// listener wants one but `peer` may not send it.
fn expects_proxy_header(
    current: &ListenerConfig,
    peer: SocketAddr,
) -> Result<ProxyHeader, proxy::Error> {
    if !current.proxy_protocol {
        return Ok(ProxyHeader::NotExpected);
    }
    if !proxy::trusted(current, peer.ip()) {
        return Err(proxy::Error::Untrusted(peer.ip()));
    }
    Ok(ProxyHeader::Expected)
}

/// An accepted connection until its session starts.
struct Connection {
    stream: TcpStream,
    /// The TCP peer: the client, or the proxy in front of it.
    socket_peer: SocketAddr,
    kind: ListenerKind,
    /// The listener's `inbound_checks`.
    inbound_checks: bool,
    /// Held until the session ends.
    slot: ConnectionSlot,
}

impl Connection {
    async fn serve(mut self, header: ProxyHeader, ctx: Arc<Context>, shutdown: Shutdown) {
        let peer = match header {
            ProxyHeader::NotExpected => self.socket_peer,
            ProxyHeader::Expected => {
                let Some(client) = self.read_proxy_header(&ctx).await else {
                    return;
                };
                if let Err(refused) = self.slot.count_ip(&ctx.config(), client.ip()) {
                    tracing::warn!(peer = %client, proxy = %self.socket_peer, ?refused, "connection refused by limit");
                    return refuse(self.stream, refused).await;
                }
                client
            }
        };
        if let Some(stream) = open(self.stream, self.kind, &ctx, peer).await {
            let registration = ctx.admission.sessions.register();
            Session::new(stream, ctx, peer, self.kind)
                .with_inbound_checks(self.inbound_checks)
                .with_pressure(registration.handle())
                .run(shutdown)
                .await;
            drop(self.slot);
            // After the slot: a listener waiting for this session to end finds it free.
            drop(registration);
        }
    }

    /// The client address from the PROXY header, or `None` when the connection is to be
    /// closed (logged and counted).
    async fn read_proxy_header(&mut self, ctx: &Context) -> Option<SocketAddr> {
        let limit = ctx.config().smtpd.proxy_header_timeout;
        let read = tokio::time::timeout(limit, proxy::read_header(&mut self.stream)).await;
        match read.unwrap_or(Err(proxy::Error::Timeout(limit))) {
            Ok(origin) => {
                let client = origin.resolve(self.socket_peer);
                ctx.metrics.proxy_header(match origin {
                    proxy::Origin::Client(_) => "ok",
                    proxy::Origin::Socket => "local",
                });
                tracing::debug!(peer = %client, proxy = %self.socket_peer, "PROXY header read");
                Some(client)
            }
            Err(e) => {
                ctx.metrics.proxy_header(e.metric_label());
                tracing::info!(proxy = %self.socket_peer, error = %e, "connection closed");
                None
            }
        }
    }
}

/// Plain for `smtp` and `submission`; for `smtps`, the TLS handshake comes first (RFC
/// 8314). A failed handshake ends this connection only.
async fn open(
    stream: TcpStream,
    kind: ListenerKind,
    ctx: &Context,
    peer: SocketAddr,
) -> Option<Stream<TcpStream>> {
    if kind != ListenerKind::Smtps {
        return Some(Stream::Plain(stream));
    }
    let acceptor = ctx.certificates.as_ref()?.acceptor();
    let timeout = ctx.config().smtpd.command_timeout;
    match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => {
            ctx.metrics.tls_handshake(true);
            Some(Stream::Tls(Box::new(tls)))
        }
        Ok(Err(e)) => {
            ctx.metrics.tls_handshake(false);
            tracing::info!(peer = %peer, error = %e, "implicit TLS handshake failed");
            None
        }
        Err(_) => None,
    }
}

async fn refuse(stream: TcpStream, refused: ConnectionRefused) {
    let reply = match refused {
        ConnectionRefused::Total => Reply::TOO_MANY_CONNECTIONS,
        ConnectionRefused::PerIp => Reply::TOO_MANY_CONNECTIONS_FROM_IP,
    };
    turn_away(stream, reply).await;
}

/// Sends `reply` (a 421) and closes, giving a client that does not read 5 s.
async fn turn_away(mut stream: TcpStream, reply: Reply) {
    let mut out = Vec::new();
    reply.write_to(&mut out);
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.write_all(&out)).await;
}
