//! `petrel-mta`: the command line. `serve` runs the MTA (the embedded default without
//! `--config`); `check-config` validates a config file without starting anything.

use clap::{Parser, Subcommand};
use mta::qmgr::{AdminRequest, AdminResponse};
use mta::queue::QueueId;
use mta::server::Server;
use mta_config::{LocalDelivery, MtaConfig};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "petrel-mta", version, about = "Petrel mail transfer agent")]
struct Cli {
    /// Log format: `text` for people, `json` for machines.
    #[arg(long, global = true, env = "PETREL_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the MTA. Without --config: plain SMTP on 127.0.0.1:2525, data under ./petrel-data/.
    Serve {
        /// YAML MtaConfig file.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Validate a config file and exit: 0 when valid, 1 with the problems otherwise. The
    /// files `serve` needs at start (the AUTH users file) must exist and parse here too.
    CheckConfig {
        /// YAML MtaConfig file.
        file: PathBuf,
        /// Check the document only, not the files it names: for a config meant for
        /// another machine (what the operator renders for a pod).
        #[arg(long)]
        document_only: bool,
    },
    /// Add or replace a user in an AUTH users file; the password is read from stdin.
    Passwd {
        /// User name (usually an address).
        user: String,
        /// The users file (`smtpd.auth_users_file`); created when missing.
        #[arg(long, short)]
        file: PathBuf,
        /// An address or @domain the user may send as (repeatable), or `*` for any address
        /// and the null sender `<>` (bounces, auto-replies). Default: the user name.
        #[arg(long = "sender")]
        senders: Vec<String>,
    },
    /// Inspect and operate the queue of a running petrel-mta (through its admin endpoint).
    /// Run it as the MTA's user: every request carries the token the MTA writes (0600).
    Queue {
        /// Admin endpoint address. Default: `admin.address` from --config, else 127.0.0.1:2580.
        #[arg(long, global = true)]
        admin: Option<std::net::SocketAddr>,
        /// Config file to take the admin address and token file from.
        #[arg(long, short, global = true, env = "PETREL_CONFIG")]
        config: Option<PathBuf>,
        /// File holding the admin token. Default: the config's (`admin.token_file`, else
        /// `admin.token` beside the spool), else ./petrel-data/admin.token.
        #[arg(long, global = true)]
        token_file: Option<PathBuf>,
        /// Print the raw JSON response instead of a table.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        op: QueueOp,
    },
}

#[derive(Subcommand)]
enum QueueOp {
    /// List queued messages.
    List,
    /// Show one message with its recipients' statuses.
    Show { id: QueueId },
    /// Attempt delivery now: one message, those for --domain, or all.
    Flush {
        id: Option<QueueId>,
        #[arg(long)]
        domain: Option<String>,
    },
    /// Stop attempting a message until released.
    Hold { id: QueueId },
    /// Release a held message, or with --all every held message.
    Release {
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<QueueId>,
        #[arg(long)]
        all: bool,
    },
    /// Remove a message without notifying anyone.
    Delete { id: QueueId },
    /// Fail a message's pending recipients now and notify its sender.
    Bounce { id: QueueId },
    /// Show the outbound sites: connections open and allowed, message rate, learnt
    /// ceilings, strikes and suspensions; suspended and throttled sites first.
    Sites,
    /// Drain this MTA (before removing it): refuse new mail, keep delivering for
    /// --deliver-for, then hand every message left to the --peer MTAs (their HTTP
    /// `host:port`; they need the same admin.fleet_token_file), and write the drained
    /// marker once the spool is empty. Asking again updates the peers. Prints progress.
    Drain {
        /// A peer's HTTP address (`host:port`); repeat for several.
        #[arg(long = "peer", value_name = "HOST:PORT")]
        peers: Vec<String>,
        /// How long to keep delivering before handing over.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        deliver_for: std::time::Duration,
        /// Only show progress.
        #[arg(long, conflicts_with_all = ["peers", "cancel"])]
        status: bool,
        /// Stop draining: take mail again (removes the drained marker).
        #[arg(long, conflicts_with = "peers")]
        cancel: bool,
    },
}

/// What `check-config` checks beyond the document itself: the files that `serve` reads at
/// start and would stop on. The users file must exist and parse (`serve` refuses to start
/// without it, so a config that passes here would not run).
fn check_files(config: &MtaConfig) -> Result<(), String> {
    if let Some(path) = &config.smtpd.auth_users_file {
        mta::users::Users::load(path).map_err(|e| format!("smtpd.auth_users_file: {e}"))?;
    }
    Ok(())
}

fn main() -> ExitCode {
    mta::memory::return_large_allocations();
    let cli = Cli::parse();
    // Logs, and traces/metrics over OTLP when the standard OTEL_* variables ask for them.
    let json = matches!(cli.log_format, LogFormat::Json);
    let _telemetry = match mta_telemetry::init("petrel-mta", json) {
        Ok(guard) => Some(guard),
        Err(e) => {
            eprintln!("petrel-mta: telemetry not started: {e}");
            None
        }
    };
    match cli.command {
        Command::CheckConfig {
            file,
            document_only,
        } => match MtaConfig::from_file(&file)
            .map_err(|e| e.to_string())
            .and_then(|config| match document_only {
                true => Ok(()),
                false => check_files(&config),
            }) {
            Ok(()) => {
                println!("{}: valid", file.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{}: {e}", file.display());
                ExitCode::FAILURE
            }
        },
        Command::Passwd {
            user,
            file,
            senders,
        } => {
            let mut password = String::new();
            if std::io::stdin().read_line(&mut password).is_err() || password.trim_end().is_empty()
            {
                eprintln!("petrel-mta passwd: give the password on standard input");
                return ExitCode::FAILURE;
            }
            let password = password.trim_end_matches(['\r', '\n']);
            match mta::users::set_password(&file, &user, password, &senders) {
                Ok(()) => {
                    println!("{}: {user} set", file.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("petrel-mta passwd: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Queue {
            admin,
            config,
            token_file,
            json,
            op,
        } => {
            let config = match config {
                Some(file) => match MtaConfig::from_file(&file) {
                    Ok(config) => config,
                    Err(e) => {
                        eprintln!("{}: {e}", file.display());
                        return ExitCode::FAILURE;
                    }
                },
                None => MtaConfig::embedded_default(),
            };
            let address = admin.unwrap_or(config.admin.address);
            let token_file = token_file.unwrap_or_else(|| config.admin_token_file());
            let token = match mta::admin::Token::read(&token_file) {
                Ok(token) => token,
                Err(e) => {
                    eprintln!("petrel-mta queue: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    eprintln!("cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            runtime.block_on(queue_command(address, &token, op, json))
        }
        Command::Serve { config: path } => {
            let config = match &path {
                None => MtaConfig::embedded_default(),
                Some(file) => match MtaConfig::from_file(file) {
                    Ok(config) => config,
                    Err(e) => {
                        eprintln!("{}: {e}", file.display());
                        return ExitCode::FAILURE;
                    }
                },
            };
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(runtime) => runtime,
                Err(e) => {
                    eprintln!("cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            runtime.block_on(serve(config, path))
        }
    }
}

async fn queue_command(
    address: std::net::SocketAddr,
    token: &mta::admin::Token,
    op: QueueOp,
    json: bool,
) -> ExitCode {
    let request = match op {
        QueueOp::Drain {
            peers,
            deliver_for,
            status,
            cancel,
        } => {
            let op = if status {
                mta::drain::AdminDrain::DrainStatus
            } else if cancel {
                mta::drain::AdminDrain::DrainCancel
            } else {
                mta::drain::AdminDrain::Drain(mta::drain::Plan {
                    peers,
                    deliver_for_secs: deliver_for.as_secs(),
                })
            };
            return drain_command(address, token, op, json).await;
        }
        QueueOp::List => return list_command(address, token, json).await,
        QueueOp::Sites => return sites_command(address, token, json).await,
        QueueOp::Show { id } => AdminRequest::Show { id },
        QueueOp::Flush { id, domain } => AdminRequest::Flush { id, domain },
        QueueOp::Hold { id } => AdminRequest::Hold { id },
        QueueOp::Release { id, .. } => AdminRequest::Release { id },
        QueueOp::Delete { id } => AdminRequest::Delete { id },
        QueueOp::Bounce { id } => AdminRequest::Bounce { id },
    };
    let response = match mta::admin::request(address, token, &request).await {
        Ok(response) => response,
        Err(e) => {
            eprintln!("petrel-mta queue: {e}");
            return ExitCode::FAILURE;
        }
    };
    print_response(&response, json, || mta::admin::render(&response));
    match response {
        AdminResponse::NotFound { .. } => ExitCode::FAILURE,
        _ => ExitCode::SUCCESS,
    }
}

/// Prints an admin response: the endpoint's JSON as it came with `--json`, else what
/// `render` makes of it for a person.
fn print_response<T: serde::Serialize>(response: &T, json: bool, render: impl FnOnce() -> String) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(response).unwrap_or_default()
        );
    } else {
        print!("{}", render());
    }
}

/// `queue list`: the table is printed page by page as the MTA streams it; `--json`
/// prints the same single object as before, once every page is in.
async fn list_command(
    address: std::net::SocketAddr,
    token: &mta::admin::Token,
    json: bool,
) -> ExitCode {
    let mut all = Vec::new();
    if !json {
        print!("{}", mta::admin::render_list_header());
    }
    let listed = mta::admin::list(address, token, |page| {
        if json {
            all.extend(page);
        } else {
            print!("{}", mta::admin::render_list_rows(&page));
        }
    })
    .await;
    match listed {
        Ok(count) => {
            let response = AdminResponse::List { messages: all };
            print_response(&response, json, || mta::admin::render_list_footer(count));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("petrel-mta queue: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `queue sites`: the table, or with `--json` the endpoint's response as it came.
async fn sites_command(
    address: std::net::SocketAddr,
    token: &mta::admin::Token,
    json: bool,
) -> ExitCode {
    let request = mta::admin::SitesRequest::Sites;
    let response: mta::admin::SitesResponse =
        match mta::admin::request(address, token, &request).await {
            Ok(response) => response,
            Err(e) => {
                eprintln!("petrel-mta queue sites: {e}");
                return ExitCode::FAILURE;
            }
        };
    let mta::admin::SitesResponse::Sites { sites } = &response;
    print_response(&response, json, || mta::admin::render_sites(sites));
    ExitCode::SUCCESS
}

async fn drain_command(
    address: std::net::SocketAddr,
    token: &mta::admin::Token,
    op: mta::drain::AdminDrain,
    json: bool,
) -> ExitCode {
    let response: mta::admin::DrainResponse = match mta::admin::request(address, token, &op).await {
        Ok(response) => response,
        Err(e) => {
            eprintln!("petrel-mta queue drain: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mta::admin::DrainResponse::Drain(report) = &response;
    print_response(&response, json, || mta::admin::render_drain(report));
    ExitCode::SUCCESS
}

async fn serve(config: MtaConfig, path: Option<PathBuf>) -> ExitCode {
    let summary = describe(&config);
    // Before anything listens: a signal sent as soon as "listening" appears must drain,
    // not kill with the default action.
    let stop = StopSignals::install();
    let server = match Server::start(config, path).await {
        Ok(server) => server,
        Err(e) => {
            eprintln!("petrel-mta: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(address) = server.http_address {
        println!("petrel-mta: /metrics, /healthz and /readyz on http://{address}");
    }
    if let Some(address) = server.admin_address {
        println!("petrel-mta: admin endpoint (petrel-mta queue --admin {address}) on {address}");
        println!(
            "petrel-mta: admin token in {} (readable by this user only)",
            server.admin_token_file.display()
        );
    }
    // Last: whoever waits for this line (scripts, the e2e suite) finds the others printed.
    for address in &server.addresses {
        println!("petrel-mta: listening for SMTP on {address}");
    }
    print!("{summary}");
    if server.recovered > 0 {
        println!(
            "petrel-mta: {} queued messages in the spool, being scheduled in the background",
            server.recovered
        );
    }
    stop.recv().await;
    println!("petrel-mta: shutting down (finishing sessions in progress)");
    server.shutdown().await;
    println!("petrel-mta: stopped");
    ExitCode::SUCCESS
}

fn describe(config: &MtaConfig) -> String {
    let mut out = format!("petrel-mta: spool in {}\n", config.spool.path.display());
    for domain in &config.local_domains {
        out += &match &domain.delivery {
            LocalDelivery::Maildir { root } => format!(
                "petrel-mta: mail for <user>@{} lands in {}/<user>/new\n",
                domain.name,
                root.display()
            ),
            LocalDelivery::Lmtp { address } => format!(
                "petrel-mta: mail for <user>@{} goes to LMTP at {address}\n",
                domain.name
            ),
            LocalDelivery::Relay { host, .. } => format!(
                "petrel-mta: mail for <user>@{} is forwarded to {host}\n",
                domain.name
            ),
        };
    }
    if config.relay.client_networks.is_empty() {
        out += "petrel-mta: mail for any other domain is refused (550 5.7.1: no relaying)\n";
    } else {
        let nets: Vec<String> = config
            .relay
            .client_networks
            .iter()
            .map(|n| n.to_string())
            .collect();
        out += &format!("petrel-mta: relaying for clients in {}\n", nets.join(", "));
    }
    out
}

/// SIGINT and SIGTERM handlers. Installed before the MTA says it listens, so a signal sent
/// as soon as that line appears asks for a clean stop instead of killing the process.
struct StopSignals {
    interrupt: Option<tokio::signal::unix::Signal>,
    terminate: Option<tokio::signal::unix::Signal>,
}

impl StopSignals {
    fn install() -> Self {
        use tokio::signal::unix::{SignalKind, signal};
        Self {
            interrupt: signal(SignalKind::interrupt()).ok(),
            terminate: signal(SignalKind::terminate()).ok(),
        }
    }

    async fn recv(mut self) {
        async fn next(signal: Option<&mut tokio::signal::unix::Signal>) {
            match signal {
                Some(signal) => {
                    signal.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            () = next(self.interrupt.as_mut()) => {}
            () = next(self.terminate.as_mut()) => {}
        }
    }
}
