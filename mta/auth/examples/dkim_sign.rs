//! Signs a message with `mta-auth`'s [`Signer`], for interop tests with independent
//! verifiers (`e2e/test_dkim.py` runs it and hands the output to dkimpy).
//!
//! ```text
//! dkim_sign DOMAIN KEY_PEM SELECTOR [KEY_PEM SELECTOR ...] < message > signed
//! dkim_sign --record DOMAIN KEY_PEM SELECTOR        # prints the DNS TXT record
//! ```
//!
//! The message is read from standard input as bytes (CRLF line endings expected, as in
//! the spool); the output is the `DKIM-Signature:` fields followed by the message.

use mta_auth::{Signer, SigningKey};
use std::io::{Read, Write};
use std::process::ExitCode;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dkim_sign: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let record = args.first().is_some_and(|a| a == "--record");
    if record {
        args.remove(0);
    }
    let usage = "usage: dkim_sign [--record] DOMAIN KEY_PEM SELECTOR [KEY_PEM SELECTOR ...]";
    if args.len() < 3 || args.len().is_multiple_of(2) {
        return Err(usage.into());
    }
    let domain = args[0].clone();
    let keys = args[1..]
        .chunks(2)
        .map(|pair| SigningKey::from_pem_file(domain.as_str(), pair[1].as_str(), &pair[0]))
        .collect::<Result<Vec<_>, _>>()?;
    let mut stdout = std::io::stdout().lock();
    if record {
        for key in &keys {
            writeln!(stdout, "{}", key.dns_record())?;
        }
        return Ok(());
    }
    let mut message = Vec::new();
    std::io::stdin().read_to_end(&mut message)?;
    let signatures = Signer::new(keys).sign(&domain, &message)?;
    stdout.write_all(signatures.as_bytes())?;
    stdout.write_all(&message)?;
    Ok(())
}
