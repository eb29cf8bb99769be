//! Fleet health, as pure functions over what agents report: a sample (or
//! its absence) reduced to an [`Observation`], and the events that a change
//! between two observations of one host means ([`transitions`]). The daemon
//! (`serve`) feeds them; tests feed them made-up observations.

pub mod backoff;
pub mod damping;
pub mod exposition;
pub mod ingest;
pub mod metrics;
pub mod pacing;

use std::collections::{BTreeMap, BTreeSet};

use imfleet_proto::agent::v1::{CpuTimes, HealthSample};

use serde::{Deserialize, Serialize};

use crate::store::EventKind;

/// A filesystem above this share used raises `disk-full`...
pub const DISK_FULL_RATIO: f64 = 0.90;
/// ...and one that was full is fine again below this (no flapping at 90 %).
pub const DISK_OK_RATIO: f64 = 0.88;
/// Warn when the agent's certificate expires within this many seconds:
/// renewal is due at 30 days left, so this means it has failed for a week.
pub const CERTIFICATE_WARNING_SECONDS: i64 = 21 * 86_400;

/// What one sample, or an agent's silence, says about a host.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observation {
    pub agent_up: bool,
    /// Why the agent is not up (connect error, stream ended, too old).
    pub agent_error: String,
    /// Not up because the daemon closed its stream for breaking the limits.
    pub misbehaving: bool,
    /// Whether the IM has containers at all (nothing deployed: no IM events).
    pub deployed: bool,
    pub im_healthy: bool,
    /// What is wrong when the IM is not healthy.
    pub im_detail: String,
    /// Restart count per container.
    pub restarts: BTreeMap<String, u32>,
    /// Share used per filesystem role ("data", "storage").
    pub disk_used: BTreeMap<String, f64>,
    pub certificate_not_after: Option<i64>,
}

impl Observation {
    pub fn unreachable(error: impl Into<String>) -> Observation {
        Observation {
            agent_error: error.into(),
            ..Default::default()
        }
    }

    /// The daemon closed the stream because the agent broke its limits.
    pub fn misbehaving(why: impl Into<String>) -> Observation {
        Observation {
            misbehaving: true,
            ..Observation::unreachable(why)
        }
    }
}

/// One host as the daemon knows it now: what `/metrics`, `status` and
/// `watch` show.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HostSnapshot {
    pub host: String,
    pub address: String,
    pub agent_up: bool,
    /// Why the agent is not up.
    pub error: String,
    /// `None` until the first sample, and while the agent is down.
    pub im_healthy: Option<bool>,
    pub im_detail: String,
    /// Unix seconds when the snapshot was taken.
    pub now_unix: i64,
    pub sample_age_seconds: Option<f64>,
    pub reconnects: u64,
    /// Samples dropped for arriving faster than asked.
    #[serde(default)]
    pub samples_dropped: u64,
    /// Entries of samples dropped on admission (over a cap, a bad name, a
    /// duplicate) and numbers that were not finite.
    #[serde(default)]
    pub entries_dropped: u64,
    /// Events not announced (damped).
    #[serde(default)]
    pub events_suppressed: u64,
    /// Share of CPU time busy between the last two samples.
    pub cpu_busy: Option<f64>,
    /// The latest sample while the agent is up.
    pub sample: Option<HealthSample>,
}

/// Reduces a sample to what events are decided on.
pub fn observe(sample: &HealthSample) -> Observation {
    let service = sample.service.clone().unwrap_or_default();
    let mut problems: Vec<String> = sample
        .containers
        .iter()
        .filter(|c| !imfleet_proto::model::health::container_serving(c))
        .map(|c| format!("{} {} ({})", c.name, c.state, c.health))
        .collect();
    if !service.stats_ok && !service.stats_error.is_empty() {
        problems.push(service.stats_error.clone());
    }
    for port in service.tcp.iter().filter(|p| !p.open) {
        problems.push(format!("nothing accepts connections on TCP {}", port.port));
    }
    let disk_used = sample
        .host
        .iter()
        .flat_map(|h| &h.filesystems)
        .filter(|f| f.size_bytes > 0)
        .map(|f| {
            let used = 1.0 - f.available_bytes as f64 / f.size_bytes as f64;
            (f.role.clone(), used.clamp(0.0, 1.0))
        })
        .collect();
    Observation {
        agent_up: true,
        agent_error: String::new(),
        misbehaving: false,
        deployed: !sample.containers.is_empty(),
        im_healthy: sample.deployment_healthy && problems.is_empty(),
        im_detail: crate::text::printable(&problems.join("; "), MAX_EVENT_DETAIL).into_owned(),
        restarts: sample
            .containers
            .iter()
            .map(|c| (c.name.clone(), c.restart_count))
            .collect(),
        disk_used,
        certificate_not_after: sample
            .agent
            .as_ref()
            .map(|a| a.certificate_not_after)
            .filter(|t| *t > 0),
    }
}

/// What is remembered of a host between observations, to tell changes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tracked {
    pub agent_up: Option<bool>,
    pub im_healthy: Option<bool>,
    pub restarts: BTreeMap<String, u32>,
    pub full_disks: BTreeSet<String>,
    pub certificate_warned: bool,
    /// What keeps the host's events few.
    pub damping: damping::Damping,
}

/// An event a change means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthEvent {
    pub kind: EventKind,
    pub detail: String,
}

/// Longest detail of a health event, as shown (it quotes the agent).
pub const MAX_EVENT_DETAIL: usize = 512;

fn event(kind: EventKind, detail: impl AsRef<str>) -> HealthEvent {
    HealthEvent {
        kind,
        detail: crate::text::printable(detail.as_ref(), MAX_EVENT_DETAIL).into_owned(),
    }
}

/// The events an observation at `now` announces: what changed
/// ([`transitions`]) as damping lets through.
pub fn announce(tracked: &mut Tracked, seen: &Observation, now: i64) -> Vec<HealthEvent> {
    let events = transitions(tracked, seen, now);
    let state = describe(tracked);
    tracked.damping.filter(events, now, || state)
}

/// A host's state in a few words, as remembered.
fn describe(t: &Tracked) -> String {
    match (t.agent_up, t.im_healthy) {
        (Some(false), _) => "agent unreachable".into(),
        (_, Some(true)) => "agent up, IM healthy".into(),
        (_, Some(false)) => "agent up, IM unhealthy".into(),
        (_, None) => "agent up, nothing deployed".into(),
    }
}

/// The events between what was `tracked` and `now_seen` (Unix `now`), and
/// `tracked` updated. A first observation raises only what is wrong: a
/// daemon restarted on a healthy fleet says nothing.
pub fn transitions(tracked: &mut Tracked, seen: &Observation, now: i64) -> Vec<HealthEvent> {
    let mut events = Vec::new();
    match (tracked.agent_up, seen.agent_up) {
        (Some(true) | None, false) => events.push(event(
            if seen.misbehaving {
                EventKind::AgentMisbehaving
            } else {
                EventKind::AgentUnreachable
            },
            &seen.agent_error,
        )),
        (Some(false), true) => events.push(event(EventKind::AgentBack, "the agent answers again")),
        _ => {}
    }
    tracked.agent_up = Some(seen.agent_up);
    // Without an agent nothing is known of the IM: its state is kept.
    if !seen.agent_up {
        return events;
    }
    if seen.deployed {
        match (tracked.im_healthy, seen.im_healthy) {
            (Some(true) | None, false) => {
                events.push(event(EventKind::ImUnhealthy, &seen.im_detail))
            }
            (Some(false), true) => {
                events.push(event(EventKind::ImHealthy, "the IM is healthy again"))
            }
            _ => {}
        }
        tracked.im_healthy = Some(seen.im_healthy);
    } else {
        tracked.im_healthy = None;
    }
    for (name, count) in &seen.restarts {
        if let Some(before) = tracked.restarts.get(name)
            && count > before
        {
            events.push(event(
                EventKind::ContainerRestarting,
                format!("{name} restarted ({count} restarts in all)"),
            ));
        }
    }
    tracked.restarts = seen.restarts.clone();
    for (role, used) in &seen.disk_used {
        let full = tracked.full_disks.contains(role);
        if !full && *used > DISK_FULL_RATIO {
            tracked.full_disks.insert(role.clone());
            events.push(event(
                EventKind::DiskFull,
                format!("the {role} filesystem is {:.0} % full", used * 100.0),
            ));
        } else if full && *used < DISK_OK_RATIO {
            tracked.full_disks.remove(role);
            events.push(event(
                EventKind::DiskOk,
                format!("the {role} filesystem is {:.0} % full", used * 100.0),
            ));
        }
    }
    if let Some(not_after) = seen.certificate_not_after {
        let left = not_after - now;
        let expiring = left < CERTIFICATE_WARNING_SECONDS;
        if expiring && !tracked.certificate_warned {
            events.push(event(
                EventKind::CertificateExpiring,
                format!(
                    "the agent's certificate expires in {} days ({}); run `controller bootstrap` for the host to renew it",
                    left.div_euclid(86_400),
                    crate::rfc3339(not_after)
                ),
            ));
        }
        tracked.certificate_warned = expiring;
    }
    events
}

/// What the event log (oldest first) says was last announced of a host, so
/// a restarted daemon neither repeats an announcement nor misses a change
/// that happened while it was down.
pub fn seed(events: &[crate::store::Event]) -> Tracked {
    let mut t = Tracked::default();
    for e in events {
        match e.kind {
            EventKind::AgentUnreachable | EventKind::AgentMisbehaving => t.agent_up = Some(false),
            EventKind::Flapping => t.damping = damping::Damping::flapping_from(e.at),
            EventKind::Steady => t.damping = Default::default(),
            EventKind::AgentBack => t.agent_up = Some(true),
            EventKind::ImUnhealthy => t.im_healthy = Some(false),
            EventKind::ImHealthy => t.im_healthy = Some(true),
            EventKind::DiskFull | EventKind::DiskOk => {
                if let Some(role) = disk_role(&e.detail) {
                    if e.kind == EventKind::DiskFull {
                        t.full_disks.insert(role);
                    } else {
                        t.full_disks.remove(&role);
                    }
                }
            }
            EventKind::CertificateExpiring => t.certificate_warned = true,
            // A bootstrap may bring a new certificate.
            EventKind::Bootstrap => t.certificate_warned = false,
            _ => {}
        }
    }
    t
}

/// The role named by a disk event's detail ("the data filesystem is ...").
fn disk_role(detail: &str) -> Option<String> {
    let rest = detail.strip_prefix("the ")?;
    rest.split_once(" filesystem")
        .map(|(role, _)| role.to_owned())
}

/// Share of CPU time spent busy between two samples of all CPUs (`None`
/// when no time passed or the counters went back, as after a reboot).
pub fn cpu_busy(before: &[CpuTimes], after: &[CpuTimes]) -> Option<f64> {
    let sum = |cpus: &[CpuTimes]| {
        cpus.iter().fold((0.0, 0.0), |(idle, all), c| {
            let total =
                c.user + c.nice + c.system + c.idle + c.iowait + c.irq + c.softirq + c.steal;
            (idle + c.idle + c.iowait, all + total)
        })
    };
    let (idle0, all0) = sum(before);
    let (idle1, all1) = sum(after);
    let all = all1 - all0;
    let idle = idle1 - idle0;
    (all > 0.0 && idle >= 0.0 && before.len() == after.len())
        .then(|| (1.0 - idle / all).clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests;
