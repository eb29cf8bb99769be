//! Start, stop, restart and remove of a deployment's containers, and the
//! purge of its recorded directories.

use std::path::Path;
use std::time::Duration;

use imfleet_proto::agent::v1::{DeploymentStatus, control_request::Action};

use super::containers::Containers;
use super::docker::DockerError;
use super::{DeployError, Deployer, PREVIOUS_SUFFIX, check_deployment_name, hostfs, io};
use crate::policy;

impl<C: Containers> Deployer<C> {
    /// Start, stop, restart or remove; idempotent.
    pub async fn control(
        &self,
        deployment: &str,
        action: Action,
        grace: Duration,
        purge_paths: &[String],
    ) -> Result<DeploymentStatus, DeployError> {
        check_deployment_name(deployment)?;
        if action == Action::Unspecified {
            return Err(DeployError::Invalid("no action given".into()));
        }
        let _guard = self.changes.lock().await;
        if !purge_paths.is_empty() {
            let roots = self.roots.as_ref().ok_or_else(|| {
                DeployError::Invalid("this agent has no data directories to purge".into())
            })?;
            let recorded = self
                .records
                .load(deployment)?
                .map(|r| r.directories)
                .unwrap_or_default();
            policy::check_purge(purge_paths, &recorded, roots).map_err(DeployError::Invalid)?;
            if action != Action::Remove {
                return Err(DeployError::Invalid(
                    "data is only purged together with removing the deployment".into(),
                ));
            }
        }
        let managed = self.containers.managed(deployment).await?;
        let names: Vec<&str> = managed
            .iter()
            .map(|m| m.name.as_str())
            .filter(|n| !n.ends_with(PREVIOUS_SUFFIX))
            .collect();
        match action {
            Action::Start => {
                for name in &names {
                    self.containers.start(name).await.or_else(already_started)?;
                }
            }
            Action::Stop => {
                for name in names.iter().rev() {
                    self.containers.stop(name, grace).await?;
                }
            }
            Action::Restart => {
                for name in names.iter().rev() {
                    self.containers.stop(name, grace).await?;
                }
                for name in &names {
                    self.containers.start(name).await.or_else(already_started)?;
                }
            }
            Action::Remove => {
                for m in managed.iter().rev() {
                    self.containers.stop(&m.name, grace).await?;
                    self.containers.remove(&m.name).await?;
                }
                for path in purge_paths {
                    purge(Path::new(path))?;
                }
                if !purge_paths.is_empty() {
                    self.records.remove(deployment)?;
                }
            }
            Action::Unspecified => unreachable!("refused above"),
        }
        self.status(deployment).await
    }
}

/// Deletes a purged directory tree. Only where no one but root can swap the
/// path for a link on the way; the tree itself is removed without following
/// links inside it.
fn purge(path: &Path) -> Result<(), DeployError> {
    match hostfs::in_root_only_dir(path) {
        Ok(true) => {}
        Ok(false) => {
            return Err(DeployError::Invalid(format!(
                "purge of {} refused: a non-root user can write the directory holding it",
                path.display()
            )));
        }
        Err(hostfs::FsError::Missing { .. }) => return Ok(()),
        Err(e) => return Err(e.into()),
    }
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(format!("purge {}", path.display()))(e)),
    }
}

pub(super) fn already_started(e: DockerError) -> Result<(), DockerError> {
    match e {
        DockerError::DockerResponseServerError {
            status_code: 304, ..
        } => Ok(()),
        other => Err(other),
    }
}
