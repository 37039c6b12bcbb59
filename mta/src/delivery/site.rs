//! Outbound shaping by *site* (issue 17): the limits that domains sharing a provider
//! share, and how they adapt to what the provider says.
//!
//! A site is the set of MX host names a domain resolves to (sorted; a smarthost's name for
//! a smarthost route), or the name of the first `queue.sites` rule that matches the domain
//! or one of its MX hosts, together with the TLS policy in force ([`TlsPolicy`]: DANE,
//! MTA-STS enforce, REQUIRETLS, or what the route asks), so one domain's strict policy
//! never holds up another's mail. Fifty domains hosted on the same two MX hosts are one
//! site with one connection limit and one message rate.
//!
//! A delivery worker, once it knows the MX set, takes a [`SitePermit`] before it connects
//! (held while the connection is open) and a rate token ([`Site::rate_token`]) before
//! each message; it reports what happened ([`Site::connect_failed`],
//! [`Site::observe`]). Adaptive throttling (AIMD, after TCP's congestion control and
//! Postfix's destination concurrency feedback):
//! - a *throttle* (a reply [`classify`] calls so: 421/451 "too many connections", "rate
//!   limited"...) halves the site's connections (at least 1) and its message rate at
//!   once, at most once per [`REACTION_WINDOW`] for connection refusals and once for
//!   message replies, since the replies of the attempts already under way say the same
//!   thing again. A refused connection also teaches a connection ceiling (the connections
//!   this pod had open and working then), and a rate-limited message a rate ceiling
//!   ([`CEILING_MARGIN`] of the rate that was being sent: the limit in force, else the
//!   messages sent in the window before the refusal that the site took, counting those
//!   whose replies come back later; with none, one message a second, doubling back);
//! - every `recovery_interval` in which mail is delivered and nothing is throttled, one
//!   connection and a quarter of the rate ceiling come back, up to the ceilings; ceilings
//!   are forgotten `throttle_memory` after the last throttle;
//! - `suspend_after` strikes in a row (throttles or connection failures, each counted at
//!   most once per [`REACTION_WINDOW`], none with a delivery between them) suspend the
//!   site for `suspend_time`, doubling for each suspension in a row up to
//!   `max_suspend_time`: while suspended, [`Site::acquire`] defers at once with
//!   `451 4.4.5` naming the site (an ordinary deferral: the mail stays queued and is
//!   retried; throttling never bounces anything).
//!
//! Limits are this pod's (the fleet's connection leases of [`crate::fleet_limits`] stay
//! per destination). Owns no I/O and no queue state: it must never decide a recipient's
//! status other than the suspension deferral, and never sleeps except to wait for a
//! permit or a token the caller asked for.
//!
//! [`Sites::snapshot`] is what an operator sees (`petrel-mta queue sites`): a [`SiteView`]
//! of every known site, read under each site's lock in turn (never two at once, never
//! across an await) and changing nothing, not even the pruning that [`Sites::get`] does.

use super::classify;
use super::outcome::DeliveryError;
use crate::queue::Status;
use crate::shutdown::Shutdown;
use mta_config::{MtaConfig, Rate, SiteLimits};
use mta_telemetry::MtaMetrics;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// Throttles that arrive within this time of the one that lowered the limits are the
/// same news (the attempts already under way when the site said so) and lower nothing
/// more; strikes are counted at most once per window too.
pub const REACTION_WINDOW: Duration = Duration::from_secs(1);

/// A rate ceiling is this much of the rate sent when the site said "too fast": just
/// below the level that was refused, rather than at it, so the site is not throttling
/// us again and again at the edge.
pub const CEILING_MARGIN: f64 = 0.95;

/// The slowest a throttled site is sent to: one message a minute.
pub const MIN_RATE: f64 = 1.0 / 60.0;

/// Sites are forgotten (when idle and not throttled) once the map holds more than this.
const PRUNE_AT: usize = 1024;

/// Longest reply text kept as a site's last reason (a remote reply may be long).
const MAX_REASON: usize = 200;

/// The TLS policy in force for a delivery: part of the site's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TlsPolicy {
    /// DANE (RFC 7672) applies to the MX hosts.
    Dane,
    /// An MTA-STS policy (RFC 8461) in `enforce` mode.
    MtaSts,
    /// The message asks for REQUIRETLS (RFC 8689).
    RequireTls,
    /// The route asks for verified TLS.
    Verified,
    /// The route asks for TLS, any certificate.
    Required,
    /// STARTTLS when offered.
    Opportunistic,
    /// No TLS.
    Plain,
}

impl TlsPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            TlsPolicy::Dane => "dane",
            TlsPolicy::MtaSts => "mta-sts",
            TlsPolicy::RequireTls => "requiretls",
            TlsPolicy::Verified => "verified",
            TlsPolicy::Required => "required",
            TlsPolicy::Opportunistic => "opportunistic",
            TlsPolicy::Plain => "none",
        }
    }
}

/// Which site: a rule's name or the sorted MX host names, and the TLS policy.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SiteKey {
    pub name: String,
    pub tls: TlsPolicy,
    /// The name is a `queue.sites` rule's (a bounded set: the only names metrics show).
    pub configured: bool,
}

impl fmt::Display for SiteKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name, self.tls.as_str())
    }
}

impl SiteKey {
    /// The key of a delivery to `domain` (none for a smarthost) over `hosts`.
    pub fn new(config: &MtaConfig, domain: Option<&str>, hosts: &[&str], tls: TlsPolicy) -> Self {
        if let Some(rule) = rule_for(config, domain, hosts) {
            return SiteKey {
                name: rule.name.clone(),
                tls,
                configured: true,
            };
        }
        let mut names: Vec<String> = hosts
            .iter()
            .map(|h| h.trim_end_matches('.').to_ascii_lowercase())
            .collect();
        names.sort();
        names.dedup();
        SiteKey {
            name: names.join(","),
            tls,
            configured: false,
        }
    }

    /// The metrics label: the rule's name, or `other` (MX sets are unbounded).
    pub fn label(&self) -> &str {
        if self.configured { &self.name } else { "other" }
    }
}

fn rule_for<'a>(
    config: &'a MtaConfig,
    domain: Option<&str>,
    hosts: &[&str],
) -> Option<&'a mta_config::SiteRule> {
    config.queue.sites.iter().find(|rule| {
        domain.is_some_and(|d| rule.domains.iter().any(|r| r.eq_ignore_ascii_case(d)))
            || hosts
                .iter()
                .any(|h| rule.mx.iter().any(|pattern| mx_matches(pattern, h)))
    })
}

/// `*.mail.example` matches any name under `mail.example`; other patterns match the
/// name itself. Case and a trailing dot do not matter.
fn mx_matches(pattern: &str, host: &str) -> bool {
    let host = host.trim_end_matches('.');
    match pattern.strip_prefix("*.") {
        Some(parent) => {
            host.len() > parent.len() + 1 && {
                let (head, tail) = host.split_at(host.len() - parent.len());
                head.ends_with('.') && tail.eq_ignore_ascii_case(parent)
            }
        }
        None => pattern.trim_end_matches('.').eq_ignore_ascii_case(host),
    }
}

/// The limits of `key` under `config`: the rule's, else `queue.site_limits`.
fn limits_for(config: &MtaConfig, key: &SiteKey) -> Limits {
    let limits = key
        .configured
        .then(|| config.queue.sites.iter().find(|r| r.name == key.name))
        .flatten()
        .and_then(|r| r.limits.as_ref())
        .unwrap_or(&config.queue.site_limits);
    Limits::from(limits)
}

/// [`SiteLimits`] in the units used here.
#[derive(Debug, Clone, PartialEq)]
struct Limits {
    max_connections: usize,
    /// Messages per second; `None`: no limit.
    max_rate: Option<f64>,
    recovery_interval: Duration,
    throttle_memory: Duration,
    suspend_after: u32,
    suspend_time: Duration,
    max_suspend_time: Duration,
}

impl From<&SiteLimits> for Limits {
    fn from(l: &SiteLimits) -> Self {
        // Validation has refused a rate that does not parse.
        let max_rate = Rate::parse(&l.max_message_rate)
            .ok()
            .flatten()
            .map(|r| f64::from(r.count) / r.interval.as_secs_f64());
        Limits {
            max_connections: l.max_connections.max(1),
            max_rate,
            recovery_interval: l.recovery_interval,
            throttle_memory: l.throttle_memory,
            suspend_after: l.suspend_after.max(1),
            suspend_time: l.suspend_time,
            max_suspend_time: l.max_suspend_time,
        }
    }
}

/// Every site with connections, waiters or throttle state.
#[derive(Default)]
pub struct Sites {
    sites: Mutex<HashMap<SiteKey, Arc<Site>>>,
    metrics: Option<MtaMetrics>,
}

impl Sites {
    /// Sites that record their throttles, suspensions and (named sites only) limits.
    pub fn new(metrics: MtaMetrics) -> Self {
        Sites {
            sites: Mutex::default(),
            metrics: Some(metrics),
        }
    }

    /// The site of `key`, made on first use; its limits follow config reloads.
    pub fn get(&self, config: &MtaConfig, key: SiteKey) -> Arc<Site> {
        let limits = limits_for(config, &key);
        let mut sites = self.sites.lock().unwrap_or_else(|e| e.into_inner());
        if sites.len() > PRUNE_AT {
            sites.retain(|_, site| Arc::strong_count(site) > 1 || site.remembers());
        }
        let site = sites
            .entry(key.clone())
            .or_insert_with(|| {
                let mut site = Site::new(key, limits.clone());
                site.metrics = self.metrics.clone();
                site.publish(&site.lock());
                Arc::new(site)
            })
            .clone();
        site.set_limits(limits);
        site
    }

    /// The sites suspended now, by name (for logs and tests).
    pub fn suspended(&self) -> Vec<String> {
        let sites = self.sites.lock().unwrap_or_else(|e| e.into_inner());
        sites
            .values()
            .filter(|s| s.suspended_for(Instant::now()).is_some())
            .map(|s| s.key.to_string())
            .collect()
    }

    /// Every known site as an operator sees it, suspended sites first, then throttled
    /// ones, then those with strikes, each group by name. Reads only: no site's state
    /// changes and none is pruned.
    pub fn snapshot(&self) -> Vec<SiteView> {
        self.snapshot_at(Instant::now(), SystemTime::now())
    }

    /// [`Sites::snapshot`] at `now`, which is `wall` on the wall clock (for the RFC 3339
    /// time a suspension ends).
    fn snapshot_at(&self, now: Instant, wall: SystemTime) -> Vec<SiteView> {
        // The map's lock only while the sites are listed; each site's own lock while it
        // is read, one at a time.
        let sites: Vec<Arc<Site>> = {
            let sites = self.sites.lock().unwrap_or_else(|e| e.into_inner());
            sites.values().cloned().collect()
        };
        let mut views: Vec<SiteView> = sites.iter().map(|s| s.view(now, wall)).collect();
        views.sort_by(|a, b| (a.rank(), &a.site, &a.tls).cmp(&(b.rank(), &b.site, &b.tls)));
        views
    }
}

/// One site as `petrel-mta queue sites` shows it: the admin endpoint's JSON.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SiteView {
    /// The `queue.sites` rule's name, or the site's MX host names joined by commas.
    pub site: String,
    /// The TLS policy part of the key (`dane`, `mta-sts`, `requiretls`, `verified`,
    /// `required`, `opportunistic`, `none`).
    pub tls: String,
    /// Named by a `queue.sites` rule.
    pub configured: bool,
    /// Connections up now.
    pub connections_open: usize,
    /// Permits out: connections up or being set up.
    pub connections_held: usize,
    /// Delivery workers waiting for a permit.
    pub waiting: usize,
    /// Connections allowed now.
    pub connection_limit: usize,
    /// Connections the config allows.
    pub max_connections: usize,
    /// Connections the site was seen to take when it refused one (until forgotten).
    pub connection_ceiling: Option<usize>,
    /// Messages a second allowed now; absent: no limit.
    pub message_rate: Option<f64>,
    /// Messages a second the config allows; absent: no limit.
    pub max_message_rate: Option<f64>,
    /// The rate learnt from a "too fast" reply (until forgotten).
    pub rate_ceiling: Option<f64>,
    /// A throttle within `throttle_memory`: the limits may be below the configured ones.
    pub throttled: bool,
    /// Seconds since the last throttle.
    pub last_throttle_secs_ago: Option<u64>,
    /// Throttles or connection failures in a row, and how many suspend the site.
    pub strikes: u32,
    pub suspend_after: u32,
    /// Suspensions in a row (each twice as long as the last).
    pub suspensions: u32,
    /// Seconds left of the suspension (rounded up); absent: not suspended.
    pub suspended_for_secs: Option<u64>,
    /// When the suspension ends (RFC 3339, UTC).
    pub suspended_until: Option<String>,
    /// The reply (or this MTA's account of the failure) of the last throttle or failed
    /// connection, and how long ago it came.
    pub last_reason: Option<String>,
    pub last_reason_secs_ago: Option<u64>,
}

impl SiteView {
    /// Where the site goes in the list: suspended, throttled, with strikes, the rest.
    fn rank(&self) -> u8 {
        if self.suspended_for_secs.is_some() {
            0
        } else if self.throttled {
            1
        } else if self.strikes > 0 {
            2
        } else {
            3
        }
    }
}

/// Whole seconds, rounded up (a suspension with 0.2 s left is still one).
fn secs_up(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// One site: its connection permits, its rate and its throttle state.
pub struct Site {
    pub key: SiteKey,
    permits: Arc<Semaphore>,
    /// Workers waiting for a permit.
    waiters: AtomicUsize,
    /// Wakes the workers idling on a connection of this site when another wants one.
    wanted: Notify,
    state: Mutex<State>,
    metrics: Option<MtaMetrics>,
}

struct State {
    limits: Limits,
    /// Connections allowed now (permits in circulation minus `debt`).
    connections: usize,
    /// Permits to forget as they come back, after the limit was lowered while they
    /// were out.
    debt: usize,
    connection_ceiling: Option<usize>,
    /// Permits out, and how many of them have a working connection.
    held: usize,
    established: usize,
    /// Messages per second now; `None`: no limit.
    rate: Option<f64>,
    rate_ceiling: Option<f64>,
    /// The rate ceiling being learnt from the last rate-limited message, which later
    /// replies may still raise.
    estimate: Option<Estimate>,
    /// When the next rate token may be used (a bucket of one: tokens are spaced by
    /// `1 / rate` at least).
    next_token: Instant,
    /// When the messages delivered in about the last [`REACTION_WINDOW`] were sent
    /// (took their token), in order: the rate the site took.
    recent: VecDeque<Instant>,
    /// When the messages still waiting for their replies were sent.
    in_flight: Vec<Instant>,
    connection_reaction: Option<Instant>,
    message_reaction: Option<Instant>,
    last_throttle: Option<Instant>,
    last_step: Instant,
    last_strike: Option<Instant>,
    strikes: u32,
    suspensions: u32,
    suspended_until: Option<Instant>,
    /// The status of the last throttle or failed connection (for the admin view only),
    /// and when.
    last_reason: Option<(Instant, String)>,
}

impl State {
    /// A throttle within `throttle_memory`: the limits may be below the configured ones.
    fn throttled(&self, now: Instant) -> bool {
        self.last_throttle
            .is_some_and(|t| now.saturating_duration_since(t) < self.limits.throttle_memory)
    }

    /// What is left of the suspension at `now`, if the site is suspended.
    fn suspension_left(&self, now: Instant) -> Option<Duration> {
        self.suspended_until
            .filter(|until| *until > now)
            .map(|until| until - now)
    }
}

/// A rate ceiling being learnt from what the site took when it refused a message:
/// messages sent in the window before the refusal came back whose replies come back
/// after it (from other connections) were taken too, and raise it when they do.
#[derive(Debug, Clone, Copy)]
struct Estimate {
    /// A window before the refused message was sent.
    since: Instant,
    /// When the refusal came back: later messages are not the site's answer to it.
    until: Instant,
    taken: usize,
}

/// Where a throttle came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Refused at connection (a 421 greeting, or the attempt failed as a whole).
    Connect,
    /// A reply to a message (MAIL, RCPT, DATA), with the messages the site took in the
    /// window before it.
    Message(usize),
}

/// What the site made of one report, for the caller's logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Reaction {
    /// A throttle lowered the limits.
    pub lowered: bool,
    /// The site was suspended.
    pub suspended: Option<Duration>,
}

impl Site {
    fn new(key: SiteKey, limits: Limits) -> Self {
        let now = Instant::now();
        Site {
            key,
            permits: Arc::new(Semaphore::new(limits.max_connections)),
            waiters: AtomicUsize::new(0),
            wanted: Notify::new(),
            metrics: None,
            state: Mutex::new(State {
                connections: limits.max_connections,
                rate: limits.max_rate,
                limits,
                debt: 0,
                connection_ceiling: None,
                held: 0,
                established: 0,
                rate_ceiling: None,
                estimate: None,
                next_token: now,
                recent: VecDeque::new(),
                in_flight: Vec::new(),
                connection_reaction: None,
                message_reaction: None,
                last_throttle: None,
                last_step: now,
                last_strike: None,
                strikes: 0,
                suspensions: 0,
                suspended_until: None,
                last_reason: None,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Throttle state worth keeping although nobody uses the site now.
    fn remembers(&self) -> bool {
        let now = Instant::now();
        let state = self.lock();
        state.throttled(now) || state.suspension_left(now).is_some() || state.strikes > 0
    }

    /// What the admin view shows of this site at `now` (`wall` on the wall clock).
    fn view(&self, now: Instant, wall: SystemTime) -> SiteView {
        let state = self.lock();
        let left = state.suspension_left(now);
        let ago = |t: Instant| now.saturating_duration_since(t).as_secs();
        SiteView {
            site: self.key.name.clone(),
            tls: self.key.tls.as_str().to_owned(),
            configured: self.key.configured,
            connections_open: state.established,
            connections_held: state.held,
            waiting: self.waiters.load(Ordering::SeqCst),
            connection_limit: state.connections,
            max_connections: state.limits.max_connections,
            connection_ceiling: state.connection_ceiling,
            message_rate: state.rate,
            max_message_rate: state.limits.max_rate,
            rate_ceiling: state.rate_ceiling,
            throttled: state.throttled(now),
            last_throttle_secs_ago: state.last_throttle.map(ago),
            strikes: state.strikes,
            suspend_after: state.limits.suspend_after,
            suspensions: state.suspensions,
            suspended_for_secs: left.map(secs_up),
            suspended_until: left.map(|left| {
                humantime::format_rfc3339_seconds(wall + Duration::from_secs(secs_up(left)))
                    .to_string()
            }),
            last_reason: state.last_reason.as_ref().map(|(_, r)| r.clone()),
            last_reason_secs_ago: state.last_reason.as_ref().map(|(t, _)| ago(*t)),
        }
    }

    fn set_limits(&self, limits: Limits) {
        let mut state = self.lock();
        if state.limits == limits {
            return;
        }
        let top = limits.max_connections.min(
            state
                .connection_ceiling
                .unwrap_or(limits.max_connections)
                .max(1),
        );
        if state.last_throttle.is_none() || state.connections > top {
            self.set_connections(&mut state, top);
        }
        state.rate = match (state.rate, limits.max_rate) {
            // Not throttled: the configured rate, whatever it was before.
            (_, max) if state.last_throttle.is_none() => max,
            (Some(rate), Some(max)) => Some(rate.min(max)),
            (rate, max) => rate.or(max),
        };
        state.limits = limits;
        self.publish(&state);
    }

    /// The limits in force, as gauges, for a named site (a bounded set).
    fn publish(&self, state: &State) {
        if let Some(metrics) = &self.metrics
            && self.key.configured
        {
            metrics.set_site_limits(&self.key.name, state.connections, state.rate);
        }
    }

    /// A connection permit: at once when the site has one free, else in turn (FIFO).
    /// `Err` with the deferral to report when the site is suspended (or shutdown began).
    pub async fn acquire(
        self: &Arc<Self>,
        shutdown: Option<&mut Shutdown>,
    ) -> Result<SitePermit, Status> {
        self.check_suspended()?;
        self.waiters.fetch_add(1, Ordering::SeqCst);
        self.wanted.notify_waiters();
        let permit = match shutdown {
            Some(shutdown) => tokio::select! {
                permit = self.permits.clone().acquire_owned() => permit.ok(),
                () = shutdown.recv() => None,
            },
            None => self.permits.clone().acquire_owned().await.ok(),
        };
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        let Some(permit) = permit else {
            return Err(DeliveryError::Local {
                detail: "shutting down".into(),
            }
            .status());
        };
        let permit = SitePermit {
            site: self.clone(),
            permit: Some(permit),
            established: false,
        };
        self.lock().held += 1;
        // The site may have been suspended while this worker waited.
        self.check_suspended()?;
        Ok(permit)
    }

    /// `Err` with the deferral to report while the site is suspended.
    pub fn check_suspended(&self) -> Result<(), Status> {
        match self.suspended_for(Instant::now()) {
            Some(left) => Err(DeliveryError::SiteSuspended {
                site: self.key.to_string(),
                seconds: left.as_secs().max(1),
            }
            .status()),
            None => Ok(()),
        }
    }

    fn suspended_for(&self, now: Instant) -> Option<Duration> {
        self.lock().suspension_left(now)
    }

    /// Others wait for a permit: a worker should not keep an idle connection open.
    pub fn contended(&self) -> bool {
        self.waiters.load(Ordering::SeqCst) > 0
    }

    /// Completes when a worker starts waiting for a permit (one idling on a connection
    /// of this site should then close it).
    pub async fn wanted(&self) {
        self.wanted.notified().await;
    }

    /// Waits for the site's next rate token (at once without a rate limit), and returns
    /// when the message was sent by it: to give [`Site::observe`] with its replies.
    pub async fn rate_token(&self, shutdown: Option<&mut Shutdown>) -> Instant {
        let at = {
            let mut state = self.lock();
            let at = state.next_token.max(Instant::now());
            if let Some(rate) = state.rate {
                state.next_token = at + Duration::from_secs_f64(1.0 / rate.max(MIN_RATE));
            }
            state.in_flight.push(at);
            at
        };
        match shutdown {
            Some(shutdown) => tokio::select! {
                () = tokio::time::sleep_until(at) => {}
                () = shutdown.recv() => {}
            },
            None => tokio::time::sleep_until(at).await,
        }
        at
    }

    /// A connection attempt that held a permit failed with `status`: a throttle when the
    /// site refused the connection so, else a strike (the site is not answering well).
    pub fn connect_failed(&self, status: &Status) -> Reaction {
        let now = Instant::now();
        let mut state = self.lock();
        let reaction = if classify::verdict(status).is_some_and(|v| v.is_throttle()) {
            self.throttled(&mut state, Stage::Connect, now)
        } else {
            let mut reaction = Reaction::default();
            self.strike(&mut state, now, &mut reaction);
            reaction
        };
        note(&mut state, status, now);
        self.log(&state, reaction, status);
        reaction
    }

    /// The statuses of one message sent over a connection of this site, `sent` when its
    /// token ([`Site::rate_token`]) said.
    pub fn observe(&self, results: &[(usize, Status)], sent: Instant) -> Reaction {
        let now = Instant::now();
        let mut state = self.lock();
        if let Some(i) = state.in_flight.iter().position(|t| *t == sent) {
            state.in_flight.swap_remove(i);
        }
        let throttled = results
            .iter()
            .any(|(_, s)| classify::verdict(s).is_some_and(|v| v.is_throttle()));
        if results
            .iter()
            .any(|(_, s)| matches!(s, Status::Delivered(_)))
        {
            self.delivered(&mut state, sent, now);
        }
        if !throttled {
            return Reaction::default();
        }
        if let Some((_, status)) = results
            .iter()
            .find(|(_, s)| classify::verdict(s).is_some_and(|v| v.is_throttle()))
        {
            note(&mut state, status, now);
        }
        // What the site took when it said "too fast": the messages sent in the window
        // before this one that it accepted. Those still on their way count once their
        // replies say they were taken ([`Estimate`]): concurrent connections race, so
        // being sent earlier does not mean being taken earlier.
        let since = sent.checked_sub(REACTION_WINDOW).unwrap_or(sent);
        let taken = state.recent.iter().filter(|t| **t > since).count();
        let learning = state.rate.is_none() && taken > 0;
        let reaction = self.throttled(&mut state, Stage::Message(taken), now);
        if reaction.lowered && learning {
            state.estimate = Some(Estimate {
                since,
                until: now,
                taken,
            });
        }
        if let Some((_, status)) = results.first() {
            self.log(&state, reaction, status);
        }
        reaction
    }

    /// One line when the limits were lowered or the site suspended.
    fn log(&self, state: &State, reaction: Reaction, status: &Status) {
        let site = self.key.to_string();
        let rate = state
            .rate
            .map(|r| format!("{r:.2}/s"))
            .unwrap_or_else(|| "unlimited".into());
        let reply = mta_telemetry::Escaped(
            status
                .diagnostic()
                .map(|d| d.text.as_str())
                .unwrap_or_default(),
        );
        if let Some(metrics) = &self.metrics {
            if reaction.lowered {
                metrics.site_throttled(self.key.label());
            }
            if reaction.suspended.is_some() {
                metrics.site_suspended(self.key.label());
            }
        }
        self.publish(state);
        if let Some(length) = reaction.suspended {
            tracing::warn!(site, seconds = length.as_secs(), %reply, "site suspended: its mail stays queued");
        } else if reaction.lowered {
            tracing::info!(site, connections = state.connections, rate, %reply, "site throttled: limits lowered");
        }
    }

    fn delivered(&self, state: &mut State, sent: Instant, now: Instant) {
        // Replies come back nearly in the order the messages were sent.
        let at = state
            .recent
            .iter()
            .rposition(|t| *t <= sent)
            .map_or(0, |i| i + 1);
        state.recent.insert(at, sent);
        if let Some(estimate) = &mut state.estimate
            && sent > estimate.since
            && sent <= estimate.until
            && let Some(old) = state.rate_ceiling
        {
            estimate.taken += 1;
            let ceiling = estimate.taken as f64 * CEILING_MARGIN;
            if ceiling > old {
                state.rate = state.rate.map(|r| r * ceiling / old);
                state.rate_ceiling = Some(ceiling);
            }
        }
        // Kept a little longer than the window: a throttle counts back from its own
        // message's sending, which may be a while ago.
        while state
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > 2 * REACTION_WINDOW)
            || state.recent.len() > 10_000
        {
            state.recent.pop_front();
        }
        state.strikes = 0;
        state.suspensions = 0;
        if let Some(last) = state.last_throttle
            && now.duration_since(last) >= state.limits.throttle_memory
        {
            state.last_throttle = None;
            state.connection_ceiling = None;
            state.rate_ceiling = None;
            state.estimate = None;
            state.rate = state.limits.max_rate;
        }
        if now.duration_since(state.last_step) >= state.limits.recovery_interval {
            state.last_step = now;
            self.recover(state);
        }
    }

    /// One step back up: a connection, and a quarter of the rate ceiling.
    fn recover(&self, state: &mut State) {
        let before = (state.connections, state.rate);
        let top = state
            .limits
            .max_connections
            .min(state.connection_ceiling.unwrap_or(usize::MAX));
        if state.connections < top {
            let up = state.connections + 1;
            self.set_connections(state, up);
        }
        state.rate = match (state.rate, state.rate_ceiling.or(state.limits.max_rate)) {
            (Some(rate), Some(cap)) => Some((rate + cap / 4.0).min(cap)),
            // No ceiling learnt and none configured: twice as fast, each step.
            (Some(rate), None) => Some(rate * 2.0),
            (None, cap) => cap,
        };
        if (state.connections, state.rate) != before {
            let rate = state
                .rate
                .map(|r| format!("{r:.2}/s"))
                .unwrap_or_else(|| "unlimited".into());
            tracing::info!(site = %self.key, connections = state.connections, rate, "site recovering: limits raised");
            self.publish(state);
        }
    }

    fn throttled(&self, state: &mut State, stage: Stage, now: Instant) -> Reaction {
        state.last_throttle = Some(now);
        let window = match stage {
            Stage::Connect => &mut state.connection_reaction,
            Stage::Message(_) => &mut state.message_reaction,
        };
        let fresh = window.is_none_or(|t| now.duration_since(t) >= REACTION_WINDOW);
        if stage == Stage::Connect {
            // The site refused a connection while this many of ours worked: that many it
            // takes. Within one window the refusals race with the connections still
            // being set up, so the most seen then counts.
            let seen = state.established.max(1);
            state.connection_ceiling = Some(match state.connection_ceiling {
                Some(ceiling) if !fresh => ceiling.max(seen),
                Some(_) | None => seen,
            });
        }
        let mut reaction = Reaction::default();
        if !fresh {
            if let Some(ceiling) = state.connection_ceiling
                && state.connections > ceiling
            {
                self.set_connections(state, ceiling);
            }
            return reaction;
        }
        *match stage {
            Stage::Connect => &mut state.connection_reaction,
            Stage::Message(_) => &mut state.message_reaction,
        } = Some(now);
        reaction.lowered = true;
        state.last_step = now;
        let halved = (state.connections / 2).max(1);
        let lowered = halved.min(state.connection_ceiling.unwrap_or(usize::MAX).max(1));
        self.set_connections(state, lowered);
        state.rate = match (stage, state.rate) {
            (Stage::Message(taken), rate) => {
                // What was being sent when the site said "too fast": the limit in force,
                // or what it took in the last window when there was none.
                match rate.or((taken > 0).then_some(taken as f64)) {
                    Some(sent) => {
                        let ceiling = (sent.max(MIN_RATE) * CEILING_MARGIN).max(MIN_RATE);
                        state.rate_ceiling = Some(ceiling);
                        Some((ceiling / 2.0).max(MIN_RATE))
                    }
                    // Nothing to learn from (the first message in a while was refused):
                    // one a second, doubling back while mail gets through.
                    None => Some(1.0),
                }
            }
            (Stage::Connect, Some(rate)) => Some((rate / 2.0).max(MIN_RATE)),
            // A refused connection says nothing of the rate the site takes, and there is
            // no rate to halve: the connections alone come down.
            (Stage::Connect, None) => None,
        };
        self.strike(state, now, &mut reaction);
        reaction
    }

    fn strike(&self, state: &mut State, now: Instant, reaction: &mut Reaction) {
        if state
            .last_strike
            .is_some_and(|t| now.duration_since(t) < REACTION_WINDOW)
        {
            return;
        }
        state.last_strike = Some(now);
        state.strikes += 1;
        if state.strikes < state.limits.suspend_after {
            return;
        }
        let factor = 2u32.saturating_pow(state.suspensions.min(16));
        let length = state
            .limits
            .suspend_time
            .saturating_mul(factor)
            .min(state.limits.max_suspend_time);
        state.suspended_until = Some(now + length);
        state.suspensions += 1;
        state.strikes = 0;
        reaction.suspended = Some(length);
    }

    /// Sets the connections allowed: new permits at once; fewer as they come back.
    fn set_connections(&self, state: &mut State, to: usize) {
        let to = to.max(1);
        while state.connections < to {
            if state.debt > 0 {
                state.debt -= 1;
            } else {
                self.permits.add_permits(1);
            }
            state.connections += 1;
        }
        while state.connections > to {
            match self.permits.try_acquire() {
                Ok(permit) => permit.forget(),
                Err(_) => state.debt += 1,
            }
            state.connections -= 1;
        }
    }

    /// Connections allowed now, and the message rate (for metrics and tests).
    pub fn limits_now(&self) -> (usize, Option<f64>) {
        let state = self.lock();
        (state.connections, state.rate)
    }
}

/// Keeps `status` as the site's last reason, for the admin view only (nothing decides on
/// it), cut to [`MAX_REASON`] bytes.
fn note(state: &mut State, status: &Status, now: Instant) {
    let Some(diagnostic) = status.diagnostic() else {
        return;
    };
    let mut text = diagnostic.to_string();
    if text.len() > MAX_REASON {
        text.truncate(text.floor_char_boundary(MAX_REASON));
        text.push('…');
    }
    state.last_reason = Some((now, text));
}

/// One of the site's connections, from before connecting until the connection closes.
pub struct SitePermit {
    site: Arc<Site>,
    permit: Option<OwnedSemaphorePermit>,
    established: bool,
}

impl SitePermit {
    pub fn site(&self) -> &Arc<Site> {
        &self.site
    }

    /// The connection is up (the site accepted it): it counts toward what the site takes.
    pub fn connected(&mut self) {
        if !self.established {
            self.established = true;
            self.site.lock().established += 1;
        }
    }

    /// The connection is being closed (QUIT is about to go): it no longer counts toward
    /// what the site takes, though the permit stays held until it is closed. The site may
    /// see the close before this worker does, and a connection it refuses meanwhile must
    /// not teach a ceiling that counts the closing one as working.
    pub fn closing(&mut self) {
        if self.established {
            self.established = false;
            self.site.lock().established -= 1;
        }
    }
}

impl Drop for SitePermit {
    fn drop(&mut self) {
        let mut state = self.site.lock();
        state.held -= 1;
        if self.established {
            state.established -= 1;
        }
        if let Some(permit) = self.permit.take()
            && state.debt > 0
        {
            state.debt -= 1;
            permit.forget();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::Diagnostic;

    fn config(yaml: &str) -> MtaConfig {
        MtaConfig::from_yaml(yaml).expect("config")
    }

    fn key(name: &str) -> SiteKey {
        SiteKey {
            name: name.into(),
            tls: TlsPolicy::Opportunistic,
            configured: false,
        }
    }

    fn site(limits: SiteLimits) -> Arc<Site> {
        Arc::new(Site::new(key("mx.example"), Limits::from(&limits)))
    }

    fn limits(max_connections: usize, rate: &str) -> SiteLimits {
        SiteLimits {
            max_connections,
            max_message_rate: rate.into(),
            recovery_interval: Duration::from_secs(1),
            ..SiteLimits::default()
        }
    }

    fn delivered() -> Vec<(usize, Status)> {
        vec![(0, Status::Delivered(Diagnostic::new(250, [2, 0, 0], "ok")))]
    }

    fn rate_limited() -> Vec<(usize, Status)> {
        vec![(
            0,
            Status::Deferred(Diagnostic::new(451, [4, 7, 1], "rate limited")),
        )]
    }

    fn too_many_connections() -> Status {
        Status::Deferred(Diagnostic::new(421, [4, 7, 0], "too many connections"))
    }

    fn refused() -> Status {
        Status::Deferred(Diagnostic::new(
            451,
            [4, 4, 1],
            "connection refused by 127.0.0.2:25",
        ))
    }

    #[test]
    fn domains_with_the_same_mx_set_share_a_site_and_tls_policy_splits_it() {
        let c = config("version: 1\n");
        let a = SiteKey::new(
            &c,
            Some("a.example"),
            &["mx2.host.example", "MX1.host.example."],
            TlsPolicy::Opportunistic,
        );
        let b = SiteKey::new(
            &c,
            Some("b.example"),
            &["mx1.host.example", "mx2.host.example"],
            TlsPolicy::Opportunistic,
        );
        assert_eq!(a, b);
        assert_eq!(a.name, "mx1.host.example,mx2.host.example");
        assert_eq!(a.label(), "other");
        let strict = SiteKey::new(
            &c,
            Some("c.example"),
            &["mx1.host.example", "mx2.host.example"],
            TlsPolicy::MtaSts,
        );
        assert_ne!(a, strict);
        assert_eq!(
            strict.to_string(),
            "mx1.host.example,mx2.host.example (mta-sts)"
        );
    }

    #[test]
    fn rules_name_sites_by_domain_or_mx_pattern() {
        let c = config(
            "version: 1\nqueue:\n  sites:\n    - name: bigmail\n      mx: ['*.mail.example']\n    - name: small\n      domains: [small.example]\n      limits: {max_connections: 2}\n",
        );
        let by_mx = SiteKey::new(
            &c,
            Some("x.example"),
            &["in1.mail.example"],
            TlsPolicy::Opportunistic,
        );
        assert_eq!((by_mx.name.as_str(), by_mx.configured), ("bigmail", true));
        assert_eq!(by_mx.label(), "bigmail");
        let other = SiteKey::new(
            &c,
            Some("y.example"),
            &["mail.example"],
            TlsPolicy::Opportunistic,
        );
        assert!(
            !other.configured,
            "*.mail.example does not match mail.example"
        );
        let by_domain = SiteKey::new(
            &c,
            Some("Small.Example"),
            &["mx.elsewhere.example"],
            TlsPolicy::Opportunistic,
        );
        assert_eq!(by_domain.name, "small");
        assert_eq!(limits_for(&c, &by_domain).max_connections, 2);
        assert_eq!(limits_for(&c, &by_mx).max_connections, 20);
    }

    #[tokio::test(start_paused = true)]
    async fn permits_bound_the_connections_and_a_throttle_halves_them() {
        let site = site(limits(8, "off"));
        let mut permits = Vec::new();
        for _ in 0..8 {
            let mut permit = site.acquire(None).await.expect("permit");
            permit.connected();
            permits.push(permit);
        }
        let ninth = site.clone();
        let waiting = tokio::spawn(async move { ninth.acquire(None).await.map(|_| ()) });
        tokio::task::yield_now().await;
        assert!(site.contended());
        // Refused while 8 were open: the ceiling is 8, the limit halves to 4.
        assert!(site.connect_failed(&too_many_connections()).lowered);
        assert_eq!(site.limits_now().0, 4);
        // The permits come back; only when 4 or fewer are out does the waiter get one.
        for _ in 0..4 {
            permits.pop();
        }
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        permits.pop();
        assert!(waiting.await.expect("task").is_ok());
        assert!(!site.contended());
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_holder_hears_when_the_site_is_wanted() {
        let site = site(limits(1, "off"));
        let held = site.acquire(None).await.expect("permit");
        let idle = site.clone();
        let idling = tokio::spawn(async move { idle.wanted().await });
        tokio::task::yield_now().await;
        assert!(!idling.is_finished());
        let other = site.clone();
        let waiting = tokio::spawn(async move { other.acquire(None).await.map(|_| ()) });
        tokio::time::timeout(Duration::from_secs(1), idling)
            .await
            .expect("woken at once")
            .expect("task");
        drop(held);
        assert!(waiting.await.expect("task").is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn refusals_teach_a_ceiling_that_recovery_does_not_pass() {
        let site = site(limits(20, "off"));
        let mut permits = Vec::new();
        for _ in 0..2 {
            let mut permit = site.acquire(None).await.expect("permit");
            permit.connected();
            permits.push(permit);
        }
        // Many refused at once: one reaction.
        assert!(site.connect_failed(&too_many_connections()).lowered);
        assert!(!site.connect_failed(&too_many_connections()).lowered);
        assert_eq!(site.limits_now().0, 2);
        for _ in 0..10 {
            tokio::time::advance(Duration::from_secs(1)).await;
            site.observe(&delivered(), Instant::now());
        }
        assert_eq!(site.limits_now().0, 2, "recovery stops at the ceiling");
        // After throttle_memory the ceiling is forgotten and recovery goes on.
        tokio::time::advance(Duration::from_secs(15 * 60)).await;
        site.observe(&delivered(), Instant::now());
        assert_eq!(site.limits_now().0, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_closing_connection_is_not_counted_in_the_ceiling() {
        let site = site(limits(20, "off"));
        let mut permits = Vec::new();
        for _ in 0..3 {
            let mut permit = site.acquire(None).await.expect("permit");
            permit.connected();
            permits.push(permit);
        }
        // The third is saying QUIT (its permit still held) when a new one is refused: the
        // site took two.
        permits[2].closing();
        permits[2].closing();
        assert!(site.connect_failed(&too_many_connections()).lowered);
        let view = site.view(Instant::now(), SystemTime::UNIX_EPOCH);
        assert_eq!(view.connections_open, 2);
        assert_eq!(site.limits_now().0, 2, "halved from 20 to the ceiling of 2");
        drop(permits);
        let view = site.view(Instant::now(), SystemTime::UNIX_EPOCH);
        assert_eq!((view.connections_open, view.connections_held), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_rate_limit_learns_a_ceiling_halves_and_recovers_in_steps() {
        let site = site(limits(4, "off"));
        let _permit = site.acquire(None).await.expect("permit");
        for _ in 0..5 {
            site.rate_token(None).await;
            site.observe(&delivered(), Instant::now());
        }
        assert_eq!(site.limits_now().1, None);
        assert!(site.observe(&rate_limited(), Instant::now()).lowered);
        // Five went through in the last second: the ceiling is 4.75/s, half of it now.
        let (connections, rate) = site.limits_now();
        assert_eq!(connections, 2);
        assert!((rate.expect("rate") - 2.375).abs() < 1e-9, "{rate:?}");
        // Tokens are spaced by 1/rate.
        let began = Instant::now();
        site.rate_token(None).await;
        site.rate_token(None).await;
        let spacing = Instant::now() - began;
        assert!(
            (spacing.as_secs_f64() - 1.0 / 2.375).abs() < 0.01,
            "{spacing:?}"
        );
        // A quarter of the ceiling back per recovery interval with deliveries.
        tokio::time::advance(Duration::from_secs(1)).await;
        site.observe(&delivered(), Instant::now());
        assert!((site.limits_now().1.expect("rate") - 3.5625).abs() < 1e-9);
        assert_eq!(site.limits_now().0, 3);
        for _ in 0..5 {
            tokio::time::advance(Duration::from_secs(1)).await;
            site.observe(&delivered(), Instant::now());
        }
        assert_eq!(site.limits_now(), (4, Some(4.75)));
    }

    /// Messages still on their way when another is refused got in before it: they count
    /// in the rate the site took, or the ceiling would be learnt too low.
    #[tokio::test(start_paused = true)]
    async fn the_rate_learnt_counts_messages_still_on_their_way() {
        let site = site(limits(2, "off"));
        let mut sent = Vec::new();
        for _ in 0..5 {
            sent.push(site.rate_token(None).await);
            tokio::time::advance(Duration::from_millis(100)).await;
        }
        for t in &sent[..4] {
            site.observe(&delivered(), *t);
        }
        let refused = site.rate_token(None).await;
        tokio::time::advance(Duration::from_millis(50)).await;
        assert!(site.observe(&rate_limited(), refused).lowered);
        assert_eq!(site.limits_now().1, Some(4.0 * CEILING_MARGIN / 2.0));
        site.observe(&delivered(), sent[4]);
        assert_eq!(site.limits_now().1, Some(4.75 / 2.0), "taken after all");
        // One sent before the refused one but refused too does not count.
        let late = site.rate_token(None).await;
        site.observe(&rate_limited(), late);
        assert_eq!(site.limits_now().1, Some(4.75 / 2.0));
        // On another connection, a message sent just after the refused one was taken
        // too; its reply comes back after the refusal, and raises the ceiling.
        let site = super::tests::site(limits(2, "off"));
        for _ in 0..4 {
            let t = site.rate_token(None).await;
            site.observe(&delivered(), t);
            tokio::time::advance(Duration::from_millis(100)).await;
        }
        let refused = site.rate_token(None).await;
        tokio::time::advance(Duration::from_millis(1)).await;
        let racing = site.rate_token(None).await;
        site.observe(&rate_limited(), refused);
        assert_eq!(site.limits_now().1, Some(4.0 * CEILING_MARGIN / 2.0));
        site.observe(&delivered(), racing);
        assert_eq!(site.limits_now().1, Some(5.0 * CEILING_MARGIN / 2.0));
        // Messages sent more than a window before the refused one do not count.
        let site = super::tests::site(limits(2, "off"));
        let old = site.rate_token(None).await;
        site.observe(&delivered(), old);
        tokio::time::advance(Duration::from_millis(1500)).await;
        let refused = site.rate_token(None).await;
        site.observe(&rate_limited(), refused);
        assert_eq!(
            site.limits_now().1,
            Some(1.0),
            "nothing learnt: one a second"
        );
        for expected in [2.0, 4.0] {
            tokio::time::advance(Duration::from_secs(1)).await;
            site.observe(&delivered(), Instant::now());
            assert_eq!(site.limits_now().1, Some(expected));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_configured_rate_spaces_the_tokens() {
        let site = site(limits(4, "5/1s"));
        let began = Instant::now();
        for _ in 0..11 {
            site.rate_token(None).await;
        }
        assert_eq!(Instant::now() - began, Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_site_that_keeps_failing_is_suspended_with_backoff_and_defers() {
        let site = site(limits(4, "off"));
        // Strikes within one window count once.
        for _ in 0..10 {
            site.connect_failed(&refused());
        }
        for _ in 0..3 {
            tokio::time::advance(REACTION_WINDOW).await;
            assert_eq!(site.connect_failed(&refused()).suspended, None);
        }
        tokio::time::advance(REACTION_WINDOW).await;
        assert_eq!(
            site.connect_failed(&too_many_connections()).suspended,
            Some(Duration::from_secs(60))
        );
        let Err(Status::Deferred(diagnostic)) = site.acquire(None).await.map(|_| ()) else {
            panic!("a suspended site defers");
        };
        assert_eq!(diagnostic.enhanced, Some([4, 4, 5]));
        assert!(
            diagnostic.text.contains("mx.example (opportunistic)"),
            "{}",
            diagnostic.text
        );
        assert!(diagnostic.text.contains("60s"), "{}", diagnostic.text);
        tokio::time::advance(Duration::from_secs(60)).await;
        let permit = site.acquire(None).await.expect("the suspension is over");
        drop(permit);
        // Failing on: the next suspension is twice as long.
        let mut last = None;
        for _ in 0..5 {
            tokio::time::advance(REACTION_WINDOW).await;
            last = site.connect_failed(&refused()).suspended;
        }
        assert_eq!(last, Some(Duration::from_secs(120)));
        // A delivery forgives.
        tokio::time::advance(Duration::from_secs(120)).await;
        site.observe(&delivered(), Instant::now());
        for _ in 0..5 {
            tokio::time::advance(REACTION_WINDOW).await;
            last = site.connect_failed(&refused()).suspended;
        }
        assert_eq!(last, Some(Duration::from_secs(60)));
    }

    #[tokio::test(start_paused = true)]
    async fn deliveries_between_throttles_keep_the_site_open() {
        let site = site(limits(4, "off"));
        for _ in 0..20 {
            tokio::time::advance(REACTION_WINDOW).await;
            assert_eq!(
                site.observe(&rate_limited(), Instant::now()).suspended,
                None
            );
            site.observe(&delivered(), Instant::now());
        }
        assert!(site.acquire(None).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn the_map_keeps_one_site_per_key_and_follows_reloads() {
        let sites = Sites::default();
        let c = config("version: 1\n");
        let a = sites.get(&c, key("mx.example"));
        let b = sites.get(&c, key("mx.example"));
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(a.limits_now(), (20, None));
        let c = config(
            "version: 1\nqueue:\n  site_limits: {max_connections: 3, max_message_rate: 10/1s}\n",
        );
        let a = sites.get(&c, key("mx.example"));
        assert_eq!(a.limits_now(), (3, Some(10.0)));
        let c = config(
            "version: 1\nqueue:\n  site_limits: {max_connections: 4, max_message_rate: 20/1s}\n",
        );
        assert_eq!(
            sites.get(&c, key("mx.example")).limits_now(),
            (4, Some(20.0))
        );
        assert!(sites.suspended().is_empty());
    }

    /// The wall-clock time the snapshot tests pretend it is.
    fn wall() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    fn view<'a>(views: &'a [SiteView], name: &str) -> &'a SiteView {
        views
            .iter()
            .find(|v| v.site == name)
            .unwrap_or_else(|| panic!("no site {name} in {views:?}"))
    }

    #[tokio::test(start_paused = true)]
    async fn the_snapshot_shows_each_site_and_puts_suspended_and_throttled_first() {
        let sites = Sites::default();
        let c = config(
            "version: 1\nqueue:\n  site_limits: {max_connections: 8, suspend_after: 2, suspend_time: 60s}\n",
        );
        // Named so that by name alone the suspended site would come last.
        let healthy = sites.get(&c, key("aa.example"));
        let failing = sites.get(&c, key("bb.example"));
        let slowed = sites.get(&c, key("cc.example"));
        let suspended = sites.get(&c, key("zz.example"));

        let mut permits = Vec::new();
        for _ in 0..3 {
            let mut permit = suspended.acquire(None).await.expect("permit");
            permit.connected();
            permits.push(permit);
        }
        // A throttle with 3 open, then another a window later: two strikes suspend it.
        assert!(suspended.connect_failed(&too_many_connections()).lowered);
        tokio::time::advance(REACTION_WINDOW).await;
        assert_eq!(
            suspended.connect_failed(&too_many_connections()).suspended,
            Some(Duration::from_secs(60))
        );
        drop(permits.pop());
        for _ in 0..5 {
            let sent = slowed.rate_token(None).await;
            slowed.observe(&delivered(), sent);
        }
        slowed.observe(&rate_limited(), Instant::now());
        failing.connect_failed(&refused());
        healthy.observe(&delivered(), Instant::now());
        tokio::time::advance(Duration::from_secs(10)).await;

        let views = sites.snapshot_at(Instant::now(), wall());
        let order: Vec<&str> = views.iter().map(|v| v.site.as_str()).collect();
        assert_eq!(
            order,
            ["zz.example", "cc.example", "bb.example", "aa.example"]
        );

        let z = view(&views, "zz.example");
        assert_eq!(z.tls, "opportunistic");
        assert!(!z.configured);
        assert_eq!(z.suspended_for_secs, Some(50));
        let until = humantime::format_rfc3339_seconds(wall() + Duration::from_secs(50));
        assert_eq!(
            z.suspended_until.as_deref(),
            Some(until.to_string().as_str())
        );
        assert_eq!(z.suspended_until.as_deref(), Some("2027-01-15T08:00:50Z"));
        assert_eq!((z.suspensions, z.strikes, z.suspend_after), (1, 0, 2));
        assert!(z.throttled);
        assert_eq!(z.last_throttle_secs_ago, Some(10));
        // 8 → 3 (the ceiling: 3 were open when refused) → 1; 2 permits still out.
        assert_eq!((z.connection_limit, z.max_connections), (1, 8));
        assert_eq!(z.connection_ceiling, Some(3));
        assert_eq!((z.connections_open, z.connections_held), (2, 2));
        assert_eq!(
            z.last_reason.as_deref(),
            Some("421 4.7.0 too many connections")
        );
        assert_eq!(z.last_reason_secs_ago, Some(10));

        let c = view(&views, "cc.example");
        assert!(c.throttled && c.suspended_for_secs.is_none());
        assert_eq!(c.rate_ceiling, Some(5.0 * CEILING_MARGIN));
        assert_eq!(c.message_rate, Some(5.0 * CEILING_MARGIN / 2.0));
        assert_eq!(c.max_message_rate, None);
        assert_eq!(c.last_reason.as_deref(), Some("451 4.7.1 rate limited"));

        let b = view(&views, "bb.example");
        assert!(!b.throttled);
        assert_eq!((b.strikes, b.suspended_for_secs), (1, None));
        assert_eq!(
            b.last_reason.as_deref(),
            Some("451 4.4.1 connection refused by 127.0.0.2:25")
        );

        let a = view(&views, "aa.example");
        assert!(!a.throttled);
        assert_eq!(
            (a.strikes, a.connection_limit, a.message_rate),
            (0, 8, None)
        );
        assert_eq!(
            (a.last_reason.as_ref(), a.last_throttle_secs_ago),
            (None, None)
        );
        assert_eq!(
            (a.suspended_for_secs, a.suspended_until.as_ref()),
            (None, None)
        );

        // Once the suspension is over the site is only throttled (and sorted so).
        tokio::time::advance(Duration::from_secs(50)).await;
        let views = sites.snapshot_at(Instant::now(), wall());
        let z = view(&views, "zz.example");
        assert_eq!(
            (z.suspended_for_secs, z.suspended_until.as_ref()),
            (None, None)
        );
        assert!(z.throttled);
        assert_eq!(views[0].site, "cc.example", "ties by name: {views:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn looking_changes_no_site_and_forgets_none() {
        let sites = Sites::default();
        let c = config(
            "version: 1\nqueue:\n  site_limits: {max_connections: 4, suspend_after: 1, suspend_time: 60s}\n",
        );
        let site = sites.get(&c, key("mx.example"));
        site.connect_failed(&too_many_connections());
        // Idle, unthrottled sites, as many as the map holds before `get` prunes them.
        for i in 0..PRUNE_AT {
            drop(sites.get(&c, key(&format!("idle{i}.example"))));
        }
        let before = site.limits_now();
        let first = sites.snapshot_at(Instant::now(), wall());
        let second = sites.snapshot_at(Instant::now(), wall());
        assert_eq!(first, second);
        assert_eq!(first.len(), PRUNE_AT + 1, "the snapshot prunes nothing");
        assert_eq!(first[0].site, "mx.example");
        assert_eq!(first[0].suspended_for_secs, Some(60));
        assert_eq!(site.limits_now(), before);
        assert!(site.acquire(None).await.is_err(), "still suspended");
        // Whereas the next `get` does prune: the idle sites go, the suspended one stays.
        drop(sites.get(&c, key("new.example")));
        let after: Vec<String> = sites
            .snapshot_at(Instant::now(), wall())
            .into_iter()
            .map(|v| v.site)
            .collect();
        assert_eq!(after, ["mx.example", "new.example"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_reason_is_cut() {
        let sites = Sites::default();
        let site = sites.get(&config("version: 1\n"), key("mx.example"));
        let long = format!("too many connections {}", "é".repeat(300));
        site.connect_failed(&Status::Deferred(Diagnostic::new(421, [4, 7, 0], &long)));
        let views = sites.snapshot_at(Instant::now(), wall());
        let reason = views[0].last_reason.as_deref().expect("a reason");
        assert!(
            reason.starts_with("421 4.7.0 too many connections é"),
            "{reason}"
        );
        assert!(reason.ends_with('…'), "{reason}");
        assert!(
            reason.len() <= MAX_REASON + '…'.len_utf8(),
            "{}",
            reason.len()
        );
    }
}
