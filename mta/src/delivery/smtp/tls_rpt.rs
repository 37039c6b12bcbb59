//! TLS-RPT (RFC 8460): what delivery by MX records about TLS for domains that ask for
//! reports, and the aggregate reports sent to them. [`super`] (the SMTP client side of
//! delivery) asks [`Reporter::rua`]
//! whether a domain publishes `_smtp._tls` and tells [`Reporter::record`] how each
//! connection attempt went under which policy; every `smtp_client.tls_rpt.report_interval`
//! the reporter task turns the counts into one JSON report per domain (§4), gzips it and
//! sends it to each `rua` URI: `mailto:` as a message in our own queue (§5.3, with
//! `TLS-Required: No`), `https:` as a POST (§5.4).
//!
//! Must never: count the delivery of a report (its sender is the reports' sender, and
//! [`super`] does not record it), put message content or recipients in a report, or
//! block delivery on reporting (a failed report is logged and dropped).
//!
//! Not here: merging counts across the pods of a fleet (each pod reports its own counts
//! under its own report id), keeping counts across a restart, and failures that happen
//! before a connection (bogus DNS, a failed TLSA lookup, an MTA-STS policy that cannot be
//! fetched).

use crate::context::Context;
use crate::queue::{Envelope, Recipient};
use base64::Engine;
use bytes::Bytes;
use hickory_resolver::TokioResolver;
use hickory_resolver::proto::rr::RData;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Time allowed for one HTTPS report upload.
const POST_TIMEOUT: Duration = Duration::from_secs(60);
/// Domains counted at most per report period; beyond that, new domains are not counted.
const MAX_DOMAINS: usize = 10_000;

/// RFC 8460 §4.3 result types this MTA reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResultType {
    /// The MX host did not offer STARTTLS (or refused it) where TLS was required.
    StartTlsNotSupported,
    /// The certificate does not match what the policy asks (DANE's TLSA records, or the
    /// MTA-STS chain and name check).
    ValidationFailure,
}

impl ResultType {
    pub fn as_str(self) -> &'static str {
        match self {
            ResultType::StartTlsNotSupported => "starttls-not-supported",
            ResultType::ValidationFailure => "validation-failure",
        }
    }
}

/// The policy an attempt ran under (RFC 8460 §4.4 `policy`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PolicyKey {
    /// `tlsa`, `sts` or `no-policy-found`.
    pub kind: &'static str,
    /// `policy-string`: the TLSA records in presentation form, or the MTA-STS policy lines.
    pub strings: Vec<String>,
    /// `mx-host`: the MX host (DANE) or the policy's MX patterns (MTA-STS).
    pub mx_hosts: Vec<String>,
}

impl PolicyKey {
    pub fn none() -> Self {
        Self {
            kind: "no-policy-found",
            strings: Vec::new(),
            mx_hosts: Vec::new(),
        }
    }
}

/// One connection attempt's outcome.
#[derive(Debug, Clone)]
pub enum Outcome {
    Success,
    Failure {
        result: ResultType,
        mx_host: String,
        receiving_ip: IpAddr,
    },
}

#[derive(Debug, Default)]
struct Counts {
    success: u64,
    failures: HashMap<(ResultType, String, IpAddr), u64>,
}

#[derive(Debug, Default)]
struct DomainCounts {
    rua: Vec<String>,
    policies: HashMap<PolicyKey, Counts>,
}

#[derive(Debug, Default)]
struct Period {
    /// Seconds since the epoch; 0 until the first record.
    start: u64,
    domains: HashMap<String, DomainCounts>,
}

/// The counts of the current period, and the task that sends them.
#[derive(Default)]
pub struct Reporter {
    period: Mutex<Period>,
    task: OnceLock<()>,
    serial: std::sync::atomic::AtomicU64,
}

impl Reporter {
    /// The `rua` URIs of `domain`'s `_smtp._tls` record, or `None` when it publishes none
    /// that is valid (RFC 8460 §3). DNS failures also mean none.
    pub async fn rua(&self, resolver: &TokioResolver, domain: &str) -> Option<Vec<String>> {
        let name = format!("_smtp._tls.{}.", domain.trim_end_matches('.'));
        let lookup = resolver.txt_lookup(name.as_str()).await.ok()?;
        let records: Vec<String> = lookup
            .answers()
            .iter()
            .filter_map(|record| match &record.data {
                RData::TXT(txt) => Some(
                    txt.txt_data
                        .iter()
                        .map(|s| String::from_utf8_lossy(s))
                        .collect(),
                ),
                _ => None,
            })
            .collect();
        parse_txt(&records)
    }

    /// Counts one attempt to `domain` (which asked for reports at `rua`) under `policy`,
    /// and makes sure the reporter task runs.
    pub fn record(
        &self,
        ctx: &Arc<Context>,
        domain: &str,
        rua: &[String],
        policy: PolicyKey,
        outcome: Outcome,
    ) {
        {
            let mut period = self.lock();
            if period.start == 0 {
                period.start = unix_now();
            }
            if period.domains.len() >= MAX_DOMAINS && !period.domains.contains_key(domain) {
                return;
            }
            let entry = period
                .domains
                .entry(domain.to_ascii_lowercase())
                .or_default();
            entry.rua = rua.to_vec();
            let counts = entry.policies.entry(policy).or_default();
            match outcome {
                Outcome::Success => counts.success += 1,
                Outcome::Failure {
                    result,
                    mx_host,
                    receiving_ip,
                } => {
                    *counts
                        .failures
                        .entry((result, mx_host, receiving_ip))
                        .or_default() += 1
                }
            }
        }
        self.task.get_or_init(|| {
            tokio::spawn(run(ctx.clone()));
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Period> {
        self.period.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ends the current period: its reports (domain, `rua`, JSON), and a new empty period.
    fn take_reports(&self, organization: &str, contact: &str, submitter_id: &str) -> Vec<Report> {
        let period = std::mem::take(&mut *self.lock());
        let end = unix_now();
        let serial = self
            .serial
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        period
            .domains
            .into_iter()
            .map(|(domain, counts)| {
                let id = format!("{}-{serial}-{domain}@{submitter_id}", period.start);
                let json = report_json(
                    organization,
                    contact,
                    &id,
                    period.start,
                    end,
                    &domain,
                    &counts,
                );
                Report {
                    domain,
                    rua: counts.rua,
                    id,
                    start: period.start,
                    end,
                    json,
                }
            })
            .collect()
    }
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
    let mut policies: Vec<(&PolicyKey, &Counts)> = counts.policies.iter().collect();
    policies.sort_by(|a, b| (a.0.kind, &a.0.mx_hosts).cmp(&(b.0.kind, &b.0.mx_hosts)));
    let policies: Vec<Value> = policies
        .into_iter()
        .map(|(policy, counts)| {
            let mut details: Vec<(&(ResultType, String, IpAddr), &u64)> =
                counts.failures.iter().collect();
            details.sort_by(|a, b| (a.0.1.as_str(), a.0.2).cmp(&(b.0.1.as_str(), b.0.2)));
            let mut policy_json = json!({
                "policy-type": policy.kind,
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
                    "total-successful-session-count": counts.success,
                    "total-failure-session-count": counts.failures.values().sum::<u64>(),
                },
            });
            if !details.is_empty() {
                entry["failure-details"] = details
                    .into_iter()
                    .map(|((result, mx_host, ip), n)| {
                        json!({
                            "result-type": result.as_str(),
                            "receiving-mx-hostname": mx_host,
                            "receiving-ip": ip.to_string(),
                            "failed-session-count": n,
                        })
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

/// The reporter task: every `report_interval`, one report per counted domain to each of
/// its `rua` URIs.
async fn run(ctx: Arc<Context>) {
    loop {
        let interval = ctx.config().smtp_client.tls_rpt.report_interval;
        tokio::time::sleep(interval).await;
        let config = ctx.config();
        let rpt = &config.smtp_client.tls_rpt;
        let organization = rpt.organization.clone().unwrap_or(config.hostname.clone());
        let sender = report_sender(&config);
        let submitter = match std::env::var("POD_NAME") {
            Ok(pod) if !pod.is_empty() => format!("{pod}.{}", config.hostname),
            _ => config.hostname.clone(),
        };
        let reports = ctx.tls_rpt.take_reports(&organization, &sender, &submitter);
        tracing::info!(reports = reports.len(), "TLS-RPT period closed");
        for report in reports {
            let body = gzip(report.json.to_string().as_bytes());
            for uri in &report.rua {
                let result = if let Some(to) = uri.strip_prefix("mailto:") {
                    mail(&ctx, &config, &organization, &sender, to, &report, &body).await
                } else {
                    post(&ctx, &config, uri, &body).await
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

/// §5.3: a `multipart/report; report-type="tlsrpt"` message into our own queue.
async fn mail(
    ctx: &Arc<Context>,
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
        date = crate::cleanup::rfc5322_date(now),
    );
    let mut recipient = Recipient::new(to.to_owned());
    // A report about a report, or a notice about one, is never wanted.
    recipient.notify = Some(crate::queue::DsnNotify::default());
    let envelope = Envelope {
        recipients: vec![recipient],
        received_at: now,
        ..Envelope::new(sender, IpAddr::from([127, 0, 0, 1]), host)
    };
    ctx.spool
        .store(id, &envelope, &[content.as_bytes()])
        .await
        .map_err(|e| format!("cannot queue the report: {e}"))?;
    ctx.scheduler.enqueue(id, envelope);
    Ok(())
}

/// §5.4: `POST` of the gzipped report, `Content-Type: application/tlsrpt+gzip`; any 2xx
/// counts as received. The certificate is verified as for MTA-STS (Mozilla roots plus
/// `smtp_client.ca_file`).
async fn post(
    ctx: &Arc<Context>,
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
    let mut tls = (*mta_client::verified_tls_config(extra_roots_pem)?).clone();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let server_name = rustls_pki_types::ServerName::try_from(host.to_owned())
        .map_err(|e| format!("{host:?} is not a TLS server name: {e}"))?;
    let mut last_error = format!("{host} has no address");
    let mut tcp = None;
    for &address in addresses {
        match tokio::net::TcpStream::connect(address).await {
            Ok(stream) => {
                tcp = Some(stream);
                break;
            }
            Err(e) => last_error = format!("cannot connect to {host} ({address}): {e}"),
        }
    }
    let tcp = tcp.ok_or(last_error)?;
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(server_name, tcp)
        .await
        .map_err(|e| format!("TLS with {host}: {e}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP with {host}: {e}"))?;
    let mut driver = tokio::task::JoinSet::new();
    driver.spawn(async move {
        let _ = connection.await;
    });
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

    #[test]
    fn report_counts_sessions_per_policy_with_failure_details() {
        let dane = PolicyKey {
            kind: "tlsa",
            strings: vec!["3 1 1 00".into()],
            mx_hosts: vec!["mx.a.test".into()],
        };
        let mut counts = DomainCounts::default();
        let entry = counts.policies.entry(dane).or_default();
        entry.success = 3;
        entry.failures.insert(
            (
                ResultType::ValidationFailure,
                "mx.a.test".into(),
                IpAddr::from([192, 0, 2, 1]),
            ),
            2,
        );
        counts
            .policies
            .entry(PolicyKey::none())
            .or_default()
            .success = 1;
        let json = report_json("Org", "c@org.test", "id-1", 0, 86400, "a.test", &counts);
        assert_eq!(json["date-range"]["start-datetime"], "1970-01-01T00:00:00Z");
        assert_eq!(json["date-range"]["end-datetime"], "1970-01-02T00:00:00Z");
        let policies = json["policies"].as_array().expect("policies");
        assert_eq!(policies.len(), 2);
        let tlsa = &policies[1];
        assert_eq!(tlsa["policy"]["policy-type"], "tlsa");
        assert_eq!(tlsa["summary"]["total-successful-session-count"], 3);
        assert_eq!(tlsa["summary"]["total-failure-session-count"], 2);
        assert_eq!(
            tlsa["failure-details"][0]["result-type"],
            "validation-failure"
        );
        assert_eq!(policies[0]["policy"]["policy-type"], "no-policy-found");
        assert!(policies[0].get("failure-details").is_none());
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
