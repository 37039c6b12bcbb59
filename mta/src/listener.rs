//! Accepts TCP connections on one listening socket, applies the connection limits, and
//! starts a [`Session`] per connection.
//!
//! Never blocks the accept loop: a refused connection gets its `421 4.7.0` from a task of
//! its own, and accept errors (e.g. out of file descriptors) are logged and retried after a
//! short pause instead of ending the listener.

use crate::context::{ConnectionRefused, Context};
use crate::session::{Reply, Session};
use crate::shutdown::Shutdown;
use crate::stream::Stream;
use mta_config::ListenerKind;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

pub async fn run(
    listener: TcpListener,
    kind: ListenerKind,
    ctx: Arc<Context>,
    mut shutdown: Shutdown,
) {
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
        match ctx.admit(peer.ip()) {
            Ok(slot) => {
                let ctx = ctx.clone();
                let shutdown = shutdown.clone();
                tokio::spawn(async move {
                    if let Some(stream) = open(stream, kind, &ctx).await {
                        Session::new(stream, ctx, peer, kind).run(shutdown).await;
                    }
                    drop(slot);
                });
            }
            Err(refused) => {
                tracing::warn!(peer = %peer, ?refused, "connection refused by limit");
                let reply = match refused {
                    ConnectionRefused::Total => Reply::TOO_MANY_CONNECTIONS,
                    ConnectionRefused::PerIp => Reply::TOO_MANY_CONNECTIONS_FROM_IP,
                };
                tokio::spawn(refuse(stream, reply));
            }
        }
    }
}

/// Plain for `smtp` and `submission`; for `smtps`, the TLS handshake comes first (RFC
/// 8314). A failed handshake ends this connection only.
async fn open(stream: TcpStream, kind: ListenerKind, ctx: &Context) -> Option<Stream<TcpStream>> {
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
            tracing::info!(error = %e, "implicit TLS handshake failed");
            None
        }
        Err(_) => None,
    }
}

async fn refuse(mut stream: TcpStream, reply: Reply) {
    let mut out = Vec::new();
    reply.write_to(&mut out);
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.write_all(&out)).await;
}
