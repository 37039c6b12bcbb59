//! AUTH (RFC 4954) with the PLAIN (RFC 4616) and LOGIN mechanisms.
//!
//! Offered only under TLS unless `smtpd.auth_allow_plaintext`. Failures cost the client a
//! growing delay; the third in a session closes it (`421 4.7.0`), and too many from one
//! source (address, IPv6 /64), or from one source against one user, in a window refuse
//! further attempts from that source (`454 4.7.0`) before a password is even checked. A
//! user is never locked out by failures from elsewhere: counting per user alone let anyone
//! lock a real user out (issue 13, item 2). See [`crate::limits::AuthFailures`].
//! Passwords are never logged; user names are.

use super::{Flow, Input, Reply, Session};
use crate::auth_guard::AuthRefused;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use mta_telemetry::Escaped;
use smtp_proto::{AUTH_LOGIN, AUTH_PLAIN};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};

/// Longest SASL response line accepted.
const MAX_SASL_LINE: usize = 12 * 1024;
/// Failures in one session before it is closed.
const MAX_SESSION_FAILURES: u32 = 3;

/// What the next SASL response line is.
#[derive(Debug, Clone, Copy)]
pub enum Step {
    /// PLAIN's whole response (after an empty initial response).
    Plain,
    /// LOGIN's user name.
    LoginUser,
    /// LOGIN's password; the user name is kept in `pending_login`.
    LoginPassword,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// Whether AUTH is offered on this connection now.
    pub(super) fn auth_offered(&self) -> bool {
        self.ctx.auth.available()
            && (self.stream.is_tls() || self.config.smtpd.auth_allow_plaintext)
    }

    pub(super) async fn auth(&mut self, mechanism: u64, initial: String) -> Flow {
        if !self.ctx.auth.available() {
            return self.error(Reply::NOT_IMPLEMENTED);
        }
        if !self.auth_offered() {
            return self.error(Reply::ENCRYPTION_REQUIRED);
        }
        if self.helo.is_none() {
            return self.error(Reply::NEED_HELO);
        }
        if self.user.is_some() {
            return self.error(Reply::ALREADY_AUTHENTICATED);
        }
        if self.tx.is_some() {
            return self.error(Reply::AUTH_DURING_TRANSACTION);
        }
        if self.ctx.auth.blocked(self.peer.ip(), None) {
            return self.error(Reply::AUTH_TOO_MANY_FAILURES);
        }
        match mechanism {
            AUTH_PLAIN if initial.is_empty() => {
                self.input = Input::Sasl(Step::Plain);
                self.reply(Reply::challenge(""))
            }
            AUTH_PLAIN => self.plain(initial.as_bytes()).await,
            AUTH_LOGIN if initial.is_empty() => {
                self.input = Input::Sasl(Step::LoginUser);
                self.reply(Reply::challenge("VXNlcm5hbWU6"))
            }
            AUTH_LOGIN => self.login_user(initial.as_bytes()),
            _ => self.error(Reply::AUTH_UNSUPPORTED_MECHANISM),
        }
    }

    /// Collects a SASL response line from the input; `Some` when complete (CRLF removed).
    pub(super) fn sasl_input(&mut self, bytes: &mut std::slice::Iter<'_, u8>) -> Option<Vec<u8>> {
        let rest = bytes.as_slice();
        match memchr::memchr(b'\n', rest) {
            Some(pos) => {
                self.sasl_line.extend_from_slice(&rest[..pos]);
                *bytes = rest[pos + 1..].iter();
                let mut line = std::mem::take(&mut self.sasl_line);
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                line.truncate(MAX_SASL_LINE);
                Some(line)
            }
            None => {
                let room = MAX_SASL_LINE.saturating_sub(self.sasl_line.len());
                self.sasl_line
                    .extend_from_slice(&rest[..rest.len().min(room)]);
                *bytes = [].iter();
                None
            }
        }
    }

    pub(super) async fn sasl_response(&mut self, step: Step, line: Vec<u8>) -> Flow {
        if line == b"*" {
            self.pending_login = None;
            return self.error(Reply::AUTH_CANCELLED);
        }
        match step {
            Step::Plain => self.plain(&line).await,
            Step::LoginUser => self.login_user(&line),
            Step::LoginPassword => {
                let Some(user) = self.pending_login.take() else {
                    return self.error(Reply::AUTH_CANCELLED);
                };
                match decode(&line) {
                    Some(password) => self.check(user, password).await,
                    None => self.error(Reply::AUTH_BAD_BASE64),
                }
            }
        }
    }

    /// PLAIN: base64 of `authzid NUL authcid NUL password`.
    async fn plain(&mut self, encoded: &[u8]) -> Flow {
        let Some(decoded) = decode(encoded) else {
            return self.error(Reply::AUTH_BAD_BASE64);
        };
        let mut parts = decoded.split('\0');
        let (Some(authzid), Some(user), Some(password), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return self.error(Reply::AUTH_BAD_BASE64.with_text("Malformed PLAIN response"));
        };
        if !authzid.is_empty() && authzid != user {
            // Acting as another user is not supported.
            return self.auth_failed(user.to_owned()).await;
        }
        self.check(user.to_owned(), password.to_owned()).await
    }

    fn login_user(&mut self, encoded: &[u8]) -> Flow {
        match decode(encoded) {
            Some(user) => {
                self.pending_login = Some(user);
                self.input = Input::Sasl(Step::LoginPassword);
                self.reply(Reply::challenge("UGFzc3dvcmQ6"))
            }
            None => self.error(Reply::AUTH_BAD_BASE64),
        }
    }

    async fn check(&mut self, name: String, password: String) -> Flow {
        match self.ctx.auth.verify(self.peer.ip(), &name, password).await {
            Ok(user) => {
                tracing::info!(peer = %self.peer, user = %Escaped(&user.name), "authenticated");
                self.span
                    .record(mta_telemetry::spans::field::USER_ID, user.name.as_str());
                self.user = Some(user);
                self.reply(Reply::AUTH_OK)
            }
            Err(AuthRefused::Blocked) => self.error(Reply::AUTH_TOO_MANY_FAILURES),
            Err(AuthRefused::Unavailable) => self.error(Reply::NOT_IMPLEMENTED),
            Err(AuthRefused::Busy) => self.error(Reply::AUTH_BUSY),
            Err(AuthRefused::Wrong) => self.tarpit(name).await,
        }
    }

    /// A failed AUTH that never reached a password check: counted like a wrong password.
    async fn auth_failed(&mut self, name: String) -> Flow {
        self.ctx.auth.failed(self.peer.ip(), &name);
        self.tarpit(name).await
    }

    /// After a counted failure: the metric, the log line, then a growing delay and, at the
    /// session's limit, the end of the session.
    async fn tarpit(&mut self, name: String) -> Flow {
        self.auth_failures += 1;
        self.ctx.metrics.auth_failure();
        tracing::warn!(peer = %self.peer, user = %Escaped(&name), failures = self.auth_failures, "authentication failed");
        // A tarpit, not synchronisation: each failure makes the next guess slower.
        tokio::time::sleep(Duration::from_millis(500 * u64::from(self.auth_failures))).await;
        if self.auth_failures >= MAX_SESSION_FAILURES {
            self.send(Reply::AUTH_FAILED);
            self.send(Reply::AUTH_SESSION_FAILURES);
            return Flow::Close;
        }
        self.error(Reply::AUTH_FAILED)
    }
}

fn decode(encoded: &[u8]) -> Option<String> {
    let bytes = BASE64.decode(encoded.trim_ascii()).ok()?;
    String::from_utf8(bytes).ok()
}
