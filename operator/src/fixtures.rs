//! Test fixtures: an in-memory fake Kubernetes API server behind a `tower-test` mock
//! service (the kube-rs controller-rs pattern, made stateful so scenarios can reconcile
//! twice), and builders for the example resources.
//!
//! The fake understands exactly what the reconcilers send: GET/LIST (with
//! `labelSelector`), server-side-apply PATCH (deep merge, `/status` merges `.status`),
//! DELETE, and Event POSTs. Every mutating request is logged as `METHOD path`, which is
//! what the scenarios assert on.

use crate::context::Context;
use crate::render::World;
use crate::stores::TestWriters;
use http::{Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The fake API server's state, shared with the test.
#[derive(Clone, Default)]
pub struct FakeApi {
    /// Objects by `collection path/name`.
    pub objects: Arc<Mutex<BTreeMap<String, Value>>>,
    /// Mutating requests, as `METHOD path`.
    pub writes: Arc<Mutex<Vec<String>>>,
    /// When set, every PATCH fails with 500.
    pub fail_patches: Arc<AtomicBool>,
    /// When set, the API server does not serve `cert-manager.io`: everything there gets
    /// the router's plain-text `404 page not found` (no Status), as from a real API server
    /// without the CRD.
    pub without_cert_manager: Arc<AtomicBool>,
    next_uid: Arc<AtomicU64>,
    /// The reflector stores the context reads, refilled after every change (as the
    /// operator's watches would).
    writers: Arc<Mutex<Option<TestWriters>>>,
}

impl FakeApi {
    /// Starts the fake; returns a client talking to it and a context using that client.
    pub fn start() -> (Self, Arc<Context>) {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let fake = Self::default();
        let server = fake.clone();
        tokio::spawn(async move {
            while let Some((request, send)) = handle.next_request().await {
                let response = server.handle(request).await;
                send.send_response(response);
            }
        });
        let client = Client::new(service, "default");
        let (stores, writers) = TestWriters::new();
        *fake.writers.lock().unwrap() = Some(writers);
        let mut ctx = Context::new(client, stores, None);
        ctx.check_dns = false;
        (fake, Arc::new(ctx))
    }

    /// Refills the stores from the stored objects: the four kinds, and Secrets labelled
    /// as the operator's (what its Secret watch selects).
    fn refresh_stores(&self) {
        let mut world = World::default();
        for object in self.objects.lock().unwrap().values() {
            let managed = object["metadata"]["labels"]["app.kubernetes.io/managed-by"]
                == json!("petrel-operator");
            let typed = object.clone();
            match object["kind"].as_str().unwrap_or_default() {
                "SmtpListener" => world.listeners.push(serde_json::from_value(typed).unwrap()),
                "MailDomain" => world.domains.push(serde_json::from_value(typed).unwrap()),
                "RelayPolicy" => world
                    .relay_policies
                    .push(serde_json::from_value(typed).unwrap()),
                "DkimKey" => world.dkim_keys.push(serde_json::from_value(typed).unwrap()),
                "Secret" if managed => world.secrets.push(serde_json::from_value(typed).unwrap()),
                _ => {}
            }
        }
        if let Some(writers) = self.writers.lock().unwrap().as_mut() {
            writers.replace(&world);
        }
    }

    /// Stores `object` at the path its apiVersion/kind/namespace/name imply.
    pub fn seed(&self, mut object: Value) {
        let path = object_path(&object);
        if object["metadata"]["uid"].is_null() {
            object["metadata"]["uid"] =
                format!("uid-{}", self.next_uid.fetch_add(1, Ordering::SeqCst)).into();
        }
        self.objects.lock().unwrap().insert(path, object);
        self.refresh_stores();
    }

    /// The stored object at `path` (e.g. `/api/v1/namespaces/mail/configmaps/mx-config`).
    pub fn get(&self, path: &str) -> Option<Value> {
        self.objects.lock().unwrap().get(path).cloned()
    }

    /// Takes the write log.
    pub fn take_writes(&self) -> Vec<String> {
        std::mem::take(&mut *self.writes.lock().unwrap())
    }

    async fn handle(&self, request: Request<Body>) -> Response<Body> {
        let method = request.method().clone();
        let uri = request.uri().clone();
        let path = uri.path().to_owned();
        let query = uri.query().unwrap_or_default().to_owned();
        let body = request.into_body().collect_bytes().await.unwrap();
        let body: Value = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&body).unwrap()
        };
        let (key, subresource) = match path.strip_suffix("/status") {
            Some(p) => (p.to_owned(), true),
            None => (path.clone(), false),
        };
        let segments = key.trim_start_matches('/').split('/').count();
        let collection = (key.starts_with("/api/") && segments == 5)
            || (key.starts_with("/apis/") && segments == 6);
        if key.starts_with("/apis/cert-manager.io/")
            && self.without_cert_manager.load(Ordering::SeqCst)
        {
            if method == "PATCH" {
                self.writes.lock().unwrap().push(format!("PATCH {path}"));
            }
            return Response::builder()
                .status(StatusCode::NOT_FOUND)
                .header("content-type", "text/plain; charset=utf-8")
                .body(Body::from(b"404 page not found\n".to_vec()))
                .unwrap();
        }
        match method.as_str() {
            "GET" if collection => self.list(&key, &query),
            "GET" => match self.get(&key) {
                Some(o) => reply(StatusCode::OK, &o),
                None => not_found(),
            },
            "POST" => {
                self.writes.lock().unwrap().push(format!("POST {key}"));
                reply(StatusCode::CREATED, &body)
            }
            "PATCH" => {
                self.writes.lock().unwrap().push(format!("PATCH {path}"));
                if self.fail_patches.load(Ordering::SeqCst) {
                    return reply(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        &status_json(500, "InternalError", "injected failure"),
                    );
                }
                let mut objects = self.objects.lock().unwrap();
                let stored = objects.entry(key).or_insert_with(|| {
                    json!({"metadata": {"uid": format!("uid-{}", self.next_uid.fetch_add(1, Ordering::SeqCst))}})
                });
                if subresource {
                    merge(&mut stored["status"], &body["status"]);
                } else {
                    let mut body = body.clone();
                    if let Some(m) = body.as_object_mut() {
                        m.remove("status");
                    }
                    merge(stored, &body);
                }
                let response = reply(StatusCode::OK, stored);
                drop(objects);
                self.refresh_stores();
                response
            }
            "DELETE" => {
                self.writes.lock().unwrap().push(format!("DELETE {key}"));
                let removed = self.objects.lock().unwrap().remove(&key);
                self.refresh_stores();
                match removed {
                    Some(o) => reply(StatusCode::OK, &o),
                    None => not_found(),
                }
            }
            _ => reply(
                StatusCode::METHOD_NOT_ALLOWED,
                &status_json(405, "MethodNotAllowed", ""),
            ),
        }
    }

    fn list(&self, collection: &str, query: &str) -> Response<Body> {
        let selector: Vec<(String, String)> = query
            .split('&')
            .filter_map(|kv| kv.strip_prefix("labelSelector="))
            .flat_map(|s| {
                percent_decode(s)
                    .split(',')
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .filter_map(|kv| {
                kv.split_once('=')
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
            })
            .collect();
        let prefix = format!("{collection}/");
        let items: Vec<Value> = self
            .objects
            .lock()
            .unwrap()
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix) && !k[prefix.len()..].contains('/'))
            .map(|(_, v)| v.clone())
            .filter(|o| {
                selector
                    .iter()
                    .all(|(k, v)| o["metadata"]["labels"][k] == json!(v))
            })
            .collect();
        reply(
            StatusCode::OK,
            &json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": "1"}, "items": items}),
        )
    }
}

fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                merge(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (t, p) => *t = p.clone(),
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
            i += 3;
        } else {
            out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

fn status_json(code: u16, reason: &str, message: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure", "reason": reason, "code": code, "message": message})
}

fn not_found() -> Response<Body> {
    reply(
        StatusCode::NOT_FOUND,
        &status_json(404, "NotFound", "not found"),
    )
}

fn reply(status: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(body).unwrap()))
        .unwrap()
}

/// Collection path + name of a typed object.
pub fn object_path(object: &Value) -> String {
    let api_version = object["apiVersion"].as_str().unwrap();
    let kind = object["kind"].as_str().unwrap();
    let ns = object["metadata"]["namespace"].as_str().unwrap();
    let name = object["metadata"]["name"].as_str().unwrap();
    let plural = match kind {
        "SmtpListener" => "smtplisteners".to_owned(),
        "MailDomain" => "maildomains".to_owned(),
        "RelayPolicy" => "relaypolicies".to_owned(),
        "DkimKey" => "dkimkeys".to_owned(),
        other => format!("{}s", other.to_lowercase()),
    };
    let base = if api_version.contains('/') {
        format!("/apis/{api_version}")
    } else {
        format!("/api/{api_version}")
    };
    format!("{base}/namespaces/{ns}/{plural}/{name}")
}

/// The example resources, as JSON with generation 1 (the fake assigns uids).
pub fn examples() -> Vec<Value> {
    let repo = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../manifests/examples");
    let mut out = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(repo)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for file in files {
        let docs: Vec<Value> =
            serde_saphyr::from_multiple(&std::fs::read_to_string(file).unwrap()).unwrap();
        for mut doc in docs {
            doc["metadata"]["generation"] = json!(1);
            out.push(doc);
        }
    }
    out
}
