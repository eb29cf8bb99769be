//! Command-line surface of the controller. Parsing and presentation live here;
//! the work is done by the library modules.

mod agents;
mod bootstrap;
mod init;
mod output;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use imfleet_controller::state::{ControllerState, InitReport, default_state_dir};

#[derive(Parser)]
#[command(
    name = "controller",
    version,
    about = "Deploy and operate PortSIP IM servers from pbx01",
    long_about = "Bootstraps the imfleet agent onto IM hosts over SSH once, then drives them over mutual TLS."
)]
pub struct Cli {
    /// Controller state directory (CA, identity, database).
    /// Default: /var/lib/imfleet as root, $XDG_DATA_HOME/imfleet otherwise.
    #[arg(long, global = true, env = "IMFLEET_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// More log output (-v info, -vv debug). IMFLEET_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Create the state directory, CA and controller identity (idempotent).
    Init(init::InitArgs),
    /// Install the agent on a host over SSH (once), then talk to it over mTLS.
    Bootstrap(bootstrap::BootstrapArgs),
    /// Check that agents answer over mTLS, with version, uptime and round trip.
    Ping(agents::PingArgs),
    /// List bootstrapped hosts and whether their agents answer.
    Hosts(agents::HostsArgs),
}

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let dir = match cli.state_dir {
        Some(dir) => dir,
        None => default_state_dir()?,
    };
    match cli.command {
        Command::Init(args) => init::run(&dir, args),
        Command::Bootstrap(args) => bootstrap::run(&dir, args).await,
        Command::Ping(args) => agents::ping(&dir, args).await,
        Command::Hosts(args) => agents::hosts(&dir, args).await,
    }
}

/// Opens the state directory, creating it on first use.
fn open_state(dir: &std::path::Path) -> anyhow::Result<(ControllerState, InitReport)> {
    ControllerState::open_or_init(dir)
        .with_context(|| format!("open the controller state in {}", dir.display()))
}
