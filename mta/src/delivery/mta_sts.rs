//! MTA-STS (RFC 8461) for delivery by MX: discovery, policy fetch, parsing, matching and
//! the in-memory policy cache. [`super::smtp`] asks [`PolicyCache::policy`] for the policy
//! of a recipient domain and applies it to its connection attempts; smarthost and LMTP
//! routes never get here.
//!
//! * Discovery: the `_mta-sts.<domain>` TXT record (`v=STSv1; id=…`, §3.1). No record,
//!   an invalid one, several, or a DNS failure all mean "no live policy".
//! * Fetch: `GET https://mta-sts.<domain>/.well-known/mta-sts.txt` (§3.3) over HTTP/1.1,
//!   with the certificate verified for that name against the Mozilla roots plus
//!   `smtp_client.ca_file`; only `200` with `Content-Type: text/plain` counts, redirects are
//!   not followed, the body is capped at [`MAX_POLICY_SIZE`] and the whole exchange at
//!   [`FETCH_TIMEOUT`].
//! * Cache (§3.3, §5.1): per domain, the policy and the TXT `id` it was fetched under,
//!   until `max_age` runs out. A new `id` causes a refetch; when the fetch fails, or when
//!   the TXT record cannot be found, an unexpired cached policy still applies, and with no
//!   cached policy none does. A failed fetch is not retried for [`FETCH_RETRY_AFTER`], so
//!   a broken policy server does not slow every connection.
//!
//! A failed fetch is kept with its kind ([`StsFailure`]) while it is not retried, so that
//! TLS-RPT (RFC 8460 §4.3.2.2, [`super::smtp::tls_rpt`]) can report each delivery that
//! went without the domain's policy. Not here: the reports themselves, and proactive
//! refresh before expiry.

use super::outcome::DeliveryError;
use super::route::Target;
use crate::queue::Status;
use bytes::Bytes;
use hickory_resolver::TokioResolver;
use http_body_util::{BodyExt, Empty, Limited};
use mta_config::SmtpClientConfig;
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// Largest policy body accepted (RFC 8461 §3.3 suggests 64 KiB).
pub const MAX_POLICY_SIZE: usize = 64 * 1024;
/// Time allowed for a whole policy fetch: address lookup, connect, TLS, request, body.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(30);
/// After a failed fetch, the same TXT `id` is not fetched again for this long.
pub const FETCH_RETRY_AFTER: Duration = Duration::from_secs(5 * 60);
/// Longest `max_age` honoured (RFC 8461 §3.2: one year).
const MAX_AGE_LIMIT: Duration = Duration::from_secs(31_557_600);
/// Domains remembered at most; beyond that, new domains are not cached.
const MAX_CACHED_DOMAINS: usize = 50_000;
const WELL_KNOWN_PATH: &str = "/.well-known/mta-sts.txt";

/// Why a domain's policy could not be had (RFC 8460 §4.3.2.2 names them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StsFailure {
    /// No policy from the policy host: unreachable, no address, a timeout, an HTTP
    /// answer other than `200 text/plain`.
    FetchError,
    /// A policy was fetched but is not valid (RFC 8461 §3.2).
    Invalid,
    /// The policy host's certificate failed PKIX validation for `mta-sts.<domain>`.
    WebPkiInvalid,
}

/// A failed fetch: its kind and what happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchFailure {
    pub kind: StsFailure,
    pub detail: String,
}

impl From<String> for FetchFailure {
    fn from(detail: String) -> Self {
        FetchFailure {
            kind: StsFailure::FetchError,
            detail,
        }
    }
}

impl fmt::Display for FetchFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.detail)
    }
}

/// What discovery gave for a domain: the policy that applies, and why there is none
/// when its live policy could not be fetched.
#[derive(Debug, Clone, Default)]
pub struct Discovery {
    pub policy: Option<Arc<Policy>>,
    /// Set when the domain publishes a policy (a live TXT id) but the last fetch of it
    /// failed, whether or not a cached older policy still applies.
    pub failure: Option<StsFailure>,
}

/// A policy's `mode` (RFC 8461 §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Only listed MX hosts, only over verified TLS.
    Enforce,
    /// Deliver as usual; report what enforce would have refused.
    Testing,
    /// The domain has withdrawn its policy.
    None,
}

/// A parsed policy (RFC 8461 §3.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub mode: Mode,
    /// MX patterns, lower case, without a trailing dot; `*.` only as the first label.
    pub mx: Vec<String>,
    /// How long the policy may be cached, capped at one year.
    pub max_age: Duration,
}

impl Policy {
    /// Parses a policy body. Lines end in CRLF or LF; unknown keys are ignored; for every
    /// key but `mx`, the first occurrence wins (§3.2).
    pub fn parse(text: &str) -> Result<Policy, String> {
        let (mut version, mut mode, mut max_age) = (None, None, None);
        let mut mx = Vec::new();
        for line in text.split('\n') {
            let line = line.strip_suffix('\r').unwrap_or(line);
            if line.trim().is_empty() {
                continue;
            }
            let Some((key, value)) = line.split_once(':') else {
                return Err(format!("line {line:?} is not \"key: value\""));
            };
            let value = value.trim_matches([' ', '\t']);
            match key {
                "version" => {
                    version.get_or_insert(value);
                }
                "mode" => {
                    mode.get_or_insert(value);
                }
                "max_age" => {
                    max_age.get_or_insert(value);
                }
                "mx" => mx.push(value),
                _ => {}
            }
        }
        if version != Some("STSv1") {
            return Err(format!(
                "version is {}, not STSv1",
                version.map_or("missing".into(), |v| format!("{v:?}"))
            ));
        }
        let mode = match mode {
            Some("enforce") => Mode::Enforce,
            Some("testing") => Mode::Testing,
            Some("none") => Mode::None,
            Some(other) => return Err(format!("unknown mode {other:?}")),
            None => return Err("mode is missing".into()),
        };
        let max_age = match max_age {
            Some(v) if (1..=10).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_digit()) => {
                Duration::from_secs(v.parse().unwrap_or(u64::MAX)).min(MAX_AGE_LIMIT)
            }
            Some(v) => return Err(format!("max_age {v:?} is not a number of seconds")),
            None => return Err("max_age is missing".into()),
        };
        let mx = mx
            .into_iter()
            .map(|pattern| {
                normalise_pattern(pattern).ok_or_else(|| format!("bad mx pattern {pattern:?}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if mx.is_empty() && mode != Mode::None {
            return Err("no mx pattern".into());
        }
        Ok(Policy { mode, mx, max_age })
    }

    /// Whether the MX host `host` is allowed by one of the policy's patterns (§4.1).
    pub fn allows(&self, host: &str) -> bool {
        self.mx.iter().any(|pattern| pattern_matches(pattern, host))
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Enforce => "enforce",
            Mode::Testing => "testing",
            Mode::None => "none",
        })
    }
}

/// Lower case, no trailing dot, every label non-empty, `*` only as a whole first label.
fn normalise_pattern(pattern: &str) -> Option<String> {
    let pattern = pattern.strip_suffix('.').unwrap_or(pattern);
    let name = pattern.strip_prefix("*.").unwrap_or(pattern);
    let valid = !name.is_empty()
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    valid.then(|| pattern.to_ascii_lowercase())
}

/// RFC 8461 §4.1: a literal pattern matches the host name; `*.suffix` matches a host of
/// exactly one more label than `suffix`. Case and a trailing dot do not matter.
fn pattern_matches(pattern: &str, host: &str) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    match pattern.strip_prefix("*.") {
        Some(suffix) => host
            .split_once('.')
            .is_some_and(|(first, rest)| !first.is_empty() && rest == suffix),
        None => host == pattern,
    }
}

/// The policy `id` published by a domain's `_mta-sts` TXT records (RFC 8461 §3.1), given
/// each record's text (its character-strings joined). Records not starting with
/// `v=STSv1` are ignored; anything but exactly one valid record means no policy.
pub fn parse_txt<S: AsRef<str>>(records: &[S]) -> Result<String, String> {
    let sts: Vec<&str> = records
        .iter()
        .map(AsRef::as_ref)
        .filter(|r| r.split(';').next().map(str::trim_end) == Some("v=STSv1"))
        .collect();
    let record = match sts.as_slice() {
        [] => return Err("no v=STSv1 record".into()),
        [record] => *record,
        _ => return Err(format!("{} v=STSv1 records", sts.len())),
    };
    let mut id = None;
    for field in record.split(';').skip(1) {
        let field = field.trim_matches([' ', '\t']);
        if field.is_empty() {
            continue;
        }
        let Some((key, value)) = field.split_once('=') else {
            return Err(format!("field {field:?} is not key=value"));
        };
        if key == "id" && id.is_none() {
            if !(1..=32).contains(&value.len()) || !value.bytes().all(|b| b.is_ascii_alphanumeric())
            {
                return Err(format!("bad id {value:?}"));
            }
            id = Some(value.to_owned());
        }
    }
    id.ok_or_else(|| "no id".into())
}

/// Per-domain policies (see the module doc for the rules).
#[derive(Default)]
pub struct PolicyCache {
    domains: Mutex<HashMap<String, Entry>>,
}

#[derive(Default)]
struct Entry {
    /// The last policy fetched.
    policy: Option<Cached>,
    /// The TXT id whose fetch failed last, until when it is not tried again, and why.
    failed: Option<(String, Instant, StsFailure)>,
}

#[derive(Clone)]
struct Cached {
    id: String,
    policy: Arc<Policy>,
    expires: Instant,
}

impl PolicyCache {
    /// The policy that applies to mail for `domain` now, if any (RFC 8461 §3.3, §5.1).
    /// Looks up the TXT record, then fetches the policy when the cache does not already
    /// hold the one with that id.
    pub async fn policy(
        &self,
        resolver: &TokioResolver,
        client: &SmtpClientConfig,
        domain: &str,
    ) -> Discovery {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        let id = match lookup_id(resolver, &domain).await {
            Ok(id) => id,
            Err(error) => {
                tracing::info!(domain, %error, "MTA-STS TXT lookup failed; using the cached policy if any");
                None
            }
        };
        let policy = self
            .resolve(&domain, id.clone(), || fetch(resolver, client, &domain))
            .await;
        Discovery {
            policy,
            failure: id.and_then(|id| self.failure(&domain, &id)),
        }
    }

    /// Why the fetch of `domain`'s policy `id` failed, while that failure stands.
    fn failure(&self, domain: &str, id: &str) -> Option<StsFailure> {
        let now = Instant::now();
        let domains = self.lock();
        let (failed_id, until, kind) = domains.get(domain)?.failed.as_ref()?;
        (failed_id == id && *until > now).then_some(*kind)
    }

    /// The cache rules, apart from DNS and HTTPS: `id` is what discovery found (`None`: no
    /// live record), `fetch` gets the policy published now.
    async fn resolve<F, Fut>(
        &self,
        domain: &str,
        id: Option<String>,
        fetch: F,
    ) -> Option<Arc<Policy>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Policy, FetchFailure>>,
    {
        let now = Instant::now();
        let (cached, failed_recently) = {
            let domains = self.lock();
            let entry = domains.get(domain);
            let cached = entry
                .and_then(|e| e.policy.clone())
                .filter(|c| c.expires > now);
            let failed =
                entry
                    .and_then(|e| e.failed.as_ref())
                    .is_some_and(|(failed_id, until, _)| {
                        Some(failed_id) == id.as_ref() && *until > now
                    });
            (cached, failed)
        };
        let Some(id) = id else {
            return cached.map(|c| c.policy);
        };
        if let Some(c) = cached.as_ref().filter(|c| c.id == id) {
            return Some(c.policy.clone());
        }
        if failed_recently {
            return cached.map(|c| c.policy);
        }
        match fetch().await {
            Ok(policy) => {
                let policy = Arc::new(policy);
                tracing::info!(
                    domain, id, mode = %policy.mode, max_age = policy.max_age.as_secs(),
                    mx = ?policy.mx, "MTA-STS policy fetched"
                );
                let expires = Instant::now() + policy.max_age;
                self.store(domain, |entry| {
                    entry.policy = Some(Cached {
                        id,
                        policy: policy.clone(),
                        expires,
                    });
                    entry.failed = None;
                });
                Some(policy)
            }
            Err(error) => {
                tracing::warn!(
                    domain, id, %error, cached = cached.is_some(),
                    "MTA-STS policy fetch failed; using the cached policy if any"
                );
                let until = Instant::now() + FETCH_RETRY_AFTER;
                self.store(domain, |entry| entry.failed = Some((id, until, error.kind)));
                cached.map(|c| c.policy)
            }
        }
    }

    fn store(&self, domain: &str, update: impl FnOnce(&mut Entry)) {
        let mut domains = self.lock();
        if !domains.contains_key(domain) && domains.len() >= MAX_CACHED_DOMAINS {
            let now = Instant::now();
            domains.retain(|_, e| {
                e.policy.as_ref().is_some_and(|c| c.expires > now)
                    || e.failed.as_ref().is_some_and(|(_, until, _)| *until > now)
            });
            if domains.len() >= MAX_CACHED_DOMAINS {
                return;
            }
        }
        update(domains.entry(domain.to_owned()).or_default());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.domains.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The id of the domain's live `_mta-sts` record; `Ok(None)` when it has no valid one.
async fn lookup_id(resolver: &TokioResolver, domain: &str) -> Result<Option<String>, String> {
    let name = format!("_mta-sts.{domain}.");
    let lookup = match resolver.txt_lookup(name.as_str()).await {
        Ok(lookup) => lookup,
        Err(e) if e.is_nx_domain() || e.is_no_records_found() => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let records = super::route::txt_strings(lookup.answers());
    match parse_txt(&records) {
        Ok(id) => Ok(Some(id)),
        Err(problem) => {
            tracing::debug!(domain, problem, "no usable MTA-STS record");
            Ok(None)
        }
    }
}

/// Fetches and parses the policy of `domain`, within [`FETCH_TIMEOUT`].
async fn fetch(
    resolver: &TokioResolver,
    client: &SmtpClientConfig,
    domain: &str,
) -> Result<Policy, FetchFailure> {
    let body = tokio::time::timeout(FETCH_TIMEOUT, fetch_body(resolver, client, domain))
        .await
        .map_err(|_| format!("no policy within {FETCH_TIMEOUT:?}"))??;
    Policy::parse(&body).map_err(|e| FetchFailure {
        kind: StsFailure::Invalid,
        detail: format!("invalid policy: {e}"),
    })
}

async fn fetch_body(
    resolver: &TokioResolver,
    client: &SmtpClientConfig,
    domain: &str,
) -> Result<String, FetchFailure> {
    let host = format!("mta-sts.{domain}");
    let roots = match &client.ca_file {
        Some(path) => Some(
            tokio::fs::read(path)
                .await
                .map_err(|e| format!("cannot read smtp_client.ca_file {}: {e}", path.display()))?,
        ),
        None => None,
    };
    let addresses: Vec<SocketAddr> = resolver
        .lookup_ip(format!("{host}."))
        .await
        .map_err(|e| format!("address lookup for {host}: {e}"))?
        .iter()
        .map(|ip| SocketAddr::new(ip, client.mta_sts_port))
        .collect();
    get_policy(&host, &addresses, roots.as_deref()).await
}

/// `GET https://<host>/.well-known/mta-sts.txt` from the first of `addresses` that
/// accepts a connection, with the certificate verified for `host`; the body of a `200`
/// `text/plain` answer of at most [`MAX_POLICY_SIZE`] bytes.
async fn get_policy(
    host: &str,
    addresses: &[SocketAddr],
    extra_roots_pem: Option<&[u8]>,
) -> Result<String, FetchFailure> {
    let (mut sender, _driver) = super::https::connect(host, addresses, extra_roots_pem)
        .await
        .map_err(|e| match e {
            // RFC 8460 §4.3.2.2: the policy host's certificate is its own result type.
            super::https::ConnectError::Tls { failure, detail } => FetchFailure {
                kind: match failure {
                    mta_client::TlsFailure::HostMismatch
                    | mta_client::TlsFailure::Expired
                    | mta_client::TlsFailure::NotTrusted
                    | mta_client::TlsFailure::PolicyMismatch => StsFailure::WebPkiInvalid,
                    mta_client::TlsFailure::Handshake | mta_client::TlsFailure::Setup => {
                        StsFailure::FetchError
                    }
                },
                detail,
            },
            super::https::ConnectError::Other(detail) => FetchFailure::from(detail),
        })?;
    let request = http::Request::get(WELL_KNOWN_PATH)
        .header(http::header::HOST, host)
        .header(http::header::USER_AGENT, "petrel-mta")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("request: {e}"))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("HTTP with {host}: {e}"))?;
    // §3.3: only a 200 counts; redirects are not followed.
    if response.status() != http::StatusCode::OK {
        return Err(FetchFailure::from(format!(
            "https://{host}{WELL_KNOWN_PATH} answered {}",
            response.status()
        )));
    }
    let content_type = response
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !is_text_plain(content_type) {
        return Err(FetchFailure::from(format!(
            "Content-Type is {content_type:?}, not text/plain"
        )));
    }
    let body = Limited::new(response.into_body(), MAX_POLICY_SIZE)
        .collect()
        .await
        .map_err(|e| format!("policy body: {e}"))?
        .to_bytes();
    String::from_utf8(body.to_vec()).map_err(|_| FetchFailure {
        kind: StsFailure::Invalid,
        detail: "policy is not UTF-8".into(),
    })
}

/// `text/plain`, with any parameters (RFC 8461 §3.3).
fn is_text_plain(content_type: &str) -> bool {
    content_type
        .split(';')
        .next()
        .is_some_and(|media| media.trim().eq_ignore_ascii_case("text/plain"))
}

/// Keeps the MX hosts an `enforce` policy allows, in order; defers when none is left.
pub fn enforce_hosts(
    policy: &Policy,
    domain: &str,
    targets: Vec<Target>,
) -> Result<Vec<Target>, Status> {
    let (allowed, refused): (Vec<Target>, Vec<Target>) =
        targets.into_iter().partition(|t| policy.allows(&t.name));
    for target in &refused {
        tracing::warn!(domain, host = %mta_telemetry::Escaped(&target.name.to_string()), "MTA-STS: MX host not in the policy; skipped");
    }
    if allowed.is_empty() {
        return Err(DeliveryError::MtaSts {
            detail: format!(
                "no MX host of {domain} matches its policy (mx: {})",
                policy.mx.join(", ")
            ),
        }
        .into());
    }
    Ok(allowed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const RFC_EXAMPLE: &str = "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\n\
        mx: *.example.net\r\nmx: backupmx.example.com\r\nmax_age: 604800\r\n";

    fn policy(mode: Mode, max_age: u64) -> Policy {
        Policy {
            mode,
            mx: vec!["mx.example.com".into()],
            max_age: Duration::from_secs(max_age),
        }
    }

    #[test]
    fn parses_the_rfc_example() {
        let p = Policy::parse(RFC_EXAMPLE).expect("valid");
        assert_eq!(p.mode, Mode::Enforce);
        assert_eq!(
            p.mx,
            ["mail.example.com", "*.example.net", "backupmx.example.com"]
        );
        assert_eq!(p.max_age, Duration::from_secs(604_800));
    }

    #[test]
    fn parse_accepts_lf_whitespace_extensions_and_keeps_first_duplicates() {
        let p = Policy::parse(
            "version: STSv1\nmode:testing \nmode: enforce\nfoo: bar\nmx: MX.Example.COM.\n\
             max_age:\t86400\n\n",
        )
        .expect("valid");
        assert_eq!(p.mode, Mode::Testing);
        assert_eq!(p.mx, ["mx.example.com"]);
        assert_eq!(p.max_age, Duration::from_secs(86_400));
    }

    #[test]
    fn parse_refuses_what_the_rfc_does_not_allow() {
        for (text, why) in [
            ("mode: enforce\nmx: a.b\nmax_age: 1\n", "no version"),
            (
                "version: STSv2\nmode: enforce\nmx: a.b\nmax_age: 1\n",
                "version",
            ),
            (
                "version: STSv1\nmode: Enforce\nmx: a.b\nmax_age: 1\n",
                "mode is case-sensitive",
            ),
            ("version: STSv1\nmx: a.b\nmax_age: 1\n", "no mode"),
            ("version: STSv1\nmode: enforce\nmax_age: 1\n", "no mx"),
            ("version: STSv1\nmode: enforce\nmx: a.b\n", "no max_age"),
            (
                "version: STSv1\nmode: enforce\nmx: a.b\nmax_age: -1\n",
                "negative",
            ),
            (
                "version: STSv1\nmode: enforce\nmx: a.b\nmax_age: 12345678901\n",
                "11 digits",
            ),
            (
                "version: STSv1\nmode: enforce\nmx: a.*.b\nmax_age: 1\n",
                "inner wildcard",
            ),
            (
                "version: STSv1\nmode: enforce\nmx: *\nmax_age: 1\n",
                "bare wildcard",
            ),
            (
                "version: STSv1\nmode: enforce\nmx: a..b\nmax_age: 1\n",
                "empty label",
            ),
            (
                "version: STSv1\nmode: enforce\njunk\nmx: a.b\nmax_age: 1\n",
                "not key: value",
            ),
        ] {
            assert!(Policy::parse(text).is_err(), "{why}: {text:?}");
        }
    }

    #[test]
    fn mode_none_needs_no_mx_and_max_age_is_capped() {
        let p = Policy::parse("version: STSv1\nmode: none\nmax_age: 9999999999\n").expect("valid");
        assert_eq!(p.mode, Mode::None);
        assert!(p.mx.is_empty());
        assert_eq!(p.max_age, MAX_AGE_LIMIT);
    }

    #[test]
    fn wildcard_matches_exactly_one_label() {
        let p = Policy::parse(RFC_EXAMPLE).expect("valid");
        // RFC 8461 §4.1 examples.
        assert!(p.allows("mail.example.com"));
        assert!(p.allows("foo.example.net"));
        assert!(!p.allows("example.net"));
        assert!(!p.allows("foo.bar.example.net"));
        assert!(!p.allows("mail.example.com.evil.test"));
        assert!(!p.allows("xmail.example.com"));
        assert!(!p.allows(".example.net"));
    }

    #[test]
    fn matching_ignores_case_and_trailing_dots() {
        let p = Policy::parse(
            "version: STSv1\nmode: enforce\nmx: *.Example.NET.\nmx: MX.example.com\nmax_age: 1\n",
        )
        .expect("valid");
        assert!(p.allows("FOO.example.net."));
        assert!(p.allows("mx.EXAMPLE.com."));
        assert!(p.allows("mx.example.com"));
        assert!(!p.allows("mx.example.com.."));
    }

    #[test]
    fn txt_record_gives_the_id() {
        assert_eq!(
            parse_txt(&["v=STSv1; id=20160831085700Z;"]),
            Ok("20160831085700Z".into())
        );
        assert_eq!(parse_txt(&["v=STSv1;id=abc"]), Ok("abc".into()));
        assert_eq!(
            parse_txt(&["v=STSv1; ext=1; id=abc; id=def"]),
            Ok("abc".into())
        );
        // Other TXT records at the name are ignored.
        assert_eq!(
            parse_txt(&["google-site-verification=x", "v=STSv1; id=a1"]),
            Ok("a1".into())
        );
    }

    #[test]
    fn txt_records_that_give_no_policy() {
        for records in [
            vec![],
            vec!["v=STSv1;"],
            vec!["v=STSv1; id="],
            vec!["v=STSv1; id=has-dash"],
            vec!["v=STSv1; id=123456789012345678901234567890123"],
            vec!["v=STSv10; id=a"],
            vec!["v=STSv1; id=a", "v=STSv1; id=b"],
            vec!["v=STSv1; junk"],
        ] {
            assert!(parse_txt(&records).is_err(), "{records:?}");
        }
    }

    #[test]
    fn content_type_must_be_text_plain() {
        assert!(is_text_plain("text/plain"));
        assert!(is_text_plain("Text/Plain; charset=utf-8"));
        assert!(!is_text_plain("text/html"));
        assert!(!is_text_plain(""));
    }

    #[test]
    fn enforce_keeps_allowed_hosts_in_order_or_defers() {
        let target = |name: &str| Target {
            name: name.into(),
            address: SocketAddr::from(([127, 0, 0, 1], 25)),
        };
        let p = policy(Mode::Enforce, 60);
        let kept = enforce_hosts(
            &p,
            "example.com",
            vec![target("evil.test"), target("MX.example.com")],
        )
        .expect("one host allowed");
        assert_eq!(kept, vec![target("MX.example.com")]);
        match enforce_hosts(&p, "example.com", vec![target("evil.test")]) {
            Err(Status::Deferred(detail)) => {
                let detail = detail.to_string();
                assert!(detail.starts_with("451 4.7.5 MTA-STS: "), "{detail}")
            }
            other => panic!("{other:?}"),
        }
    }

    /// A fetcher that counts its calls and returns `result`.
    fn fetcher(
        calls: &AtomicUsize,
        result: Result<Policy, String>,
    ) -> impl FnOnce() -> std::future::Ready<Result<Policy, FetchFailure>> + '_ {
        move || {
            calls.fetch_add(1, Ordering::SeqCst);
            std::future::ready(result.map_err(FetchFailure::from))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn cached_until_max_age_then_fetched_again() {
        let cache = PolicyCache::default();
        let calls = AtomicUsize::new(0);
        let id = || Some("1".to_owned());
        let got = cache
            .resolve(
                "d.test",
                id(),
                fetcher(&calls, Ok(policy(Mode::Enforce, 60))),
            )
            .await;
        assert_eq!(got.map(|p| p.mode), Some(Mode::Enforce));
        tokio::time::advance(Duration::from_secs(59)).await;
        let got = cache
            .resolve("d.test", id(), fetcher(&calls, Err("unused".into())))
            .await;
        assert_eq!(got.map(|p| p.mode), Some(Mode::Enforce));
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "same id, unexpired: no fetch"
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        let got = cache
            .resolve(
                "d.test",
                id(),
                fetcher(&calls, Ok(policy(Mode::Testing, 60))),
            )
            .await;
        assert_eq!(got.map(|p| p.mode), Some(Mode::Testing));
        assert_eq!(calls.load(Ordering::SeqCst), 2, "expired: fetched again");
    }

    #[tokio::test(start_paused = true)]
    async fn new_id_refetches_and_a_failed_fetch_keeps_the_cached_policy() {
        let cache = PolicyCache::default();
        let calls = AtomicUsize::new(0);
        cache
            .resolve(
                "d.test",
                Some("1".into()),
                fetcher(&calls, Ok(policy(Mode::Enforce, 600))),
            )
            .await;
        let got = cache
            .resolve(
                "d.test",
                Some("2".into()),
                fetcher(&calls, Ok(policy(Mode::Testing, 600))),
            )
            .await;
        assert_eq!(
            got.map(|p| p.mode),
            Some(Mode::Testing),
            "new id: new policy"
        );
        let got = cache
            .resolve(
                "d.test",
                Some("3".into()),
                fetcher(&calls, Err("down".into())),
            )
            .await;
        assert_eq!(
            got.map(|p| p.mode),
            Some(Mode::Testing),
            "fetch failed: cached policy"
        );
        // The failed id is not fetched again right away...
        cache
            .resolve(
                "d.test",
                Some("3".into()),
                fetcher(&calls, Err("down".into())),
            )
            .await;
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        // ...but after FETCH_RETRY_AFTER it is.
        tokio::time::advance(FETCH_RETRY_AFTER).await;
        let got = cache
            .resolve(
                "d.test",
                Some("3".into()),
                fetcher(&calls, Ok(policy(Mode::None, 600))),
            )
            .await;
        assert_eq!(got.map(|p| p.mode), Some(Mode::None));
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn no_record_uses_the_cache_until_it_expires() {
        let cache = PolicyCache::default();
        let calls = AtomicUsize::new(0);
        assert!(
            cache
                .resolve("d.test", None, fetcher(&calls, Err("unused".into())))
                .await
                .is_none()
        );
        cache
            .resolve(
                "d.test",
                Some("1".into()),
                fetcher(&calls, Ok(policy(Mode::Enforce, 60))),
            )
            .await;
        let got = cache
            .resolve("d.test", None, fetcher(&calls, Err("unused".into())))
            .await;
        assert_eq!(
            got.map(|p| p.mode),
            Some(Mode::Enforce),
            "TXT gone or DNS down: cached"
        );
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(
            cache
                .resolve("d.test", None, fetcher(&calls, Err("unused".into())))
                .await
                .is_none()
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    /// A one-shot HTTPS server on loopback for `mta-sts.example.test`, answering with
    /// `response` (raw HTTP); returns its address and the PEM of the certificate (its own
    /// trust anchor).
    async fn https_server(response: Vec<u8>) -> (SocketAddr, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let certified = rcgen::generate_simple_self_signed(vec!["mta-sts.example.test".into()])
            .expect("certificate");
        let pem = certified.cert.pem();
        let key =
            rustls_pki_types::PrivateKeyDer::Pkcs8(certified.signing_key.serialize_der().into());
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocols")
        .with_no_client_auth()
        .with_single_cert(vec![certified.cert.der().clone()], key)
        .expect("server config");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        tokio::spawn(async move {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
            let Ok(mut tls) = acceptor.accept(tcp).await else {
                return;
            };
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.ends_with(b"\r\n\r\n") {
                match tls.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            assert!(request.starts_with(b"GET /.well-known/mta-sts.txt HTTP/1.1\r\n"));
            let _ = tls.write_all(&response).await;
            let _ = tls.shutdown().await;
        });
        (address, pem)
    }

    fn answer(status: &str, content_type: &str, body: &str) -> Vec<u8> {
        format!(
            "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }

    #[tokio::test]
    async fn fetches_a_policy_over_verified_https() {
        let (address, pem) =
            https_server(answer("200 OK", "text/plain; charset=utf-8", RFC_EXAMPLE)).await;
        let body = get_policy("mta-sts.example.test", &[address], Some(pem.as_bytes()))
            .await
            .expect("fetched");
        assert_eq!(body, RFC_EXAMPLE);
    }

    #[tokio::test]
    async fn refuses_redirects_other_types_big_bodies_and_unknown_certificates() {
        let location = "HTTP/1.1 301 Moved Permanently\r\nLocation: https://elsewhere.test/\r\n\
                        Content-Length: 0\r\n\r\n";
        let big = "x".repeat(MAX_POLICY_SIZE + 1);
        for (response, trusted, expected) in [
            (location.as_bytes().to_vec(), true, "301"),
            (
                answer("200 OK", "text/html", RFC_EXAMPLE),
                true,
                "Content-Type",
            ),
            (answer("200 OK", "text/plain", &big), true, "body"),
            (answer("200 OK", "text/plain", RFC_EXAMPLE), false, "TLS"),
        ] {
            let (address, pem) = https_server(response).await;
            let roots = trusted.then_some(pem.as_bytes());
            let error = get_policy("mta-sts.example.test", &[address], roots)
                .await
                .expect_err("refused");
            assert!(error.detail.contains(expected), "{expected}: {error}");
            let kind = if expected == "TLS" {
                StsFailure::WebPkiInvalid
            } else {
                StsFailure::FetchError
            };
            assert_eq!(error.kind, kind, "{expected}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn failed_first_fetch_means_no_policy() {
        let cache = PolicyCache::default();
        let calls = AtomicUsize::new(0);
        let got = cache
            .resolve(
                "d.test",
                Some("1".into()),
                fetcher(&calls, Err("down".into())),
            )
            .await;
        assert!(got.is_none());
    }
}
