//! EHLO and HELO: the greeting exchange, and the ESMTP keywords this server offers.

use super::{Flow, Reply, Session};
use tokio::io::{AsyncRead, AsyncWrite};

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    pub(super) fn ehlo(&mut self, host: String, extended: bool) -> Flow {
        if host.is_empty() {
            return self.error(Reply::SYNTAX_ERROR.with_text("EHLO/HELO needs a host name"));
        }
        // RFC 5321 §4.1.4: EHLO/HELO resets any transaction.
        self.tx = None;
        self.span
            .record(mta_telemetry::spans::field::HELO, host.as_str());
        self.helo = Some(host);
        self.extended = extended;
        let greeting = Reply::OK.with_text(self.config.hostname.clone());
        if extended {
            greeting.write_multiline(&self.keywords(), &mut self.out);
        } else {
            greeting.write_to(&mut self.out);
        }
        Flow::Continue
    }

    /// ESMTP extensions, in the order they are advertised.
    fn keywords(&self) -> Vec<String> {
        let mut keywords = vec![
            "PIPELINING".into(),
            format!("SIZE {}", self.config.smtpd.max_message_size),
            "8BITMIME".into(),
            "SMTPUTF8".into(),
            "ENHANCEDSTATUSCODES".into(),
            "CHUNKING".into(),
            "DSN".into(),
        ];
        if self.ctx.certificates.is_some() && !self.stream.is_tls() {
            keywords.push("STARTTLS".into());
        }
        if self.stream.is_tls() {
            // RFC 8689: offered only where the message arrives over TLS.
            keywords.push("REQUIRETLS".into());
        }
        if self.auth_offered() && self.user.is_none() {
            keywords.push("AUTH PLAIN LOGIN".into());
        }
        keywords.push("HELP".into());
        keywords
    }
}
