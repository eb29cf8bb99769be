//! Deployments on this host: apply a spec all or nothing, control and report
//! its containers. The spec is data from the controller; nothing here knows
//! about PortSIP beyond what the spec says.

mod apply;
pub mod containers;
pub mod control;
pub mod docker;
pub mod engine;
pub mod firewall;
pub mod gate;
pub mod hostfs;
pub mod images;
pub mod logs;
pub mod prepare;
pub mod readiness;
pub mod record;
pub mod recovery;
pub mod secrets;
pub mod staging;
pub mod unchanged;
pub mod validate;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use imfleet_proto::agent::v1::{ApplyOutcome, DeploymentSpec, DeploymentStatus};
use tokio::sync::Mutex;

use self::containers::{Containers, Engine};
use self::docker::DockerError;
use self::record::{RecordError, Records};
use self::secrets::UnknownSecret;
use crate::policy::{self, Roots};

/// Suffix of a previous deployment's containers while a new one is tried.
pub const PREVIOUS_SUFFIX: &str = ".previous";
const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error("Docker Engine: {0}")]
    Docker(#[from] DockerError),
    #[error(transparent)]
    Secret(#[from] UnknownSecret),
    #[error("{0}")]
    Invalid(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{message}")]
    Failed {
        message: String,
        diagnostics: Vec<String>,
    },
    #[error(transparent)]
    Record(#[from] RecordError),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DeployError {
    let what = what.into();
    move |source| DeployError::Io { what, source }
}

/// Where the deployer keeps its files, and what it may touch.
#[derive(Debug, Clone)]
pub struct DeployerConfig {
    /// Image uploads in progress (root only, emptied at start).
    pub spool_dir: std::path::PathBuf,
    /// Deployment records (root only).
    pub state_dir: std::path::PathBuf,
    /// The directories deployments may use; `None` refuses every apply.
    pub roots: Option<Roots>,
}

/// Serialises every change to deployments on this host.
pub struct Deployer<C: Containers = Engine> {
    containers: C,
    /// For what only the real Engine does: log streams and image loads.
    docker: bollard::Docker,
    changes: Mutex<()>,
    spool: images::Spool,
    records: Records,
    roots: Option<Roots>,
}

impl<C: Containers> std::fmt::Debug for Deployer<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deployer").finish_non_exhaustive()
    }
}

impl Deployer {
    /// Connects lazily to the local Engine socket.
    pub fn new(config: &DeployerConfig) -> Result<Self, DeployError> {
        let docker = bollard::Docker::connect_with_unix_defaults()?;
        Deployer::with_containers(config, Engine::new(docker.clone()), docker)
    }
}

impl<C: Containers> Deployer<C> {
    /// A deployer over `containers` (a fake in tests).
    pub fn with_containers(
        config: &DeployerConfig,
        containers: C,
        docker: bollard::Docker,
    ) -> Result<Self, DeployError> {
        Ok(Deployer {
            containers,
            docker,
            changes: Mutex::new(()),
            spool: images::Spool::open(&config.spool_dir).map_err(io(format!(
                "prepare the upload spool {}",
                config.spool_dir.display()
            )))?,
            records: Records::open(&config.state_dir)?,
            roots: config.roots.clone(),
        })
    }

    /// The directories deployments may use, as fixed at bootstrap.
    pub fn roots(&self) -> Option<&Roots> {
        self.roots.as_ref()
    }

    async fn validate(&self, spec: &DeploymentSpec) -> Result<(), DeployError> {
        let roots = self.roots.as_ref().ok_or_else(|| {
            DeployError::Invalid(
                "this agent was bootstrapped before data directories were fixed; re-run `controller bootstrap` with --data-path (and -f) to let it deploy".into(),
            )
        })?;
        validate::check(spec, |p| p.is_dir()).map_err(DeployError::Invalid)?;
        policy::check_spec(spec, roots).map_err(DeployError::Invalid)?;
        for c in &spec.containers {
            // A same-named container that is not ours must not be replaced.
            if let Some(owner) = self.containers.owner_of(&c.name).await?
                && owner.as_deref() != Some(spec.name.as_str())
            {
                return Err(DeployError::Invalid(format!(
                    "a container named `{}` exists and is not part of deployment `{}`; remove or rename it first",
                    c.name, spec.name
                )));
            }
        }
        for dir in spec.directories.iter().filter(|d| d.must_exist) {
            let path = Path::new(&dir.path);
            if !path.is_dir() {
                return Err(DeployError::Invalid(format!(
                    "{} does not exist or is not a directory; create it first (mkdir -p {})",
                    dir.path, dir.path
                )));
            }
        }
        Ok(())
    }

    /// State of every container of `deployment`.
    pub async fn status(&self, deployment: &str) -> Result<DeploymentStatus, DeployError> {
        check_deployment_name(deployment)?;
        let managed = self.containers.managed(deployment).await?;
        let mut containers = Vec::new();
        let mut config_hash = String::new();
        for m in managed
            .iter()
            .filter(|m| !m.name.ends_with(PREVIOUS_SUFFIX))
        {
            let (status, _) = self.containers.status(&m.name).await?;
            if config_hash.is_empty() {
                config_hash = m.config_hash.clone();
            }
            containers.push(status);
        }
        Ok(DeploymentStatus {
            name: deployment.to_owned(),
            healthy: all_healthy(&containers),
            containers,
            config_hash,
            // Held by every change: an apply the caller may have lost.
            applying: self.changes.try_lock().is_err(),
        })
    }

    /// Holds off every change to deployments (applies, start, stop...) for
    /// as long as the guard lives; `None` when one is under way now.
    pub fn hold_changes(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        self.changes.try_lock().ok()
    }

    /// Log lines of the deployment's containers, secrets redacted.
    pub async fn logs(
        &self,
        request: &imfleet_proto::agent::v1::LogsRequest,
    ) -> Result<logs::LogReceiver, DeployError> {
        check_deployment_name(&request.deployment)?;
        let record = self.records.load(&request.deployment)?;
        logs::stream(&self.docker, record, request).await
    }

    /// Receives, verifies and loads an image archive (one upload at a time).
    pub async fn load_image(
        &self,
        chunks: impl futures::Stream<Item = Result<imfleet_proto::agent::v1::ImageChunk, tonic::Status>>
        + Unpin,
    ) -> Result<Vec<String>, images::LoadError> {
        self.spool.load(&self.docker, chunks).await
    }
}

/// A deployment is healthy when it has containers and every one runs and
/// is healthy (or has no health check): what Status and health samples say.
pub use imfleet_proto::model::health::all_serving as all_healthy;

fn check_deployment_name(name: &str) -> Result<(), DeployError> {
    if validate::valid_name(name) {
        Ok(())
    } else {
        Err(DeployError::Invalid(format!(
            "`{}` is not a deployment name (letters, digits, `_`, `.`, `-`)",
            name.escape_debug()
        )))
    }
}

fn failure(
    error: DeployError,
    secret_values: &HashMap<String, String>,
    rolled_back: bool,
    status: Option<DeploymentStatus>,
) -> ApplyOutcome {
    let (message, diagnostics) = match error {
        DeployError::Failed {
            message,
            diagnostics,
        } => (message, diagnostics),
        other => (other.to_string(), Vec::new()),
    };
    ApplyOutcome {
        success: false,
        error: secrets::redact(&message, secret_values),
        diagnostics: diagnostics
            .iter()
            .map(|d| secrets::redact(d, secret_values))
            .collect(),
        rolled_back,
        status,
        unchanged: false,
    }
}

#[cfg(test)]
#[path = "apply_tests.rs"]
mod apply_tests;
