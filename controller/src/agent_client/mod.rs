//! Talking to agents: one mTLS channel per host. The controller presents its
//! `controller` identity and accepts only an agent certificate from its own CA
//! whose SAN names the address it dialled.

use std::time::{Duration, Instant};

use imfleet_proto::agent::v1::agent_client::AgentClient;
use imfleet_proto::agent::v1::{
    AgentBinaryChunk, AgentUpgradeStarted, ApplyEvent, ApplyRequest, ControlRequest,
    DeploymentSpec, DeploymentStatus, HealthSample, HostInventory, IdentityInstalled, ImageChunk,
    InstallIdentityRequest, InventoryRequest, LoadedImage, LogLine, LogsRequest, PingReply,
    PingRequest, PrepareImagesRequest, PreparedImages, RenewIdentityRequest, SetTrustedCasRequest,
    StatusRequest, TrustedCas, WatchHealthRequest,
};
use tonic::transport::{Channel, Endpoint};

use crate::state::ClientIdentity;

mod error;
mod revision;

pub use error::AgentError;
use error::classify_transport;
pub use revision::Feature;

/// Bound on TCP connect plus TLS handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const PING_TIMEOUT: Duration = Duration::from_secs(10);
/// The most decoded of a ping reply.
const PING_MESSAGE_LIMIT: usize = 16 * 1024;
/// A key made and a certificate checked on the host.
const RENEWAL_TIMEOUT: Duration = Duration::from_secs(30);
const INVENTORY_TIMEOUT: Duration = Duration::from_secs(60);
const STATUS_TIMEOUT: Duration = Duration::from_secs(60);
/// A followed log stream ends after a day.
const LOGS_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(6 * 3600);
/// Staging may pull images of several GB over a slow link.
const PREPARE_TIMEOUT: Duration = Duration::from_secs(2 * 3600);
/// Slack on top of what a long call is computed to wait for.
const CALL_MARGIN: Duration = Duration::from_secs(600);
/// Most containers one Control call stops in turn (a deployment plus a
/// previous set left by an interrupted apply).
const MAX_CONTAINERS_STOPPED: u64 = 16;

/// Deadline of a Control call: every container may use its whole grace
/// period before the Engine kills it, one after the other.
pub fn control_deadline(grace_seconds: u32) -> Duration {
    CALL_MARGIN + Duration::from_secs(MAX_CONTAINERS_STOPPED * u64::from(grace_seconds))
}

/// Deadline of an Apply call: stopping the running set, each container's
/// readiness wait plus the gate and the final check, and an hour for
/// pulling images (their size is unknown here).
pub fn apply_deadline(spec: &DeploymentSpec, health_timeout_seconds: u32) -> Duration {
    let stops: u64 = spec
        .containers
        .iter()
        .map(|c| u64::from(c.stop_grace_seconds))
        .sum();
    let waits = (spec.containers.len() as u64 + 2) * u64::from(health_timeout_seconds);
    CALL_MARGIN + Duration::from_secs(3600 + 2 * stops + waits)
}

/// Where an agent listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentAddress {
    /// IP address or DNS name; must be a SAN of the agent's certificate.
    pub host: String,
    pub port: u16,
}

impl AgentAddress {
    /// The URI tonic is given: TLS is done by [`crate::agent_tls`], so the
    /// scheme is plain.
    fn uri(&self) -> String {
        format!("http://{self}")
    }
}

impl std::fmt::Display for AgentAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// A connected agent.
#[derive(Debug, Clone)]
pub struct Agent {
    address: AgentAddress,
    client: AgentClient<Channel>,
    presented: crate::agent_tls::Presented,
    /// Learnt from the first ping on this connection.
    revision: std::sync::Arc<std::sync::OnceLock<u32>>,
    /// The signed list of accepted controller certificates, sent with
    /// every request.
    controllers: Option<tonic::metadata::AsciiMetadataValue>,
}

/// The answer to a ping, with the time the round trip took.
#[derive(Debug, Clone)]
pub struct PingOutcome {
    pub reply: PingReply,
    pub round_trip: Duration,
    /// Expiry (Unix seconds) of the certificate the agent presented in the
    /// handshake: what the controller trusts, whatever the reply says.
    pub certificate_not_after: i64,
}

impl Agent {
    /// Connects and completes the TLS handshake (so TLS failures surface here).
    pub async fn connect(
        identity: &ClientIdentity,
        address: &AgentAddress,
    ) -> Result<Agent, AgentError> {
        let bad = |detail: String| AgentError::BadAddress {
            address: address.to_string(),
            detail,
        };
        let server_name = rustls_pki_types::ServerName::try_from(address.host.clone())
            .map_err(|e| bad(e.to_string()))?;
        let config =
            crate::agent_tls::client_config(identity).map_err(|detail| AgentError::Tls {
                address: address.to_string(),
                detail,
                hint: "The controller's own identity is unusable; run `controller init`",
            })?;
        let presented = crate::agent_tls::Presented::default();
        let connector = crate::agent_tls::AgentConnector {
            config,
            server_name,
            host: address.host.clone(),
            port: address.port,
            presented: presented.clone(),
        };
        let endpoint = Endpoint::from_shared(address.uri())
            .map_err(|e| bad(e.to_string()))?
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_while_idle(true);
        let channel = endpoint
            .connect_with_connector(connector)
            .await
            .map_err(|e| classify_transport(address, &e))?;
        Ok(Agent {
            address: address.clone(),
            client: AgentClient::new(channel),
            presented,
            revision: Default::default(),
            controllers: identity
                .controllers
                .as_deref()
                .and_then(|list| list.parse().ok()),
        })
    }

    pub fn address(&self) -> &AgentAddress {
        &self.address
    }

    /// The certificate the agent presented in the handshake.
    pub fn presented_certificate(&self) -> Option<imfleet_certs::CertificateInfo> {
        self.presented
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// One unary or streaming call: the deadline set, the client cloned (a
    /// cheap handle on the shared channel), a failure classified.
    async fn call<Req, Resp, Fut>(
        &self,
        message: Req,
        timeout: Duration,
        rpc: impl FnOnce(AgentClient<Channel>, tonic::Request<Req>) -> Fut,
    ) -> Result<Resp, AgentError>
    where
        Fut: Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
    {
        let mut request = tonic::Request::new(message);
        request.set_timeout(timeout);
        if let Some(list) = &self.controllers {
            request
                .metadata_mut()
                .insert(imfleet_certs::controllers::HEADER, list.clone());
        }
        rpc(self.client.clone(), request)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| self.status_error(s))
    }

    pub async fn ping(&self) -> Result<PingOutcome, AgentError> {
        let nonce = u64::try_from(crate::now_unix()).unwrap_or_default() ^ 0x5eed;
        let started = Instant::now();
        // Every command and every health stream pings first: a reply is a
        // few hundred bytes, and a hostile agent's 4 MB one is refused.
        let reply = self
            .call(PingRequest { nonce }, PING_TIMEOUT, |c, r| async move {
                c.max_decoding_message_size(PING_MESSAGE_LIMIT)
                    .ping(r)
                    .await
            })
            .await?;
        let _ = self.revision.set(reply.protocol_revision);
        let certificate_not_after = self
            .presented_certificate()
            .map(|c| c.not_after.unix_timestamp())
            .unwrap_or_default();
        Ok(PingOutcome {
            reply,
            round_trip: started.elapsed(),
            certificate_not_after,
        })
    }

    /// The protocol revision the agent speaks (asked once per connection).
    pub async fn protocol_revision(&self) -> Result<u32, AgentError> {
        if let Some(revision) = self.revision.get() {
            return Ok(*revision);
        }
        Ok(self.ping().await?.reply.protocol_revision)
    }

    /// Refuses, naming the fix, when the agent is too old for `feature`.
    pub async fn require(&self, feature: Feature) -> Result<(), AgentError> {
        let have = self.protocol_revision().await?;
        feature.check(have).map_err(|need| AgentError::TooOld {
            address: self.address.to_string(),
            have,
            need,
            what: feature.describe(),
        })
    }

    /// The host's facts, with `paths` examined for a service running as `uid:gid`.
    pub async fn inventory(
        &self,
        paths: Vec<String>,
        service_uid: u32,
        service_gid: u32,
    ) -> Result<HostInventory, AgentError> {
        let request = InventoryRequest {
            paths,
            service_uid,
            service_gid,
        };
        self.call(request, INVENTORY_TIMEOUT, |mut c, r| async move {
            c.inventory(r).await
        })
        .await
    }

    /// Starts applying a deployment; events stream until the outcome.
    pub async fn apply(
        &self,
        request: ApplyRequest,
    ) -> Result<tonic::Streaming<ApplyEvent>, AgentError> {
        self.require(Feature::Apply).await?;
        let deadline = apply_deadline(
            request.spec.as_ref().unwrap_or(&DeploymentSpec::default()),
            request.health_timeout_seconds,
        );
        self.call(
            request,
            deadline,
            |mut c, r| async move { c.apply(r).await },
        )
        .await
    }

    pub async fn control(&self, request: ControlRequest) -> Result<DeploymentStatus, AgentError> {
        if !request.purge_paths.is_empty() {
            self.require(Feature::Purge).await?;
        }
        let deadline = control_deadline(request.stop_grace_seconds);
        self.call(
            request,
            deadline,
            |mut c, r| async move { c.control(r).await },
        )
        .await
    }

    pub async fn status(&self, deployment: &str) -> Result<DeploymentStatus, AgentError> {
        let request = StatusRequest {
            deployment: deployment.to_owned(),
        };
        self.call(request, STATUS_TIMEOUT, |mut c, r| async move {
            c.status(r).await
        })
        .await
    }

    /// Images on the host (missing ones pulled) and the Engine's free space.
    pub async fn prepare_images(&self, images: Vec<String>) -> Result<PreparedImages, AgentError> {
        self.call(
            PrepareImagesRequest { images },
            PREPARE_TIMEOUT,
            |mut c, r| async move { c.prepare_images(r).await },
        )
        .await
    }

    pub async fn logs(
        &self,
        request: LogsRequest,
    ) -> Result<tonic::Streaming<LogLine>, AgentError> {
        self.call(
            request,
            LOGS_TIMEOUT,
            |mut c, r| async move { c.logs(r).await },
        )
        .await
    }

    /// The agent's health stream: a sample at once, then one per `interval`.
    /// The call has no deadline (it lasts as long as the daemon); the caller
    /// bounds the wait for each sample instead.
    pub async fn watch_health(
        &self,
        deployment: &str,
        interval: Duration,
    ) -> Result<tonic::Streaming<HealthSample>, AgentError> {
        self.require(Feature::WatchHealth).await?;
        let request = WatchHealthRequest {
            interval_ms: interval.as_millis().min(u128::from(u32::MAX)) as u32,
            deployment: deployment.to_owned(),
        };
        // A sample at every cap fits with room; a hostile agent's giant
        // message ends the stream instead of filling pbx01's memory.
        self.client
            .clone()
            .max_decoding_message_size(crate::health::ingest::MAX_MESSAGE_BYTES)
            .watch_health(request)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| self.status_error(s))
    }

    /// Streams an image archive to the agent, which verifies and loads it.
    pub async fn load_image(
        &self,
        chunks: impl tonic::codegen::tokio_stream::Stream<Item = ImageChunk> + Send + 'static,
    ) -> Result<LoadedImage, AgentError> {
        self.call(chunks, UPLOAD_TIMEOUT, |mut c, r| async move {
            c.load_image(r).await
        })
        .await
    }

    /// Streams a new agent binary; the host checks, swaps and restarts it.
    pub async fn upgrade_agent(
        &self,
        chunks: impl tonic::codegen::tokio_stream::Stream<Item = AgentBinaryChunk> + Send + 'static,
    ) -> Result<AgentUpgradeStarted, AgentError> {
        self.require(Feature::UpgradeAgent).await?;
        self.call(chunks, UPLOAD_TIMEOUT, |mut c, r| async move {
            c.upgrade_agent(r).await
        })
        .await
    }

    /// Renewal, first half: the agent makes a new key and answers a CSR.
    pub async fn renew_identity(&self) -> Result<String, AgentError> {
        self.require(Feature::Renewal).await?;
        let reply = self
            .call(
                RenewIdentityRequest {},
                RENEWAL_TIMEOUT,
                |mut c, r| async move { c.renew_identity(r).await },
            )
            .await?;
        Ok(reply.csr_pem)
    }

    /// Renewal, second half: the agent serves `certificate_pem` from its
    /// next handshake on.
    pub async fn install_identity(
        &self,
        certificate_pem: String,
    ) -> Result<IdentityInstalled, AgentError> {
        self.require(Feature::Renewal).await?;
        self.call(
            InstallIdentityRequest { certificate_pem },
            RENEWAL_TIMEOUT,
            |mut c, r| async move { c.install_identity(r).await },
        )
        .await
    }

    /// CA rotation: the agent trusts the CAs of `bundle_pem` from now on, if
    /// a CA it trusts now made `signature`.
    pub async fn set_trusted_cas(
        &self,
        bundle_pem: String,
        signature: Vec<u8>,
    ) -> Result<TrustedCas, AgentError> {
        self.require(Feature::CaRotation).await?;
        self.call(
            SetTrustedCasRequest {
                bundle_pem,
                signature,
            },
            RENEWAL_TIMEOUT,
            |mut c, r| async move { c.set_trusted_cas(r).await },
        )
        .await
    }

    /// Turns a failed stream item into an error with the same classification.
    pub fn stream_error(&self, status: tonic::Status) -> AgentError {
        self.status_error(status)
    }

    fn status_error(&self, status: tonic::Status) -> AgentError {
        error::from_status(&self.address, status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use imfleet_proto::agent::v1::ContainerSpec;

    #[test]
    fn long_calls_outlast_what_they_wait_for() {
        // Four containers that each take all of im.sh's 300 s to stop.
        assert!(control_deadline(300) >= Duration::from_secs(4 * 300 + 60));
        assert!(control_deadline(3600) > Duration::from_secs(4 * 3600));
        let spec = DeploymentSpec {
            containers: vec![
                ContainerSpec {
                    stop_grace_seconds: 300,
                    ..Default::default()
                };
                4
            ],
            ..Default::default()
        };
        // Previous set stopped, then four readiness waits, gate and final check.
        assert!(apply_deadline(&spec, 180) >= Duration::from_secs(4 * 300 + 6 * 180));
        assert!(apply_deadline(&spec, 3600) > Duration::from_secs(6 * 3600));
    }
}
