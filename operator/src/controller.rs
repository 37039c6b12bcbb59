//! Runs the four controllers of each [`Scope`] in one process: SmtpListener (owns the
//! workload objects and re-renders when any MailDomain, DkimKey, RelayPolicy or managed
//! Secret in its namespace changes), DkimKey (owns its key Secret), MailDomain (DNS
//! guidance; looked at again when its DkimKey changes) and RelayPolicy (status).
//!
//! Cluster-wide by default; with a list of namespaces (`PETREL_WATCH_NAMESPACES`) each
//! namespace gets its own watches and controllers, so Roles in those namespaces are all
//! the RBAC the operator needs.

use crate::context::Context;
use crate::reconcile;
use crate::stores::{self, Scope, Stores, listeners_near, managed_selector};
use crds::{DkimKey, MailDomain, RelayPolicy, SmtpListener};
use futures::StreamExt;
use futures::future::BoxFuture;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::ListParams;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{Controller, watcher};
use kube::{Client, ResourceExt};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// How the operator runs: where it looks, and the defaults it renders with.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    /// DNS server used to check records (default: the system resolvers).
    pub dns_server: Option<SocketAddr>,
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    pub metrics_address: Option<SocketAddr>,
    /// Namespaces to watch; empty means the whole cluster.
    pub watch_namespaces: Vec<String>,
    /// `petrel-mta` image for SmtpListeners that name none.
    pub mta_image: Option<String>,
}

/// Runs until SIGTERM/ctrl-c.
pub async fn run(settings: Settings) -> crate::Result<()> {
    let client = Client::try_default().await?;
    let scopes = Scope::from_namespaces(&settings.watch_namespaces);
    for scope in &scopes {
        if let Err(e) = scope
            .api::<SmtpListener>(&client)
            .list(&ListParams::default().limit(1))
            .await
        {
            tracing::error!(
                ?scope,
                "cannot list SmtpListeners: are the Petrel CRDs installed (kubectl apply --server-side -f manifests/crds/) and may this ServiceAccount read them? {e}"
            );
            return Err(e.into());
        }
    }
    let metrics = crate::metrics::Metrics::default();
    let ready = Arc::new(AtomicUsize::new(0));
    if let Some(address) = settings.metrics_address {
        match tokio::net::TcpListener::bind(address).await {
            Ok(listener) => {
                tracing::info!(%address, "serving /metrics, /healthz and /readyz");
                let scopes_ready = {
                    let ready = ready.clone();
                    let want = scopes.len();
                    move || ready.load(Ordering::SeqCst) >= want
                };
                tokio::spawn(crate::metrics::serve(
                    listener,
                    metrics.clone(),
                    scopes_ready,
                ));
            }
            Err(e) => tracing::error!(%address, error = %e, "cannot serve /metrics"),
        }
    }
    let runs: Vec<BoxFuture<'static, ()>> = scopes
        .into_iter()
        .map(|scope| {
            let (stores, controllers) = controllers(&client, &scope, &settings, &metrics);
            let ready = ready.clone();
            Box::pin(async move {
                let announce = async {
                    if stores.wait_until_ready().await {
                        tracing::info!(?scope, "caches filled; reconciling");
                        ready.fetch_add(1, Ordering::SeqCst);
                    }
                };
                futures::join!(announce, controllers);
            }) as BoxFuture<'static, ()>
        })
        .collect();
    tracing::info!("petrel-operator running");
    futures::future::join_all(runs).await;
    Ok(())
}

/// The stores and the four controllers of one scope, as one future.
fn controllers(
    client: &Client,
    scope: &Scope,
    settings: &Settings,
    metrics: &crate::metrics::Metrics,
) -> (Stores, BoxFuture<'static, ()>) {
    let wc = watcher::Config::default;
    let (listener_store, mut listener_triggers) =
        stores::reflect(scope.api::<SmtpListener>(client), wc(), 1);
    let (domain_store, mut domain_triggers) =
        stores::reflect(scope.api::<MailDomain>(client), wc(), 2);
    let (policy_store, mut policy_triggers) =
        stores::reflect(scope.api::<RelayPolicy>(client), wc(), 2);
    let (key_store, mut key_triggers) = stores::reflect(scope.api::<DkimKey>(client), wc(), 3);
    let (secret_store, mut secret_triggers) = stores::reflect(
        scope.api::<Secret>(client),
        wc().labels(&managed_selector()),
        2,
    );
    let stores = Stores {
        listeners: listener_store.clone(),
        domains: domain_store.clone(),
        relay_policies: policy_store.clone(),
        dkim_keys: key_store.clone(),
        secrets: secret_store,
    };
    let mut ctx = Context::new(client.clone(), stores.clone(), settings.dns_server);
    ctx.metrics = metrics.clone();
    ctx.mta_image = settings.mta_image.clone();
    let ctx = Arc::new(ctx);
    let managed = || wc().labels(&managed_selector());
    let listeners = Controller::for_stream(listener_triggers.remove(0), listener_store.clone())
        .owns(scope.api::<ConfigMap>(client), managed())
        .owns(scope.api::<StatefulSet>(client), managed())
        .owns(scope.api::<Service>(client), managed())
        .owns(scope.api::<PodDisruptionBudget>(client), managed())
        .owns(scope.api::<HorizontalPodAutoscaler>(client), managed())
        .watches_stream(
            domain_triggers.remove(0),
            near::<MailDomain>(&listener_store),
        )
        .watches_stream(key_triggers.remove(0), near::<DkimKey>(&listener_store))
        .watches_stream(
            policy_triggers.remove(0),
            near::<RelayPolicy>(&listener_store),
        )
        .watches_stream(secret_triggers.remove(0), near::<Secret>(&listener_store))
        .shutdown_on_signal()
        .run(
            reconcile::smtp_listener::reconcile,
            reconcile::error_policy,
            ctx.clone(),
        )
        .for_each(|_| async {});
    let keys = Controller::for_stream(key_triggers.remove(0), key_store)
        .watches_stream(secret_triggers.remove(0), owning_dkim_key)
        .shutdown_on_signal()
        .run(
            reconcile::dkim_key::reconcile,
            reconcile::error_policy,
            ctx.clone(),
        )
        .for_each(|_| async {});
    let signed_by = {
        let domains = domain_store.clone();
        move |key: DkimKey| domains_signed_by(&domains, &key)
    };
    let domains = Controller::for_stream(domain_triggers.remove(0), domain_store)
        .watches_stream(key_triggers.remove(0), signed_by)
        .shutdown_on_signal()
        .run(
            reconcile::mail_domain::reconcile,
            reconcile::error_policy,
            ctx.clone(),
        )
        .for_each(|_| async {});
    let policies = Controller::for_stream(policy_triggers.remove(0), policy_store)
        .shutdown_on_signal()
        .run(
            reconcile::relay_policy::reconcile,
            reconcile::error_policy,
            ctx,
        )
        .for_each(|_| async {});
    let all = async move {
        futures::join!(listeners, keys, domains, policies);
    };
    (stores, Box::pin(all))
}

/// A trigger mapper: an object of kind `K` concerns every SmtpListener in its namespace.
fn near<K: kube::Resource>(
    store: &Store<SmtpListener>,
) -> impl Fn(K) -> Vec<ObjectRef<SmtpListener>> + Send + Sync + 'static {
    let store = store.clone();
    move |o: K| listeners_near(&store, &o)
}

/// The MailDomains whose `dkimKeyRef` names `key` (their status says whether it signs).
fn domains_signed_by(store: &Store<MailDomain>, key: &DkimKey) -> Vec<ObjectRef<MailDomain>> {
    store
        .state()
        .iter()
        .filter(|d| {
            d.namespace() == key.namespace()
                && d.spec.dkim_key_ref.as_deref() == Some(key.name_any().as_str())
        })
        .map(|d| ObjectRef::from_obj(&**d))
        .collect()
}

/// The DkimKey that owns a key Secret, if any.
fn owning_dkim_key(secret: Secret) -> Option<ObjectRef<DkimKey>> {
    let owner = secret
        .owner_references()
        .iter()
        .find(|o| o.kind == "DkimKey" && o.controller == Some(true))?;
    let ns = secret.namespace()?;
    Some(ObjectRef::new(&owner.name).within(&ns))
}
