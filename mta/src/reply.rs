//! Every reply the SMTP server sends, in one table.
//!
//! No other module writes reply literals: they name a constant here, or call one of the
//! constructors for replies that carry a value (queue id, host name). Reviewed like
//! Postfix's `cleanup_stat_map`: code, RFC 3463 enhanced code, text.

use std::borrow::Cow;

/// One SMTP reply (RFC 5321 §4.2) with its enhanced status code (RFC 3463, RFC 2034).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub enhanced: Option<[u8; 3]>,
    pub text: Cow<'static, str>,
}

const fn reply(code: u16, enhanced: [u8; 3], text: &'static str) -> Reply {
    Reply {
        code,
        enhanced: Some(enhanced),
        text: Cow::Borrowed(text),
    }
}

impl Reply {
    // --- success -----------------------------------------------------------------------
    pub const OK: Reply = reply(250, [2, 0, 0], "Ok");
    pub const SENDER_OK: Reply = reply(250, [2, 1, 0], "Sender ok");
    pub const RECIPIENT_OK: Reply = reply(250, [2, 1, 5], "Recipient ok");
    pub const RESET: Reply = reply(250, [2, 0, 0], "Reset state");
    pub const START_DATA: Reply = Reply {
        code: 354,
        enhanced: None,
        text: Cow::Borrowed("End data with <CR><LF>.<CR><LF>"),
    };
    pub const BYE: Reply = reply(221, [2, 0, 0], "Bye");
    pub const HELP: Reply = reply(
        214,
        [2, 0, 0],
        "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT HELP VRFY",
    );
    pub const CANNOT_VRFY: Reply = reply(
        252,
        [2, 5, 0],
        "Cannot VRFY user, but will accept message and attempt delivery",
    );

    // --- sequence and syntax: 5.5.x ----------------------------------------------------
    pub const UNKNOWN_COMMAND: Reply = reply(500, [5, 5, 2], "Command not recognized");
    pub const LINE_TOO_LONG: Reply = reply(500, [5, 5, 2], "Line too long");
    pub const SYNTAX_ERROR: Reply = reply(501, [5, 5, 4], "Syntax error in parameters");
    pub const BAD_SENDER_SYNTAX: Reply = reply(501, [5, 1, 7], "Bad sender address syntax");
    pub const BAD_RECIPIENT_SYNTAX: Reply = reply(501, [5, 1, 3], "Bad recipient address syntax");
    pub const NOT_IMPLEMENTED: Reply = reply(502, [5, 5, 1], "Command not implemented");
    pub const EXPN_DISABLED: Reply = reply(502, [5, 5, 1], "EXPN is disabled");
    pub const NEED_HELO: Reply = reply(503, [5, 5, 1], "Send EHLO or HELO first");
    pub const NESTED_MAIL: Reply = reply(503, [5, 5, 1], "Sender already given");
    pub const NEED_MAIL: Reply = reply(503, [5, 5, 1], "Send MAIL first");
    pub const NEED_RCPT: Reply = reply(503, [5, 5, 1], "Send RCPT first");
    pub const BDAT_THEN_DATA: Reply = reply(
        503,
        [5, 5, 1],
        "DATA is not allowed after BDAT in one transaction",
    );
    /// RFC 3030 §2 grammar; also a chunk size smtp-proto reads differently (issue 13).
    pub const BDAT_SYNTAX: Reply = reply(501, [5, 5, 4], "Syntax: BDAT chunk-size [LAST]");
    pub const NO_VALID_RECIPIENTS: Reply = reply(554, [5, 5, 1], "No valid recipients");
    pub const UNSUPPORTED_PARAMETER: Reply = reply(
        555,
        [5, 5, 4],
        "MAIL or RCPT parameter not recognized or not implemented",
    );

    // --- limits ------------------------------------------------------------------------
    pub const TOO_MANY_RECIPIENTS: Reply = reply(452, [4, 5, 3], "Too many recipients");
    pub const MESSAGE_TOO_BIG: Reply = reply(
        552,
        [5, 3, 4],
        "Message size exceeds fixed maximum message size",
    );
    /// After a refused BDAT whose chunk is not read (its size is not a number we trust, or
    /// larger than any message we take): the bytes that follow cannot be told apart from
    /// commands, so the session ends.
    pub const CHUNK_NOT_READ: Reply = reply(421, [4, 5, 0], "Chunk not read, closing connection");
    pub const TIMEOUT: Reply = reply(421, [4, 4, 2], "Timeout exceeded, closing connection");
    /// `smtpd.max_connections` is reached and this session has waited longest for a
    /// command: it makes room for a new connection (see `crate::pressure`).
    pub const CLOSED_FOR_NEW_CONNECTION: Reply = reply(
        421,
        [4, 4, 2],
        "Idle too long while the server is busy, closing connection",
    );
    pub const TOO_MANY_ERRORS: Reply = reply(421, [4, 7, 0], "Too many errors, closing connection");
    pub const TOO_MANY_CONNECTIONS: Reply =
        reply(421, [4, 7, 0], "Too many connections, try again later");
    pub const TOO_MANY_CONNECTIONS_FROM_IP: Reply = reply(
        421,
        [4, 7, 0],
        "Too many connections from your address, try again later",
    );
    /// RFC 5321 §2.3.8: lines end with CRLF only. A bare CR or LF could hide a second
    /// message end ("SMTP smuggling"), so such content is refused rather than repaired.
    pub const BARE_LINE_ENDING: Reply = reply(
        554,
        [5, 6, 0],
        "Message contains a bare CR or LF; lines must end with CRLF",
    );

    // --- policy ------------------------------------------------------------------------
    pub const RELAY_DENIED: Reply = reply(550, [5, 7, 1], "Relay access denied");
    pub const NO_SUCH_USER: Reply =
        reply(550, [5, 1, 1], "Recipient address rejected: user unknown");
    pub const BAD_LOCAL_PART: Reply = reply(
        553,
        [5, 1, 3],
        "Recipient local part not acceptable for local delivery",
    );
    pub const ALIAS_LOOP: Reply =
        reply(554, [5, 4, 6], "Recipient aliases loop or nest too deeply");

    // --- TLS and AUTH --------------------------------------------------------------------
    pub const READY_FOR_TLS: Reply = reply(220, [2, 0, 0], "Ready to start TLS");
    pub const TLS_NOT_AVAILABLE: Reply = reply(454, [4, 7, 0], "TLS not available");
    pub const TLS_ALREADY_ACTIVE: Reply = reply(503, [5, 5, 1], "TLS already active");
    pub const AUTH_OK: Reply = reply(235, [2, 7, 0], "Authentication successful");
    pub const AUTH_REQUIRED: Reply = reply(530, [5, 7, 0], "Authentication required");
    pub const ENCRYPTION_REQUIRED: Reply = reply(
        538,
        [5, 7, 11],
        "Encryption required for requested authentication mechanism",
    );
    pub const AUTH_FAILED: Reply = reply(535, [5, 7, 8], "Authentication credentials invalid");
    pub const AUTH_CANCELLED: Reply = reply(501, [5, 0, 0], "Authentication cancelled");
    pub const AUTH_BAD_BASE64: Reply = reply(501, [5, 5, 2], "Invalid base64 data");
    pub const AUTH_UNSUPPORTED_MECHANISM: Reply =
        reply(504, [5, 5, 4], "Unrecognized authentication mechanism");
    pub const ALREADY_AUTHENTICATED: Reply = reply(503, [5, 5, 1], "Already authenticated");
    pub const AUTH_DURING_TRANSACTION: Reply = reply(
        503,
        [5, 5, 1],
        "AUTH is not allowed during a mail transaction",
    );
    pub const AUTH_TOO_MANY_FAILURES: Reply = reply(
        454,
        [4, 7, 0],
        "Too many failed authentications, try again later",
    );
    /// RFC 4954 §6: temporary failure; every password check slot stayed busy too long.
    pub const AUTH_BUSY: Reply = reply(
        454,
        [4, 7, 0],
        "Temporary authentication failure, try again later",
    );
    pub const AUTH_SESSION_FAILURES: Reply = reply(
        421,
        [4, 7, 0],
        "Too many failed authentications, closing connection",
    );
    pub const SENDER_NOT_OWNED: Reply =
        reply(553, [5, 7, 1], "Sender address not allowed for this user");
    /// `MAIL FROM:<>` from an authenticated user who may not send as any address.
    pub const NULL_SENDER_NOT_ALLOWED: Reply =
        reply(550, [5, 7, 1], "Null sender not allowed for this user");
    pub const RATE_LIMITED: Reply = reply(451, [4, 7, 1], "Rate limit exceeded, try again later");
    pub const DNSBL_LISTED: Reply =
        reply(554, [5, 7, 1], "Service unavailable; client host blocked");
    pub const DNSBL_TEMPFAIL: Reply = reply(
        451,
        [4, 7, 1],
        "Temporary DNS failure during policy check, try again later",
    );
    pub const DMARC_REJECT: Reply = reply(
        550,
        [5, 7, 1],
        "Message rejected: the sender domain's DMARC policy says reject",
    );

    // --- local trouble -----------------------------------------------------------------
    pub const SPOOL_FULL: Reply = reply(452, [4, 3, 1], "Insufficient system storage");
    pub const SPOOL_ERROR: Reply = reply(451, [4, 3, 0], "Queue file write error, try again later");
    pub const SHUTTING_DOWN: Reply =
        reply(421, [4, 3, 2], "Service shutting down, try again later");

    /// `220 host ESMTP Petrel`
    pub fn greeting(hostname: &str) -> Reply {
        Reply {
            code: 220,
            enhanced: None,
            text: Cow::Owned(format!("{hostname} ESMTP Petrel")),
        }
    }

    /// `421 4.3.2 <host> draining, try another server`: this MTA is being drained (issue
    /// 16): a new connection gets it and is closed, and so does a session waiting for its
    /// next command. RFC 5321 §3.8: 421 may be sent at any time the service must close.
    pub fn draining(hostname: &str) -> Reply {
        Reply {
            code: 421,
            enhanced: Some([4, 3, 2]),
            text: Cow::Owned(format!("{hostname} draining, try another server")),
        }
    }

    /// `334 <base64 challenge>` (SASL, RFC 4954): no enhanced code.
    pub fn challenge(text: &'static str) -> Reply {
        Reply {
            code: 334,
            enhanced: None,
            text: Cow::Borrowed(text),
        }
    }

    /// `250 2.0.0 Ok: queued as ID`
    pub fn queued(id: impl std::fmt::Display) -> Reply {
        Reply {
            code: 250,
            enhanced: Some([2, 0, 0]),
            text: Cow::Owned(format!("Ok: queued as {id}")),
        }
    }

    /// This reply with its text replaced (same codes).
    pub fn with_text(&self, text: impl Into<Cow<'static, str>>) -> Reply {
        Reply {
            text: text.into(),
            ..self.clone()
        }
    }

    /// 4xx or 5xx.
    pub fn is_error(&self) -> bool {
        self.code >= 400
    }

    /// Whether the session ends after this reply.
    pub fn closes_session(&self) -> bool {
        self.code == 421 || self.code == 221
    }

    /// Appends the wire form (one line, CRLF-terminated) to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        self.write_line(out, ' ', &self.text);
    }

    /// Appends a multi-line reply: `self.text` first, then `lines` (EHLO keywords).
    pub fn write_multiline(&self, lines: &[String], out: &mut Vec<u8>) {
        let mut all = std::iter::once(self.text.as_ref())
            .chain(lines.iter().map(String::as_str))
            .peekable();
        while let Some(line) = all.next() {
            let sep = if all.peek().is_some() { '-' } else { ' ' };
            // EHLO keyword lines carry no enhanced code (RFC 2034 §3).
            let code = Reply {
                enhanced: None,
                ..self.clone()
            };
            code.write_line(out, sep, line);
        }
    }

    fn write_line(&self, out: &mut Vec<u8>, sep: char, text: &str) {
        use std::io::Write;
        let _ = match self.enhanced {
            Some([a, b, c]) => write!(out, "{}{sep}{a}.{b}.{c} {text}\r\n", self.code),
            None => write!(out, "{}{sep}{text}\r\n", self.code),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every constant: the enhanced code's class matches the reply's class (the maddy
    /// `SMTPEnchCode` bug this table guards against: a 4xx with a 5.x.x code).
    #[test]
    fn enhanced_class_matches_reply_class() {
        let all = [
            Reply::OK,
            Reply::SENDER_OK,
            Reply::RECIPIENT_OK,
            Reply::RESET,
            Reply::BYE,
            Reply::HELP,
            Reply::CANNOT_VRFY,
            Reply::UNKNOWN_COMMAND,
            Reply::LINE_TOO_LONG,
            Reply::SYNTAX_ERROR,
            Reply::BAD_SENDER_SYNTAX,
            Reply::BAD_RECIPIENT_SYNTAX,
            Reply::NOT_IMPLEMENTED,
            Reply::EXPN_DISABLED,
            Reply::NEED_HELO,
            Reply::NESTED_MAIL,
            Reply::NEED_MAIL,
            Reply::NEED_RCPT,
            Reply::BDAT_THEN_DATA,
            Reply::BDAT_SYNTAX,
            Reply::CHUNK_NOT_READ,
            Reply::NO_VALID_RECIPIENTS,
            Reply::UNSUPPORTED_PARAMETER,
            Reply::TOO_MANY_RECIPIENTS,
            Reply::MESSAGE_TOO_BIG,
            Reply::TIMEOUT,
            Reply::CLOSED_FOR_NEW_CONNECTION,
            Reply::TOO_MANY_ERRORS,
            Reply::TOO_MANY_CONNECTIONS,
            Reply::TOO_MANY_CONNECTIONS_FROM_IP,
            Reply::BARE_LINE_ENDING,
            Reply::RELAY_DENIED,
            Reply::NO_SUCH_USER,
            Reply::BAD_LOCAL_PART,
            Reply::ALIAS_LOOP,
            Reply::SPOOL_FULL,
            Reply::SPOOL_ERROR,
            Reply::SHUTTING_DOWN,
            Reply::READY_FOR_TLS,
            Reply::TLS_NOT_AVAILABLE,
            Reply::TLS_ALREADY_ACTIVE,
            Reply::AUTH_OK,
            Reply::AUTH_REQUIRED,
            Reply::ENCRYPTION_REQUIRED,
            Reply::AUTH_FAILED,
            Reply::AUTH_CANCELLED,
            Reply::AUTH_BAD_BASE64,
            Reply::AUTH_UNSUPPORTED_MECHANISM,
            Reply::ALREADY_AUTHENTICATED,
            Reply::AUTH_DURING_TRANSACTION,
            Reply::AUTH_TOO_MANY_FAILURES,
            Reply::AUTH_SESSION_FAILURES,
            Reply::AUTH_BUSY,
            Reply::SENDER_NOT_OWNED,
            Reply::NULL_SENDER_NOT_ALLOWED,
            Reply::RATE_LIMITED,
            Reply::DNSBL_LISTED,
            Reply::DNSBL_TEMPFAIL,
            Reply::DMARC_REJECT,
            Reply::queued("X"),
            Reply::draining("mx.test"),
        ];
        for r in all {
            let [class, _, _] = r.enhanced.expect("every table entry has an enhanced code");
            assert_eq!(u16::from(class), r.code / 100, "{r:?}");
        }
    }

    #[test]
    fn wire_forms() {
        let mut out = Vec::new();
        Reply::TOO_MANY_RECIPIENTS.write_to(&mut out);
        assert_eq!(out, b"452 4.5.3 Too many recipients\r\n");
        out.clear();
        Reply::OK
            .with_text("mx.test")
            .write_multiline(&["PIPELINING".into(), "SIZE 10".into()], &mut out);
        assert_eq!(out, b"250-mx.test\r\n250-PIPELINING\r\n250 SIZE 10\r\n");
    }
}
