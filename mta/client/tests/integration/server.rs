//! A scripted SMTP/LMTP server on 127.0.0.1:0 for the client's tests: each
//! [`Script`] field says how it answers, and the [`Transcript`] records what
//! the client sent.

use std::sync::{Arc, Mutex};

use base64::Engine as _;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UnixListener};

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

type RcptFn = Arc<dyn Fn(&str) -> String + Send + Sync>;

#[derive(Clone)]
pub struct Script {
    pub greeting: String,
    /// EHLO keywords; `None`: EHLO gets 502 (a HELO-only server).
    pub ehlo: Option<Vec<String>>,
    /// EHLO keywords after STARTTLS (defaults to `ehlo` without STARTTLS).
    pub ehlo_after_tls: Option<Vec<String>>,
    /// Speak LMTP: LHLO, one final reply per accepted recipient.
    pub lmtp: bool,
    pub mail_reply: String,
    pub rcpt_reply: RcptFn,
    /// Per accepted recipient for LMTP; called once with "" for SMTP.
    pub final_reply: RcptFn,
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Sent in plain text right after the STARTTLS 220 (an injection attempt).
    pub inject_after_starttls: Option<String>,
    /// Hold MAIL/RCPT replies until DATA arrives: a lock-step client stalls.
    pub strict_pipelining: bool,
    /// Accept the connection and never say anything.
    pub silent: bool,
    /// Stop replying after this many commands (but keep the socket open).
    pub mute_after_commands: Option<usize>,
    /// AUTH PLAIN / LOGIN credentials that succeed.
    pub credentials: Option<(String, String)>,
}

impl Script {
    pub fn esmtp() -> Self {
        Script {
            greeting: "220 mx.example.test ESMTP test".into(),
            ehlo: Some(
                [
                    "PIPELINING",
                    "SIZE 1000000",
                    "8BITMIME",
                    "ENHANCEDSTATUSCODES",
                ]
                .map(String::from)
                .to_vec(),
            ),
            ehlo_after_tls: None,
            lmtp: false,
            mail_reply: "250 2.1.0 Ok".into(),
            rcpt_reply: Arc::new(|_| "250 2.1.5 Ok".into()),
            final_reply: Arc::new(|_| "250 2.0.0 Ok: queued as 42".into()),
            tls: None,
            inject_after_starttls: None,
            strict_pipelining: true,
            silent: false,
            mute_after_commands: None,
            credentials: None,
        }
    }

    pub fn keywords(mut self, words: &[&str]) -> Self {
        self.ehlo = Some(words.iter().map(|w| w.to_string()).collect());
        self.strict_pipelining = words.contains(&"PIPELINING");
        self
    }

    pub fn rcpt(mut self, f: impl Fn(&str) -> String + Send + Sync + 'static) -> Self {
        self.rcpt_reply = Arc::new(f);
        self
    }

    pub fn final_reply(mut self, f: impl Fn(&str) -> String + Send + Sync + 'static) -> Self {
        self.final_reply = Arc::new(f);
        self
    }
}

#[derive(Debug, Default)]
pub struct Transcript {
    /// Every command line, without CRLF.
    pub commands: Vec<String>,
    /// The content of every DATA, dot-unstuffed, with CRLFs.
    pub messages: Vec<Vec<u8>>,
    /// Commands that arrived before the previous reply was sent while the
    /// server did not offer PIPELINING.
    pub lockstep_violations: usize,
    pub tls_sessions: usize,
}

impl Transcript {
    pub fn verbs(&self) -> Vec<String> {
        self.commands
            .iter()
            .map(|c| {
                c.split([' ', ':'])
                    .next()
                    .unwrap_or("")
                    .to_ascii_uppercase()
            })
            .collect()
    }
}

pub type Log = Arc<Mutex<Transcript>>;

/// Serves `script` on 127.0.0.1:0 (any number of connections).
pub async fn start(script: Script) -> (std::net::SocketAddr, Log) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log: Log = Arc::default();
    let script = Arc::new(script);
    let task_log = log.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(session(Box::new(stream), script.clone(), task_log.clone()));
        }
    });
    (addr, log)
}

/// Serves `script` on a unix socket at `path`.
pub async fn start_unix(script: Script, path: &std::path::Path) -> Log {
    let listener = UnixListener::bind(path).unwrap();
    let log: Log = Arc::default();
    let script = Arc::new(script);
    let task_log = log.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(session(Box::new(stream), script.clone(), task_log.clone()));
        }
    });
    log
}

async fn session(stream: Box<dyn Io>, script: Arc<Script>, log: Log) {
    let mut io = BufReader::new(stream);
    if script.silent {
        let mut sink = Vec::new();
        let _ = tokio::io::AsyncReadExt::read_to_end(&mut io, &mut sink).await;
        return;
    }
    let mut out = format!("{}\r\n", script.greeting);
    flush(&mut io, &mut out).await;

    let mut in_tls = false;
    let mut recipients: Vec<String> = Vec::new();
    let mut count = 0usize;
    loop {
        let mut line = Vec::new();
        if io.read_until(b'\n', &mut line).await.unwrap_or(0) == 0 {
            return;
        }
        let line = String::from_utf8_lossy(&line).trim_end().to_string();
        let keywords = if in_tls {
            script.ehlo_after_tls.clone().or_else(|| {
                script
                    .ehlo
                    .clone()
                    .map(|k| k.into_iter().filter(|w| w != "STARTTLS").collect())
            })
        } else {
            script.ehlo.clone()
        };
        let pipelining = keywords
            .as_ref()
            .is_some_and(|k| k.iter().any(|w| w == "PIPELINING"));
        {
            let mut log = log.lock().unwrap();
            if !pipelining && !io.buffer().is_empty() {
                log.lockstep_violations += 1;
            }
            log.commands.push(line.clone());
        }
        count += 1;
        if script.mute_after_commands.is_some_and(|n| count > n) {
            continue;
        }
        let verb = line
            .split([' ', ':'])
            .next()
            .unwrap_or("")
            .to_ascii_uppercase();
        let mut hold = false;
        match verb.as_str() {
            "EHLO" | "LHLO" if (verb == "LHLO") == script.lmtp => match &keywords {
                Some(words) => {
                    out.push_str("250");
                    out.push_str(if words.is_empty() { " " } else { "-" });
                    out.push_str("mx.example.test greets you\r\n");
                    for (i, word) in words.iter().enumerate() {
                        let sep = if i + 1 == words.len() { ' ' } else { '-' };
                        out.push_str(&format!("250{sep}{word}\r\n"));
                    }
                }
                None => out.push_str("502 5.5.2 Command not recognized\r\n"),
            },
            "HELO" if !script.lmtp => out.push_str("250 mx.example.test\r\n"),
            "STARTTLS" if !in_tls && script.tls.is_some() => {
                out.push_str("220 2.0.0 Ready to start TLS\r\n");
                if let Some(extra) = &script.inject_after_starttls {
                    out.push_str(extra);
                }
                flush(&mut io, &mut out).await;
                let Some(config) = script.tls.clone() else {
                    return;
                };
                let inner = io.into_inner();
                match tokio_rustls::TlsAcceptor::from(config).accept(inner).await {
                    Ok(tls) => {
                        io = BufReader::new(Box::new(tls));
                        in_tls = true;
                        log.lock().unwrap().tls_sessions += 1;
                    }
                    Err(_) => return,
                }
                continue;
            }
            "AUTH" => {
                let reply = auth(&mut io, &line, &script).await;
                out.push_str(&reply);
            }
            "MAIL" => {
                recipients.clear();
                out.push_str(&format!("{}\r\n", script.mail_reply));
                hold = script.strict_pipelining;
            }
            "RCPT" => {
                let address = line
                    .split_once('<')
                    .and_then(|(_, rest)| rest.split_once('>'))
                    .map(|(a, _)| a.to_string())
                    .unwrap_or_default();
                let reply = (script.rcpt_reply)(&address);
                if reply.starts_with('2') {
                    recipients.push(address);
                }
                out.push_str(&format!("{reply}\r\n"));
                hold = script.strict_pipelining;
            }
            "DATA" => {
                if recipients.is_empty() {
                    out.push_str("554 5.5.1 No valid recipients\r\n");
                } else {
                    out.push_str("354 End data with <CR><LF>.<CR><LF>\r\n");
                    flush(&mut io, &mut out).await;
                    let Some(content) = read_data(&mut io).await else {
                        return;
                    };
                    log.lock().unwrap().messages.push(content);
                    if script.lmtp {
                        for rcpt in &recipients {
                            out.push_str(&format!("{}\r\n", (script.final_reply)(rcpt)));
                        }
                    } else {
                        out.push_str(&format!("{}\r\n", (script.final_reply)("")));
                    }
                    recipients.clear();
                }
            }
            "RSET" => {
                recipients.clear();
                out.push_str("250 2.0.0 Ok\r\n");
            }
            "NOOP" => out.push_str("250 2.0.0 Ok\r\n"),
            "QUIT" => {
                out.push_str("221 2.0.0 Bye\r\n");
                flush(&mut io, &mut out).await;
                return;
            }
            _ => out.push_str("500 5.5.2 Unknown command\r\n"),
        }
        if !hold {
            flush(&mut io, &mut out).await;
        }
    }
}

async fn flush(io: &mut BufReader<Box<dyn Io>>, out: &mut String) {
    if !out.is_empty() {
        let _ = io.get_mut().write_all(out.as_bytes()).await;
        let _ = io.get_mut().flush().await;
        out.clear();
    }
}

async fn read_line(io: &mut BufReader<Box<dyn Io>>) -> Option<String> {
    let mut line = Vec::new();
    if io.read_until(b'\n', &mut line).await.ok()? == 0 {
        return None;
    }
    Some(String::from_utf8_lossy(&line).trim_end().to_string())
}

/// Reads DATA lines up to the lone dot and undoes dot-stuffing.
async fn read_data(io: &mut BufReader<Box<dyn Io>>) -> Option<Vec<u8>> {
    let mut content = Vec::new();
    loop {
        let mut line = Vec::new();
        if io.read_until(b'\n', &mut line).await.ok()? == 0 {
            return None;
        }
        if line == b".\r\n" {
            return Some(content);
        }
        let line = line.strip_prefix(b".").unwrap_or(&line);
        content.extend_from_slice(line);
    }
}

async fn auth(io: &mut BufReader<Box<dyn Io>>, line: &str, script: &Script) -> String {
    let b64 = base64::engine::general_purpose::STANDARD;
    let decode =
        |s: &str| String::from_utf8(b64.decode(s.trim()).unwrap_or_default()).unwrap_or_default();
    let Some((user, pass)) = &script.credentials else {
        return "502 5.5.1 AUTH not available\r\n".into();
    };
    let mut words = line.split_whitespace().skip(1);
    let mechanism = words.next().unwrap_or("").to_ascii_uppercase();
    let (got_user, got_pass) = match mechanism.as_str() {
        "PLAIN" => {
            let token = decode(words.next().unwrap_or(""));
            let mut parts = token.split('\0').skip(1);
            (
                parts.next().unwrap_or("").to_string(),
                parts.next().unwrap_or("").to_string(),
            )
        }
        "LOGIN" => {
            let mut out = "334 VXNlcm5hbWU6\r\n".to_string();
            flush(io, &mut out).await;
            let u = decode(&read_line(io).await.unwrap_or_default());
            let mut out = "334 UGFzc3dvcmQ6\r\n".to_string();
            flush(io, &mut out).await;
            let p = decode(&read_line(io).await.unwrap_or_default());
            (u, p)
        }
        _ => return "504 5.5.4 Unrecognized mechanism\r\n".into(),
    };
    if &got_user == user && &got_pass == pass {
        "235 2.7.0 Authentication successful\r\n".into()
    } else {
        "535 5.7.8 Authentication credentials invalid\r\n".into()
    }
}

/// A throwaway CA and a server certificate it signed.
pub struct Pki {
    pub ca_pem: String,
    pub server_config: Arc<rustls::ServerConfig>,
}

pub fn pki(names: &[&str]) -> Pki {
    pki_with(names, |_| {})
}

/// A PKI whose server certificate expired in 2020.
pub fn expired_pki(names: &[&str]) -> Pki {
    pki_with(names, |leaf| {
        leaf.not_before = rcgen::date_time_ymd(2019, 1, 1);
        leaf.not_after = rcgen::date_time_ymd(2020, 1, 1);
    })
}

fn pki_with(names: &[&str], adjust_leaf: impl FnOnce(&mut rcgen::CertificateParams)) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Petrel test CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);

    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let mut leaf_params = CertificateParams::new(names).unwrap();
    leaf_params.use_authority_key_identifier_extension = true;
    adjust_leaf(&mut leaf_params);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();

    let chain = vec![
        CertificateDer::from(leaf.der().to_vec()),
        CertificateDer::from(ca_cert.der().to_vec()),
    ];
    let key = PrivateKeyDer::from_pem_slice(leaf_key.serialize_pem().as_bytes()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    Pki {
        ca_pem: ca_cert.pem(),
        server_config: Arc::new(config),
    }
}
