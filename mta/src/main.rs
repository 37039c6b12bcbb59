//! `petrel-mta`: the command line. `serve` runs the MTA (the embedded default without
//! `--config`); `check-config` validates a config file without starting anything.

use clap::{Parser, Subcommand};
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
    /// Validate a config file and exit: 0 when valid, 1 with the problems otherwise.
    CheckConfig {
        /// YAML MtaConfig file.
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::CheckConfig { file } => match MtaConfig::from_file(&file) {
            Ok(_) => {
                println!("{}: valid", file.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{}: {e}", file.display());
                ExitCode::FAILURE
            }
        },
        Command::Serve { config } => {
            let config = match config {
                None => MtaConfig::embedded_default(),
                Some(file) => match MtaConfig::from_file(&file) {
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
            runtime.block_on(serve(config))
        }
    }
}

async fn serve(config: MtaConfig) -> ExitCode {
    let summary = describe(&config);
    let server = match Server::start(config).await {
        Ok(server) => server,
        Err(e) => {
            eprintln!("petrel-mta: {e}");
            return ExitCode::FAILURE;
        }
    };
    for address in &server.addresses {
        println!("petrel-mta: listening for SMTP on {address}");
    }
    print!("{summary}");
    if server.recovered > 0 {
        println!(
            "petrel-mta: {} queued messages recovered from the spool",
            server.recovered
        );
    }
    wait_for_signal().await;
    println!("petrel-mta: shutting down (finishing sessions in progress)");
    server.shutdown().await;
    println!("petrel-mta: stopped");
    ExitCode::SUCCESS
}

fn describe(config: &MtaConfig) -> String {
    let mut out = format!("petrel-mta: spool in {}\n", config.spool.path.display());
    for domain in &config.local_domains {
        let LocalDelivery::Maildir { root } = &domain.delivery;
        out += &format!(
            "petrel-mta: mail for <user>@{} lands in {}/<user>/new\n",
            domain.name,
            root.display()
        );
    }
    out += "petrel-mta: mail for any other domain is refused (550 5.7.1: no relaying)\n";
    out
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
