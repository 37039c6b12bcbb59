//! TLS-RPT (RFC 8460): what delivery by MX records about TLS for domains that ask for
//! reports, where those counts are kept, and the aggregate reports sent to them.
//! [`super`] (the SMTP client side of delivery) asks [`Reporter::rua`] whether a domain
//! publishes `_smtp._tls` and tells [`Reporter::record`] how each connection attempt went
//! under which policy, and what failed before any connection (DNSSEC lookups for DANE,
//! the MTA-STS policy fetch); [`start`] runs the task that keeps and sends the counts.
//!
//! * Periods are aligned on `smtp_client.tls_rpt.report_interval` (UTC days by default),
//!   so every pod of a fleet counts into the same periods.
//! * Counts are saved in `<spool>/tls-rpt.json` ([`FILE_NAME`], written atomically and
//!   durably) every [`SAVE_INTERVAL`] when they changed and at shutdown, and loaded at
//!   start: a restart loses at most the last [`SAVE_INTERVAL`] (a `kill -9`), none at a
//!   graceful stop.
//! * Without `smtpd.rate_limits.redis`, each pod reports its own counts when a period
//!   ends, under a report id naming the pod.
//! * With it, counts go to the fleet's Redis every [`TICK`] (`HINCRBY` into one hash per
//!   period and domain, a set of the period's domains, all expiring [`REDIS_KEEP`] after
//!   the period), and [`REDIS_GRACE`] after the period ends every pod that counted in it
//!   tries, per domain, a `SET NX PX` lock: the one that gets it sends the fleet's report
//!   (one report id for the fleet). Counts that cannot reach Redis before then (Redis
//!   unreachable) are reported by their pod alone, under its own report id, and logged.
//!   The pods' clocks must agree to within a few seconds (NTP), as the grace assumes.
//! * A report goes to each of the domain's `rua` URIs: POSTed over HTTPS (§5.4), or mailed
//!   (§5.3) as a new message into this MTA's own queue, which goes in through
//!   [`crate::cleanup::store_notice`] like every new message (cleanup is the only spool
//!   writer) and is DKIM-signed there with the `dkim` keys for the sender's domain
//!   (`smtp_client.tls_rpt.sender`, else `tls-reports@<hostname>`), as §5.3 asks. Without
//!   a key for that domain the report goes unsigned.
//!
//! Must never: count the delivery of a report (its sender is the reports' sender, and
//! [`super`] does not record it), put message content or recipients in a report, block
//! delivery on reporting or on Redis (records only touch memory; a failed report is
//! logged and dropped), or send the same counts twice (counts leave this pod's memory
//! when they are in Redis or in a report being sent).
//!
//! Not here: a report whose lock holder dies before sending it (it is lost, not sent
//! twice).

use crate::delivery::Outbound;
use crate::queue::{Envelope, Recipient};
use crate::shutdown::Shutdown;
use base64::Engine;
use bytes::Bytes;
use hickory_resolver::TokioResolver;
use http_body_util::{BodyExt, Full};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Time allowed for one HTTPS report upload.
const POST_TIMEOUT: Duration = Duration::from_secs(60);
/// Domains counted at most per report period; beyond that, new domains are not counted.
const MAX_DOMAINS: usize = 10_000;
/// The file in the spool directory that holds the counts across restarts.
pub const FILE_NAME: &str = "tls-rpt.json";
/// Version of [`FILE_NAME`]'s layout; a file of another version is ignored (logged).
const FILE_VERSION: u32 = 1;
/// How often the task wakes: counts go to Redis, ended periods are reported.
pub const TICK: Duration = Duration::from_secs(1);
/// Changed counts are saved at most this often (and at shutdown).
pub const SAVE_INTERVAL: Duration = Duration::from_secs(5);
/// With Redis, how long after a period ends its report waits: every pod sends its last
/// counts of the period within a [`TICK`] plus the Redis timeout.
pub const REDIS_GRACE: Duration = Duration::from_secs(5);
/// How long a period's counts and report locks stay in Redis after the period ends.
pub const REDIS_KEEP: Duration = Duration::from_secs(24 * 3600);
/// Prefix of the Redis keys (`petrel:tlsrpt:<period start>:<domain>`).
const REDIS_PREFIX: &str = "petrel:tlsrpt:";

/// RFC 8460 §4.3 result types this MTA reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ResultType {
    /// The MX host did not offer STARTTLS (or refused it) where TLS was required.
    #[serde(rename = "starttls-not-supported")]
    StartTlsNotSupported,
    /// The certificate does not name the MX host (MTA-STS, or no policy).
    #[serde(rename = "certificate-host-mismatch")]
    CertificateHostMismatch,
    /// The certificate is expired or not yet valid (MTA-STS, or no policy).
    #[serde(rename = "certificate-expired")]
    CertificateExpired,
    /// The certificate chains to no trusted root (MTA-STS, or no policy).
    #[serde(rename = "certificate-not-trusted")]
    CertificateNotTrusted,
    /// The certificate does not match what the policy asks (DANE's TLSA records), or TLS
    /// failed for another reason.
    #[serde(rename = "validation-failure")]
    ValidationFailure,
    /// §4.3.2.1: the host's TLSA records are all unusable, so none could be checked.
    #[serde(rename = "tlsa-invalid")]
    TlsaInvalid,
    /// §4.3.2.1: a DNSSEC lookup for DANE (MX, addresses, TLSA) gave no valid answer.
    #[serde(rename = "dnssec-invalid")]
    DnssecInvalid,
    /// §4.3.2.1: DANE is required for the destination (a route's `dane: required`, RFC
    /// 7672 §6), but the MX host had no DNSSEC-validated TLSA records; no connection
    /// was made to it.
    #[serde(rename = "dane-required")]
    DaneRequired,
    /// §4.3.2.2: the domain's MTA-STS policy could not be fetched.
    #[serde(rename = "sts-policy-fetch-error")]
    StsPolicyFetchError,
    /// §4.3.2.2: the fetched MTA-STS policy is not valid.
    #[serde(rename = "sts-policy-invalid")]
    StsPolicyInvalid,
    /// §4.3.2.2: the policy host's certificate failed PKIX validation.
    #[serde(rename = "sts-webpki-invalid")]
    StsWebpkiInvalid,
}

impl ResultType {
    pub fn as_str(self) -> &'static str {
        match self {
            ResultType::StartTlsNotSupported => "starttls-not-supported",
            ResultType::CertificateHostMismatch => "certificate-host-mismatch",
            ResultType::CertificateExpired => "certificate-expired",
            ResultType::CertificateNotTrusted => "certificate-not-trusted",
            ResultType::ValidationFailure => "validation-failure",
            ResultType::TlsaInvalid => "tlsa-invalid",
            ResultType::DnssecInvalid => "dnssec-invalid",
            ResultType::DaneRequired => "dane-required",
            ResultType::StsPolicyFetchError => "sts-policy-fetch-error",
            ResultType::StsPolicyInvalid => "sts-policy-invalid",
            ResultType::StsWebpkiInvalid => "sts-webpki-invalid",
        }
    }

    /// The result type of a failed TLS handshake, by the policy the host was under.
    /// Under DANE the TLSA records are the only judge (RFC 7672 §3.1): any refusal is a
    /// `validation-failure` (§4.3.1). Otherwise (MTA-STS's PKIX check, or no policy)
    /// the certificate's own fault is named.
    pub fn of_tls_failure(cause: mta_client::TlsFailure, under_dane: UnderDane) -> ResultType {
        use mta_client::TlsFailure as F;
        match (under_dane, cause) {
            (UnderDane::Yes, _) => ResultType::ValidationFailure,
            (UnderDane::No, F::HostMismatch) => ResultType::CertificateHostMismatch,
            (UnderDane::No, F::Expired) => ResultType::CertificateExpired,
            (UnderDane::No, F::NotTrusted) => ResultType::CertificateNotTrusted,
            (UnderDane::No, F::PolicyMismatch | F::Handshake | F::Setup) => {
                ResultType::ValidationFailure
            }
        }
    }

    /// The result type of an MTA-STS policy that could not be had (§4.3.2.2).
    pub fn of_sts_failure(failure: crate::delivery::mta_sts::StsFailure) -> ResultType {
        use crate::delivery::mta_sts::StsFailure as F;
        match failure {
            F::FetchError => ResultType::StsPolicyFetchError,
            F::Invalid => ResultType::StsPolicyInvalid,
            F::WebPkiInvalid => ResultType::StsWebpkiInvalid,
        }
    }
}

/// Whether a host's TLS was judged by DANE's TLSA records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnderDane {
    Yes,
    No,
}

/// RFC 8460 §4.4 `policy-type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyType {
    Tlsa,
    Sts,
    NoPolicyFound,
}

impl PolicyType {
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyType::Tlsa => "tlsa",
            PolicyType::Sts => "sts",
            PolicyType::NoPolicyFound => "no-policy-found",
        }
    }
}

/// The policy an attempt ran under (RFC 8460 §4.4 `policy`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PolicyKey {
    pub kind: PolicyType,
    /// `policy-string`: the TLSA records in presentation form, or the MTA-STS policy lines.
    pub strings: Vec<String>,
    /// `mx-host`: the MX host (DANE) or the policy's MX patterns (MTA-STS).
    pub mx_hosts: Vec<String>,
}

impl PolicyKey {
    pub fn none() -> Self {
        Self {
            kind: PolicyType::NoPolicyFound,
            strings: Vec::new(),
            mx_hosts: Vec::new(),
        }
    }
}

/// One failed session (RFC 8460 §4.4 `failure-details`): the MX host and address are
/// absent for failures before any connection (a bogus MX set, an MTA-STS policy fetch).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Failure {
    pub result: ResultType,
    pub mx_host: Option<String>,
    pub receiving_ip: Option<IpAddr>,
}

/// One connection attempt's (or pre-connection step's) outcome.
#[derive(Debug, Clone)]
pub enum Outcome {
    Success,
    Failure(Failure),
}

/// What one count is of: a policy, and success (`failure: None`) or one kind of failure.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
struct CountKey {
    policy: PolicyKey,
    failure: Option<Failure>,
}

/// One domain's counts in one period.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
struct DomainCounts {
    rua: Vec<String>,
    #[serde(with = "pairs")]
    counts: HashMap<CountKey, u64>,
}

impl DomainCounts {
    fn add(&mut self, other: DomainCounts) {
        if !other.rua.is_empty() {
            self.rua = other.rua;
        }
        for (key, n) in other.counts {
            *self.counts.entry(key).or_default() += n;
        }
    }
}

/// A map with structured keys as a JSON list of `[key, value]` pairs.
mod pairs {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use std::collections::HashMap;
    use std::hash::Hash;

    pub fn serialize<K: Serialize, V: Serialize, S: Serializer>(
        map: &HashMap<K, V>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(map.iter())
    }

    pub fn deserialize<'de, K, V, D>(deserializer: D) -> Result<HashMap<K, V>, D::Error>
    where
        K: Deserialize<'de> + Eq + Hash,
        V: Deserialize<'de>,
        D: Deserializer<'de>,
    {
        Ok(Vec::<(K, V)>::deserialize(deserializer)?
            .into_iter()
            .collect())
    }
}

/// One period's counts, per domain.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
struct PeriodCounts {
    /// Seconds since the epoch (the start is the key in [`Saved::periods`]).
    end: u64,
    domains: HashMap<String, DomainCounts>,
}

/// What [`FILE_NAME`] holds.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
struct Saved {
    version: u32,
    /// Counts this pod has not yet handed on (to Redis or in a report), by period start.
    periods: BTreeMap<u64, PeriodCounts>,
    /// Periods (start: end) this pod has counts of in Redis, whose reports it has not yet
    /// tried to send.
    in_redis: BTreeMap<u64, u64>,
}

impl Saved {
    fn merge(&mut self, other: Saved) {
        for (start, period) in other.periods {
            let mine = self.periods.entry(start).or_default();
            mine.end = period.end;
            for (domain, counts) in period.domains {
                mine.domains.entry(domain).or_default().add(counts);
            }
        }
        self.in_redis.extend(other.in_redis);
    }
}

#[derive(Default)]
struct State {
    saved: Saved,
    /// Changed since last saved.
    dirty: bool,
}

/// The counts not yet reported, and their file.
#[derive(Default)]
pub struct Reporter {
    state: Mutex<State>,
}

impl Reporter {
    /// The `rua` URIs of `domain`'s `_smtp._tls` record, or `None` when it publishes none
    /// that is valid (RFC 8460 §3). DNS failures also mean none.
    pub async fn rua(&self, resolver: &TokioResolver, domain: &str) -> Option<Vec<String>> {
        let name = format!("_smtp._tls.{}.", domain.trim_end_matches('.'));
        let lookup = resolver.txt_lookup(name.as_str()).await.ok()?;
        let records = crate::delivery::route::txt_strings(lookup.answers());
        parse_txt(&records)
    }

    /// Counts one attempt to `domain` (which asked for reports at `rua`) under `policy`,
    /// in the period of now.
    pub fn record(
        &self,
        ctx: &Arc<Outbound>,
        domain: &str,
        rua: &[String],
        policy: PolicyKey,
        outcome: Outcome,
    ) {
        let interval = ctx.config().smtp_client.tls_rpt.report_interval;
        self.record_at(unix_now(), interval, domain, rua, policy, outcome);
    }

    fn record_at(
        &self,
        now: u64,
        interval: Duration,
        domain: &str,
        rua: &[String],
        policy: PolicyKey,
        outcome: Outcome,
    ) {
        let (start, end) = period_of(now, interval);
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        let mut state = self.lock();
        let period = state.saved.periods.entry(start).or_default();
        period.end = end;
        if period.domains.len() >= MAX_DOMAINS && !period.domains.contains_key(&domain) {
            return;
        }
        let entry = period.domains.entry(domain).or_default();
        entry.rua = rua.to_vec();
        let failure = match outcome {
            Outcome::Success => None,
            Outcome::Failure(failure) => Some(failure),
        };
        *entry
            .counts
            .entry(CountKey { policy, failure })
            .or_default() += 1;
        state.dirty = true;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes the periods (start, counts) that `ready` says are ready.
    fn take_periods(&self, ready: impl Fn(&PeriodCounts) -> bool) -> Vec<(u64, PeriodCounts)> {
        let mut state = self.lock();
        let starts: Vec<u64> = state
            .saved
            .periods
            .iter()
            .filter(|(_, p)| ready(p))
            .map(|(s, _)| *s)
            .collect();
        let taken: Vec<(u64, PeriodCounts)> = starts
            .into_iter()
            .filter_map(|s| state.saved.periods.remove(&s).map(|p| (s, p)))
            .collect();
        if !taken.is_empty() {
            state.dirty = true;
        }
        taken
    }

    /// Puts back counts that could not be handed on.
    fn put_back(&self, periods: Vec<(u64, PeriodCounts)>) {
        let mut state = self.lock();
        state.saved.merge(Saved {
            periods: periods.into_iter().collect(),
            ..Saved::default()
        });
        state.dirty = true;
    }

    /// Writes the counts to `path` when they changed since last written.
    async fn save(&self, path: &Path) {
        let bytes = {
            let mut state = self.lock();
            if !state.dirty {
                return;
            }
            state.dirty = false;
            state.saved.version = FILE_VERSION;
            serde_json::to_vec(&state.saved)
        };
        let written = match bytes {
            Ok(bytes) => {
                let path = path.to_owned();
                tokio::task::spawn_blocking(move || crate::files::replace_durably(&path, &bytes))
                    .await
                    .unwrap_or_else(|e| Err(std::io::Error::other(e)))
            }
            Err(e) => Err(std::io::Error::other(e)),
        };
        if let Err(e) = written {
            self.lock().dirty = true;
            tracing::warn!(path = %path.display(), error = %e, "TLS-RPT: counts not saved");
        }
    }

    /// Adds the counts saved in `path` (a missing file is none).
    fn load(&self, path: &Path) {
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "TLS-RPT: saved counts unreadable, starting without them");
                return;
            }
        };
        match serde_json::from_slice::<Saved>(&bytes) {
            Ok(saved) if saved.version == FILE_VERSION => {
                let periods = saved.periods.len() + saved.in_redis.len();
                self.lock().saved.merge(saved);
                tracing::info!(path = %path.display(), periods, "TLS-RPT: saved counts loaded");
            }
            Ok(saved) => {
                tracing::warn!(path = %path.display(), version = saved.version, "TLS-RPT: saved counts of an unknown version ignored")
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "TLS-RPT: saved counts unreadable, starting without them")
            }
        }
    }
}

/// The period (start, end) that `now` is in: `interval`s from the epoch.
fn period_of(now: u64, interval: Duration) -> (u64, u64) {
    let length = interval.as_secs().max(1);
    let start = now - now % length;
    (start, start + length)
}

/// One domain's report for one period.
#[derive(Debug)]
pub struct Report {
    pub domain: String,
    pub rua: Vec<String>,
    pub id: String,
    pub start: u64,
    pub end: u64,
    pub json: Value,
}

/// The `rua` URIs of the one valid `v=TLSRPTv1` record among `records` (§3): `mailto:`
/// and `https:` URIs, comma-separated. Anything else means no reports.
pub fn parse_txt<S: AsRef<str>>(records: &[S]) -> Option<Vec<String>> {
    let rpt: Vec<&str> = records
        .iter()
        .map(AsRef::as_ref)
        .filter(|r| r.split(';').next().map(str::trim) == Some("v=TLSRPTv1"))
        .collect();
    let [record] = rpt.as_slice() else {
        return None;
    };
    let rua = record.split(';').skip(1).find_map(|field| {
        let (key, value) = field.trim().split_once('=')?;
        (key.trim() == "rua").then(|| value.trim().to_owned())
    })?;
    let uris: Vec<String> = rua
        .split(',')
        .map(|u| u.trim().to_owned())
        .filter(|u| u.starts_with("mailto:") || u.starts_with("https://"))
        .collect();
    (!uris.is_empty()).then_some(uris)
}

/// Who sends the reports: organization, contact, and the name report ids end with.
struct Submitter {
    organization: String,
    contact: String,
    /// The host name: the fleet's reports.
    fleet: String,
    /// The pod and the host name: one pod's reports.
    pod: String,
}

impl Submitter {
    fn of(config: &mta_config::MtaConfig) -> Self {
        Submitter {
            organization: config
                .smtp_client
                .tls_rpt
                .organization
                .clone()
                .unwrap_or(config.hostname.clone()),
            contact: report_sender(config),
            fleet: config.hostname.clone(),
            pod: format!("{}.{}", pod_name(), config.hostname),
        }
    }

    fn report(
        &self,
        id_host: &str,
        start: u64,
        end: u64,
        domain: String,
        counts: DomainCounts,
    ) -> Report {
        let id = format!("{start}-{domain}@{id_host}");
        let json = report_json(
            &self.organization,
            &self.contact,
            &id,
            start,
            end,
            &domain,
            &counts,
        );
        Report {
            domain,
            rua: counts.rua,
            id,
            start,
            end,
            json,
        }
    }
}

/// This pod's name among the fleet's: `POD_NAME` (set by the operator), else the host
/// name and the process id (several MTAs on one machine).
fn pod_name() -> String {
    match std::env::var("POD_NAME") {
        Ok(pod) if !pod.is_empty() => pod,
        _ => format!(
            "{}-{}",
            std::env::var("HOSTNAME").unwrap_or_else(|_| "petrel-mta".into()),
            std::process::id()
        ),
    }
}

/// The RFC 8460 §4.4 JSON report of one domain.
fn report_json(
    organization: &str,
    contact: &str,
    id: &str,
    start: u64,
    end: u64,
    domain: &str,
    counts: &DomainCounts,
) -> Value {
    type Tally<'a> = (u64, Vec<(&'a Failure, u64)>);
    let mut by_policy: HashMap<&PolicyKey, Tally<'_>> = HashMap::new();
    for (key, &n) in &counts.counts {
        let tally = by_policy.entry(&key.policy).or_default();
        match &key.failure {
            None => tally.0 += n,
            Some(failure) => tally.1.push((failure, n)),
        }
    }
    let mut policies: Vec<(&PolicyKey, Tally<'_>)> = by_policy.into_iter().collect();
    policies.sort_by(|a, b| {
        (a.0.kind, &a.0.mx_hosts, &a.0.strings).cmp(&(b.0.kind, &b.0.mx_hosts, &b.0.strings))
    });
    let policies: Vec<Value> = policies
        .into_iter()
        .map(|(policy, (success, mut details))| {
            details.sort_by(|a, b| {
                (a.0.result.as_str(), &a.0.mx_host, a.0.receiving_ip).cmp(&(
                    b.0.result.as_str(),
                    &b.0.mx_host,
                    b.0.receiving_ip,
                ))
            });
            let mut policy_json = json!({
                "policy-type": policy.kind.as_str(),
                "policy-domain": domain,
            });
            if !policy.strings.is_empty() {
                policy_json["policy-string"] = json!(policy.strings);
            }
            if !policy.mx_hosts.is_empty() {
                policy_json["mx-host"] = json!(policy.mx_hosts);
            }
            let mut entry = json!({
                "policy": policy_json,
                "summary": {
                    "total-successful-session-count": success,
                    "total-failure-session-count": details.iter().map(|d| d.1).sum::<u64>(),
                },
            });
            if !details.is_empty() {
                entry["failure-details"] = details
                    .into_iter()
                    .map(|(failure, n)| {
                        let mut detail = json!({
                            "result-type": failure.result.as_str(),
                            "failed-session-count": n,
                        });
                        if let Some(host) = &failure.mx_host {
                            detail["receiving-mx-hostname"] = json!(host);
                        }
                        if let Some(ip) = failure.receiving_ip {
                            detail["receiving-ip"] = json!(ip.to_string());
                        }
                        detail
                    })
                    .collect();
            }
            entry
        })
        .collect();
    json!({
        "organization-name": organization,
        "date-range": {
            "start-datetime": rfc3339(start),
            "end-datetime": rfc3339(end),
        },
        "contact-info": contact,
        "report-id": id,
        "policies": policies,
    })
}

fn rfc3339(unix_secs: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(unix_secs)).to_string()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    // Writing into a Vec cannot fail.
    let _ = encoder.write_all(data);
    encoder.finish().unwrap_or_default()
}

/// Loads the saved counts from the spool directory and starts the reporter task, which
/// saves them at `shutdown`.
pub fn start(ctx: Arc<Outbound>, shutdown: Shutdown) {
    let path = ctx.config().spool.path.join(FILE_NAME);
    ctx.tls_rpt.load(&path);
    tokio::spawn(run(ctx, path, shutdown));
}

/// The reporter task: every [`TICK`], counts to Redis (when configured) and reports of
/// ended periods; saves every [`SAVE_INTERVAL`] and at shutdown.
async fn run(ctx: Arc<Outbound>, path: PathBuf, mut shutdown: Shutdown) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_save = tokio::time::Instant::now();
    let mut current = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.recv() => {
                ctx.tls_rpt.save(&path).await;
                return;
            }
        }
        let config = ctx.config();
        let now = unix_now();
        let (start, _) = period_of(now, config.smtp_client.tls_rpt.report_interval);
        if current.is_some_and(|c| c != start) {
            tracing::info!(period_start = start, "TLS-RPT period closed");
        }
        current = Some(start);
        let redis = ctx.limiter.has_redis();
        if redis {
            to_redis(&ctx, now).await;
        }
        report_alone(&ctx, &config, &path, now, redis).await;
        if redis {
            report_from_redis(&ctx, &config, now).await;
        }
        if last_save.elapsed() >= SAVE_INTERVAL {
            ctx.tls_rpt.save(&path).await;
            last_save = tokio::time::Instant::now();
        }
    }
}

fn counts_key(start: u64, domain: &str) -> String {
    format!("{REDIS_PREFIX}{start}:{domain}")
}

fn domains_key(start: u64) -> String {
    format!("{REDIS_PREFIX}{start}:domains")
}

fn lock_key(start: u64, domain: &str) -> String {
    format!("{REDIS_PREFIX}{start}:{domain}:lock")
}

/// The Redis hash field of `rua`; the others are [`CountKey`]s in JSON.
const RUA_FIELD: &str = "rua";

/// Hands this pod's counts of periods not yet reported to Redis, in one transaction;
/// on failure they stay here (and are reported by this pod if Redis is still
/// unreachable when their period's report is due).
async fn to_redis(ctx: &Arc<Outbound>, now: u64) {
    let periods = ctx
        .tls_rpt
        .take_periods(|p| p.end + REDIS_GRACE.as_secs() > now);
    if periods.is_empty() {
        return;
    }
    let mut pipe = redis::pipe();
    pipe.atomic();
    for (start, period) in &periods {
        let ttl = period.end.saturating_sub(now) + REDIS_KEEP.as_secs();
        for (domain, counts) in &period.domains {
            let key = counts_key(*start, domain);
            let rua = serde_json::to_string(&counts.rua).unwrap_or_default();
            pipe.cmd("HSET").arg(&key).arg(RUA_FIELD).arg(rua).ignore();
            for (count, n) in &counts.counts {
                let field = serde_json::to_string(count).unwrap_or_default();
                pipe.cmd("HINCRBY").arg(&key).arg(field).arg(*n).ignore();
            }
            pipe.cmd("EXPIRE").arg(&key).arg(ttl).ignore();
            pipe.cmd("SADD")
                .arg(domains_key(*start))
                .arg(domain)
                .ignore();
        }
        pipe.cmd("EXPIRE")
            .arg(domains_key(*start))
            .arg(ttl)
            .ignore();
    }
    match ctx.limiter.query::<()>(&pipe).await {
        Some(()) => {
            let mut state = ctx.tls_rpt.lock();
            for (start, period) in &periods {
                state.saved.in_redis.insert(*start, period.end);
            }
            state.dirty = true;
        }
        None => ctx.tls_rpt.put_back(periods),
    }
}

/// Reports this pod's own counts of ended periods: all of them without Redis; with it,
/// those that could not reach Redis before their report was due.
async fn report_alone(
    ctx: &Arc<Outbound>,
    config: &mta_config::MtaConfig,
    path: &Path,
    now: u64,
    redis: bool,
) {
    let grace = if redis { REDIS_GRACE.as_secs() } else { 0 };
    let periods = ctx.tls_rpt.take_periods(|p| p.end + grace <= now);
    if periods.is_empty() {
        return;
    }
    // Saved before sending: a crash while sending loses these reports rather than
    // sending them twice.
    ctx.tls_rpt.save(path).await;
    let submitter = Submitter::of(config);
    for (start, period) in periods {
        if redis {
            tracing::warn!(
                period_start = start,
                domains = period.domains.len(),
                "TLS-RPT: Redis unreachable, this pod reports its own counts of the period under its own report id"
            );
        }
        for (domain, counts) in period.domains {
            let report = submitter.report(&submitter.pod, start, period.end, domain, counts);
            send(ctx, config, &submitter, &report).await;
        }
    }
}

/// Sends the fleet's reports of ended periods this pod has counts of in Redis: for each
/// domain of the period, the pod that gets the lock sends it. A period stays pending
/// while Redis cannot answer, until its keys expire.
async fn report_from_redis(ctx: &Arc<Outbound>, config: &mta_config::MtaConfig, now: u64) {
    let due: Vec<(u64, u64)> = {
        let state = ctx.tls_rpt.lock();
        state
            .saved
            .in_redis
            .iter()
            .filter(|(_, end)| **end + REDIS_GRACE.as_secs() <= now)
            .map(|(s, e)| (*s, *e))
            .collect()
    };
    let submitter = Submitter::of(config);
    for (start, end) in due {
        let done = fleet_reports(ctx, config, &submitter, start, end).await;
        if done.is_none() && end + REDIS_KEEP.as_secs() > now {
            continue;
        }
        if done.is_none() {
            tracing::warn!(
                period_start = start,
                "TLS-RPT: Redis unreachable until the period's counts expired; its report is lost"
            );
        }
        let mut state = ctx.tls_rpt.lock();
        state.saved.in_redis.remove(&start);
        state.dirty = true;
    }
}

/// The fleet's reports of one period (see [`report_from_redis`]); `None` when Redis did
/// not answer.
async fn fleet_reports(
    ctx: &Arc<Outbound>,
    config: &mta_config::MtaConfig,
    submitter: &Submitter,
    start: u64,
    end: u64,
) -> Option<()> {
    let mut members = redis::pipe();
    members.cmd("SMEMBERS").arg(domains_key(start));
    let (domains,): (Vec<String>,) = ctx.limiter.query(&members).await?;
    let lock_ms = (end + REDIS_KEEP.as_secs()).saturating_sub(unix_now()) * 1000;
    for domain in domains {
        let mut lock = redis::pipe();
        lock.cmd("SET")
            .arg(lock_key(start, &domain))
            .arg(&submitter.pod)
            .arg("NX")
            .arg("PX")
            .arg(lock_ms.max(1000));
        let (won,): (Option<String>,) = ctx.limiter.query(&lock).await?;
        if won.is_none() {
            tracing::debug!(
                domain,
                period_start = start,
                "TLS-RPT: another pod sends this report"
            );
            continue;
        }
        let mut read = redis::pipe();
        read.cmd("HGETALL").arg(counts_key(start, &domain));
        let (fields,): (HashMap<String, String>,) = ctx.limiter.query(&read).await?;
        let counts = counts_from_fields(&fields);
        let report = submitter.report(&submitter.fleet, start, end, domain, counts);
        send(ctx, config, submitter, &report).await;
    }
    Some(())
}

/// A domain's counts from its Redis hash; fields this version cannot read are skipped.
fn counts_from_fields(fields: &HashMap<String, String>) -> DomainCounts {
    let mut counts = DomainCounts::default();
    for (field, value) in fields {
        if field == RUA_FIELD {
            counts.rua = serde_json::from_str(value).unwrap_or_default();
        } else if let (Ok(key), Ok(n)) = (
            serde_json::from_str::<CountKey>(field),
            value.parse::<u64>(),
        ) {
            *counts.counts.entry(key).or_default() += n;
        }
    }
    counts
}

/// Sends one report to each of its `rua` URIs; failures are logged.
async fn send(
    ctx: &Arc<Outbound>,
    config: &mta_config::MtaConfig,
    submitter: &Submitter,
    report: &Report,
) {
    let body = gzip(report.json.to_string().as_bytes());
    for uri in &report.rua {
        let result = if let Some(to) = uri.strip_prefix("mailto:") {
            mail(
                ctx,
                config,
                &submitter.organization,
                &submitter.contact,
                to,
                report,
                &body,
            )
            .await
        } else {
            post(ctx, config, uri, &body).await
        };
        match result {
            Ok(()) => {
                tracing::info!(domain = %report.domain, report_id = %report.id, rua = %uri, "TLS-RPT report sent")
            }
            Err(e) => {
                tracing::warn!(domain = %report.domain, report_id = %report.id, rua = %uri, error = %e, "TLS-RPT report not sent")
            }
        }
    }
}

/// `smtp_client.tls_rpt.sender`, else `tls-reports@<hostname>`.
pub fn report_sender(config: &mta_config::MtaConfig) -> String {
    config
        .smtp_client
        .tls_rpt
        .sender
        .clone()
        .unwrap_or_else(|| format!("tls-reports@{}", config.hostname))
}

/// §5.3: a `multipart/report; report-type="tlsrpt"` message into our own queue, through
/// [`crate::cleanup::store_notice`], which DKIM-signs it (§5.3 wants it signed) with the
/// keys for the sender's domain.
async fn mail(
    ctx: &Arc<Outbound>,
    config: &mta_config::MtaConfig,
    organization: &str,
    sender: &str,
    to: &str,
    report: &Report,
    gzipped: &[u8],
) -> Result<(), String> {
    let to = to.split('?').next().unwrap_or(to);
    if !to.contains('@') || to.contains(['\r', '\n', '<', '>']) {
        return Err(format!("{to:?} is not an address"));
    }
    let now = unix_now();
    let id = ctx.spool.next_id();
    let host = &config.hostname;
    let boundary = format!("tlsrpt-{id}");
    let filename = format!(
        "{organization}!{}!{}!{}!{id}.json.gz",
        report.domain, report.start, report.end
    );
    let encoded = base64::engine::general_purpose::STANDARD.encode(gzipped);
    let mut lines = String::new();
    for chunk in encoded.as_bytes().chunks(76) {
        lines.push_str(&String::from_utf8_lossy(chunk));
        lines.push_str("\r\n");
    }
    let content = format!(
        "From: <{sender}>\r\n\
         To: <{to}>\r\n\
         Subject: Report Domain: {domain} Submitter: {organization} Report-ID: <{rid}>\r\n\
         Date: {date}\r\n\
         Message-ID: <{id}@{host}>\r\n\
         TLS-Report-Domain: {domain}\r\n\
         TLS-Report-Submitter: {organization}\r\n\
         TLS-Required: No\r\n\
         Auto-Submitted: auto-generated\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: multipart/report; report-type=\"tlsrpt\";\r\n\
         \tboundary=\"{boundary}\"\r\n\
         \r\n\
         --{boundary}\r\n\
         Content-Type: text/plain; charset=us-ascii\r\n\
         \r\n\
         This is an aggregate TLS report (RFC 8460) from {organization} for {domain}.\r\n\
         \r\n\
         --{boundary}\r\n\
         Content-Type: application/tlsrpt+gzip\r\n\
         Content-Transfer-Encoding: base64\r\n\
         Content-Disposition: attachment; filename=\"{filename}\"\r\n\
         \r\n\
         {lines}\
         --{boundary}--\r\n",
        domain = report.domain,
        rid = report.id,
        date = crate::dates::rfc5322_date(now),
    );
    let mut recipient = Recipient::new(to.to_owned());
    // A report about a report, or a notice about one, is never wanted.
    recipient.notify = Some(crate::queue::DsnNotify::default());
    let envelope = Envelope {
        recipients: vec![recipient],
        received_at: now,
        ..Envelope::new(sender, IpAddr::from([127, 0, 0, 1]), host)
    };
    crate::cleanup::store_notice(ctx, config, id, envelope, content.as_bytes())
        .await
        .map_err(|e| format!("cannot queue the report: {e}"))
}

/// §5.4: `POST` of the gzipped report, `Content-Type: application/tlsrpt+gzip`; any 2xx
/// counts as received. The certificate is verified as for MTA-STS (Mozilla roots plus
/// `smtp_client.ca_file`).
async fn post(
    ctx: &Arc<Outbound>,
    config: &mta_config::MtaConfig,
    uri: &str,
    gzipped: &[u8],
) -> Result<(), String> {
    let parsed: http::Uri = uri.parse().map_err(|e| format!("bad URI: {e}"))?;
    let host = parsed.host().ok_or("URI without a host")?.to_owned();
    let port = parsed.port_u16().unwrap_or(443);
    let path = parsed
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".into());
    let resolver = ctx.resolver().map_err(|s| format!("{s:?}"))?;
    let addresses: Vec<SocketAddr> = resolver
        .lookup_ip(format!("{host}."))
        .await
        .map_err(|e| format!("address lookup for {host}: {e}"))?
        .iter()
        .map(|ip| SocketAddr::new(ip, port))
        .collect();
    let roots = match &config.smtp_client.ca_file {
        Some(path) => Some(
            tokio::fs::read(path)
                .await
                .map_err(|e| format!("cannot read smtp_client.ca_file {}: {e}", path.display()))?,
        ),
        None => None,
    };
    let body = Bytes::copy_from_slice(gzipped);
    tokio::time::timeout(
        POST_TIMEOUT,
        post_to(&host, &addresses, &path, roots.as_deref(), body),
    )
    .await
    .map_err(|_| format!("no answer within {POST_TIMEOUT:?}"))?
}

async fn post_to(
    host: &str,
    addresses: &[SocketAddr],
    path: &str,
    extra_roots_pem: Option<&[u8]>,
    body: Bytes,
) -> Result<(), String> {
    let (mut sender, _driver) = crate::delivery::https::connect(host, addresses, extra_roots_pem)
        .await
        .map_err(|e| match e {
            crate::delivery::https::ConnectError::Tls { detail, .. }
            | crate::delivery::https::ConnectError::Other(detail) => detail,
        })?;
    let request = http::Request::post(path)
        .header(http::header::HOST, host)
        .header(http::header::USER_AGENT, "petrel-mta")
        .header(http::header::CONTENT_TYPE, "application/tlsrpt+gzip")
        .body(Full::new(body))
        .map_err(|e| format!("request: {e}"))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("HTTP with {host}: {e}"))?;
    let status = response.status();
    let _ = response.into_body().collect().await;
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("https://{host}{path} answered {status}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn txt_record_gives_the_report_uris() {
        assert_eq!(
            parse_txt(&["v=TLSRPTv1; rua=mailto:r@a.test,https://r.a.test/x"]),
            Some(vec![
                "mailto:r@a.test".to_owned(),
                "https://r.a.test/x".to_owned()
            ])
        );
        assert_eq!(parse_txt(&["v=spf1 -all"]), None);
        assert_eq!(parse_txt(&["v=TLSRPTv1; rua=ftp://x"]), None);
        assert_eq!(
            parse_txt(&["v=TLSRPTv1; rua=mailto:a@b", "v=TLSRPTv1; rua=mailto:c@d"]),
            None,
            "two records: none"
        );
    }

    fn tlsa() -> PolicyKey {
        PolicyKey {
            kind: PolicyType::Tlsa,
            strings: vec!["3 1 1 00".into()],
            mx_hosts: vec!["mx.a.test".into()],
        }
    }

    fn failure(result: ResultType) -> Outcome {
        Outcome::Failure(Failure {
            result,
            mx_host: Some("mx.a.test".into()),
            receiving_ip: Some(IpAddr::from([192, 0, 2, 1])),
        })
    }

    const DAY: Duration = Duration::from_secs(86400);

    fn counts_of(reporter: &Reporter, start: u64, domain: &str) -> DomainCounts {
        reporter.lock().saved.periods[&start].domains[domain].clone()
    }

    #[test]
    fn report_counts_sessions_per_policy_with_failure_details() {
        let reporter = Reporter::default();
        let rua = ["mailto:r@a.test".to_owned()];
        for _ in 0..3 {
            reporter.record_at(10, DAY, "a.test", &rua, tlsa(), Outcome::Success);
        }
        for _ in 0..2 {
            let bad = failure(ResultType::ValidationFailure);
            reporter.record_at(20, DAY, "A.test.", &rua, tlsa(), bad);
        }
        reporter.record_at(30, DAY, "a.test", &rua, PolicyKey::none(), Outcome::Success);
        let sts = PolicyKey {
            kind: PolicyType::Sts,
            strings: Vec::new(),
            mx_hosts: Vec::new(),
        };
        let fetch = Outcome::Failure(Failure {
            result: ResultType::StsPolicyFetchError,
            mx_host: None,
            receiving_ip: None,
        });
        reporter.record_at(40, DAY, "a.test", &rua, sts, fetch);
        let counts = counts_of(&reporter, 0, "a.test");
        let json = report_json("Org", "c@org.test", "id-1", 0, 86400, "a.test", &counts);
        assert_eq!(json["date-range"]["start-datetime"], "1970-01-01T00:00:00Z");
        assert_eq!(json["date-range"]["end-datetime"], "1970-01-02T00:00:00Z");
        let policies = json["policies"].as_array().expect("policies");
        assert_eq!(policies.len(), 3);
        let tlsa = &policies[0];
        assert_eq!(tlsa["policy"]["policy-type"], "tlsa");
        assert_eq!(tlsa["summary"]["total-successful-session-count"], 3);
        assert_eq!(tlsa["summary"]["total-failure-session-count"], 2);
        assert_eq!(
            tlsa["failure-details"][0]["result-type"],
            "validation-failure"
        );
        assert_eq!(tlsa["failure-details"][0]["receiving-ip"], "192.0.2.1");
        let sts = &policies[1];
        assert_eq!(sts["policy"]["policy-type"], "sts");
        assert_eq!(
            sts["failure-details"][0],
            json!({"result-type": "sts-policy-fetch-error", "failed-session-count": 1})
        );
        assert_eq!(policies[2]["policy"]["policy-type"], "no-policy-found");
        assert!(policies[2].get("failure-details").is_none());
    }

    #[test]
    fn dane_required_is_a_failure_under_no_policy_found_naming_the_host() {
        // What smtp.rs counts for an MX host that mandatory DANE refused.
        let reporter = Reporter::default();
        let rua = ["mailto:r@u.test".to_owned()];
        let refused = || {
            Outcome::Failure(Failure {
                result: ResultType::DaneRequired,
                mx_host: Some("mx.u.test".into()),
                receiving_ip: None,
            })
        };
        reporter.record_at(10, DAY, "u.test", &rua, PolicyKey::none(), refused());
        reporter.record_at(11, DAY, "u.test", &rua, PolicyKey::none(), refused());
        let counts = counts_of(&reporter, 0, "u.test");
        let json = report_json("Org", "c@org.test", "id-1", 0, 86400, "u.test", &counts);
        let policies = json["policies"].as_array().expect("policies");
        assert_eq!(policies.len(), 1);
        assert_eq!(
            policies[0]["policy"],
            json!({"policy-type": "no-policy-found", "policy-domain": "u.test"})
        );
        assert_eq!(policies[0]["summary"]["total-failure-session-count"], 2);
        assert_eq!(
            policies[0]["failure-details"],
            json!([{"result-type": "dane-required", "receiving-mx-hostname": "mx.u.test",
                    "failed-session-count": 2}])
        );
    }

    #[test]
    fn periods_are_aligned_on_the_interval() {
        assert_eq!(period_of(86400 * 3 + 5, DAY), (86400 * 3, 86400 * 4));
        assert_eq!(
            period_of(7, Duration::from_secs(2)),
            (6, 8),
            "every pod's periods are the same"
        );
        let reporter = Reporter::default();
        reporter.record_at(5, DAY, "a.test", &[], tlsa(), Outcome::Success);
        reporter.record_at(
            DAY.as_secs() + 5,
            DAY,
            "a.test",
            &[],
            tlsa(),
            Outcome::Success,
        );
        let starts: Vec<u64> = reporter.lock().saved.periods.keys().copied().collect();
        assert_eq!(starts, vec![0, 86400]);
    }

    #[test]
    fn tls_failures_map_to_rfc_8460_result_types() {
        use mta_client::TlsFailure as F;
        for (cause, expected) in [
            (F::HostMismatch, ResultType::CertificateHostMismatch),
            (F::Expired, ResultType::CertificateExpired),
            (F::NotTrusted, ResultType::CertificateNotTrusted),
            (F::PolicyMismatch, ResultType::ValidationFailure),
            (F::Handshake, ResultType::ValidationFailure),
        ] {
            assert_eq!(ResultType::of_tls_failure(cause, UnderDane::No), expected);
            assert_eq!(
                ResultType::of_tls_failure(cause, UnderDane::Yes),
                ResultType::ValidationFailure,
                "under DANE only the TLSA records judge"
            );
        }
        use crate::delivery::mta_sts::StsFailure as S;
        assert_eq!(
            ResultType::of_sts_failure(S::WebPkiInvalid).as_str(),
            "sts-webpki-invalid"
        );
        for result in [
            ResultType::DnssecInvalid,
            ResultType::TlsaInvalid,
            ResultType::DaneRequired,
        ] {
            let json = serde_json::to_string(&result).expect("json");
            assert_eq!(json, format!("\"{}\"", result.as_str()));
        }
    }

    #[tokio::test]
    async fn counts_survive_a_save_and_a_load() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(FILE_NAME);
        let before = Reporter::default();
        let rua = ["mailto:r@a.test".to_owned()];
        before.record_at(10, DAY, "a.test", &rua, tlsa(), Outcome::Success);
        before.record_at(
            11,
            DAY,
            "a.test",
            &rua,
            tlsa(),
            failure(ResultType::DnssecInvalid),
        );
        before.record_at(12, DAY, "b.test", &rua, PolicyKey::none(), Outcome::Success);
        before.lock().saved.in_redis.insert(0, 86400);
        before.save(&path).await;
        assert!(!before.lock().dirty, "saved");

        let after = Reporter::default();
        after.load(&path);
        assert_eq!(after.lock().saved.periods, before.lock().saved.periods);
        assert_eq!(after.lock().saved.in_redis, before.lock().saved.in_redis);
        // Loading adds to what was counted meanwhile.
        after.record_at(13, DAY, "a.test", &rua, tlsa(), Outcome::Success);
        let key = CountKey {
            policy: tlsa(),
            failure: None,
        };
        assert_eq!(counts_of(&after, 0, "a.test").counts[&key], 2);
    }

    #[test]
    fn redis_fields_give_the_counts_back() {
        let reporter = Reporter::default();
        let rua = ["https://r.a.test/x".to_owned()];
        reporter.record_at(10, DAY, "a.test", &rua, tlsa(), Outcome::Success);
        reporter.record_at(
            10,
            DAY,
            "a.test",
            &rua,
            tlsa(),
            failure(ResultType::TlsaInvalid),
        );
        let counts = counts_of(&reporter, 0, "a.test");
        // What two pods' HINCRBYs leave in the hash: each count twice.
        let mut fields: HashMap<String, String> = counts
            .counts
            .iter()
            .map(|(k, n)| (serde_json::to_string(k).expect("json"), (n * 2).to_string()))
            .collect();
        fields.insert(RUA_FIELD.into(), serde_json::to_string(&rua).expect("json"));
        fields.insert("from a later version".into(), "1".into());
        let merged = counts_from_fields(&fields);
        assert_eq!(merged.rua, rua);
        assert_eq!(merged.counts.len(), 2);
        assert!(merged.counts.values().all(|n| *n == 2));
    }

    #[test]
    fn gzip_round_trips() {
        use std::io::Read;
        let packed = gzip(b"{\"a\":1}");
        let mut out = String::new();
        flate2::read::GzDecoder::new(&packed[..])
            .read_to_string(&mut out)
            .expect("gunzip");
        assert_eq!(out, "{\"a\":1}");
    }
}
