//! Deployments on this host: apply a spec all or nothing, control and report
//! its containers. The spec is data from the controller; nothing here knows
//! about PortSIP beyond what the spec says.

pub mod docker;
pub mod engine;
pub mod firewall;
pub mod images;
pub mod secrets;

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use imfleet_proto::agent::v1::{
    ApplyEvent, ApplyOutcome, ApplyRequest, ContainerSpec, DeploymentSpec, DeploymentStatus,
    GeneratedSecret, HealthGate, control_request::Action, secret_file::Format,
};
use tokio::sync::{Mutex, mpsc};

use self::docker::{DockerError, LABEL_CONFIG_HASH, LABEL_DEPLOYMENT, LABEL_ORDER};
use self::secrets::UnknownSecret;

/// Suffix of a previous deployment's containers while a new one is tried.
const PREVIOUS_SUFFIX: &str = ".previous";
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
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DeployError {
    let what = what.into();
    move |source| DeployError::Io { what, source }
}

/// Serialises every change to deployments on this host.
pub struct Deployer {
    docker: bollard::Docker,
    changes: Mutex<()>,
}

impl std::fmt::Debug for Deployer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deployer").finish_non_exhaustive()
    }
}

impl Deployer {
    /// Connects lazily to the local Engine socket.
    pub fn new() -> Result<Self, DeployError> {
        Ok(Deployer {
            docker: bollard::Docker::connect_with_unix_defaults()?,
            changes: Mutex::new(()),
        })
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
        emit("images", "checking images".into()).await;
        if let Err(e) = self.ensure_images(&spec).await {
            return failure(e, &secret_values, false, None);
        }
        emit(
            "directories",
            format!("{} directories", spec.directories.len()),
        )
        .await;
        if let Err(e) = prepare_directories(&spec) {
            return failure(e, &secret_values, false, None);
        }
        emit(
            "secrets",
            format!("{} generated secrets", spec.secrets.len()),
        )
        .await;
        for secret in &spec.secrets {
            match ensure_secret(secret) {
                Ok(value) => {
                    secret_values.insert(secret.id.clone(), value);
                }
                Err(e) => return failure(e, &secret_values, false, None),
            }
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
            for port in &spec.open_tcp_ports {
                let port = *port;
                let opened = tokio::task::spawn_blocking(move || firewall::open(port))
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r);
                match opened {
                    Ok(done) if done.is_empty() => {}
                    Ok(done) => emit("firewall", done.join("; ")).await,
                    Err(e) => {
                        result = Err(DeployError::Failed {
                            message: format!("opening {port}/tcp in the host firewall: {e}"),
                            diagnostics: Vec::new(),
                        });
                        break;
                    }
                }
            }
        }
        if result.is_ok()
            && let Some(gate) = &spec.gate
        {
            emit("gate", "waiting for the service to answer".into()).await;
            result = wait_for_gate(gate, timeout).await;
        }
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
                let mut outcome = failure(e, &secret_values, rolled_back, status);
                outcome.diagnostics = diagnostics
                    .iter()
                    .map(|d| secrets::redact(d, &secret_values))
                    .collect();
                outcome
            }
        }
    }

    async fn validate(&self, spec: &DeploymentSpec) -> Result<(), DeployError> {
        if spec.name.is_empty() || spec.containers.is_empty() {
            return Err(DeployError::Invalid(
                "the spec names no deployment or no containers".into(),
            ));
        }
        let mut names = std::collections::HashSet::new();
        for c in &spec.containers {
            if c.name.is_empty() || c.image.is_empty() || !names.insert(&c.name) {
                return Err(DeployError::Invalid(format!(
                    "container `{}`: empty or duplicate name, or no image",
                    c.name
                )));
            }
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

    async fn ensure_images(&self, spec: &DeploymentSpec) -> Result<(), DeployError> {
        let mut images: Vec<&str> = spec.containers.iter().map(|c| c.image.as_str()).collect();
        images.dedup();
        for image in images {
            if !docker::image_present(&self.docker, image).await? {
                docker::pull(&self.docker, image).await.map_err(|e| {
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
        let deadline = Instant::now() + timeout;
        loop {
            let (status, health_output) = docker::status(&self.docker, &container.name).await?;
            let fail = |why: String, health_output: Vec<String>| async move {
                let mut diagnostics = health_output;
                diagnostics.extend(docker::tail_logs(&self.docker, &container.name, 30).await);
                Err(DeployError::Failed {
                    message: format!("container {} {why}", container.name),
                    diagnostics,
                })
            };
            if container.one_shot {
                if status.state == "exited" {
                    if status.exit_code == 0 {
                        docker::remove(&self.docker, &container.name).await?;
                        return Ok(());
                    }
                    return fail(
                        format!("exited with status {}", status.exit_code),
                        health_output,
                    )
                    .await;
                }
            } else {
                let has_check = container
                    .health
                    .as_ref()
                    .is_some_and(|h| !h.test.is_empty());
                match (status.state.as_str(), status.health.as_str()) {
                    ("running", "healthy") => return Ok(()),
                    ("running", _) if !has_check => return Ok(()),
                    ("running", "unhealthy") => {
                        return fail("is unhealthy".into(), health_output).await;
                    }
                    ("exited" | "dead", _) => {
                        return fail(
                            format!("exited with status {}", status.exit_code),
                            health_output,
                        )
                        .await;
                    }
                    _ => {}
                }
            }
            if Instant::now() >= deadline {
                return fail(
                    format!("did not become ready within {} s", timeout.as_secs()),
                    health_output,
                )
                .await;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// State of every container of `deployment`.
    pub async fn status(&self, deployment: &str) -> Result<DeploymentStatus, DeployError> {
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

    /// Start, stop, restart or remove; idempotent.
    pub async fn control(
        &self,
        deployment: &str,
        action: Action,
        grace: Duration,
        purge_paths: &[String],
    ) -> Result<DeploymentStatus, DeployError> {
        let _guard = self.changes.lock().await;
        let managed = docker::managed(&self.docker, deployment).await?;
        let names: Vec<&str> = managed
            .iter()
            .map(|m| m.name.as_str())
            .filter(|n| !n.ends_with(PREVIOUS_SUFFIX))
            .collect();
        match action {
            Action::Start => {
                for name in &names {
                    docker::start(&self.docker, name)
                        .await
                        .or_else(already_started)?;
                }
            }
            Action::Stop => {
                for name in names.iter().rev() {
                    docker::stop(&self.docker, name, grace).await?;
                }
            }
            Action::Restart => {
                for name in names.iter().rev() {
                    docker::stop(&self.docker, name, grace).await?;
                }
                for name in &names {
                    docker::start(&self.docker, name)
                        .await
                        .or_else(already_started)?;
                }
            }
            Action::Remove => {
                for m in managed.iter().rev() {
                    docker::stop(&self.docker, &m.name, grace).await?;
                    docker::remove(&self.docker, &m.name).await?;
                }
                for path in purge_paths {
                    match std::fs::remove_dir_all(path) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => return Err(io(format!("purge {path}"))(e)),
                    }
                }
            }
            Action::Unspecified => return Err(DeployError::Invalid("no action given".into())),
        }
        self.status(deployment).await
    }

    pub fn docker(&self) -> &bollard::Docker {
        &self.docker
    }
}

fn already_started(e: DockerError) -> Result<(), DockerError> {
    match e {
        DockerError::DockerResponseServerError {
            status_code: 304, ..
        } => Ok(()),
        other => Err(other),
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
    }
}

fn chown(path: &Path, uid: u32, gid: u32) -> Result<(), DeployError> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .map_err(io(format!("chown {}", path.display())))
}

fn prepare_directories(spec: &DeploymentSpec) -> Result<(), DeployError> {
    for dir in &spec.directories {
        let path = Path::new(&dir.path);
        std::fs::create_dir_all(path).map_err(io(format!("create {}", dir.path)))?;
        chown(path, dir.uid, dir.gid)?;
        if dir.mode != 0 {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(dir.mode))
                .map_err(io(format!("chmod {}", dir.path)))?;
        }
    }
    Ok(())
}

/// Reuses the secret if any of its files holds it, else generates it; then
/// writes every file (0600-style modes from creation, atomically).
fn ensure_secret(secret: &GeneratedSecret) -> Result<String, DeployError> {
    let read = |f: &imfleet_proto::agent::v1::SecretFile| -> Option<String> {
        let text = std::fs::read_to_string(&f.path).ok()?;
        match Format::try_from(f.format).unwrap_or(Format::Raw) {
            Format::Raw => Some(text.trim().to_owned()).filter(|s| !s.is_empty()),
            Format::Ini => secrets::ini_get(&text, &f.ini_section, &f.ini_key),
        }
    };
    let value = match secret.files.iter().find_map(read) {
        Some(v) => v,
        None => {
            secrets::generate(secret.length.max(16) as usize).map_err(io("generate a secret"))?
        }
    };
    for f in &secret.files {
        let contents = match Format::try_from(f.format).unwrap_or(Format::Raw) {
            Format::Raw => format!("{value}\n"),
            Format::Ini => {
                let existing = std::fs::read_to_string(&f.path).unwrap_or_default();
                secrets::ini_set(&existing, &f.ini_section, &f.ini_key, &value)
            }
        };
        let path = Path::new(&f.path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io(format!("create {}", parent.display())))?;
        }
        imfleet_certs::storage::write_atomically(
            path,
            contents.as_bytes(),
            f.mode.max(0o400) & 0o777,
        )
        .map_err(io(format!("write {}", f.path)))?;
        chown(path, f.uid, f.gid)?;
    }
    Ok(value)
}

/// Waits until the HTTP URL answers 200 and every TCP port accepts.
async fn wait_for_gate(gate: &HealthGate, default_timeout: Duration) -> Result<(), DeployError> {
    let timeout = match gate.timeout_seconds {
        0 => default_timeout,
        s => Duration::from_secs(u64::from(s)),
    };
    let deadline = Instant::now() + timeout;
    let mut last = String::from("not checked yet");
    loop {
        let mut ok = true;
        if !gate.http_url.is_empty() {
            match http_get_status(&gate.http_url).await {
                Ok(200) => {}
                Ok(code) => {
                    ok = false;
                    last = format!("{} answered HTTP {code}", gate.http_url);
                }
                Err(e) => {
                    ok = false;
                    last = format!("{}: {e}", gate.http_url);
                }
            }
        }
        for port in &gate.tcp_ports {
            if ok
                && tokio::net::TcpStream::connect(("127.0.0.1", *port as u16))
                    .await
                    .is_err()
            {
                ok = false;
                last = format!("nothing accepts connections on TCP {port}");
            }
        }
        if ok {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(DeployError::Failed {
                message: format!(
                    "the service did not pass its health gate within {} s: {last}",
                    timeout.as_secs()
                ),
                diagnostics: Vec::new(),
            });
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Minimal HTTP/1.1 GET to a loopback `http://host:port/path`; the status code.
pub async fn http_get_status(url: &str) -> std::io::Result<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| std::io::Error::other("only http:// URLs are supported"))?;
    let (authority, path) = rest
        .split_once('/')
        .map(|(a, p)| (a.to_owned(), format!("/{p}")))
        .unwrap_or((rest.to_owned(), "/".into()));
    let connect = authority.replace("localhost", "127.0.0.1");
    let mut stream = tokio::time::timeout(
        Duration::from_secs(3),
        tokio::net::TcpStream::connect(&connect),
    )
    .await
    .map_err(|_| std::io::Error::other("connect timed out"))??;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
    let mut head = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(3), stream.read(&mut head))
        .await
        .map_err(|_| std::io::Error::other("no answer"))??;
    let line = String::from_utf8_lossy(&head[..n]);
    line.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {line:?}")))
}
