//! The admin endpoint behind `petrel-mta queue …`: one JSON request per line in, one JSON
//! response per line out, on a loopback TCP address only (`admin.address`; validation
//! refuses anything else). Requests and responses are
//! [`AdminRequest`] / [`AdminResponse`], which the scheduler answers, and the drain's
//! [`AdminDrain`] (`{"op":"drain","peers":[…],"deliver_for_secs":30}`, `drain_status`,
//! `drain_cancel`), answered with `{"result":"drain", …}` and the drain's [`Report`] (the
//! same operation as the fleet's `POST /admin/drain`, for a person with `kubectl exec`).
//!
//! Authentication (issue 13, item 4): loopback alone lets every local user (and, through a
//! browser or an SSRF, any web page) empty the queue. So at each start the MTA writes a
//! random [`Token`] into `admin.token_file` (mode 0600: the MTA's own user and root only),
//! and every request line carries it: `{"token":"…","op":"list"}`. The token is checked
//! (in constant time) before the request is even parsed; a wrong or missing one gets an
//! error and the connection closes. A line that is not a JSON object — an HTTP request
//! line above all (`POST / HTTP/1.1`) — closes the connection at once, unanswered, so an
//! HTTP body is never read, let alone run. A Unix socket was the alternative; the token
//! works the same on a laptop and in a pod (where `kubectl exec` runs as the MTA's user)
//! and keeps the TCP address the CLI already knows.
//!
//! `{"op":"sites"}` is answered here, not by the scheduler: `{"result":"sites","sites":[…]}`,
//! a [`SiteView`] of every outbound site ([`crate::delivery::site::Sites::snapshot`]),
//! suspended and throttled sites first. It only reads the sites: looking never changes a
//! limit, a strike or a suspension.
//!
//! `list` is answered page by page ([`LIST_PAGE`] messages a line, `{"result":
//! "list_page","messages":[…],"more":true}`, the last with `"more":false`), each page
//! written before the next is asked of the scheduler: a queue of a million messages is
//! never one reply in memory, and other requests are served between pages.

use crate::context::Context;
use crate::delivery::Outbound;
use crate::delivery::site::SiteView;
use crate::drain::{AdminDrain, Drain, Report};
use crate::files;
use crate::qmgr::{AdminRequest, AdminResponse, QueueEntry};
use crate::shutdown::Shutdown;
use std::io::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};

/// Longest request line accepted.
const MAX_REQUEST: u64 = 64 * 1024;

/// Messages in one page of `list`.
pub const LIST_PAGE: usize = 1000;

/// Random bytes in a token (written as hex).
const TOKEN_BYTES: usize = 32;

/// The secret every admin request must carry.
#[derive(Clone)]
pub struct Token(Arc<str>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(…)")
    }
}

impl Token {
    /// A new random token, written to `path` (0600, replaced by rename so a reader never
    /// sees half a token, and a link planted at the temporary name is not followed).
    pub fn create(path: &Path) -> std::io::Result<Token> {
        let bytes: [u8; TOKEN_BYTES] = rand::random();
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
        {
            files::create_private_dir_all(dir)?;
        }
        let mut name = path.file_name().unwrap_or_default().to_owned();
        name.push(".new");
        let temporary = path.with_file_name(name);
        match std::fs::remove_file(&temporary) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut file = files::open_private(
            std::fs::OpenOptions::new().write(true).create_new(true),
            &temporary,
        )?;
        file.write_all(format!("{hex}\n").as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)?;
        Ok(Token(hex.into()))
    }

    /// Reads the token the MTA wrote (the CLI's side).
    pub fn read(path: &Path) -> Result<Token, String> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            format!(
                "cannot read the admin token from {}: {e} (run as the MTA's user, or name the \
                 file with --token-file or the MTA's config with --config)",
                path.display()
            )
        })?;
        Ok(Token(text.trim().into()))
    }

    /// Constant-time comparison, so response timing tells nothing about the token.
    fn matches(&self, given: &str) -> bool {
        use subtle::ConstantTimeEq;
        bool::from(self.0.as_bytes().ct_eq(given.as_bytes()))
    }
}

/// What one request line turned out to be.
enum Line {
    /// Not a JSON object: not the admin protocol (an HTTP request line, say).
    Foreign,
    /// A JSON object without the right token.
    Unauthorised,
    /// Authenticated, but not a request this endpoint knows.
    Invalid(String),
    Request(Request),
}

/// One request: a queue operation (the scheduler answers), a drain operation (the
/// drain answers) or the sites view (answered here).
#[derive(Debug, Clone)]
pub enum Request {
    Queue(AdminRequest),
    Drain(AdminDrain),
    Sites(SitesRequest),
}

/// `{"op":"sites"}`: the outbound sites and their shaping state.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "op")]
pub enum SitesRequest {
    Sites,
}

/// The answer to `sites`: `{"result":"sites","sites":[…]}`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "result")]
pub enum SitesResponse {
    Sites { sites: Vec<SiteView> },
}

/// The answer to a drain operation: `{"result":"drain", "state": …, …}`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "result")]
pub enum DrainResponse {
    Drain(Report),
}

impl Line {
    fn parse(line: &str, token: &Token) -> Line {
        let Ok(mut object) =
            serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(line)
        else {
            return Line::Foreign;
        };
        let authorised = match object.remove("token") {
            Some(serde_json::Value::String(given)) => token.matches(&given),
            _ => false,
        };
        if !authorised {
            return Line::Unauthorised;
        }
        let op = object
            .get("op")
            .and_then(|op| op.as_str())
            .unwrap_or_default()
            .to_owned();
        let object = serde_json::Value::Object(object);
        let parsed = match op.as_str() {
            "sites" => serde_json::from_value(object).map(Request::Sites),
            op if op.starts_with("drain") => serde_json::from_value(object).map(Request::Drain),
            _ => serde_json::from_value(object).map(Request::Queue),
        };
        match parsed {
            Ok(request) => Line::Request(request),
            Err(e) => Line::Invalid(e.to_string()),
        }
    }
}

pub async fn serve(
    listener: TcpListener,
    token: Token,
    ctx: Arc<Context>,
    drain: Arc<Drain>,
    outbound: Arc<Outbound>,
    mut shutdown: Shutdown,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.recv() => return,
        };
        match accepted {
            Ok((stream, peer)) if peer.ip().is_loopback() => {
                tokio::spawn(handle(
                    stream,
                    peer,
                    token.clone(),
                    ctx.clone(),
                    drain.clone(),
                    outbound.clone(),
                ));
            }
            Ok((_, peer)) => tracing::warn!(%peer, "admin: refused non-loopback client"),
            Err(e) => {
                tracing::warn!(error = %e, "admin: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

fn error_line(message: &str) -> String {
    serde_json::json!({"result": "error", "message": message}).to_string()
}

async fn write_line(write: &mut OwnedWriteHalf, mut line: String) -> std::io::Result<()> {
    line.push('\n');
    write.write_all(line.as_bytes()).await
}

async fn handle(
    stream: TcpStream,
    peer: std::net::SocketAddr,
    token: Token,
    ctx: Arc<Context>,
    drain: Arc<Drain>,
    outbound: Arc<Outbound>,
) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(tokio::io::AsyncReadExt::take(read, MAX_REQUEST)).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let parsed = Line::parse(&line, &token);
        if matches!(parsed, Line::Request(Request::Queue(_))) {
            // Queue operations see the whole queue: they wait until start-up recovery has
            // scheduled every message the spool holds (seconds, for a million).
            drain.recovered().await;
        }
        let response = match parsed {
            Line::Foreign => {
                tracing::warn!(%peer, "admin: not the admin protocol; connection closed");
                return;
            }
            Line::Unauthorised => {
                tracing::warn!(%peer, "admin: request without the admin token refused");
                let refusal = error_line("not authorised: wrong or missing admin token");
                let _ = write_line(&mut write, refusal).await;
                return;
            }
            Line::Invalid(message) => error_line(&message),
            Line::Request(Request::Queue(AdminRequest::List)) => {
                if stream_list(&ctx, &mut write).await.is_err() {
                    return;
                }
                continue;
            }
            Line::Request(Request::Queue(request)) => match ctx.scheduler.admin(request).await {
                Some(response) => match serde_json::to_string(&response) {
                    Ok(text) => text,
                    Err(_) => return,
                },
                None => error_line("shutting down"),
            },
            Line::Request(Request::Sites(SitesRequest::Sites)) => {
                let sites = outbound.sites.snapshot();
                match serde_json::to_string(&SitesResponse::Sites { sites }) {
                    Ok(text) => text,
                    Err(_) => return,
                }
            }
            Line::Request(Request::Drain(op)) => match drain.admin(op).await {
                Ok(report) => match serde_json::to_string(&DrainResponse::Drain(report)) {
                    Ok(text) => text,
                    Err(_) => return,
                },
                Err(message) => error_line(&message),
            },
        };
        if write_line(&mut write, response).await.is_err() {
            return;
        }
    }
}

/// Writes the list page by page (see the module doc).
async fn stream_list(ctx: &Context, write: &mut OwnedWriteHalf) -> std::io::Result<()> {
    let mut after = None;
    loop {
        let request = AdminRequest::ListPage {
            after,
            limit: LIST_PAGE,
        };
        let Some(page) = ctx.scheduler.admin(request).await else {
            return write_line(write, error_line("shutting down")).await;
        };
        let more = match &page {
            AdminResponse::ListPage { messages, more } => {
                after = messages.last().map(|m| m.id);
                *more
            }
            _ => false,
        };
        let text = serde_json::to_string(&page).map_err(std::io::Error::other)?;
        write_line(write, text).await?;
        if !more {
            return Ok(());
        }
    }
}

/// Client side of `list`: the pages as they come, each given to `page`; returns how many
/// messages there were.
pub async fn list(
    address: std::net::SocketAddr,
    token: &Token,
    mut page: impl FnMut(Vec<QueueEntry>),
) -> Result<usize, String> {
    let (mut reply, _write) = send(address, token, &AdminRequest::List).await?;
    let mut total = 0;
    loop {
        let mut line = String::new();
        reply
            .read_line(&mut line)
            .await
            .map_err(|e| e.to_string())?;
        if line.is_empty() {
            return Err(format!(
                "the admin endpoint at {address} closed the connection in the middle of the list"
            ));
        }
        match parse_reply::<AdminResponse>(&line)? {
            AdminResponse::ListPage { messages, more } => {
                total += messages.len();
                page(messages);
                if !more {
                    return Ok(total);
                }
            }
            other => return Err(format!("unexpected response to list: {other:?}")),
        }
    }
}

/// Sends one request line with the token; returns the reader of the replies (and the
/// writing half, kept open while they are read).
async fn send(
    address: std::net::SocketAddr,
    token: &Token,
    request: &impl serde::Serialize,
) -> Result<(BufReader<tokio::net::tcp::OwnedReadHalf>, OwnedWriteHalf), String> {
    let stream = TcpStream::connect(address).await.map_err(|e| {
        format!("cannot reach the admin endpoint at {address}: {e} (is petrel-mta running?)")
    })?;
    let (read, mut write) = stream.into_split();
    let mut object = match serde_json::to_value(request).map_err(|e| e.to_string())? {
        serde_json::Value::Object(object) => object,
        other => return Err(format!("request is not an object: {other}")),
    };
    object.insert("token".to_owned(), token.0.as_ref().into());
    let mut line = serde_json::Value::Object(object).to_string();
    line.push('\n');
    write
        .write_all(line.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    Ok((BufReader::new(read), write))
}

/// One reply line as `R`, or the endpoint's error message.
fn parse_reply<R: serde::de::DeserializeOwned>(reply: &str) -> Result<R, String> {
    serde_json::from_str(reply).map_err(|e| {
        match serde_json::from_str::<serde_json::Value>(reply) {
            Ok(value) if value["result"] == "error" => {
                value["message"].as_str().unwrap_or("error").to_owned()
            }
            _ => format!("bad response {reply:?}: {e}"),
        }
    })
}

/// Client side, for the CLI: sends one request (an [`AdminRequest`] answered by an
/// [`AdminResponse`], or an [`AdminDrain`] answered by a [`DrainResponse`]) with the token
/// and returns the response.
pub async fn request<R: serde::de::DeserializeOwned>(
    address: std::net::SocketAddr,
    token: &Token,
    request: &impl serde::Serialize,
) -> Result<R, String> {
    let (mut read, _write) = send(address, token, request).await?;
    let mut reply = String::new();
    read.read_line(&mut reply)
        .await
        .map_err(|e| e.to_string())?;
    if reply.is_empty() {
        return Err(format!(
            "the admin endpoint at {address} closed the connection"
        ));
    }
    parse_reply(&reply)
}

/// Human-readable form of a drain report (the CLI's default output).
pub fn render_drain(report: &Report) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let state = serde_json::to_value(report.state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    let _ = writeln!(out, "state:       {state}");
    let _ = writeln!(out, "left:        {}", report.left);
    let _ = writeln!(out, "delivered:   {}", report.delivered);
    let _ = writeln!(out, "handed off:  {}", report.handed_off);
    let marker = if report.marker { "written" } else { "no" };
    let _ = writeln!(out, "marker:      {marker}");
    let peers = match report.peers.is_empty() {
        true => "-".to_owned(),
        false => report.peers.join(", "),
    };
    let _ = writeln!(out, "peers:       {peers}");
    if let Some(error) = &report.error {
        let _ = writeln!(out, "last error:  {error}");
    }
    out
}

/// Human-readable form of the sites view (the CLI's default output): one row per site,
/// in the order given (the MTA sends suspended and throttled sites first).
pub fn render_sites(sites: &[SiteView]) -> String {
    use std::fmt::Write;
    let rate = |r: Option<f64>| match r {
        Some(r) => format!("{r:.2}/s"),
        None => "-".to_owned(),
    };
    let rows: Vec<[String; 7]> = sites
        .iter()
        .map(|s| {
            let state = match (s.suspended_for_secs, s.throttled, s.strikes) {
                (Some(_), _, _) => "suspended",
                (None, true, _) => "throttled",
                (None, false, 0) => "ok",
                (None, false, _) => "failing",
            };
            let ceiling = s
                .connection_ceiling
                .map(|c| format!(" (ceiling {c})"))
                .unwrap_or_default();
            let rate_ceiling = s
                .rate_ceiling
                .map(|c| format!(" (ceiling {})", rate(Some(c))))
                .unwrap_or_default();
            let suspended = match (&s.suspended_for_secs, &s.suspended_until) {
                (Some(left), Some(until)) => format!("{left}s, until {until}"),
                (Some(left), None) => format!("{left}s"),
                _ => "-".to_owned(),
            };
            let reason = match (&s.last_reason, s.last_reason_secs_ago) {
                (Some(reason), Some(ago)) => format!("{ago}s ago: {}", reason.replace('\n', " ")),
                (Some(reason), None) => reason.replace('\n', " "),
                _ => "-".to_owned(),
            };
            [
                format!("{} ({})", s.site, s.tls),
                state.to_owned(),
                format!(
                    "{}/{}/{}{ceiling}",
                    s.connections_open, s.connection_limit, s.max_connections
                ),
                format!("{}{rate_ceiling}", rate(s.message_rate)),
                format!("{}/{} ({})", s.strikes, s.suspend_after, s.suspensions),
                suspended,
                reason,
            ]
        })
        .collect();
    let header = [
        "SITE",
        "STATE",
        "CONNS OPEN/LIMIT/MAX",
        "RATE",
        "STRIKES (SUSPENSIONS)",
        "SUSPENDED",
        "LAST REASON",
    ];
    let mut widths = header.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: [&str; 7]| {
        let mut text = String::new();
        for (i, (cell, width)) in cells.iter().zip(widths).enumerate() {
            match i {
                6 => text.push_str(cell),
                _ => {
                    let _ = write!(text, "{cell:<width$}  ");
                }
            }
        }
        let _ = writeln!(out, "{}", text.trim_end());
    };
    line(header);
    for row in &rows {
        line(row.each_ref().map(String::as_str));
    }
    let _ = writeln!(out, "{} site(s)", sites.len());
    out
}

/// The head of the list's table.
pub fn render_list_header() -> String {
    format!(
        "{:<16}  {:<7}  {:>8}  {:<31}  {:<30}  PENDING/ALL\n",
        "QUEUE ID", "STATE", "ATTEMPTS", "NEXT ATTEMPT", "SENDER"
    )
}

/// Rows of the list's table.
pub fn render_list_rows(messages: &[QueueEntry]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    for m in messages {
        let pending = m.recipients.iter().filter(|r| !r.status.is_final()).count();
        let sender = if m.sender.is_empty() { "<>" } else { &m.sender };
        let next = match m.next_attempt_at {
            Some(at) => crate::dates::rfc5322_date(at),
            None => "-".to_owned(),
        };
        let _ = writeln!(
            out,
            "{:<16}  {:<7}  {:>8}  {:<31}  {:<30}  {pending}/{}",
            m.id.to_string(),
            m.state,
            m.attempts,
            next,
            sender,
            m.recipients.len()
        );
    }
    out
}

/// The last line of the list.
pub fn render_list_footer(count: usize) -> String {
    format!("{count} message(s)\n")
}

/// Human-readable form of a response (the CLI's default output).
pub fn render(response: &AdminResponse) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let next = |at: Option<u64>| match at {
        Some(at) => crate::dates::rfc5322_date(at),
        None => "-".to_owned(),
    };
    match response {
        AdminResponse::List { messages } => {
            out.push_str(&render_list_header());
            out.push_str(&render_list_rows(messages));
            out.push_str(&render_list_footer(messages.len()));
        }
        AdminResponse::ListPage { messages, .. } => out.push_str(&render_list_rows(messages)),
        AdminResponse::Show { message: m } => {
            let _ = writeln!(out, "queue id:      {}", m.id);
            let _ = writeln!(out, "state:         {}", m.state);
            let _ = writeln!(out, "sender:        <{}>", m.sender);
            let _ = writeln!(
                out,
                "received:      {}",
                crate::dates::rfc5322_date(m.received_at)
            );
            let _ = writeln!(out, "attempts:      {}", m.attempts);
            let _ = writeln!(out, "next attempt:  {}", next(m.next_attempt_at));
            for r in &m.recipients {
                let state = r.status.state();
                let detail = r
                    .status
                    .diagnostic()
                    .map(ToString::to_string)
                    .unwrap_or_default();
                let via = r
                    .remote_mta
                    .as_deref()
                    .map(|host| format!(" (from {host})"))
                    .unwrap_or_default();
                let class = crate::delivery::classify::verdict(&r.status)
                    .map(|v| format!(" [{}, {}]", v.class, v.disposition))
                    .unwrap_or_default();
                let _ = writeln!(out, "  <{}>  {state}  {detail}{via}{class}", r.address);
            }
        }
        AdminResponse::Done { affected } => {
            let _ = writeln!(out, "ok: {affected} message(s) affected");
        }
        AdminResponse::NotFound { id } => {
            let _ = writeln!(out, "no message {id} in the queue");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> Token {
        Token("ab".repeat(TOKEN_BYTES).into())
    }

    fn kind(line: &str) -> &'static str {
        match Line::parse(line, &token()) {
            Line::Foreign => "foreign",
            Line::Unauthorised => "unauthorised",
            Line::Invalid(_) => "invalid",
            Line::Request(_) => "request",
        }
    }

    #[test]
    fn only_token_bearing_json_requests_run() {
        let good = "ab".repeat(TOKEN_BYTES);
        let cases = [
            ("POST / HTTP/1.1", "foreign"),
            ("GET /?op=list HTTP/1.0", "foreign"),
            ("OPTIONS * HTTP/1.1", "foreign"),
            ("", "foreign"),
            ("[1]", "foreign"),
            (r#"{"op":"list"}"#, "unauthorised"),
            (r#"{"op":"list","token":""}"#, "unauthorised"),
            (r#"{"op":"list","token":7}"#, "unauthorised"),
            (
                &format!(r#"{{"op":"list","token":"{}"}}"#, &good[1..]),
                "unauthorised",
            ),
            (
                &format!(r#"{{"op":"list","token":"{good}0"}}"#),
                "unauthorised",
            ),
            (&format!(r#"{{"op":"erase","token":"{good}"}}"#), "invalid"),
            (
                &format!(r#"{{"op":"drain_now","token":"{good}"}}"#),
                "invalid",
            ),
            (
                &format!(r#"{{"op":"drain","peers":["10.0.0.5:8080"],"token":"{good}"}}"#),
                "request",
            ),
            (
                &format!(r#"{{"op":"drain_status","token":"{good}"}}"#),
                "request",
            ),
            (r#"{"op":"drain_status"}"#, "unauthorised"),
            (r#"{"op":"sites"}"#, "unauthorised"),
            (&format!(r#"{{"op":"sites","token":"{good}"}}"#), "request"),
            (&format!(r#"{{"op":"site","token":"{good}"}}"#), "invalid"),
            (&format!(r#"{{"op":"list","token":"{good}"}}"#), "request"),
            (
                &format!("{{\"token\":\"{good}\",\"op\":\"delete\",\"id\":1}}\r"),
                "request",
            ),
        ];
        for (line, expected) in cases {
            assert_eq!(kind(line), expected, "{line:?}");
        }
    }

    #[test]
    fn the_sites_request_and_response_round_trip() {
        let good = "ab".repeat(TOKEN_BYTES);
        let line = format!(r#"{{"op":"sites","token":"{good}"}}"#);
        assert!(matches!(
            Line::parse(&line, &token()),
            Line::Request(Request::Sites(SitesRequest::Sites))
        ));
        assert_eq!(
            serde_json::to_string(&SitesRequest::Sites).expect("json"),
            r#"{"op":"sites"}"#
        );
        let response = SitesResponse::Sites {
            sites: vec![site_view("mx.example", Some(30))],
        };
        let text = serde_json::to_string(&response).expect("json");
        assert!(text.starts_with(r#"{"result":"sites","sites":[{"site":"mx.example""#));
        assert_eq!(
            parse_reply::<SitesResponse>(&text).expect("parse"),
            response
        );
    }

    fn site_view(site: &str, suspended: Option<u64>) -> SiteView {
        SiteView {
            site: site.into(),
            tls: "opportunistic".into(),
            configured: false,
            connections_open: 1,
            connections_held: 1,
            waiting: 0,
            connection_limit: 2,
            max_connections: 20,
            connection_ceiling: suspended.map(|_| 2),
            message_rate: suspended.map(|_| 2.5),
            max_message_rate: None,
            rate_ceiling: suspended.map(|_| 5.0),
            throttled: suspended.is_some(),
            last_throttle_secs_ago: suspended.map(|_| 3),
            strikes: 0,
            suspend_after: 5,
            suspensions: u32::from(suspended.is_some()),
            suspended_for_secs: suspended,
            suspended_until: suspended.map(|_| "2027-01-15T08:00:30Z".into()),
            last_reason: suspended.map(|_| "421 4.7.0 too many\nconnections".into()),
            last_reason_secs_ago: suspended.map(|_| 3),
        }
    }

    #[test]
    fn the_sites_table_has_a_row_per_site_in_order() {
        let table = render_sites(&[
            site_view("mx1.busy.example,mx2.busy.example", Some(30)),
            site_view("quiet", None),
        ]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4, "{table}");
        assert!(lines[0].starts_with("SITE"), "{table}");
        let busy = lines[1];
        assert!(
            busy.starts_with("mx1.busy.example,mx2.busy.example (opportunistic)  suspended  "),
            "{table}"
        );
        for cell in [
            "1/2/20 (ceiling 2)",
            "2.50/s (ceiling 5.00/s)",
            "0/5 (1)",
            "30s, until 2027-01-15T08:00:30Z",
            "3s ago: 421 4.7.0 too many connections",
        ] {
            assert!(busy.contains(cell), "{cell:?} in {busy:?}");
        }
        assert!(lines[2].starts_with("quiet (opportunistic)"), "{table}");
        assert!(lines[2].contains("  ok  "), "{table}");
        assert!(lines[2].ends_with('-'), "{table}");
        assert_eq!(lines[3], "2 site(s)");
        // The columns line up: each row's STATE starts where the header's does.
        let column = lines[0].find("STATE").expect("header");
        assert_eq!(lines[1].find("suspended"), Some(column));
        assert_eq!(lines[2].find("ok"), Some(column));
    }

    #[test]
    fn token_file_is_private_and_replaced_at_each_start() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("data/admin.token");
        let first = Token::create(&path).expect("create");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(first.0.len(), 2 * TOKEN_BYTES);
        assert!(Token::read(&path).expect("read").matches(&first.0));
        let second = Token::create(&path).expect("again");
        assert!(!second.matches(&first.0), "a new token each start");
        assert!(Token::read(&path).expect("read").matches(&second.0));
    }
}
