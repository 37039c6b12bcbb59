//! What the MTA pods report about themselves: the operator reads each Ready pod's
//! `/metrics` (by pod IP, as a Prometheus scrape would) to learn which DKIM keys it has
//! loaded and signs with.
//!
//! Every read has a deadline and a failure is an answer ("unreadable"), never an error
//! that stops a reconcile. Nothing here decides anything: callers do.

use crate::render::workload::{HTTP_PORT, selector_labels};
use crds::SmtpListener;
use http_body_util::BodyExt;
use hyper::body::Bytes;
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::{Api, Client};
use std::net::IpAddr;
use std::time::Duration;

/// How long one pod's `/metrics` may take.
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(3);

/// A Ready pod of a listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadyPod {
    /// Pod name.
    pub name: String,
    /// Pod IP.
    pub ip: IpAddr,
}

/// The label selector of `listener`'s pods, as the API takes it (`k=v,k=v`).
pub fn selector(listener: &SmtpListener) -> String {
    selector_labels(listener)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Every pod of `listener`.
pub async fn list(client: &Client, listener: &SmtpListener) -> kube::Result<Vec<Pod>> {
    let ns = listener.metadata.namespace.clone().unwrap_or_default();
    Ok(Api::<Pod>::namespaced(client.clone(), &ns)
        .list(&ListParams::default().labels(&selector(listener)))
        .await?
        .items)
}

/// The Ready pods (condition `Ready=True`, with an IP) of `listener`.
pub async fn ready_pods(client: &Client, listener: &SmtpListener) -> kube::Result<Vec<ReadyPod>> {
    Ok(list(client, listener)
        .await?
        .iter()
        .filter_map(ready_pod)
        .collect())
}

fn ready_pod(pod: &Pod) -> Option<ReadyPod> {
    let status = pod.status.as_ref()?;
    let ready = status
        .conditions
        .as_ref()?
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    if !ready || pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    Some(ReadyPod {
        name: pod.metadata.name.clone()?,
        ip: status.pod_ip.as_deref()?.parse().ok()?,
    })
}

/// Annotation on MTA pods (never on the pod template, so nothing restarts) holding the
/// checksum of the config and key files they mount.
pub const FILES_CHECKSUM: &str = "mail.petrel.dev/files-checksum";

/// Sets [`FILES_CHECKSUM`] to `checksum` on each of `pods` (a listener's, as
/// [`list`]ed) that has another value; returns how many were patched. A pod update makes the kubelet re-sync that pod's
/// Secret and ConfigMap volumes at once, so a new config or DKIM key reaches the MTA in
/// seconds rather than at the kubelet's next periodic sync (up to a minute or more).
pub async fn nudge<'a>(
    client: &Client,
    pods: impl IntoIterator<Item = &'a Pod>,
    checksum: &str,
) -> kube::Result<usize> {
    let mut patched = 0;
    for pod in pods {
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let api = Api::<Pod>::namespaced(client.clone(), &ns);
        let current = pod
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(FILES_CHECKSUM));
        let (Some(name), false) = (
            pod.metadata.name.as_deref(),
            current.map(String::as_str) == Some(checksum),
        ) else {
            continue;
        };
        let patch = serde_json::json!({"metadata": {"annotations": {FILES_CHECKSUM: checksum}}});
        match api
            .patch(
                name,
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(&patch),
            )
            .await
        {
            Ok(_) => patched += 1,
            // Gone meanwhile: nothing to refresh.
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(patched)
}

/// The text of `http://<ip>:<HTTP_PORT>/metrics`.
pub async fn scrape(ip: IpAddr, timeout: Duration) -> Result<String, String> {
    let port = u16::try_from(HTTP_PORT).map_err(|e| e.to_string())?;
    tokio::time::timeout(timeout, get(ip, port, "/metrics"))
        .await
        .map_err(|_| format!("no answer from {ip}:{port} within {timeout:?}"))?
}

async fn get(ip: IpAddr, port: u16, path: &str) -> Result<String, String> {
    let (status, body) = call(ip, port, hyper::Method::GET, path, None, None).await?;
    if !status.is_success() {
        return Err(format!("{path}: HTTP {status}"));
    }
    Ok(body)
}

/// One HTTP/1.1 request to a pod; the status and the body as text.
async fn call(
    ip: IpAddr,
    port: u16,
    method: hyper::Method,
    path: &str,
    token: Option<&str>,
    json: Option<String>,
) -> Result<(hyper::StatusCode, String), String> {
    let stream = tokio::net::TcpStream::connect((ip, port))
        .await
        .map_err(|e| format!("{ip}:{port}: {e}"))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    let driver = tokio::spawn(connection);
    let mut request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, ip.to_string());
    if let Some(token) = token {
        request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    if json.is_some() {
        request = request.header(hyper::header::CONTENT_TYPE, "application/json");
    }
    let request = request
        .body(http_body_util::Full::new(Bytes::from(
            json.unwrap_or_default(),
        )))
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    driver.abort();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// What a pod says about its drain (`GET /admin/drain`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct DrainReport {
    /// `serving`, `draining`, `handing_off` or `drained`.
    pub state: String,
    /// Messages still in its queue.
    #[serde(default)]
    pub left: u64,
    /// Delivered since the drain began.
    #[serde(default)]
    pub delivered: u64,
    /// Handed to peers since the drain began.
    #[serde(default)]
    pub handed_off: u64,
    /// Whether its durable "drained" marker exists.
    #[serde(default)]
    pub marker: bool,
    /// The last hand-off error, if any.
    #[serde(default)]
    pub error: Option<String>,
}

impl DrainReport {
    /// Drained for good: the pod says so, with nothing left and its marker written.
    pub fn done(&self) -> bool {
        self.state == "drained" && self.left == 0 && self.marker
    }
}

impl std::fmt::Display for DrainReport {
    /// `handing_off (12 left, 3 delivered, 85 handed off; <last error>)`, for conditions.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({} left, {} delivered, {} handed off",
            self.state, self.left, self.delivered, self.handed_off
        )?;
        if let Some(e) = &self.error {
            write!(f, "; {e}")?;
        }
        f.write_str(")")
    }
}

/// Asks the pod at `ip` to drain (hand its queue to `peers` after `deliver_for_secs` of
/// delivering) and returns its progress. Asking again is harmless (the MTA treats it as
/// the same drain, with the new peer list), so every reconcile of a scale-in does.
pub async fn drain(
    ip: IpAddr,
    token: &str,
    peers: &[String],
    deliver_for_secs: u64,
) -> Result<DrainReport, String> {
    let port = u16::try_from(HTTP_PORT).map_err(|e| e.to_string())?;
    let body = serde_json::json!({"peers": peers, "deliver_for_secs": deliver_for_secs});
    let asked = tokio::time::timeout(
        SCRAPE_TIMEOUT,
        call(
            ip,
            port,
            hyper::Method::POST,
            "/admin/drain",
            Some(token),
            Some(body.to_string()),
        ),
    )
    .await
    .map_err(|_| format!("no answer from {ip}:{port} within {SCRAPE_TIMEOUT:?}"))??;
    if !asked.0.is_success() {
        return Err(format!(
            "POST /admin/drain: HTTP {}: {}",
            asked.0,
            asked.1.trim()
        ));
    }
    let (status, text) = tokio::time::timeout(
        SCRAPE_TIMEOUT,
        call(
            ip,
            port,
            hyper::Method::GET,
            "/admin/drain",
            Some(token),
            None,
        ),
    )
    .await
    .map_err(|_| format!("no answer from {ip}:{port} within {SCRAPE_TIMEOUT:?}"))??;
    if !status.is_success() {
        return Err(format!("GET /admin/drain: HTTP {status}: {}", text.trim()));
    }
    serde_json::from_str(&text).map_err(|e| format!("GET /admin/drain: {e}: {text}"))
}

/// Takes a pod that stays out of a drain it no longer needs (a scale-in undone, or a
/// drained pod brought back by a scale-out): it takes mail again. Returns whether it was
/// draining.
pub async fn cancel_drain(ip: IpAddr, token: &str) -> Result<bool, String> {
    let port = u16::try_from(HTTP_PORT).map_err(|e| e.to_string())?;
    let ask = |method| {
        tokio::time::timeout(
            SCRAPE_TIMEOUT,
            call(ip, port, method, "/admin/drain", Some(token), None),
        )
    };
    let (status, text) = ask(hyper::Method::GET)
        .await
        .map_err(|_| format!("no answer from {ip}:{port}"))??;
    if !status.is_success() {
        return Err(format!("GET /admin/drain: HTTP {status}"));
    }
    let report: DrainReport =
        serde_json::from_str(&text).map_err(|e| format!("GET /admin/drain: {e}"))?;
    if report.state == "serving" {
        return Ok(false);
    }
    let (status, text) = ask(hyper::Method::DELETE)
        .await
        .map_err(|_| format!("no answer from {ip}:{port}"))??;
    if !status.is_success() {
        return Err(format!(
            "DELETE /admin/drain: HTTP {status}: {}",
            text.trim()
        ));
    }
    Ok(true)
}

/// Whether a `/metrics` text says the pod counts rate limits alone because its shared
/// Redis is unreachable (`petrel_mta_rate_limit_backend{backend="local"} 1` while Redis is
/// configured).
pub fn rate_limits_local(metrics: &str) -> bool {
    metrics.lines().any(|l| {
        l.starts_with("petrel_mta_rate_limit_backend{")
            && l.contains("backend=\"local\"")
            && l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) == Some(1.0)
    })
}

/// Messages in the queue, from a `/metrics` text (`petrel_mta_queue_messages`, all states).
pub fn queue_depth(metrics: &str) -> Option<u64> {
    let mut total = None;
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix("petrel_mta_queue_messages") else {
            continue;
        };
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        let value = rest.rsplit(' ').next()?.parse::<f64>().ok()?;
        // Gauges are whole numbers of messages.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let n = value.max(0.0) as u64;
        *total.get_or_insert(0) += n;
    }
    total
}

/// One `petrel_mta_dkim_keys` series: a key a pod has loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedKey {
    /// Signing domain.
    pub domain: String,
    /// Selector.
    pub selector: String,
    /// Whether the pod signs with it.
    pub signing: bool,
}

/// The DKIM keys in a `/metrics` text (series with value 1).
pub fn dkim_keys(metrics: &str) -> Vec<LoadedKey> {
    metrics
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("petrel_mta_dkim_keys{")?;
            let (labels, value) = rest.split_once("} ")?;
            if value.trim().parse::<f64>().ok()? < 1.0 {
                return None;
            }
            let label = |name: &str| {
                labels.split(',').find_map(|pair| {
                    let (k, v) = pair.split_once('=')?;
                    (k.trim() == name).then(|| v.trim().trim_matches('"').to_owned())
                })
            };
            Some(LoadedKey {
                domain: label("domain")?,
                selector: label("selector")?,
                signing: label("signing")? == "true",
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_dkim_series_of_a_real_exposition() {
        let m = mta_telemetry::MtaMetrics::new();
        m.set_dkim_keys(&[
            ("example.com".into(), "petrel-a".into(), true),
            ("example.com".into(), "petrel-b".into(), false),
        ]);
        let mut keys = dkim_keys(&m.encode_prometheus());
        keys.sort_by(|a, b| a.selector.cmp(&b.selector));
        assert_eq!(
            keys,
            vec![
                LoadedKey {
                    domain: "example.com".into(),
                    selector: "petrel-a".into(),
                    signing: true
                },
                LoadedKey {
                    domain: "example.com".into(),
                    selector: "petrel-b".into(),
                    signing: false
                },
            ]
        );
        assert!(dkim_keys("petrel_mta_dkim_keys_other 1\n# EOF\n").is_empty());
    }

    #[test]
    fn reads_queue_depth_and_rate_limit_backend_of_a_real_exposition() {
        use mta_telemetry::{QueueState, RateLimitBackend};
        let m = mta_telemetry::MtaMetrics::new();
        m.set_queue_depth(QueueState::Waiting, 7);
        m.set_queue_depth(QueueState::Held, 2);
        m.set_rate_limit_backend(RateLimitBackend::Redis);
        let text = m.encode_prometheus();
        assert_eq!(queue_depth(&text), Some(9));
        assert!(!rate_limits_local(&text));
        m.set_rate_limit_backend(RateLimitBackend::Local);
        assert!(rate_limits_local(&m.encode_prometheus()));
        assert_eq!(queue_depth("# EOF\n"), None);
    }
}
