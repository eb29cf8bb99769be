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
