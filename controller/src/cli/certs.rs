//! `certs`: the certificates the CA issued, and renewing agents' now.

use std::path::Path;
use std::process::ExitCode;

use clap::Args;
use imfleet_controller::renewal::{self, CertificateList};

use super::output;

#[derive(Args)]
pub struct CertsArgs {
    #[command(subcommand)]
    command: Option<CertsCommand>,
    /// Print the list as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Subcommand)]
enum CertsCommand {
    /// Renew agents' certificates now, over mTLS (they renew by themselves
    /// once two thirds of their life have passed). The agent makes a new key;
    /// its old certificate is refused once the new one is confirmed.
    Renew(RenewArgs),
}

#[derive(Args)]
struct RenewArgs {
    /// Hosts by name or agent address.
    #[arg(required_unless_present = "all")]
    hosts: Vec<String>,
    /// Every bootstrapped host.
    #[arg(long, conflicts_with = "hosts")]
    all: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn certs(dir: &Path, args: CertsArgs) -> anyhow::Result<ExitCode> {
    let fleet = super::open_fleet(dir).await?;
    let Some(CertsCommand::Renew(renew)) = args.command else {
        let list = renewal::list(&fleet).await?;
        if args.json {
            output::print_json(&list)?;
        } else {
            render(&list);
        }
        return Ok(ExitCode::SUCCESS);
    };
    let hosts = fleet
        .resolve(&super::selection(renew.all, &renew.hosts))
        .await?;
    let results = renewal::renew_hosts(&fleet, &hosts).await;
    if renew.json {
        output::print_json(&output::host_results_json(&results, "renewed"))?;
        return Ok(output::exit_for(&results));
    }
    let mut table = output::table(&["HOST", "SERIAL", "EXPIRES", "OUTCOME"]);
    for r in &results {
        let row = match &r.result {
            Ok(done) => vec![
                r.host.name.clone(),
                format!("{} -> {}", done.previous_serial, done.serial),
                done.not_after.clone(),
                "renewed".into(),
            ],
            Err(_) => vec![r.host.name.clone(), "-".into(), "-".into(), "FAILED".into()],
        };
        table.add_row(row);
    }
    println!("{table}");
    Ok(output::host_errors(&results))
}

fn render(list: &CertificateList) {
    println!(
        "CA          {} (sha256 {}), expires {}",
        output::shown(&list.ca.subject, 128),
        list.ca.sha256_fingerprint,
        output::expiry(list.ca.not_after)
    );
    println!(
        "controller  {} serial {}, expires {}",
        output::shown(&list.controller.subject, 128),
        list.controller.serial,
        output::expiry(list.controller.not_after)
    );
    if list.certificates.is_empty() {
        println!("No agent certificates yet. Add a host with `controller bootstrap <host>`.");
        return;
    }
    let mut table = output::table(&["HOST", "SERIAL", "EXPIRES", "STATE", "SINCE"]);
    for c in &list.certificates {
        table.add_row(vec![
            c.host.clone().unwrap_or_else(|| "-".into()),
            c.serial.clone(),
            output::expiry(c.not_after),
            c.state.as_str().to_owned(),
            imfleet_controller::rfc3339(c.changed_at),
        ]);
    }
    println!("{table}");
}
