//! Command-line surface of the controller. Parsing and presentation live here;
//! the work is done by the library modules.

mod agents;
mod bootstrap;
mod ca;
mod certs;
mod deploy;
mod ha;
mod init;
mod lifecycle;
mod operators;
mod output;
mod preflight;
mod serve;
mod upgrade;
mod watch;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use imfleet_controller::serve::client::Endpoint;
use imfleet_controller::state::{ControllerState, InitReport, default_state_dir};
use imfleet_proto::agent::v1::control_request::Action;

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
    /// Once the command is done, upgrade (over mTLS) every agent it found
    /// older than this controller; without it, such agents are only named.
    #[arg(long, global = true)]
    pub upgrade_agents: bool,
    /// On a node without the state: ask `controller serve` through its API,
    /// as an operator: https://VIP:PORT (see `controller serve
    /// --api-listen`). Works for status, watch, events, rollouts and
    /// upgrade; ignored where the state is.
    #[arg(long, global = true, env = "IMFLEET_DAEMON", value_name = "URL")]
    pub daemon: Option<String>,
    /// The operator bundle presented with --daemon (written by
    /// `controller operators add`). Default: ~/.config/imfleet/operator.pem.
    #[arg(long, global = true, env = "IMFLEET_OPERATOR", value_name = "FILE")]
    pub operator: Option<PathBuf>,
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
    /// Manage the agents themselves (upgrade them over mTLS).
    #[command(subcommand)]
    Agents(agents::AgentsCommand),
    /// Certificates the fleet's CA issued (`certs renew` renews agents' now).
    Certs(certs::CertsArgs),
    /// The fleet CA (`ca rotate` replaces it, over mTLS).
    #[command(subcommand)]
    Ca(ca::CaCommand),
    /// Show a host's hardware, OS, network and configuration facts.
    Inventory(preflight::InventoryArgs),
    /// Check a host against PortSIP's requirements before installing.
    Preflight(preflight::PreflightArgs),
    /// Install the IM service on a host (bootstrapping it first if needed).
    Deploy(Box<deploy::DeployArgs>),
    /// State and health of the IM service per host.
    Status(lifecycle::StatusArgs),
    /// Start the IM service.
    Start(lifecycle::ControlArgs),
    /// Stop the IM service (grace period, then kill).
    Stop(lifecycle::ControlArgs),
    /// Stop, then start the IM service.
    Restart(lifecycle::ControlArgs),
    /// Remove the IM service's containers (data is kept unless --purge).
    Rm(lifecycle::RemoveArgs),
    /// Show the IM service's logs.
    Logs(lifecycle::LogsArgs),
    /// Run the daemon: health streams from every agent, events, history,
    /// Prometheus metrics (SIGHUP reloads, SIGTERM stops).
    Serve(serve::ServeArgs),
    /// Show recorded events (deploys, control, health changes).
    Events(serve::EventsArgs),
    /// Show the health history `controller serve` kept for a host.
    History(serve::HistoryArgs),
    /// The fleet live (from `controller serve`): agent, IM, CPU, memory, disk.
    Watch(watch::WatchArgs),
    /// Rolling, health-gated upgrade with automatic rollback (--resume, --abort).
    Upgrade(Box<upgrade::UpgradeArgs>),
    /// Recent rollouts and each host's outcome.
    Rollouts(upgrade::RolloutsArgs),
    /// People whose certificate lets their CLI use the daemon's API from
    /// any PBX node (add, list, revoke).
    Operators(operators::OperatorsArgs),
    /// Run `controller serve` under the PBX cluster's Pacemaker (install,
    /// status, agent).
    #[command(subcommand)]
    Ha(ha::HaCommand),
}

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let explicit_state = cli.state_dir.is_some();
    let dir = match cli.state_dir {
        Some(dir) => dir,
        None => default_state_dir()?,
    };
    let upgrading_agents = matches!(cli.command, Command::Agents(_));
    // The daemon's resource names its state directory on every node: a
    // default (a local disk) would not be the replicated one.
    if matches!(cli.command, Command::Ha(ha::HaCommand::Install(_))) && !explicit_state {
        anyhow::bail!(
            "`ha install` needs --state-dir (or IMFLEET_STATE_DIR): the state directory on the replicated filesystem, e.g. /var/lib/portsip/imfleet"
        );
    }
    // Through the daemon only from a node that does not hold the state:
    // where it is, the local socket reaches the same daemon, and every
    // command works (IMFLEET_DAEMON may be set on every node).
    if let Some(url) = &cli.daemon
        && !dir.join("ca.pem").exists()
        && !matches!(cli.command, Command::Ha(_))
    {
        let remote = remote_endpoint(url, cli.operator.as_deref())?;
        return remote_command(&dir, &remote, cli.command).await;
    }
    let outcome = command(&dir, cli.command).await;
    let older = imfleet_controller::fleet::older_agents();
    if older.is_empty() || upgrading_agents {
        return outcome;
    }
    let names: Vec<String> = older.iter().map(|(h, _)| h.clone()).collect();
    if cli.upgrade_agents {
        eprintln!(
            "upgrading the agents older than this controller: {}",
            names.join(", ")
        );
        let upgraded = agents::upgrade_hosts(&dir, names, false).await?;
        return Ok(if upgraded == ExitCode::SUCCESS {
            outcome?
        } else {
            upgraded
        });
    }
    for (host, revision) in &older {
        eprintln!(
            "note: {host} runs an agent older than this controller (protocol revision {revision}, this controller's is {}): `controller agents upgrade {host}` upgrades it over mTLS, the IM running on (or add --upgrade-agents to any command)",
            imfleet_proto::PROTOCOL_REVISION
        );
    }
    outcome
}

async fn command(dir: &std::path::Path, command: Command) -> anyhow::Result<ExitCode> {
    let dir = dir.to_path_buf();
    match command {
        Command::Init(args) => init::run(&dir, args),
        Command::Bootstrap(args) => bootstrap::run(&dir, args).await,
        Command::Ping(args) => agents::ping(&dir, args).await,
        Command::Hosts(args) => agents::hosts(&dir, args).await,
        Command::Agents(command) => agents::agents(&dir, command).await,
        Command::Certs(args) => certs::certs(&dir, args).await,
        Command::Ca(command) => ca::ca(&dir, command).await,
        Command::Inventory(args) => preflight::inventory(&dir, args).await,
        Command::Preflight(args) => preflight::preflight(&dir, args).await,
        Command::Deploy(args) => deploy::run(&dir, *args).await,
        Command::Status(args) => lifecycle::status(&dir, None, args).await,
        Command::Start(args) => lifecycle::control(&dir, args, Action::Start).await,
        Command::Stop(args) => lifecycle::control(&dir, args, Action::Stop).await,
        Command::Restart(args) => lifecycle::control(&dir, args, Action::Restart).await,
        Command::Rm(args) => lifecycle::remove(&dir, args).await,
        Command::Logs(args) => lifecycle::logs(&dir, args).await,
        Command::Serve(args) => serve::serve(&dir, args).await,
        Command::Events(args) => serve::events(&dir, None, args).await,
        Command::History(args) => serve::history(&dir, args).await,
        Command::Watch(args) => watch::watch(&dir, None, args).await,
        Command::Upgrade(args) => upgrade::upgrade(&dir, None, *args).await,
        Command::Rollouts(args) => upgrade::rollouts(&dir, None, args).await,
        Command::Operators(args) => operators::run(&dir, args).await,
        Command::Ha(command) => ha::ha(&dir, command).await,
    }
}

/// A command through the daemon's API (`--daemon`): those that read what
/// the daemon knows, and upgrades it drives. The others act from the node
/// that holds the state, so they are refused here with where to run them.
async fn remote_command(
    dir: &std::path::Path,
    remote: &Endpoint,
    command: Command,
) -> anyhow::Result<ExitCode> {
    match command {
        Command::Status(args) => lifecycle::status(dir, Some(remote), args).await,
        Command::Events(args) => serve::events(dir, Some(remote), args).await,
        Command::Watch(args) => watch::watch(dir, Some(remote), args).await,
        Command::Upgrade(args) => upgrade::upgrade(dir, Some(remote), *args).await,
        Command::Rollouts(args) => upgrade::rollouts(dir, Some(remote), args).await,
        other => anyhow::bail!(
            "`controller {}` works on the node that holds the state (where `controller serve` runs, the failover filesystem mounted), not through --daemon; through the daemon: status, watch, events, rollouts, upgrade (nothing was done)",
            command_name(&other)
        ),
    }
}

/// The subcommand's name as typed.
fn command_name(command: &Command) -> &'static str {
    match command {
        Command::Init(_) => "init",
        Command::Bootstrap(_) => "bootstrap",
        Command::Ping(_) => "ping",
        Command::Hosts(_) => "hosts",
        Command::Agents(_) => "agents",
        Command::Certs(_) => "certs",
        Command::Ca(_) => "ca",
        Command::Inventory(_) => "inventory",
        Command::Preflight(_) => "preflight",
        Command::Deploy(_) => "deploy",
        Command::Start(_) => "start",
        Command::Stop(_) => "stop",
        Command::Restart(_) => "restart",
        Command::Rm(_) => "rm",
        Command::Logs(_) => "logs",
        Command::Serve(_) => "serve",
        Command::History(_) => "history",
        Command::Operators(_) => "operators",
        Command::Ha(_) => "ha",
        Command::Status(_) => "status",
        Command::Events(_) => "events",
        Command::Watch(_) => "watch",
        Command::Upgrade(_) => "upgrade",
        Command::Rollouts(_) => "rollouts",
    }
}

/// The API endpoint of `--daemon`, with the operator's bundle.
fn remote_endpoint(url: &str, operator: Option<&std::path::Path>) -> anyhow::Result<Endpoint> {
    let path = match operator {
        Some(path) => path.to_owned(),
        None => dirs::config_dir()
            .context(
                "no home directory to find ~/.config/imfleet/operator.pem in; pass --operator FILE",
            )?
            .join("imfleet/operator.pem"),
    };
    let bundle = imfleet_controller::operators::Bundle::read(&path).with_context(|| {
        "--daemon needs an operator bundle (`controller operators add NAME --out FILE` on the active node, then copy it here, mode 0600); pass it with --operator or IMFLEET_OPERATOR"
    })?;
    Ok(Endpoint::remote(url, &bundle)?)
}

/// `hosts` or `--all` as a fleet selection.
fn selection(all: bool, hosts: &[String]) -> imfleet_controller::fleet::Selection {
    if all {
        imfleet_controller::fleet::Selection::All
    } else {
        imfleet_controller::fleet::Selection::Hosts(hosts.to_vec())
    }
}

/// The bootstrapped hosts of the state directory.
async fn open_fleet(dir: &std::path::Path) -> anyhow::Result<imfleet_controller::fleet::Fleet> {
    let state = open_state(dir)?;
    Ok(imfleet_controller::fleet::Fleet::new(&state))
}

/// Opens the initialised state directory (only `init` creates one).
fn open_state(dir: &std::path::Path) -> anyhow::Result<ControllerState> {
    ControllerState::open(dir)
        .with_context(|| format!("open the controller state in {}", dir.display()))
}

/// Opens the state directory, creating what is missing (`init`).
fn init_state(dir: &std::path::Path) -> anyhow::Result<(ControllerState, InitReport)> {
    ControllerState::open_or_init(dir)
        .with_context(|| format!("initialise the controller state in {}", dir.display()))
}
