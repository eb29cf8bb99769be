//! `operators`: certificates that let a person's CLI use the daemon's API
//! from any PBX node.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand};
use imfleet_controller::operators;

use super::output;

#[derive(Args)]
pub struct OperatorsArgs {
    #[command(subcommand)]
    command: Option<OperatorsCommand>,
    /// Print the list as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum OperatorsCommand {
    /// Issue NAME a certificate and write it, its key and the CA to one
    /// 0600 file for that person (copy it to their node; the key exists
    /// nowhere else).
    Add(AddArgs),
    /// Revoke NAME's certificate: the daemon refuses it from its next request.
    Revoke(RevokeArgs),
}

#[derive(Args)]
struct AddArgs {
    /// Who (a-z, 0-9, '.', '_', '-'); shown in the daemon's log of changes.
    name: String,
    /// Where to write the bundle (never over an existing file).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// How long the certificate is valid.
    #[arg(long, default_value = "365days", value_parser = humantime::parse_duration)]
    valid_for: std::time::Duration,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct RevokeArgs {
    name: String,
    #[arg(long)]
    json: bool,
}

pub async fn run(dir: &Path, args: OperatorsArgs) -> anyhow::Result<ExitCode> {
    let state = super::open_state(dir)?;
    match args.command {
        None => {
            let list = operators::list(&state).await?;
            if args.json {
                output::print_json(&list)?;
            } else if list.is_empty() {
                println!("no operators yet; `controller operators add NAME --out FILE` issues one");
            } else {
                let mut table = output::table(&["NAME", "SERIAL", "STATE", "EXPIRES"]);
                for o in &list {
                    table.add_row(vec![
                        o.name.clone(),
                        o.serial.clone(),
                        o.state.as_str().to_owned(),
                        imfleet_controller::rfc3339(o.not_after),
                    ]);
                }
                println!("{table}");
            }
        }
        Some(OperatorsCommand::Add(add)) => {
            let lifetime = time::Duration::try_from(add.valid_for)
                .ok()
                .filter(|d| *d >= time::Duration::hours(1) && *d <= time::Duration::days(3650))
                .ok_or_else(|| {
                    anyhow::anyhow!("--valid-for must be between 1 hour and 10 years")
                })?;
            let added = operators::add(&state, &add.name, lifetime, &add.out).await?;
            if add.json {
                output::print_json(&added)?;
            } else {
                println!(
                    "operator {} added: certificate {}, valid until {}, written to {} (0600).\nOn their node: controller --daemon https://VIP:PORT --operator FILE status (or IMFLEET_DAEMON and IMFLEET_OPERATOR)",
                    added.name,
                    added.serial,
                    imfleet_controller::rfc3339(added.not_after),
                    added.bundle
                );
            }
        }
        Some(OperatorsCommand::Revoke(revoke)) => {
            let revoked = operators::revoke(&state, &revoke.name).await?;
            if revoke.json {
                output::print_json(&serde_json::json!({"name": revoke.name, "revoked": revoked}))?;
            } else if revoked == 0 {
                println!("operator {} was revoked already", revoke.name);
            } else {
                println!(
                    "operator {}: {revoked} certificate(s) revoked; the daemon refuses them from the next request",
                    revoke.name
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
