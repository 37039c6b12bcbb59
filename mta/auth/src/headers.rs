//! The raw header block of a message: splitting it into fields, and removing forged
//! `Authentication-Results` fields before our own is added (RFC 8601 §5).
//!
//! Works on the bytes as received: a field is its first line plus every continuation line
//! (starting with space or tab), line ending included, so removing a field never touches
//! its neighbours and the output is byte-identical apart from the removed fields. Both
//! CRLF and bare LF line endings are understood (the MTA refuses bare LF at DATA, but a
//! library should not corrupt a message that has one). The header block ends at the first
//! empty line; a message without one is all header.

/// One header field as it appears in the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Field<'a> {
    /// The field name, as written (case preserved, no colon).
    pub name: &'a [u8],
    /// The whole field: name, colon, value, continuation lines and the final line ending.
    pub raw: &'a [u8],
    /// The value: everything after the colon, line endings included.
    pub value: &'a [u8],
}

/// Splits `message` into its header fields and the offset where the header block ends
/// (the start of the empty line, or `message.len()` when there is none).
///
/// Lines that are not fields (no colon) are returned as fields with an empty name, so
/// that callers that rebuild the message keep them.
pub(crate) fn split(message: &[u8]) -> (Vec<Field<'_>>, usize) {
    // (start of the field, index of its colon or None, end of its last line)
    let mut spans: Vec<(usize, Option<usize>, usize)> = Vec::new();
    let mut pos = 0;
    while pos < message.len() {
        let line_end = next_line_end(message, pos);
        let line = &message[pos..line_end];
        if line == b"\r\n" || line == b"\n" {
            break;
        }
        match spans.last_mut() {
            Some(last) if matches!(line.first(), Some(b' ' | b'\t')) => last.2 = line_end,
            _ => {
                let colon = line.iter().position(|&b| b == b':').map(|i| pos + i);
                spans.push((pos, colon, line_end));
            }
        }
        pos = line_end;
    }
    let fields = spans
        .into_iter()
        .map(|(start, colon, end)| match colon {
            Some(colon) => Field {
                name: trim_end(&message[start..colon]),
                raw: &message[start..end],
                value: &message[colon + 1..end],
            },
            None => Field {
                name: &message[start..start],
                raw: &message[start..end],
                value: &message[start..end],
            },
        })
        .collect();
    (fields, pos)
}

/// The index just past the next `\n` at or after `from`, or the end of `message`.
fn next_line_end(message: &[u8], from: usize) -> usize {
    message[from..]
        .iter()
        .position(|&b| b == b'\n')
        .map_or(message.len(), |i| from + i + 1)
}

fn trim_end(bytes: &[u8]) -> &[u8] {
    let end = bytes
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(0, |i| i + 1);
    &bytes[..end]
}

/// Whether `message`'s header block has a field called `name` (case-insensitive).
pub(crate) fn count(fields: &[Field<'_>], name: &str) -> usize {
    fields
        .iter()
        .filter(|f| f.name.eq_ignore_ascii_case(name.as_bytes()))
        .count()
}

/// Removes every `Authentication-Results` field whose authserv-id is `authserv_id`
/// (ASCII case-insensitive) and returns the rest of the message unchanged.
///
/// RFC 8601 §5: a border MTA must delete (or rename) such fields arriving from outside,
/// or a sender could claim results we never produced. Fields carrying another
/// authserv-id are kept: they are other receivers' claims, and downstream readers only
/// trust the ids they are configured to trust. A field whose authserv-id cannot be read
/// is kept too; it claims nothing of ours.
pub fn strip_forged_authentication_results(message: &[u8], authserv_id: &str) -> Vec<u8> {
    let (fields, header_end) = split(message);
    let mut out = Vec::with_capacity(message.len());
    for field in &fields {
        let forged = field.name.eq_ignore_ascii_case(b"Authentication-Results")
            && authserv_id_of(field.value)
                .is_some_and(|id| id.eq_ignore_ascii_case(authserv_id.as_bytes()));
        if !forged {
            out.extend_from_slice(field.raw);
        }
    }
    // The empty line and the body, untouched.
    out.extend_from_slice(&message[header_end..]);
    out
}

/// The authserv-id of an `Authentication-Results` value (RFC 8601 §2.2:
/// `[CFWS] authserv-id [ CFWS authres-version ] ( no-result / 1*resinfo ) [CFWS] CRLF`):
/// the first token after leading white space and comments, up to white space, `;` or `(`.
fn authserv_id_of(value: &[u8]) -> Option<&[u8]> {
    let mut rest = value;
    loop {
        rest = trim_start(rest);
        if rest.first() == Some(&b'(') {
            rest = skip_comment(rest)?;
        } else {
            break;
        }
    }
    let end = rest
        .iter()
        .position(|&b| b.is_ascii_whitespace() || b == b';' || b == b'(')
        .unwrap_or(rest.len());
    let id = &rest[..end];
    let id = id
        .strip_prefix(b"\"")
        .and_then(|i| i.strip_suffix(b"\""))
        .unwrap_or(id);
    (!id.is_empty()).then_some(id)
}

fn trim_start(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(bytes.len());
    &bytes[start..]
}

/// Skips one (possibly nested) comment at the start of `bytes`; `None` if unterminated.
fn skip_comment(bytes: &[u8]) -> Option<&[u8]> {
    let mut depth = 0usize;
    let mut escaped = false;
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            _ if escaped => escaped = false,
            b'\\' => escaped = true,
            b'(' => depth += 1,
            b')' => {
                depth -= 1;
                if depth == 0 {
                    return Some(&bytes[i + 1..]);
                }
            }
            _ => {}
        }
    }
    None
}
