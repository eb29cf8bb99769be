//! The container operations a deployment needs, as a trait: the Docker
//! Engine (through bollard) in production, a scripted fake in the unit tests
//! of apply's failure paths, which run in paused time.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use imfleet_proto::agent::v1::{ContainerSpec, ContainerStatus};

use super::docker::{self, DockerError, Managed};
use super::{DeployError, secrets};

pub trait Containers: Send + Sync + 'static {
    /// Installs and starts the Engine when missing; what was done.
    fn ensure_engine(&self) -> impl Future<Output = Result<Vec<String>, String>> + Send;
    /// Whether a container of that name exists, and its deployment label.
    fn owner_of(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Option<Option<String>>, DockerError>> + Send;
    /// The id of a local image, if present.
    fn image_id(
        &self,
        image: &str,
    ) -> impl Future<Output = Result<Option<String>, DockerError>> + Send;
    fn pull(
        &self,
        image: &str,
        progress: &mut (dyn FnMut(u64, u64) + Send),
    ) -> impl Future<Output = Result<(), DockerError>> + Send;
    /// The deployment's containers in start order (`.previous` ones included).
    fn managed(
        &self,
        deployment: &str,
    ) -> impl Future<Output = Result<Vec<Managed>, DockerError>> + Send;
    /// Creates (not starts) a container, `${secret:ID}` resolved.
    fn create(
        &self,
        spec: &ContainerSpec,
        labels: HashMap<String, String>,
        secrets: &HashMap<String, String>,
    ) -> impl Future<Output = Result<(), DeployError>> + Send;
    fn start(&self, name: &str) -> impl Future<Output = Result<(), DockerError>> + Send;
    fn stop(
        &self,
        name: &str,
        grace: Duration,
    ) -> impl Future<Output = Result<(), DockerError>> + Send;
    /// Removes (killing if need be); absent is fine.
    fn remove(&self, name: &str) -> impl Future<Output = Result<(), DockerError>> + Send;
    fn rename(&self, from: &str, to: &str) -> impl Future<Output = Result<(), DockerError>> + Send;
    /// State and health (`state = "missing"` when absent), and the last
    /// health check output.
    fn status(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<(ContainerStatus, Vec<String>), DockerError>> + Send;
    fn tail_logs(&self, name: &str, lines: usize) -> impl Future<Output = Vec<String>> + Send;
}

/// The local Docker Engine.
#[derive(Debug, Clone)]
pub struct Engine {
    docker: bollard::Docker,
}

impl Engine {
    pub fn new(docker: bollard::Docker) -> Engine {
        Engine { docker }
    }
}

impl Containers for Engine {
    async fn ensure_engine(&self) -> Result<Vec<String>, String> {
        super::engine::ensure(&self.docker).await
    }
    async fn owner_of(&self, name: &str) -> Result<Option<Option<String>>, DockerError> {
        docker::owner_of(&self.docker, name).await
    }
    async fn image_id(&self, image: &str) -> Result<Option<String>, DockerError> {
        docker::image_id(&self.docker, image).await
    }
    async fn pull(
        &self,
        image: &str,
        progress: &mut (dyn FnMut(u64, u64) + Send),
    ) -> Result<(), DockerError> {
        docker::pull(&self.docker, image, progress).await
    }
    async fn managed(&self, deployment: &str) -> Result<Vec<Managed>, DockerError> {
        docker::managed(&self.docker, deployment).await
    }
    async fn create(
        &self,
        spec: &ContainerSpec,
        labels: HashMap<String, String>,
        values: &HashMap<String, String>,
    ) -> Result<(), DeployError> {
        docker::create(&self.docker, spec, labels, |s| {
            secrets::substitute(s, values)
        })
        .await
    }
    async fn start(&self, name: &str) -> Result<(), DockerError> {
        docker::start(&self.docker, name).await
    }
    async fn stop(&self, name: &str, grace: Duration) -> Result<(), DockerError> {
        docker::stop(&self.docker, name, grace).await
    }
    async fn remove(&self, name: &str) -> Result<(), DockerError> {
        docker::remove(&self.docker, name).await
    }
    async fn rename(&self, from: &str, to: &str) -> Result<(), DockerError> {
        docker::rename(&self.docker, from, to).await
    }
    async fn status(&self, name: &str) -> Result<(ContainerStatus, Vec<String>), DockerError> {
        docker::status(&self.docker, name).await
    }
    async fn tail_logs(&self, name: &str, lines: usize) -> Vec<String> {
        docker::tail_logs(&self.docker, name, lines).await
    }
}
