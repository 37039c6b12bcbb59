//! One command line, parsed by `smtp-proto` and checked by `mta::session::guard` against
//! its raw bytes (issue 13: smtp-proto 0.2.5 wraps over-long numbers, so
//! `BDAT 99999999999999999999999 LAST` reads as a 999-byte chunk).
//!
//! Asserted, for BDAT and for MAIL with a `SIZE=` word: whenever the guard lets the
//! command through, the number the session will use (smtp-proto's) is exactly the decimal
//! the client wrote. The reference compares digit strings (leading zeros removed), with no
//! arithmetic that could wrap the same way. No panic for any input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mta::session::guard;
use smtp_proto::Request;

/// The decimal in `digits` without leading zeros ("0" for zero); `None` if not all digits.
fn canonical(digits: &[u8]) -> Option<String> {
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let trimmed: String = String::from_utf8_lossy(digits)
        .trim_start_matches('0')
        .to_owned();
    Some(if trimmed.is_empty() { "0".into() } else { trimmed })
}

fn words(raw: &[u8]) -> Vec<&[u8]> {
    raw.split(u8::is_ascii_whitespace)
        .filter(|w| !w.is_empty())
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let mut raw = data.to_vec();
    if !raw.ends_with(b"\n") {
        raw.extend_from_slice(b"\r\n");
    }
    let Ok(request) = Request::parse(&mut raw.iter()).map(Request::into_owned) else {
        return;
    };
    let verdict = guard::check(&request, &raw);
    if verdict.is_err() {
        return;
    }
    match &request {
        Request::Bdat { chunk_size, .. } => {
            let words = words(&raw);
            let written = words.get(1).and_then(|w| canonical(w));
            assert_eq!(
                written.as_deref(),
                Some(chunk_size.to_string().as_str()),
                "BDAT passed the guard with a chunk size other than the one written: {:?}",
                String::from_utf8_lossy(&raw)
            );
        }
        Request::Mail { from } => {
            let sizes: Vec<&[u8]> = words(&raw)
                .into_iter()
                .filter(|w| w.len() >= 5 && w[..5].eq_ignore_ascii_case(b"SIZE="))
                .collect();
            match sizes.as_slice() {
                [] => assert_eq!(from.size, 0),
                [one] => assert_eq!(
                    canonical(&one[5..]).as_deref(),
                    Some(from.size.to_string().as_str()),
                    "MAIL passed the guard with a SIZE other than the one written: {:?}",
                    String::from_utf8_lossy(&raw)
                ),
                _ => panic!(
                    "MAIL with two SIZE words passed the guard: {:?}",
                    String::from_utf8_lossy(&raw)
                ),
            }
        }
        _ => {}
    }
});
