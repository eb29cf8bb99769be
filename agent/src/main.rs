//! `agent`: the imfleet agent binary. Normally started by systemd or by its own
//! supervisor; the `identity` and `service` commands are used by the
//! controller during the one-time SSH bootstrap.
#![forbid(unsafe_code)]

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use imfleet_agent::config::AgentConfig;
use imfleet_agent::layout::{DEFAULT_ROOT, Layout};
use imfleet_agent::{identity, server, supervision};

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
    },
    /// Stop the agent's own supervisor, if it runs one.
    Stop,
}

fn main() -> ExitCode {
    imfleet_certs::install_crypto_provider();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("IMFLEET_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
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
            runtime()?.block_on(serve(&layout))?;
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
        Command::Service(ServiceCommand::Install { listen }) => {
            let how = supervision::install(&layout, &AgentConfig { listen })?;
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

async fn serve(layout: &Layout) -> anyhow::Result<()> {
    let config = AgentConfig::load(&layout.config())?;
    let identity = identity::load(layout)?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listen on {}", config.listen))?;
    let facts = server::AgentFacts::detect(&identity);
    tracing::info!(
        listen = %config.listen,
        version = imfleet_agent::VERSION,
        supervision = %facts.supervision,
        "agent serving over mutual TLS"
    );
    let shutdown = async {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(e) => {
                tracing::warn!("no SIGTERM handler ({e}); stopping on Ctrl-C only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
        tracing::info!("shutting down");
    };
    server::serve(layout, &identity, facts, listener, shutdown).await?;
    Ok(())
}
