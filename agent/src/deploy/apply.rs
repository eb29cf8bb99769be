//! The all-or-nothing apply, as named steps: checks that change nothing,
//! host preparation, the swap of the running set for the new one (noted
//! before every change, for recovery), verification, and the conclusion
//! that keeps one set or the other.

use std::collections::HashMap;
use std::time::Duration;

use imfleet_proto::agent::v1::{
    ApplyEvent, ApplyOutcome, ApplyRequest, ContainerSpec, DeploymentSpec, DeploymentStatus,
};
use tokio::sync::mpsc;

use super::containers::Containers;
use super::docker::{DockerError, LABEL_CONFIG_HASH, LABEL_DEPLOYMENT, LABEL_ORDER};
use super::readiness::{self, Readiness};
use super::recovery::{self, InProgress, Step};
use super::{
    DEFAULT_HEALTH_TIMEOUT, DeployError, Deployer, PREVIOUS_SUFFIX, control, failure, firewall,
    gate, prepare, secrets, unchanged,
};

/// Apply progress for the controller; a client that went away is ignored.
#[derive(Clone)]
pub(super) struct Events(mpsc::Sender<ApplyEvent>);

impl Events {
    pub(super) async fn emit(&self, phase: &str, message: impl Into<String>) {
        let _ = self
            .0
            .send(ApplyEvent {
                phase: phase.to_owned(),
                message: message.into(),
                outcome: None,
            })
            .await;
    }

    /// Without waiting (for pull progress, which must never stall a pull).
    fn try_emit(&self, phase: &str, message: String) {
        let _ = self.0.try_send(ApplyEvent {
            phase: phase.to_owned(),
            message,
            outcome: None,
        });
    }
}

/// What putting the previous set back achieved.
#[derive(Debug, Clone, Copy)]
struct Restored {
    /// Some old container runs again.
    any: bool,
    /// Every old container runs again (true when there were none).
    all: bool,
}

impl Restored {
    const NOTHING: Restored = Restored {
        any: false,
        all: true,
    };
}

/// What the swap step did, for the conclusion.
struct Swap {
    previous: Vec<String>,
    created: Vec<String>,
    result: Result<(), DeployError>,
}

impl<C: Containers> Deployer<C> {
    /// Applies `request`, reporting progress on `events`. Never leaves new
    /// containers behind on failure; restores the previous deployment.
    pub async fn apply(
        &self,
        request: ApplyRequest,
        events: mpsc::Sender<ApplyEvent>,
    ) -> ApplyOutcome {
        let _guard = self.changes.lock().await;
        let events = Events(events);
        let spec = request.spec.clone().unwrap_or_default();
        let mut secret_values: HashMap<String, String> = request.provided_secrets.clone();
        let timeout = match request.health_timeout_seconds {
            0 => DEFAULT_HEALTH_TIMEOUT,
            s => Duration::from_secs(u64::from(s)),
        };
        let image_ids = match self.check_and_stage(&spec, &events).await {
            Ok(ids) => ids,
            Err(e) => return failure(e, &secret_values, false, None),
        };
        if let Err(e) = self.prepare_host(&spec, &mut secret_values, &events).await {
            return failure(e, &secret_values, false, None);
        }
        // Containers that already run this very spec healthy are left alone.
        match self.running_unchanged(&spec, &image_ids).await {
            Ok(Some(status)) => {
                events
                    .emit("done", "already running and healthy; nothing changed")
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
        let (outcome, clean) = match self.swap(&spec, &secret_values, timeout, &events).await {
            Ok(mut swap) => {
                if swap.result.is_ok() {
                    swap.result = self.verify(&spec, timeout, &events).await;
                }
                self.conclude(&spec, swap, &secret_values, &events).await
            }
            Err((e, restored)) => (failure(e, &secret_values, restored.any, None), restored.all),
        };
        // A note is dropped only when one whole set runs and nothing is left
        // aside; otherwise recovery finishes the job (next start or apply).
        if clean {
            if let Err(e) = self.note(&spec.name, |n| *n = None) {
                tracing::warn!(deployment = %spec.name, "could not clear the apply note: {e}");
            }
        } else {
            tracing::warn!(deployment = %spec.name, "apply left containers to sort out; the note is kept for recovery");
        }
        outcome
    }

    /// Step 1, changing nothing that runs: the Engine, the spec, an earlier
    /// apply left unfinished, the record, the images (their ids returned).
    async fn check_and_stage(
        &self,
        spec: &DeploymentSpec,
        events: &Events,
    ) -> Result<HashMap<String, String>, DeployError> {
        let done = self
            .containers
            .ensure_engine()
            .await
            .map_err(DeployError::Invalid)?;
        if !done.is_empty() {
            events.emit("engine", done.join("; ")).await;
        }
        self.validate(spec).await?;
        let steps = self.recover(&spec.name).await?;
        if !steps.is_empty() {
            events
                .emit(
                    "recovered",
                    format!("finished an interrupted apply: {}", steps.join("; ")),
                )
                .await;
        }
        // Recorded before any directory exists, so a purge can remove what a
        // failed first apply left.
        let record = self.records.load(&spec.name)?.unwrap_or_default();
        self.records.save(&spec.name, &record.updated_for(spec))?;
        events.emit("images", "checking images").await;
        self.ensure_images(spec, events).await
    }

    /// Step 2: directories with their owners (drift repaired) and generated
    /// secrets (a lost one still in use is refused).
    async fn prepare_host(
        &self,
        spec: &DeploymentSpec,
        secret_values: &mut HashMap<String, String>,
        events: &Events,
    ) -> Result<(), DeployError> {
        events
            .emit(
                "directories",
                format!("{} directories", spec.directories.len()),
            )
            .await;
        let repaired = prepare::directories(&spec.directories)?;
        if repaired > 0 {
            events
                .emit(
                    "directories",
                    format!("repaired the owner of {repaired} entries in the data directories"),
                )
                .await;
        }
        events
            .emit(
                "secrets",
                format!("{} generated secrets", spec.secrets.len()),
            )
            .await;
        for secret in &spec.secrets {
            secret_values.insert(secret.id.clone(), prepare::secret(secret)?);
        }
        Ok(())
    }

    /// Step 3: note the apply, set the running containers aside, start the
    /// new ones in order, each ready before the next. An error before any
    /// new container exists comes back with whether the old set was restored.
    async fn swap(
        &self,
        spec: &DeploymentSpec,
        secret_values: &HashMap<String, String>,
        timeout: Duration,
        events: &Events,
    ) -> Result<Swap, (DeployError, Restored)> {
        // Noted before anything is stopped, so a crash can be undone.
        let live: Vec<String> = self
            .containers
            .managed(&spec.name)
            .await
            .map_err(|e| (e.into(), Restored::NOTHING))?
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
        .map_err(|e| (e, Restored::NOTHING))?;
        let previous = match self.set_aside_previous(spec).await {
            Ok(previous) => previous,
            Err((touched, e)) => {
                let restored = self.restore_previous(&spec.name, &touched).await;
                return Err((e, restored));
            }
        };
        if !previous.is_empty() {
            events
                .emit(
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
            let step = format!("container {}", container.name);
            events.emit(&step, "starting").await;
            let name = container.name.clone();
            result = self.note(&spec.name, |n| {
                if let Some(n) = n {
                    n.created.push(name)
                }
            });
            if result.is_err() {
                break;
            }
            created.push(container.name.clone());
            result = self
                .run_container(spec, container, order as u32, secret_values, timeout)
                .await;
            if result.is_err() {
                break;
            }
            events.emit(&step, "ready").await;
        }
        Ok(Swap {
            previous,
            created,
            result,
        })
    }

    /// Step 4: the firewall admits the spec's ports, the gate answers, every
    /// container is healthy now (not only when it was started); then the
    /// apply is committed: past this point a crash finishes it.
    async fn verify(
        &self,
        spec: &DeploymentSpec,
        timeout: Duration,
        events: &Events,
    ) -> Result<(), DeployError> {
        if !spec.open_tcp_ports.is_empty() {
            let ports = spec.open_tcp_ports.clone();
            let done = tokio::task::spawn_blocking(move || firewall::open(&ports))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r)
                .map_err(|e| DeployError::Failed {
                    message: format!("opening ports in the host firewall: {e}"),
                    diagnostics: Vec::new(),
                })?;
            if !done.is_empty() {
                events.emit("firewall", done.join("; ")).await;
            }
        }
        if let Some(gate) = &spec.gate {
            events
                .emit("gate", "waiting for the service to answer")
                .await;
            gate::wait(gate, timeout).await?;
        }
        let long_running: Vec<&ContainerSpec> =
            spec.containers.iter().filter(|c| !c.one_shot).collect();
        self.wait_ready(&long_running, timeout).await?;
        self.note(&spec.name, |n| {
            if let Some(n) = n {
                n.committed = true
            }
        })
    }

    /// Drops the previous set after success; after a failure removes what
    /// was created and restores the previous set. Also says whether that
    /// left exactly one set with nothing aside.
    async fn conclude(
        &self,
        spec: &DeploymentSpec,
        swap: Swap,
        secret_values: &HashMap<String, String>,
        events: &Events,
    ) -> (ApplyOutcome, bool) {
        let Swap {
            previous,
            created,
            result,
        } = swap;
        match result {
            Ok(()) => {
                let mut clean = true;
                for name in &previous {
                    let aside = format!("{name}{PREVIOUS_SUFFIX}");
                    clean &= self.containers.remove(&aside).await.is_ok();
                }
                let status = self.status(&spec.name).await.ok();
                events.emit("done", "deployment healthy").await;
                let outcome = ApplyOutcome {
                    success: true,
                    status,
                    ..Default::default()
                };
                (outcome, clean)
            }
            Err(e) => {
                let diagnostics = match &e {
                    DeployError::Failed { diagnostics, .. } => diagnostics.clone(),
                    _ => Vec::new(),
                };
                let mut removed = true;
                for name in created.iter().rev() {
                    removed &= self.containers.remove(name).await.is_ok();
                }
                if removed {
                    // What is left under these names from now on is the old set.
                    removed = self
                        .note(&spec.name, |n| {
                            if let Some(n) = n {
                                n.created.clear()
                            }
                        })
                        .is_ok();
                }
                let restored = self.restore_previous(&spec.name, &previous).await;
                let rolled_back = restored.any;
                events
                    .emit(
                        "rollback",
                        if rolled_back {
                            "previous deployment restored"
                        } else {
                            "new containers removed"
                        },
                    )
                    .await;
                let status = self.status(&spec.name).await.ok();
                let mut outcome = failure(e, secret_values, rolled_back, status);
                outcome.diagnostics = diagnostics
                    .iter()
                    .map(|d| secrets::redact(d, secret_values))
                    .collect();
                (outcome, removed && restored.all)
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
        let found: Vec<String> = self
            .containers
            .managed(deployment)
            .await?
            .into_iter()
            .map(|m| m.name)
            .collect();
        let mut done = Vec::new();
        for step in recovery::plan(note.as_ref(), &found) {
            match &step {
                Step::Remove(name) => self.containers.remove(name).await?,
                Step::Rename { from, to } => self.containers.rename(from, to).await?,
                Step::Start(name) => self
                    .containers
                    .start(name)
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
        image_ids: &HashMap<String, String>,
    ) -> Result<Option<DeploymentStatus>, DeployError> {
        let found = self.containers.managed(&spec.name).await?;
        if !unchanged::same(spec, &found, image_ids) {
            return Ok(None);
        }
        let status = self.status(&spec.name).await?;
        Ok(status.healthy.then_some(status))
    }

    /// Pulls what is missing; the id each image reference resolves to.
    async fn ensure_images(
        &self,
        spec: &DeploymentSpec,
        events: &Events,
    ) -> Result<HashMap<String, String>, DeployError> {
        let mut ids = HashMap::new();
        for image in spec.containers.iter().map(|c| c.image.as_str()) {
            if ids.contains_key(image) {
                continue;
            }
            let mut id = self.containers.image_id(image).await?;
            if id.is_none() {
                let mut shown = u64::MAX;
                let mut progress = |done: u64, total: u64| {
                    // One event per 10 MB is plenty; never block the pull on it.
                    if done / 10_000_000 != shown {
                        shown = done / 10_000_000;
                        events.try_emit(
                            "images",
                            format!("pulling {image}: {}", imfleet_proto::megabytes(done, total)),
                        );
                    }
                };
                self.containers.pull(image, &mut progress).await.map_err(|e| {
                    DeployError::Invalid(format!(
                        "image {image} is not on the host and could not be pulled ({e}); load it with --image-file"
                    ))
                })?;
                id = self.containers.image_id(image).await?;
            }
            if let Some(id) = id {
                ids.insert(image.to_owned(), id);
            }
        }
        Ok(ids)
    }

    /// Stops the deployment's current containers and renames them aside. On
    /// failure, returns the ones already touched so they can be restored.
    async fn set_aside_previous(
        &self,
        spec: &DeploymentSpec,
    ) -> Result<Vec<String>, (Vec<String>, DeployError)> {
        let current = self
            .containers
            .managed(&spec.name)
            .await
            .map_err(|e| (Vec::new(), e.into()))?;
        let mut previous = Vec::new();
        for m in current.iter().rev() {
            let step = async {
                if m.name.ends_with(PREVIOUS_SUFFIX) {
                    // Left over from an interrupted apply: the live copy wins.
                    self.containers.remove(&m.name).await?;
                    return Ok(false);
                }
                let grace = spec
                    .containers
                    .iter()
                    .find(|c| c.name == m.name)
                    .map(|c| c.stop_grace_seconds)
                    .unwrap_or(30);
                self.containers
                    .stop(&m.name, Duration::from_secs(u64::from(grace)))
                    .await?;
                Ok::<_, DockerError>(true)
            };
            match step.await {
                Ok(false) => continue,
                Ok(true) => previous.insert(0, m.name.clone()),
                Err(e) => return Err((previous, e.into())),
            }
            let aside = format!("{}{PREVIOUS_SUFFIX}", m.name);
            if let Err(e) = self.containers.rename(&m.name, &aside).await {
                return Err((previous, e.into()));
            }
        }
        Ok(previous)
    }

    /// Renames the previous containers back and starts them, in order.
    /// Only an old container is started: where the new one could not be
    /// removed, the old copy stays aside for recovery.
    async fn restore_previous(&self, deployment: &str, previous: &[String]) -> Restored {
        let found: Vec<String> = match self.containers.managed(deployment).await {
            Ok(found) => found.into_iter().map(|m| m.name).collect(),
            Err(_) => {
                return Restored {
                    any: false,
                    all: previous.is_empty(),
                };
            }
        };
        let mut restored = Restored {
            any: false,
            all: true,
        };
        for name in previous {
            let aside = format!("{name}{PREVIOUS_SUFFIX}");
            let old_is_back = if found.contains(&aside) {
                self.containers.rename(&aside, name).await.is_ok()
            } else {
                // Stopped but never renamed: the live one is the old one.
                found.contains(name)
            };
            let started = old_is_back
                && self
                    .containers
                    .start(name)
                    .await
                    .or_else(control::already_started)
                    .is_ok();
            restored.any |= started;
            restored.all &= started;
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
        self.containers
            .create(container, labels, secret_values)
            .await?;
        self.containers.start(&container.name).await?;
        self.wait_ready(&[container], timeout).await
    }

    /// Waits until every container is ready (one-shot ones finished and
    /// removed); fails as soon as one will not be, with its last words.
    async fn wait_ready(
        &self,
        containers: &[&ContainerSpec],
        timeout: Duration,
    ) -> Result<(), DeployError> {
        // tokio's clock: the same in production, pausable in tests.
        let deadline = tokio::time::Instant::now() + timeout;
        let mut pending: Vec<&ContainerSpec> = containers.to_vec();
        loop {
            let mut still = Vec::new();
            for container in pending {
                let (observed, health_output) = self.containers.status(&container.name).await?;
                let now = time::OffsetDateTime::now_utc().unix_timestamp();
                match readiness::judge(&observed, container.one_shot, now) {
                    Readiness::Ready if container.one_shot => {
                        self.containers.remove(&container.name).await?;
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
            if tokio::time::Instant::now() >= deadline {
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
        diagnostics.extend(self.containers.tail_logs(&container.name, 30).await);
        DeployError::Failed {
            message: format!("container {} {why}", container.name),
            diagnostics,
        }
    }
}
