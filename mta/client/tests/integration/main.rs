//! Integration tests of `mta-client` over real sockets on 127.0.0.1 (and a unix
//! socket), against the scripted server in `server` and, when installed,
//! Python's aiosmtpd.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod aiosmtpd;
mod lmtp;
mod server;
mod smtp;
mod tls;

use std::time::Duration;

use mta_client::{ClientConfig, Target, Timeouts, TlsMode};

/// A client configuration with short timeouts so a failing test fails fast.
pub fn config() -> ClientConfig {
    let mut config = ClientConfig::new("client.example.net");
    config.timeouts = Timeouts::uniform(Duration::from_secs(10));
    config.tls = TlsMode::Opportunistic;
    config
}

pub fn tcp(addr: std::net::SocketAddr) -> Target {
    Target::Tcp(addr)
}
