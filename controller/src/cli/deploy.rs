//! `controller deploy`: bootstrap if needed, preflight, install, verify.

use std::io::{IsTerminal, Read};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use imfleet_controller::bootstrap::bootstrap;
use imfleet_controller::deployment::portsip::{DEFAULT_DB_IMAGE, DEFAULT_IMAGE};
use imfleet_controller::deployment::{
    DeployError, DeployReport, DeployRequest, ImToken, PortsipParams, TokenSource, deploy,
};
use imfleet_controller::fleet::Fleet;
use imfleet_controller::pbx::{PbxOptions, PbxTrust, Secret, parse_fingerprint};
use imfleet_controller::preflight::PreflightParams;
use imfleet_controller::state::ControllerState;
use imfleet_controller::store::HostRecord;

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
    /// Default: the host of --pbx-api.
    #[arg(long, value_name = "IP")]
    pbx: Option<IpAddr>,
    /// File holding the IM token from the PBX portal (`-` for stdin). Default:
    /// IMFLEET_IM_TOKEN, else fetched through --pbx-api, else asked for.
    /// Never give it as an argument.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Generate a new IM token on the PBX (needs --pbx-api), as the HA guide
    /// asks for upgrades; the old token stops working.
    #[arg(long, requires = "pbx_api", conflicts_with = "token_file")]
    new_im_token: bool,
    #[command(flatten)]
    pbx_api: PbxArgs,
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

/// Reads a file holding a secret, warning when others may read it too.
pub(super) fn read_secret_file(path: &Path, what: &str) -> anyhow::Result<String> {
    use std::os::unix::fs::PermissionsExt;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("read the {what} from {}", path.display()))?;
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            eprintln!(
                "warning: {} holds the {what} but is readable by others (mode {mode:o}); chmod 600 it",
                path.display()
            );
        }
    }
    Ok(text)
}

/// PBX REST API access (whitelist, IM token, registration check).
#[derive(Args, Clone, Debug)]
pub struct PbxArgs {
    /// PBX API base URL, e.g. https://10.0.0.2:8887. Without it, deploy
    /// prints the portal steps to do by hand.
    #[arg(long, value_name = "URL")]
    pbx_api: Option<String>,
    /// PBX administrator user.
    #[arg(long, default_value = "admin", value_name = "USER")]
    pbx_user: String,
    /// File holding the PBX password. Default: IMFLEET_PBX_PASSWORD, else a prompt.
    #[arg(long, value_name = "FILE")]
    pbx_password_file: Option<PathBuf>,
    /// CA (or the portal's own) certificate to verify the PBX with.
    #[arg(long, value_name = "FILE", group = "pbx_trust")]
    pbx_ca: Option<PathBuf>,
    /// SHA-256 fingerprint of the portal's certificate, pinned.
    #[arg(long, value_name = "SHA256", group = "pbx_trust")]
    pbx_fingerprint: Option<String>,
    /// Do not verify the PBX certificate (labs only: the password can be intercepted).
    #[arg(long, group = "pbx_trust")]
    pbx_insecure: bool,
}

impl PbxArgs {
    /// The API options, reading the password; `None` without --pbx-api.
    pub(super) fn options(&self) -> anyhow::Result<Option<PbxOptions>> {
        let Some(url) = &self.pbx_api else {
            return Ok(None);
        };
        let trust = if let Some(ca) = &self.pbx_ca {
            PbxTrust::CaPem(
                std::fs::read_to_string(ca)
                    .with_context(|| format!("--pbx-ca {}", ca.display()))?,
            )
        } else if let Some(fp) = &self.pbx_fingerprint {
            PbxTrust::Fingerprint(
                parse_fingerprint(fp).map_err(|e| anyhow::anyhow!("--pbx-fingerprint: {e}"))?,
            )
        } else if self.pbx_insecure {
            eprintln!(
                "WARNING: --pbx-insecure: the PBX certificate is not verified; anyone on the path can read the PBX password."
            );
            PbxTrust::Insecure
        } else {
            PbxTrust::System
        };
        let password = match &self.pbx_password_file {
            Some(file) => read_secret_file(file, "PBX password")?
                .trim_end_matches(['\r', '\n'])
                .to_owned(),
            None => match std::env::var("IMFLEET_PBX_PASSWORD") {
                Ok(p) => p,
                Err(_) if std::io::stdin().is_terminal() => {
                    rpassword::prompt_password(format!("PBX password for {}: ", self.pbx_user))?
                }
                Err(_) => bail!(
                    "no PBX password: pass --pbx-password-file FILE or set IMFLEET_PBX_PASSWORD"
                ),
            },
        };
        if password.is_empty() {
            bail!("the PBX password is empty");
        }
        Ok(Some(PbxOptions {
            base_url: url.trim_end_matches('/').to_owned(),
            user: self.pbx_user.clone(),
            password: Secret::new(password),
            trust,
            max_retries: 5,
            first_backoff: Duration::from_millis(500),
        }))
    }

    /// The PBX address in the API URL, if it is an IP.
    fn api_ip(&self) -> Option<IpAddr> {
        let rest = self.pbx_api.as_deref()?.strip_prefix("https://")?;
        let host = rest.split('/').next()?;
        let host = match host.rsplit_once(':') {
            Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h,
            _ => host,
        };
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .ok()
    }
}

/// The portal steps an operator does by hand when imfleet has no PBX access.
fn manual_checklist(private: IpAddr, public: IpAddr) -> String {
    let ips = if private == public {
        format!("{private}")
    } else {
        format!("{private} and {public}")
    };
    format!(
        "No PBX API access given (--pbx-api). In the PBX portal, before deploying:\n\
         \x20 1. IP Blacklist > Add: whitelist {ips} (target: allow, expiry far in the future).\n\
         \x20    Without it the PBX rate-limits the IM server.\n\
         \x20 2. Servers > IM Servers > default > Generate Token, and copy the token.\n\
         \x20 3. After deploy: Servers > IM Servers must list {private} / {public}; TCP 8887 must be open on external firewalls.\n"
    )
}

/// The token from the file (`-` for stdin) or IMFLEET_IM_TOKEN; `None`
/// when neither is given.
pub(super) fn given_token(file: Option<&Path>) -> anyhow::Result<Option<ImToken>> {
    let text = match file {
        Some(p) if p == Path::new("-") => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("read the IM token from stdin")?;
            text
        }
        Some(p) => read_secret_file(p, "IM token")?,
        None => match std::env::var("IMFLEET_IM_TOKEN") {
            Ok(t) => t,
            Err(_) => return Ok(None),
        },
    };
    Ok(Some(ImToken::parse(&text)?))
}

/// Reads the token from the file, stdin or the environment; else, with PBX
/// API access, it comes from the PBX; else the operator is asked for it.
fn token_source(
    file: Option<&Path>,
    have_pbx: bool,
    private: IpAddr,
    public: IpAddr,
) -> anyhow::Result<TokenSource> {
    if let Some(token) = given_token(file)? {
        return Ok(TokenSource::Given(token));
    }
    if have_pbx {
        return Ok(TokenSource::FromPbx);
    }
    eprint!("{}", manual_checklist(private, public));
    if !std::io::stdin().is_terminal() {
        bail!(
            "no IM token: do the portal steps above, then pass the token with --token-file FILE (or -), or set IMFLEET_IM_TOKEN"
        );
    }
    let text = rpassword::prompt_password("Paste the IM token (input hidden): ")?;
    Ok(TokenSource::Given(ImToken::parse(&text)?))
}

pub async fn run(dir: &Path, args: DeployArgs) -> anyhow::Result<ExitCode> {
    // Everything that can be checked here is checked before the host is touched.
    let inputs = checked_inputs(&args)?;
    let state = super::open_state(dir)?;
    let progress = output::Progress::new(args.json);
    let host = bootstrapped_host(&state, &args, &inputs.preflight, &progress).await?;
    let agent = Fleet::new(&state).connect(&host).await?;
    let request = DeployRequest {
        host: host.name.clone(),
        params: PortsipParams {
            private_ip: inputs.preflight.private_ip,
            public_ip: inputs.preflight.public_ip,
            pbx: inputs.pbx,
            data_path: inputs.preflight.data_path.clone(),
            storage_dir: inputs.preflight.storage_dir.clone(),
            image: args.image.clone(),
            db_image: args.db_image.clone(),
            stop_grace_seconds: args.stop_grace,
        },
        preflight: inputs.preflight,
        token: inputs.token,
        pbx: inputs.pbx_options,
        force: args.force,
        image_files: args.image_file.clone(),
        health_timeout: Duration::from_secs(args.health_timeout.max(1)),
    };
    let result = deploy(&state.store, &agent, request, progress.sink()).await;
    progress.finish();
    let report = result.map_err(|e| explain_failure(e, args.json))?;
    if args.json {
        output::print_json(&report)?;
    } else {
        print_report(&report);
        super::lifecycle::print_status_table(&[(host.name.clone(), Some(report.status))]);
    }
    Ok(ExitCode::SUCCESS)
}

/// What the arguments say, read and checked (token and password included).
struct Inputs {
    preflight: PreflightParams,
    pbx_options: Option<PbxOptions>,
    pbx: IpAddr,
    token: TokenSource,
}

fn checked_inputs(args: &DeployArgs) -> anyhow::Result<Inputs> {
    let preflight = args.target.params()?;
    let pbx_options = args.pbx_api.options()?;
    let pbx = match (args.pbx, args.pbx_api.api_ip()) {
        (Some(ip), _) | (None, Some(ip)) => ip,
        (None, None) => {
            bail!("--pbx IP is required (the PBX or HA virtual IP the IM server connects to)")
        }
    };
    let token = if args.new_im_token {
        TokenSource::NewFromPbx
    } else {
        token_source(
            args.token_file.as_deref(),
            pbx_options.is_some(),
            preflight.private_ip,
            preflight.public_ip,
        )?
    };
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
    Ok(Inputs {
        preflight,
        pbx_options,
        pbx,
        token,
    })
}

/// The host's record, bootstrapping it first when it has no agent yet.
async fn bootstrapped_host(
    state: &ControllerState,
    args: &DeployArgs,
    preflight: &PreflightParams,
    progress: &output::Progress,
) -> anyhow::Result<HostRecord> {
    if let Some(host) = state.store.host(&args.host).await? {
        return Ok(host);
    }
    let request = args.agent.bootstrap_request(
        &args.host,
        &args.ssh,
        &preflight.data_path,
        preflight.storage_dir.as_deref(),
    )?;
    let report = bootstrap(state, &request, progress.sink()).await?;
    if !args.json {
        progress.suspend(|| {
            eprintln!(
                "bootstrapped {} (agent {})",
                report.host.name,
                output::shown(&report.host.agent_version, 64)
            )
        });
    }
    Ok(report.host)
}

/// Shows what a failure leaves to read (failed checks, the failing
/// container's last words) and passes the error on.
fn explain_failure(error: DeployError, json: bool) -> anyhow::Error {
    match &error {
        DeployError::PreflightFailed { checks, .. } if !json => print_checks(checks),
        DeployError::Apply { diagnostics, .. } if !diagnostics.is_empty() => {
            eprintln!("last output of the failing container:");
            for line in diagnostics {
                eprintln!("  | {}", output::shown(line, 4096));
            }
        }
        _ => {}
    }
    error.into()
}

fn print_report(report: &DeployReport) {
    if !report.overridden.is_empty() {
        let ids: Vec<&str> = report.overridden.iter().map(|c| c.id).collect();
        println!(
            "--force overrode failed preflight checks: {}",
            ids.join(", ")
        );
    }
    if let Some(pbx) = &report.pbx {
        for w in &pbx.whitelisted {
            println!(
                "PBX whitelist: {} ({})",
                w.cidr,
                if w.created {
                    "added"
                } else {
                    "already present"
                }
            );
        }
        println!(
            "PBX lists the IM server at {} / {}{}",
            output::shown(
                if pbx.registered.private_ipv4.is_empty() {
                    &pbx.registered.private_ipv6
                } else {
                    &pbx.registered.private_ipv4
                },
                64
            ),
            output::shown(
                if pbx.registered.public_ipv4.is_empty() {
                    &pbx.registered.public_ipv6
                } else {
                    &pbx.registered.public_ipv4
                },
                64
            ),
            if pbx.token_from_pbx {
                " (IM token taken from the PBX)"
            } else {
                ""
            }
        );
    }
    if !report.warnings.is_empty() {
        let ids: Vec<&str> = report.warnings.iter().map(|c| c.id).collect();
        println!("preflight warnings: {}", ids.join(", "));
    }
    println!(
        "{} {} on {} in {:.1} s: {}",
        if report.unchanged {
            "Already deployed (nothing changed):"
        } else {
            "Deployed"
        },
        report.deployment.name,
        report.deployment.host,
        report.elapsed_ms as f64 / 1000.0,
        if report.status.healthy {
            "healthy"
        } else {
            "NOT healthy"
        }
    );
}
