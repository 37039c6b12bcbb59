//! Reports the cost of DKIM signing one 2 KB message, for RSA-2048 and Ed25519, with the
//! test keys in `tests/fixtures/` (a measurement, not a test: it asserts nothing).
//! Run: `cargo run --release -p mta-auth --example sign_bench [messages]`

use mta_auth::{Signer, SigningKey};
use std::time::Instant;

fn main() {
    let count: u32 = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(2000);
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
    let line = "The quick brown fox jumps over the lazy dog 0123456789.\r\n";
    let message = format!(
        "From: alice@example.test\r\nTo: bob@remote.test\r\nSubject: bench\r\n\
         Date: Mon, 23 Nov 2026 12:00:00 +0000\r\nMessage-ID: <b@example.test>\r\n\r\n{}",
        line.repeat(2048 / line.len())
    );
    for (name, file) in [
        ("rsa-2048", "rsa2048-pkcs8.pem"),
        ("ed25519", "ed25519-pkcs8.pem"),
    ] {
        let path = format!("{fixtures}/{file}");
        let key = match SigningKey::from_pem_file("example.test", "bench", &path) {
            Ok(key) => key,
            Err(e) => {
                println!("dkim {name}: skipped ({path}: {e})");
                continue;
            }
        };
        let signer = Signer::new(vec![key]);
        let started = Instant::now();
        for _ in 0..count {
            if let Err(e) = signer.sign("example.test", message.as_bytes()) {
                println!("dkim {name}: failed: {e}");
                break;
            }
        }
        let per = started.elapsed().as_secs_f64() * 1e6 / f64::from(count);
        println!(
            "dkim {name}: {per:.1} us per message ({count} messages of {} bytes)",
            message.len()
        );
    }
}
