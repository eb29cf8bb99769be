//! `ping` and `hosts`: read-only views of agents over mTLS.

use std::path::Path;
use std::process::ExitCode;

use clap::Args;
use imfleet_controller::agent_client::{Agent, AgentAddress};
use imfleet_controller::state::{ClientIdentity, ControllerState};
use imfleet_controller::store::HostRecord;
use serde::Serialize;

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

/// One host's answer (or silence).
#[derive(Debug, Serialize)]
struct HostStatus {
    host: String,
    address: String,
    reachable: bool,
    agent_version: Option<String>,
    hostname: Option<String>,
    uptime_seconds: Option<u64>,
    supervision: Option<String>,
    certificate_not_after: String,
    certificate_days_left: i64,
    round_trip_ms: Option<f64>,
    bootstrapped_at: String,
    error: Option<String>,
}

async fn probe(
    state: &ControllerState,
    identity: &ClientIdentity,
    host: &HostRecord,
) -> HostStatus {
    let address = AgentAddress {
        host: host.agent_address.clone(),
        port: host.agent_port,
    };
    let outcome = async {
        let agent = Agent::connect(identity, &address).await?;
        agent.ping().await
    }
    .await;
    let mut status = HostStatus {
        host: host.name.clone(),
        address: address.to_string(),
        reachable: false,
        agent_version: None,
        hostname: None,
        uptime_seconds: None,
        supervision: None,
        certificate_not_after: output::rfc3339(host.cert_not_after),
        certificate_days_left: (host.cert_not_after - imfleet_controller::now_unix()) / 86_400,
        round_trip_ms: None,
        bootstrapped_at: output::rfc3339(host.bootstrapped_at),
        error: None,
    };
    match outcome {
        Ok(pong) => {
            let reply = pong.reply;
            let _ = state.store.mark_seen(
                &host.name,
                imfleet_controller::now_unix(),
                &reply.agent_version,
            );
            status.reachable = true;
            status.certificate_not_after = output::rfc3339(pong.certificate_not_after);
            status.certificate_days_left =
                (pong.certificate_not_after - imfleet_controller::now_unix()) / 86_400;
            status.agent_version = Some(reply.agent_version);
            status.hostname = Some(reply.hostname);
            status.uptime_seconds = Some(reply.uptime_seconds);
            status.supervision = Some(reply.supervision);
            status.round_trip_ms = Some(pong.round_trip.as_secs_f64() * 1000.0);
        }
        Err(e) => status.error = Some(imfleet_controller::error_chain(&e)),
    }
    status
}

async fn probe_all(state: &ControllerState, hosts: &[HostRecord]) -> Vec<HostStatus> {
    let identity = state.identity.clone();
    futures::future::join_all(hosts.iter().map(|h| probe(state, &identity, h))).await
}

fn render(statuses: &[HostStatus]) {
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
            eprintln!("{}: {err}", s.host);
        }
    }
}

pub async fn ping(dir: &Path, args: PingArgs) -> anyhow::Result<ExitCode> {
    let (state, _) = super::open_state(dir)?;
    let hosts = if args.all {
        state.store.hosts()?
    } else {
        args.hosts
            .iter()
            .map(|name| super::known_host(&state, name))
            .collect::<anyhow::Result<Vec<_>>>()?
    };
    let statuses = probe_all(&state, &hosts).await;
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
    let (state, _) = super::open_state(dir)?;
    let hosts = state.store.hosts()?;
    let statuses = probe_all(&state, &hosts).await;
    if args.json {
        output::print_json(&statuses)?;
    } else if statuses.is_empty() {
        println!("No hosts yet. Add one with `controller bootstrap <host>`.");
    } else {
        render(&statuses);
    }
    Ok(ExitCode::SUCCESS)
}
