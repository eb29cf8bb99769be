use std::path::Path;
use std::process::ExitCode;

use clap::Args;

use super::output;

#[derive(Args)]
pub struct InitArgs {
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(dir: &Path, args: InitArgs) -> anyhow::Result<ExitCode> {
    let (_, report) = super::init_state(dir)?;
    if args.json {
        output::print_json(&report)?;
    } else if report.created.is_empty() {
        println!(
            "State directory {} is already initialised.",
            report.state_dir
        );
        println!("CA fingerprint (sha256): {}", report.ca_fingerprint);
    } else {
        println!(
            "Initialised {}: created {}",
            report.state_dir,
            report.created.join(", ")
        );
        println!("CA fingerprint (sha256): {}", report.ca_fingerprint);
    }
    Ok(ExitCode::SUCCESS)
}
