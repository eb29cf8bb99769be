//! The `agent` command line: `serve` (what systemd or the supervisor runs),
//! `supervise`, the `identity` and `service` commands the one-time SSH
//! bootstrap uses, `version` (what an upgrade checks a new binary with) and
//! `upgrade-watch` (the watcher of an agent upgrade under systemd). In the
//! library so test builds of the agent (`test-flavors`) share it.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::config::AgentConfig;
use crate::{identity, server, supervision, upgrade};
use anyhow::Context;
use clap::{Parser, Subcommand};
use imfleet_proto::model::layout::{DEFAULT_ROOT, Layout};

#[derive(Parser)]
#[command(name = "agent", version, about = "imfleet agent for PortSIP IM hosts")]
struct Cli {
    /// Installation root holding bin/, etc/, run/ and log/.
    #[arg(long, global = true, default_value = DEFAULT_ROOT, env = "IMFLEET_AGENT_ROOT")]
    root: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the controller over mutual TLS (what systemd or the supervisor runs).
    Serve,
    /// Run `agent serve` and restart it whenever it exits.
    Supervise,
    /// Manage this host's identity (used by bootstrap).
    #[command(subcommand)]
    Identity(IdentityCommand),
    /// Install the config and (re)start the agent under its supervisor.
    #[command(subcommand)]
    Service(ServiceCommand),
    /// Print this build's version and protocol revision.
    Version {
        #[arg(long)]
        json: bool,
    },
    /// Restart the agent after an upgrade and restore the previous binary if
    /// the new one does not serve (run by an upgrade, in a unit of its own).
    UpgradeWatch,
}

#[derive(Subcommand)]
enum IdentityCommand {
    /// Generate a new private key on this host and print a CSR for it.
    Request {
        #[arg(long)]
        name: String,
    },
    /// Install a certificate bundle (agent certificate, then CA) read from stdin.
    Install,
    /// Print the installed certificate (exit status 3 when there is none).
    Show,
}

#[derive(Subcommand)]
enum ServiceCommand {
    /// Write the config and start (or restart) the agent.
    Install {
        /// Address and port to listen on.
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// The IM data path: deployments may only use directories under it
        /// and under --storage-dir.
        #[arg(long)]
        data_path: String,
        /// The operator's storage directory (`im.sh -f`), if any.
        #[arg(long)]
        storage_dir: Option<String>,
    },
    /// Stop the agent's own supervisor, if it runs one.
    Stop,
}

/// What `version --json` prints: what an upgrade checks a binary against.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct BuildInfo {
    pub version: String,
    pub protocol_revision: u32,
    pub platform: String,
}

impl BuildInfo {
    pub fn of_this_build() -> BuildInfo {
        BuildInfo {
            version: crate::version().to_owned(),
            protocol_revision: crate::protocol_revision(),
            platform: crate::platform(),
        }
    }
}

/// The agent's `main`.
pub fn main() -> ExitCode {
    imfleet_certs::install_crypto_provider();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("IMFLEET_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour only for a person: never into a log file or the journal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("agent: error: {err:#}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let layout = Layout::new(cli.root);
    match cli.command {
        Command::Serve => {
            let exit = runtime()?.block_on(serve(&layout))?;
            return Ok(exit);
        }
        Command::Version { json } => {
            let info = BuildInfo::of_this_build();
            if json {
                println!("{}", serde_json::to_string(&info)?);
            } else {
                println!(
                    "agent {} (protocol revision {}, {})",
                    info.version, info.protocol_revision, info.platform
                );
            }
        }
        Command::UpgradeWatch => {
            let outcome = runtime()?.block_on(upgrade::watch_under_systemd(&layout))?;
            return Ok(if outcome {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            });
        }
        Command::Supervise => {
            runtime()?.block_on(supervision::supervise(&layout))?;
        }
        Command::Identity(IdentityCommand::Request { name }) => {
            print!("{}", identity::request(&layout, &name)?);
        }
        Command::Identity(IdentityCommand::Install) => {
            let mut bundle = String::new();
            std::io::stdin()
                .read_to_string(&mut bundle)
                .context("read the certificate bundle from stdin")?;
            let info = identity::install(&layout, &bundle)?;
            println!(
                "installed certificate serial={} not_after={}",
                info.serial_hex,
                info.not_after.unix_timestamp()
            );
        }
        Command::Identity(IdentityCommand::Show) => match identity::current_certificate(&layout) {
            Some(pem) => print!("{pem}"),
            None => return Ok(ExitCode::from(3)),
        },
        Command::Service(ServiceCommand::Install {
            listen,
            data_path,
            storage_dir,
        }) => {
            let config = AgentConfig {
                listen,
                data_path: Some(data_path),
                storage_dir,
            };
            // Refuse here, while the operator watches, rather than at start.
            config
                .roots_on_host(layout.root())
                .map_err(anyhow::Error::msg)?;
            check_listen_address(listen)?;
            let how = supervision::install(&layout, &config)?;
            println!("supervision={}", how.as_str());
        }
        Command::Service(ServiceCommand::Stop) => {
            let stopped = supervision::stop_supervisor(&layout)?;
            println!("stopped={stopped}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start the async runtime")
}

/// Whether this host has the address to listen on (a running agent may
/// hold the port itself: only a foreign address is refused).
fn check_listen_address(listen: std::net::SocketAddr) -> anyhow::Result<()> {
    match std::net::TcpListener::bind(listen) {
        Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable => Err(anyhow::anyhow!(
            "cannot listen on {listen}: this host has no such address; pass the host's own address with --agent-bind"
        )),
        _ => Ok(()),
    }
}

/// Serves until SIGTERM (exit 0) or until an upgrade asks the agent's own
/// supervisor to restart it ([`upgrade::EXIT_FOR_UPGRADE`]).
async fn serve(layout: &Layout) -> anyhow::Result<ExitCode> {
    #[cfg(feature = "test-flavors")]
    crate::flavor::before_serving().await?;
    let config = AgentConfig::load(&layout.config())?;
    let roots = config.roots_on_host(layout.root()).map_err(|reason| {
        crate::config::ConfigError::Roots {
            path: layout.config().display().to_string(),
            reason,
        }
    })?;
    if roots.is_none() {
        tracing::warn!(
            "no data directories are configured: deployments are refused until `controller bootstrap` is run again"
        );
    }
    match supervision::raise_open_files_limit() {
        Ok(limit) => tracing::debug!(limit, "open files limit"),
        Err(e) => tracing::warn!("cannot raise the open files limit: {e}"),
    }
    let identity = identity::load(layout)?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listen on {}", config.listen))?;
    let facts = server::AgentFacts::detect();
    tracing::info!(
        listen = %config.listen,
        version = crate::version(),
        supervision = %facts.supervision,
        "agent serving over mutual TLS"
    );
    let restart = upgrade::RestartRequest::default();
    let restart_wanted = restart.clone();
    let shutdown = async move {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                    () = restart_wanted.wanted() => {}
                }
            }
            Err(e) => {
                tracing::warn!("no SIGTERM handler ({e}); stopping on Ctrl-C only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
        tracing::info!("shutting down");
    };
    upgrade::note_serving(layout);
    server::serve(
        layout,
        &identity,
        facts,
        roots,
        listener,
        restart.clone(),
        shutdown,
    )
    .await?;
    Ok(if restart.is_wanted() {
        ExitCode::from(upgrade::EXIT_FOR_UPGRADE)
    } else {
        ExitCode::SUCCESS
    })
}
