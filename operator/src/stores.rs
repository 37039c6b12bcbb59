//! The operator's view of the cluster: one reflector store per kind it reads (the four
//! Petrel kinds and the Secrets it manages), kept current by one watch each, and the
//! trigger streams fanned out from those same watches.
//!
//! Reconcilers build their [`World`] from these stores ([`Stores::world`]) instead of
//! listing on every reconcile. Because each trigger is emitted only after its reflector
//! has written the object into the store, a reconcile triggered by a change always sees
//! that change. A watch is consumed by one task that forwards every touched object
//! (applied or deleted) to each consumer, so the SmtpListener controller and the kind's
//! own controller share one watch instead of opening two.
//!
//! Owns no Kubernetes writes and no reconcile logic.

use crate::render::{World, labels};
use crds::{DkimKey, MailDomain, RelayPolicy, SmtpListener};
use futures::SinkExt;
use futures::channel::mpsc;
use futures::{Stream, StreamExt};
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::reflector::{self, Store, store::Writer};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use std::fmt::Debug;

/// Which objects one set of controllers sees: the whole cluster, or one namespace (the
/// namespaced mode, for users who grant Roles in chosen namespaces only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Every namespace (needs a ClusterRole).
    Cluster,
    /// One namespace (a Role there is enough).
    Namespace(String),
}

impl Scope {
    /// An `Api` for a namespaced kind within this scope.
    pub fn api<K>(&self, client: &Client) -> Api<K>
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>,
    {
        match self {
            Self::Cluster => Api::all(client.clone()),
            Self::Namespace(ns) => Api::namespaced(client.clone(), ns),
        }
    }

    /// The scopes for a `PETREL_WATCH_NAMESPACES`-style list: empty means the cluster.
    pub fn from_namespaces(namespaces: &[String]) -> Vec<Self> {
        let mut names: Vec<&String> = namespaces.iter().filter(|n| !n.is_empty()).collect();
        names.sort();
        names.dedup();
        if names.is_empty() {
            vec![Self::Cluster]
        } else {
            names.into_iter().cloned().map(Self::Namespace).collect()
        }
    }
}

/// The label selector of the Secrets this operator made (the only ones it reads in bulk).
pub fn managed_selector() -> String {
    format!("{}={}", labels::MANAGED_BY, labels::MANAGER)
}

/// Reflector stores of everything the reconcilers read.
#[derive(Clone)]
pub struct Stores {
    /// SmtpListeners.
    pub listeners: Store<SmtpListener>,
    /// MailDomains.
    pub domains: Store<MailDomain>,
    /// RelayPolicies.
    pub relay_policies: Store<RelayPolicy>,
    /// DkimKeys.
    pub dkim_keys: Store<DkimKey>,
    /// Secrets labelled as made by this operator.
    pub secrets: Store<Secret>,
}

fn in_namespace<K: Resource<DynamicType = ()> + Clone>(
    store: &Store<K>,
    namespace: &str,
) -> Vec<K> {
    store
        .state()
        .iter()
        .filter(|o| o.meta().namespace.as_deref() == Some(namespace))
        .map(|o| (**o).clone())
        .collect()
}

impl Stores {
    /// The Petrel resources of `namespace` and the Secrets this operator made there.
    pub fn world(&self, namespace: &str) -> World {
        let mut world = World {
            listeners: in_namespace(&self.listeners, namespace),
            domains: in_namespace(&self.domains, namespace),
            relay_policies: in_namespace(&self.relay_policies, namespace),
            dkim_keys: in_namespace(&self.dkim_keys, namespace),
            secrets: in_namespace(&self.secrets, namespace),
            mta_image: None,
            now: None,
            statefulset_replicas: Default::default(),
            volume_drains: Default::default(),
        };
        world.sort();
        world
    }

    /// Whether every store has been filled by its first complete list.
    pub async fn wait_until_ready(&self) -> bool {
        self.listeners.wait_until_ready().await.is_ok()
            && self.domains.wait_until_ready().await.is_ok()
            && self.relay_policies.wait_until_ready().await.is_ok()
            && self.dkim_keys.wait_until_ready().await.is_ok()
            && self.secrets.wait_until_ready().await.is_ok()
    }
}

/// A trigger stream for `Controller::for_stream` / `watches_stream`.
pub type Trigger<K> = mpsc::Receiver<Result<K, watcher::Error>>;

/// Starts one watch of `api`, reflected into a store, and returns the store with
/// `consumers` trigger streams that each see every applied or deleted object.
pub fn reflect<K>(
    api: Api<K>,
    config: watcher::Config,
    consumers: usize,
) -> (Store<K>, Vec<Trigger<K>>)
where
    K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
{
    let writer: Writer<K> = Writer::default();
    let store = writer.as_reader();
    let (senders, triggers): (Vec<_>, Vec<_>) = (0..consumers)
        .map(|_| {
            let (tx, rx) = mpsc::channel(256);
            (tx, rx)
        })
        .unzip();
    let touched =
        reflector::reflector(writer, watcher(api, config).default_backoff()).touched_objects();
    tokio::spawn(fan_out(touched, senders));
    (store, triggers)
}

async fn fan_out<K: Clone + Debug>(
    stream: impl Stream<Item = Result<K, watcher::Error>>,
    mut senders: Vec<mpsc::Sender<Result<K, watcher::Error>>>,
) {
    let mut stream = std::pin::pin!(stream);
    while let Some(item) = stream.next().await {
        match item {
            Ok(object) => {
                for tx in &mut senders {
                    // A consumer that has gone (shutdown) just stops receiving.
                    let _ = tx.send(Ok(object.clone())).await;
                }
            }
            // The watcher retries with backoff by itself; the error is only worth a line.
            Err(e) => tracing::warn!(error = %e, "watch failed; retrying"),
        }
    }
}

/// Every SmtpListener in the namespace of `obj` (each one serves all of its domains).
pub fn listeners_near<K: Resource>(
    store: &Store<SmtpListener>,
    obj: &K,
) -> Vec<reflector::ObjectRef<SmtpListener>> {
    let ns = obj.meta().namespace.clone();
    store
        .state()
        .iter()
        .filter(|l| l.namespace() == ns)
        .map(|l| reflector::ObjectRef::from_obj(&**l))
        .collect()
}

/// Stores filled by hand, for tests: every [`Stores`] field with the writer behind it.
#[cfg(test)]
pub struct TestWriters {
    listeners: Writer<SmtpListener>,
    domains: Writer<MailDomain>,
    relay_policies: Writer<RelayPolicy>,
    dkim_keys: Writer<DkimKey>,
    secrets: Writer<Secret>,
}

#[cfg(test)]
impl TestWriters {
    /// Empty stores and their writers.
    pub fn new() -> (Stores, Self) {
        let writers = Self {
            listeners: Writer::default(),
            domains: Writer::default(),
            relay_policies: Writer::default(),
            dkim_keys: Writer::default(),
            secrets: Writer::default(),
        };
        let stores = Stores {
            listeners: writers.listeners.as_reader(),
            domains: writers.domains.as_reader(),
            relay_policies: writers.relay_policies.as_reader(),
            dkim_keys: writers.dkim_keys.as_reader(),
            secrets: writers.secrets.as_reader(),
        };
        (stores, writers)
    }

    /// Replaces every store's content with `world` (as a fresh list would).
    pub fn replace(&mut self, world: &World) {
        fn fill<K: Resource<DynamicType = ()> + Clone>(writer: &mut Writer<K>, items: &[K]) {
            writer.apply_watcher_event(&watcher::Event::Init);
            for item in items {
                writer.apply_watcher_event(&watcher::Event::InitApply(item.clone()));
            }
            writer.apply_watcher_event(&watcher::Event::InitDone);
        }
        fill(&mut self.listeners, &world.listeners);
        fill(&mut self.domains, &world.domains);
        fill(&mut self.relay_policies, &world.relay_policies);
        fill(&mut self.dkim_keys, &world.dkim_keys);
        fill(&mut self.secrets, &world.secrets);
    }
}
