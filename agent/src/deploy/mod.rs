//! Deployments on this host: apply a spec all or nothing, control and report
//! its containers. The spec is data from the controller; nothing here knows
//! about PortSIP beyond what the spec says.

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
pub mod unchanged;
pub mod validate;

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use imfleet_proto::agent::v1::{
    ApplyEvent, ApplyOutcome, ApplyRequest, ContainerSpec, DeploymentSpec, DeploymentStatus,
};
use tokio::sync::{Mutex, mpsc};

use self::docker::{DockerError, LABEL_CONFIG_HASH, LABEL_DEPLOYMENT, LABEL_ORDER};
use self::readiness::Readiness;
use self::record::{RecordError, Records};
use self::recovery::{InProgress, Step};
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
pub struct Deployer {
    docker: bollard::Docker,
    changes: Mutex<()>,
    spool: images::Spool,
    records: Records,
    roots: Option<Roots>,
}

impl std::fmt::Debug for Deployer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deployer").finish_non_exhaustive()
    }
}

impl Deployer {
    /// Connects lazily to the local Engine socket.
    pub fn new(config: &DeployerConfig) -> Result<Self, DeployError> {
        Ok(Deployer {
            docker: bollard::Docker::connect_with_unix_defaults()?,
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

    /// Applies `request`, reporting progress on `events`. Never leaves new
    /// containers behind on failure; restores the previous deployment.
    pub async fn apply(
        &self,
        request: ApplyRequest,
        events: mpsc::Sender<ApplyEvent>,
    ) -> ApplyOutcome {
        let _guard = self.changes.lock().await;
        let spec = request.spec.clone().unwrap_or_default();
        let emit = |phase: &str, message: String| {
            let events = events.clone();
            let event = ApplyEvent {
                phase: phase.to_owned(),
                message,
                outcome: None,
            };
            async move {
                let _ = events.send(event).await;
            }
        };
        let mut secret_values: HashMap<String, String> = request.provided_secrets.clone();
        let timeout = match request.health_timeout_seconds {
            0 => DEFAULT_HEALTH_TIMEOUT,
            s => Duration::from_secs(u64::from(s)),
        };

        match engine::ensure(&self.docker).await {
            Ok(done) if done.is_empty() => {}
            Ok(done) => emit("engine", done.join("; ")).await,
            Err(e) => return failure(DeployError::Invalid(e), &secret_values, false, None),
        }
        // Nothing else on the host changes until validation and images succeed.
        if let Err(e) = self.validate(&spec).await {
            return failure(e, &secret_values, false, None);
        }
        match self.recover(&spec.name).await {
            Ok(steps) if steps.is_empty() => {}
            Ok(steps) => {
                emit(
                    "recovered",
                    format!("finished an interrupted apply: {}", steps.join("; ")),
                )
                .await
            }
            Err(e) => return failure(e, &secret_values, false, None),
        }
        // Recorded before any directory exists, so a purge can remove what a
        // failed first apply left.
        let recorded = self
            .records
            .load(&spec.name)
            .map(|old| old.unwrap_or_default().updated_for(&spec))
            .and_then(|record| self.records.save(&spec.name, &record));
        if let Err(e) = recorded {
            return failure(e.into(), &secret_values, false, None);
        }
        emit("images", "checking images".into()).await;
        if let Err(e) = self.ensure_images(&spec, &events).await {
            return failure(e, &secret_values, false, None);
        }

        emit(
            "directories",
            format!("{} directories", spec.directories.len()),
        )
        .await;
        match prepare::directories(&spec.directories) {
            Ok(0) => {}
            Ok(n) => {
                emit(
                    "directories",
                    format!("repaired the owner of {n} entries in the data directories"),
                )
                .await
            }
            Err(e) => return failure(e, &secret_values, false, None),
        }
        emit(
            "secrets",
            format!("{} generated secrets", spec.secrets.len()),
        )
        .await;
        for secret in &spec.secrets {
            match prepare::secret(secret) {
                Ok(value) => {
                    secret_values.insert(secret.id.clone(), value);
                }
                Err(e) => return failure(e, &secret_values, false, None),
            }
        }

        // Directories and secrets are repaired above; containers that already
        // run this very spec healthy are left alone.
        match self.running_unchanged(&spec).await {
            Ok(Some(status)) => {
                emit(
                    "done",
                    "already running and healthy; nothing changed".into(),
                )
                .await;
                return ApplyOutcome {
                    success: true,
                    unchanged: true,
                    status: Some(status),
                    ..Default::default()
                };
            }
            Ok(None) => {}
            Err(e) => return failure(e, &secret_values, false, None),
        }
        // Noted before anything is stopped, so a crash can be undone.
        let noted = async {
            let live: Vec<String> = docker::managed(&self.docker, &spec.name)
                .await?
                .into_iter()
                .map(|m| m.name)
                .filter(|n| !n.ends_with(PREVIOUS_SUFFIX))
                .collect();
            self.note(&spec.name, |n| {
                *n = Some(InProgress {
                    previous: live,
                    ..Default::default()
                })
            })
        };
        if let Err(e) = noted.await {
            return failure(e, &secret_values, false, None);
        }
        let previous = match self.set_aside_previous(&spec).await {
            Ok(previous) => previous,
            Err((touched, e)) => {
                let rolled_back = self.restore_previous(&touched).await;
                return failure(e, &secret_values, rolled_back, None);
            }
        };
        if !previous.is_empty() {
            emit(
                "previous",
                format!(
                    "stopped the running deployment ({} containers)",
                    previous.len()
                ),
            )
            .await;
        }
        let mut created = Vec::new();
        let mut result = Ok(());
        for (order, container) in spec.containers.iter().enumerate() {
            emit(&format!("container {}", container.name), "starting".into()).await;
            let name = container.name.clone();
            if let Err(e) = self.note(&spec.name, |n| {
                if let Some(n) = n {
                    n.created.push(name)
                }
            }) {
                result = Err(e);
                break;
            }
            created.push(container.name.clone());
            result = self
                .run_container(&spec, container, order as u32, &secret_values, timeout)
                .await;
            if result.is_err() {
                break;
            }
            emit(&format!("container {}", container.name), "ready".into()).await;
        }
        if result.is_ok() {
            let ports = spec.open_tcp_ports.clone();
            let opened = tokio::task::spawn_blocking(move || firewall::open(&ports))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r);
            match opened {
                Ok(done) if done.is_empty() => {}
                Ok(done) => emit("firewall", done.join("; ")).await,
                Err(e) => {
                    result = Err(DeployError::Failed {
                        message: format!("opening ports in the host firewall: {e}"),
                        diagnostics: Vec::new(),
                    });
                }
            }
        }
        if result.is_ok()
            && let Some(gate) = &spec.gate
        {
            emit("gate", "waiting for the service to answer".into()).await;
            result = gate::wait(gate, timeout).await;
        }
        if result.is_ok() {
            // Success means every container is healthy now, not only each
            // one when it was started.
            let long_running: Vec<&ContainerSpec> =
                spec.containers.iter().filter(|c| !c.one_shot).collect();
            result = self.wait_ready(&long_running, timeout).await;
        }
        if result.is_ok() {
            // Past this point a crash finishes the apply instead of undoing it.
            result = self.note(&spec.name, |n| {
                if let Some(n) = n {
                    n.committed = true
                }
            });
        }
        let outcome = self
            .conclude(&spec, result, previous, created, &secret_values, &emit)
            .await;
        if let Err(e) = self.note(&spec.name, |n| *n = None) {
            tracing::warn!(deployment = %spec.name, "could not clear the apply note: {e}");
        }
        outcome
    }

    /// Drops the previous set after success; after a failure removes what
    /// was created and restores the previous set.
    async fn conclude<F: std::future::Future<Output = ()>>(
        &self,
        spec: &DeploymentSpec,
        result: Result<(), DeployError>,
        previous: Vec<String>,
        created: Vec<String>,
        secret_values: &HashMap<String, String>,
        emit: &impl Fn(&str, String) -> F,
    ) -> ApplyOutcome {
        match result {
            Ok(()) => {
                for name in &previous {
                    let _ = docker::remove(&self.docker, &format!("{name}{PREVIOUS_SUFFIX}")).await;
                }
                let status = self.status(&spec.name).await.ok();
                emit("done", "deployment healthy".into()).await;
                ApplyOutcome {
                    success: true,
                    status,
                    ..Default::default()
                }
            }
            Err(e) => {
                let diagnostics = match &e {
                    DeployError::Failed { diagnostics, .. } => diagnostics.clone(),
                    _ => Vec::new(),
                };
                for name in created.iter().rev() {
                    let _ = docker::remove(&self.docker, name).await;
                }
                let rolled_back = self.restore_previous(&previous).await;
                emit(
                    "rollback",
                    if rolled_back {
                        "previous deployment restored".into()
                    } else {
                        "new containers removed".into()
                    },
                )
                .await;
                let status = self.status(&spec.name).await.ok();
                let mut outcome = failure(e, secret_values, rolled_back, status);
                outcome.diagnostics = diagnostics
                    .iter()
                    .map(|d| secrets::redact(d, secret_values))
                    .collect();
                outcome
            }
        }
    }

    /// Changes the apply note in the deployment's record.
    fn note(
        &self,
        deployment: &str,
        change: impl FnOnce(&mut Option<InProgress>),
    ) -> Result<(), DeployError> {
        let mut record = self.records.load(deployment)?.unwrap_or_default();
        change(&mut record.in_progress);
        Ok(self.records.save(deployment, &record)?)
    }

    /// Finishes or undoes an apply noted but not ended (see [`recovery`]).
    async fn recover(&self, deployment: &str) -> Result<Vec<String>, DeployError> {
        let mut record = self.records.load(deployment)?;
        let note = record.as_ref().and_then(|r| r.in_progress.clone());
        let found: Vec<String> = docker::managed(&self.docker, deployment)
            .await?
            .into_iter()
            .map(|m| m.name)
            .collect();
        let mut done = Vec::new();
        for step in recovery::plan(note.as_ref(), &found) {
            match &step {
                Step::Remove(name) => docker::remove(&self.docker, name).await?,
                Step::Rename { from, to } => docker::rename(&self.docker, from, to).await?,
                Step::Start(name) => docker::start(&self.docker, name)
                    .await
                    .or_else(control::already_started)?,
            }
            done.push(step.to_string());
        }
        if let Some(record) = record.as_mut().filter(|r| r.in_progress.is_some()) {
            record.in_progress = None;
            self.records.save(deployment, record)?;
        }
        Ok(done)
    }

    /// Recovers every apply this agent noted and did not end (at start-up).
    /// Only noted ones: containers of other deployments on the same Engine
    /// (or a `.previous` set another agent is working on) are not this
    /// agent's to touch until it applies that deployment itself.
    pub async fn recover_all(&self) -> Vec<(String, Result<Vec<String>, DeployError>)> {
        let _guard = self.changes.lock().await;
        let mut out = Vec::new();
        for name in self.records.names().unwrap_or_default() {
            let noted = self
                .records
                .load(&name)
                .ok()
                .flatten()
                .is_some_and(|r| r.in_progress.is_some());
            if noted {
                let result = self.recover(&name).await;
                out.push((name, result));
            }
        }
        out
    }

    /// The deployment's status when `spec` already runs exactly (same config
    /// hash and image ids, every container running) and healthy.
    async fn running_unchanged(
        &self,
        spec: &DeploymentSpec,
    ) -> Result<Option<DeploymentStatus>, DeployError> {
        let found = docker::managed(&self.docker, &spec.name).await?;
        let mut image_ids = HashMap::new();
        for c in &spec.containers {
            if let Some(id) = docker::image_id(&self.docker, &c.image).await? {
                image_ids.insert(c.image.clone(), id);
            }
        }
        if !unchanged::same(spec, &found, &image_ids) {
            return Ok(None);
        }
        let status = self.status(&spec.name).await?;
        Ok(status.healthy.then_some(status))
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
            if let Some(owner) = docker::owner_of(&self.docker, &c.name).await?
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

    async fn ensure_images(
        &self,
        spec: &DeploymentSpec,
        events: &mpsc::Sender<ApplyEvent>,
    ) -> Result<(), DeployError> {
        let mut images: Vec<&str> = spec.containers.iter().map(|c| c.image.as_str()).collect();
        images.dedup();
        for image in images {
            if !docker::image_present(&self.docker, image).await? {
                let mut shown = u64::MAX;
                let progress = |done: u64, total: u64| {
                    // One event per 10 MB is plenty; never block the pull on it.
                    if done / 10_000_000 != shown {
                        shown = done / 10_000_000;
                        let _ = events.try_send(ApplyEvent {
                            phase: "images".into(),
                            message: format!(
                                "pulling {image}: {}",
                                imfleet_proto::megabytes(done, total)
                            ),
                            outcome: None,
                        });
                    }
                };
                docker::pull(&self.docker, image, progress).await.map_err(|e| {
                    DeployError::Invalid(format!(
                        "image {image} is not on the host and could not be pulled ({e}); load it with --image-file"
                    ))
                })?;
            }
        }
        Ok(())
    }

    /// Stops the deployment's current containers and renames them aside. On
    /// failure, returns the ones already touched so they can be restored.
    async fn set_aside_previous(
        &self,
        spec: &DeploymentSpec,
    ) -> Result<Vec<String>, (Vec<String>, DeployError)> {
        let current = docker::managed(&self.docker, &spec.name)
            .await
            .map_err(|e| (Vec::new(), e.into()))?;
        let mut previous = Vec::new();
        for m in current.iter().rev() {
            let step = async {
                if m.name.ends_with(PREVIOUS_SUFFIX) {
                    // Left over from an interrupted apply: the live copy wins.
                    docker::remove(&self.docker, &m.name).await?;
                    return Ok(false);
                }
                let grace = spec
                    .containers
                    .iter()
                    .find(|c| c.name == m.name)
                    .map(|c| c.stop_grace_seconds)
                    .unwrap_or(30);
                docker::stop(&self.docker, &m.name, Duration::from_secs(u64::from(grace))).await?;
                Ok::<_, DockerError>(true)
            };
            match step.await {
                Ok(false) => continue,
                Ok(true) => previous.insert(0, m.name.clone()),
                Err(e) => return Err((previous, e.into())),
            }
            let aside = format!("{}{PREVIOUS_SUFFIX}", m.name);
            if let Err(e) = docker::rename(&self.docker, &m.name, &aside).await {
                return Err((previous, e.into()));
            }
        }
        Ok(previous)
    }

    /// Renames the previous containers back and starts them, in order.
    async fn restore_previous(&self, previous: &[String]) -> bool {
        let mut restored = false;
        for name in previous {
            if docker::rename(&self.docker, &format!("{name}{PREVIOUS_SUFFIX}"), name)
                .await
                .is_ok()
            {
                restored = true;
            }
        }
        for name in previous {
            // A container stopped but not yet renamed only needs starting.
            restored |= docker::start(&self.docker, name).await.is_ok();
        }
        restored
    }

    async fn run_container(
        &self,
        spec: &DeploymentSpec,
        container: &ContainerSpec,
        order: u32,
        secret_values: &HashMap<String, String>,
        timeout: Duration,
    ) -> Result<(), DeployError> {
        let labels: HashMap<String, String> = [
            (LABEL_DEPLOYMENT.to_owned(), spec.name.clone()),
            (LABEL_ORDER.to_owned(), order.to_string()),
            (LABEL_CONFIG_HASH.to_owned(), spec.config_hash.clone()),
        ]
        .into();
        docker::create(&self.docker, container, labels, |s| {
            secrets::substitute(s, secret_values)
        })
        .await?;
        docker::start(&self.docker, &container.name).await?;
        self.wait_ready(&[container], timeout).await
    }

    /// Waits until every container is ready (one-shot ones finished and
    /// removed); fails as soon as one will not be, with its last words.
    async fn wait_ready(
        &self,
        containers: &[&ContainerSpec],
        timeout: Duration,
    ) -> Result<(), DeployError> {
        let deadline = Instant::now() + timeout;
        let mut pending: Vec<&ContainerSpec> = containers.to_vec();
        loop {
            let mut still = Vec::new();
            for container in pending {
                let (observed, health_output) =
                    docker::status(&self.docker, &container.name).await?;
                let now = time::OffsetDateTime::now_utc().unix_timestamp();
                match readiness::judge(&observed, container.one_shot, now) {
                    Readiness::Ready if container.one_shot => {
                        docker::remove(&self.docker, &container.name).await?;
                    }
                    Readiness::Ready => {}
                    Readiness::Waiting(why) => still.push((container, why, health_output)),
                    Readiness::Failed(why) => {
                        return Err(self.container_failed(container, why, health_output).await);
                    }
                }
            }
            let Some((container, why, health_output)) = still.first().cloned() else {
                return Ok(());
            };
            if Instant::now() >= deadline {
                let why = format!(
                    "did not become ready within {} s ({why})",
                    timeout.as_secs()
                );
                return Err(self.container_failed(container, why, health_output).await);
            }
            pending = still.into_iter().map(|(c, _, _)| c).collect();
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The failure of one container, with its health output and last log lines.
    async fn container_failed(
        &self,
        container: &ContainerSpec,
        why: String,
        health_output: Vec<String>,
    ) -> DeployError {
        let mut diagnostics = health_output;
        diagnostics.extend(docker::tail_logs(&self.docker, &container.name, 30).await);
        DeployError::Failed {
            message: format!("container {} {why}", container.name),
            diagnostics,
        }
    }

    /// State of every container of `deployment`.
    pub async fn status(&self, deployment: &str) -> Result<DeploymentStatus, DeployError> {
        check_deployment_name(deployment)?;
        let managed = docker::managed(&self.docker, deployment).await?;
        let mut containers = Vec::new();
        let mut config_hash = String::new();
        for m in managed
            .iter()
            .filter(|m| !m.name.ends_with(PREVIOUS_SUFFIX))
        {
            let (status, _) = docker::status(&self.docker, &m.name).await?;
            if config_hash.is_empty()
                && let Ok(c) = self.docker.inspect_container(&m.name, None).await
            {
                config_hash = c
                    .config
                    .and_then(|cfg| cfg.labels)
                    .and_then(|l| l.get(LABEL_CONFIG_HASH).cloned())
                    .unwrap_or_default();
            }
            containers.push(status);
        }
        let healthy = !containers.is_empty()
            && containers
                .iter()
                .all(|c| c.state == "running" && (c.health == "healthy" || c.health == "none"));
        Ok(DeploymentStatus {
            name: deployment.to_owned(),
            containers,
            healthy,
            config_hash,
        })
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
