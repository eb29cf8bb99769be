//! `controller deploy` after bootstrap: preflight gate, apply the PortSIP spec
//! over mTLS with progress, record what runs.

use std::time::{Duration, Instant};

use imfleet_proto::agent::v1::{ApplyRequest, DeploymentStatus};
use indicatif::ProgressBar;
use serde::Serialize;

use super::portsip::{self, DEPLOYMENT_NAME, PortsipParams, SECRET_IM_TOKEN};
use crate::agent_client::{Agent, AgentError};
use crate::pbx::{ImAddresses, PbxClient, PbxError, PbxOptions, Whitelisted};
use crate::preflight::{self, Check, PreflightParams, Verdict};
use crate::state::ControllerState;
use crate::store::{DeploymentRecord, StoreError};

/// The IM server token from the PBX. Never printed: `Debug` is redacted.
#[derive(Clone)]
pub struct ImToken(String);

impl std::fmt::Debug for ImToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ImToken([redacted])")
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error(
        "the IM token is empty; generate one on the PBX (Servers > IM Servers > Generate Token)"
    )]
    Empty,
    #[error(
        "the IM token contains spaces or control characters; copy it again from the PBX portal"
    )]
    Malformed,
    #[error("the IM token is longer than 4096 characters; is that the right file?")]
    TooLong,
}

impl ImToken {
    /// Accepts the token as read from a file, stdin or the environment
    /// (surrounding white space, such as a final newline, is dropped).
    pub fn parse(text: &str) -> Result<ImToken, TokenError> {
        let token = text.trim();
        if token.is_empty() {
            Err(TokenError::Empty)
        } else if token.len() > 4096 {
            Err(TokenError::TooLong)
        } else if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            Err(TokenError::Malformed)
        } else {
            Ok(ImToken(token.to_owned()))
        }
    }

    pub fn fingerprint(&self) -> String {
        portsip::token_fingerprint(&self.0)
    }

    fn expose(&self) -> &str {
        &self.0
    }
}

/// Where the IM token comes from.
#[derive(Debug)]
pub enum TokenSource {
    /// From the operator (file, stdin, environment or prompt).
    Given(ImToken),
    /// The PBX's current token, through its API.
    FromPbx,
    /// A newly generated token (the HA upgrade guide asks for one per upgrade).
    NewFromPbx,
}

#[derive(Debug)]
pub struct DeployRequest {
    pub host: String,
    pub params: PortsipParams,
    pub preflight: PreflightParams,
    pub token: TokenSource,
    /// PBX API access: whitelist, token, registration check.
    pub pbx: Option<PbxOptions>,
    /// Deploy despite failed preflight checks (they are recorded).
    pub force: bool,
    pub health_timeout: Duration,
    /// `docker save` archives to stream to the host before installing.
    pub image_files: Vec<std::path::PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error(
        "preflight failed on {host}: {}. Nothing was changed. Fix the host, or pass --force to deploy anyway",
        failed_ids(.checks)
    )]
    PreflightFailed { host: String, checks: Vec<Check> },
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(
        "deploy on {host} failed: {error}. {}",
        if *.rolled_back { "The previous deployment was restored and is running again." } else { "No new containers were left behind." }
    )]
    Apply {
        host: String,
        error: String,
        diagnostics: Vec<String>,
        rolled_back: bool,
    },
    #[error(
        "the agent on {0} ended the deploy, or did not finish it in time, without reporting an outcome; run `controller status {0}`"
    )]
    NoOutcome(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Pbx(#[from] PbxError),
    #[error("the PBX's IM token is unusable: {0}")]
    PbxToken(TokenError),
    #[error(
        "the IM service on {host} is healthy, but the PBX shows IM addresses {shown:?} instead of {wanted:?}; check Servers > IM Servers in the portal"
    )]
    NotRegistered {
        host: String,
        wanted: ImAddresses,
        shown: ImAddresses,
    },
    #[error(
        "the agent on {host} may only use {roots:?}; {detail}. Re-run `controller bootstrap {host} --data-path ... [-f ...]` with the directories to use (nothing was changed)"
    )]
    OutsideRoots {
        host: String,
        roots: Vec<String>,
        detail: String,
    },
    #[error("image archive {path}: {source}")]
    ImageFile {
        path: String,
        source: std::io::Error,
    },
}

fn failed_ids(checks: &[Check]) -> String {
    let failed: Vec<&str> = checks
        .iter()
        .filter(|c| c.verdict == Verdict::Fail)
        .map(|c| c.id)
        .collect();
    format!("{} check(s) failed ({})", failed.len(), failed.join(", "))
}

/// What a successful deploy did.
#[derive(Debug, Serialize)]
pub struct DeployReport {
    pub deployment: DeploymentRecord,
    pub status: DeploymentStatus,
    /// Failed checks that --force overrode.
    pub overridden: Vec<Check>,
    pub warnings: Vec<Check>,
    /// What was done on the PBX, when its API was used.
    pub pbx: Option<PbxReport>,
    pub elapsed_ms: u64,
}

#[derive(Debug, Serialize)]
pub struct PbxReport {
    pub whitelisted: Vec<Whitelisted>,
    pub registered: ImAddresses,
    pub token_from_pbx: bool,
}

pub async fn deploy(
    state: &ControllerState,
    agent: &Agent,
    request: DeployRequest,
    progress: &ProgressBar,
) -> Result<DeployReport, DeployError> {
    // Log in before anything touches the host: bad credentials fail fast.
    let pbx = match &request.pbx {
        Some(options) => {
            progress.set_message("logging in to the PBX API");
            Some(PbxClient::login(options.clone()).await?)
        }
        None => None,
    };
    let result = deploy_with(state, agent, &request, pbx.as_ref(), progress).await;
    if let Some(pbx) = pbx {
        pbx.logout().await;
    }
    result
}

/// Whether the directories a deploy uses lie in the roots the agent was
/// bootstrapped with (the agent refuses anything else; asking first means
/// no image is uploaded for a deploy that cannot happen).
pub fn check_roots(
    roots: &[String],
    data_path: &str,
    storage_dir: Option<&str>,
) -> Result<(), String> {
    let within = |dir: &str| {
        roots
            .iter()
            .any(|root| std::path::Path::new(dir).starts_with(root))
    };
    if roots.is_empty() {
        return Err("it was bootstrapped before data directories were fixed".into());
    }
    for (what, dir) in std::iter::once(("the data path", data_path))
        .chain(storage_dir.map(|s| ("the storage directory", s)))
    {
        if !within(dir) {
            return Err(format!("{what} {dir} is not among them"));
        }
    }
    Ok(())
}

async fn deploy_with(
    state: &ControllerState,
    agent: &Agent,
    request: &DeployRequest,
    pbx: Option<&PbxClient>,
    progress: &ProgressBar,
) -> Result<DeployReport, DeployError> {
    let started = Instant::now();
    let pong = agent.ping().await?;
    // An agent too old to deploy is refused before the PBX or host changes.
    agent.require(crate::agent_client::Feature::Apply).await?;
    check_roots(
        &pong.reply.data_roots,
        &request.params.data_path,
        request.params.storage_dir.as_deref(),
    )
    .map_err(|detail| DeployError::OutsideRoots {
        host: request.host.clone(),
        roots: pong.reply.data_roots.clone(),
        detail,
    })?;
    let (token, token_from_pbx) = match (&request.token, pbx) {
        (TokenSource::Given(token), _) => (token.clone(), false),
        (source @ (TokenSource::FromPbx | TokenSource::NewFromPbx), Some(pbx)) => {
            let secret = if matches!(source, TokenSource::NewFromPbx) {
                progress.set_message("generating a new IM token on the PBX");
                pbx.generate_im_token().await?
            } else {
                progress.set_message("fetching the IM token from the PBX");
                pbx.im_token().await?
            };
            (
                ImToken::parse(secret.expose()).map_err(DeployError::PbxToken)?,
                true,
            )
        }
        (TokenSource::FromPbx | TokenSource::NewFromPbx, None) => {
            return Err(DeployError::Pbx(PbxError::Config(
                "the token is to come from the PBX, but no PBX API access was given".into(),
            )));
        }
    };
    progress.set_message("preflight");
    let current = agent.status(DEPLOYMENT_NAME).await?;
    let mut preflight_params = request.preflight.clone();
    preflight_params.redeploy = current.containers.iter().any(|c| c.state == "running");
    let checks = preflight::assess(agent, &preflight_params).await?;
    let failed: Vec<Check> = checks
        .iter()
        .filter(|c| c.verdict == Verdict::Fail)
        .cloned()
        .collect();
    let warnings: Vec<Check> = checks
        .iter()
        .filter(|c| c.verdict == Verdict::Warn)
        .cloned()
        .collect();
    if !failed.is_empty() && !request.force {
        return Err(DeployError::PreflightFailed {
            host: request.host.clone(),
            checks,
        });
    }
    for c in &failed {
        tracing::info!(check = c.id, observed = %c.observed, "preflight failure overridden by --force");
    }

    // The PBX rate-limits (and so starves) an IM server it has not whitelisted.
    let mut whitelisted = Vec::new();
    if let Some(pbx) = pbx {
        progress.set_message("whitelisting the IM host on the PBX");
        let description = format!("imfleet: PortSIP IM server {}", request.host);
        let mut ips = vec![request.params.private_ip];
        if request.params.public_ip != request.params.private_ip {
            ips.push(request.params.public_ip);
        }
        for ip in ips {
            whitelisted.push(pbx.ensure_whitelisted(ip, &description).await?);
        }
    }

    // Images the archives do not provide are pulled, or refused, by apply.
    for path in &request.image_files {
        upload_image(agent, path, progress).await?;
    }

    let spec = portsip::portsip_spec(&request.params, &token.fingerprint());
    let config_hash = spec.config_hash.clone();
    let apply = ApplyRequest {
        spec: Some(spec),
        provided_secrets: [(SECRET_IM_TOKEN.to_owned(), token.expose().to_owned())].into(),
        health_timeout_seconds: request.health_timeout.as_secs().min(u64::from(u32::MAX)) as u32,
    };
    // The gRPC deadline only bounds the wait for the stream to open; the
    // stream itself is bounded here.
    let deadline = tokio::time::Instant::now()
        + crate::agent_client::apply_deadline(
            &apply.spec.clone().unwrap_or_default(),
            apply.health_timeout_seconds,
        );
    let mut events = agent.apply(apply).await?;
    let mut outcome = None;
    loop {
        let Ok(next) = tokio::time::timeout_at(deadline, events.message()).await else {
            return Err(DeployError::NoOutcome(request.host.clone()));
        };
        match next {
            Ok(Some(event)) => {
                if let Some(o) = event.outcome {
                    outcome = Some(o);
                    break;
                }
                progress.set_message(format!("{}: {}", event.phase, event.message));
                tracing::info!(phase = %event.phase, "{}", event.message);
            }
            Ok(None) => break,
            Err(status) => return Err(agent.stream_error(status).into()),
        }
    }
    let outcome = outcome.ok_or_else(|| DeployError::NoOutcome(request.host.clone()))?;
    if !outcome.success {
        return Err(DeployError::Apply {
            host: request.host.clone(),
            error: outcome.error,
            diagnostics: outcome.diagnostics,
            rolled_back: outcome.rolled_back,
        });
    }
    let status = outcome.status.unwrap_or_default();
    // The agent declares success only with everything healthy; an older agent
    // might not, and the last word must agree with the exit status.
    if !status.healthy {
        return Err(DeployError::Apply {
            host: request.host.clone(),
            error: "the agent reported success but not every container is healthy".into(),
            diagnostics: status
                .containers
                .iter()
                .map(|c| format!("{}: {} ({})", c.name, c.state, c.health))
                .collect(),
            rolled_back: false,
        });
    }

    // The PBX must list the IM server's addresses before deploy calls it done.
    let pbx_report = match pbx {
        Some(pbx) => {
            progress.set_message("registering the IM server on the PBX");
            let wanted = ImAddresses::from_ips(request.params.private_ip, request.params.public_ip);
            pbx.set_im_addresses(&wanted).await?;
            let shown = pbx.im_addresses().await?;
            if shown != wanted {
                return Err(DeployError::NotRegistered {
                    host: request.host.clone(),
                    wanted,
                    shown,
                });
            }
            Some(PbxReport {
                whitelisted,
                registered: wanted,
                token_from_pbx,
            })
        }
        None => None,
    };
    let record = DeploymentRecord {
        host: request.host.clone(),
        name: DEPLOYMENT_NAME.into(),
        private_ip: request.params.private_ip.to_string(),
        public_ip: request.params.public_ip.to_string(),
        pbx: request.params.pbx.to_string(),
        data_path: request.params.data_path.clone(),
        storage_dir: request.params.storage_dir.clone(),
        image: request.params.image.clone(),
        db_image: request.params.db_image.clone(),
        image_ids: status
            .containers
            .iter()
            .map(|c| (c.name.clone(), c.image_id.clone()))
            .collect(),
        config_hash,
        users: request.preflight.sizing.users,
        overridden: failed.iter().map(|c| c.id.to_owned()).collect(),
        deployed_at: crate::now_unix(),
    };
    state.store.upsert_deployment(&record)?;
    state.store.record_event(
        Some(&request.host),
        "deploy",
        &format!(
            "{} with {}; config {}; overridden: [{}]",
            DEPLOYMENT_NAME,
            record.image,
            record.config_hash,
            record.overridden.join(", ")
        ),
    )?;
    Ok(DeployReport {
        deployment: record,
        status,
        overridden: failed,
        warnings,
        pbx: pbx_report,
        elapsed_ms: started.elapsed().as_millis() as u64,
    })
}

/// Bytes per streamed chunk (well under gRPC's 4 MiB message limit).
const CHUNK: usize = 1024 * 1024;

/// Hashes the archive, then streams it; the agent loads it only if size and
/// sha256 match.
async fn upload_image(
    agent: &Agent,
    path: &std::path::Path,
    progress: &ProgressBar,
) -> Result<(), DeployError> {
    use imfleet_proto::agent::v1::{ImageChunk, ImageUploadHeader};
    use sha2::{Digest, Sha256};
    use tokio::io::AsyncReadExt;

    let io_err = |source| DeployError::ImageFile {
        path: path.display().to_string(),
        source,
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    progress.set_message(format!("hashing {name}"));
    let mut file = tokio::fs::File::open(path).await.map_err(io_err)?;
    let size = file.metadata().await.map_err(io_err)?.len();
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = file.read(&mut buf).await.map_err(io_err)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let header = ImageUploadHeader {
        name: name.clone(),
        size,
        sha256: hex::encode(hasher.finalize()),
    };
    let mut file = tokio::fs::File::open(path).await.map_err(io_err)?;
    let (tx, rx) = tokio::sync::mpsc::channel::<ImageChunk>(4);
    let bar = progress.clone();
    let reader = tokio::spawn(async move {
        let mut header = Some(header);
        let mut sent = 0u64;
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = file.read(&mut buf).await?;
            if n == 0 && header.is_none() {
                return Ok::<_, std::io::Error>(());
            }
            sent += n as u64;
            bar.set_message(if sent < size {
                format!("uploading {name}: {}", imfleet_proto::megabytes(sent, size))
            } else {
                format!("{name}: verifying and loading into the Docker Engine")
            });
            let chunk = ImageChunk {
                header: header.take(),
                data: buf[..n].to_vec(),
            };
            if tx.send(chunk).await.is_err() || n == 0 {
                return Ok(());
            }
        }
    });
    let loaded = agent
        .load_image(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await;
    reader
        .await
        .map_err(|e| io_err(std::io::Error::other(e)))?
        .map_err(io_err)?;
    let loaded = loaded?;
    tracing::info!(archive = %path.display(), loaded = ?loaded.loaded, "image archive loaded");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deploys_stay_within_the_agents_roots() {
        let roots = vec!["/var/lib/portsip".to_owned(), "/data/im".to_owned()];
        check_roots(&roots, "/var/lib/portsip", Some("/data/im")).unwrap();
        check_roots(&roots, "/var/lib/portsip", None).unwrap();
        // Component-wise, not by string prefix.
        assert!(check_roots(&roots, "/var/lib/portsip2", None).is_err());
        assert!(check_roots(&roots, "/var/lib/portsip", Some("/srv")).is_err());
        assert!(check_roots(&[], "/var/lib/portsip", None).is_err());
    }

    #[test]
    fn tokens_are_checked_and_never_shown() {
        assert_eq!(ImToken::parse("").unwrap_err(), TokenError::Empty);
        assert_eq!(ImToken::parse(" \n").unwrap_err(), TokenError::Empty);
        assert_eq!(
            ImToken::parse("abc def").unwrap_err(),
            TokenError::Malformed
        );
        assert_eq!(
            ImToken::parse(&"x".repeat(5000)).unwrap_err(),
            TokenError::TooLong
        );
        let token = ImToken::parse("s3cr3t-token-value\n").unwrap();
        assert_eq!(token.expose(), "s3cr3t-token-value");
        assert!(!format!("{token:?}").contains("s3cr3t"));
        assert_eq!(token.fingerprint().len(), 64);
    }
}
