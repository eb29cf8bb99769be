//! `ping` and `hosts`: read-only views of agents over mTLS.

use std::path::Path;
use std::process::ExitCode;

use clap::Args;
use imfleet_controller::fleet::Selection;
use imfleet_controller::fleet::ops::{self, AgentStatus};

use super::output;

#[derive(Args)]
pub struct PingArgs {
    /// Hosts to ping, by name or agent address (see `controller hosts`).
    #[arg(required_unless_present = "all")]
    hosts: Vec<String>,
    /// Ping every bootstrapped host.
    #[arg(long, conflicts_with = "hosts")]
    all: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct HostsArgs {
    #[command(subcommand)]
    command: Option<HostsCommand>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Subcommand)]
enum HostsCommand {
    /// Decommission a host: revoke its certificates (refused from now on,
    /// even if it comes back) and remove it with its deployment records and
    /// history. Nothing on the host is changed: remove the IM first
    /// (`controller rm HOST --yes`) if it should not keep running.
    Forget(ForgetArgs),
}

#[derive(Args)]
struct ForgetArgs {
    /// The host, by name or agent address.
    host: String,
    /// Confirm: the host's records cannot be brought back.
    #[arg(long)]
    yes: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

fn render(statuses: &[AgentStatus]) {
    let mut table = output::table(&[
        "HOST",
        "ADDRESS",
        "AGENT",
        "UPTIME",
        "CERT EXPIRES",
        "RTT",
        "STATUS",
    ]);
    for s in statuses {
        table.add_row(vec![
            s.host.clone(),
            s.address.clone(),
            s.agent_version.clone().unwrap_or_else(|| "-".into()),
            s.uptime_seconds
                .map(output::uptime)
                .unwrap_or_else(|| "-".into()),
            format!(
                "{} ({} d)",
                &s.certificate_not_after[..10.min(s.certificate_not_after.len())],
                s.certificate_days_left
            ),
            s.round_trip_ms
                .map(output::millis)
                .unwrap_or_else(|| "-".into()),
            if s.reachable {
                "ok".into()
            } else {
                "UNREACHABLE".into()
            },
        ]);
    }
    println!("{table}");
    for s in statuses.iter().filter(|s| !s.reachable) {
        if let Some(err) = &s.error {
            eprintln!("{}: {}", s.host, output::shown(err, 4096));
        }
    }
}

pub async fn ping(dir: &Path, args: PingArgs) -> anyhow::Result<ExitCode> {
    let fleet = super::open_fleet(dir).await?;
    let hosts = fleet
        .resolve(&super::selection(args.all, &args.hosts))
        .await?;
    let statuses = ops::ping(&fleet, &hosts).await;
    if args.json {
        output::print_json(&statuses)?;
    } else {
        render(&statuses);
    }
    Ok(if statuses.iter().all(|s| s.reachable) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

pub async fn hosts(dir: &Path, args: HostsArgs) -> anyhow::Result<ExitCode> {
    let fleet = super::open_fleet(dir).await?;
    if let Some(HostsCommand::Forget(forget)) = args.command {
        if !forget.yes {
            anyhow::bail!(
                "forgetting {} revokes its certificates and removes its records for good; run again with --yes (nothing was changed)",
                output::shown(&forget.host, 256)
            );
        }
        let (host, revoked) = fleet.forget(&forget.host).await?;
        if forget.json {
            output::print_json(&serde_json::json!({
                "host": host.name,
                "forgotten": true,
                "certificates_revoked": revoked,
            }))?;
        } else {
            println!(
                "{}: forgotten; {revoked} certificate(s) revoked. The agent and the IM service, if any, still run on the host.",
                host.name
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    let hosts = fleet.resolve(&Selection::All).await?;
    let statuses = ops::ping(&fleet, &hosts).await;
    if args.json {
        output::print_json(&statuses)?;
    } else if statuses.is_empty() {
        println!("No hosts yet. Add one with `controller bootstrap <host>`.");
    } else {
        render(&statuses);
    }
    Ok(ExitCode::SUCCESS)
}

/// What `controller agents` does.
#[derive(clap::Subcommand)]
pub enum AgentsCommand {
    /// Replace hosts' agents with the one built with this controller, over
    /// mTLS (no SSH). Each host checks the binary, keeps the previous one,
    /// restarts the agent and puts the previous one back by itself if the
    /// new one does not serve. The IM service keeps running.
    Upgrade(AgentsUpgradeArgs),
}

#[derive(Args)]
pub struct AgentsUpgradeArgs {
    /// Hosts by name or agent address.
    #[arg(required_unless_present = "all")]
    hosts: Vec<String>,
    /// Every bootstrapped host.
    #[arg(long, conflicts_with = "hosts")]
    all: bool,
    /// Hosts upgraded at once.
    #[arg(long, default_value_t = 4, value_name = "N")]
    max_parallel: usize,
    /// The agent to ship (default: `agent` next to this controller).
    #[arg(long, env = "IMFLEET_AGENT_BINARY", value_name = "FILE")]
    agent_binary: Option<std::path::PathBuf>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn agents(dir: &Path, command: AgentsCommand) -> anyhow::Result<ExitCode> {
    let AgentsCommand::Upgrade(args) = command;
    upgrade(dir, args).await
}

/// Upgrades the agents of `hosts` to the one beside this controller (what
/// `--upgrade-agents` does after another command).
pub async fn upgrade_hosts(dir: &Path, hosts: Vec<String>, json: bool) -> anyhow::Result<ExitCode> {
    upgrade(
        dir,
        AgentsUpgradeArgs {
            hosts,
            all: false,
            max_parallel: 4,
            agent_binary: std::env::var_os("IMFLEET_AGENT_BINARY").map(std::path::PathBuf::from),
            json,
        },
    )
    .await
}

async fn upgrade(dir: &Path, args: AgentsUpgradeArgs) -> anyhow::Result<ExitCode> {
    use imfleet_controller::agent_upgrade::{AgentBuild, Upgraded, upgrade_agents};
    let state = super::open_state(dir)?;
    let fleet = imfleet_controller::fleet::Fleet::new(&state);
    let hosts = fleet
        .resolve(&super::selection(args.all, &args.hosts))
        .await?;
    let path = imfleet_controller::bootstrap::locate_agent_binary(args.agent_binary.as_deref())?;
    let build = AgentBuild::read(&path, &state.ca.load()?).await?;
    let progress = output::Progress::new(args.json);
    progress.message(format!(
        "upgrading {} host(s) to agent {}",
        hosts.len(),
        build.version
    ));
    let results = upgrade_agents(&fleet, &hosts, &build, args.max_parallel, progress.sink()).await;
    progress.finish();
    if args.json {
        output::print_json(&output::host_results_json(&results, "result"))?;
        return Ok(output::exit_for(&results));
    }
    let mut table = output::table(&["HOST", "AGENT", "OUTCOME"]);
    for r in &results {
        let (agent, outcome) = match &r.result {
            Ok(Upgraded::UpToDate { version }) => (version.clone(), "up to date".to_owned()),
            Ok(Upgraded::Upgraded { from, to }) => (format!("{from} -> {to}"), "upgraded".into()),
            Err(_) => ("-".into(), "FAILED".into()),
        };
        table.add_row(vec![r.host.name.clone(), agent, outcome]);
    }
    println!("{table}");
    Ok(output::host_errors(&results))
}
