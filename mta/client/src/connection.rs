//! One client session: connect, greeting, EHLO, STARTTLS, AUTH, then any number
//! of transactions, then QUIT.
//!
//! Every read of a reply and every write runs under the timeout of its phase
//! ([`crate::Timeouts`]). After a transport or protocol failure the connection
//! is marked unusable and later calls fail at once with
//! [`ClientError::Io`]; a rejection (a reply the peer sent on purpose) leaves it
//! usable, and [`Connection::reset`] starts the next transaction cleanly.

use std::future::Future;
use std::io;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::TlsConnector;

use crate::capabilities::Capabilities;
use crate::config::{ClientConfig, Credentials, Target, Timeouts, TlsMode};
use crate::envelope::{DataEncoder, address_is_unsafe, mail_command, needs_smtputf8, rcpt_command};
use crate::error::{ClientError, Phase, TlsFailure};
use crate::message::OutboundMessage;
use crate::reply::{Reply, ReplyReader};
use crate::stream::{Plain, Stream};
use crate::tls;

/// Message content is encoded and written in blocks of this many input bytes,
/// each block under [`Timeouts::data_block`].
const DATA_BLOCK: usize = 64 * 1024;

/// Bytes asked of the socket per read.
const READ_CHUNK: usize = 8 * 1024;

/// A live session with one SMTP or LMTP server.
pub struct Connection {
    stream: Stream,
    reader: ReplyReader,
    caps: Capabilities,
    timeouts: Timeouts,
    lmtp: bool,
    helo_name: String,
    tls_version: Option<String>,
    greeting: Option<Reply>,
    /// Set after any failure that leaves the stream in an unknown state.
    broken: bool,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("caps", &self.caps)
            .field("lmtp", &self.lmtp)
            .field("tls_version", &self.tls_version)
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

async fn open(target: &Target) -> io::Result<Plain> {
    match target {
        Target::Tcp(addr) => {
            let stream = TcpStream::connect(addr).await?;
            // Pipelined commands go out as one write; do not let Nagle hold the
            // next one back waiting for an ACK.
            stream.set_nodelay(true)?;
            Ok(Plain::Tcp(stream))
        }
        Target::Unix(path) => Ok(Plain::Unix(UnixStream::connect(path).await?)),
    }
}

fn unusable(phase: Phase) -> ClientError {
    ClientError::Io {
        phase,
        source: io::Error::new(
            io::ErrorKind::NotConnected,
            "connection unusable after an earlier failure",
        ),
    }
}

impl Connection {
    /// Connects to `target` and prepares a session for [`Connection::send`].
    ///
    /// `server_name` is the peer's host name (the MX name): it is the TLS SNI
    /// and, with [`TlsMode::Verified`], the name the certificate must carry.
    /// Order: connect, 220 greeting, EHLO (HELO when EHLO gets a 5xx; LHLO for
    /// LMTP), STARTTLS per [`ClientConfig::tls`] and EHLO again, AUTH when
    /// credentials are configured. Credentials are only sent over TLS unless
    /// the mode is [`TlsMode::None`]; without STARTTLS they give
    /// [`ClientError::TlsUnavailable`].
    pub async fn connect(
        target: &Target,
        server_name: &str,
        config: &ClientConfig,
    ) -> Result<Connection, ClientError> {
        let timeouts = config.timeouts;
        let plain = match tokio::time::timeout(timeouts.connect, open(target)).await {
            Err(_) => {
                return Err(ClientError::Timeout {
                    phase: Phase::Connect,
                    after: timeouts.connect,
                });
            }
            Ok(Err(source)) => {
                return Err(ClientError::Connect {
                    target: target.to_string(),
                    source,
                });
            }
            Ok(Ok(plain)) => plain,
        };
        let mut conn = Connection {
            stream: Stream::Plain(plain),
            reader: ReplyReader::default(),
            caps: Capabilities::default(),
            timeouts,
            lmtp: config.lmtp,
            helo_name: config.helo_name.clone(),
            tls_version: None,
            greeting: None,
            broken: false,
        };

        let greeting = conn.read_reply(Phase::Greeting, timeouts.greeting).await?;
        if !greeting.is_positive() {
            // RFC 5321 3.1: after a 554 greeting the client should send QUIT.
            conn.quit().await;
            return Err(ClientError::Rejected {
                phase: Phase::Greeting,
                reply: greeting,
            });
        }
        conn.greeting = Some(greeting);
        conn.hello().await?;

        let want_tls = match config.tls {
            TlsMode::None => false,
            TlsMode::Opportunistic => conn.caps.starttls,
            TlsMode::Required | TlsMode::Verified => {
                if !conn.caps.starttls {
                    return Err(ClientError::TlsUnavailable);
                }
                true
            }
        };
        if want_tls {
            conn.starttls(target, server_name, config).await?;
        }

        if let Some(credentials) = &config.auth {
            if !conn.tls_active() && config.tls != TlsMode::None {
                return Err(ClientError::TlsUnavailable);
            }
            conn.authenticate(credentials).await?;
        }
        tracing::debug!(
            target = %target,
            server_name,
            tls = ?conn.tls_version,
            pipelining = conn.caps.pipelining,
            "mta-client: session ready"
        );
        Ok(conn)
    }

    /// What the peer offered in its last EHLO/LHLO reply (after TLS, if any).
    pub fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    /// Whether STARTTLS succeeded.
    pub fn tls_active(&self) -> bool {
        self.stream.is_tls()
    }

    /// The negotiated protocol version, e.g. `"TLSv1.3"`.
    pub fn tls_version(&self) -> Option<String> {
        self.tls_version.clone()
    }

    /// The peer's 220 greeting.
    pub fn greeting(&self) -> Option<&Reply> {
        self.greeting.as_ref()
    }

    /// False once a transport or protocol failure has left the session in an
    /// unknown state; such a connection should be dropped, not reused.
    pub fn is_usable(&self) -> bool {
        !self.broken
    }

    /// Runs one mail transaction and returns one reply per recipient, in the
    /// order of [`OutboundMessage::recipients`].
    ///
    /// * SMTP: a recipient's RCPT reply when that was not 2xx, otherwise the
    ///   reply after the final dot (always 2xx here: a non-2xx final reply is
    ///   [`ClientError::Rejected`] with [`Phase::DataDone`]).
    /// * LMTP: the recipient's own reply after the final dot (RFC 2033 4.2),
    ///   whatever its class; rejected RCPTs keep their RCPT reply.
    /// * A recipient address containing CR, LF, `<` or `>` is not sent; its
    ///   reply is a local `501 5.1.3`.
    /// * When no recipient is accepted no content is sent, RSET closes the
    ///   transaction, and the replies are returned.
    ///
    /// With PIPELINING, MAIL, every RCPT and DATA go out in one write (RFC
    /// 2920); otherwise each waits for its reply. SIZE, BODY=8BITMIME,
    /// SMTPUTF8 and the DSN parameters are sent only when offered. Errors
    /// before per-recipient replies exist are [`ClientError`]s; after a
    /// rejection call [`Connection::reset`] before the next transaction.
    pub async fn send(&mut self, message: &OutboundMessage<'_>) -> Result<Vec<Reply>, ClientError> {
        if self.broken {
            return Err(unusable(Phase::Mail));
        }
        if message.recipients.is_empty() {
            return Ok(Vec::new());
        }

        // What this peer cannot take at all: decided before any command is sent.
        if message.eight_bit && !self.caps.eight_bit_mime {
            return Err(ClientError::EightBitUnsupported);
        }
        if needs_smtputf8(message) && !self.caps.smtputf8 {
            return Err(ClientError::Smtputf8Unsupported);
        }
        if let Some(limit) = self.caps.size
            && limit > 0
            && message.content.len() as u64 > limit
        {
            return Err(ClientError::MessageTooBig { limit });
        }
        if address_is_unsafe(message.sender) {
            return Err(ClientError::Rejected {
                phase: Phase::Mail,
                reply: Reply::local(501, [5, 1, 7], "sender address cannot be sent"),
            });
        }

        let mut replies: Vec<Option<Reply>> = message
            .recipients
            .iter()
            .map(|r| {
                address_is_unsafe(r.address)
                    .then(|| Reply::local(501, [5, 1, 3], "recipient address cannot be sent"))
            })
            .collect();
        let sendable: Vec<usize> = (0..replies.len())
            .filter(|&i| replies[i].is_none())
            .collect();
        if sendable.is_empty() {
            return Ok(finish_replies(replies));
        }

        let accepted = if self.caps.pipelining {
            self.envelope_pipelined(message, &sendable, &mut replies)
                .await?
        } else {
            self.envelope_lockstep(message, &sendable, &mut replies)
                .await?
        };
        let Some(accepted) = accepted else {
            // Nobody accepted: close the transaction; the replies say why.
            if self
                .command(Phase::Rset, self.timeouts.rset, b"RSET\r\n")
                .await
                .is_err()
            {
                self.broken = true;
            }
            return Ok(finish_replies(replies));
        };

        self.write_content(message.content).await?;

        if self.lmtp {
            for i in accepted {
                replies[i] = Some(
                    self.read_reply(Phase::DataDone, self.timeouts.data_done)
                        .await?,
                );
            }
        } else {
            let reply = self
                .read_reply(Phase::DataDone, self.timeouts.data_done)
                .await?;
            if !reply.is_positive() {
                return Err(ClientError::Rejected {
                    phase: Phase::DataDone,
                    reply,
                });
            }
            for i in accepted {
                replies[i] = Some(reply.clone());
            }
        }
        Ok(finish_replies(replies))
    }

    /// MAIL, RCPTs and DATA in one write. Returns the accepted recipients'
    /// indices once the peer has said 354, or `None` when no RCPT was accepted.
    async fn envelope_pipelined(
        &mut self,
        message: &OutboundMessage<'_>,
        sendable: &[usize],
        replies: &mut [Option<Reply>],
    ) -> Result<Option<Vec<usize>>, ClientError> {
        let mut batch = mail_command(message, &self.caps);
        for &i in sendable {
            batch.push_str(&rcpt_command(&message.recipients[i], &self.caps));
        }
        batch.push_str("DATA\r\n");
        self.write(Phase::Mail, self.timeouts.mail, batch.as_bytes())
            .await?;

        let mail_reply = self.read_reply(Phase::Mail, self.timeouts.mail).await?;
        let mut accepted = Vec::with_capacity(sendable.len());
        for &i in sendable {
            let reply = self.read_reply(Phase::Rcpt, self.timeouts.rcpt).await?;
            if reply.is_positive() {
                accepted.push(i);
            }
            replies[i] = Some(reply);
        }
        let data_reply = self
            .read_reply(Phase::Data, self.timeouts.data_init)
            .await?;

        let go_ahead = data_reply.code == 354;
        if !mail_reply.is_positive() {
            if go_ahead {
                self.abort_data().await?;
            }
            return Err(ClientError::Rejected {
                phase: Phase::Mail,
                reply: mail_reply,
            });
        }
        if accepted.is_empty() {
            // RFC 2920 3.1: a server that answers 354 with no valid recipient
            // gets an empty message, which it must then reject.
            if go_ahead {
                self.abort_data().await?;
            }
            return Ok(None);
        }
        if !go_ahead {
            return Err(ClientError::Rejected {
                phase: Phase::Data,
                reply: data_reply,
            });
        }
        Ok(Some(accepted))
    }

    /// MAIL, each RCPT and DATA, each waiting for its reply.
    async fn envelope_lockstep(
        &mut self,
        message: &OutboundMessage<'_>,
        sendable: &[usize],
        replies: &mut [Option<Reply>],
    ) -> Result<Option<Vec<usize>>, ClientError> {
        let mail = mail_command(message, &self.caps);
        let mail_reply = self
            .command(Phase::Mail, self.timeouts.mail, mail.as_bytes())
            .await?;
        if !mail_reply.is_positive() {
            return Err(ClientError::Rejected {
                phase: Phase::Mail,
                reply: mail_reply,
            });
        }
        let mut accepted = Vec::with_capacity(sendable.len());
        for &i in sendable {
            let rcpt = rcpt_command(&message.recipients[i], &self.caps);
            let reply = self
                .command(Phase::Rcpt, self.timeouts.rcpt, rcpt.as_bytes())
                .await?;
            if reply.is_positive() {
                accepted.push(i);
            }
            replies[i] = Some(reply);
        }
        if accepted.is_empty() {
            return Ok(None);
        }
        let data_reply = self
            .command(Phase::Data, self.timeouts.data_init, b"DATA\r\n")
            .await?;
        if data_reply.code != 354 {
            return Err(ClientError::Rejected {
                phase: Phase::Data,
                reply: data_reply,
            });
        }
        Ok(Some(accepted))
    }

    /// Dot-stuffed content and the final `.`, one block per write.
    async fn write_content(&mut self, content: &[u8]) -> Result<(), ClientError> {
        let mut encoder = DataEncoder::default();
        let mut out = Vec::with_capacity(DATA_BLOCK + DATA_BLOCK / 8);
        let mut blocks = content.chunks(DATA_BLOCK).peekable();
        while let Some(block) = blocks.next() {
            out.clear();
            encoder.encode(block, &mut out);
            if blocks.peek().is_some() {
                self.write(Phase::Data, self.timeouts.data_block, &out)
                    .await?;
            }
        }
        // The last block goes out with the terminator in the same write.
        encoder.finish(&mut out);
        self.write(Phase::Data, self.timeouts.data_block, &out)
            .await
    }

    /// Ends a DATA we did not want (354 after a failed MAIL or with no valid
    /// recipient) with an empty message and reads the peer's answer to it.
    async fn abort_data(&mut self) -> Result<(), ClientError> {
        self.write(Phase::Data, self.timeouts.data_block, b".\r\n")
            .await?;
        self.read_reply(Phase::DataDone, self.timeouts.data_done)
            .await?;
        Ok(())
    }

    /// RSET: ends any transaction so that the connection can carry the next
    /// message.
    pub async fn reset(&mut self) -> Result<(), ClientError> {
        if self.broken {
            return Err(unusable(Phase::Rset));
        }
        let reply = self
            .command(Phase::Rset, self.timeouts.rset, b"RSET\r\n")
            .await?;
        if !reply.is_positive() {
            return Err(ClientError::Rejected {
                phase: Phase::Rset,
                reply,
            });
        }
        Ok(())
    }

    /// QUIT, read the reply, close (with TLS close_notify). Best effort: every
    /// failure is ignored, and each step is bounded by [`Timeouts::quit`].
    pub async fn quit(mut self) {
        if self.broken {
            return;
        }
        let timeout = self.timeouts.quit;
        let _ = self.command(Phase::Quit, timeout, b"QUIT\r\n").await;
        let _ = tokio::time::timeout(timeout, self.stream.shutdown()).await;
    }

    /// EHLO (HELO after a 5xx) or LHLO; sets the capabilities.
    async fn hello(&mut self) -> Result<(), ClientError> {
        let verb = if self.lmtp { "LHLO" } else { "EHLO" };
        let command = format!("{verb} {}\r\n", self.helo_name);
        let reply = self
            .command(Phase::Ehlo, self.timeouts.ehlo, command.as_bytes())
            .await?;
        if reply.is_positive() {
            self.caps = Capabilities::from_ehlo_text(&reply.text);
            return Ok(());
        }
        if self.lmtp || !reply.is_permanent() {
            return Err(ClientError::Rejected {
                phase: Phase::Ehlo,
                reply,
            });
        }
        // RFC 5321 3.2: a server that does not know EHLO gets HELO, and then no
        // extension is available.
        let command = format!("HELO {}\r\n", self.helo_name);
        let reply = self
            .command(Phase::Ehlo, self.timeouts.ehlo, command.as_bytes())
            .await?;
        if !reply.is_positive() {
            return Err(ClientError::Rejected {
                phase: Phase::Ehlo,
                reply,
            });
        }
        self.caps = Capabilities::default();
        Ok(())
    }

    /// STARTTLS, the handshake, and EHLO again (RFC 3207 4.2: everything learnt
    /// before TLS is forgotten).
    async fn starttls(
        &mut self,
        target: &Target,
        server_name: &str,
        config: &ClientConfig,
    ) -> Result<(), ClientError> {
        let timeout = self.timeouts.starttls;
        let reply = self
            .command(Phase::StartTls, timeout, b"STARTTLS\r\n")
            .await?;
        if !reply.is_positive() {
            return Err(ClientError::Rejected {
                phase: Phase::StartTls,
                reply,
            });
        }
        if self.reader.has_pending() {
            // Anything after the 220 arrived in plain text and could be an
            // injected reply (CVE-2011-0411 style): refuse it.
            self.broken = true;
            return Err(ClientError::Protocol {
                phase: Phase::StartTls,
                detail: "peer sent data after its STARTTLS reply".into(),
            });
        }

        let tls_config = match (&config.rustls, config.tls) {
            (Some(custom), TlsMode::Verified) => Ok(custom.clone()),
            (None, TlsMode::Verified) => tls::verified_config(config.extra_roots_pem.as_deref()),
            (_, TlsMode::None | TlsMode::Opportunistic | TlsMode::Required) => {
                tls::unverified_config()
            }
        }
        .map_err(|detail| ClientError::Tls {
            cause: TlsFailure::Setup,
            detail,
        })?;
        let name = match (ServerName::try_from(server_name.to_owned()), config.tls) {
            (Ok(name), _) => name,
            (Err(e), TlsMode::Verified) => {
                return Err(ClientError::Tls {
                    cause: TlsFailure::Setup,
                    detail: format!("server name {server_name:?} is not usable for TLS: {e}"),
                });
            }
            // Not verifying: any name will do; an IP address sends no SNI.
            (Err(_), _) => match target {
                Target::Tcp(addr) => ServerName::IpAddress(addr.ip().into()),
                Target::Unix(_) => {
                    ServerName::try_from("localhost").map_err(|e| ClientError::Tls {
                        cause: TlsFailure::Setup,
                        detail: e.to_string(),
                    })?
                }
            },
        };

        let Some(plain) = self.stream.take_plain() else {
            self.broken = true;
            return Err(ClientError::Protocol {
                phase: Phase::StartTls,
                detail: "TLS is already active".into(),
            });
        };
        self.broken = true; // until the handshake succeeds
        let connector = TlsConnector::from(tls_config);
        let tls = match tokio::time::timeout(timeout, connector.connect(name, plain)).await {
            Err(_) => {
                return Err(ClientError::Timeout {
                    phase: Phase::StartTls,
                    after: timeout,
                });
            }
            Ok(Err(e)) => {
                return Err(ClientError::Tls {
                    cause: TlsFailure::of_handshake(&e),
                    detail: e.to_string(),
                });
            }
            Ok(Ok(tls)) => tls,
        };
        self.tls_version = tls.get_ref().1.protocol_version().map(|v| match v {
            rustls::ProtocolVersion::TLSv1_2 => "TLSv1.2".to_owned(),
            rustls::ProtocolVersion::TLSv1_3 => "TLSv1.3".to_owned(),
            other => format!("{other:?}"),
        });
        self.stream = Stream::Tls(Box::new(tls));
        self.broken = false;
        self.caps = Capabilities::default();
        self.hello().await
    }

    /// AUTH PLAIN (with initial response, RFC 4616) or else AUTH LOGIN.
    async fn authenticate(&mut self, credentials: &Credentials) -> Result<(), ClientError> {
        let timeout = self.timeouts.auth;
        if self.caps.auth_plain {
            let token = BASE64.encode(format!(
                "\0{}\0{}",
                credentials.username, credentials.password
            ));
            let mut reply = self
                .command(
                    Phase::Auth,
                    timeout,
                    format!("AUTH PLAIN {token}\r\n").as_bytes(),
                )
                .await?;
            if reply.code == 334 {
                // A server that ignores the initial response asks for it again.
                reply = self
                    .command(Phase::Auth, timeout, format!("{token}\r\n").as_bytes())
                    .await?;
            }
            return auth_outcome(reply);
        }
        if self.caps.auth_login {
            let reply = self
                .command(Phase::Auth, timeout, b"AUTH LOGIN\r\n")
                .await?;
            if reply.code != 334 {
                return auth_outcome(reply);
            }
            let user = format!("{}\r\n", BASE64.encode(&credentials.username));
            let reply = self.command(Phase::Auth, timeout, user.as_bytes()).await?;
            if reply.code != 334 {
                return auth_outcome(reply);
            }
            let pass = format!("{}\r\n", BASE64.encode(&credentials.password));
            let reply = self.command(Phase::Auth, timeout, pass.as_bytes()).await?;
            return auth_outcome(reply);
        }
        Err(ClientError::AuthUnavailable)
    }

    /// Writes a command and reads its reply.
    async fn command(
        &mut self,
        phase: Phase,
        timeout: Duration,
        bytes: &[u8],
    ) -> Result<Reply, ClientError> {
        self.write(phase, timeout, bytes).await?;
        self.read_reply(phase, timeout).await
    }

    /// Writes and flushes `bytes` within `timeout`.
    async fn write(
        &mut self,
        phase: Phase,
        timeout: Duration,
        bytes: &[u8],
    ) -> Result<(), ClientError> {
        let stream = &mut self.stream;
        let result = with_timeout(phase, timeout, async move {
            stream.write_all(bytes).await?;
            stream.flush().await
        })
        .await;
        if result.is_err() {
            self.broken = true;
        }
        result
    }

    /// Reads one complete reply within `timeout`.
    async fn read_reply(&mut self, phase: Phase, timeout: Duration) -> Result<Reply, ClientError> {
        let Connection { stream, reader, .. } = self;
        let result = tokio::time::timeout(timeout, async move {
            let mut chunk = [0u8; READ_CHUNK];
            loop {
                match reader.next_reply() {
                    Ok(Some(reply)) => return Ok(reply),
                    Ok(None) => {}
                    Err(detail) => return Err(ClientError::Protocol { phase, detail }),
                }
                let n = stream
                    .read(&mut chunk)
                    .await
                    .map_err(|source| ClientError::Io { phase, source })?;
                if n == 0 {
                    return Err(ClientError::Io {
                        phase,
                        source: io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "connection closed by the peer",
                        ),
                    });
                }
                reader.feed(&chunk[..n]);
            }
        })
        .await
        .unwrap_or(Err(ClientError::Timeout {
            phase,
            after: timeout,
        }));
        if result.is_err() {
            self.broken = true;
        }
        result
    }
}

async fn with_timeout(
    phase: Phase,
    timeout: Duration,
    io: impl Future<Output = io::Result<()>>,
) -> Result<(), ClientError> {
    match tokio::time::timeout(timeout, io).await {
        Err(_) => Err(ClientError::Timeout {
            phase,
            after: timeout,
        }),
        Ok(Err(source)) => Err(ClientError::Io { phase, source }),
        Ok(Ok(())) => Ok(()),
    }
}

fn auth_outcome(reply: Reply) -> Result<(), ClientError> {
    if reply.is_positive() {
        Ok(())
    } else {
        Err(ClientError::AuthFailed { reply })
    }
}

/// Every recipient has a reply by the time this is called; the fallback only
/// guards against a logic error turning into a panic.
fn finish_replies(replies: Vec<Option<Reply>>) -> Vec<Reply> {
    replies
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Reply::local(451, [4, 3, 0], "no reply recorded")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn require_send<T: Send>(_: &T) {}

    /// Compile-time check: the delivery stage spawns these on a multi-threaded
    /// runtime, so the connection and its futures must be `Send`.
    #[allow(dead_code)]
    fn futures_are_send(
        conn: &mut Connection,
        message: &OutboundMessage<'_>,
        target: &Target,
        config: &ClientConfig,
    ) {
        require_send(&Connection::connect(target, "mx.example", config));
        require_send(&conn.send(message));
        require_send(&conn.reset());
    }

    #[test]
    fn connection_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Connection>();
        check::<ClientError>();
    }
}
