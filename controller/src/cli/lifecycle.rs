//! `status`, `start`, `stop`, `restart`, `rm` and `logs` of the IM service.

use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;

use anyhow::bail;
use clap::Args;
use imfleet_controller::deployment::DEPLOYMENT_NAME;
use imfleet_controller::fleet::{Fleet, HostResult, ops};
use imfleet_controller::serve::api::HostsWanted;
use imfleet_controller::serve::client::{self, Endpoint};
use imfleet_controller::store::HostRecord;
use imfleet_proto::agent::v1::{DeploymentStatus, LogsRequest, control_request::Action};

use super::output;

/// Which hosts a command acts on.
#[derive(Args, Clone, Debug)]
pub struct HostSelection {
    /// Hosts by name or agent address.
    #[arg(required_unless_present = "all")]
    hosts: Vec<String>,
    /// Every bootstrapped host.
    #[arg(long, conflicts_with = "hosts")]
    all: bool,
}

impl HostSelection {
    async fn resolve(&self, fleet: &Fleet) -> anyhow::Result<Vec<HostRecord>> {
        Ok(fleet
            .resolve(&super::selection(self.all, &self.hosts))
            .await?)
    }
}

#[derive(Args)]
pub struct StatusArgs {
    #[command(flatten)]
    select: HostSelection,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct ControlArgs {
    #[command(flatten)]
    select: HostSelection,
    /// Seconds the service gets to stop before it is killed.
    #[arg(long, default_value_t = 300, value_name = "SECS")]
    grace: u32,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct RemoveArgs {
    #[command(flatten)]
    select: HostSelection,
    /// Do not ask for confirmation.
    #[arg(long, short = 'y')]
    yes: bool,
    /// Also delete the IM data directories (im-data, im-postgresql, secrets).
    /// The -f storage directory is the operator's and is kept.
    #[arg(long)]
    purge: bool,
    /// Seconds the service gets to stop before it is killed.
    #[arg(long, default_value_t = 300, value_name = "SECS")]
    grace: u32,
}

#[derive(Args)]
pub struct LogsArgs {
    /// Bootstrapped host.
    host: String,
    /// One container (default: all of the IM service).
    #[arg(long, short = 'c', value_name = "NAME")]
    container: Option<String>,
    /// Lines of history per container.
    #[arg(long, short = 'n', default_value_t = 100)]
    tail: u32,
    /// Keep following new lines.
    #[arg(long, short = 'f')]
    follow: bool,
    /// One JSON object per line: {"container", "stream", "line"}.
    #[arg(long)]
    json: bool,
}

pub fn print_status_table(rows: &[(String, Option<DeploymentStatus>)]) {
    let mut table = output::table(&[
        "HOST",
        "CONTAINER",
        "STATE",
        "HEALTH",
        "IMAGE",
        "VERSION",
        "UPTIME",
    ]);
    for (host, status) in rows {
        match status {
            None => {
                table.add_row(vec![host.clone(), "-".into(), "AGENT UNREACHABLE".into()]);
            }
            Some(s) if s.containers.is_empty() => {
                table.add_row(vec![host.clone(), "-".into(), "not deployed".into()]);
            }
            Some(s) => {
                for c in &s.containers {
                    let uptime = if c.started_at > 0 {
                        output::uptime((imfleet_controller::now_unix() - c.started_at).max(0) as u64)
                    } else {
                        "-".into()
                    };
                    // Printable: the rows may come from a daemon across the
                    // network (`--daemon`), not only from this node.
                    table.add_row(vec![
                        output::shown(host, 256),
                        output::shown(&c.name, 256),
                        output::shown(&c.state, 64),
                        output::shown(&c.health, 64),
                        output::shown(&c.image, 512),
                        if c.image_version.is_empty() {
                            "-".into()
                        } else {
                            output::shown(&c.image_version, 128)
                        },
                        uptime,
                    ]);
                }
            }
        }
    }
    println!("{table}");
}

pub async fn status(
    dir: &Path,
    remote: Option<&Endpoint>,
    args: StatusArgs,
) -> anyhow::Result<ExitCode> {
    let statuses = match remote {
        Some(remote) => {
            let wanted = HostsWanted {
                all: args.select.all,
                hosts: args.select.hosts.clone(),
            };
            client::status(remote, &wanted).await?.unwrap_or_default()
        }
        None => {
            let fleet = super::open_fleet(dir).await?;
            let hosts = args.select.resolve(&fleet).await?;
            ops::status_preferring_daemon(&fleet, dir, &hosts).await
        }
    };
    if args.json {
        output::print_json(&statuses)?;
    } else {
        let rows: Vec<_> = statuses
            .iter()
            .map(|s| (s.host.clone(), s.status.clone()))
            .collect();
        print_status_table(&rows);
        for s in statuses.iter().filter(|s| s.error.is_some()) {
            let error = s.error.as_deref().unwrap_or_default();
            eprintln!("{}: {}", s.host, output::shown(error, 4096));
        }
        for s in &statuses {
            if let Some(r) = &s.rollout {
                println!(
                    "{}: rollout {} ({}): {}{}{}",
                    s.host,
                    r.id,
                    r.state.as_str(),
                    r.phase.as_str(),
                    if r.detail.is_empty() { "" } else { ": " },
                    output::shown(&r.detail, 4096)
                );
            }
        }
        let ages = statuses.iter().filter_map(|s| s.sample_age_seconds);
        if let Some(oldest) = ages.reduce(f64::max) {
            eprintln!("(from `controller serve`: samples at most {oldest:.1} s old)");
        }
    }
    Ok(if statuses.iter().all(|s| s.healthy) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

pub async fn control(dir: &Path, args: ControlArgs, action: Action) -> anyhow::Result<ExitCode> {
    let fleet = super::open_fleet(dir).await?;
    let hosts = args.select.resolve(&fleet).await?;
    let progress = output::Progress::new(args.json);
    progress.message(format!(
        "{} on {} host(s)",
        format!("{action:?}").to_lowercase(),
        hosts.len()
    ));
    let results = ops::control(&fleet, &hosts, action, args.grace, false).await;
    progress.finish();
    report(results, args.json)
}

fn report(results: Vec<HostResult<DeploymentStatus>>, json: bool) -> anyhow::Result<ExitCode> {
    if json {
        output::print_json(&output::host_results_json(&results, "status"))?;
        return Ok(output::exit_for(&results));
    }
    let rows: Vec<_> = results
        .iter()
        .map(|r| (r.host.name.clone(), r.result.as_ref().ok().cloned()))
        .collect();
    print_status_table(&rows);
    Ok(output::host_errors(&results))
}

pub async fn remove(dir: &Path, args: RemoveArgs) -> anyhow::Result<ExitCode> {
    let fleet = super::open_fleet(dir).await?;
    let hosts = args.select.resolve(&fleet).await?;
    if !args.yes {
        if !std::io::stdin().is_terminal() {
            bail!("rm stops messaging and deletes the IM installation: confirm with --yes");
        }
        let names: Vec<&str> = hosts.iter().map(|h| h.name.as_str()).collect();
        eprint!(
            "Remove the IM service from {}{}? This stops messaging. Type 'yes' to continue: ",
            names.join(", "),
            if args.purge {
                " AND DELETE ITS DATA"
            } else {
                ""
            }
        );
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer)?;
        if answer.trim() != "yes" {
            bail!("not confirmed; nothing was changed");
        }
    }
    let results = ops::control(&fleet, &hosts, Action::Remove, args.grace, args.purge).await;
    report(results, false)
}

/// Longest log line shown on a terminal (`--json` carries it whole).
const LOG_LINE_MAX_CHARS: usize = 16 * 1024;

pub async fn logs(dir: &Path, args: LogsArgs) -> anyhow::Result<ExitCode> {
    let fleet = super::open_fleet(dir).await?;
    let request = LogsRequest {
        deployment: DEPLOYMENT_NAME.into(),
        container: args.container.clone().unwrap_or_default(),
        tail: args.tail,
        follow: args.follow,
    };
    let mut stream = ops::logs(&fleet, &args.host, request).await?;
    while let Some(line) = stream.next().await? {
        if args.json {
            let record = serde_json::json!({
                "container": line.container,
                "stream": if line.stderr { "stderr" } else { "stdout" },
                "line": line.line,
            });
            println!("{}", output::json_line(&record)?);
        } else {
            // A container's output, but the host's word: no raw escapes.
            let text = format!(
                "{}: {}",
                output::shown(&line.container, 128),
                output::shown(&line.line, LOG_LINE_MAX_CHARS)
            );
            if line.stderr {
                eprintln!("{text}");
            } else {
                println!("{text}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
