//! `controller upgrade`: rolling, health-gated upgrades of the IM fleet with
//! automatic rollback, persisted so a killed controller resumes.
//!
//! - `decide`: the pure state machine (plan, next actions, reconcile).
//! - `plan`: checks before anything changes (deployments, preflight,
//!   images) and the plan a new rollout records.
//! - `host`: one host's operations (stage, swap and verify, roll back,
//!   observe), each ending in a recorded phase.
//! - `run`: starting, resuming and aborting (the lock, the token, checks);
//!   `driver`: one process driving a rollout under the decisions.
//!
//! Where the IM token comes from: a new rollout takes it from
//! `--token-file` or has the PBX generate a new one right before the first
//! swap. What it was given (token, PBX login) is kept beside the CA key
//! while the rollout is active (`credentials`), never in the database, so
//! the daemon can go on after a crash or failover; `--resume` and
//! `--abort` use it unless given new ones, and read the PBX's current
//! token (the one the rollout generated) when no token was given. A rollback applies the previous images with that same
//! token (the old one was revoked when the new one was made), so the
//! restored IM can still log in to the PBX. An apply that fails inside the
//! agent is undone by the agent itself, which restarts the previous
//! containers exactly as they were.

pub mod credentials;
pub mod decide;
mod driver;
mod error;
mod host;
pub mod plan;
mod run;

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use credentials::Credentials;
pub use decide::Limits;
pub use error::RolloutError;
pub use plan::{PlanLine, RolloutPlan};
pub use run::{LOCK_FILE, RolloutOutcome, abort, dry_run, is_driven, resume, upgrade};

use crate::deployment::TokenSource;
use crate::fleet::Selection;
use crate::pbx::PbxOptions;
use crate::progress::Progress;
use crate::store::{RolloutState, StepPhase};

/// What the operator asked for (the recorded part is [`RolloutParams`]).
#[derive(Debug)]
pub struct UpgradeRequest {
    pub selection: Selection,
    /// New IM image; `None` keeps each host's.
    pub image: Option<String>,
    pub db_image: Option<String>,
    /// `docker save` archives staged on every host before any swap.
    pub image_files: Vec<PathBuf>,
    pub canaries: u32,
    pub limits: Limits,
    pub timing: Timing,
    pub stop_grace_seconds: u32,
    pub token: TokenSource,
    pub pbx: Option<PbxOptions>,
    /// Upgrade despite failed preflight checks.
    pub force: bool,
}

/// How long a host has to prove itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timing {
    /// Healthy without a break for this long before the host counts as done.
    #[serde(with = "millis")]
    pub min_healthy: Duration,
    /// From the swap: by then the host must have been healthy long enough.
    #[serde(with = "millis")]
    pub healthy_deadline: Duration,
    /// From the swap: by then the host must be done or restored.
    #[serde(with = "millis")]
    pub progress_deadline: Duration,
}

impl Timing {
    pub fn check(&self) -> Result<(), String> {
        if self.min_healthy >= self.healthy_deadline {
            return Err(format!(
                "--min-healthy-time ({}) must be shorter than --healthy-deadline ({})",
                humantime::format_duration(self.min_healthy),
                humantime::format_duration(self.healthy_deadline)
            ));
        }
        if self.healthy_deadline > self.progress_deadline {
            return Err(format!(
                "--healthy-deadline ({}) may not exceed --progress-deadline ({})",
                humantime::format_duration(self.healthy_deadline),
                humantime::format_duration(self.progress_deadline)
            ));
        }
        Ok(())
    }
}

mod millis {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

/// What a rollout records of its parameters (no secrets): enough for
/// `--resume` and `--abort` to go on without the original command line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutParams {
    pub image: Option<String>,
    pub db_image: Option<String>,
    pub image_files: Vec<PathBuf>,
    pub limits: Limits,
    pub timing: Timing,
    pub stop_grace_seconds: u32,
    /// The PBX API was used: registration is checked after each swap, and
    /// the token can be read back from it.
    pub pbx_api: bool,
}

/// What a rollout reports as it goes; `--json` prints one per line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum RolloutEvent {
    /// The rollout and its order of hosts.
    Started {
        rollout: i64,
        resumed: bool,
        state: RolloutState,
        hosts: Vec<PlanLine>,
    },
    /// A host moved to a new phase (recorded before its side effect).
    Step {
        rollout: i64,
        host: String,
        phase: StepPhase,
        detail: String,
        /// Hosts that have ended (done, rolled back or failed) of `total`.
        ended: usize,
        total: usize,
    },
    /// A host being verified: healthy so far, of the time it needs.
    Healthy {
        host: String,
        healthy_ms: u64,
        needed_ms: u64,
    },
    /// A step of deploy's (apply, upload, register) on a host.
    Host { progress: Progress },
    Finished {
        rollout: i64,
        state: RolloutState,
        detail: String,
    },
}

/// Where rollout events go.
pub type EventSink = std::sync::Arc<dyn Fn(RolloutEvent) + Send + Sync>;
