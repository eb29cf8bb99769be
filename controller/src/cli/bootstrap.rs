use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use imfleet_controller::bootstrap::{BootstrapRequest, bootstrap, locate_agent_binary};
use imfleet_controller::preflight::DEFAULT_DATA_PATH;
use imfleet_controller::ssh::SshOptions;

use super::output;

/// How to reach a host over SSH (shared by every command that may need SSH).
#[derive(Args, Clone, Debug)]
pub struct SshArgs {
    /// SSH login user (default: from ~/.ssh/config, else the local user).
    #[arg(long, value_name = "USER")]
    pub ssh_user: Option<String>,
    /// SSH port (default: from ~/.ssh/config, else 22).
    #[arg(long, value_name = "PORT")]
    pub ssh_port: Option<u16>,
    /// Private key to log in with (only this key is offered).
    #[arg(short = 'i', long = "identity", value_name = "FILE")]
    pub identity: Option<PathBuf>,
    /// Alternative ssh_config file (as `ssh -F`).
    #[arg(short = 'F', long = "ssh-config", value_name = "FILE")]
    pub ssh_config: Option<PathBuf>,
    /// Seconds to wait for the SSH connection.
    #[arg(long, default_value_t = 10, value_name = "SECS")]
    pub ssh_timeout: u64,
    /// Refuse the host unless it presents this host key (`SHA256:...`, from
    /// `ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub` on its console);
    /// checked before anything is sent. Without it a new key is trusted
    /// and its fingerprint shown.
    #[arg(long, value_name = "SHA256:...", value_parser = imfleet_controller::ssh::check_fingerprint)]
    pub ssh_host_key_fingerprint: Option<String>,
}

impl SshArgs {
    pub fn options(&self) -> SshOptions {
        SshOptions {
            user: self.ssh_user.clone(),
            port: self.ssh_port,
            identity_file: self.identity.clone(),
            config_file: self.ssh_config.clone(),
            connect_timeout: Some(Duration::from_secs(self.ssh_timeout.max(1))),
            host_key_fingerprint: self.ssh_host_key_fingerprint.clone(),
        }
    }
}

/// Where and how the agent runs (shared with deploy).
#[derive(Args, Clone, Debug)]
pub struct AgentArgs {
    /// Agent executable to install (default: `agent` next to this controller).
    #[arg(long, env = "IMFLEET_AGENT_BINARY", value_name = "FILE")]
    pub agent_binary: Option<PathBuf>,
    /// Address the controller dials for gRPC (default: the SSH host name).
    #[arg(long, value_name = "ADDR")]
    pub agent_address: Option<String>,
    /// Port of the agent's mTLS listener.
    #[arg(long, default_value_t = imfleet_proto::DEFAULT_AGENT_PORT, value_name = "PORT")]
    pub agent_port: u16,
    /// Address the agent listens on (default: the address the controller
    /// dials; 0.0.0.0 = every interface).
    #[arg(long, value_name = "IP")]
    pub agent_bind: Option<IpAddr>,
}

impl AgentArgs {
    /// The bootstrap of `target` these options (and `ssh`) describe; the
    /// agent will deploy only under `data_path` and `storage_dir`.
    pub fn bootstrap_request(
        &self,
        target: &str,
        ssh: &SshArgs,
        data_path: &str,
        storage_dir: Option<&str>,
    ) -> anyhow::Result<BootstrapRequest> {
        Ok(BootstrapRequest {
            target: target.to_owned(),
            ssh: ssh.options(),
            agent_binary: locate_agent_binary(self.agent_binary.as_deref())?,
            agent_address: self.agent_address.clone(),
            agent_port: self.agent_port,
            agent_bind: self.agent_bind,
            data_path: data_path.to_owned(),
            storage_dir: storage_dir.map(str::to_owned),
        })
    }
}

#[derive(Args)]
pub struct BootstrapArgs {
    /// SSH destination: a name from ~/.ssh/config, a host name or an IP.
    host: String,
    #[command(flatten)]
    ssh: SshArgs,
    #[command(flatten)]
    agent: AgentArgs,
    /// Where the IM data directories live on the host: the agent will only
    /// ever create, own, mount or purge directories under it (and under -f).
    #[arg(long, default_value = DEFAULT_DATA_PATH, value_name = "DIR")]
    data_path: String,
    /// The IM storage directory (as `im.sh -f`), if deploys will use one.
    #[arg(short = 'f', long = "storage-dir", value_name = "DIR")]
    storage_dir: Option<String>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(dir: &Path, args: BootstrapArgs) -> anyhow::Result<ExitCode> {
    let state = super::open_state(dir)?;
    let request = args.agent.bootstrap_request(
        &args.host,
        &args.ssh,
        &args.data_path,
        args.storage_dir.as_deref(),
    )?;
    let pinned = args.ssh.ssh_host_key_fingerprint.is_some();
    let progress = output::Progress::new(args.json);
    let result = bootstrap(&state, &request, progress.sink()).await;
    progress.finish();
    let report = result?;
    if args.json {
        output::print_json(&report)?;
        return Ok(ExitCode::SUCCESS);
    }
    let host = &report.host;
    println!(
        "Bootstrapped {} in {:.1} s: agent {} at {}:{} ({}), round trip {}",
        host.name,
        report.elapsed_ms as f64 / 1000.0,
        output::shown(&host.agent_version, 64),
        host.agent_address,
        host.agent_port,
        output::shown(&report.supervision, 64),
        output::millis(report.round_trip_ms),
    );
    if report.uploaded_bytes > 0 {
        println!(
            "  agent binary uploaded ({} bytes, sha256 verified)",
            report.uploaded_bytes
        );
    } else {
        println!("  agent binary already up to date");
    }
    match &report.certificate_issued {
        Some(reason) => println!("  new certificate issued: {reason}"),
        None => println!("  existing certificate kept"),
    }
    println!(
        "  certificate expires {}",
        output::expiry(host.cert_not_after)
    );
    let how = if pinned {
        "as pinned"
    } else {
        "as recorded in known_hosts; compare with `ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub` on the host's console"
    };
    for fingerprint in &report.ssh_host_key_fingerprints {
        println!("  SSH host key {fingerprint} ({how})");
    }
    Ok(ExitCode::SUCCESS)
}
