//! The agent's gRPC server: mutual TLS only, and only the controller role.

use std::future::Future;
use std::time::{Duration, Instant};

use imfleet_certs::Role;
use imfleet_proto::agent::v1::agent_server::{Agent, AgentServer};
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use imfleet_proto::agent::v1::{
    ApplyEvent, ApplyRequest, ControlRequest, DeploymentStatus, HostInventory, ImageChunk,
    InventoryRequest, LoadedImage, LogLine, LogsRequest, PingReply, PingRequest, StatusRequest,
    control_request::Action,
};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};

use crate::identity::ServingIdentity;
use crate::layout::Layout;

/// How long a client gets to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Facts the agent reports about itself.
#[derive(Debug, Clone)]
pub struct AgentFacts {
    pub hostname: String,
    pub supervision: String,
    pub certificate_not_after: i64,
}

impl AgentFacts {
    pub fn detect(identity: &ServingIdentity) -> Self {
        AgentFacts {
            hostname: hostname::get()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default(),
            supervision: std::env::var(crate::supervision::SUPERVISION_ENV)
                .unwrap_or_else(|_| "manual".to_owned()),
            certificate_not_after: identity.info.not_after.unix_timestamp(),
        }
    }
}

#[derive(Debug)]
pub struct AgentService {
    started: Instant,
    facts: AgentFacts,
    deployer: Arc<crate::deploy::Deployer>,
}

impl AgentService {
    pub fn new(facts: AgentFacts, layout: &Layout) -> Result<Self, crate::deploy::DeployError> {
        Ok(AgentService {
            started: Instant::now(),
            facts,
            deployer: Arc::new(crate::deploy::Deployer::new(&layout.spool_dir())?),
        })
    }
}

fn deploy_status(e: crate::deploy::DeployError) -> Status {
    match e {
        crate::deploy::DeployError::Invalid(m) => Status::failed_precondition(m),
        other => Status::internal(other.to_string()),
    }
}

type EventStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl Agent for AgentService {
    async fn ping(&self, request: Request<PingRequest>) -> Result<Response<PingReply>, Status> {
        Ok(Response::new(PingReply {
            nonce: request.into_inner().nonce,
            agent_version: crate::VERSION.to_owned(),
            protocol_revision: imfleet_proto::PROTOCOL_REVISION,
            hostname: self.facts.hostname.clone(),
            uptime_seconds: self.started.elapsed().as_secs(),
            certificate_not_after: self.facts.certificate_not_after,
            supervision: self.facts.supervision.clone(),
            platform: format!("{}-{}", std::env::consts::ARCH, std::env::consts::OS),
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
        let request = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let deployer = self.deployer.clone();
        // The apply runs to completion even if the controller goes away, so
        // the host never stays half-changed.
        tokio::spawn(async move {
            let outcome = deployer.apply(request, tx.clone()).await;
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
        let r = request.into_inner();
        let action = Action::try_from(r.action).unwrap_or(Action::Unspecified);
        let grace = Duration::from_secs(u64::from(r.stop_grace_seconds));
        self.deployer
            .control(&r.deployment, action, grace, &r.purge_paths)
            .await
            .map(Response::new)
            .map_err(deploy_status)
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
        match self.deployer.load_image(request.into_inner()).await {
            Ok(loaded) => Ok(Response::new(LoadedImage { loaded })),
            Err(e @ (LoadError::Io(_) | LoadError::Docker(_))) => {
                Err(Status::internal(e.to_string()))
            }
            Err(e @ LoadError::Busy) => Err(Status::unavailable(e.to_string())),
            Err(e @ LoadError::NoSpace { .. }) => Err(Status::resource_exhausted(e.to_string())),
            Err(e) => Err(Status::invalid_argument(e.to_string())),
        }
    }

    type LogsStream = EventStream<LogLine>;

    async fn logs(
        &self,
        request: Request<LogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        let r = request.into_inner();
        let deployer = self.deployer.clone();
        let names: Vec<String> = if r.container.is_empty() {
            deployer
                .status(&r.deployment)
                .await
                .map_err(deploy_status)?
                .containers
                .into_iter()
                .map(|c| c.name)
                .collect()
        } else {
            vec![r.container.clone()]
        };
        let (tx, rx) = mpsc::channel(256);
        for name in names {
            let tx = tx.clone();
            let docker = deployer.docker().clone();
            let options = bollard::query_parameters::LogsOptions {
                stdout: true,
                stderr: true,
                follow: r.follow,
                tail: if r.tail == 0 {
                    "100".into()
                } else {
                    r.tail.to_string()
                },
                ..Default::default()
            };
            tokio::spawn(async move {
                let mut stream = docker.logs(&name, Some(options));
                while let Some(item) = futures::StreamExt::next(&mut stream).await {
                    let line = match item {
                        Ok(bollard::container::LogOutput::StdErr { message }) => LogLine {
                            container: name.clone(),
                            line: String::from_utf8_lossy(&message).trim_end().to_owned(),
                            stderr: true,
                        },
                        Ok(other) => LogLine {
                            container: name.clone(),
                            line: other.to_string().trim_end().to_owned(),
                            stderr: false,
                        },
                        Err(e) => {
                            let _ = tx.send(Err(Status::unavailable(e.to_string()))).await;
                            break;
                        }
                    };
                    if tx.send(Ok(line)).await.is_err() {
                        break;
                    }
                }
            });
        }
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Admits a request only if the TLS peer presented a certificate with the
/// controller role. TLS has already checked the chain and clientAuth EKU;
/// this is the one place the role is checked, for every RPC.
#[allow(clippy::result_large_err)]
pub fn require_controller(request: Request<()>) -> Result<Request<()>, Status> {
    let certs = request
        .peer_certs()
        .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
    let leaf = certs
        .first()
        .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
    match imfleet_certs::role_of_der(leaf) {
        Some(Role::Controller) => Ok(request),
        Some(other) => Err(Status::permission_denied(format!(
            "certificate role `{other}` may not call the agent"
        ))),
        None => Err(Status::permission_denied(
            "certificate carries no imfleet role",
        )),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Transport(#[from] tonic::transport::Error),
    #[error("cannot set up the Docker Engine client: {0}")]
    Docker(#[from] crate::deploy::DeployError),
}

/// Serves the agent API on `listener` until `shutdown` completes.
pub async fn serve(
    layout: &Layout,
    identity: &ServingIdentity,
    facts: AgentFacts,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(&identity.cert_pem, &identity.key_pem))
        .client_ca_root(Certificate::from_pem(&identity.ca_pem))
        .client_auth_optional(false)
        .timeout(HANDSHAKE_TIMEOUT);
    let service =
        AgentServer::with_interceptor(AgentService::new(facts, layout)?, require_controller);
    Server::builder()
        .tls_config(tls)?
        .add_service(service)
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await?;
    Ok(())
}
