//! `controller deploy`: bootstrap if needed, preflight, install, verify.

use std::io::Read;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use imfleet_controller::bootstrap::bootstrap;
use imfleet_controller::deployment::portsip::{DEFAULT_DB_IMAGE, DEFAULT_IMAGE};
use imfleet_controller::deployment::{DeployError, DeployRequest, ImToken, PortsipParams, deploy};

use super::bootstrap::{AgentArgs, SshArgs};
use super::output;
use super::preflight::{TargetArgs, print_checks};

#[derive(Args)]
pub struct DeployArgs {
    /// The IM host: a bootstrapped host, or an SSH destination to bootstrap first.
    host: String,
    #[command(flatten)]
    target: TargetArgs,
    /// The PBX (or the HA cluster's virtual IP) the IM server connects to.
    #[arg(long, value_name = "IP")]
    pbx: IpAddr,
    /// File holding the IM token from the PBX portal (`-` for stdin). Default:
    /// the IMFLEET_IM_TOKEN environment variable. Never give it as an argument.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// IM server image.
    #[arg(long, default_value = DEFAULT_IMAGE, value_name = "REF")]
    image: String,
    /// Database image.
    #[arg(long, default_value = DEFAULT_DB_IMAGE, value_name = "REF")]
    db_image: String,
    /// `docker save` archive to stream to the host and load (for hosts without
    /// registry access); repeat for several archives.
    #[arg(long, value_name = "FILE")]
    image_file: Vec<PathBuf>,
    /// Deploy even if preflight checks fail (the overridden checks are recorded).
    #[arg(long)]
    force: bool,
    /// Seconds containers get to stop gracefully.
    #[arg(long, default_value_t = 300, value_name = "SECS")]
    stop_grace: u32,
    /// Seconds each container gets to become healthy.
    #[arg(long, default_value_t = 180, value_name = "SECS")]
    health_timeout: u64,
    #[command(flatten)]
    ssh: SshArgs,
    #[command(flatten)]
    agent: AgentArgs,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

/// Reads the token from the file, stdin or the environment.
fn read_token(file: Option<&Path>) -> anyhow::Result<ImToken> {
    let text = match file {
        Some(p) if p == Path::new("-") => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("read the IM token from stdin")?;
            text
        }
        Some(p) => std::fs::read_to_string(p)
            .with_context(|| format!("read the IM token from {}", p.display()))?,
        None => match std::env::var("IMFLEET_IM_TOKEN") {
            Ok(t) => t,
            Err(_) => bail!(
                "no IM token: pass --token-file FILE (or --token-file - to read stdin), or set IMFLEET_IM_TOKEN"
            ),
        },
    };
    Ok(ImToken::parse(&text)?)
}

pub async fn run(dir: &Path, args: DeployArgs) -> anyhow::Result<ExitCode> {
    // Everything that can be checked here is checked before the host is touched.
    let preflight = args.target.params()?;
    let token = read_token(args.token_file.as_deref())?;
    for file in &args.image_file {
        let meta =
            std::fs::metadata(file).with_context(|| format!("--image-file {}", file.display()))?;
        if !meta.is_file() || meta.len() == 0 {
            bail!(
                "--image-file {}: not a docker save archive (empty or not a file)",
                file.display()
            );
        }
    }
    let (state, _) = super::open_state(dir)?;
    let progress = output::spinner(!args.json);

    let host = match state.store.host(&args.host)? {
        Some(host) => host,
        None => {
            progress.set_message(format!("bootstrapping {}", args.host));
            let request = args.agent.bootstrap_request(&args.host, &args.ssh)?;
            let report = bootstrap(&state, &request, &progress).await;
            if !args.json {
                progress.suspend(|| {
                    if let Ok(r) = &report {
                        eprintln!(
                            "bootstrapped {} (agent {})",
                            r.host.name, r.host.agent_version
                        );
                    }
                });
            }
            report?.host
        }
    };
    let agent = super::connect(&state, &host).await?;
    let request = DeployRequest {
        host: host.name.clone(),
        params: PortsipParams {
            private_ip: preflight.private_ip,
            public_ip: preflight.public_ip,
            pbx: args.pbx,
            data_path: preflight.data_path.clone(),
            storage_dir: preflight.storage_dir.clone(),
            image: args.image.clone(),
            db_image: args.db_image.clone(),
            stop_grace_seconds: args.stop_grace,
        },
        preflight,
        token,
        force: args.force,
        image_files: args.image_file.clone(),
        health_timeout: Duration::from_secs(args.health_timeout.max(1)),
    };
    let result = deploy(&state, &agent, request, &progress).await;
    progress.finish_and_clear();
    let report = match result {
        Ok(report) => report,
        Err(DeployError::PreflightFailed { host, checks }) => {
            if !args.json {
                print_checks(&checks);
            }
            return Err(DeployError::PreflightFailed { host, checks }.into());
        }
        Err(DeployError::Apply {
            host,
            error,
            diagnostics,
            rolled_back,
        }) => {
            if !diagnostics.is_empty() {
                eprintln!("last output of the failing container:");
                for line in &diagnostics {
                    eprintln!("  | {line}");
                }
            }
            return Err(DeployError::Apply {
                host,
                error,
                diagnostics,
                rolled_back,
            }
            .into());
        }
        Err(e) => return Err(e.into()),
    };
    if args.json {
        output::print_json(&report)?;
        return Ok(ExitCode::SUCCESS);
    }
    if !report.overridden.is_empty() {
        let ids: Vec<&str> = report.overridden.iter().map(|c| c.id).collect();
        println!(
            "--force overrode failed preflight checks: {}",
            ids.join(", ")
        );
    }
    if !report.warnings.is_empty() {
        let ids: Vec<&str> = report.warnings.iter().map(|c| c.id).collect();
        println!("preflight warnings: {}", ids.join(", "));
    }
    println!(
        "Deployed {} on {} in {:.1} s: {}",
        report.deployment.name,
        report.deployment.host,
        report.elapsed_ms as f64 / 1000.0,
        if report.status.healthy {
            "healthy"
        } else {
            "NOT healthy"
        }
    );
    super::lifecycle::print_status_table(&[(host.name.clone(), Some(report.status))]);
    Ok(ExitCode::SUCCESS)
}
