//! An HTTP/1.1 connection over verified TLS, for the two HTTPS exchanges of outbound TLS
//! policy: fetching an MTA-STS policy (`mta_sts`) and posting a TLS-RPT report
//! (`smtp::tls_rpt`). The certificate is checked for the host name against the Mozilla
//! roots plus the configured extra roots. It only connects: requests, answers and
//! timeouts are the callers'.

use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::Arc;

/// Why no connection was made.
pub enum ConnectError {
    /// The TLS handshake failed: its kind (a certificate problem or otherwise) and why.
    Tls {
        failure: mta_client::TlsFailure,
        detail: String,
    },
    /// Anything else: the TLS setup, the host name, every address refused, HTTP.
    Other(String),
}

impl From<String> for ConnectError {
    fn from(detail: String) -> Self {
        ConnectError::Other(detail)
    }
}

/// Connects to the first of `addresses` that accepts, verifies `host`'s certificate and
/// starts HTTP/1.1. The connection is driven by a task in the returned set, aborted when
/// the set is dropped: keep it while the sender is in use.
pub async fn connect<B>(
    host: &str,
    addresses: &[SocketAddr],
    extra_roots_pem: Option<&[u8]>,
) -> Result<(SendRequest<B>, tokio::task::JoinSet<()>), ConnectError>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut tls = (*mta_client::verified_tls_config(extra_roots_pem)?).clone();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let server_name = rustls_pki_types::ServerName::try_from(host.to_owned())
        .map_err(|e| format!("{host:?} is not a TLS server name: {e}"))?;
    let mut last_error = format!("{host} has no address");
    let mut tcp = None;
    for &address in addresses {
        match tokio::net::TcpStream::connect(address).await {
            Ok(stream) => {
                tcp = Some(stream);
                break;
            }
            Err(e) => last_error = format!("cannot connect to {host} ({address}): {e}"),
        }
    }
    let tcp = tcp.ok_or(last_error)?;
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(server_name, tcp)
        .await
        .map_err(|e| ConnectError::Tls {
            failure: mta_client::TlsFailure::of_handshake(&e),
            detail: format!("TLS with {host}: {e}"),
        })?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP with {host}: {e}"))?;
    let mut driver = tokio::task::JoinSet::new();
    driver.spawn(async move {
        let _ = connection.await;
    });
    Ok((sender, driver))
}
