//! Runs the four controllers in one process: SmtpListener (owns the workload objects and
//! re-renders when any MailDomain, DkimKey or RelayPolicy in its namespace changes),
//! DkimKey (owns its key Secret), MailDomain (DNS guidance) and RelayPolicy (status).

use crate::context::Context;
use crate::reconcile;
use crds::{DkimKey, MailDomain, RelayPolicy, SmtpListener};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::ListParams;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{Controller, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use std::net::SocketAddr;
use std::sync::Arc;

/// Every SmtpListener in the namespace of `obj` (they all serve its domains).
fn listeners_near<K: Resource>(
    store: &Store<SmtpListener>,
    obj: &K,
) -> Vec<ObjectRef<SmtpListener>> {
    let ns = obj.meta().namespace.clone();
    store
        .state()
        .iter()
        .filter(|l| l.namespace() == ns)
        .map(|l| ObjectRef::from_obj(&**l))
        .collect()
}

/// Runs until SIGTERM/ctrl-c.
pub async fn run(
    dns_server: Option<SocketAddr>,
    metrics_address: Option<SocketAddr>,
) -> crate::Result<()> {
    let client = Client::try_default().await?;
    if let Err(e) = Api::<SmtpListener>::all(client.clone())
        .list(&ListParams::default().limit(1))
        .await
    {
        tracing::error!(
            "the Petrel CRDs are not installed (kubectl apply -f manifests/crds/): {e}"
        );
        return Err(e.into());
    }
    let ctx = Arc::new(Context::new(client.clone(), dns_server));
    if let Some(address) = metrics_address {
        match tokio::net::TcpListener::bind(address).await {
            Ok(listener) => {
                tracing::info!(%address, "serving /metrics and /healthz");
                tokio::spawn(crate::metrics::serve(listener, ctx.metrics.clone()));
            }
            Err(e) => tracing::error!(%address, error = %e, "cannot serve /metrics"),
        }
    }
    let wc = watcher::Config::default;
    let managed =
        || watcher::Config::default().labels("app.kubernetes.io/managed-by=petrel-operator");

    let listeners = Controller::new(Api::<SmtpListener>::all(client.clone()), wc());
    let store = listeners.store();
    let (s1, s2, s3) = (store.clone(), store.clone(), store);
    let listeners = listeners
        .owns(Api::<ConfigMap>::all(client.clone()), managed())
        .owns(Api::<Secret>::all(client.clone()), managed())
        .owns(Api::<StatefulSet>::all(client.clone()), managed())
        .owns(Api::<Service>::all(client.clone()), managed())
        .owns(Api::<PodDisruptionBudget>::all(client.clone()), managed())
        .owns(
            Api::<HorizontalPodAutoscaler>::all(client.clone()),
            managed(),
        )
        .watches(Api::<MailDomain>::all(client.clone()), wc(), move |o| {
            listeners_near(&s1, &o)
        })
        .watches(Api::<DkimKey>::all(client.clone()), wc(), move |o| {
            listeners_near(&s2, &o)
        })
        .watches(Api::<RelayPolicy>::all(client.clone()), wc(), move |o| {
            listeners_near(&s3, &o)
        })
        .shutdown_on_signal()
        .run(reconcile::listener, reconcile::error_policy, ctx.clone())
        .for_each(|_| async {});
    let keys = Controller::new(Api::<DkimKey>::all(client.clone()), wc())
        .owns(Api::<Secret>::all(client.clone()), managed())
        .shutdown_on_signal()
        .run(reconcile::dkim_key, reconcile::error_policy, ctx.clone())
        .for_each(|_| async {});
    let domains = Controller::new(Api::<MailDomain>::all(client.clone()), wc())
        .shutdown_on_signal()
        .run(reconcile::mail_domain, reconcile::error_policy, ctx.clone())
        .for_each(|_| async {});
    let policies = Controller::new(Api::<RelayPolicy>::all(client.clone()), wc())
        .shutdown_on_signal()
        .run(reconcile::relay_policy, reconcile::error_policy, ctx)
        .for_each(|_| async {});
    tracing::info!("petrel-operator running");
    futures::join!(listeners, keys, domains, policies);
    Ok(())
}
