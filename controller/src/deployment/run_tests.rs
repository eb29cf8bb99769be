//! The deploy steps' failure paths against a fake agent and a fake PBX, with
//! the real SQLite store; waits run in paused time.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use imfleet_proto::agent::v1::{
    AgentPrivileges, ApplyEvent, ApplyOutcome, ContainerStatus, DeploymentStatus, HostInventory,
    ImageChunk, LoadedImage, PingReply,
};

use super::*;
use crate::agent_client::PingOutcome;
use crate::pbx::Secret;
use crate::progress::Progress;

/// How the fake agent's apply ends.
#[derive(Clone)]
enum Ending {
    Outcome(ApplyOutcome),
    /// The stream stays open and silent.
    Silent,
}

struct FakeAgent {
    revision: u32,
    roots: Vec<String>,
    inventory: HostInventory,
    ending: Ending,
    calls: Mutex<Vec<&'static str>>,
}

impl FakeAgent {
    fn new(ending: Ending) -> FakeAgent {
        FakeAgent {
            revision: imfleet_proto::PROTOCOL_REVISION,
            roots: vec!["/var/lib/portsip".into(), "/srv/im".into()],
            inventory: crate::preflight::tests::good_host(),
            ending,
            calls: Mutex::new(Vec::new()),
        }
    }
    fn called(&self, what: &'static str) {
        self.calls.lock().unwrap().push(what);
    }
    fn calls(&self) -> Vec<&'static str> {
        self.calls.lock().unwrap().clone()
    }
}

fn healthy() -> DeploymentStatus {
    DeploymentStatus {
        name: DEPLOYMENT_NAME.into(),
        containers: vec![ContainerStatus {
            name: "portsip.instantmessage".into(),
            state: "running".into(),
            health: "healthy".into(),
            image_id: "sha256:1m".into(),
            ..Default::default()
        }],
        healthy: true,
        config_hash: String::new(),
        applying: false,
    }
}

fn success(unchanged: bool) -> Ending {
    Ending::Outcome(ApplyOutcome {
        success: true,
        status: Some(healthy()),
        unchanged,
        ..Default::default()
    })
}

impl AgentApi for FakeAgent {
    async fn ping(&self) -> Result<PingOutcome, AgentError> {
        self.called("ping");
        Ok(PingOutcome {
            reply: PingReply {
                protocol_revision: self.revision,
                data_roots: self.roots.clone(),
                ..Default::default()
            },
            round_trip: Duration::from_millis(1),
            certificate_not_after: 0,
        })
    }
    async fn require(&self, feature: Feature) -> Result<(), AgentError> {
        feature
            .check(self.revision)
            .map_err(|need| AgentError::TooOld {
                address: "fake".into(),
                have: self.revision,
                need,
                what: feature.describe(),
            })
    }
    async fn status(&self, _: &str) -> Result<DeploymentStatus, AgentError> {
        self.called("status");
        Ok(DeploymentStatus::default())
    }
    async fn inventory(&self, _: Vec<String>, _: u32, _: u32) -> Result<HostInventory, AgentError> {
        self.called("inventory");
        Ok(self.inventory.clone())
    }
    async fn apply(
        &self,
        _: ApplyRequest,
    ) -> Result<BoxStream<'static, Result<ApplyEvent, AgentError>>, AgentError> {
        self.called("apply");
        let step = ApplyEvent {
            phase: "container portsip.instantmessage".into(),
            message: "starting".into(),
            outcome: None,
        };
        Ok(match self.ending.clone() {
            Ending::Outcome(outcome) => futures::stream::iter([
                Ok(step),
                Ok(ApplyEvent {
                    outcome: Some(outcome),
                    ..Default::default()
                }),
            ])
            .boxed(),
            Ending::Silent => futures::stream::iter([Ok(step)])
                .chain(futures::stream::pending())
                .boxed(),
        })
    }
    async fn load_image(
        &self,
        _: tokio_stream::wrappers::ReceiverStream<ImageChunk>,
    ) -> Result<LoadedImage, AgentError> {
        self.called("load_image");
        Ok(LoadedImage::default())
    }
}

#[derive(Default)]
struct FakePbx {
    /// What the PBX shows after an update (None: what was set).
    shows: Option<ImAddresses>,
    set: Mutex<Option<ImAddresses>>,
    calls: Mutex<Vec<&'static str>>,
}

impl FakePbx {
    fn calls(&self) -> Vec<&'static str> {
        self.calls.lock().unwrap().clone()
    }
}

impl PbxApi for FakePbx {
    async fn im_token(&self) -> Result<Secret, PbxError> {
        self.calls.lock().unwrap().push("im_token");
        Ok(Secret::new("pbx-token"))
    }
    async fn generate_im_token(&self) -> Result<Secret, PbxError> {
        self.calls.lock().unwrap().push("generate_im_token");
        Ok(Secret::new("new-token"))
    }
    async fn ensure_whitelisted(&self, ip: IpAddr, _: &str) -> Result<Whitelisted, PbxError> {
        self.calls.lock().unwrap().push("whitelist");
        Ok(Whitelisted {
            cidr: format!("{ip}/32"),
            id: "1".into(),
            created: true,
        })
    }
    async fn set_im_addresses(&self, addresses: &ImAddresses) -> Result<(), PbxError> {
        self.calls.lock().unwrap().push("set_im_addresses");
        *self.set.lock().unwrap() = Some(addresses.clone());
        Ok(())
    }
    async fn im_addresses(&self) -> Result<ImAddresses, PbxError> {
        self.calls.lock().unwrap().push("im_addresses");
        Ok(self
            .shows
            .clone()
            .or_else(|| self.set.lock().unwrap().clone())
            .unwrap_or_default())
    }
}

fn request(force: bool, token: TokenSource) -> DeployRequest {
    let preflight = crate::preflight::tests::params();
    DeployRequest {
        host: "im1".into(),
        params: PortsipParams {
            private_ip: preflight.private_ip,
            public_ip: preflight.public_ip,
            pbx: "10.0.0.2".parse().unwrap(),
            data_path: "/var/lib/portsip".into(),
            storage_dir: Some("/srv/im".into()),
            image: "portsip/pbx:22".into(),
            db_image: "portsip/postgresql:14.12".into(),
            stop_grace_seconds: 30,
        },
        preflight,
        token,
        pbx: None,
        force,
        health_timeout: Duration::from_secs(5),
        image_files: Vec::new(),
    }
}

fn given() -> TokenSource {
    TokenSource::Given(ImToken::parse("operator-token").unwrap())
}

async fn store() -> (tempfile::TempDir, Store) {
    let (dir, store) = crate::store::tests::open();
    store
        .upsert_host(&crate::store::tests::host("im1", "192.168.1.20"))
        .await
        .unwrap();
    (dir, store)
}

fn recorder() -> (Arc<Mutex<Vec<Progress>>>, Reporter) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = {
        let seen = seen.clone();
        Arc::new(move |e: Progress| seen.lock().unwrap().push(e)) as Arc<dyn ProgressSink>
    };
    (seen, Reporter::new(sink, "im1"))
}

#[tokio::test]
async fn an_agent_too_old_is_refused_before_the_pbx_or_the_host_changes() {
    let (_dir, store) = store().await;
    let mut agent = FakeAgent::new(success(false));
    agent.revision = 6;
    let pbx = FakePbx::default();
    let (_, progress) = recorder();
    let req = request(true, TokenSource::FromPbx);
    let err = deploy_with(&store, &agent, &req, Some(&pbx), &progress)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            DeployError::Agent(AgentError::TooOld {
                have: 6,
                need: 7,
                ..
            })
        ),
        "{err}"
    );
    assert!(err.to_string().contains("controller bootstrap"), "{err}");
    assert!(pbx.calls().is_empty());
    assert_eq!(agent.calls(), vec!["ping"]);
}

#[tokio::test]
async fn a_host_an_active_rollout_holds_is_not_deployed_to() {
    let (_dir, store) = store().await;
    let step = crate::store::PlannedStep {
        host: "im1".into(),
        batch: 0,
        canary: false,
        from_revision: None,
    };
    store
        .begin_rollout("pbx01:1", serde_json::json!({}), vec![step])
        .await
        .unwrap();
    let agent = FakeAgent::new(success(false));
    let pbx = FakePbx::default();
    let (_, progress) = recorder();
    let req = request(true, TokenSource::FromPbx);
    let err = deploy_with(&store, &agent, &req, Some(&pbx), &progress)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("controller upgrade --abort"),
        "{err}"
    );
    assert!(pbx.calls().is_empty());
    assert!(agent.calls().is_empty());
}

#[tokio::test]
async fn directories_outside_the_agents_roots_stop_everything() {
    let (_dir, store) = store().await;
    let mut agent = FakeAgent::new(success(false));
    agent.roots = vec!["/var/lib/portsip".into()];
    let pbx = FakePbx::default();
    let (_, progress) = recorder();
    let err = deploy_with(
        &store,
        &agent,
        &request(true, given()),
        Some(&pbx),
        &progress,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, DeployError::OutsideRoots { .. }), "{err}");
    assert!(pbx.calls().is_empty());
    assert!(!agent.calls().contains(&"apply"));
}

#[tokio::test]
async fn failed_preflight_whitelists_nothing_uploads_nothing_applies_nothing() {
    let (_dir, store) = store().await;
    let mut agent = FakeAgent::new(success(false));
    agent.inventory.agent = Some(AgentPrivileges {
        uid: 1000,
        user: "pbx".into(),
        root: false,
    });
    let pbx = FakePbx::default();
    let (_, progress) = recorder();
    // Even a request for a new token rotates nothing when preflight fails.
    let mut req = request(false, TokenSource::NewFromPbx);
    req.image_files = vec!["/nonexistent/im.tar".into()];
    let err = deploy_with(&store, &agent, &req, Some(&pbx), &progress)
        .await
        .unwrap_err();
    match &err {
        DeployError::PreflightFailed { checks, .. } => assert!(
            checks
                .iter()
                .any(|c| c.id == "agent.privileges" && c.verdict == Verdict::Fail)
        ),
        other => panic!("{other}"),
    }
    assert!(pbx.calls().is_empty(), "{:?}", pbx.calls());
    assert!(!agent.calls().contains(&"apply") && !agent.calls().contains(&"load_image"));
    assert!(store.deployment("im1").await.unwrap().is_none());
    assert!(store.revisions("im1", 10).await.unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_silent_apply_ends_at_its_deadline_and_is_recorded_as_failed() {
    let (_dir, store) = store().await;
    let agent = FakeAgent::new(Ending::Silent);
    let (_, progress) = recorder();
    let req = request(true, given());
    let started = tokio::time::Instant::now();
    let err = deploy_with(&store, &agent, &req, None::<&FakePbx>, &progress)
        .await
        .unwrap_err();
    assert!(matches!(err, DeployError::NoOutcome(_)), "{err}");
    // It waited (in paused time) for the whole computed deadline, no less.
    let spec = portsip::portsip_spec(&req.params, "x");
    assert!(started.elapsed() >= crate::agent_client::apply_deadline(&spec, 5));
    let revisions = store.revisions("im1", 10).await.unwrap();
    assert_eq!(revisions.len(), 1);
    assert_eq!(revisions[0].outcome, Outcome::Failed);
}

#[tokio::test]
async fn a_rolled_back_apply_keeps_the_recorded_deployment_and_skips_the_pbx() {
    let (_dir, store) = store().await;
    let agent = FakeAgent::new(Ending::Outcome(ApplyOutcome {
        success: false,
        error: "container portsip.instantmessage did not become ready".into(),
        diagnostics: vec!["last words".into()],
        rolled_back: true,
        ..Default::default()
    }));
    let pbx = FakePbx::default();
    let (_, progress) = recorder();
    let err = deploy_with(
        &store,
        &agent,
        &request(true, given()),
        Some(&pbx),
        &progress,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            err,
            DeployError::Apply {
                rolled_back: true,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("previous deployment was restored"));
    assert_eq!(pbx.calls(), vec!["whitelist", "whitelist"]);
    assert!(store.deployment("im1").await.unwrap().is_none());
    let revisions = store.revisions("im1", 10).await.unwrap();
    assert_eq!(revisions[0].outcome, Outcome::RolledBack);
    assert!(revisions[0].detail.contains("did not become ready"));
}

#[tokio::test]
async fn success_claimed_with_a_sick_container_is_a_failure() {
    let (_dir, store) = store().await;
    let mut sick = healthy();
    sick.healthy = false;
    sick.containers[0].health = "unhealthy".into();
    let agent = FakeAgent::new(Ending::Outcome(ApplyOutcome {
        success: true,
        status: Some(sick),
        ..Default::default()
    }));
    let (_, progress) = recorder();
    let err = deploy_with(
        &store,
        &agent,
        &request(true, given()),
        None::<&FakePbx>,
        &progress,
    )
    .await
    .unwrap_err();
    match err {
        DeployError::Apply { diagnostics, .. } => {
            assert_eq!(
                diagnostics,
                vec!["portsip.instantmessage: running (unhealthy)"]
            )
        }
        other => panic!("{other}"),
    }
}

#[tokio::test]
async fn the_pbx_must_list_the_addresses_it_was_given() {
    let (_dir, store) = store().await;
    let agent = FakeAgent::new(success(false));
    let pbx = FakePbx {
        shows: Some(ImAddresses::default()),
        ..Default::default()
    };
    let (_, progress) = recorder();
    let err = deploy_with(
        &store,
        &agent,
        &request(true, given()),
        Some(&pbx),
        &progress,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, DeployError::NotRegistered { .. }), "{err}");
    // The host runs the new spec all the same: it is recorded.
    let revisions = store.revisions("im1", 10).await.unwrap();
    assert_eq!(revisions[0].outcome, Outcome::Applied);
    assert!(store.deployment("im1").await.unwrap().is_some());
}

#[tokio::test]
async fn a_new_token_comes_from_the_pbx_and_the_same_spec_again_is_unchanged() {
    let (_dir, store) = store().await;
    let agent = FakeAgent::new(success(true));
    let pbx = FakePbx::default();
    let (seen, progress) = recorder();
    let report = deploy_with(
        &store,
        &agent,
        &request(true, TokenSource::NewFromPbx),
        Some(&pbx),
        &progress,
    )
    .await
    .unwrap();
    assert!(report.unchanged);
    assert!(report.pbx.as_ref().unwrap().token_from_pbx);
    assert_eq!(
        pbx.calls(),
        vec![
            "whitelist",
            "whitelist",
            "generate_im_token",
            "set_im_addresses",
            "im_addresses"
        ]
    );
    assert_eq!(
        report.deployment.image_ids.get("portsip.instantmessage"),
        Some(&"sha256:1m".to_owned())
    );
    let revisions = store.revisions("im1", 10).await.unwrap();
    assert_eq!(revisions[0].outcome, Outcome::Unchanged);
    assert_eq!(
        store.deployment("im1").await.unwrap().unwrap(),
        report.deployment
    );
    // Phases in order, and the agent's container step as a container event.
    let started: Vec<Phase> = seen
        .lock()
        .unwrap()
        .iter()
        .filter_map(|e| match e {
            Progress::PhaseStarted { phase, .. } => Some(*phase),
            _ => None,
        })
        .collect();
    assert_eq!(
        started,
        vec![
            Phase::Preflight,
            Phase::Whitelist,
            Phase::Whitelist,
            Phase::ImToken,
            Phase::Apply,
            Phase::Register
        ]
    );
    assert!(seen.lock().unwrap().iter().any(|e| matches!(
        e,
        Progress::Container { container, state, .. }
            if container == "portsip.instantmessage" && state == "starting"
    )));
}
