//! STARTTLS (RFC 3207): the upgrade of a plain session to TLS.
//!
//! After `220 Ready to start TLS` the session drops every byte it has already read (the
//! rest of the current read and any partial command line), runs the handshake, and starts
//! over as RFC 3207 §4.2 requires: no HELO/EHLO, no transaction, no AUTH.

use super::{Flow, Input, Reply, Session};
use smtp_proto::request::receiver::RequestReceiver;
use tokio::io::{AsyncRead, AsyncWrite};

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    pub(super) fn starttls(&mut self) -> Flow {
        if self.stream.is_tls() {
            return self.error(Reply::TLS_ALREADY_ACTIVE);
        }
        if self.ctx.certificates.is_none() {
            return self.error(Reply::TLS_NOT_AVAILABLE);
        }
        if self.tx.is_some() {
            return self.error(
                Reply::NESTED_MAIL.with_text("STARTTLS is not allowed during a mail transaction"),
            );
        }
        self.send(Reply::READY_FOR_TLS);
        Flow::StartTls
    }

    /// Runs the handshake; `false` ends the session.
    pub(super) async fn start_tls(&mut self) -> bool {
        let Some(certificates) = self.ctx.certificates.as_ref() else {
            return false;
        };
        let acceptor = certificates.acceptor();
        let handshake = crate::stream::upgrade(&mut self.stream, acceptor);
        match tokio::time::timeout(self.config.smtpd.command_timeout, handshake).await {
            Ok(Ok(())) => {
                self.ctx.metrics.tls_handshake(true);
                if let Some(version) = crate::stream::tls_version(&self.stream) {
                    self.span
                        .record(mta_telemetry::spans::field::TLS_VERSION, version);
                }
                self.reset_after_tls();
                tracing::debug!(peer = %self.peer, version = ?crate::stream::tls_version(&self.stream), "TLS started");
                true
            }
            Ok(Err(e)) => {
                self.ctx.metrics.tls_handshake(false);
                tracing::info!(peer = %self.peer, error = %e, "TLS handshake failed");
                false
            }
            Err(_) => {
                tracing::info!(peer = %self.peer, "TLS handshake timed out");
                false
            }
        }
    }

    /// RFC 3207 §4.2: forget everything learned before TLS.
    fn reset_after_tls(&mut self) {
        self.requests = RequestReceiver::default();
        self.skipping_line = false;
        self.input = Input::Command;
        self.helo = None;
        self.extended = false;
        self.tx = None;
        self.user = None;
        self.sasl_line.clear();
    }
}
