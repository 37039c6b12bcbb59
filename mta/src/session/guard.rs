//! Checks a parsed command against its raw line where `smtp-proto` is too lenient to trust:
//! numbers (below) and, for MAIL and RCPT, UTF-8 ([`Refusal::NotUtf8`]).
//!
//! `smtp-proto` 0.2.5 reads decimal numbers (BDAT chunk sizes, `MAIL … SIZE=`) with a
//! saturating parser that starts over once the value has saturated: `99999999999999999999999`
//! (23 nines) comes out as `999`, and a space after a saturated value is skipped, so
//! `BDAT 99999999999999999999 5 LAST` comes out as a 5-byte chunk. A chunk length read wrong
//! means the bytes after the real chunk are taken for commands, which smuggles a second
//! message (issue 13, item 3). This module re-reads the number from the raw command line
//! with a strict grammar and refuses the command when it does not fit in a `u64` or does not
//! agree with what `smtp-proto` returned. It never patches up a value: any disagreement is
//! a refusal.
//!
//! Inputs: the owned [`Request`] and the bytes of its line as the client sent them (CRLF
//! included). Output: `Ok(())` or the [`Refusal`] kind; the caller chooses the reply (and,
//! for BDAT, closes the connection, since the chunk's length is unknown).

use smtp_proto::Request;

/// Why a command's number was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not the strict grammar, or `smtp-proto` read a different value: `501 5.5.4`.
    Syntax,
    /// A well-formed decimal that does not fit in 64 bits: `552 5.3.4` (bigger than any
    /// `smtpd.max_message_size`).
    Overflow,
    /// A MAIL or RCPT line that is not valid UTF-8: `501 5.1.7` / `501 5.1.3`. smtp-proto
    /// replaces invalid bytes with U+FFFD, so the address would be accepted as something
    /// the client never sent; RFC 6531 §3.3 allows only UTF-8 in SMTPUTF8 addresses.
    NotUtf8,
}

/// Checks the numbers of BDAT and MAIL against `raw`, the command's line. Other commands
/// carry no number we use and always pass.
pub fn check(request: &Request<String>, raw: &[u8]) -> Result<(), Refusal> {
    if matches!(request, Request::Mail { .. } | Request::Rcpt { .. })
        && std::str::from_utf8(raw).is_err()
    {
        return Err(Refusal::NotUtf8);
    }
    match request {
        Request::Bdat { chunk_size, .. } => {
            let exact = bdat_chunk_size(raw)?;
            agree(exact, *chunk_size)
        }
        Request::Mail { from } => match mail_size(raw)? {
            Some(exact) => agree(exact, from.size),
            // smtp-proto leaves `size` at 0 without a SIZE parameter.
            None if from.size == 0 => Ok(()),
            None => Err(Refusal::Syntax),
        },
        _ => Ok(()),
    }
}

/// Gives `RCPT TO:<postmaster>` its address back. smtp-proto 0.2.5 returns the empty
/// address for a domainless `<postmaster>`, the same as for `<>`, so without the raw line
/// the session could not accept one (RFC 5321 §4.5.1) and refuse the other.
pub fn restore_postmaster(request: &mut Request<String>, raw: &[u8]) {
    if let Request::Rcpt { to } = request
        && to.address.is_empty()
        && forward_path(raw).is_some_and(|path| path.eq_ignore_ascii_case(b"postmaster"))
    {
        to.address = "postmaster".into();
    }
}

/// What is between the first `<` and the next `>` of a line.
fn forward_path(raw: &[u8]) -> Option<&[u8]> {
    let start = memchr::memchr(b'<', raw)? + 1;
    let len = memchr::memchr(b'>', &raw[start..])?;
    Some(&raw[start..start + len])
}

fn agree(exact: u64, parsed: usize) -> Result<(), Refusal> {
    if u64::try_from(parsed).ok() == Some(exact) {
        Ok(())
    } else {
        Err(Refusal::Syntax)
    }
}

/// RFC 3030 §2: `"BDAT" SP chunk-size [ SP end-marker ] CRLF`, `chunk-size = 1*DIGIT`,
/// `end-marker = "LAST"`.
pub fn bdat_chunk_size(raw: &[u8]) -> Result<u64, Refusal> {
    let mut tokens = raw.split(u8::is_ascii_whitespace).filter(|t| !t.is_empty());
    let (Some(verb), Some(size)) = (tokens.next(), tokens.next()) else {
        return Err(Refusal::Syntax);
    };
    if !verb.eq_ignore_ascii_case(b"BDAT") {
        return Err(Refusal::Syntax);
    }
    match (tokens.next(), tokens.next()) {
        (None, None) => {}
        (Some(last), None) if last.eq_ignore_ascii_case(b"LAST") => {}
        _ => return Err(Refusal::Syntax),
    }
    decimal(size)
}

/// RFC 1870 §3: `size-value ::= 1*20DIGIT` after `SIZE=`. `None` when the command has no
/// SIZE parameter. Any whitespace-separated word starting `SIZE=` counts, so an address
/// with a quoted local part containing ` SIZE=` is refused too (a false refusal accepted
/// for a simple, strict check); two SIZE parameters are a syntax error.
pub fn mail_size(raw: &[u8]) -> Result<Option<u64>, Refusal> {
    let mut found = None;
    for token in raw.split(u8::is_ascii_whitespace) {
        let Some(value) = token
            .get(..5)
            .filter(|name| name.eq_ignore_ascii_case(b"SIZE="))
            .map(|_| &token[5..])
        else {
            continue;
        };
        if found.is_some() {
            return Err(Refusal::Syntax);
        }
        found = Some(decimal(value)?);
    }
    Ok(found)
}

/// `1*DIGIT` as a `u64`; leading zeros are allowed.
fn decimal(digits: &[u8]) -> Result<u64, Refusal> {
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Err(Refusal::Syntax);
    }
    digits.iter().try_fold(0u64, |value, digit| {
        value
            .checked_mul(10)
            .and_then(|v| v.checked_add(u64::from(digit - b'0')))
            .ok_or(Refusal::Overflow)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Request<String> {
        Request::parse(&mut line.as_bytes().iter())
            .map(Request::into_owned)
            .unwrap_or_else(|e| panic!("{line:?}: {e:?}"))
    }

    /// The lines that smtp-proto 0.2.5 reads wrong (checked here, so the test notices if an
    /// upgrade fixes it), and what the guard says about each.
    #[test]
    fn overflowing_numbers_are_refused() {
        let nines = "9".repeat(23);
        let cases: &[(String, Result<(), Refusal>)] = &[
            (format!("BDAT {nines} LAST\r\n"), Err(Refusal::Overflow)),
            (format!("BDAT {nines}\r\n"), Err(Refusal::Overflow)),
            (
                format!("BDAT {} 5 LAST\r\n", "9".repeat(20)),
                Err(Refusal::Syntax),
            ),
            (
                format!("MAIL FROM:<a@b> SIZE={nines}\r\n"),
                Err(Refusal::Overflow),
            ),
            ("BDAT 12 LAST\r\n".into(), Ok(())),
            ("bdat 0 last\r\n".into(), Ok(())),
            ("BDAT 0000000000000000000000012\r\n".into(), Ok(())),
            ("MAIL FROM:<a@b> SIZE=100 BODY=8BITMIME\r\n".into(), Ok(())),
            ("MAIL FROM:<a@b> size=0\r\n".into(), Ok(())),
            ("MAIL FROM:<a@b>\r\n".into(), Ok(())),
            (
                "MAIL FROM:<a@b> SIZE=5 SIZE=6\r\n".into(),
                Err(Refusal::Syntax),
            ),
        ];
        for (line, expected) in cases {
            let request = parse(line);
            assert_eq!(check(&request, line.as_bytes()), *expected, "{line:?}");
        }
        // What smtp-proto itself makes of them (the upstream bug).
        assert!(matches!(
            parse(&format!("BDAT {nines} LAST\r\n")),
            Request::Bdat {
                chunk_size: 999,
                is_last: true
            }
        ));
        assert!(matches!(
            parse(&format!("BDAT {} 5 LAST\r\n", "9".repeat(20))),
            Request::Bdat {
                chunk_size: 5,
                is_last: true
            }
        ));
        match parse(&format!("MAIL FROM:<a@b> SIZE={nines}\r\n")) {
            Request::Mail { from } => assert_eq!(from.size, 999),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn strict_grammar() {
        assert_eq!(bdat_chunk_size(b"BDAT 1 LAST\r\n"), Ok(1));
        assert_eq!(bdat_chunk_size(b"BDAT 1 NOW\r\n"), Err(Refusal::Syntax));
        assert_eq!(bdat_chunk_size(b"BDAT 1 LAST X\r\n"), Err(Refusal::Syntax));
        assert_eq!(bdat_chunk_size(b"BDAT -1\r\n"), Err(Refusal::Syntax));
        assert_eq!(bdat_chunk_size(b"BDAT +1\r\n"), Err(Refusal::Syntax));
        assert_eq!(bdat_chunk_size(b"BDAT\r\n"), Err(Refusal::Syntax));
        assert_eq!(
            bdat_chunk_size(b"BDAT 18446744073709551615\r\n"),
            Ok(u64::MAX)
        );
        assert_eq!(
            mail_size(b"MAIL FROM:<a@b> SIZE=\r\n"),
            Err(Refusal::Syntax)
        );
        assert_eq!(
            mail_size(b"MAIL FROM:<a@b> SIZE=1x\r\n"),
            Err(Refusal::Syntax)
        );
        assert_eq!(mail_size(b"MAIL FROM:<a@b> SIZE=42\r\n"), Ok(Some(42)));
    }
}
