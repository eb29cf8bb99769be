//! What deploy needs of an agent and of the PBX, as small traits: the real
//! [`Agent`] and [`PbxClient`] implement them, and the steps' failure paths
//! are unit-tested against fakes (with paused time where they wait).

use std::future::Future;
use std::net::IpAddr;

use futures::StreamExt;
use futures::stream::BoxStream;
use imfleet_proto::agent::v1::{
    ApplyEvent, ApplyRequest, DeploymentStatus, HostInventory, ImageChunk, LoadedImage,
};
use tokio_stream::wrappers::ReceiverStream;

use crate::agent_client::{Agent, AgentError, Feature, PingOutcome};
use crate::pbx::{ImAddresses, PbxClient, PbxError, Secret, Whitelisted};

/// The agent calls deploy makes.
pub trait AgentApi: Sync {
    fn ping(&self) -> impl Future<Output = Result<PingOutcome, AgentError>> + Send;
    fn require(&self, feature: Feature) -> impl Future<Output = Result<(), AgentError>> + Send;
    fn status(
        &self,
        deployment: &str,
    ) -> impl Future<Output = Result<DeploymentStatus, AgentError>> + Send;
    fn inventory(
        &self,
        paths: Vec<String>,
        service_uid: u32,
        service_gid: u32,
    ) -> impl Future<Output = Result<HostInventory, AgentError>> + Send;
    /// The apply's events until its outcome.
    fn apply(
        &self,
        request: ApplyRequest,
    ) -> impl Future<Output = Result<BoxStream<'static, Result<ApplyEvent, AgentError>>, AgentError>>
    + Send;
    fn load_image(
        &self,
        chunks: ReceiverStream<ImageChunk>,
    ) -> impl Future<Output = Result<LoadedImage, AgentError>> + Send;
}

impl AgentApi for Agent {
    async fn ping(&self) -> Result<PingOutcome, AgentError> {
        Agent::ping(self).await
    }
    async fn require(&self, feature: Feature) -> Result<(), AgentError> {
        Agent::require(self, feature).await
    }
    async fn status(&self, deployment: &str) -> Result<DeploymentStatus, AgentError> {
        Agent::status(self, deployment).await
    }
    async fn inventory(
        &self,
        paths: Vec<String>,
        service_uid: u32,
        service_gid: u32,
    ) -> Result<HostInventory, AgentError> {
        Agent::inventory(self, paths, service_uid, service_gid).await
    }
    async fn apply(
        &self,
        request: ApplyRequest,
    ) -> Result<BoxStream<'static, Result<ApplyEvent, AgentError>>, AgentError> {
        let events = Agent::apply(self, request).await?;
        let agent = self.clone();
        Ok(events
            .map(move |item| item.map_err(|s| agent.stream_error(s)))
            .boxed())
    }
    async fn load_image(
        &self,
        chunks: ReceiverStream<ImageChunk>,
    ) -> Result<LoadedImage, AgentError> {
        Agent::load_image(self, chunks).await
    }
}

/// The PBX calls deploy makes.
pub trait PbxApi: Sync {
    fn im_token(&self) -> impl Future<Output = Result<Secret, PbxError>> + Send;
    fn generate_im_token(&self) -> impl Future<Output = Result<Secret, PbxError>> + Send;
    fn ensure_whitelisted(
        &self,
        ip: IpAddr,
        description: &str,
    ) -> impl Future<Output = Result<Whitelisted, PbxError>> + Send;
    fn set_im_addresses(
        &self,
        addresses: &ImAddresses,
    ) -> impl Future<Output = Result<(), PbxError>> + Send;
    fn im_addresses(&self) -> impl Future<Output = Result<ImAddresses, PbxError>> + Send;
}

impl PbxApi for PbxClient {
    async fn im_token(&self) -> Result<Secret, PbxError> {
        PbxClient::im_token(self).await
    }
    async fn generate_im_token(&self) -> Result<Secret, PbxError> {
        PbxClient::generate_im_token(self).await
    }
    async fn ensure_whitelisted(
        &self,
        ip: IpAddr,
        description: &str,
    ) -> Result<Whitelisted, PbxError> {
        PbxClient::ensure_whitelisted(self, ip, description).await
    }
    async fn set_im_addresses(&self, addresses: &ImAddresses) -> Result<(), PbxError> {
        PbxClient::set_im_addresses(self, addresses).await
    }
    async fn im_addresses(&self) -> Result<ImAddresses, PbxError> {
        PbxClient::im_addresses(self).await
    }
}
