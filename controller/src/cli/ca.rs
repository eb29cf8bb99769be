//! `ca rotate`: replacing the fleet CA in phases, over mTLS.

use std::path::Path;
use std::process::ExitCode;

use clap::Args;
use imfleet_controller::ca_rotation::{self, RotationReport};

use super::output;

#[derive(clap::Subcommand)]
pub enum CaCommand {
    /// Replace the fleet CA without downtime: every agent trusts the old
    /// and the new CA, certificates are re-issued under the new one, then
    /// the old one is dropped. A phase waits for every host; run the command
    /// again to go on (it resumes where it stopped).
    Rotate(RotateArgs),
}

#[derive(Args)]
pub struct RotateArgs {
    /// Go on without this host (repeatable): it will need `controller
    /// bootstrap` once the old CA is dropped.
    #[arg(long, value_name = "HOST")]
    skip: Vec<String>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn ca(dir: &Path, command: CaCommand) -> anyhow::Result<ExitCode> {
    let CaCommand::Rotate(args) = command;
    let report = ca_rotation::rotate(dir, &args.skip).await?;
    if args.json {
        output::print_json(&report)?;
    } else {
        render(&report);
    }
    Ok(if report.finished {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn render(report: &RotationReport) {
    let mut table = output::table(&["HOST", "STEP", "DETAIL"]);
    for h in &report.hosts {
        let step = serde_json::to_value(h.step)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        table.add_row(vec![
            h.host.clone(),
            step,
            h.detail.clone().unwrap_or_default(),
        ]);
    }
    if !report.hosts.is_empty() {
        println!("{table}");
    }
    match report.phase {
        None => println!(
            "CA rotation finished: the fleet trusts only the new CA (sha256 {}).",
            report.new_ca
        ),
        Some(phase) => {
            let waiting: Vec<&str> = report
                .hosts
                .iter()
                .filter(|h| !h.step.settled())
                .map(|h| h.host.as_str())
                .collect();
            println!(
                "CA rotation waits in phase {phase:?} for {}. Run `controller ca rotate` again when they answer, or go on without one with --skip HOST (it will then need `controller bootstrap`).",
                waiting.join(", ")
            );
        }
    }
    for host in &report.skipped {
        eprintln!(
            "{host}: skipped; run `controller bootstrap {host}` once the rotation is finished"
        );
    }
}
