//! Connection admission: the count of open SMTP connections, checked against
//! `smtpd.max_connections` and `smtpd.max_connections_per_ip`, and the registry of open
//! sessions that connection pressure evicts from ([`crate::pressure`]).
//!
//! A connection holds a [`ConnectionSlot`] from accept to close; dropping it frees the
//! slot. Owns only counters: it never reads or writes a socket (the listener refuses with
//! the reply) and never looks at mail.

use crate::pressure::Sessions;
use mta_config::MtaConfig;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// This MTA's open connections (one per MTA, shared by every listener).
#[derive(Default)]
pub struct Admission {
    connections: Mutex<Connections>,
    /// Open sessions, for closing the one waiting longest when `max_connections` is
    /// reached (issue 13, item 6).
    pub sessions: Arc<Sessions>,
}

#[derive(Default)]
struct Connections {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// Why a connection was refused before its session started.
#[derive(Debug, PartialEq, Eq)]
pub enum ConnectionRefused {
    /// `smtpd.max_connections` reached.
    Total,
    /// `smtpd.max_connections_per_ip` reached for this address.
    PerIp,
}

/// Counts one open connection until dropped: against `smtpd.max_connections` always, and
/// against `smtpd.max_connections_per_ip` once its client address is known.
pub struct ConnectionSlot {
    admission: Arc<Admission>,
    ip: Option<IpAddr>,
}

impl Admission {
    /// Takes a connection slot for `ip`, or says which limit of `config` refuses it.
    pub fn admit(
        self: &Arc<Self>,
        config: &MtaConfig,
        ip: IpAddr,
    ) -> Result<ConnectionSlot, ConnectionRefused> {
        let mut slot = self.admit_connection(config)?;
        slot.count_ip(config, ip)?;
        Ok(slot)
    }

    /// Takes a connection slot whose client address is not known yet (a `proxy_protocol`
    /// listener before the header); [`ConnectionSlot::count_ip`] adds it later.
    pub fn admit_connection(
        self: &Arc<Self>,
        config: &MtaConfig,
    ) -> Result<ConnectionSlot, ConnectionRefused> {
        let mut conns = self.connections();
        if conns.total >= config.smtpd.max_connections {
            return Err(ConnectionRefused::Total);
        }
        conns.total += 1;
        Ok(ConnectionSlot {
            admission: self.clone(),
            ip: None,
        })
    }

    /// SMTP connections open now (sessions, and connections waiting for their PROXY
    /// header or TLS handshake).
    pub fn open(&self) -> usize {
        self.connections().total
    }

    fn connections(&self) -> std::sync::MutexGuard<'_, Connections> {
        self.connections.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl ConnectionSlot {
    /// Counts this connection for client `ip` too, or says that `ip` has too many. On a
    /// `proxy_protocol` listener this happens after the header, with the client's address
    /// rather than the proxy's. Counts once: a second call does nothing.
    pub fn count_ip(&mut self, config: &MtaConfig, ip: IpAddr) -> Result<(), ConnectionRefused> {
        if self.ip.is_some() {
            return Ok(());
        }
        let max = config.smtpd.max_connections_per_ip;
        // Trusted clients are counted but not limited (issue 13, item 11).
        let exempt = config.limits_exempt(ip);
        let mut conns = self.admission.connections();
        if !exempt && conns.per_ip.get(&ip).is_some_and(|n| *n >= max) {
            return Err(ConnectionRefused::PerIp);
        }
        *conns.per_ip.entry(ip).or_default() += 1;
        self.ip = Some(ip);
        Ok(())
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut conns = self.admission.connections();
        conns.total -= 1;
        if let Some(ip) = self.ip
            && let Some(n) = conns.per_ip.get_mut(&ip)
        {
            *n -= 1;
            if *n == 0 {
                conns.per_ip.remove(&ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(max: usize, per_ip: usize) -> MtaConfig {
        let mut config = MtaConfig::default();
        config.smtpd.max_connections = max;
        config.smtpd.max_connections_per_ip = per_ip;
        config.smtpd.limit_exempt_networks = Some(Vec::new());
        config
    }

    #[test]
    fn slots_count_until_dropped_per_ip_and_in_total() {
        let admission = Arc::new(Admission::default());
        let config = config(3, 2);
        let a: IpAddr = "192.0.2.1".parse().expect("an address");
        let b: IpAddr = "192.0.2.2".parse().expect("an address");
        let first = admission.admit(&config, a).expect("a free slot");
        let _second = admission.admit(&config, a).expect("a free slot");
        assert_eq!(
            admission.admit(&config, a).err(),
            Some(ConnectionRefused::PerIp)
        );
        assert_eq!(admission.open(), 2, "a refused connection holds no slot");
        let _third = admission.admit(&config, b).expect("a free slot");
        assert_eq!(
            admission.admit(&config, b).err(),
            Some(ConnectionRefused::Total)
        );
        drop(first);
        assert_eq!(admission.open(), 2);
        let _again = admission.admit(&config, a).expect("a free slot");
    }

    #[test]
    fn an_address_learned_later_is_counted_once() {
        let admission = Arc::new(Admission::default());
        let config = config(10, 1);
        let ip: IpAddr = "2001:db8::1".parse().expect("an address");
        let mut slot = admission.admit_connection(&config).expect("a free slot");
        slot.count_ip(&config, ip).expect("counted");
        slot.count_ip(&config, ip).expect("counted");
        assert_eq!(
            admission.admit(&config, ip).err(),
            Some(ConnectionRefused::PerIp)
        );
        drop(slot);
        assert!(admission.admit(&config, ip).is_ok());
    }
}
