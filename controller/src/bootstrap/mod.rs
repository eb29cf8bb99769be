//! `controller bootstrap`: install the agent on a host through ONE SSH
//! connection, enrol its identity, start it, and wait until it answers over
//! mutual TLS. After this the controller never needs SSH for the host again.

pub mod plan;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use imfleet_certs::{AGENT_LIFETIME, Validity};
use imfleet_proto::model::layout::Layout;
use sha2::{Digest, Sha256};

use crate::agent_client::{Agent, AgentAddress, AgentError, PingOutcome};
use crate::progress::{Phase, ProgressSink, Reporter};
use crate::ssh::{Remote, SshError, SshOptions};
use crate::state::ControllerState;
use crate::store::{CertificateRecord, CertificateState, HostRecord};
use plan::{IdentityDecision, LocalAgent, PlanError};

/// How long the agent gets to answer over mTLS after it was (re)started.
pub const AGENT_START_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct BootstrapRequest {
    /// SSH destination as the operator names the host (alias, name or IP).
    pub target: String,
    pub ssh: SshOptions,
    /// The agent executable to install.
    pub agent_binary: PathBuf,
    /// Address the controller will dial for gRPC; defaults to the SSH host name.
    pub agent_address: Option<String>,
    pub agent_port: u16,
    /// Address the agent listens on; default: the address the controller
    /// dials (0.0.0.0 = every interface).
    pub agent_bind: Option<IpAddr>,
    /// The IM data path: the agent deploys only under it and `storage_dir`.
    pub data_path: String,
    /// The operator's `-f` storage directory.
    pub storage_dir: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error(transparent)]
    Ssh(#[from] SshError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("agent binary {path}: {detail}")]
    LocalBinary { path: String, detail: String },
    #[error(
        "the upload to {target} is corrupt: sha256 {got} on the host, {want} here; nothing was installed"
    )]
    UploadCorrupt {
        target: String,
        got: String,
        want: String,
    },
    #[error("signing the agent's certificate request failed: {0}")]
    Sign(imfleet_certs::CertError),
    #[error("cannot resolve {host}: {detail}")]
    Resolve { host: String, detail: String },
    #[error(
        "the agent was installed and started but did not answer over mTLS within {secs} s: {last}. Its log is {log} on the host"
    )]
    AgentSilent {
        secs: u64,
        last: AgentError,
        log: String,
    },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    State(#[from] crate::state::StateError),
}

/// What a bootstrap did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BootstrapReport {
    pub host: HostRecord,
    pub uploaded_bytes: u64,
    /// Why a new certificate was issued, or `None` if the old one was kept.
    pub certificate_issued: Option<String>,
    pub supervision: String,
    pub round_trip_ms: f64,
    pub elapsed_ms: u64,
    /// The host key the SSH session was checked against: the one pinned,
    /// or those recorded in known_hosts for the host.
    pub ssh_host_key_fingerprints: Vec<String>,
}

/// Finds the agent executable to install: the explicit path, else `agent`
/// next to this controller, else the packaged location.
pub fn locate_agent_binary(explicit: Option<&Path>) -> Result<PathBuf, BootstrapError> {
    if let Some(path) = explicit {
        return if path.is_file() {
            Ok(path.to_owned())
        } else {
            Err(BootstrapError::LocalBinary {
                path: path.display().to_string(),
                detail: "no such file".into(),
            })
        };
    }
    let sibling = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("agent")));
    let candidates = sibling
        .into_iter()
        .chain(std::iter::once(PathBuf::from("/usr/lib/imfleet/agent")));
    let tried: Vec<PathBuf> = candidates.collect();
    tried
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| BootstrapError::LocalBinary {
            path: tried
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            detail: "not found; pass --agent-binary or set IMFLEET_AGENT_BINARY".into(),
        })
}

fn read_local_agent(path: &Path) -> Result<(Vec<u8>, LocalAgent), BootstrapError> {
    let bytes = std::fs::read(path).map_err(|e| BootstrapError::LocalBinary {
        path: path.display().to_string(),
        detail: e.to_string(),
    })?;
    let arch = plan::elf_arch(&bytes).ok_or_else(|| BootstrapError::LocalBinary {
        path: path.display().to_string(),
        detail: "not an ELF executable".into(),
    })?;
    let local = LocalAgent {
        sha256: hex::encode(Sha256::digest(&bytes)),
        size: bytes.len() as u64,
        arch: arch.to_owned(),
    };
    Ok((bytes, local))
}

/// Checks, before anything is sent, that the host offers the key the
/// operator pinned; a known_hosts file holding only that key, for the
/// session to be held to it (OpenSSH checks the key it negotiates).
async fn pin_host_key(
    target: &str,
    resolved: &crate::ssh::ResolvedTarget,
    opts: &SshOptions,
    expected: &str,
    state: &ControllerState,
) -> Result<PinnedKnownHosts, BootstrapError> {
    let timeout = opts
        .connect_timeout
        .unwrap_or(crate::ssh::DEFAULT_CONNECT_TIMEOUT);
    let offered = crate::ssh::offered_host_keys(target, resolved, timeout).await?;
    let Some(key) = offered.iter().find(|k| k.fingerprint == expected) else {
        return Err(SshError::HostKeyMismatch {
            target: target.to_owned(),
            expected: expected.to_owned(),
            offered: offered
                .iter()
                .map(|k| k.fingerprint.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        }
        .into());
    };
    let path = state
        .run_dir()
        .join(format!("known_hosts.pinned.{}", std::process::id()));
    imfleet_certs::storage::write_atomically(
        &path,
        format!("{}\n", key.known_hosts_line).as_bytes(),
        0o600,
    )
    .map_err(SshError::LocalClient)?;
    Ok(PinnedKnownHosts(path))
}

/// A known_hosts file of one pinned key, removed when dropped (the master
/// connection checked the key when it was made).
struct PinnedKnownHosts(PathBuf);

impl PinnedKnownHosts {
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for PinnedKnownHosts {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Runs the whole bootstrap, reporting each phase to `progress`.
pub async fn bootstrap(
    state: &ControllerState,
    request: &BootstrapRequest,
    progress: Arc<dyn ProgressSink>,
) -> Result<BootstrapReport, BootstrapError> {
    let started = Instant::now();
    let (binary, local) = read_local_agent(&request.agent_binary)?;
    let progress = &Reporter::new(progress, request.target.clone());

    let (resolved, dial_host, resolved_ips) = progress
        .phase(Phase::Resolve, request.target.clone(), async {
            let resolved = crate::ssh::resolve(&request.target, &request.ssh).await?;
            let dial_host = request
                .agent_address
                .clone()
                .unwrap_or_else(|| resolved.hostname.clone());
            let resolved_ips = resolve_ips(&dial_host, request.agent_port).await?;
            Ok::<_, BootstrapError>((resolved, dial_host, resolved_ips))
        })
        .await?;
    let sans = plan::subject_alt_names(&dial_host, &resolved_ips);
    // Listen where the controller dials, not on every interface.
    let bind = request
        .agent_bind
        .or_else(|| resolved_ips.first().copied())
        .ok_or_else(|| BootstrapError::Resolve {
            host: dial_host.clone(),
            detail: "no address to listen on; pass --agent-bind".into(),
        })?;

    let mut remote = progress
        .phase(
            Phase::SshConnect,
            format!("{}@{}:{}", resolved.user, resolved.hostname, resolved.port),
            async {
                let pinned = match &request.ssh.host_key_fingerprint {
                    Some(expected) => Some(
                        pin_host_key(&request.target, &resolved, &request.ssh, expected, state)
                            .await?,
                    ),
                    None => None,
                };
                let remote = Remote::connect(
                    &request.target,
                    &resolved,
                    &request.ssh,
                    &state.run_dir(),
                    pinned.as_ref().map(|f| f.path()),
                )
                .await;
                Ok::<_, BootstrapError>(remote?)
            },
        )
        .await?;
    let ssh_host_key_fingerprints = match &request.ssh.host_key_fingerprint {
        Some(pinned) => vec![pinned.clone()],
        None => crate::ssh::recorded_fingerprints(&resolved).await,
    };
    let result = install_over_ssh(
        state,
        request,
        bind,
        &mut remote,
        &binary,
        &local,
        &sans,
        progress,
    )
    .await;
    remote.close().await;
    let installed = result?;

    let address = AgentAddress {
        host: dial_host.clone(),
        port: request.agent_port,
    };
    let pong = progress
        .phase(
            Phase::AwaitAgent,
            address.to_string(),
            wait_for_agent(state, &address, AGENT_START_TIMEOUT),
        )
        .await
        .map_err(|last| BootstrapError::AgentSilent {
            secs: AGENT_START_TIMEOUT.as_secs(),
            last,
            log: Layout::default().log_file().display().to_string(),
        })?;

    let now = crate::now_unix();
    let host = HostRecord {
        name: request.target.clone(),
        agent_address: dial_host,
        agent_port: request.agent_port,
        ssh_user: Some(resolved.user.clone()),
        ssh_port: Some(resolved.port),
        agent_version: pong.reply.agent_version.clone(),
        agent_sha256: local.sha256.clone(),
        cert_serial: installed.certificate.serial_hex.to_ascii_lowercase(),
        cert_not_after: pong.certificate_not_after,
        supervision: installed.supervision.clone(),
        bootstrapped_at: now,
        last_seen_at: Some(now),
    };
    state
        .store
        .record_bootstrap(
            &host,
            &CertificateRecord::new(
                &installed.certificate,
                Some(&host.name),
                CertificateState::Current,
                now,
            ),
            &format!(
                "agent {} via {}; uploaded {} bytes; certificate {}",
                host.agent_version,
                installed.supervision,
                installed.uploaded_bytes,
                installed.certificate_issued.as_deref().unwrap_or("kept"),
            ),
        )
        .await?;
    Ok(BootstrapReport {
        host,
        uploaded_bytes: installed.uploaded_bytes,
        certificate_issued: installed.certificate_issued,
        supervision: installed.supervision,
        round_trip_ms: pong.round_trip.as_secs_f64() * 1000.0,
        elapsed_ms: started.elapsed().as_millis() as u64,
        ssh_host_key_fingerprints,
    })
}

/// What the SSH phase left on the host.
struct RemoteInstall {
    uploaded_bytes: u64,
    certificate_issued: Option<String>,
    certificate: imfleet_certs::CertificateInfo,
    supervision: String,
}

/// Everything that happens over the SSH connection, in order. The scratch
/// directory is removed whether or not a step fails.
#[allow(clippy::too_many_arguments)]
async fn install_over_ssh(
    state: &ControllerState,
    request: &BootstrapRequest,
    bind: IpAddr,
    remote: &mut Remote,
    binary: &[u8],
    local: &LocalAgent,
    sans: &[String],
    progress: &Reporter,
) -> Result<RemoteInstall, BootstrapError> {
    let layout = Layout::default();
    let agent_path = layout.binary().display().to_string();

    let probe = progress
        .phase(Phase::Probe, "", async {
            let out = remote
                .run(
                    "probe",
                    &["sh", "-c", plan::PROBE_SCRIPT, "sh", &agent_path],
                    false,
                    None,
                )
                .await?;
            Ok::<_, BootstrapError>(plan::parse_probe(&out)?)
        })
        .await?;
    let result = async {
        let host_plan = plan::plan_host(&probe, local)?;
        remote.set_use_sudo(host_plan.use_sudo);

        let mut uploaded_bytes = 0;
        if host_plan.upload {
            progress
                .phase(
                    Phase::UploadAgent,
                    format!("({} MB)", local.size / 1_000_000),
                    upload_agent(remote, &probe.tmp_dir, binary, local, &layout),
                )
                .await?;
            uploaded_bytes = local.size;
        }

        let shown = progress
            .phase(
                Phase::CheckIdentity,
                "",
                remote.exec(
                    "agent identity show",
                    &[&agent_path, "identity", "show"],
                    true,
                    None,
                ),
            )
            .await?;
        let installed_cert = (shown.status == 0).then_some(shown.stdout.as_str());
        // A certificate superseded, revoked or never recorded is replaced
        // whatever it says of itself.
        let refused = match installed_cert.and_then(|c| imfleet_certs::inspect_pem(c).ok()) {
            Some(info) => {
                let record = state.store.certificate(&info.serial_hex).await?;
                crate::renewal::refusal(&request.target, record.as_ref())
            }
            None => None,
        };
        let decision = match refused {
            Some(why) => IdentityDecision::Issue(format!(
                "the installed certificate is no longer accepted: {why}"
            )),
            None => plan::decide_identity(
                installed_cert,
                state.ca.cert_pem(),
                sans,
                time::OffsetDateTime::now_utc(),
            ),
        };
        let (certificate_issued, cert_pem) = match decision {
            IdentityDecision::Keep => (None, shown.stdout.clone()),
            IdentityDecision::Issue(reason) => {
                let cert = progress
                    .phase(
                        Phase::Enrol,
                        "",
                        enrol(state, remote, &agent_path, &request.target, sans),
                    )
                    .await?;
                (Some(reason), cert)
            }
        };
        let certificate = imfleet_certs::inspect_pem(&cert_pem).map_err(BootstrapError::Sign)?;

        let listen = std::net::SocketAddr::new(bind, request.agent_port).to_string();
        let mut install = vec![
            agent_path.as_str(),
            "service",
            "install",
            "--listen",
            &listen,
            "--data-path",
            &request.data_path,
        ];
        if let Some(storage) = &request.storage_dir {
            install.extend(["--storage-dir", storage]);
        }
        let out = progress
            .phase(
                Phase::StartAgent,
                listen.clone(),
                remote.run("agent service install", &install, true, None),
            )
            .await?;
        let supervision = out
            .lines()
            .find_map(|l| l.strip_prefix("supervision="))
            .unwrap_or("unknown")
            .to_owned();
        Ok(RemoteInstall {
            uploaded_bytes,
            certificate_issued,
            certificate,
            supervision,
        })
    }
    .await;
    let _ = remote
        .exec(
            "clean up",
            &["rm", "-rf", "--", &probe.tmp_dir],
            false,
            None,
        )
        .await;
    result
}

/// Streams the binary into the scratch dir, checks its hash on the host, then
/// moves it into place with a rename so a running agent is never half-written.
async fn upload_agent(
    remote: &Remote,
    tmp_dir: &str,
    binary: &[u8],
    local: &LocalAgent,
    layout: &Layout,
) -> Result<(), BootstrapError> {
    let staged = format!("{tmp_dir}/agent");
    remote
        .run(
            "upload",
            &["sh", "-c", "cat > \"$1\"", "sh", &staged],
            false,
            Some(binary),
        )
        .await?;
    let sum = remote
        .run("sha256sum", &["sha256sum", &staged], false, None)
        .await?;
    let got = sum.split_whitespace().next().unwrap_or_default().to_owned();
    if got != local.sha256 {
        return Err(BootstrapError::UploadCorrupt {
            target: remote.target().to_owned(),
            got,
            want: local.sha256.clone(),
        });
    }
    let bin_dir = layout.bin_dir().display().to_string();
    let root = layout.root().display().to_string();
    let final_path = layout.binary().display().to_string();
    let next = format!("{final_path}.new");
    remote
        .run(
            "install the agent binary",
            &[
                "sh",
                "-c",
                "set -e; install -d -m 0755 \"$1\" \"$2\"; install -m 0755 \"$3\" \"$4\"; mv -f \"$4\" \"$5\"",
                "sh",
                &root,
                &bin_dir,
                &staged,
                &next,
                &final_path,
            ],
            true,
            None,
        )
        .await?;
    Ok(())
}

/// The agent makes a key on the host and sends a CSR; the CA signs it under
/// policy; the agent installs the certificate and the CA. Returns the cert.
async fn enrol(
    state: &ControllerState,
    remote: &Remote,
    agent_path: &str,
    common_name: &str,
    sans: &[String],
) -> Result<String, BootstrapError> {
    let csr = remote
        .run(
            "agent identity request",
            &[agent_path, "identity", "request", "--name", common_name],
            true,
            None,
        )
        .await?;
    let cert = state
        .ca
        .load()?
        .sign_agent_request(
            &csr,
            common_name,
            sans,
            Validity::starting_now(AGENT_LIFETIME),
        )
        .map_err(BootstrapError::Sign)?;
    let bundle = format!("{cert}{}", state.ca.cert_pem());
    remote
        .run(
            "agent identity install",
            &[agent_path, "identity", "install"],
            true,
            Some(bundle.as_bytes()),
        )
        .await?;
    Ok(cert)
}

/// Pings until the agent answers or `timeout` passes; returns the last error.
pub async fn wait_for_agent(
    state: &ControllerState,
    address: &AgentAddress,
    timeout: Duration,
) -> Result<PingOutcome, AgentError> {
    let deadline = Instant::now() + timeout;
    loop {
        let attempt = async {
            let agent = Agent::connect(&state.identity, address).await?;
            agent.ping().await
        };
        match attempt.await {
            Ok(pong) => return Ok(pong),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

async fn resolve_ips(host: &str, port: u16) -> Result<Vec<IpAddr>, BootstrapError> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![ip]);
    }
    let addrs =
        tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| BootstrapError::Resolve {
                host: host.to_owned(),
                detail: e.to_string(),
            })?;
    Ok(addrs.map(|a| a.ip()).collect())
}
