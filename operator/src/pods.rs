//! What the MTA pods report about themselves: the operator reads each Ready pod's
//! `/metrics` (by pod IP, as a Prometheus scrape would) to learn which DKIM keys it has
//! loaded and signs with.
//!
//! Every read has a deadline and a failure is an answer ("unreadable"), never an error
//! that stops a reconcile. Nothing here decides anything: callers do.

use crate::render::workload::{HTTP_PORT, selector_labels};
use crds::SmtpListener;
use http_body_util::{BodyExt, Empty};
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

/// The Ready pods (condition `Ready=True`, with an IP) of `listener`.
pub async fn ready_pods(client: &Client, listener: &SmtpListener) -> kube::Result<Vec<ReadyPod>> {
    let ns = listener.metadata.namespace.clone().unwrap_or_default();
    let selector = selector_labels(listener)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let pods = Api::<Pod>::namespaced(client.clone(), &ns)
        .list(&ListParams::default().labels(&selector))
        .await?;
    Ok(pods.items.iter().filter_map(ready_pod).collect())
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

/// Sets [`FILES_CHECKSUM`] to `checksum` on every pod of `listener` that has another
/// value; returns how many were patched. A pod update makes the kubelet re-sync that pod's
/// Secret and ConfigMap volumes at once, so a new config or DKIM key reaches the MTA in
/// seconds rather than at the kubelet's next periodic sync (up to a minute or more).
pub async fn nudge(
    client: &Client,
    listener: &SmtpListener,
    checksum: &str,
) -> kube::Result<usize> {
    let ns = listener.metadata.namespace.clone().unwrap_or_default();
    let selector = selector_labels(listener)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let api = Api::<Pod>::namespaced(client.clone(), &ns);
    let mut patched = 0;
    for pod in api
        .list(&ListParams::default().labels(&selector))
        .await?
        .items
    {
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
    let stream = tokio::net::TcpStream::connect((ip, port))
        .await
        .map_err(|e| format!("{ip}:{port}: {e}"))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    let driver = tokio::spawn(connection);
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, ip.to_string())
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    if !response.status().is_success() {
        driver.abort();
        return Err(format!("{path}: HTTP {}", response.status()));
    }
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    driver.abort();
    String::from_utf8(body.to_vec()).map_err(|e| e.to_string())
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
}
