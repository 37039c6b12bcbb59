//! The hand-over of one queued message from a draining MTA to a peer: the body of
//! `POST /admin/handoff` ([`Request`]: origin, envelope, base64 content), its answers, and
//! the client that sends it ([`Client`]).
//!
//! Why a dedicated HTTP endpoint rather than an SMTP extension between peers: SMTP carries
//! a sender, recipients and a few parameters per transaction, but none of the queue state
//! that must travel (each recipient's status and last answer, attempts, next attempt,
//! expiry, hold, a delay notice already sent), so an extension would need new verbs for
//! each, and the peer would have to tell a hand-over from new mail to skip checks, trace
//! headers and signing. A JSON body carries the spool's envelope field by field, and the
//! port and the fleet token already exist for the operator's `/admin/drain`.
//!
//! Every field of [`Envelope`] is named in [`WireEnvelope::from_envelope`] and
//! [`WireEnvelope::into_envelope`] (by destructuring), so a field added to the spool
//! format does not compile until the hand-over carries it. Unknown fields are refused
//! (400): a receiver older than its sender keeps nothing rather than a message without a
//! field it did not understand; the sender keeps the message.
//!
//! An [`Outcome`] is definitive (stored, already there, refused with nothing stored,
//! nothing sent) or [`Outcome::Unknown`]: the request may have reached the peer (a timeout,
//! a connection lost before the answer, a 500). The sender must not offer such a message
//! to another peer: only the one that may have it can say whether it does.
//!
//! Never: logs message content; follows a redirect; sends without the fleet token.

use crate::queue::{BodyType, DsnNotify, DsnReturn, Envelope, HandoffOrigin, Recipient, Status};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

/// The path peers serve hand-overs on.
pub const PATH: &str = "/admin/handoff";

/// The wire format's version; a receiver refuses others (400).
pub const VERSION: u32 = 1;

/// Connecting to a peer (a peer that is gone fails fast on a refused connection; this
/// bounds one that does not answer at all).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// From the request's first byte to the answer: the peer stores and syncs the message and
/// its origin before it answers.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Largest answer read.
const MAX_ANSWER: usize = 64 * 1024;

/// `POST /admin/handoff`: one message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub version: u32,
    /// Where the message is queued now: the sender's pod, spool and queue id.
    pub origin: HandoffOrigin,
    pub envelope: WireEnvelope,
    /// The message as stored (our trace header and signature included), base64.
    pub content: String,
}

/// The envelope as it travels: everything the spool record holds about the message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireEnvelope {
    /// Reverse path; empty for the null sender.
    pub sender: String,
    pub recipients: Vec<WireRecipient>,
    /// `SIZE=` as the client announced it (0 when absent).
    pub size: u64,
    /// `BODY=` (`seven_bit` or `eight_bit_mime`).
    pub body: BodyType,
    /// `SMTPUTF8` was given.
    pub smtputf8: bool,
    /// DSN `RET=` (`full` or `headers`).
    pub dsn_ret: Option<DsnReturn>,
    /// DSN `ENVID=`.
    pub dsn_envid: Option<String>,
    /// `REQUIRETLS` (RFC 8689).
    pub require_tls: bool,
    /// The client that first sent the message, and its EHLO name.
    pub client_ip: IpAddr,
    pub helo: String,
    /// Arrival at the first MTA, seconds since the epoch.
    pub received_at: u64,
    /// Delivery attempts so far.
    pub attempts: u32,
    /// Next attempt, seconds since the epoch (0: as soon as possible).
    pub next_attempt_at: u64,
    /// When the message expires (bounced as undeliverable), seconds since the epoch.
    pub expires_at: u64,
    /// On hold by an operator: stays on hold at the peer.
    pub held: bool,
    /// A delay notice was sent already.
    pub delay_notified: bool,
    /// W3C `traceparent` of the message's trace.
    pub trace_parent: Option<String>,
}

/// One recipient as it travels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireRecipient {
    pub address: String,
    /// DSN `NOTIFY=`; absent when the client did not say.
    pub notify: Option<DsnNotify>,
    /// DSN `ORCPT=` (decoded).
    pub orcpt: Option<String>,
    /// Where this recipient stands: `scheduled`, `deferred` (with the last answer),
    /// `delivered` or `failed` (final: not attempted again).
    pub status: Status,
    /// The host that gave the last answer.
    pub remote_mta: Option<String>,
}

impl WireEnvelope {
    /// The wire form of `envelope`, which expires at `expires_at`. The hand-over's own
    /// fields (`handoff_origin`, `handoff_peer`) stay behind: the peer records the new
    /// origin itself.
    pub fn from_envelope(envelope: &Envelope, expires_at: u64) -> WireEnvelope {
        let Envelope {
            sender,
            recipients,
            declared_size,
            body,
            smtputf8,
            dsn_ret,
            dsn_envid,
            client_ip,
            helo,
            received_at,
            attempts,
            next_attempt_at,
            held,
            delay_notified,
            require_tls,
            trace_parent,
            expires_at: _,
            handoff_origin: _,
            handoff_peer: _,
            handoff_peer_spool: _,
        } = envelope;
        WireEnvelope {
            sender: sender.clone(),
            recipients: recipients
                .iter()
                .map(WireRecipient::from_recipient)
                .collect(),
            size: *declared_size,
            body: *body,
            smtputf8: *smtputf8,
            dsn_ret: *dsn_ret,
            dsn_envid: dsn_envid.clone(),
            require_tls: *require_tls,
            client_ip: *client_ip,
            helo: helo.clone(),
            received_at: *received_at,
            attempts: *attempts,
            next_attempt_at: *next_attempt_at,
            expires_at,
            held: *held,
            delay_notified: *delay_notified,
            trace_parent: trace_parent.clone(),
        }
    }

    /// The envelope the receiving spool stores: everything as the sender had it, plus the
    /// origin it came from.
    pub fn into_envelope(self, origin: HandoffOrigin) -> Envelope {
        let WireEnvelope {
            sender,
            recipients,
            size,
            body,
            smtputf8,
            dsn_ret,
            dsn_envid,
            require_tls,
            client_ip,
            helo,
            received_at,
            attempts,
            next_attempt_at,
            expires_at,
            held,
            delay_notified,
            trace_parent,
        } = self;
        Envelope {
            sender,
            recipients: recipients
                .into_iter()
                .map(WireRecipient::into_recipient)
                .collect(),
            declared_size: size,
            body,
            smtputf8,
            dsn_ret,
            dsn_envid,
            client_ip,
            helo,
            received_at,
            attempts,
            next_attempt_at,
            held,
            delay_notified,
            require_tls,
            trace_parent,
            expires_at: Some(expires_at),
            handoff_origin: Some(origin),
            handoff_peer: None,
            handoff_peer_spool: None,
        }
    }
}

impl WireRecipient {
    fn from_recipient(recipient: &Recipient) -> WireRecipient {
        let Recipient {
            address,
            notify,
            orcpt,
            status,
            remote_mta,
        } = recipient;
        WireRecipient {
            address: address.clone(),
            notify: *notify,
            orcpt: orcpt.clone(),
            status: status.clone(),
            remote_mta: remote_mta.clone(),
        }
    }

    fn into_recipient(self) -> Recipient {
        let WireRecipient {
            address,
            notify,
            orcpt,
            status,
            remote_mta,
        } = self;
        Recipient {
            address,
            notify,
            orcpt,
            status,
            remote_mta,
        }
    }
}

impl Request {
    pub fn new(
        origin: HandoffOrigin,
        envelope: &Envelope,
        expires_at: u64,
        content: &[u8],
    ) -> Request {
        Request {
            version: VERSION,
            origin,
            envelope: WireEnvelope::from_envelope(envelope, expires_at),
            content: BASE64.encode(content),
        }
    }

    /// Checks what a receiver must not take on trust, and returns the origin, the envelope
    /// to store and the content.
    pub fn open(self) -> Result<(HandoffOrigin, Envelope, Vec<u8>), String> {
        if self.version != VERSION {
            return Err(format!(
                "hand-over version {} (this MTA speaks {VERSION})",
                self.version
            ));
        }
        check_origin(&self.origin)?;
        if self.envelope.recipients.is_empty() {
            return Err("no recipients".into());
        }
        let content = BASE64
            .decode(self.content.as_bytes())
            .map_err(|e| format!("content is not base64: {e}"))?;
        let origin = self.origin.clone();
        Ok((origin, self.envelope.into_envelope(self.origin), content))
    }
}

/// Origin fields go into the origins log and the logs: short, printable, no line breaks.
fn check_origin(origin: &HandoffOrigin) -> Result<(), String> {
    for (name, value) in [
        ("pod", &origin.pod),
        ("spool", &origin.spool),
        ("id", &origin.id),
    ] {
        if value.is_empty() || value.len() > 253 || value.chars().any(char::is_control) {
            return Err(format!(
                "origin.{name} must be 1 to 253 printable characters"
            ));
        }
    }
    Ok(())
}

/// The `200` answer to a hand-over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    /// Stored now (durably).
    pub stored: bool,
    /// Not stored because it was stored here before (a resend).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
}

/// What became of one offer of a message to one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The peer stored it: it is the peer's now.
    Stored,
    /// The peer had stored it before: it is the peer's.
    Duplicate,
    /// The request did not leave (no connection, or the connection closed before it was
    /// written): the peer does not have it from this offer.
    NotSent(String),
    /// The peer answered that it did not store it (draining `409`, full `503`, a request
    /// it refused): free to offer elsewhere.
    Refused { status: u16, detail: String },
    /// The peer may or may not have it (timeout, connection lost before the answer, `500`,
    /// an answer that cannot be read): offer it to this peer again, and to no other.
    Unknown(String),
}

/// Sends hand-overs, keeping one open connection per peer.
pub struct Client {
    token: String,
    connections: HashMap<String, SendRequest<Full<Bytes>>>,
}

impl Client {
    /// A client authenticating with the fleet `token`.
    pub fn new(token: impl Into<String>) -> Client {
        Client {
            token: token.into(),
            connections: HashMap::new(),
        }
    }

    /// Makes sure there is an open connection to `peer` (`host:port`).
    pub async fn connect(&mut self, peer: &str) -> Result<(), String> {
        if let Some(sender) = self.connections.get_mut(peer) {
            if !sender.is_closed()
                && tokio::time::timeout(CONNECT_TIMEOUT, sender.ready())
                    .await
                    .is_ok_and(|ready| ready.is_ok())
            {
                return Ok(());
            }
            self.connections.remove(peer);
        }
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(peer))
            .await
            .map_err(|_| format!("{peer}: no connection within {CONNECT_TIMEOUT:?}"))?
            .map_err(|e| format!("{peer}: {e}"))?;
        let _ = stream.set_nodelay(true);
        let (sender, connection) =
            hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream))
                .await
                .map_err(|e| format!("{peer}: {e}"))?;
        // Ends when the connection closes or its sender is dropped.
        tokio::spawn(async move {
            let _ = connection.await;
        });
        self.connections.insert(peer.to_owned(), sender);
        Ok(())
    }

    /// The spool identity `peer` reports (`GET /admin/drain`), over the connection
    /// [`Client::connect`] opened: what recognises that peer at another address.
    pub async fn identity(&mut self, peer: &str) -> Result<String, String> {
        let Some(sender) = self.connections.get_mut(peer) else {
            return Err(format!("{peer}: not connected"));
        };
        let request = http::Request::get(super::http::DRAIN_PATH)
            .header(http::header::HOST, peer)
            .header(http::header::USER_AGENT, "petrel-mta")
            .header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", self.token),
            )
            .body(Full::new(Bytes::new()))
            .map_err(|e| format!("{peer}: request: {e}"))?;
        // Err(true): the connection is not to be trusted again; Err(false): it answered.
        let asked = async {
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| (true, e.to_string()))?;
            let status = response.status();
            let body = Limited::new(response.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| (true, e.to_string()))?
                .to_bytes();
            if !status.is_success() {
                return Err((false, format!("HTTP {status}")));
            }
            let report: serde_json::Value =
                serde_json::from_slice(&body).map_err(|e| (false, e.to_string()))?;
            report["spool"]
                .as_str()
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .ok_or_else(|| (false, "no spool identity in its drain report".to_owned()))
        };
        let (broken, why) = match tokio::time::timeout(CONNECT_TIMEOUT, asked).await {
            Ok(Ok(spool)) => return Ok(spool),
            Ok(Err(failure)) => failure,
            Err(_) => (true, format!("no answer within {CONNECT_TIMEOUT:?}")),
        };
        if broken {
            self.connections.remove(peer);
        }
        Err(format!("{peer}: {why}"))
    }

    /// Offers `body` (a serialised [`Request`]) to `peer`, over the connection
    /// [`Client::connect`] opened.
    pub async fn send(&mut self, peer: &str, body: Bytes) -> Outcome {
        let Some(sender) = self.connections.get_mut(peer) else {
            return Outcome::NotSent(format!("{peer}: not connected"));
        };
        let request = match http::Request::post(PATH)
            .header(http::header::HOST, peer)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::USER_AGENT, "petrel-mta")
            .header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", self.token),
            )
            .body(Full::new(body))
        {
            Ok(request) => request,
            Err(e) => return Outcome::NotSent(format!("{peer}: request: {e}")),
        };
        let outcome =
            match tokio::time::timeout(REQUEST_TIMEOUT, exchange(sender.try_send_request(request)))
                .await
            {
                Ok(outcome) => outcome,
                Err(_) => Outcome::Unknown(format!("no answer within {REQUEST_TIMEOUT:?}")),
            };
        match outcome {
            Outcome::Stored | Outcome::Duplicate | Outcome::Refused { .. } => {}
            // Whatever state that connection is in, it is not trusted again.
            Outcome::NotSent(_) | Outcome::Unknown(_) => {
                self.connections.remove(peer);
            }
        }
        match outcome {
            Outcome::NotSent(why) => Outcome::NotSent(format!("{peer}: {why}")),
            Outcome::Unknown(why) => Outcome::Unknown(format!("{peer}: {why}")),
            Outcome::Refused { status, detail } => Outcome::Refused {
                status,
                detail: format!("{peer}: {detail}"),
            },
            done => done,
        }
    }
}

type Sent = Result<
    http::Response<hyper::body::Incoming>,
    hyper::client::conn::TrySendError<http::Request<Full<Bytes>>>,
>;

/// Reads the answer to one request and classifies it.
async fn exchange(sent: impl Future<Output = Sent>) -> Outcome {
    let response = match sent.await {
        Ok(response) => response,
        // Handed back unsent: the connection closed before the request was written.
        Err(e) if e.message().is_some() => {
            return Outcome::NotSent(format!("connection closed: {}", e.error()));
        }
        Err(e) => return Outcome::Unknown(e.error().to_string()),
    };
    let status = response.status();
    let body = match Limited::new(response.into_body(), MAX_ANSWER)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(e) if status == http::StatusCode::OK => {
            return Outcome::Unknown(format!("answer unreadable: {e}"));
        }
        Err(_) => Bytes::new(),
    };
    classify(status, &body)
}

/// The outcome an answer means. Only what the receiver answers when it stored nothing
/// (see `drain::http`) is [`Outcome::Refused`]; any other status may hide a store.
fn classify(status: http::StatusCode, body: &[u8]) -> Outcome {
    use http::StatusCode as S;
    let detail = || {
        let text = serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned());
        format!("{status}: {text}")
    };
    match status {
        S::OK => match serde_json::from_slice::<Answer>(body) {
            Ok(Answer { stored: true, .. }) => Outcome::Stored,
            Ok(Answer {
                stored: false,
                duplicate: true,
            }) => Outcome::Duplicate,
            _ => Outcome::Unknown(format!("unexpected answer {}", detail())),
        },
        S::BAD_REQUEST
        | S::UNAUTHORIZED
        | S::NOT_FOUND
        | S::CONFLICT
        | S::PAYLOAD_TOO_LARGE
        | S::UNSUPPORTED_MEDIA_TYPE
        | S::SERVICE_UNAVAILABLE => Outcome::Refused {
            status: status.as_u16(),
            detail: detail(),
        },
        _ => Outcome::Unknown(detail()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::Diagnostic;

    /// An envelope with every field set to something other than its default.
    fn full_envelope() -> Envelope {
        Envelope {
            sender: "älice@sender.test".into(),
            recipients: vec![
                Recipient {
                    address: "bob@remote.test".into(),
                    notify: Some(DsnNotify {
                        success: true,
                        failure: false,
                        delay: true,
                    }),
                    orcpt: Some("Bob@Remote.test".into()),
                    status: Status::Deferred(Diagnostic::new(451, [4, 3, 0], "try later")),
                    remote_mta: Some("mx1.remote.test".into()),
                },
                Recipient {
                    address: "carol@remote.test".into(),
                    notify: None,
                    orcpt: None,
                    status: Status::Delivered(Diagnostic::new(250, [2, 0, 0], "ok")),
                    remote_mta: None,
                },
                Recipient {
                    address: "dave@remote.test".into(),
                    notify: Some(DsnNotify::default()),
                    orcpt: None,
                    status: Status::Failed(Diagnostic::new(550, [5, 1, 1], "unknown")),
                    remote_mta: Some("mx2.remote.test".into()),
                },
                Recipient::new("erin@remote.test"),
            ],
            declared_size: 12345,
            body: BodyType::EightBitMime,
            smtputf8: true,
            dsn_ret: Some(DsnReturn::Headers),
            dsn_envid: Some("env-42".into()),
            client_ip: "2001:db8::7".parse().expect("ip"),
            helo: "client.sender.test".into(),
            received_at: 1_795_000_000,
            attempts: 7,
            next_attempt_at: 1_795_003_600,
            held: true,
            delay_notified: true,
            require_tls: true,
            trace_parent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
            expires_at: None,
            handoff_origin: None,
            handoff_peer: Some("10.0.0.5:8080".into()),
            handoff_peer_spool: Some("spool-of-10.0.0.5".into()),
        }
    }

    fn origin() -> HandoffOrigin {
        HandoffOrigin {
            pod: "mx-2".into(),
            spool: "5f0c1d".into(),
            id: "00061A2B3C4D5E6F".into(),
        }
    }

    #[test]
    fn every_envelope_field_survives_the_trip() {
        let envelope = full_envelope();
        let content = b"Received: from x\r\nSubject: \xc3\xa9\r\n\r\nbody\x00\xff\r\n";
        let request = Request::new(origin(), &envelope, 1_795_432_000, content);
        let json = serde_json::to_string(&request).expect("serialise");
        let back: Request = serde_json::from_str(&json).expect("deserialise");
        assert_eq!(back, request);
        let (got_origin, stored, got_content) = back.open().expect("valid");
        assert_eq!(got_origin, origin());
        assert_eq!(got_content, content);
        let expected = Envelope {
            expires_at: Some(1_795_432_000),
            handoff_origin: Some(origin()),
            handoff_peer: None,
            handoff_peer_spool: None,
            ..envelope
        };
        assert_eq!(stored, expected);
    }

    #[test]
    fn the_wire_form_is_stable() {
        let request = Request::new(origin(), &full_envelope(), 1_795_432_000, b"hi");
        let value = serde_json::to_value(&request).expect("value");
        let expected = serde_json::json!({
            "version": 1,
            "origin": {"pod": "mx-2", "spool": "5f0c1d", "id": "00061A2B3C4D5E6F"},
            "envelope": {
                "sender": "älice@sender.test",
                "recipients": [
                    {"address": "bob@remote.test",
                     "notify": {"success": true, "failure": false, "delay": true},
                     "orcpt": "Bob@Remote.test",
                     "status": {"state": "deferred", "detail": "451 4.3.0 try later",
                                "code": 451, "enhanced": "4.3.0", "text": "try later"},
                     "remote_mta": "mx1.remote.test"},
                    {"address": "carol@remote.test", "notify": null, "orcpt": null,
                     "status": {"state": "delivered", "detail": "250 2.0.0 ok",
                                "code": 250, "enhanced": "2.0.0", "text": "ok"},
                     "remote_mta": null},
                    {"address": "dave@remote.test",
                     "notify": {"success": false, "failure": false, "delay": false},
                     "orcpt": null,
                     "status": {"state": "failed", "detail": "550 5.1.1 unknown",
                                "code": 550, "enhanced": "5.1.1", "text": "unknown"},
                     "remote_mta": "mx2.remote.test"},
                    {"address": "erin@remote.test", "notify": null, "orcpt": null,
                     "status": {"state": "scheduled"}, "remote_mta": null}
                ],
                "size": 12345,
                "body": "eight_bit_mime",
                "smtputf8": true,
                "dsn_ret": "headers",
                "dsn_envid": "env-42",
                "require_tls": true,
                "client_ip": "2001:db8::7",
                "helo": "client.sender.test",
                "received_at": 1_795_000_000u64,
                "attempts": 7,
                "next_attempt_at": 1_795_003_600u64,
                "expires_at": 1_795_432_000u64,
                "held": true,
                "delay_notified": true,
                "trace_parent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
            },
            "content": "aGk="
        });
        assert_eq!(value, expected);
    }

    #[test]
    fn requests_a_receiver_must_refuse() {
        let good =
            serde_json::to_value(Request::new(origin(), &full_envelope(), 1, b"x")).expect("value");
        let edit = |f: &dyn Fn(&mut serde_json::Value)| {
            let mut v = good.clone();
            f(&mut v);
            v
        };
        let cases: Vec<(&str, serde_json::Value)> = vec![
            (
                "unknown field",
                edit(&|v| v["envelope"]["priority"] = 1.into()),
            ),
            (
                "unknown recipient field",
                edit(&|v| v["envelope"]["recipients"][0]["x"] = 1.into()),
            ),
            (
                "missing field",
                edit(&|v| {
                    v["envelope"]
                        .as_object_mut()
                        .expect("object")
                        .remove("expires_at");
                }),
            ),
            ("version", edit(&|v| v["version"] = 2.into())),
            ("empty origin id", edit(&|v| v["origin"]["id"] = "".into())),
            (
                "line break in pod",
                edit(&|v| v["origin"]["pod"] = "a\nb".into()),
            ),
            (
                "no recipients",
                edit(&|v| v["envelope"]["recipients"] = serde_json::json!([])),
            ),
            ("bad base64", edit(&|v| v["content"] = "!!".into())),
        ];
        for (what, value) in cases {
            let refused = serde_json::from_value::<Request>(value)
                .map_err(|e| e.to_string())
                .and_then(Request::open);
            assert!(refused.is_err(), "{what}");
        }
        let accepted = serde_json::from_value::<Request>(good).expect("good");
        assert!(accepted.open().is_ok());
    }

    #[test]
    fn answers_are_classified_by_what_the_peer_may_have() {
        use http::StatusCode as S;
        let cases: &[(S, &str, &str)] = &[
            (S::OK, r#"{"stored":true}"#, "stored"),
            (S::OK, r#"{"stored":false,"duplicate":true}"#, "duplicate"),
            (S::OK, r#"{"stored":false}"#, "unknown"),
            (S::OK, "<html>", "unknown"),
            (S::CONFLICT, r#"{"error":"draining"}"#, "refused"),
            (
                S::SERVICE_UNAVAILABLE,
                r#"{"error":"spool volume is full"}"#,
                "refused",
            ),
            (S::BAD_REQUEST, "", "refused"),
            (S::UNAUTHORIZED, "", "refused"),
            (S::NOT_FOUND, "", "refused"),
            (S::PAYLOAD_TOO_LARGE, "", "refused"),
            (S::INTERNAL_SERVER_ERROR, "", "unknown"),
            (S::BAD_GATEWAY, "", "unknown"),
            (S::GATEWAY_TIMEOUT, "", "unknown"),
            (S::MOVED_PERMANENTLY, "", "unknown"),
        ];
        for (status, body, expected) in cases {
            let got = match classify(*status, body.as_bytes()) {
                Outcome::Stored => "stored",
                Outcome::Duplicate => "duplicate",
                Outcome::Refused { .. } => "refused",
                Outcome::Unknown(_) => "unknown",
                Outcome::NotSent(_) => "not sent",
            };
            assert_eq!(got, *expected, "{status} {body}");
        }
    }
}
