//! The agent's gRPC server: mutual TLS only, and only the controller role.

use std::future::Future;
use std::time::{Duration, Instant};

use imfleet_proto::agent::v1::agent_server::{Agent, AgentServer};
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use imfleet_proto::agent::v1::{
    AgentBinaryChunk, AgentUpgradeStarted, ApplyEvent, ApplyRequest, ControlRequest,
    DeploymentStatus, HealthSample, HostInventory, IdentityInstalled, ImageChunk,
    InstallIdentityRequest, InventoryRequest, LoadedImage, LogLine, LogsRequest, PingReply,
    PingRequest, PrepareImagesRequest, PreparedImages, RenewIdentityReply, RenewIdentityRequest,
    SetTrustedCasRequest, StatusRequest, TrustedCas, WatchHealthRequest, control_request::Action,
};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Server;
use tonic::{Request, Response, Status};

use crate::audit::{AuditLog, Caller, Entry};
use crate::deploy::{DeployError, Deployer, DeployerConfig};
use crate::gate::ControllerGate;
use crate::identity::{IdentityError, ServingIdentity};
use crate::policy::Roots;
use crate::serving::Credentials;
use imfleet_proto::model::layout::Layout;

/// Facts the agent reports about itself.
#[derive(Debug, Clone)]
pub struct AgentFacts {
    pub hostname: String,
    pub supervision: String,
}

impl AgentFacts {
    pub fn detect() -> Self {
        AgentFacts {
            hostname: hostname::get()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default(),
            supervision: std::env::var(crate::supervision::SUPERVISION_ENV)
                .unwrap_or_else(|_| "manual".to_owned()),
        }
    }
}

#[derive(Debug)]
pub struct AgentService {
    started: Instant,
    facts: AgentFacts,
    deployer: Arc<Deployer>,
    monitor: Arc<crate::health::Monitor>,
    audit: Arc<AuditLog>,
    layout: Layout,
    /// Asks the agent's own supervisor to restart it (an upgrade).
    restart: crate::upgrade::RestartRequest,
    /// What the agent serves with and the CAs it trusts (agent binaries
    /// must carry their signature); a renewal or a CA rotation replaces them.
    credentials: Arc<Credentials>,
    /// One renewal or CA change at a time, held by the blocking task that
    /// does it (so a cancelled call cannot let the next one in early).
    renewing: Arc<tokio::sync::Mutex<()>>,
    /// Who may call: the controller role, from the list of accepted ones.
    gate: Arc<ControllerGate>,
}

impl AgentService {
    pub fn new(
        facts: AgentFacts,
        layout: &Layout,
        roots: Option<Roots>,
        restart: crate::upgrade::RestartRequest,
        credentials: Arc<Credentials>,
    ) -> Result<Self, ServeError> {
        let deployer = Deployer::new(&DeployerConfig {
            spool_dir: layout.spool_dir(),
            state_dir: layout.state_dir(),
            roots,
        })?;
        let monitor = crate::health::Monitor::new(
            bollard::Docker::connect_with_unix_defaults().map_err(DeployError::from)?,
            crate::deploy::record::Records::open(&layout.state_dir()).map_err(DeployError::from)?,
            deployer.roots().cloned(),
            credentials.expiry(),
        )
        .map_err(|e| ServeError::Health(e.to_string()))?;
        let audit_path = layout.audit_log();
        if let Some(dir) = audit_path.parent() {
            std::fs::create_dir_all(dir).map_err(ServeError::Audit)?;
        }
        Ok(AgentService {
            started: Instant::now(),
            facts,
            deployer: Arc::new(deployer),
            monitor: Arc::new(monitor),
            audit: Arc::new(AuditLog::open(&audit_path).map_err(ServeError::Audit)?),
            layout: layout.clone(),
            restart,
            gate: Arc::new(ControllerGate::open(layout, credentials.clone())),
            credentials,
            renewing: Default::default(),
        })
    }

    /// Changes the agent's identity or trusted CAs on a blocking thread,
    /// one change at a time, and serves the result from the next handshake
    /// before the next change may begin (a cancelled call cannot let one in
    /// early: the lock goes with the work).
    async fn change_identity(
        &self,
        change: impl FnOnce(&Layout) -> Result<ServingIdentity, IdentityError> + Send + 'static,
    ) -> Result<ServingIdentity, Status> {
        let one = self.renewing.clone().lock_owned().await;
        let (layout, credentials) = (self.layout.clone(), self.credentials.clone());
        tokio::task::spawn_blocking(move || {
            let _one = one;
            let identity = change(&layout).map_err(identity_status)?;
            credentials
                .replace(&identity)
                .map_err(|e| Status::internal(e.to_string()))?;
            Ok(identity)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
    }

    fn audit(&self, caller: &Caller, rpc: &str, deployment: &str, detail: String, outcome: String) {
        self.audit.record(&Entry {
            caller,
            rpc,
            deployment,
            detail,
            outcome,
        });
    }
}

fn identity_status(e: IdentityError) -> Status {
    match e {
        IdentityError::NoRenewal
        | IdentityError::NotForRenewalKey
        | IdentityError::Refused(_)
        | IdentityError::Cert(_) => Status::failed_precondition(e.to_string()),
        other => Status::internal(other.to_string()),
    }
}

fn deploy_status(e: DeployError) -> Status {
    match e {
        DeployError::Invalid(m) => Status::failed_precondition(m),
        other => Status::internal(other.to_string()),
    }
}

/// An outcome as the audit log shows it.
fn outcome_text<T>(result: &Result<T, Status>) -> String {
    match result {
        Ok(_) => "ok".into(),
        Err(s) if s.code() == tonic::Code::FailedPrecondition => {
            format!("refused: {}", s.message())
        }
        Err(s) => format!("failed: {}", s.message()),
    }
}

type EventStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl Agent for AgentService {
    async fn ping(&self, request: Request<PingRequest>) -> Result<Response<PingReply>, Status> {
        Ok(Response::new(PingReply {
            nonce: request.into_inner().nonce,
            agent_version: crate::version().to_owned(),
            protocol_revision: crate::protocol_revision(),
            hostname: self.facts.hostname.clone(),
            uptime_seconds: self.started.elapsed().as_secs(),
            certificate_not_after: self.credentials.not_after(),
            supervision: self.facts.supervision.clone(),
            platform: crate::platform(),
            data_roots: self
                .deployer
                .roots()
                .map(Roots::describe)
                .unwrap_or_default(),
            last_upgrade: crate::upgrade::last_upgrade(&self.layout),
            controllers_version: self.gate.version(),
            trusted_ca_fingerprints: imfleet_certs::fingerprints(&self.credentials.ca_pem()),
        }))
    }

    async fn inventory(
        &self,
        request: Request<InventoryRequest>,
    ) -> Result<Response<HostInventory>, Status> {
        let request = request.into_inner();
        if request.paths.len() > 16 {
            return Err(Status::invalid_argument("at most 16 paths per inventory"));
        }
        Ok(Response::new(crate::facts::collect(request).await))
    }

    type ApplyStream = EventStream<ApplyEvent>;

    async fn apply(
        &self,
        request: Request<ApplyRequest>,
    ) -> Result<Response<Self::ApplyStream>, Status> {
        let caller = Caller::of(&request);
        let request = request.into_inner();
        let spec = request.spec.clone().unwrap_or_default();
        let images: Vec<&str> = spec.containers.iter().map(|c| c.image.as_str()).collect();
        let detail = format!("config {} images {}", spec.config_hash, images.join(","));
        self.audit(
            &caller,
            "apply",
            &spec.name,
            detail.clone(),
            "started".into(),
        );
        let (tx, rx) = mpsc::channel(64);
        let deployer = self.deployer.clone();
        let audit = self.audit.clone();
        // The apply runs to completion even if the controller goes away, so
        // the host never stays half-changed.
        tokio::spawn(async move {
            let outcome = deployer.apply(request, tx.clone()).await;
            audit.record(&Entry {
                caller: &caller,
                rpc: "apply",
                deployment: &spec.name,
                detail,
                outcome: if outcome.success {
                    "ok".into()
                } else {
                    format!("failed: {}", outcome.error)
                },
            });
            let _ = tx
                .send(ApplyEvent {
                    phase: "outcome".into(),
                    message: String::new(),
                    outcome: Some(outcome),
                })
                .await;
        });
        Ok(Response::new(Box::pin(tokio_stream::StreamExt::map(
            ReceiverStream::new(rx),
            Ok,
        ))))
    }

    async fn control(
        &self,
        request: Request<ControlRequest>,
    ) -> Result<Response<DeploymentStatus>, Status> {
        let caller = Caller::of(&request);
        let r = request.into_inner();
        let action = Action::try_from(r.action).unwrap_or(Action::Unspecified);
        let grace = Duration::from_secs(u64::from(r.stop_grace_seconds));
        let result = self
            .deployer
            .control(&r.deployment, action, grace, &r.purge_paths)
            .await
            .map(Response::new)
            .map_err(deploy_status);
        let mut detail = format!("{action:?} grace {}s", r.stop_grace_seconds).to_lowercase();
        if !r.purge_paths.is_empty() {
            detail.push_str(&format!(" purge {}", r.purge_paths.join(",")));
        }
        self.audit(
            &caller,
            "control",
            &r.deployment,
            detail,
            outcome_text(&result),
        );
        result
    }

    async fn status(
        &self,
        request: Request<StatusRequest>,
    ) -> Result<Response<DeploymentStatus>, Status> {
        self.deployer
            .status(&request.into_inner().deployment)
            .await
            .map(Response::new)
            .map_err(deploy_status)
    }

    async fn load_image(
        &self,
        request: Request<tonic::Streaming<ImageChunk>>,
    ) -> Result<Response<LoadedImage>, Status> {
        use crate::deploy::images::LoadError;
        let caller = Caller::of(&request);
        self.audit(&caller, "load_image", "", String::new(), "started".into());
        let result = match self.deployer.load_image(request.into_inner()).await {
            Ok(loaded) => Ok(loaded),
            Err(e @ (LoadError::Io(_) | LoadError::Docker(_))) => {
                Err(Status::internal(e.to_string()))
            }
            Err(e @ LoadError::Busy) => Err(Status::unavailable(e.to_string())),
            Err(e @ LoadError::Stalled(_)) => Err(Status::deadline_exceeded(e.to_string())),
            Err(e @ LoadError::NoSpace { .. }) => Err(Status::resource_exhausted(e.to_string())),
            Err(e) => Err(Status::invalid_argument(e.to_string())),
        };
        let detail = match &result {
            Ok(loaded) => format!("loaded {}", loaded.join(",")),
            Err(_) => String::new(),
        };
        self.audit(&caller, "load_image", "", detail, outcome_text(&result));
        result.map(|loaded| Response::new(LoadedImage { loaded }))
    }

    type LogsStream = EventStream<LogLine>;

    async fn logs(
        &self,
        request: Request<LogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        let rx = self
            .deployer
            .logs(&request.into_inner())
            .await
            .map_err(deploy_status)?;
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type WatchHealthStream = EventStream<HealthSample>;

    async fn prepare_images(
        &self,
        request: Request<PrepareImagesRequest>,
    ) -> Result<Response<PreparedImages>, Status> {
        let caller = Caller::of(&request);
        let images = request.into_inner().images;
        let result = self
            .deployer
            .prepare_images(&images)
            .await
            .map_err(deploy_status);
        let detail = match &result {
            Ok(p) => p
                .images
                .iter()
                .map(|i| format!("{}{}", i.reference, if i.pulled { " (pulled)" } else { "" }))
                .collect::<Vec<_>>()
                .join(","),
            // The refusal itself is the outcome.
            Err(_) => format!("{} image(s)", images.len()),
        };
        self.audit(&caller, "prepare_images", "", detail, outcome_text(&result));
        result.map(Response::new)
    }

    async fn upgrade_agent(
        &self,
        request: Request<tonic::Streaming<AgentBinaryChunk>>,
    ) -> Result<Response<AgentUpgradeStarted>, Status> {
        let caller = Caller::of(&request);
        // No apply, start or stop may begin while the binary changes (and
        // none is under way: refused then).
        let result = match self.deployer.hold_changes() {
            None => Err(Status::failed_precondition(
                "a change to the deployment is under way on this host; upgrade the agent when it ends",
            )),
            Some(_held) => crate::upgrade::receive(
                &self.layout,
                &self.facts.supervision,
                &self.credentials.ca_pem(),
                request.into_inner(),
            )
            .await
            .map_err(|e| match e {
                crate::upgrade::UpgradeError::Refused(_)
                | crate::upgrade::UpgradeError::NotAnAgent(_)
                | crate::upgrade::UpgradeError::TooLarge(_)
                | crate::upgrade::UpgradeError::Corrupt(_) => {
                    Status::failed_precondition(e.to_string())
                }
                other => Status::internal(other.to_string()),
            }),
        };
        let detail = match &result {
            Ok(i) => format!("{} -> {}", i.from_version, i.to_version),
            Err(_) => String::new(),
        };
        self.audit(&caller, "upgrade_agent", "", detail, outcome_text(&result));
        let installed = result?;
        if self.facts.supervision == "supervisor" {
            // Answered first; then the supervisor starts the new binary.
            let restart = self.restart.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(500)).await;
                restart.request();
            });
        }
        Ok(Response::new(AgentUpgradeStarted {
            from_version: installed.from_version,
            to_version: installed.to_version,
        }))
    }

    async fn renew_identity(
        &self,
        request: Request<RenewIdentityRequest>,
    ) -> Result<Response<RenewIdentityReply>, Status> {
        let caller = Caller::of(&request);
        let one = self.renewing.clone().lock_owned().await;
        let layout = self.layout.clone();
        let result = tokio::task::spawn_blocking(move || {
            let _one = one;
            crate::identity::request_renewal(&layout)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))
        .and_then(|r| r.map_err(identity_status));
        self.audit(
            &caller,
            "renew_identity",
            "",
            String::new(),
            outcome_text(&result),
        );
        Ok(Response::new(RenewIdentityReply { csr_pem: result? }))
    }

    async fn install_identity(
        &self,
        request: Request<InstallIdentityRequest>,
    ) -> Result<Response<IdentityInstalled>, Status> {
        let caller = Caller::of(&request);
        let certificate = request.into_inner().certificate_pem;
        let result = self
            .change_identity(move |layout| crate::identity::install_renewal(layout, &certificate))
            .await
            .map(|identity| identity.info);
        let detail = match &result {
            Ok(info) => format!("serial {}", info.serial_hex),
            Err(_) => String::new(),
        };
        self.audit(
            &caller,
            "install_identity",
            "",
            detail,
            outcome_text(&result),
        );
        let info = result?;
        tracing::info!(serial = %info.serial_hex, not_after = %info.not_after, "serving a renewed certificate");
        Ok(Response::new(IdentityInstalled {
            serial: info.serial_hex,
            not_after: info.not_after.unix_timestamp(),
        }))
    }

    async fn set_trusted_cas(
        &self,
        request: Request<SetTrustedCasRequest>,
    ) -> Result<Response<TrustedCas>, Status> {
        let caller = Caller::of(&request);
        let SetTrustedCasRequest {
            bundle_pem,
            signature,
        } = request.into_inner();
        let result = self
            .change_identity(move |layout| {
                crate::identity::replace_trusted_cas(layout, &bundle_pem, &signature)
            })
            .await
            .map(|identity| imfleet_certs::fingerprints(&identity.ca_pem));
        let detail = match &result {
            Ok(fingerprints) => fingerprints.join(" "),
            Err(_) => String::new(),
        };
        self.audit(
            &caller,
            "set_trusted_cas",
            "",
            detail,
            outcome_text(&result),
        );
        let fingerprints = result?;
        tracing::info!(cas = fingerprints.len(), "trusting a new set of CAs");
        Ok(Response::new(TrustedCas { fingerprints }))
    }

    async fn watch_health(
        &self,
        request: Request<WatchHealthRequest>,
    ) -> Result<Response<Self::WatchHealthStream>, Status> {
        use crate::health::WatchError;
        let rx = self.monitor.watch(request.get_ref()).map_err(|e| match e {
            WatchError::Invalid(m) => Status::invalid_argument(m),
            e @ WatchError::Busy => Status::resource_exhausted(e.to_string()),
        })?;
        Ok(Response::new(Box::pin(tokio_stream::StreamExt::map(
            ReceiverStream::new(rx),
            Ok,
        ))))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Transport(#[from] tonic::transport::Error),
    #[error("cannot set up deployments: {0}")]
    Deploy(#[from] DeployError),
    #[error("cannot open the audit log: {0}")]
    Audit(std::io::Error),
    #[error(transparent)]
    Listener(#[from] crate::listener::ListenerError),
    #[error("cannot set up health sampling: {0}")]
    Health(String),
}

/// Serves the agent API on `listener` until `shutdown` completes.
pub async fn serve(
    layout: &Layout,
    identity: &ServingIdentity,
    facts: AgentFacts,
    roots: Option<Roots>,
    listener: TcpListener,
    restart: crate::upgrade::RestartRequest,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let credentials = Credentials::new(identity)?;
    let agent = AgentService::new(facts, layout, roots, restart, credentials.clone())?;
    // An apply this agent did not live to finish is finished or undone
    // before the next change (requests wait for the deployer's lock).
    let deployer = agent.deployer.clone();
    tokio::spawn(async move {
        // The Engine may not answer yet at boot: retry, backing off to a minute.
        let mut backoff = std::time::Duration::from_secs(1);
        loop {
            let mut failed = false;
            for (deployment, result) in deployer.recover_all().await {
                match result {
                    Ok(steps) if steps.is_empty() => {}
                    Ok(steps) => {
                        tracing::warn!(%deployment, "recovered an interrupted apply: {}", steps.join("; "))
                    }
                    Err(e) => {
                        failed = true;
                        tracing::error!(%deployment, "could not recover an interrupted apply (will retry): {e}")
                    }
                }
            }
            if !failed {
                break;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(std::time::Duration::from_secs(60));
        }
    });
    // Health streams never end by themselves: end them before the graceful
    // shutdown waits for open requests.
    let monitor = agent.monitor.clone();
    let shutdown = async move {
        shutdown.await;
        monitor.close();
    };
    let gate = agent.gate.clone();
    let service = AgentServer::with_interceptor(agent, move |request| gate.check(request));
    let incoming = ReceiverStream::new(crate::listener::incoming(listener, credentials));
    Server::builder()
        // A controller that vanished (link down, host gone) is noticed and
        // its streams freed, rather than held until TCP gives up.
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}
