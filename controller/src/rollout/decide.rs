//! The rollout's decisions as pure functions over observed state (brupop's
//! state machine is the model): the plan, what to do next given every host's
//! phase, and what an interrupted host's phase really is once looked at.
//! The driver (`run.rs`) observes, asks, acts and records; nothing here
//! touches a host or the store.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::store::{RolloutState, StepPhase};

/// The operator's limits, as recorded with the rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Hosts out of service at once, rollbacks included (at least 1).
    pub max_parallel: u32,
    /// Failed hosts tolerated before the rollout stops.
    pub max_failures: u32,
    pub auto_rollback: bool,
    /// Failures the operator accepted by resuming a stopped rollout: only
    /// failures beyond them count against the budget.
    #[serde(default)]
    pub accepted_failures: u32,
    #[serde(default)]
    pub accepted_canary_failures: u32,
}

/// One host as the decision sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub host: String,
    pub canary: bool,
    pub phase: StepPhase,
}

/// What the driver does next. Each names one host, except `Finish`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Put the new images on the host (it keeps serving).
    Stage(String),
    /// The host was mid-swap when the controller stopped: look before acting.
    Observe(String),
    /// Swap to the new version, then verify.
    Upgrade(String),
    /// It runs the new version: verify it stays healthy long enough.
    Verify(String),
    /// Restore the previous version.
    RollBack(String),
    /// Nothing is left to do: the rollout ends in this state.
    Finish(RolloutState, String),
}

/// Phases in which a host serves neither version for sure. A failed host
/// counts: it holds its slot until someone looks at it.
pub fn out_of_service(phase: StepPhase) -> bool {
    matches!(
        phase,
        StepPhase::Swapping | StepPhase::Verifying | StepPhase::RollingBack | StepPhase::Failed
    )
}

pub fn is_failure(phase: StepPhase) -> bool {
    matches!(phase, StepPhase::RolledBack | StepPhase::Failed)
}

/// The batch each host of a new rollout is in, in the order given: the
/// canaries first (batch 0, when there are any), then waves of
/// `max_parallel`. Execution is a sliding window, so batches say only
/// "no sooner than".
pub fn batches(hosts: usize, canaries: usize, max_parallel: u32) -> Vec<(u32, bool)> {
    let width = max_parallel.max(1) as usize;
    let canaries = canaries.min(hosts);
    let first = u32::from(canaries > 0);
    (0..hosts)
        .map(|i| {
            if i < canaries {
                (0, true)
            } else {
                (first + ((i - canaries) / width) as u32, false)
            }
        })
        .collect()
}

/// Why a running rollout must stop starting hosts, if it must.
pub fn stop_reason(limits: &Limits, steps: &[Step]) -> Option<String> {
    let failures = steps.iter().filter(|s| is_failure(s.phase)).count() as u32;
    let canary_failures = steps
        .iter()
        .filter(|s| s.canary && is_failure(s.phase))
        .count() as u32;
    if canary_failures > limits.accepted_canary_failures {
        return Some(format!(
            "{canary_failures} canary host(s) failed; the rest was not touched"
        ));
    }
    let counted = failures.saturating_sub(limits.accepted_failures);
    (counted > limits.max_failures).then(|| {
        format!(
            "{counted} host(s) failed, more than --max-failures {}",
            limits.max_failures
        )
    })
}

/// The next actions for a rollout in `state`. `busy` are hosts a task is
/// working on now; `tried` are hosts whose rollback already ended during
/// this run (never retried in a loop). Only `Running` and `Aborting`
/// rollouts act; any other state yields nothing.
pub fn decide(
    state: RolloutState,
    limits: &Limits,
    steps: &[Step],
    busy: &BTreeSet<String>,
    tried: &BTreeSet<String>,
) -> Vec<Action> {
    match state {
        RolloutState::Running => forward(limits, steps, busy),
        RolloutState::Aborting => abort(limits, steps, busy, tried),
        _ => Vec::new(),
    }
}

/// Slots left under `max_parallel`. A busy host still shown serving has a
/// swap or rollback on its way (the task records its phase when it runs),
/// so it counts as down already.
fn free_slots(limits: &Limits, steps: &[Step], busy: &BTreeSet<String>) -> u32 {
    let down = steps
        .iter()
        .filter(|s| {
            out_of_service(s.phase)
                || (busy.contains(&s.host)
                    && matches!(s.phase, StepPhase::Staged | StepPhase::Done))
        })
        .count() as u32;
    limits.max_parallel.max(1).saturating_sub(down)
}

/// A host that stopped mid-way, not being worked on, is taken up again
/// first; it already holds its slot.
fn continuation(step: &Step, aborting: bool) -> Option<Action> {
    let host = step.host.clone();
    match step.phase {
        StepPhase::Swapping => Some(Action::Observe(host)),
        StepPhase::Verifying if aborting => Some(Action::RollBack(host)),
        StepPhase::Verifying => Some(Action::Verify(host)),
        StepPhase::RollingBack => Some(Action::RollBack(host)),
        _ => None,
    }
}

fn forward(limits: &Limits, steps: &[Step], busy: &BTreeSet<String>) -> Vec<Action> {
    let idle = |s: &&Step| !busy.contains(&s.host);
    // Every image is on every host before any host is touched.
    if steps
        .iter()
        .any(|s| matches!(s.phase, StepPhase::Pending | StepPhase::Staging))
    {
        return steps
            .iter()
            .filter(idle)
            .filter(|s| matches!(s.phase, StepPhase::Pending | StepPhase::Staging))
            .map(|s| Action::Stage(s.host.clone()))
            .collect();
    }
    let mut actions: Vec<Action> = steps
        .iter()
        .filter(idle)
        .filter_map(|s| continuation(s, false))
        .collect();
    let stop = stop_reason(limits, steps);
    if stop.is_none() {
        let canaries_open = steps.iter().any(|s| s.canary && !s.phase.has_ended());
        let mut slots = free_slots(limits, steps, busy);
        for step in steps.iter().filter(idle) {
            if slots == 0 {
                break;
            }
            if step.phase == StepPhase::Staged && (step.canary || !canaries_open) {
                actions.push(Action::Upgrade(step.host.clone()));
                slots -= 1;
            }
        }
    }
    if !actions.is_empty() || !busy.is_empty() {
        return actions;
    }
    // Idle with nothing to start: the rollout is over, one way or another.
    let failed: Vec<&str> = steps
        .iter()
        .filter(|s| is_failure(s.phase))
        .map(|s| s.host.as_str())
        .collect();
    let untouched = steps.iter().any(|s| s.phase == StepPhase::Staged);
    // Stopped with hosts left: paused for the operator; with none left the
    // rollout is simply over.
    if let (Some(reason), true) = (stop, untouched) {
        return vec![Action::Finish(RolloutState::Paused, reason)];
    }
    if untouched {
        return vec![Action::Finish(
            RolloutState::Paused,
            format!(
                "failed host(s) {} hold every slot of --max-parallel {}",
                failed.join(", "),
                limits.max_parallel
            ),
        )];
    }
    if failed.is_empty() {
        vec![Action::Finish(
            RolloutState::Succeeded,
            format!("{} host(s) upgraded", steps.len()),
        )]
    } else {
        vec![Action::Finish(
            RolloutState::Failed,
            format!(
                "{} of {} host(s) upgraded; failed: {}",
                steps.len() - failed.len(),
                steps.len(),
                failed.join(", ")
            ),
        )]
    }
}

fn abort(
    limits: &Limits,
    steps: &[Step],
    busy: &BTreeSet<String>,
    tried: &BTreeSet<String>,
) -> Vec<Action> {
    let idle = |s: &&Step| !busy.contains(&s.host);
    let mut actions: Vec<Action> = steps
        .iter()
        .filter(idle)
        .filter_map(|s| continuation(s, true))
        .collect();
    // A failed host holds a slot already; its rollback is tried once.
    actions.extend(
        steps
            .iter()
            .filter(idle)
            .filter(|s| s.phase == StepPhase::Failed && !tried.contains(&s.host))
            .map(|s| Action::RollBack(s.host.clone())),
    );
    let mut slots = free_slots(limits, steps, busy);
    for step in steps.iter().filter(idle) {
        if slots == 0 {
            break;
        }
        if step.phase == StepPhase::Done {
            actions.push(Action::RollBack(step.host.clone()));
            slots -= 1;
        }
    }
    if !actions.is_empty() || !busy.is_empty() {
        return actions;
    }
    let still_new: Vec<&str> = steps
        .iter()
        .filter(|s| s.phase == StepPhase::Done)
        .map(|s| s.host.as_str())
        .collect();
    let restored = steps
        .iter()
        .filter(|s| s.phase == StepPhase::RolledBack)
        .count();
    let failed: Vec<&str> = steps
        .iter()
        .filter(|s| s.phase == StepPhase::Failed)
        .map(|s| s.host.as_str())
        .collect();
    if !still_new.is_empty() {
        // Hosts whose restoration failed hold every slot: going on would
        // take more hosts out of service than allowed.
        return vec![Action::Finish(
            RolloutState::Failed,
            format!(
                "abort stopped: could not restore {}, which hold every slot of --max-parallel {}; {} still run the new version",
                failed.join(", "),
                limits.max_parallel,
                still_new.join(", ")
            ),
        )];
    }
    let detail = if failed.is_empty() {
        format!("{restored} host(s) run the previous version again")
    } else {
        format!(
            "{restored} host(s) restored; could not restore {}",
            failed.join(", ")
        )
    };
    vec![Action::Finish(RolloutState::Aborted, detail)]
}

/// What a host runs, as far as the rollout cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runs {
    /// The rollout's new configuration.
    Target,
    /// What ran before the rollout (or its restoration).
    Previous,
    /// Something else, or nothing.
    Other,
}

/// A host looked at after the controller lost track of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observed {
    pub runs: Runs,
    pub healthy: bool,
}

/// The phase a host stopped mid-swap is really in. Healthy on the new
/// version: verify it again; healthy on the old one: the swap never
/// happened or was undone, so it is staged; anything else needs the old
/// version back (or is a failure when rollback is off).
pub fn reconcile(observed: Observed, auto_rollback: bool, aborting: bool) -> StepPhase {
    match (observed.runs, observed.healthy) {
        (Runs::Target, true) if aborting => StepPhase::Done,
        (Runs::Target, true) => StepPhase::Verifying,
        (Runs::Previous, true) => StepPhase::Staged,
        _ if auto_rollback || aborting => StepPhase::RollingBack,
        _ => StepPhase::Failed,
    }
}

/// What a host recorded failed is when its rollout is resumed: back on the
/// previous version and healthy, it was restored after all; healthy on the
/// new one, it is verified again; anything else stays failed.
pub fn reexamine(observed: Observed) -> StepPhase {
    match (observed.runs, observed.healthy) {
        (Runs::Previous, true) => StepPhase::RolledBack,
        (Runs::Target, true) => StepPhase::Verifying,
        _ => StepPhase::Failed,
    }
}

#[cfg(test)]
#[path = "decide_tests.rs"]
mod tests;
