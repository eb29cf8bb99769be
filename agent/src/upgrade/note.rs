//! The note an agent upgrade keeps in the agent's root-only state
//! directory: written before the swap, moved on by the watcher and by the
//! new agent when it serves, reported in every ping. Fields are added only
//! with defaults and unknown ones are ignored, so the previous binary reads
//! a newer binary's note (a rollback must work).

use imfleet_proto::agent::v1::AgentUpgrade;
use imfleet_proto::model::layout::Layout;
use serde::{Deserialize, Serialize};

use super::UpgradeError;

const FILE: &str = "agent-upgrade.json";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    /// Swapped; the new binary has not served yet.
    #[default]
    Pending,
    /// The new agent serves; its grace window runs.
    Started,
    Confirmed,
    RolledBack,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Started => "started",
            State::Confirmed => "confirmed",
            State::RolledBack => "rolled-back",
        }
    }

    /// The upgrade is not over: another is refused.
    pub fn is_under_way(self) -> bool {
        matches!(self, State::Pending | State::Started)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Note {
    pub state: State,
    pub from_version: String,
    pub to_version: String,
    pub to_revision: u32,
    /// Unix seconds when `state` was reached.
    pub at: i64,
    /// Why it was rolled back.
    pub detail: String,
}

impl Note {
    pub fn pending(from: &str, to: &str, to_revision: u32) -> Note {
        Note {
            state: State::Pending,
            from_version: from.to_owned(),
            to_version: to.to_owned(),
            to_revision,
            at: now(),
            detail: String::new(),
        }
    }

    /// The note moved to `state`.
    pub fn moved(&self, state: State, detail: &str) -> Note {
        Note {
            state,
            at: now(),
            detail: detail.to_owned(),
            ..self.clone()
        }
    }
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn path(layout: &Layout) -> std::path::PathBuf {
    layout.state_dir().join(FILE)
}

pub fn read(layout: &Layout) -> Option<Note> {
    let text = std::fs::read_to_string(path(layout)).ok()?;
    serde_json::from_str(&text).ok()
}

pub fn write(layout: &Layout, note: &Note) -> Result<(), UpgradeError> {
    let dir = layout.state_dir();
    std::fs::create_dir_all(&dir).map_err(super::io(format!("create {}", dir.display())))?;
    let text = serde_json::to_vec_pretty(note).unwrap_or_default();
    imfleet_certs::storage::write_atomically(&path(layout), &text, 0o600)
        .map_err(super::io("write the upgrade note"))
}

pub fn clear(layout: &Layout) {
    let _ = std::fs::remove_file(path(layout));
}

/// Called by a serving agent once it listens: if it is the binary an
/// upgrade is waiting for, it says so (the watcher's cue). A note left
/// `started` long ago (its watcher gone with a reboot) is confirmed: the
/// agent has served since.
pub fn note_serving(layout: &Layout) {
    let Some(note) = read(layout) else { return };
    let mine = note.to_version == crate::version();
    let outcome = match note.state {
        State::Pending if mine => write(layout, &note.moved(State::Started, "")),
        State::Started if mine && now() - note.at > STALE_SECONDS => write(
            layout,
            &note.moved(State::Confirmed, "confirmed at a later start"),
        ),
        _ => Ok(()),
    };
    if let Err(e) = outcome {
        tracing::warn!("cannot update the upgrade note: {e}");
    }
}

/// A `started` note older than this has no watcher left.
const STALE_SECONDS: i64 = 300;

/// The last upgrade, for the ping reply.
pub fn last_upgrade(layout: &Layout) -> Option<AgentUpgrade> {
    read(layout).map(|n| AgentUpgrade {
        state: n.state.as_str().to_owned(),
        from_version: n.from_version,
        to_version: n.to_version,
        detail: n.detail,
        at: n.at,
    })
}
