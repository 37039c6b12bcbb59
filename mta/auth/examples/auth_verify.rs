//! Runs `mta-auth`'s inbound [`Verifier`] on one message, for interop tests with
//! independent signers and DNS servers (`e2e/test_dkim.py`: dkimpy signs, dnsmasq serves
//! the keys and policies).
//!
//! ```text
//! auth_verify DNS_ADDR CLIENT_IP HELO MAIL_FROM AUTHSERV_ID < message
//! ```
//!
//! Prints the `Authentication-Results:` field, then one summary line:
//! `spf=<r> dkim=<r>[,<r>...] dmarc=<r> policy=<p> arc=<r> temporary=<bool>`.

use mta_auth::{InboundFacts, Verifier};
use std::io::Read;
use std::process::ExitCode;

fn main() -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("auth_verify: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("auth_verify: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [dns, ip, helo, mail_from, authserv_id] = args.as_slice() else {
        return Err("usage: auth_verify DNS_ADDR CLIENT_IP HELO MAIL_FROM AUTHSERV_ID".into());
    };
    let mut message = Vec::new();
    std::io::stdin().read_to_end(&mut message)?;
    let verifier = Verifier::new(&[dns.parse()?])?;
    let facts = InboundFacts {
        client_ip: ip.parse()?,
        helo,
        mail_from,
        authserv_id,
    };
    let verdict = verifier.verify(&facts, &message).await;
    print!("{}", verdict.header);
    let dkim: Vec<String> = verdict
        .dkim
        .iter()
        .map(|d| format!("{:?}", d.outcome).to_lowercase())
        .collect();
    println!(
        "spf={} dkim={} dmarc={} policy={} arc={} temporary={}",
        format!("{:?}", verdict.spf).to_lowercase(),
        if dkim.is_empty() {
            "none".to_owned()
        } else {
            dkim.join(",")
        },
        format!("{:?}", verdict.dmarc).to_lowercase(),
        format!("{:?}", verdict.dmarc_policy).to_lowercase(),
        format!("{:?}", verdict.arc).to_lowercase(),
        verdict.temporary_error,
    );
    Ok(())
}
