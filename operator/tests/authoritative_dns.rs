//! `dns::authoritative::check_txt` against two real authoritative servers: Debian's `nsd`
//! (NLnet Labs), started here as child processes on loopback, one zone `rotation.test.`
//! served by both with NS ns1/ns2 and A records pointing at them.
//!
//! Each test has its own pair of addresses in 127.0.61.0/24 (no other test of the repo uses
//! that range) and one port chosen by the OS, free on both addresses for UDP and TCP: both
//! servers share it because `check_txt` asks every NS address on one port, as production
//! asks every nameserver on 53. Every nsd runs in its own process group and is stopped by a
//! Drop guard on every path (SIGTERM to the group, SIGKILL if it lingers).
//!
//! When `nsd` is not installed the tests print why and pass; `scripts/test.sh` installs it,
//! so in CI they run.

#![allow(clippy::unwrap_used)]

use operator::dns::authoritative::{ServerAnswer, Verdict, check_txt};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const NAME: &str = "sel._domainkey.rotation.test.";
/// How long one check may wait for each server; generous for a loaded CI machine.
const TIMEOUT: Duration = Duration::from_secs(2);

/// A DKIM-like value, published below as several strings of the TXT record.
fn dkim_value() -> String {
    format!(
        "v=DKIM1; k=rsa; p={}",
        "MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8A".repeat(12)
    )
}

/// The value as a zone file writes it: split into strings at arbitrary points, without the
/// spaces after `;` (the check must ignore both).
fn zone_txt(value: &str) -> String {
    let compact = value.replace("; ", ";");
    compact
        .as_bytes()
        .chunks(100)
        .map(|c| format!("\"{}\"", String::from_utf8_lossy(c)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The numbers a zone is written with, distinct so the test tells which one is used.
struct Soa {
    serial: u32,
    /// TTL of the SOA record itself.
    ttl: u32,
    /// SOA MINIMUM.
    minimum: u32,
}

fn zone_text(soa: &Soa, ips: [Ipv4Addr; 2], records: &[(&str, u32, &str)]) -> String {
    let mut zone = format!(
        "$ORIGIN rotation.test.\n$TTL 3600\n\
         @ {} IN SOA ns1 hostmaster {} 3600 600 86400 {}\n\
         @ IN NS ns1\n@ IN NS ns2\nns1 IN A {}\nns2 IN A {}\n",
        soa.ttl, soa.serial, soa.minimum, ips[0], ips[1]
    );
    for (owner, ttl, value) in records {
        zone.push_str(&format!("{owner} {ttl} IN TXT {}\n", zone_txt(value)));
    }
    zone
}

/// The nsd binary, when installed (Debian puts it in /usr/sbin, often not on a user's PATH).
fn nsd_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/local/sbin".into()])
        .map(|dir| dir.join("nsd"))
        .find(|p| p.is_file())
}

macro_rules! require_nsd {
    () => {
        match nsd_binary() {
            Some(bin) => bin,
            None => {
                eprintln!(
                    "SKIPPED: nsd is not installed (apt-get install nsd; scripts/test.sh does)"
                );
                return;
            }
        }
    };
}

/// One running nsd; stopping it (drop) ends its whole process group.
struct Nsd {
    child: Child,
    dir: PathBuf,
}

impl Nsd {
    fn zone_file(&self) -> PathBuf {
        self.dir.join("rotation.test.zone")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("nsd.log")).unwrap_or_default()
    }

    /// Replaces the zone file and makes nsd reload it (SIGHUP: nsd 4 rereads zone files
    /// whose mtime changed). The mtime is moved forward explicitly, so a rewrite within the
    /// same clock tick is still seen as a change.
    fn replace_zone(&self, text: &str) {
        let path = self.zone_file();
        let before = std::fs::metadata(&path).unwrap().modified().unwrap();
        std::fs::write(&path, text).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(before + Duration::from_secs(10))
            .unwrap();
        let status = Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -HUP nsd");
    }
}

impl Drop for Nsd {
    fn drop(&mut self) {
        let group = format!("-{}", self.child.id());
        let signal = |sig: &str| {
            let _ = Command::new("kill")
                .args([sig, "--", &group])
                .stderr(Stdio::null())
                .status();
        };
        signal("-TERM");
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        signal("-KILL");
        let _ = self.child.wait();
    }
}

/// Starts nsd on `ip`:`port` serving `zone` from `dir`.
fn spawn_nsd(bin: &Path, dir: &Path, ip: Ipv4Addr, port: u16, zone: &str) -> Nsd {
    std::fs::create_dir_all(dir).unwrap();
    let d = dir.display();
    // Runs unprivileged or as root without dropping to the `nsd` user (username ""), with
    // every file it writes inside `dir`, no compiled database, no remote control.
    let conf = format!(
        "server:\n  ip-address: {ip}\n  port: {port}\n  do-ip6: no\n  username: \"\"\n  chroot: \"\"\n  \
         zonesdir: \"{d}\"\n  pidfile: \"{d}/nsd.pid\"\n  database: \"\"\n  \
         xfrdfile: \"{d}/xfrd.state\"\n  zonelistfile: \"{d}/zone.list\"\n  xfrdir: \"{d}\"\n  \
         logfile: \"{d}/nsd.log\"\n  server-count: 1\n  verbosity: 1\n\
         remote-control:\n  control-enable: no\n\
         zone:\n  name: rotation.test\n  zonefile: \"{d}/rotation.test.zone\"\n"
    );
    std::fs::write(dir.join("nsd.conf"), conf).unwrap();
    std::fs::write(dir.join("rotation.test.zone"), zone).unwrap();
    let child = Command::new(bin)
        .arg("-d")
        .arg("-c")
        .arg(dir.join("nsd.conf"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    Nsd {
        child,
        dir: dir.to_owned(),
    }
}

/// A port the OS hands out that is free for UDP and TCP on every address in `ips`.
fn free_port(ips: &[Ipv4Addr]) -> u16 {
    loop {
        let first = UdpSocket::bind((ips[0], 0)).unwrap();
        let port = first.local_addr().unwrap().port();
        let all_free = ips.iter().all(|ip| {
            TcpListener::bind((*ip, port)).is_ok()
                && (*ip == ips[0] || UdpSocket::bind((*ip, port)).is_ok())
        });
        if all_free {
            return port;
        }
    }
}

/// Waits until `nsd` answers the zone's SOA on `addr`; `Err` with its log if it exited.
async fn wait_ready(nsd: &mut Nsd, addr: SocketAddr) -> Result<(), String> {
    let until = Instant::now() + Duration::from_secs(20);
    while Instant::now() < until {
        if let Ok(Some(status)) = nsd.child.try_wait() {
            return Err(format!("nsd on {addr} exited ({status}):\n{}", nsd.log()));
        }
        let resolver = operator::dns::resolver(Some(addr)).unwrap();
        let answer = tokio::time::timeout(
            Duration::from_millis(500),
            resolver.soa_lookup("rotation.test."),
        )
        .await;
        if matches!(answer, Ok(Ok(_))) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(format!("nsd on {addr} did not answer:\n{}", nsd.log()))
}

/// Two nsd instances serving `rotation.test.`, one per address, on one shared port.
struct Pair {
    ips: [Ipv4Addr; 2],
    port: u16,
    /// `None` once a test has stopped that server.
    servers: [Option<Nsd>; 2],
    _dir: tempfile::TempDir,
}

impl Pair {
    /// Starts both servers with their zone texts (a function of the addresses). A port
    /// taken between choosing and binding shows as an nsd that exits: try another.
    async fn start(
        bin: &Path,
        ips: [Ipv4Addr; 2],
        zones: impl Fn([Ipv4Addr; 2]) -> [String; 2],
    ) -> Pair {
        let texts = zones(ips);
        let mut last_error = String::new();
        for _ in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            let port = free_port(&ips);
            let mut servers = [0, 1].map(|i| {
                spawn_nsd(
                    bin,
                    &dir.path().join(format!("ns{}", i + 1)),
                    ips[i],
                    port,
                    &texts[i],
                )
            });
            let mut ready = Ok(());
            for (i, nsd) in servers.iter_mut().enumerate() {
                ready = wait_ready(nsd, SocketAddr::from((ips[i], port))).await;
                if ready.is_err() {
                    break;
                }
            }
            match ready {
                Ok(()) => {
                    let [a, b] = servers;
                    return Pair {
                        ips,
                        port,
                        servers: [Some(a), Some(b)],
                        _dir: dir,
                    };
                }
                Err(e) => last_error = e,
            }
        }
        panic!("could not start two nsd instances: {last_error}");
    }

    fn resolver(&self) -> hickory_resolver::TokioResolver {
        operator::dns::resolver(Some(SocketAddr::from((self.ips[0], self.port)))).unwrap()
    }

    fn server(&self, i: usize) -> &Nsd {
        self.servers[i].as_ref().unwrap()
    }

    fn logs(&self) -> String {
        self.servers
            .iter()
            .flatten()
            .map(Nsd::log)
            .collect::<Vec<_>>()
            .join("\n")
    }
}

const SOA: Soa = Soa {
    serial: 1,
    ttl: 900,
    minimum: 300,
};

#[tokio::test]
async fn a_record_on_both_servers_is_visible_after_its_ttl_plus_the_negative_ttl() {
    let bin = require_nsd!();
    let value = dkim_value();
    // A record far bigger than the 1232-byte EDNS payload the check offers: its answer is
    // truncated over UDP and must be fetched again over TCP.
    let big = format!("v=DKIM1; k=rsa; p={}", "QUJD".repeat(800));
    let records = [
        ("sel._domainkey", 120, value.as_str()),
        ("big._domainkey", 45, big.as_str()),
    ];
    let pair = Pair::start(
        &bin,
        [Ipv4Addr::new(127, 0, 61, 1), Ipv4Addr::new(127, 0, 61, 2)],
        |ips| {
            [
                zone_text(&SOA, ips, &records),
                zone_text(&SOA, ips, &records),
            ]
        },
    )
    .await;
    let resolver = pair.resolver();

    let check = check_txt(&resolver, NAME, &value, pair.port, TIMEOUT).await;
    assert_eq!(check.zone, "rotation.test.");
    // min(MINIMUM 300, SOA TTL 900), not the zone's $TTL 3600.
    assert_eq!(check.negative_ttl, Some(300));
    let names: Vec<(&str, SocketAddr)> = check
        .servers
        .iter()
        .map(|s| (s.name.as_str(), s.address))
        .collect();
    assert_eq!(
        names,
        vec![
            (
                "ns1.rotation.test.",
                SocketAddr::from((pair.ips[0], pair.port))
            ),
            (
                "ns2.rotation.test.",
                SocketAddr::from((pair.ips[1], pair.port))
            ),
        ]
    );
    assert!(
        check
            .servers
            .iter()
            .all(|s| s.answer == ServerAnswer::Matches { ttl: 120 } && s.serial == Some(1)),
        "{check:#?}"
    );
    assert_eq!(
        check.verdict(),
        Verdict::Visible {
            wait: Duration::from_secs(120 + 300)
        }
    );

    let check = check_txt(
        &resolver,
        "big._domainkey.rotation.test",
        &big,
        pair.port,
        TIMEOUT,
    )
    .await;
    assert_eq!(
        check.verdict(),
        Verdict::Visible {
            wait: Duration::from_secs(45 + 300)
        },
        "{check:#?}\n{}",
        pair.logs()
    );
}

#[tokio::test]
async fn a_record_that_appears_late_becomes_visible_once_both_servers_reload() {
    let bin = require_nsd!();
    let value = dkim_value();
    // Here the SOA record's TTL is the smaller one: min(MINIMUM 700, SOA TTL 200) = 200.
    let before = Soa {
        serial: 1,
        ttl: 200,
        minimum: 700,
    };
    let after = Soa {
        serial: 2,
        ..before
    };
    let pair = Pair::start(
        &bin,
        [Ipv4Addr::new(127, 0, 61, 3), Ipv4Addr::new(127, 0, 61, 4)],
        |ips| [zone_text(&before, ips, &[]), zone_text(&before, ips, &[])],
    )
    .await;
    let resolver = pair.resolver();

    let check = check_txt(&resolver, NAME, &value, pair.port, TIMEOUT).await;
    assert!(
        check
            .servers
            .iter()
            .all(|s| s.answer == ServerAnswer::Missing),
        "{check:#?}"
    );
    assert_eq!(
        check.verdict(),
        Verdict::NotVisible {
            lagging: vec!["ns1.rotation.test.".into(), "ns2.rotation.test.".into()]
        }
    );

    let published = zone_text(&after, pair.ips, &[("sel._domainkey", 60, value.as_str())]);
    pair.server(0).replace_zone(&published);
    pair.server(1).replace_zone(&published);

    let until = Instant::now() + Duration::from_secs(30);
    let check = loop {
        let check = check_txt(&resolver, NAME, &value, pair.port, TIMEOUT).await;
        if matches!(check.verdict(), Verdict::Visible { .. }) || Instant::now() > until {
            break check;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        check.verdict(),
        Verdict::Visible {
            wait: Duration::from_secs(60 + 200)
        },
        "{check:#?}\n{}",
        pair.logs()
    );
    assert!(
        check.servers.iter().all(|s| s.serial == Some(2)),
        "{check:#?}"
    );
}

#[tokio::test]
async fn a_server_that_lags_is_named() {
    let bin = require_nsd!();
    let value = dkim_value();
    let pair = Pair::start(
        &bin,
        [Ipv4Addr::new(127, 0, 61, 5), Ipv4Addr::new(127, 0, 61, 6)],
        |ips| {
            [
                zone_text(&SOA, ips, &[("sel._domainkey", 120, value.as_str())]),
                zone_text(&SOA, ips, &[]),
            ]
        },
    )
    .await;

    let check = check_txt(&pair.resolver(), NAME, &value, pair.port, TIMEOUT).await;
    let answers: Vec<&ServerAnswer> = check.servers.iter().map(|s| &s.answer).collect();
    assert_eq!(
        answers,
        vec![&ServerAnswer::Matches { ttl: 120 }, &ServerAnswer::Missing]
    );
    assert_eq!(
        check.verdict(),
        Verdict::NotVisible {
            lagging: vec!["ns2.rotation.test.".into()]
        }
    );
}

#[tokio::test]
async fn a_server_that_is_down_means_nothing_is_known() {
    let bin = require_nsd!();
    let value = dkim_value();
    let records = [("sel._domainkey", 120, value.as_str())];
    let mut pair = Pair::start(
        &bin,
        [Ipv4Addr::new(127, 0, 61, 7), Ipv4Addr::new(127, 0, 61, 8)],
        |ips| {
            [
                zone_text(&SOA, ips, &records),
                zone_text(&SOA, ips, &records),
            ]
        },
    )
    .await;
    let resolver = pair.resolver();
    let check = check_txt(&resolver, NAME, &value, pair.port, TIMEOUT).await;
    assert!(
        matches!(check.verdict(), Verdict::Visible { .. }),
        "{check:#?}"
    );

    pair.servers[1] = None; // stops ns2
    let check = check_txt(&resolver, NAME, &value, pair.port, TIMEOUT).await;
    assert_eq!(check.servers[0].answer, ServerAnswer::Matches { ttl: 120 });
    assert!(
        matches!(check.servers[1].answer, ServerAnswer::Failed(_)),
        "{check:#?}"
    );
    match check.verdict() {
        Verdict::LookupFailed(why) => assert!(
            why.starts_with(&format!(
                "ns2.rotation.test. ({}:{})",
                pair.ips[1], pair.port
            )),
            "{why}"
        ),
        other => panic!("expected LookupFailed, got {other:?}"),
    }
}

#[tokio::test]
async fn a_server_with_another_value_lags() {
    let bin = require_nsd!();
    let value = dkim_value();
    let old = "v=DKIM1; k=rsa; p=T0xEIEtFWQ==";
    let pair = Pair::start(
        &bin,
        [Ipv4Addr::new(127, 0, 61, 9), Ipv4Addr::new(127, 0, 61, 10)],
        |ips| {
            [
                zone_text(&SOA, ips, &[("sel._domainkey", 120, value.as_str())]),
                zone_text(&SOA, ips, &[("sel._domainkey", 120, old)]),
            ]
        },
    )
    .await;

    let check = check_txt(&pair.resolver(), NAME, &value, pair.port, TIMEOUT).await;
    assert_eq!(check.servers[1].answer, ServerAnswer::Differs, "{check:#?}");
    assert_eq!(
        check.verdict(),
        Verdict::NotVisible {
            lagging: vec!["ns2.rotation.test.".into()]
        }
    );
}
