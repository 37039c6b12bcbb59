//! `petrel-operator`: the command line. `run` starts the controllers against the cluster
//! in KUBECONFIG/in-cluster config; `render` and `dns` run the same render and DNS
//! guidance code on CR files with no cluster at all.

use clap::{Parser, Subcommand, ValueEnum};
use operator::controller::Settings;
use operator::keys::SystemKeys;
use operator::{dns, input, render};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "petrel-operator",
    version,
    about = "Runs Petrel mail on Kubernetes"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, env = "PETREL_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Reconcile Petrel resources in the cluster (KUBECONFIG or in-cluster config).
    Run {
        /// DNS server used to check MailDomain records (default: the system resolvers).
        #[arg(long, env = "PETREL_DNS_SERVER")]
        dns_server: Option<SocketAddr>,
        /// Where to serve the operator's /metrics, /healthz and /readyz.
        #[arg(long, env = "PETREL_METRICS_ADDRESS", default_value = "0.0.0.0:8080")]
        metrics_address: Option<SocketAddr>,
        /// Watch only these namespaces (comma-separated); Roles there are then all the
        /// RBAC needed. Default: the whole cluster.
        #[arg(long, env = "PETREL_WATCH_NAMESPACES", value_delimiter = ',')]
        watch_namespaces: Vec<String>,
        /// The petrel-mta image for SmtpListeners that name none. Default: the image
        /// of this operator's version.
        #[arg(long, env = "PETREL_MTA_IMAGE")]
        mta_image: Option<String>,
    },
    /// Print every object the operator would apply for the given CR files, as YAML.
    Render {
        /// CR files or directories of them (MailDomain, SmtpListener, RelayPolicy, DkimKey,
        /// and optionally existing Secrets).
        #[arg(short = 'f', long = "filename", required = true, num_args = 1..)]
        files: Vec<PathBuf>,
        /// Namespace for resources that name none.
        #[arg(short, long, default_value = "default")]
        namespace: String,
        /// The petrel-mta image for SmtpListeners that name none.
        #[arg(long, env = "PETREL_MTA_IMAGE")]
        mta_image: Option<String>,
    },
    /// Print the DNS records a MailDomain needs, as a BIND zone fragment.
    Dns {
        /// File(s) with the MailDomain (and optionally its SmtpListeners, DkimKeys, Secrets).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Namespace for resources that name none.
        #[arg(short, long, default_value = "default")]
        namespace: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run {
            dns_server,
            metrics_address,
            watch_namespaces,
            mta_image,
        } => run(
            Settings {
                dns_server,
                metrics_address,
                watch_namespaces,
                mta_image,
            },
            matches!(cli.log_format, LogFormat::Json),
        ),
        Command::Render {
            files,
            namespace,
            mta_image,
        } => render_cmd(&files, &namespace, mta_image),
        Command::Dns { files, namespace } => dns_cmd(&files, &namespace),
    }
}

fn run(settings: Settings, json_logs: bool) -> ExitCode {
    // Logs, and a trace per reconcile over OTLP when OTEL_* variables ask for it.
    let _telemetry = match mta_telemetry::init("petrel-operator", json_logs) {
        Ok(guard) => Some(guard),
        Err(e) => {
            eprintln!("petrel-operator: telemetry not started: {e}");
            None
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("petrel-operator: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(operator::controller::run(settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("petrel-operator: {e}");
            ExitCode::FAILURE
        }
    }
}

fn render_cmd(files: &[PathBuf], namespace: &str, mta_image: Option<String>) -> ExitCode {
    let world = match input::load(files, namespace) {
        Ok(world) => render::World { mta_image, ..world },
        Err(e) => {
            eprintln!("petrel-operator render: {e}");
            return ExitCode::FAILURE;
        }
    };
    let rendered = render::render(&world, &mut SystemKeys).and_then(|d| render::to_yaml(&d));
    match rendered {
        Ok(yaml) => {
            print!("{yaml}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("petrel-operator render: {e}");
            ExitCode::FAILURE
        }
    }
}

fn dns_cmd(files: &[PathBuf], namespace: &str) -> ExitCode {
    let world = match input::load(files, namespace) {
        Ok(world) => world,
        Err(e) => {
            eprintln!("petrel-operator dns: {e}");
            return ExitCode::FAILURE;
        }
    };
    if world.domains.is_empty() {
        eprintln!("petrel-operator dns: no MailDomain in the given files");
        return ExitCode::FAILURE;
    }
    for domain in &world.domains {
        let ns = kube::ResourceExt::namespace(domain).unwrap_or_default();
        let local = world.in_namespace(&ns);
        let guidance = dns::guidance(domain, &local, &[]);
        print!("{}", dns::zone_fragment(domain, &guidance));
    }
    ExitCode::SUCCESS
}
