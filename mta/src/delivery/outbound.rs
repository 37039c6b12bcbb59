//! The delivery environment: what delivering needs beyond the context every stage shares
//! (config, spool, queue manager's inbox, metrics): the DNS resolver for the `dns` config
//! in force, MTA-STS policies, the DANE resolver, TLS-RPT counts and the outbound site
//! limits. Only delivery uses them, so they live here and not in the shared context,
//! which therefore never imports delivery. Built once, in `server.rs`; it derefs to the
//! shared context.

use crate::context::Context;
use crate::queue::Status;
use hickory_resolver::TokioResolver;
use std::sync::{Arc, Mutex};

pub struct Outbound {
    pub ctx: Arc<Context>,
    /// Built on first use, rebuilt when `dns` in the config changes.
    resolver: Mutex<Option<(mta_config::DnsConfig, Arc<TokioResolver>)>>,
    /// MTA-STS policies of recipient domains (RFC 8461), cached per domain.
    pub mta_sts: super::mta_sts::PolicyCache,
    /// The DNSSEC-validating resolver for DANE (RFC 7672); also rebuilt on changes.
    pub dane: super::dane::ValidatingResolver,
    /// TLS-RPT (RFC 8460) counts of this period and the task that reports them.
    pub tls_rpt: super::smtp::tls_rpt::Reporter,
    /// Outbound shaping: connection permits, rates and throttle state per site.
    pub sites: super::site::Sites,
}

impl std::ops::Deref for Outbound {
    type Target = Context;
    fn deref(&self) -> &Context {
        &self.ctx
    }
}

impl Outbound {
    pub fn new(ctx: Arc<Context>) -> Self {
        let sites = super::site::Sites::new(ctx.metrics.clone());
        Self {
            ctx,
            resolver: Mutex::new(None),
            mta_sts: Default::default(),
            dane: Default::default(),
            tls_rpt: Default::default(),
            sites,
        }
    }

    /// The DNS resolver for the current `dns` config.
    pub fn resolver(&self) -> Result<Arc<TokioResolver>, Status> {
        let dns = self.config().dns.clone();
        let mut cached = self.resolver.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((config, resolver)) = cached.as_ref()
            && *config == dns
        {
            return Ok(resolver.clone());
        }
        let resolver = Arc::new(super::route::resolver(&dns).map_err(|e| {
            super::outcome::DeliveryError::Dns {
                detail: e.to_string(),
            }
        })?);
        *cached = Some((dns, resolver.clone()));
        Ok(resolver)
    }
}
