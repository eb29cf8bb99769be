//! The agent's gRPC server: mutual TLS only, and only the controller role.

use std::future::Future;
use std::time::{Duration, Instant};

use imfleet_certs::Role;
use imfleet_proto::agent::v1::agent_server::{Agent, AgentServer};
use imfleet_proto::agent::v1::{HostInventory, InventoryRequest, PingReply, PingRequest};
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};

use crate::identity::ServingIdentity;

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
}

impl AgentService {
    pub fn new(facts: AgentFacts) -> Self {
        AgentService {
            started: Instant::now(),
            facts,
        }
    }
}

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

/// Serves the agent API on `listener` until `shutdown` completes.
pub async fn serve(
    identity: &ServingIdentity,
    facts: AgentFacts,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(&identity.cert_pem, &identity.key_pem))
        .client_ca_root(Certificate::from_pem(&identity.ca_pem))
        .client_auth_optional(false)
        .timeout(HANDSHAKE_TIMEOUT);
    let service = AgentServer::with_interceptor(AgentService::new(facts), require_controller);
    Server::builder()
        .tls_config(tls)?
        .add_service(service)
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await
}
