//! Starting, resuming and aborting rollouts: one process at a time (a lock
//! in the state directory), every check before anything is recorded; the
//! driving itself is `driver.rs`. Any error that is not a host's own
//! outcome stops a rollout with it left active for `--resume`.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions, TryLockError};
use std::path::Path;
use std::time::Duration;

use super::credentials::{self, Credentials};
use super::decide::{Observed, Runs, Step, is_failure, reexamine};
use super::driver::Driver;
use super::host::HostTarget;
use super::plan::{self, RolloutPlan};
use super::{EventSink, RolloutError, RolloutEvent, RolloutParams, UpgradeRequest};
use crate::deployment::{DEPLOYMENT_NAME, TokenSource};
use crate::fleet::Fleet;
use crate::pbx::{PbxClient, PbxOptions};
use crate::state::ControllerState;
use crate::store::{Rollout, RolloutState, StepPhase, StoreError};

/// Held by the process driving a rollout, in the state's `run/` directory.
pub const LOCK_FILE: &str = "rollout.lock";
/// How often the driver re-reads the record while tasks run.
pub(super) const RECHECK: Duration = Duration::from_secs(1);

/// How a rollout stands when the command ends.
pub type RolloutOutcome = Rollout;

/// The lock of the process driving rollouts.
struct RolloutLock(#[allow(dead_code)] File);

fn try_lock(run_dir: &Path) -> Result<Option<RolloutLock>, RolloutError> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| RolloutError::Io { path, source }
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(run_dir)
        .map_err(io(run_dir))?;
    let path = run_dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(io(&path))?;
    match file.try_lock() {
        Ok(()) => Ok(Some(RolloutLock(file))),
        Err(TryLockError::WouldBlock) => Ok(None),
        Err(TryLockError::Error(e)) => Err(io(&path)(e)),
    }
}

/// Whether a process (this one included) drives a rollout right now.
pub fn is_driven(run_dir: &Path) -> Result<bool, RolloutError> {
    Ok(try_lock(run_dir)?.is_none())
}

/// `host:pid` of this process, recorded as the rollout's holder.
fn holder() -> String {
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "controller".into());
    format!("{host}:{}", std::process::id())
}

async fn lock_or_busy(state: &ControllerState) -> Result<RolloutLock, RolloutError> {
    match try_lock(&state.run_dir())? {
        Some(lock) => Ok(lock),
        None => match state.store.active_rollout().await? {
            Some(active) => Err(RolloutError::Busy {
                id: active.id,
                holder: active.holder,
            }),
            None => Err(RolloutError::Starting),
        },
    }
}

async fn login(options: Option<PbxOptions>) -> Result<Option<PbxClient>, RolloutError> {
    Ok(match options {
        Some(options) => Some(PbxClient::login(options).await?),
        None => None,
    })
}

/// The plan for `request`, every host checked; nothing changes.
pub async fn dry_run(
    state: &ControllerState,
    request: &UpgradeRequest,
) -> Result<RolloutPlan, RolloutError> {
    let fleet = Fleet::new(state);
    let hosts = fleet.resolve(&request.selection).await?;
    Ok(plan::prepare(&fleet, &hosts, request).await?.0)
}

/// Starts a rollout: checks everything, records the plan, drives it.
pub async fn upgrade(
    state: &ControllerState,
    request: UpgradeRequest,
    events: EventSink,
) -> Result<RolloutOutcome, RolloutError> {
    let _lock = lock_or_busy(state).await?;
    let store = &state.store;
    if let Some(active) = store.active_rollout().await? {
        return Err(StoreError::RolloutActive {
            id: active.id,
            holder: active.holder,
            started_at: active.created_at,
        }
        .into());
    }
    let fleet = Fleet::new(state);
    let hosts = fleet.resolve(&request.selection).await?;
    // The PBX first: an unreachable PBX or bad credentials stop everything.
    let pbx = login(request.pbx.clone()).await?;
    let result = async {
        let (plan, targets) = plan::prepare(&fleet, &hosts, &request).await?;
        let params = RolloutParams {
            image: plan.image.clone(),
            db_image: request.db_image.clone(),
            image_files: request.image_files.clone(),
            limits: request.limits,
            timing: request.timing,
            stop_grace_seconds: request.stop_grace_seconds,
            pbx_api: pbx.is_some(),
        };
        let id = store
            .begin_rollout(&holder(), params_json(&params), plan.steps())
            .await?;
        let given = Credentials {
            token: match &request.token {
                TokenSource::Given(token) => Some(token.clone()),
                _ => None,
            },
            pbx: request.pbx.clone(),
        };
        credentials::save(state.dir(), id, &given)?;
        events(RolloutEvent::Started {
            rollout: id,
            resumed: false,
            state: RolloutState::Running,
            hosts: plan.lines.clone(),
        });
        Driver::new(&fleet, id, &params, targets, &events, pbx.as_ref())
            .run(&request.token)
            .await
    }
    .await;
    if let Some(pbx) = pbx {
        pbx.logout().await;
    }
    forget_if_ended(state, &result);
    result
}

/// Drops the kept credentials once the rollout has ended.
fn forget_if_ended(state: &ControllerState, result: &Result<RolloutOutcome, RolloutError>) {
    if matches!(result, Ok(rollout) if !rollout.state.is_active()) {
        credentials::forget(state.dir());
    }
}

/// The credentials to go on with: each of those given, else the one kept
/// when the rollout started. Kept (by [`keep`]) only once they worked.
fn credentials_for(
    state: &ControllerState,
    rollout: &Rollout,
    given: Credentials,
) -> Result<Credentials, RolloutError> {
    let kept = credentials::load(state.dir(), rollout.id)?.unwrap_or_default();
    let merged = Credentials {
        token: given.token.or(kept.token),
        pbx: given.pbx.or(kept.pbx),
    };
    if merged.token.is_none() && merged.pbx.is_none() {
        return Err(RolloutError::Token(format!(
            "rollout {} kept no token (it was started by an older controller): pass --token-file with the token it was started with, or --pbx-api to read it back from the PBX. Do not generate a new one now: that revokes the token the upgraded hosts run",
            rollout.id
        )));
    }
    Ok(merged)
}

/// Keeps what a resume or abort went on with (the PBX accepted the login).
fn keep(
    state: &ControllerState,
    rollout: &Rollout,
    used: &Credentials,
) -> Result<(), RolloutError> {
    Ok(credentials::save(state.dir(), rollout.id, used)?)
}

fn params_json(params: &RolloutParams) -> serde_json::Value {
    serde_json::to_value(params).unwrap_or_default()
}

/// The token for resuming or aborting: given, or from the PBX: a new one
/// while no host has been swapped yet (none was made), else its current one
/// (the one the rollout made).
fn later_token(
    credentials: &Credentials,
    rollout: &Rollout,
    params: &RolloutParams,
) -> Result<TokenSource, RolloutError> {
    let pbx = credentials.pbx.is_some();
    let token = credentials.token_source().unwrap_or(TokenSource::FromPbx);
    if params.pbx_api && !pbx {
        return Err(RolloutError::Usage(format!(
            "rollout {} was started with --pbx-api: give it again (and the PBX password) so hosts are registered and the token read back",
            rollout.id
        )));
    }
    let untouched = rollout.steps.iter().all(|s| {
        matches!(
            s.phase,
            StepPhase::Pending | StepPhase::Staging | StepPhase::Staged
        )
    });
    match token {
        TokenSource::Given(_) => Ok(token),
        _ if pbx && untouched && rollout.state != RolloutState::Aborting => {
            Ok(TokenSource::NewFromPbx)
        }
        _ if pbx => Ok(TokenSource::FromPbx),
        _ => Err(RolloutError::Token(
            "going on with a rollout needs the token it installs; pass --token-file, or --pbx-api to read it from the PBX".into(),
        )),
    }
}

/// Goes on with the active rollout where it stopped. A rollout stopped by
/// its failure budget goes on with the failures so far accepted.
pub async fn resume(
    state: &ControllerState,
    given: Credentials,
    events: EventSink,
) -> Result<RolloutOutcome, RolloutError> {
    let _lock = lock_or_busy(state).await?;
    let store = &state.store;
    let active = store
        .active_rollout()
        .await?
        .ok_or(RolloutError::NoActive("resume"))?;
    let mut params = recorded_params(&active)?;
    let credentials = credentials_for(state, &active, given)?;
    let token = later_token(&credentials, &active, &params)?;
    // The PBX first: a wrong password changes nothing.
    let pbx = login(credentials.pbx.clone()).await?;
    keep(state, &active, &credentials)?;
    if active.state == RolloutState::Paused {
        let phases: Vec<Step> = steps_of(&active);
        params.limits.accepted_failures =
            phases.iter().filter(|s| is_failure(s.phase)).count() as u32;
        params.limits.accepted_canary_failures = phases
            .iter()
            .filter(|s| s.canary && is_failure(s.phase))
            .count() as u32;
        store
            .set_rollout_params(active.id, params_json(&params))
            .await?;
        let moved = store
            .move_rollout(
                active.id,
                only(RolloutState::Paused),
                RolloutState::Running,
                "resumed",
            )
            .await?;
        if !moved {
            if let Some(pbx) = pbx {
                pbx.logout().await;
            }
            return Err(RolloutError::Usage(format!(
                "rollout {} changed while resuming (an --abort?); see `controller rollouts`",
                active.id
            )));
        }
    }
    go_on(state, &active, &params, &token, pbx, &events, true).await
}

/// Drives `rollout` on (hosts recorded failed looked at again first when
/// `reexamine`), then closes the PBX session.
async fn go_on(
    state: &ControllerState,
    rollout: &Rollout,
    params: &RolloutParams,
    token: &TokenSource,
    pbx: Option<PbxClient>,
    events: &EventSink,
    reexamine: bool,
) -> Result<RolloutOutcome, RolloutError> {
    let result = async {
        let fleet = Fleet::new(state);
        let targets = targets_of(&fleet, rollout, params).await?;
        events(started(rollout, &targets, true));
        if reexamine {
            reexamine_failed(&fleet, rollout, &targets, events).await?;
        }
        Driver::new(&fleet, rollout.id, params, targets, events, pbx.as_ref())
            .run(token)
            .await
    }
    .await;
    if let Some(pbx) = pbx {
        pbx.logout().await;
    }
    forget_if_ended(state, &result);
    result
}

/// Looks again at the hosts recorded failed: the host, not the record, says
/// where each stands. What a host runs is told by the configuration its
/// current deployment record holds (the last apply that succeeded there).
async fn reexamine_failed(
    fleet: &Fleet,
    rollout: &Rollout,
    targets: &[HostTarget],
    events: &EventSink,
) -> Result<(), RolloutError> {
    for step in rollout
        .steps
        .iter()
        .filter(|s| s.phase == StepPhase::Failed)
    {
        let Some(target) = targets.iter().find(|t| t.host == step.host) else {
            continue;
        };
        let host = fleet.host(&step.host).await?;
        let Ok(agent) = fleet.connect(&host).await else {
            continue;
        };
        let (Ok(status), Some(current)) = (
            agent.status(DEPLOYMENT_NAME).await,
            fleet.store().deployment(&step.host).await?,
        ) else {
            continue;
        };
        let same_images = |r: &crate::store::DeploymentRecord| {
            current.image == r.image && current.db_image == r.db_image
        };
        let runs = if status.applying || status.config_hash != current.config_hash {
            Runs::Other
        } else if same_images(&target.to) && !same_images(&target.from) {
            Runs::Target
        } else if same_images(&target.from) && !same_images(&target.to) {
            Runs::Previous
        } else {
            Runs::Other
        };
        let phase = reexamine(Observed {
            runs,
            healthy: status.healthy && !status.applying,
        });
        if phase != StepPhase::Failed {
            let detail = format!("looked at again: {}", step.detail);
            fleet
                .store()
                .set_step(rollout.id, &step.host, phase, None, &detail)
                .await?;
            events(RolloutEvent::Step {
                rollout: rollout.id,
                host: step.host.clone(),
                phase,
                detail,
                ended: rollout.steps.iter().filter(|s| s.phase.has_ended()).count(),
                total: rollout.steps.len(),
            });
        }
    }
    Ok(())
}

/// Rolls back every host the active rollout changed, under its parallelism
/// limit. When another process drives the rollout, it is told (through the
/// record) and this one follows until the rollout ends.
pub async fn abort(
    state: &ControllerState,
    given: Credentials,
    events: EventSink,
) -> Result<RolloutOutcome, RolloutError> {
    let store = &state.store;
    let active = store
        .active_rollout()
        .await?
        .ok_or(RolloutError::NoActive("abort"))?;
    let credentials = credentials_for(state, &active, given)?;
    let token = later_token(&credentials, &active, &recorded_params(&active)?)?;
    let _lock = match try_lock(&state.run_dir())? {
        Some(lock) => lock,
        None => {
            if !store
                .move_rollout(
                    active.id,
                    RolloutState::ACTIVE,
                    RolloutState::Aborting,
                    "abort requested",
                )
                .await?
            {
                return store
                    .rollout(active.id)
                    .await?
                    .ok_or(RolloutError::NoActive("abort"));
            }
            match follow(state, active.id, &events).await? {
                Followed::Ended(rollout) => return Ok(rollout),
                // The driving process went away mid-abort: this one goes on.
                Followed::Orphaned(lock) => lock,
            }
        }
    };
    // Read again under the lock: the process that held it may have ended it.
    let active = store
        .active_rollout()
        .await?
        .ok_or(RolloutError::NoActive("abort"))?;
    let params = recorded_params(&active)?;
    let pbx = login(credentials.pbx.clone()).await?;
    keep(state, &active, &credentials)?;
    store
        .move_rollout(
            active.id,
            RolloutState::ACTIVE,
            RolloutState::Aborting,
            "abort requested",
        )
        .await?;
    go_on(state, &active, &params, &token, pbx, &events, false).await
}

fn recorded_params(rollout: &Rollout) -> Result<RolloutParams, RolloutError> {
    serde_json::from_value(rollout.params.clone()).map_err(|_| {
        StoreError::Corrupt {
            what: "rollout parameters",
            value: rollout.params.to_string(),
        }
        .into()
    })
}

pub(super) fn steps_of(rollout: &Rollout) -> Vec<Step> {
    rollout
        .steps
        .iter()
        .map(|s| Step {
            host: s.host.clone(),
            canary: s.canary,
            phase: s.phase,
        })
        .collect()
}

async fn targets_of(
    fleet: &Fleet,
    rollout: &Rollout,
    params: &RolloutParams,
) -> Result<Vec<HostTarget>, RolloutError> {
    let mut targets = Vec::new();
    for step in &rollout.steps {
        let host = fleet.host(&step.host).await?;
        let from = step
            .from_revision
            .ok_or_else(|| RolloutError::NotDeployed(step.host.clone()))?;
        targets.push(
            HostTarget::load(
                fleet.store(),
                &host,
                Some(from),
                params.image.as_deref(),
                params.db_image.as_deref(),
            )
            .await?,
        );
    }
    Ok(targets)
}

fn started(rollout: &Rollout, targets: &[HostTarget], resumed: bool) -> RolloutEvent {
    RolloutEvent::Started {
        rollout: rollout.id,
        resumed,
        state: rollout.state,
        hosts: rollout
            .steps
            .iter()
            .zip(targets)
            .map(|(s, t)| super::PlanLine::of(t, s.batch, s.canary))
            .collect(),
    }
}

/// How following another process's rollout ended.
enum Followed {
    Ended(Rollout),
    /// That process is gone (its lock is free, and now held here).
    Orphaned(RolloutLock),
}

/// Reports a rollout another process drives until it ends, or until that
/// process is gone.
async fn follow(
    state: &ControllerState,
    id: i64,
    events: &EventSink,
) -> Result<Followed, RolloutError> {
    let store = &state.store;
    let mut seen: BTreeMap<String, (StepPhase, String)> = BTreeMap::new();
    loop {
        let rollout = store
            .rollout(id)
            .await?
            .ok_or(RolloutError::NoActive("follow"))?;
        let total = rollout.steps.len();
        let ended = rollout.steps.iter().filter(|s| s.phase.has_ended()).count();
        for step in &rollout.steps {
            let now = (step.phase, step.detail.clone());
            if seen.get(&step.host) != Some(&now) {
                events(RolloutEvent::Step {
                    rollout: id,
                    host: step.host.clone(),
                    phase: step.phase,
                    detail: step.detail.clone(),
                    ended,
                    total,
                });
                seen.insert(step.host.clone(), now);
            }
        }
        if !rollout.state.is_active() {
            return Ok(Followed::Ended(rollout));
        }
        if let Some(lock) = try_lock(&state.run_dir())? {
            // It may have ended just before letting go of the lock.
            let now = store
                .rollout(id)
                .await?
                .ok_or(RolloutError::NoActive("follow"))?;
            return Ok(if now.state.is_active() {
                Followed::Orphaned(lock)
            } else {
                Followed::Ended(now)
            });
        }
        tokio::time::sleep(RECHECK).await;
    }
}

pub(super) fn only(state: RolloutState) -> &'static [RolloutState] {
    match state {
        RolloutState::Running => &[RolloutState::Running],
        RolloutState::Aborting => &[RolloutState::Aborting],
        RolloutState::Paused => &[RolloutState::Paused],
        _ => &[],
    }
}
