//! Wire encoding of a transaction: MAIL and RCPT commands with the parameters
//! the peer's extensions allow, xtext (RFC 3461 section 4), and the DATA
//! content transform (CRLF normalisation, dot-stuffing, final `.`; RFC 5321
//! section 4.5.2).

use std::fmt::Write as _;

use crate::capabilities::Capabilities;
use crate::message::{OutboundMessage, OutboundRecipient};

/// An address we refuse to put on the wire: it would break out of `<...>` or
/// out of the command line.
pub(crate) fn address_is_unsafe(address: &str) -> bool {
    address
        .bytes()
        .any(|b| matches!(b, b'\r' | b'\n' | b'<' | b'>' | 0))
}

/// Whether the envelope needs SMTPUTF8 (the flag, or any non-ASCII address).
pub(crate) fn needs_smtputf8(message: &OutboundMessage<'_>) -> bool {
    message.smtputf8
        || !message.sender.is_ascii()
        || message.recipients.iter().any(|r| !r.address.is_ascii())
}

/// `MAIL FROM:<sender> [SIZE=] [BODY=8BITMIME] [SMTPUTF8] [RET=] [ENVID=]\r\n`.
pub(crate) fn mail_command(message: &OutboundMessage<'_>, caps: &Capabilities) -> String {
    let mut cmd = format!("MAIL FROM:<{}>", message.sender);
    if caps.size.is_some() {
        let _ = write!(cmd, " SIZE={}", message.content.len());
    }
    if message.eight_bit && caps.eight_bit_mime {
        cmd.push_str(" BODY=8BITMIME");
    }
    if needs_smtputf8(message) && caps.smtputf8 {
        cmd.push_str(" SMTPUTF8");
    }
    if caps.dsn {
        match message.dsn_ret_full {
            Some(true) => cmd.push_str(" RET=FULL"),
            Some(false) => cmd.push_str(" RET=HDRS"),
            None => {}
        }
        if let Some(envid) = message.dsn_envid {
            cmd.push_str(" ENVID=");
            xtext_into(envid, &mut cmd);
        }
    }
    cmd.push_str("\r\n");
    cmd
}

/// `RCPT TO:<address> [NOTIFY=] [ORCPT=rfc822;]\r\n`.
pub(crate) fn rcpt_command(rcpt: &OutboundRecipient<'_>, caps: &Capabilities) -> String {
    let mut cmd = format!("RCPT TO:<{}>", rcpt.address);
    if caps.dsn {
        if let Some((success, failure, delay)) = rcpt.notify {
            let mut words = Vec::new();
            if success {
                words.push("SUCCESS");
            }
            if failure {
                words.push("FAILURE");
            }
            if delay {
                words.push("DELAY");
            }
            if words.is_empty() {
                words.push("NEVER");
            }
            let _ = write!(cmd, " NOTIFY={}", words.join(","));
        }
        if let Some(orcpt) = rcpt.orcpt {
            cmd.push_str(" ORCPT=rfc822;");
            xtext_into(orcpt, &mut cmd);
        }
    }
    cmd.push_str("\r\n");
    cmd
}

/// Appends `value` as xtext: `!`..`~` except `+` and `=` as is, every other
/// octet as `+XX`.
pub(crate) fn xtext_into(value: &str, out: &mut String) {
    for b in value.bytes() {
        if (b'!'..=b'~').contains(&b) && b != b'+' && b != b'=' {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "+{b:02X}");
        }
    }
}

/// Turns message content into the DATA stream, block by block: every line end
/// (CRLF, bare LF, bare CR) becomes CRLF, a `.` starting a line is doubled, and
/// [`DataEncoder::finish`] adds a missing final CRLF and the terminating `.`.
/// Normalising bare line ends means no content can ever contain a `<LF>.<LF>`
/// that a lenient server would take for the end of data (SMTP smuggling).
#[derive(Debug)]
pub(crate) struct DataEncoder {
    at_line_start: bool,
    pending_cr: bool,
}

impl Default for DataEncoder {
    fn default() -> Self {
        Self {
            at_line_start: true,
            pending_cr: false,
        }
    }
}

impl DataEncoder {
    pub(crate) fn encode(&mut self, input: &[u8], out: &mut Vec<u8>) {
        out.reserve(input.len() + input.len() / 64 + 8);
        for &b in input {
            if self.pending_cr {
                self.pending_cr = false;
                out.extend_from_slice(b"\r\n");
                self.at_line_start = true;
                if b == b'\n' {
                    continue;
                }
            }
            match b {
                b'\r' => self.pending_cr = true,
                b'\n' => {
                    out.extend_from_slice(b"\r\n");
                    self.at_line_start = true;
                }
                b'.' if self.at_line_start => {
                    out.extend_from_slice(b"..");
                    self.at_line_start = false;
                }
                _ => {
                    out.push(b);
                    self.at_line_start = false;
                }
            }
        }
    }

    pub(crate) fn finish(mut self, out: &mut Vec<u8>) {
        if self.pending_cr {
            out.extend_from_slice(b"\r\n");
            self.at_line_start = true;
        }
        if !self.at_line_start {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b".\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(input: &[u8], block: usize) -> Vec<u8> {
        let mut encoder = DataEncoder::default();
        let mut out = Vec::new();
        for piece in input.chunks(block.max(1)) {
            encoder.encode(piece, &mut out);
        }
        encoder.finish(&mut out);
        out
    }

    #[test]
    fn dot_stuffing_and_line_ends_in_any_blocking() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"", b".\r\n"),
            (b"a\r\nb\r\n", b"a\r\nb\r\n.\r\n"),
            (b"a\r\nb", b"a\r\nb\r\n.\r\n"),
            (b".x\r\n..\r\n.\r\nend", b"..x\r\n...\r\n..\r\nend\r\n.\r\n"),
            (b"a\n.\nb", b"a\r\n..\r\nb\r\n.\r\n"),
            (b"a\r.\rb\r", b"a\r\n..\r\nb\r\n.\r\n"),
            (b"a.b\r\n", b"a.b\r\n.\r\n"),
        ];
        for (input, expected) in cases {
            for block in 1..=input.len().max(1) {
                assert_eq!(
                    encode(input, block),
                    expected.to_vec(),
                    "input {:?} block {block}",
                    String::from_utf8_lossy(input)
                );
            }
        }
    }

    #[test]
    fn xtext_encodes_specials() {
        let mut out = String::new();
        xtext_into("a+b=c d\u{e9}", &mut out);
        assert_eq!(out, "a+2Bb+3Dc+20d+C3+A9");
    }

    #[test]
    fn parameters_only_for_offered_extensions() {
        let rcpts = [OutboundRecipient {
            address: "r@example.org",
            notify: Some((true, true, false)),
            orcpt: Some("orig+1@example.org"),
        }];
        let mut message = OutboundMessage::new("s@example.net", &rcpts, b"x\r\n");
        message.eight_bit = true;
        message.dsn_ret_full = Some(false);
        message.dsn_envid = Some("id 1");

        let none = Capabilities::default();
        assert_eq!(
            mail_command(&message, &none),
            "MAIL FROM:<s@example.net>\r\n"
        );
        assert_eq!(
            rcpt_command(&rcpts[0], &none),
            "RCPT TO:<r@example.org>\r\n"
        );

        let all = Capabilities {
            size: Some(1000),
            eight_bit_mime: true,
            smtputf8: true,
            dsn: true,
            ..Capabilities::default()
        };
        assert_eq!(
            mail_command(&message, &all),
            "MAIL FROM:<s@example.net> SIZE=3 BODY=8BITMIME RET=HDRS ENVID=id+201\r\n"
        );
        assert_eq!(
            rcpt_command(&rcpts[0], &all),
            "RCPT TO:<r@example.org> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;orig+2B1@example.org\r\n"
        );
        let never = OutboundRecipient {
            notify: Some((false, false, false)),
            ..rcpts[0]
        };
        assert!(rcpt_command(&never, &all).contains(" NOTIFY=NEVER "));

        let utf8 = [OutboundRecipient::new("j\u{f6}rg@example.org")];
        let message = OutboundMessage::new("", &utf8, b"");
        assert!(needs_smtputf8(&message));
        assert_eq!(
            mail_command(&message, &all),
            "MAIL FROM:<> SIZE=0 SMTPUTF8\r\n"
        );
    }

    #[test]
    fn unsafe_addresses() {
        assert!(address_is_unsafe("a@b>\r\nRCPT TO:<c@d"));
        assert!(address_is_unsafe("a\n@b"));
        assert!(!address_is_unsafe("\"a b\"@example.org"));
        assert!(!address_is_unsafe(""));
    }
}
