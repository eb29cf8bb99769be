//! What the CLI and the daemon say to each other about rollouts on the
//! daemon's socket: a submission (start, resume, abort) answered with a
//! run number, then pages of that run's events until it ends.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::deployment::TokenSource;
use crate::fleet::Selection;
use crate::rollout::credentials::Stored;
use crate::rollout::{Credentials, Limits, Timing, UpgradeRequest};
use crate::store::Rollout;

/// What the operator asks the daemon to do.
#[derive(Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Submission {
    Start {
        upgrade: Upgrade,
        credentials: Stored,
    },
    Resume {
        credentials: Stored,
    },
    Abort {
        credentials: Stored,
    },
}

/// An [`UpgradeRequest`] without its secrets (those go as credentials).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upgrade {
    /// Every host with a deployment (`hosts` is then empty).
    pub all: bool,
    pub hosts: Vec<String>,
    pub image: Option<String>,
    pub db_image: Option<String>,
    /// Absolute: the daemon reads them.
    pub image_files: Vec<PathBuf>,
    pub canaries: u32,
    pub limits: Limits,
    pub timing: Timing,
    pub stop_grace_seconds: u32,
    pub force: bool,
}

impl Upgrade {
    pub fn of(request: &UpgradeRequest) -> Upgrade {
        Upgrade {
            all: request.selection == Selection::All,
            hosts: match &request.selection {
                Selection::All => Vec::new(),
                Selection::Hosts(hosts) => hosts.clone(),
            },
            image: request.image.clone(),
            db_image: request.db_image.clone(),
            image_files: request.image_files.clone(),
            canaries: request.canaries,
            limits: request.limits,
            timing: request.timing,
            stop_grace_seconds: request.stop_grace_seconds,
            force: request.force,
        }
    }

    /// The request again, with its credentials: a given token, else a new
    /// one from the PBX (as `controller upgrade` does without the daemon).
    pub fn request(self, credentials: Credentials) -> Result<UpgradeRequest, String> {
        if self.image_files.iter().any(|f| !f.is_absolute()) {
            return Err("image archives must be given as absolute paths".into());
        }
        let token = match (&credentials.token, &credentials.pbx) {
            (Some(token), _) => TokenSource::Given(token.clone()),
            (None, Some(_)) => TokenSource::NewFromPbx,
            (None, None) => return Err("an upgrade needs the IM token it installs".into()),
        };
        let selection = match (self.all, self.hosts.is_empty()) {
            (true, true) => Selection::All,
            (false, false) => Selection::Hosts(self.hosts),
            _ => return Err("name the hosts or ask for all of them, not both or neither".into()),
        };
        Ok(UpgradeRequest {
            selection,
            image: self.image,
            db_image: self.db_image,
            image_files: self.image_files,
            canaries: self.canaries,
            limits: self.limits,
            timing: self.timing,
            stop_grace_seconds: self.stop_grace_seconds,
            token,
            pbx: credentials.pbx,
            force: self.force,
        })
    }
}

/// The daemon took a submission: follow `run`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Accepted {
    pub run: u64,
}

/// What the daemon is doing with rollouts.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Driving {
    /// The newest run, and whether it still goes on.
    pub run: Option<u64>,
    pub running: bool,
}

/// A run's events after a point, and how it ended once it has.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct RunPage {
    /// Each a `RolloutEvent`.
    pub events: Vec<serde_json::Value>,
    /// Ask for events after this next.
    pub next: u64,
    pub ended: Option<RunEnd>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunEnd {
    /// How the rollout stands (none when it never started).
    pub rollout: Option<Rollout>,
    /// Why the run stopped, when it did not end the rollout.
    pub error: Option<String>,
}

/// Which hosts a `status` asks for (POST /v1/status).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostsWanted {
    pub all: bool,
    /// By name or agent address (ignored with `all`).
    pub hosts: Vec<String>,
}

impl HostsWanted {
    pub fn selection(&self) -> Selection {
        if self.all {
            Selection::All
        } else {
            Selection::Hosts(self.hosts.clone())
        }
    }
}

/// Which events an `events` asks for (GET /v1/events).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsWanted {
    /// A host by name or agent address; none: every event.
    pub host: Option<String>,
    /// Unix seconds.
    #[serde(default)]
    pub since: i64,
    pub limit: usize,
}

/// The most events or rollouts one answer holds.
pub const MAX_LISTED: usize = 10_000;
