//! SMTP replies (RFC 5321 section 4.2) and the bounded reader that frames them.
//!
//! Framing and enhanced-status-code extraction (RFC 3463) are `smtp-proto`'s
//! [`ResponseReceiver`]; it caps a reply (all its lines together) at
//! [`MAX_RESPONSE_LENGTH`] bytes, which also bounds the number of lines. This
//! module adds the sanity checks it leaves to us: the code must be 2xx..5xx.

use std::fmt;

use smtp_proto::Error as ProtoError;
use smtp_proto::response::parser::{MAX_RESPONSE_LENGTH, ResponseReceiver};

/// One complete (possibly multi-line) reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The three-digit code, always in 200..=599.
    pub code: u16,
    /// The RFC 3463 enhanced status code (`[class, subject, detail]`) when the
    /// peer sent one.
    pub enhanced: Option<[u8; 3]>,
    /// The text, lines joined by `\n`, without codes and line ends.
    pub text: String,
}

impl Reply {
    /// A reply that the client makes up itself (e.g. for an envelope address it
    /// refuses to send); never seen on the wire.
    pub fn local(code: u16, enhanced: [u8; 3], text: impl Into<String>) -> Self {
        Self {
            code,
            enhanced: Some(enhanced),
            text: text.into(),
        }
    }

    /// 2xx: positive completion (for a recipient: delivered / accepted).
    pub fn is_positive(&self) -> bool {
        (200..300).contains(&self.code)
    }

    /// 3xx: positive intermediate (354 to DATA, 334 to AUTH).
    pub fn is_intermediate(&self) -> bool {
        (300..400).contains(&self.code)
    }

    /// 4xx: transient negative completion; try again later.
    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    /// 5xx: permanent negative completion; do not retry.
    pub fn is_permanent(&self) -> bool {
        (500..600).contains(&self.code)
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.code)?;
        if let Some([class, subject, detail]) = self.enhanced {
            write!(f, " {class}.{subject}.{detail}")?;
        }
        for (i, line) in self.text.split('\n').enumerate() {
            f.write_str(if i == 0 { " " } else { " / " })?;
            f.write_str(line)?;
        }
        Ok(())
    }
}

/// Bytes received but not yet consumed, plus the incremental reply parser.
#[derive(Default)]
pub(crate) struct ReplyReader {
    pending: Vec<u8>,
    receiver: ResponseReceiver,
}

impl ReplyReader {
    /// Adds bytes read from the peer.
    pub(crate) fn feed(&mut self, bytes: &[u8]) {
        self.pending.extend_from_slice(bytes);
    }

    /// Whether bytes are waiting that no reply has consumed yet.
    pub(crate) fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Returns the next complete reply if the buffered bytes hold one.
    pub(crate) fn next_reply(&mut self) -> Result<Option<Reply>, String> {
        if self.pending.is_empty() {
            return Ok(None);
        }
        let mut iter = self.pending.iter();
        let result = self.receiver.parse(&mut iter);
        let consumed = self.pending.len() - iter.len();
        self.pending.drain(..consumed);
        match result {
            Ok(response) => {
                self.receiver.reset();
                if !(200..600).contains(&response.code) {
                    return Err(format!("reply code {} out of range", response.code));
                }
                let enhanced = match response.esc {
                    [class @ (2 | 4 | 5), subject, detail] => Some([class, subject, detail]),
                    _ => None,
                };
                Ok(Some(Reply {
                    code: response.code,
                    enhanced,
                    text: response.message,
                }))
            }
            Err(ProtoError::NeedsMoreData { .. }) => Ok(None),
            Err(ProtoError::ResponseTooLong) => {
                Err(format!("reply longer than {MAX_RESPONSE_LENGTH} bytes"))
            }
            Err(other) => Err(format!("malformed reply: {other:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn parse_all(input: &[u8], chunk: usize) -> Vec<Reply> {
        let mut reader = ReplyReader::default();
        let mut out = Vec::new();
        for piece in input.chunks(chunk) {
            reader.feed(piece);
            while let Some(reply) = reader.next_reply().unwrap() {
                out.push(reply);
            }
        }
        assert!(!reader.has_pending());
        out
    }

    #[test]
    fn multi_line_and_pipelined_replies_in_any_chunking() {
        let input = b"250-mx.example Hello\r\n250-PIPELINING\r\n250 8BITMIME\r\n\
                      250 2.1.0 Ok\r\n550 5.1.1 <x@y>: unknown\r\n354 go ahead\r\n";
        for chunk in 1..input.len() {
            let replies = parse_all(input, chunk);
            assert_eq!(replies.len(), 4, "chunk {chunk}");
            assert_eq!(replies[0].code, 250);
            assert_eq!(replies[0].text, "mx.example Hello\nPIPELINING\n8BITMIME");
            assert_eq!(replies[1].enhanced, Some([2, 1, 0]));
            assert_eq!(replies[1].text, "Ok");
            assert!(replies[2].is_permanent());
            assert_eq!(replies[2].text, "<x@y>: unknown");
            assert_eq!(replies[3].code, 354);
            assert!(replies[3].is_intermediate());
            assert_eq!(replies[3].enhanced, None);
        }
    }

    #[test]
    fn garbage_and_overlong_replies_are_errors() {
        let mut reader = ReplyReader::default();
        reader.feed(b"hello there\r\n");
        assert!(reader.next_reply().is_err());

        let mut reader = ReplyReader::default();
        reader.feed(b"250-");
        reader.feed(&vec![b'a'; MAX_RESPONSE_LENGTH + 10]);
        assert!(reader.next_reply().is_err());

        let mut reader = ReplyReader::default();
        reader.feed(b"199 too low\r\n");
        assert!(reader.next_reply().is_err());
    }

    #[test]
    fn classes() {
        let reply = |code| Reply::local(code, [2, 0, 0], "x");
        assert!(reply(250).is_positive());
        assert!(reply(451).is_transient());
        assert!(reply(554).is_permanent());
        assert_eq!(
            Reply::local(550, [5, 1, 1], "a\nb").to_string(),
            "550 5.1.1 a / b"
        );
    }
}
