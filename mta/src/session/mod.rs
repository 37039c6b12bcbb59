//! One SMTP server session (RFC 5321): reads bytes, drives `smtp-proto`'s receivers, runs
//! the verb handlers, and writes replies.
//!
//! Flow: greeting → commands (one file per verb group: [`ehlo`], [`mail`], [`rcpt`],
//! [`data`]) → for each finished message, the session's [`Cleanup`] handle stores it
//! durably and the session answers `250 … queued as ID`. The handle is the spool's unless
//! the session was built with [`Session::with_cleanup`] (tests: `Cleanup::Memory`); the
//! session never writes to the spool itself.
//!
//! Invariants:
//! * Bounded memory: command lines are capped by `smtp-proto` (4096 bytes, `500 5.5.2`),
//!   message content by `smtpd.max_message_size` (content beyond it is read and dropped,
//!   then `552 5.3.4`), recipients by `smtpd.max_recipients` (`452 4.5.3`).
//! * Only `<CRLF>.<CRLF>` ends DATA (smtp-proto's receiver), and content with a bare CR or
//!   LF is refused whole, so nothing behind a non-standard ending runs as a command.
//! * Numbers are exact: a BDAT chunk size or `SIZE=` that smtp-proto reads differently from
//!   what was written (its parser wraps long numbers) is refused by [`guard`]; a refused BDAT
//!   whose chunk cannot be skipped safely (size unknown or above `max_message_size`) gets its
//!   reply and `421 4.5.0`, and the connection closes, so its bytes never run as commands.
//! * Time is bounded in total, not per read (issue 13, item 6): each command line within
//!   `smtpd.command_timeout` of when the session began waiting for it, each transaction
//!   within `smtpd.transaction_timeout` plus its content's size at `smtpd.min_data_rate`,
//!   and every content read within `smtpd.data_timeout`; expiry is `421 4.4.2`. Under
//!   connection pressure the session waiting longest for a command is closed ([`pressure`]).
//! * Replies are buffered while more pipelined input is already here, and flushed before
//!   the session waits for input (RFC 2920).
//! * Every reply comes from the table in [`reply`].

mod auth;
mod data;
mod ehlo;
pub mod guard;
mod mail;
pub use crate::pressure;
mod rcpt;
pub use crate::reply;
mod starttls;

use crate::cleanup::Cleanup;
use crate::context::Context;
use crate::queue::{Envelope, Recipient};
use crate::shutdown::Shutdown;
use crate::stream::Stream;
use crate::users::User;
use mta_config::{ListenerKind, MtaConfig};
use mta_telemetry::spans::field;
pub use reply::Reply;
use smtp_proto::request::receiver::{
    BdatReceiver, DataReceiver, DummyDataReceiver, MAX_LINE_LENGTH, RequestReceiver,
};
use smtp_proto::{Error as ProtoError, Request};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::Instrument;

/// What the session reads next.
enum Input {
    /// Command lines.
    Command,
    /// DATA content, kept.
    Data(DataReceiver),
    /// One BDAT chunk, kept.
    Bdat(BdatReceiver),
    /// DATA content or a BDAT chunk, read and dropped; the reply to send when it ends.
    Discard {
        receiver: DummyDataReceiver,
        reply: Reply,
    },
    /// A SASL response line (AUTH continuation).
    Sasl(auth::Step),
}

/// The transaction between MAIL and the end of the message.
struct Transaction {
    envelope: Envelope,
    /// Content received so far.
    content: Vec<u8>,
    /// BDAT was used (so DATA may not follow).
    bdat: bool,
    /// A BDAT chunk failed: every further chunk gets this reply until the last one.
    failed: Option<Reply>,
    /// When MAIL was accepted: the transaction's time counts from here.
    started: tokio::time::Instant,
    /// Content bytes read so far, kept or discarded (each buys time at
    /// `smtpd.min_data_rate`).
    received: u64,
}

impl Transaction {
    /// When the transaction runs out of time: `transaction_timeout` after MAIL, plus the
    /// time its content so far may take at `min_data_rate`.
    fn deadline(&self, smtpd: &mta_config::SmtpdConfig) -> tokio::time::Instant {
        let content =
            std::time::Duration::from_secs_f64(self.received as f64 / smtpd.min_data_rate as f64);
        self.started + smtpd.transaction_timeout + content
    }
}

/// What the loop does after a command.
#[derive(Debug, PartialEq, Eq)]
enum Flow {
    Continue,
    Close,
    /// `220 Ready to start TLS` was queued: flush it, drop any input already read, and
    /// run the handshake.
    StartTls,
}

pub struct Session<S> {
    stream: Stream<S>,
    /// What the listener serves (submission requires AUTH).
    kind: ListenerKind,
    /// The listener's `inbound_checks`: run the `mail_auth` checks for unexempt clients.
    inbound_checks: bool,
    /// Set by a successful AUTH.
    user: Option<User>,
    /// Failed AUTH attempts in this session.
    auth_failures: u32,
    /// Partial SASL response line.
    sasl_line: Vec<u8>,
    /// LOGIN's user name while its password is awaited.
    pending_login: Option<String>,
    /// The verb the next reply answers (a metrics label).
    verb: &'static str,
    /// This session's trace span (client address, HELO, TLS version, user).
    span: tracing::Span,
    /// The DNSBL verdict, looked up at the first RCPT: `None` before; `Some("")` clean.
    dnsbl_tag: Option<String>,
    ctx: Arc<Context>,
    /// Where finished messages go (the spool, or memory in tests).
    cleanup: Cleanup,
    /// Snapshot of the config when the session started: a reload applies to new sessions.
    config: Arc<MtaConfig>,
    peer: SocketAddr,
    /// Name given in EHLO/HELO; `None` before.
    helo: Option<String>,
    /// EHLO (not HELO) was used.
    extended: bool,
    tx: Option<Transaction>,
    errors: u32,
    requests: RequestReceiver,
    /// Inside an overlong command line: drop input up to the next LF.
    skipping_line: bool,
    /// The raw bytes of the command line being parsed (for [`guard`]), at most
    /// `MAX_LINE_LENGTH` + 2.
    line: Vec<u8>,
    input: Input,
    out: Vec<u8>,
    /// When the command line being read must be complete; `None` until the session
    /// waits for one (see [`Session::line_done`]).
    line_deadline: Option<tokio::time::Instant>,
    /// This session's entry in the connection-pressure registry, when it has one.
    pressure: Option<pressure::Handle>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    pub fn new(stream: Stream<S>, ctx: Arc<Context>, peer: SocketAddr, kind: ListenerKind) -> Self {
        let config = ctx.config();
        Self {
            stream,
            kind,
            inbound_checks: true,
            user: None,
            auth_failures: 0,
            sasl_line: Vec::new(),
            pending_login: None,
            verb: "CONNECT",
            span: mta_telemetry::spans::session(peer),
            dnsbl_tag: None,
            ctx,
            cleanup: Cleanup::default(),
            config,
            peer,
            helo: None,
            extended: false,
            tx: None,
            errors: 0,
            requests: RequestReceiver::default(),
            skipping_line: false,
            line: Vec::new(),
            input: Input::Command,
            out: Vec::with_capacity(512),
            line_deadline: None,
            pressure: None,
        }
    }

    /// Registers the session for connection pressure: it may be chosen to close while it
    /// waits for a command (see [`pressure`]).
    pub fn with_pressure(mut self, handle: pressure::Handle) -> Self {
        self.pressure = Some(handle);
        self
    }

    /// Hands finished messages to `cleanup` instead of the spool's (tests and fuzzing).
    pub fn with_cleanup(mut self, cleanup: Cleanup) -> Self {
        self.cleanup = cleanup;
        self
    }

    /// Sets whether the `mail_auth` checks run on this session's listener (default: yes).
    pub fn with_inbound_checks(mut self, enabled: bool) -> Self {
        self.inbound_checks = enabled;
        self
    }

    /// Whether this client skips the `mail_auth` checks: the listener runs none, or the
    /// client is authenticated or in a trusted network.
    fn exempt_from_checks(&self) -> bool {
        !self.inbound_checks
            || crate::checks::exempt(&self.config, self.peer.ip(), self.user.is_some())
    }

    /// Runs the session to its end. I/O errors end it quietly (the peer went away).
    pub async fn run(mut self, mut shutdown: Shutdown) {
        self.ctx.metrics.session_started();
        if let Some(version) = crate::stream::tls_version(&self.stream) {
            self.span.record(field::TLS_VERSION, version);
        }
        let span = self.span.clone();
        async {
            self.send(Reply::greeting(&self.config.hostname));
            if let Err(e) = self.serve(&mut shutdown).await {
                tracing::debug!(peer = %self.peer, error = %e, "session ended by I/O error");
            }
        }
        .instrument(span)
        .await;
        self.ctx.metrics.session_ended();
    }

    async fn serve(&mut self, shutdown: &mut Shutdown) -> std::io::Result<()> {
        // Small while the client sends commands (idle connections stay cheap), large
        // once message content is flowing.
        let mut buf = vec![0u8; COMMAND_READ_BUFFER];
        let pressure = self.pressure.clone();
        let ctx = self.ctx.clone();
        loop {
            // Taken before the replies go out: once a client has read them, this session
            // already counts as waiting since then (connection pressure closes the one
            // waiting longest, so two sessions must be ordered as their clients saw them).
            let replied = tokio::time::Instant::now();
            self.flush().await?;
            let idle = matches!(self.input, Input::Command);
            if !idle && buf.len() < CONTENT_READ_BUFFER {
                buf.resize(CONTENT_READ_BUFFER, 0);
            }
            let deadline = self.read_deadline(replied);
            let n = tokio::select! {
                read = tokio::time::timeout_at(deadline, self.stream.read(&mut buf)) => match read {
                    Ok(read) => read?,
                    Err(_elapsed) => {
                        tracing::info!(peer = %self.peer, verb = self.verb, "session timed out");
                        self.send(Reply::TIMEOUT);
                        return self.flush().await;
                    }
                },
                // Shutdown interrupts only a session waiting for a command: a message
                // being received is finished first.
                () = shutdown.recv(), if idle && self.tx.is_none() => {
                    self.send(Reply::SHUTTING_DOWN);
                    return self.flush().await;
                }
                // So does a drain: the client takes its next message to another server,
                // and the drain is not held up by a connection kept open for nothing.
                () = ctx.intake.draining(), if idle && self.tx.is_none() => {
                    // Shutdown stops the intake too: say which it is.
                    let reply = match shutdown.is_shutdown() {
                        true => Reply::SHUTTING_DOWN,
                        false => Reply::draining(&self.config.hostname),
                    };
                    tracing::info!(peer = %self.peer, "session closed: draining");
                    self.send(reply);
                    return self.flush().await;
                }
                () = async { pressure.as_ref().expect("guarded").closed().await }, if pressure.is_some() => {
                    tracing::info!(peer = %self.peer, "session closed for a new connection");
                    self.send(Reply::CLOSED_FOR_NEW_CONNECTION);
                    return self.flush().await;
                }
            };
            if n == 0 {
                return Ok(());
            }
            if let Some(tx) = self.tx.as_mut()
                && matches!(
                    self.input,
                    Input::Data(_) | Input::Bdat(_) | Input::Discard { .. }
                )
            {
                tx.received += n as u64;
            }
            match self.ingest(&buf[..n]).await {
                Flow::Close => return self.flush().await,
                Flow::StartTls => {
                    self.flush().await?;
                    if !self.start_tls().await {
                        return Ok(());
                    }
                }
                Flow::Continue => {}
            }
        }
    }

    /// When the next read must have returned. A total per command line (a byte now and
    /// then does not extend it) and per transaction, and a gap limit between content reads.
    /// Also tells the pressure registry whether the session waits for a command. `now` is
    /// when the session's replies were ready to go (a reply the client does not read counts
    /// against its time).
    fn read_deadline(&mut self, now: tokio::time::Instant) -> tokio::time::Instant {
        let smtpd = &self.config.smtpd;
        let phase = match self.input {
            Input::Command | Input::Sasl(_) => {
                let deadline = *self
                    .line_deadline
                    .get_or_insert(now + smtpd.command_timeout);
                if let Some(pressure) = &self.pressure {
                    pressure.waiting(deadline - smtpd.command_timeout);
                }
                deadline
            }
            Input::Data(_) | Input::Bdat(_) | Input::Discard { .. } => {
                if let Some(pressure) = &self.pressure {
                    pressure.busy();
                }
                now + smtpd.data_timeout
            }
        };
        match &self.tx {
            Some(tx) => phase.min(tx.deadline(smtpd)),
            None => phase,
        }
    }

    /// A command line (or SASL response, or message content) is complete: the next one
    /// gets its own `command_timeout` from when the session waits for it.
    fn line_done(&mut self) {
        self.line_deadline = None;
    }

    /// Consumes one chunk of input completely.
    async fn ingest(&mut self, chunk: &[u8]) -> Flow {
        let mut bytes = chunk.iter();
        loop {
            let flow = match &mut self.input {
                Input::Command => {
                    if let Some(flow) = self.overlong_line(&mut bytes) {
                        flow
                    } else {
                        let before = bytes.as_slice();
                        let parsed = self.requests.ingest(&mut bytes).map(Request::into_owned);
                        let consumed = &before[..before.len() - bytes.as_slice().len()];
                        let room = (MAX_LINE_LENGTH + 2).saturating_sub(self.line.len());
                        self.line
                            .extend_from_slice(&consumed[..consumed.len().min(room)]);
                        if matches!(parsed, Err(ProtoError::NeedsMoreData { .. })) {
                            return Flow::Continue;
                        }
                        // The line is complete (parsed or refused): check it against its
                        // raw bytes, then the next line starts afresh.
                        let parsed = parsed.map(|mut request| {
                            guard::restore_postmaster(&mut request, &self.line);
                            let checked = guard::check(&request, &self.line);
                            (request, checked)
                        });
                        self.line.clear();
                        self.line_done();
                        match parsed {
                            Ok((request, Ok(()))) => self.command(request).await,
                            Ok((request, Err(refusal))) => self.refuse_number(&request, refusal),
                            Err(ProtoError::NeedsMoreData { .. }) => return Flow::Continue,
                            Err(ProtoError::ResponseTooLong) => {
                                // The rest of this line is still to come: drop it.
                                self.skipping_line = true;
                                self.error(Reply::LINE_TOO_LONG)
                            }
                            Err(error) => self.protocol_error(&error),
                        }
                    }
                }
                Input::Data(receiver) => {
                    let Some(tx) = self.tx.as_mut() else {
                        return Flow::Close;
                    };
                    if receiver.ingest(&mut bytes, &mut tx.content) {
                        self.input = Input::Command;
                        self.end_of_data().await
                    } else if tx.content.len() as u64 > self.config.smtpd.max_message_size {
                        // Keep reading to the end marker, but stop storing.
                        tx.content = Vec::new();
                        self.input = Input::Discard {
                            receiver: DummyDataReceiver::new_data(receiver),
                            reply: Reply::MESSAGE_TOO_BIG,
                        };
                        Flow::Continue
                    } else {
                        return Flow::Continue;
                    }
                }
                Input::Bdat(receiver) => {
                    let Some(tx) = self.tx.as_mut() else {
                        return Flow::Close;
                    };
                    if receiver.ingest(&mut bytes, &mut tx.content) {
                        let last = receiver.is_last;
                        self.input = Input::Command;
                        self.end_of_chunk(last).await
                    } else {
                        return Flow::Continue;
                    }
                }
                Input::Discard { receiver, reply } => {
                    if receiver.ingest(&mut bytes) {
                        let reply = reply.clone();
                        self.input = Input::Command;
                        self.discarded(reply)
                    } else {
                        return Flow::Continue;
                    }
                }
                Input::Sasl(step) => {
                    let step = *step;
                    match self.sasl_input(&mut bytes) {
                        Some(line) => {
                            self.line_done();
                            self.input = Input::Command;
                            self.sasl_response(step, line).await
                        }
                        None => return Flow::Continue,
                    }
                }
            };
            match flow {
                Flow::Close => return Flow::Close,
                // RFC 3207 §4.2 (CVE-2011-0411): whatever the client sent after STARTTLS
                // and before the handshake is discarded, never executed.
                Flow::StartTls => return Flow::StartTls,
                Flow::Continue => {}
            }
            if bytes.as_slice().is_empty() && matches!(self.input, Input::Command) {
                return Flow::Continue;
            }
        }
    }

    /// Enforces the command line length limit, which `smtp-proto` checks only for lines
    /// split over several reads. Drops the whole overlong line (even across reads), so no
    /// part of it is ever taken for a command. `None` means the line may be parsed.
    fn overlong_line(&mut self, bytes: &mut std::slice::Iter<'_, u8>) -> Option<Flow> {
        let rest = bytes.as_slice();
        let newline = memchr::memchr(b'\n', rest);
        if self.skipping_line {
            match newline {
                Some(pos) => {
                    *bytes = rest[pos + 1..].iter();
                    self.skipping_line = false;
                    self.line_done();
                }
                None => *bytes = [].iter(),
            }
            return Some(Flow::Continue);
        }
        match newline {
            Some(pos) if pos > MAX_LINE_LENGTH => {
                *bytes = rest[pos + 1..].iter();
                self.line_done();
            }
            None if rest.len() > MAX_LINE_LENGTH => {
                *bytes = [].iter();
                self.skipping_line = true;
            }
            _ => return None,
        }
        Some(self.error(Reply::LINE_TOO_LONG))
    }

    async fn command(&mut self, request: Request<String>) -> Flow {
        self.verb = request.name();
        match request {
            Request::Ehlo { host } => self.ehlo(host, true),
            Request::Helo { host } => self.ehlo(host, false),
            Request::Lhlo { .. } => self.error(Reply::UNKNOWN_COMMAND),
            Request::Mail { from } => self.mail(from).await,
            Request::Rcpt { to } => self.rcpt(to).await,
            Request::Data => self.data(),
            Request::Bdat {
                chunk_size,
                is_last,
            } => self.bdat(chunk_size, is_last),
            Request::Rset => {
                self.tx = None;
                self.reply(Reply::RESET)
            }
            Request::Noop { .. } => self.reply(Reply::OK),
            Request::Quit => {
                self.send(Reply::BYE);
                Flow::Close
            }
            Request::Help { .. } => self.reply(Reply::HELP),
            // RFC 5321 §3.5.3: 252 when we will not say whether a user exists.
            Request::Vrfy { .. } => self.reply(Reply::CANNOT_VRFY),
            Request::Expn { .. } => self.error(Reply::EXPN_DISABLED),
            Request::StartTls => self.starttls(),
            Request::Auth {
                mechanism,
                initial_response,
            } => self.auth(mechanism, initial_response).await,
            Request::Etrn { .. } | Request::Atrn { .. } | Request::Burl { .. } => {
                self.error(Reply::NOT_IMPLEMENTED)
            }
        }
    }

    /// A BDAT or MAIL whose number [`guard`] refused, or a MAIL or RCPT that is not UTF-8.
    /// After a BDAT the chunk's length is unknown, so nothing that follows can be told apart
    /// from commands: the session says why and closes rather than guess where the chunk ends.
    fn refuse_number(&mut self, request: &Request<String>, refusal: guard::Refusal) -> Flow {
        self.verb = request.name();
        let reply = match refusal {
            guard::Refusal::Syntax if matches!(request, Request::Bdat { .. }) => Reply::BDAT_SYNTAX,
            guard::Refusal::Syntax => Reply::SYNTAX_ERROR,
            guard::Refusal::Overflow => Reply::MESSAGE_TOO_BIG,
            guard::Refusal::NotUtf8 if matches!(request, Request::Rcpt { .. }) => {
                Reply::BAD_RECIPIENT_SYNTAX
            }
            guard::Refusal::NotUtf8 => Reply::BAD_SENDER_SYNTAX,
        };
        tracing::warn!(peer = %self.peer, verb = self.verb, ?refusal, "command refused by the guard");
        if matches!(request, Request::Bdat { .. }) {
            self.send(reply);
            return self.error(Reply::CHUNK_NOT_READ);
        }
        self.error(reply)
    }

    /// The content of a rejected message or chunk has been read to its end.
    fn discarded(&mut self, reply: Reply) -> Flow {
        if let Some(tx) = self.tx.as_mut()
            && tx.bdat
        {
            // BDAT: the failure sticks to the transaction until RSET or the last chunk.
            tx.failed = Some(reply.clone());
        } else {
            self.tx = None;
        }
        self.error(reply)
    }

    fn protocol_error(&mut self, error: &ProtoError) -> Flow {
        if let ProtoError::SyntaxError { syntax } = error
            && syntax.starts_with("BDAT")
        {
            // A chunk of unknown length follows: never read it as commands.
            self.verb = "BDAT";
            self.send(Reply::BDAT_SYNTAX);
            return self.error(Reply::CHUNK_NOT_READ);
        }
        let reply = match error {
            ProtoError::UnknownCommand => Reply::UNKNOWN_COMMAND,
            ProtoError::ResponseTooLong => Reply::LINE_TOO_LONG,
            ProtoError::InvalidSenderAddress => Reply::BAD_SENDER_SYNTAX,
            ProtoError::InvalidRecipientAddress => Reply::BAD_RECIPIENT_SYNTAX,
            ProtoError::UnsupportedParameter { .. } => Reply::UNSUPPORTED_PARAMETER,
            ProtoError::SyntaxError { .. } | ProtoError::InvalidParameter { .. } => {
                Reply::SYNTAX_ERROR
            }
            // Response-side errors never come out of the request parser.
            ProtoError::NeedsMoreData { .. } | ProtoError::InvalidResponse { .. } => {
                Reply::SYNTAX_ERROR
            }
        };
        self.error(reply)
    }

    /// Sends a success reply.
    fn reply(&mut self, reply: Reply) -> Flow {
        self.send(reply);
        Flow::Continue
    }

    /// Sends an error reply, counting it against `smtpd.max_errors`.
    fn error(&mut self, reply: Reply) -> Flow {
        let closes = reply.closes_session();
        self.send(reply);
        if closes {
            return Flow::Close;
        }
        self.errors += 1;
        if self.errors >= self.config.smtpd.max_errors {
            self.send(Reply::TOO_MANY_ERRORS);
            return Flow::Close;
        }
        Flow::Continue
    }

    fn send(&mut self, reply: Reply) {
        self.ctx.metrics.reply(self.verb, reply.code);
        if reply.is_error() {
            tracing::debug!(peer = %self.peer, code = reply.code, text = %mta_telemetry::Escaped(&reply.text), "reply");
        }
        reply.write_to(&mut self.out);
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        let write = self.stream.write_all(&self.out);
        match tokio::time::timeout(self.config.smtpd.command_timeout, write).await {
            Ok(result) => result?,
            Err(_) => return Err(std::io::ErrorKind::TimedOut.into()),
        }
        self.out.clear();
        self.stream.flush().await
    }

    /// Recipients accepted so far in this transaction.
    fn recipients(&self) -> &[Recipient] {
        self.tx
            .as_ref()
            .map(|tx| tx.envelope.recipients.as_slice())
            .unwrap_or_default()
    }
}

/// Read buffer while commands are exchanged.
const COMMAND_READ_BUFFER: usize = 1024;
/// Read buffer once DATA or BDAT content flows.
const CONTENT_READ_BUFFER: usize = 32 * 1024;

/// Upper bound on how much content buffer a client's `SIZE=` may pre-allocate.
const MAX_PREALLOCATION: usize = 1 << 20;

#[cfg(test)]
mod tests;
