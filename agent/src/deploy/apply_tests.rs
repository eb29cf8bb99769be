//! Apply's paths against a scripted fake of the container engine, in paused
//! time: readiness timeouts, crash loops, rollback, success, the unchanged
//! case and recovery of a noted apply, without Docker and without waiting.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use imfleet_proto::agent::v1::{ApplyRequest, ContainerSpec, ContainerStatus, DeploymentSpec};
use tokio::sync::mpsc;

use super::containers::Containers;
use super::docker::{DockerError, LABEL_CONFIG_HASH, LABEL_DEPLOYMENT, LABEL_ORDER, Managed};
use super::recovery::InProgress;
use super::*;

/// What a container of this name does once started.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Behaviour {
    Healthy,
    /// Health stays "starting".
    NeverReady,
    /// The Engine keeps restarting it.
    CrashLoop,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Box_ {
    name: String,
    deployment: String,
    order: u32,
    config_hash: String,
    image_id: String,
    state: String,
    health: String,
    restarts: u32,
}

#[derive(Default)]
struct State {
    boxes: Vec<Box_>,
    images: HashMap<String, String>,
    behaviour: HashMap<String, Behaviour>,
    /// Removing this container fails (the Engine said no).
    refuse_remove: Option<String>,
    ops: Vec<String>,
}

#[derive(Clone, Default)]
struct Fake(Arc<Mutex<State>>);

fn server_error(status_code: u16, message: &str) -> DockerError {
    DockerError::DockerResponseServerError {
        status_code,
        message: message.into(),
    }
}

impl Fake {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap()
    }
    fn running(&self, name: &str, hash: &str, image_id: &str, order: u32) {
        self.state().boxes.push(Box_ {
            name: name.into(),
            deployment: "svc".into(),
            order,
            config_hash: hash.into(),
            image_id: image_id.into(),
            state: "running".into(),
            health: "healthy".into(),
            restarts: 0,
        });
    }
    /// (name, config hash, state) of every container, sorted by name.
    fn snapshot(&self) -> Vec<(String, String, String)> {
        let mut out: Vec<_> = self
            .state()
            .boxes
            .iter()
            .map(|b| (b.name.clone(), b.config_hash.clone(), b.state.clone()))
            .collect();
        out.sort();
        out
    }
    fn ops(&self) -> Vec<String> {
        self.state().ops.clone()
    }
}

impl Containers for Fake {
    async fn ensure_engine(&self) -> Result<Vec<String>, String> {
        Ok(Vec::new())
    }
    async fn owner_of(&self, name: &str) -> Result<Option<Option<String>>, DockerError> {
        Ok(self
            .state()
            .boxes
            .iter()
            .find(|b| b.name == name)
            .map(|b| Some(b.deployment.clone())))
    }
    async fn image_id(&self, image: &str) -> Result<Option<String>, DockerError> {
        Ok(self.state().images.get(image).cloned())
    }
    async fn pull(
        &self,
        image: &str,
        _: &mut (dyn FnMut(u64, u64) + Send),
    ) -> Result<(), DockerError> {
        Err(server_error(
            404,
            &format!("pull access denied for {image}"),
        ))
    }
    async fn managed(&self, deployment: &str) -> Result<Vec<Managed>, DockerError> {
        let mut out: Vec<Managed> = self
            .state()
            .boxes
            .iter()
            .filter(|b| b.deployment == deployment)
            .map(|b| Managed {
                name: b.name.clone(),
                order: b.order,
                config_hash: b.config_hash.clone(),
                image_id: b.image_id.clone(),
                running: b.state == "running",
            })
            .collect();
        out.sort_by_key(|m| (m.order, m.name.clone()));
        Ok(out)
    }
    async fn create(
        &self,
        spec: &ContainerSpec,
        labels: HashMap<String, String>,
        _: &HashMap<String, String>,
    ) -> Result<(), DeployError> {
        let mut state = self.state();
        if state.boxes.iter().any(|b| b.name == spec.name) {
            return Err(server_error(409, "name in use").into());
        }
        let image_id = state.images.get(&spec.image).cloned().unwrap_or_default();
        state.ops.push(format!("create {}", spec.name));
        state.boxes.push(Box_ {
            name: spec.name.clone(),
            deployment: labels[LABEL_DEPLOYMENT].clone(),
            order: labels[LABEL_ORDER].parse().unwrap(),
            config_hash: labels[LABEL_CONFIG_HASH].clone(),
            image_id,
            state: "created".into(),
            health: "none".into(),
            restarts: 0,
        });
        Ok(())
    }
    async fn start(&self, name: &str) -> Result<(), DockerError> {
        let mut state = self.state();
        state.ops.push(format!("start {name}"));
        let behaviour = state
            .behaviour
            .get(name)
            .copied()
            .unwrap_or(Behaviour::Healthy);
        let b = state
            .boxes
            .iter_mut()
            .find(|b| b.name == name)
            .ok_or_else(|| server_error(404, "no such container"))?;
        match behaviour {
            Behaviour::Healthy => (b.state, b.health) = ("running".into(), "healthy".into()),
            Behaviour::NeverReady => (b.state, b.health) = ("running".into(), "starting".into()),
            Behaviour::CrashLoop => {
                (b.state, b.health, b.restarts) = ("restarting".into(), "none".into(), 3)
            }
        }
        Ok(())
    }
    async fn stop(&self, name: &str, _: std::time::Duration) -> Result<(), DockerError> {
        let mut state = self.state();
        state.ops.push(format!("stop {name}"));
        if let Some(b) = state.boxes.iter_mut().find(|b| b.name == name) {
            b.state = "exited".into();
        }
        Ok(())
    }
    async fn remove(&self, name: &str) -> Result<(), DockerError> {
        let mut state = self.state();
        if state.refuse_remove.as_deref() == Some(name) {
            return Err(server_error(500, "device or resource busy"));
        }
        state.ops.push(format!("remove {name}"));
        state.boxes.retain(|b| b.name != name);
        Ok(())
    }
    async fn rename(&self, from: &str, to: &str) -> Result<(), DockerError> {
        let mut state = self.state();
        if state.boxes.iter().any(|b| b.name == to) {
            return Err(server_error(409, "name in use"));
        }
        state.ops.push(format!("rename {from} {to}"));
        let b = state
            .boxes
            .iter_mut()
            .find(|b| b.name == from)
            .ok_or_else(|| server_error(404, "no such container"))?;
        b.name = to.into();
        Ok(())
    }
    async fn status(&self, name: &str) -> Result<(ContainerStatus, Vec<String>), DockerError> {
        let state = self.state();
        let status = match state.boxes.iter().find(|b| b.name == name) {
            Some(b) => ContainerStatus {
                name: b.name.clone(),
                state: b.state.clone(),
                health: b.health.clone(),
                restart_count: b.restarts,
                exit_code: if b.restarts > 0 { 1 } else { 0 },
                image_id: b.image_id.clone(),
                ..Default::default()
            },
            None => ContainerStatus {
                name: name.into(),
                state: "missing".into(),
                health: "none".into(),
                ..Default::default()
            },
        };
        Ok((status, vec!["health: still starting".into()]))
    }
    async fn tail_logs(&self, name: &str, _: usize) -> Vec<String> {
        vec![format!("{name}: last words")]
    }
}

struct Rig {
    _dir: tempfile::TempDir,
    fake: Fake,
    deployer: Deployer<Fake>,
}

fn rig() -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let fake = Fake::default();
    fake.state().images.extend([
        ("img:0".to_owned(), "sha256:old".to_owned()),
        ("img:1".to_owned(), "sha256:new".to_owned()),
    ]);
    // Never dialled: logs and image loads are not exercised here.
    let socket = dir.path().join("no-engine.sock");
    std::fs::write(&socket, "").unwrap();
    let docker = bollard::Docker::connect_with_unix(
        socket.to_str().unwrap(),
        5,
        bollard::API_DEFAULT_VERSION,
    )
    .unwrap();
    let config = DeployerConfig {
        spool_dir: dir.path().join("spool"),
        state_dir: dir.path().join("state"),
        roots: Some(Roots {
            data_path: data.canonicalize().unwrap(),
            storage_dir: None,
        }),
    };
    let deployer = Deployer::with_containers(&config, fake.clone(), docker).unwrap();
    Rig {
        _dir: dir,
        fake,
        deployer,
    }
}

fn spec(hash: &str) -> DeploymentSpec {
    let c = |name: &str| ContainerSpec {
        name: name.into(),
        image: "img:1".into(),
        stop_grace_seconds: 10,
        ..Default::default()
    };
    DeploymentSpec {
        name: "svc".into(),
        containers: vec![c("svc.db"), c("svc.app")],
        config_hash: hash.into(),
        ..Default::default()
    }
}

/// Runs an apply with `timeout` seconds of health timeout.
async fn apply(deployer: &Deployer<Fake>, spec: DeploymentSpec, timeout: u32) -> ApplyOutcome {
    let (events, mut seen) = mpsc::channel(1024);
    let drain = tokio::spawn(async move { while seen.recv().await.is_some() {} });
    let outcome = deployer
        .apply(
            ApplyRequest {
                spec: Some(spec),
                provided_secrets: Default::default(),
                health_timeout_seconds: timeout,
            },
            events,
        )
        .await;
    drain.await.unwrap();
    outcome
}

fn old_set(fake: &Fake) {
    fake.running("svc.db", "h0", "sha256:old", 0);
    fake.running("svc.app", "h0", "sha256:old", 1);
}

fn no_note(deployer: &Deployer<Fake>) -> bool {
    deployer
        .records
        .load("svc")
        .unwrap()
        .is_none_or(|r| r.in_progress.is_none())
}

#[tokio::test(start_paused = true)]
async fn a_container_never_ready_fails_at_its_timeout_and_the_previous_set_returns() {
    let r = rig();
    old_set(&r.fake);
    r.fake
        .state()
        .behaviour
        .insert("svc.app".into(), Behaviour::NeverReady);
    let started = tokio::time::Instant::now();
    let outcome = apply(&r.deployer, spec("h1"), 30).await;
    assert!(!outcome.success);
    assert!(outcome.rolled_back);
    assert!(
        outcome.error.contains("did not become ready within 30 s"),
        "{}",
        outcome.error
    );
    assert!(
        outcome
            .diagnostics
            .contains(&"svc.app: last words".to_owned())
    );
    // It waited the whole timeout (in paused time), not less.
    assert!(started.elapsed() >= std::time::Duration::from_secs(30));
    assert_eq!(
        r.fake.snapshot(),
        vec![
            ("svc.app".into(), "h0".into(), "running".into()),
            ("svc.db".into(), "h0".into(), "running".into()),
        ]
    );
    assert!(no_note(&r.deployer));
}

#[tokio::test(start_paused = true)]
async fn a_new_container_that_cannot_be_removed_is_never_started_as_the_old_one() {
    let r = rig();
    old_set(&r.fake);
    {
        let mut state = r.fake.state();
        state
            .behaviour
            .insert("svc.app".into(), Behaviour::NeverReady);
        state.refuse_remove = Some("svc.app".into());
    }
    let outcome = apply(&r.deployer, spec("h1"), 10).await;
    assert!(!outcome.success);
    // The old app stays aside rather than the failing new one being taken for it.
    assert!(
        r.fake
            .snapshot()
            .contains(&("svc.app.previous".into(), "h0".into(), "exited".into())),
        "{:?}",
        r.fake.snapshot()
    );
    // The note stays: recovery finishes once the Engine lets go.
    assert!(!no_note(&r.deployer));
    r.fake.state().refuse_remove = None;
    let recovered = r.deployer.recover_all().await;
    assert!(recovered[0].1.is_ok(), "{recovered:?}");
    assert_eq!(
        r.fake.snapshot(),
        vec![
            ("svc.app".into(), "h0".into(), "running".into()),
            ("svc.db".into(), "h0".into(), "running".into()),
        ]
    );
    assert!(no_note(&r.deployer));
}

#[tokio::test(start_paused = true)]
async fn a_crash_loop_fails_at_once_not_at_the_timeout() {
    let r = rig();
    r.fake
        .state()
        .behaviour
        .insert("svc.app".into(), Behaviour::CrashLoop);
    let started = tokio::time::Instant::now();
    let outcome = apply(&r.deployer, spec("h1"), 300).await;
    assert!(!outcome.success);
    assert!(outcome.error.contains("crash-looping"), "{}", outcome.error);
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    // A first deploy: nothing to restore, nothing left behind.
    assert!(!outcome.rolled_back);
    assert!(r.fake.snapshot().is_empty(), "{:?}", r.fake.snapshot());
    assert!(no_note(&r.deployer));
}

#[tokio::test(start_paused = true)]
async fn success_replaces_the_previous_set_in_order_and_ends_the_note() {
    let r = rig();
    old_set(&r.fake);
    let outcome = apply(&r.deployer, spec("h1"), 30).await;
    assert!(outcome.success, "{}", outcome.error);
    assert!(!outcome.unchanged);
    assert_eq!(
        r.fake.snapshot(),
        vec![
            ("svc.app".into(), "h1".into(), "running".into()),
            ("svc.db".into(), "h1".into(), "running".into()),
        ]
    );
    assert_eq!(
        r.fake.ops(),
        vec![
            "stop svc.app",
            "rename svc.app svc.app.previous",
            "stop svc.db",
            "rename svc.db svc.db.previous",
            "create svc.db",
            "start svc.db",
            "create svc.app",
            "start svc.app",
            "remove svc.db.previous",
            "remove svc.app.previous",
        ]
    );
    assert!(no_note(&r.deployer));
}

#[tokio::test(start_paused = true)]
async fn the_running_spec_again_touches_no_container() {
    let r = rig();
    r.fake.running("svc.db", "h1", "sha256:new", 0);
    r.fake.running("svc.app", "h1", "sha256:new", 1);
    let outcome = apply(&r.deployer, spec("h1"), 30).await;
    assert!(outcome.success && outcome.unchanged, "{}", outcome.error);
    assert!(r.fake.ops().is_empty(), "{:?}", r.fake.ops());
    // The image tag moved: that is a change.
    r.fake
        .state()
        .images
        .insert("img:1".into(), "sha256:newer".into());
    let outcome = apply(&r.deployer, spec("h1"), 30).await;
    assert!(outcome.success && !outcome.unchanged);
    assert!(r.fake.ops().contains(&"create svc.app".to_owned()));
}

#[tokio::test(start_paused = true)]
async fn an_apply_noted_but_not_ended_is_undone_at_start_up() {
    let r = rig();
    // The agent died after setting both aside and creating the new db.
    r.fake.running("svc.db.previous", "h0", "sha256:old", 0);
    r.fake.running("svc.app.previous", "h0", "sha256:old", 1);
    r.fake.running("svc.db", "h1", "sha256:new", 0);
    for b in r.fake.state().boxes.iter_mut().take(2) {
        b.state = "exited".into();
    }
    let record = record::DeploymentRecord {
        in_progress: Some(InProgress {
            previous: vec!["svc.db".into(), "svc.app".into()],
            created: vec!["svc.db".into()],
            committed: false,
        }),
        ..Default::default()
    };
    r.deployer.records.save("svc", &record).unwrap();
    // A deployment of someone else on the same Engine, not noted: untouched.
    r.fake.running("other.app.previous", "x", "sha256:old", 0);
    r.fake.state().boxes.last_mut().unwrap().deployment = "other".into();

    let recovered = r.deployer.recover_all().await;
    assert_eq!(recovered.len(), 1);
    assert_eq!(recovered[0].0, "svc");
    assert!(recovered[0].1.is_ok());
    assert_eq!(
        r.fake.snapshot(),
        vec![
            ("other.app.previous".into(), "x".into(), "running".into()),
            ("svc.app".into(), "h0".into(), "running".into()),
            ("svc.db".into(), "h0".into(), "running".into()),
        ]
    );
    assert!(no_note(&r.deployer));
    // Nothing left to do the second time.
    assert!(r.deployer.recover_all().await.is_empty());
}
