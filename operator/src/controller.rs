//! Runs the controllers (filled in by the reconcile work).
/// Runs the controllers until shutdown.
pub async fn run(_dns_server: Option<std::net::SocketAddr>) -> crate::Result<()> {
    Ok(())
}
