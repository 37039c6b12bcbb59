//! What every reconcile gets: the client, the event recorder, the reflector stores it
//! reads its world from, the DNS server to check against, the operator-wide defaults, and
//! the per-object failure counts that drive error backoff.

use crate::stores::Stores;
use kube::Client;
use kube::runtime::events::{Recorder, Reporter};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;

/// Shared state of the controllers.
pub struct Context {
    /// Kubernetes client.
    pub client: Client,
    /// Publishes Events on the reconciled resources.
    pub recorder: Recorder,
    /// DNS server for MailDomain checks; `None` uses the system resolvers.
    pub dns_server: Option<SocketAddr>,
    /// Port the zones' authoritative nameservers are asked on (DKIM publication checks):
    /// 53, or `PETREL_DNS_AUTHORITATIVE_PORT` for test servers.
    pub authoritative_port: u16,
    /// Consecutive failures per `kind/namespace/name`, for exponential backoff.
    pub failures: Mutex<HashMap<String, u32>>,
    /// Skip live DNS lookups (tests without a DNS server).
    pub check_dns: bool,
    /// Reconcile runs, failures and durations.
    pub metrics: crate::metrics::Metrics,
    /// What the reconcilers read: the resources and the Secrets this operator made.
    pub stores: Stores,
    /// The `petrel-mta` image for SmtpListeners that name none (`PETREL_MTA_IMAGE`);
    /// `None` is the image matching this operator's version.
    pub mta_image: Option<String>,
}

impl Context {
    /// A context for `client`, reading from `stores`.
    pub fn new(client: Client, stores: Stores, dns_server: Option<SocketAddr>) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: crate::FIELD_MANAGER.to_owned(),
                instance: std::env::var("POD_NAME").ok(),
            },
        );
        Self {
            client,
            recorder,
            dns_server,
            authoritative_port: std::env::var("PETREL_DNS_AUTHORITATIVE_PORT")
                .ok()
                .and_then(|p| p.parse().ok())
                .unwrap_or(53),
            failures: Mutex::new(HashMap::new()),
            check_dns: true,
            metrics: crate::metrics::Metrics::default(),
            stores,
            mta_image: None,
        }
    }

    /// Records one more failure of `key`; returns the new count.
    pub fn failed(&self, key: &str) -> u32 {
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(key.to_owned()).or_insert(0);
        *n = n.saturating_add(1);
        *n
    }

    /// Forgets the failures of `key` after a successful reconcile.
    pub fn succeeded(&self, key: &str) {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }
}
