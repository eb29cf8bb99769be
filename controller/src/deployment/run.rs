//! `controller deploy` after bootstrap, as named steps: check the agent,
//! get the token, gate on preflight, whitelist on the PBX, upload images,
//! apply over mTLS, register on the PBX, record the revision. Each step
//! speaks to the agent and the PBX through [`AgentApi`] and [`PbxApi`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use imfleet_proto::agent::v1::{ApplyOutcome, ApplyRequest, DeploymentStatus};
use serde::Serialize;

use super::api::{AgentApi, PbxApi};
use super::portsip::{self, DEPLOYMENT_NAME, PortsipParams, SECRET_IM_TOKEN};
use super::token::{ImToken, TokenError, TokenSource};
use crate::agent_client::{AgentError, Feature};
use crate::pbx::{ImAddresses, PbxClient, PbxError, PbxOptions, Whitelisted};
use crate::preflight::{self, Check, PreflightParams, Verdict};
use crate::progress::{Phase, ProgressSink, Reporter};
use crate::store::{DeploymentRecord, Outcome, Store, StoreError};

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
        wanted: Box<ImAddresses>,
        shown: Box<ImAddresses>,
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
    /// The same spec already ran healthy: nothing on the host was changed.
    pub unchanged: bool,
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

/// Deploys with the real PBX client: logs in first (bad credentials fail
/// before the host is touched), logs out whatever happens.
pub async fn deploy(
    store: &Store,
    agent: &impl AgentApi,
    request: DeployRequest,
    progress: Arc<dyn ProgressSink>,
) -> Result<DeployReport, DeployError> {
    let reporter = Reporter::new(progress, request.host.clone());
    let pbx = match &request.pbx {
        Some(options) => Some(
            reporter
                .phase(Phase::PbxLogin, "", PbxClient::login(options.clone()))
                .await?,
        ),
        None => None,
    };
    let result = deploy_with(store, agent, &request, pbx.as_ref(), &reporter).await;
    if let Some(pbx) = pbx {
        pbx.logout().await;
    }
    result
}

/// The deploy steps in order. Nothing on the PBX or the host changes before
/// the agent and preflight are found good; a new IM token is made last,
/// right before the apply.
pub async fn deploy_with(
    store: &Store,
    agent: &impl AgentApi,
    request: &DeployRequest,
    pbx: Option<&impl PbxApi>,
    progress: &Reporter,
) -> Result<DeployReport, DeployError> {
    let started = Instant::now();
    store.check_not_in_rollout(&request.host).await?;
    check_agent(agent, request).await?;
    let gate = progress
        .phase(Phase::Preflight, "", preflight_gate(agent, request))
        .await?;
    let whitelisted = match pbx {
        Some(pbx) => whitelist(pbx, request, progress).await?,
        None => Vec::new(),
    };
    // Images the archives do not provide are pulled, or refused, by apply.
    for path in &request.image_files {
        super::upload::upload_image(agent, path, progress).await?;
    }
    // Last before the apply: a new token revokes the one the running IM uses.
    let (token, token_from_pbx) = progress
        .phase(Phase::ImToken, "", obtain_token(&request.token, pbx))
        .await?;
    let installed = install(store, agent, request, &token, pbx, &gate.failed, progress).await?;
    Ok(DeployReport {
        deployment: installed.record,
        status: installed.status,
        unchanged: installed.unchanged,
        overridden: gate.failed,
        warnings: gate.warnings,
        pbx: installed.registered.map(|registered| PbxReport {
            whitelisted,
            registered,
            token_from_pbx,
        }),
        elapsed_ms: started.elapsed().as_millis() as u64,
    })
}

/// What [`install`] did.
#[derive(Debug)]
pub(crate) struct Installed {
    pub record: DeploymentRecord,
    pub status: DeploymentStatus,
    pub unchanged: bool,
    /// What the PBX shows now, when its API was used.
    pub registered: Option<ImAddresses>,
}

/// Marks `record` as what runs now, with the image ids the host reports.
pub(crate) fn stamp_running(record: &mut DeploymentRecord, status: &DeploymentStatus) {
    record.image_ids = status
        .containers
        .iter()
        .map(|c| (c.name.clone(), c.image_id.clone()))
        .collect();
    record.deployed_at = crate::now_unix();
}

/// The swap with the token in hand: build the spec, apply it, record the
/// revision (failed ones too), register on the PBX. Deploy and each host's
/// step of a rollout (forward or back) go through here.
pub(crate) async fn install(
    store: &Store,
    agent: &impl AgentApi,
    request: &DeployRequest,
    token: &ImToken,
    pbx: Option<&impl PbxApi>,
    overridden: &[Check],
    progress: &Reporter,
) -> Result<Installed, DeployError> {
    let spec = portsip::portsip_spec(&request.params, &token.fingerprint());
    let mut record = deployment_record(request, overridden, &spec.config_hash);
    let applied = progress
        .phase(
            Phase::Apply,
            DEPLOYMENT_NAME,
            apply(agent, request, spec, token, progress),
        )
        .await;
    let (status, unchanged) = match applied {
        Ok(done) => done,
        Err(e) => {
            let outcome = match &e {
                DeployError::Apply {
                    rolled_back: true, ..
                } => Outcome::RolledBack,
                _ => Outcome::Failed,
            };
            record.deployed_at = crate::now_unix();
            // The failure is what the operator needs; a failed record is logged.
            if let Err(store_error) = store.record_apply(&record, outcome, &e.to_string()).await {
                tracing::warn!("could not record the failed deploy: {store_error}");
            }
            return Err(e);
        }
    };
    stamp_running(&mut record, &status);
    let outcome = if unchanged {
        Outcome::Unchanged
    } else {
        Outcome::Applied
    };
    // Recorded before the PBX is asked: the host runs it either way.
    store.record_apply(&record, outcome, "").await?;
    let registered = match pbx {
        Some(pbx) => Some(
            progress
                .phase(Phase::Register, "", register(pbx, request))
                .await?,
        ),
        None => None,
    };
    Ok(Installed {
        record,
        status,
        unchanged,
        registered,
    })
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

/// Step 1: the agent answers, is new enough, and may use the directories.
pub(crate) async fn check_agent(
    agent: &impl AgentApi,
    request: &DeployRequest,
) -> Result<(), DeployError> {
    let pong = agent.ping().await?;
    agent.require(Feature::Apply).await?;
    check_roots(
        &pong.reply.data_roots,
        &request.params.data_path,
        request.params.storage_dir.as_deref(),
    )
    .map_err(|detail| DeployError::OutsideRoots {
        host: request.host.clone(),
        roots: pong.reply.data_roots.clone(),
        detail,
    })
}

/// Step 2: the token as given, or from the PBX (new when asked for).
pub(crate) async fn obtain_token(
    source: &TokenSource,
    pbx: Option<&impl PbxApi>,
) -> Result<(ImToken, bool), DeployError> {
    let secret = match (source, pbx) {
        (TokenSource::Given(token), _) => return Ok((token.clone(), false)),
        (TokenSource::NewFromPbx, Some(pbx)) => pbx.generate_im_token().await?,
        (TokenSource::FromPbx, Some(pbx)) => pbx.im_token().await?,
        (TokenSource::FromPbx | TokenSource::NewFromPbx, None) => {
            return Err(DeployError::Pbx(PbxError::Config(
                "the token is to come from the PBX, but no PBX API access was given".into(),
            )));
        }
    };
    let token = ImToken::parse(secret.expose()).map_err(DeployError::PbxToken)?;
    Ok((token, true))
}

/// What preflight let through.
pub(crate) struct Gate {
    /// Failed checks `--force` overrode.
    pub failed: Vec<Check>,
    pub warnings: Vec<Check>,
}

/// Step 3: preflight; failures stop the deploy unless forced.
pub(crate) async fn preflight_gate(
    agent: &impl AgentApi,
    request: &DeployRequest,
) -> Result<Gate, DeployError> {
    let current = agent.status(DEPLOYMENT_NAME).await?;
    let mut params = request.preflight.clone();
    params.redeploy = current.containers.iter().any(|c| c.state == "running");
    let checks = preflight::assess(agent, &params).await?;
    let of = |verdict| -> Vec<Check> {
        checks
            .iter()
            .filter(|c| c.verdict == verdict)
            .cloned()
            .collect()
    };
    let (failed, warnings) = (of(Verdict::Fail), of(Verdict::Warn));
    if !failed.is_empty() && !request.force {
        return Err(DeployError::PreflightFailed {
            host: request.host.clone(),
            checks,
        });
    }
    for c in &failed {
        let observed = crate::text::printable(&c.observed, 256);
        tracing::info!(check = c.id, %observed, "preflight failure overridden by --force");
    }
    Ok(Gate { failed, warnings })
}

/// Step 4: the PBX rate-limits (and so starves) an IM server it has not
/// whitelisted.
async fn whitelist(
    pbx: &impl PbxApi,
    request: &DeployRequest,
    progress: &Reporter,
) -> Result<Vec<Whitelisted>, DeployError> {
    let description = format!("imfleet: PortSIP IM server {}", request.host);
    let mut ips = vec![request.params.private_ip];
    if request.params.public_ip != request.params.private_ip {
        ips.push(request.params.public_ip);
    }
    let mut done = Vec::new();
    for ip in ips {
        done.push(
            progress
                .phase(
                    Phase::Whitelist,
                    ip.to_string(),
                    pbx.ensure_whitelisted(ip, &description),
                )
                .await?,
        );
    }
    Ok(done)
}

/// Step 5: the apply, streamed. The gRPC deadline only bounds the wait for
/// the stream to open; the stream itself is bounded here. Returns the final
/// status and whether the agent found nothing to change.
async fn apply(
    agent: &impl AgentApi,
    request: &DeployRequest,
    spec: imfleet_proto::agent::v1::DeploymentSpec,
    token: &ImToken,
    progress: &Reporter,
) -> Result<(DeploymentStatus, bool), DeployError> {
    let health_timeout_seconds = request.health_timeout.as_secs().min(u64::from(u32::MAX)) as u32;
    let deadline = tokio::time::Instant::now()
        + crate::agent_client::apply_deadline(&spec, health_timeout_seconds);
    let mut events = agent
        .apply(ApplyRequest {
            spec: Some(spec),
            provided_secrets: [(SECRET_IM_TOKEN.to_owned(), token.expose().to_owned())].into(),
            health_timeout_seconds,
        })
        .await?;
    let outcome = loop {
        let Ok(next) = tokio::time::timeout_at(deadline, events.next()).await else {
            return Err(DeployError::NoOutcome(request.host.clone()));
        };
        match next {
            Some(Ok(event)) => match event.outcome {
                Some(outcome) => break outcome,
                None => progress.agent_step(&event.phase, &event.message),
            },
            Some(Err(e)) => return Err(e.into()),
            None => return Err(DeployError::NoOutcome(request.host.clone())),
        }
    };
    judge_outcome(&request.host, outcome)
}

/// The agent's last word, held to the exit status: success only with every
/// container healthy (an older agent might say otherwise).
fn judge_outcome(
    host: &str,
    outcome: ApplyOutcome,
) -> Result<(DeploymentStatus, bool), DeployError> {
    if !outcome.success {
        return Err(DeployError::Apply {
            host: host.to_owned(),
            error: outcome.error,
            diagnostics: outcome.diagnostics,
            rolled_back: outcome.rolled_back,
        });
    }
    let status = outcome.status.unwrap_or_default();
    if !status.healthy {
        return Err(DeployError::Apply {
            host: host.to_owned(),
            error: "the agent reported success but not every container is healthy".into(),
            diagnostics: status
                .containers
                .iter()
                .map(|c| format!("{}: {} ({})", c.name, c.state, c.health))
                .collect(),
            rolled_back: false,
        });
    }
    Ok((status, outcome.unchanged))
}

/// Step 6: the PBX must list the IM server's addresses before deploy calls
/// it done.
pub(crate) async fn register(
    pbx: &impl PbxApi,
    request: &DeployRequest,
) -> Result<ImAddresses, DeployError> {
    let wanted = ImAddresses::from_ips(request.params.private_ip, request.params.public_ip);
    pbx.set_im_addresses(&wanted).await?;
    let shown = pbx.im_addresses().await?;
    if shown != wanted {
        return Err(DeployError::NotRegistered {
            host: request.host.clone(),
            wanted: Box::new(wanted),
            shown: Box::new(shown),
        });
    }
    Ok(wanted)
}

/// What is recorded for the host (image ids filled in from the outcome).
fn deployment_record(
    request: &DeployRequest,
    overridden: &[Check],
    config_hash: &str,
) -> DeploymentRecord {
    DeploymentRecord {
        host: request.host.clone(),
        name: DEPLOYMENT_NAME.into(),
        private_ip: request.params.private_ip.to_string(),
        public_ip: request.params.public_ip.to_string(),
        pbx: request.params.pbx.to_string(),
        data_path: request.params.data_path.clone(),
        storage_dir: request.params.storage_dir.clone(),
        image: request.params.image.clone(),
        db_image: request.params.db_image.clone(),
        image_ids: Default::default(),
        config_hash: config_hash.to_owned(),
        users: request.preflight.sizing.users,
        overridden: overridden.iter().map(|c| c.id.to_owned()).collect(),
        deployed_at: 0,
    }
}

#[cfg(test)]
#[path = "run_tests.rs"]
mod tests;
