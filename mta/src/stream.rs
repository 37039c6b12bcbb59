//! A server connection that is plain text now and may become TLS later (STARTTLS), or is
//! TLS from the start (implicit TLS on `smtps`). The session reads and writes through this
//! without caring which. The plain-or-TLS switch itself is `mta_client::MaybeTls`, shared
//! with the outbound client.

use std::io;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::server::TlsStream;

pub type Stream<S> = mta_client::MaybeTls<S, TlsStream<S>>;

/// The negotiated protocol version, e.g. `TLSv1_3`, when TLS is active.
pub fn tls_version<S>(stream: &Stream<S>) -> Option<String> {
    let (_, connection) = stream.tls()?.get_ref();
    connection.protocol_version().map(|v| format!("{v:?}"))
}

/// Runs a server handshake on the plain stream. On failure the stream is gone.
pub async fn upgrade<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut Stream<S>,
    acceptor: tokio_rustls::TlsAcceptor,
) -> io::Result<()> {
    let plain = stream
        .take_plain()
        .ok_or_else(|| io::Error::other("TLS is already active"))?;
    let tls = acceptor.accept(plain).await?;
    *stream = Stream::Tls(Box::new(tls));
    Ok(())
}
