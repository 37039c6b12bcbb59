//! Bytes at the start of a connection to a `proxy_protocol` listener, through
//! `proxy::parse` (v1 and v2 PROXY headers).
//!
//! Asserted, for arbitrary bytes:
//! * no panic, and an answer for every input (the parser never asks for more once
//!   `MAX_HEADER` bytes are here, so a reader is bounded);
//! * `Complete { length }` lies within the input and at most `MAX_HEADER`; the header's
//!   own bytes parse to the same answer without what follows, and every shorter prefix of
//!   a short header is `Incomplete` (so a header arriving in pieces is read the same);
//! * `Invalid` stays `Invalid` whatever follows (a reader may stop at once);
//! * a client address from a header is never an IPv4-mapped IPv6 address.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mta::proxy::{MAX_HEADER, Origin, Parsed, parse};

fuzz_target!(|data: &[u8]| {
    match parse(data) {
        Parsed::Complete { origin, length } => {
            assert!(length <= data.len() && length <= MAX_HEADER, "{length}");
            assert_eq!(parse(&data[..length]), Parsed::Complete { origin, length });
            if length <= 512 {
                for end in 0..length {
                    assert_eq!(parse(&data[..end]), Parsed::Incomplete, "{end} of {length}");
                }
            }
            if let Origin::Client(client) = origin {
                assert_eq!(client.ip(), client.ip().to_canonical(), "{client}");
            }
        }
        Parsed::Incomplete => assert!(data.len() < MAX_HEADER),
        Parsed::Invalid(_) => {
            let mut longer = data.to_vec();
            longer.extend_from_slice(b"\r\n");
            assert!(matches!(parse(&longer), Parsed::Invalid(_)), "{data:?}");
        }
    }
});
