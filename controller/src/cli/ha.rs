//! `ha`: `controller serve` as a resource of the PBX cluster's Pacemaker.

use std::path::Path;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use imfleet_controller::ha::{self, HaConfig, pacemaker, plan};

use super::output;

#[derive(Subcommand)]
pub enum HaCommand {
    /// Print the pcs commands that run the daemon on the node holding its
    /// state; with --apply, install the resource agent on this node and run
    /// them (only what is missing: safe to repeat, on every node).
    Install(InstallArgs),
    /// Where the daemon runs, how it stands and its failures (exit status
    /// 1 when it does not run).
    Status(StatusArgs),
    /// Print the OCF resource agent (ocf:imfleet:controller).
    Agent,
}

#[derive(Args)]
pub struct Target {
    /// The daemon's resource id.
    #[arg(long, default_value = "imfleet-controller")]
    resource_id: String,
    /// A resource the daemon runs with and after: the filesystem holding
    /// the state first, then the virtual IP of --api-listen. Repeatable.
    #[arg(long = "with", value_name = "RESOURCE", default_values_t = [ha::PORTSIP_FS_RESOURCE.to_owned()])]
    with: Vec<String>,
}

#[derive(Args)]
pub struct InstallArgs {
    #[command(flatten)]
    target: Target,
    /// The controller executable, at the same path on every node.
    #[arg(long, value_name = "PATH", default_value = "/usr/local/bin/controller")]
    binary: std::path::PathBuf,
    /// Where the daemon serves /metrics and /readyz (monitor asks /readyz).
    #[arg(long, default_value = imfleet_controller::serve::DEFAULT_METRICS_LISTEN, value_name = "ADDR:PORT")]
    metrics_listen: std::net::SocketAddr,
    /// The API for operators on every node: the virtual IP and a port
    /// (add the VIP's resource with --with).
    #[arg(long, value_name = "VIP:PORT")]
    api_listen: Option<std::net::SocketAddr>,
    /// Where the daemon's output goes, on each node.
    #[arg(
        long,
        default_value = "/var/log/imfleet/controller.log",
        value_name = "FILE"
    )]
    log_file: std::path::PathBuf,
    /// Run the commands (and install the agent on this node).
    #[arg(long)]
    apply: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct StatusArgs {
    #[command(flatten)]
    target: Target,
    #[arg(long)]
    json: bool,
}

pub async fn ha(dir: &Path, command: HaCommand) -> anyhow::Result<ExitCode> {
    match command {
        HaCommand::Agent => {
            print!("{}", ha::AGENT_SCRIPT);
            Ok(ExitCode::SUCCESS)
        }
        HaCommand::Install(args) => install(dir, args).await,
        HaCommand::Status(args) => status(args).await,
    }
}

fn config(dir: &Path, args: &InstallArgs) -> anyhow::Result<HaConfig> {
    let binary = &args.binary;
    for (flag, path) in [
        ("--binary", binary),
        ("--log-file", &args.log_file),
        ("--state-dir", &dir.to_path_buf()),
    ] {
        if !path.is_absolute() {
            anyhow::bail!("{flag} {} must be an absolute path", path.display());
        }
    }
    if !args.metrics_listen.ip().is_loopback() {
        anyhow::bail!("--metrics-listen must be a loopback address (the agent asks /readyz there)");
    }
    let state_dir = dir;
    Ok(HaConfig {
        resource: args.target.resource_id.clone(),
        with: args.target.with.clone(),
        binary: binary.display().to_string(),
        state_dir: state_dir.display().to_string(),
        metrics_listen: args.metrics_listen.to_string(),
        api_listen: args.api_listen.map(|a| a.to_string()),
        log_file: args.log_file.display().to_string(),
    })
}

async fn install(dir: &Path, args: InstallArgs) -> anyhow::Result<ExitCode> {
    let config = config(dir, &args)?;
    ha::check(&config)?;
    if args.api_listen.is_some() && config.with.len() < 2 {
        eprintln!(
            "note: --api-listen binds the virtual IP: add its resource with --with (after the filesystem's), so the daemon starts once the address is up"
        );
    }
    if !Path::new(&config.binary).exists() {
        eprintln!(
            "note: {} is not on this node; install the controller there on every node (or give --binary)",
            config.binary
        );
    }
    if !dir.join("ca.pem").exists() {
        eprintln!(
            "note: {} holds no imfleet state on this node (expected where the replicated filesystem is not mounted; on the active node run `controller --state-dir {} init` first)",
            dir.display(),
            dir.display()
        );
    }
    let observed = match pacemaker::observe(&config.resource).await {
        Ok(observed) => Some(observed),
        Err(e) if args.apply => return Err(e.into()),
        Err(e) => {
            eprintln!(
                "note: no cluster configuration to compare with ({e}); printing every command"
            );
            None
        }
    };
    let steps = match &observed {
        Some(observed) => plan::plan(&config, observed)?,
        None => {
            let mut fresh = ha::cib::Observed::default();
            fresh.resources.extend(config.with.iter().cloned());
            plan::plan(&config, &fresh)?
        }
    };
    let agent_written = if args.apply {
        let written = pacemaker::install_agent()?;
        pacemaker::apply(&steps).await?;
        let configured = observed.as_ref().is_some_and(|o| o.primitive.is_some());
        if written && configured {
            pacemaker::reprobe_here(&config.resource).await?;
        }
        Some(written)
    } else {
        None
    };
    if args.json {
        output::print_json(&serde_json::json!({
            "config": config,
            "steps": steps,
            "applied": args.apply,
            "agent_written": agent_written,
        }))?;
        return Ok(ExitCode::SUCCESS);
    }
    if !args.apply {
        println!(
            "# On every node: install the resource agent (or run `controller ha install --apply` there)."
        );
        let dir = Path::new(ha::AGENT_PATH)
            .parent()
            .map(|d| d.display().to_string())
            .unwrap_or_default();
        println!(
            "mkdir -p {dir} && controller ha agent > {path} && chmod 755 {path}",
            path = ha::AGENT_PATH
        );
    }
    if steps.is_empty() {
        println!("# The cluster configuration is as it should be: nothing to change.");
    }
    for step in &steps {
        println!("# {}\n{}", step.why, step.command_line());
    }
    if args.apply {
        println!(
            "applied {} change(s){}; `controller ha status` shows where the daemon runs",
            steps.len(),
            if agent_written == Some(true) {
                format!(", resource agent written to {}", ha::AGENT_PATH)
            } else {
                String::new()
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let (resource, with) = (&args.target.resource_id, &args.target.with);
    let status = pacemaker::status(resource, with).await?;
    if args.json {
        output::print_json(&status)?;
    } else {
        let Some(daemon) = &status.daemon else {
            println!(
                "{resource} is not configured in this cluster; `controller ha install` prints how"
            );
            return Ok(ExitCode::from(1));
        };
        println!(
            "cluster: {} node(s) online ({}){}",
            status.nodes_online.len(),
            status.nodes_online.join(", "),
            if status.quorate {
                ", quorate"
            } else {
                ", WITHOUT QUORUM"
            }
        );
        let mut table = output::table(&["RESOURCE", "ROLE", "NODE", "FAILED"]);
        for r in std::iter::once(daemon).chain(&status.with) {
            table.add_row(vec![
                r.id.clone(),
                r.role.clone(),
                if r.nodes.is_empty() {
                    "-".into()
                } else {
                    r.nodes.join(", ")
                },
                if r.failed { "yes" } else { "" }.into(),
            ]);
        }
        println!("{table}");
        for (node, count) in &status.fail_counts {
            println!(
                "{resource}: {count} failure(s) on {node} (`crm_resource --cleanup --resource {resource}` clears them)"
            );
        }
    }
    let running = status.daemon.as_ref().is_some_and(|d| d.active);
    Ok(if running {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
