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
    /// Revoke a controller certificate (one copied off pbx01, or the one in
    /// use, which is then replaced): every agent refuses it from its next
    /// contact with this controller, which is made now with every reachable
    /// one. Agent certificates are revoked with `controller hosts forget`.
    Revoke(RevokeArgs),
}

#[derive(Args)]
struct RevokeArgs {
    /// The certificate's serial (see `controller certs`).
    serial: String,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
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
    if let Some(CertsCommand::Revoke(revoke)) = &args.command {
        let found = fleet.store().certificate(&revoke.serial).await?;
        if let Some(operator) = &found
            && operator.role == "operator"
        {
            let holder = fleet
                .store()
                .operators()
                .await?
                .into_iter()
                .find(|o| o.serial == operator.serial)
                .map(|o| o.name)
                .unwrap_or_else(|| "?".into());
            anyhow::bail!(
                "{} is the operator certificate of {holder}; `controller operators revoke {holder}` revokes it (nothing was changed)",
                operator.serial
            );
        }
        if let Some(agent) = found
            && agent.role == "agent"
        {
            anyhow::bail!(
                "{} is an agent certificate (of {}); a renewal supersedes it, and `controller hosts forget` revokes a host's (nothing was changed)",
                agent.serial,
                agent.host.as_deref().unwrap_or("-")
            );
        }
        drop(fleet);
        let revoked = imfleet_controller::controller_list::revoke(dir, &revoke.serial).await?;
        let untold = revoked.hosts.iter().filter(|h| !h.holds_list).count();
        if revoke.json {
            output::print_json(&revoked)?;
        } else {
            println!(
                "controller certificate {} {}; the controller now uses {}. List version {}: held by {} of {} agent(s).",
                revoked.serial,
                if revoked.changed {
                    "revoked"
                } else {
                    "was revoked already"
                },
                revoked.controller_serial,
                revoked.list_version,
                revoked.hosts.len() - untold,
                revoked.hosts.len()
            );
            for h in revoked.hosts.iter().filter(|h| !h.holds_list) {
                eprintln!(
                    "{}: does not hold the list yet ({}); it will at its next contact with this controller",
                    h.host,
                    output::shown(
                        h.error.as_deref().unwrap_or("an agent too old to keep it"),
                        512
                    )
                );
            }
        }
        return Ok(if untold == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        });
    }
    let Some(CertsCommand::Renew(renew)) = args.command else {
        let list = renewal::list(&fleet, dir).await?;
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
    for c in &list.controllers.certificates {
        if c.serial != list.controller.serial {
            println!(
                "            also serial {}, expires {}{}",
                c.serial,
                output::expiry(c.not_after),
                if c.revoked_at.is_some() {
                    ", REVOKED"
                } else {
                    ""
                }
            );
        }
    }
    println!(
        "            list version {} (agents hold it from their next contact)",
        list.controllers.version
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
