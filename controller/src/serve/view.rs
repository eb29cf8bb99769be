//! The daemon's picture of the fleet: per host the latest sample, what the
//! event rules remember, and the bookkeeping for history and metrics. What
//! a sample or an outage changes here is decided by `health` (pure); this
//! module only keeps the results and says what to persist.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use imfleet_proto::agent::v1::HealthSample;

use crate::health::backoff::Backoff;
use crate::health::ingest::Admission;
use crate::health::pacing::{Pace, Pacer};
use crate::health::{self, HealthEvent, HostSnapshot, Observation, Tracked};
use crate::store::{HealthPoint, HostRecord};

#[derive(Debug)]
struct HostState {
    record: HostRecord,
    tracked: Tracked,
    seen: Option<Observation>,
    sample: Option<HealthSample>,
    sample_at: Option<Instant>,
    cpu_busy: Option<f64>,
    reconnects: u64,
    samples_dropped: u64,
    entries_dropped: u64,
    /// How fast its streams go, kept across them.
    pacer: Pacer,
    /// How long a misbehaving stream stays closed (doubling).
    quarantine: Backoff,
    /// Unix minute of the last history point written.
    history_minute: Option<i64>,
}

/// What a change asks the daemon to persist and send.
#[derive(Debug, Default)]
pub struct Changes {
    pub events: Vec<HealthEvent>,
    pub point: Option<HealthPoint>,
    /// The agent's version, when the host should be marked seen.
    pub seen_version: Option<String>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.events.is_empty() && self.point.is_none() && self.seen_version.is_none()
    }
}

/// After the daemon closed a host's stream for breaking the limits, the
/// first wait before it connects again; each further close doubles it, up
/// to [`QUARANTINE_MAX`], until a stream stays clean for [`FORGIVEN_AFTER`].
pub const QUARANTINE: Duration = Duration::from_secs(300);
pub const QUARANTINE_MAX: Duration = Duration::from_secs(3600);
pub const FORGIVEN_AFTER: Duration = Duration::from_secs(3600);

/// Shared by the watchers, the HTTP handlers and the host rescans.
#[derive(Debug, Clone)]
pub struct FleetView {
    hosts: Arc<RwLock<BTreeMap<String, HostState>>>,
    /// The sampling interval asked of every agent.
    interval: Duration,
}

impl Default for FleetView {
    fn default() -> Self {
        FleetView::new(imfleet_proto::model::health::DEFAULT_INTERVAL)
    }
}

impl FleetView {
    pub fn new(interval: Duration) -> FleetView {
        FleetView {
            hosts: Arc::default(),
            interval,
        }
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, HostState>> {
        self.hosts.write().unwrap_or_else(|p| p.into_inner())
    }

    pub fn knows(&self, name: &str) -> bool {
        self.hosts
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(name)
    }

    /// Adds a host remembering `tracked` (or replaces the record of a known
    /// one, keeping what was learnt).
    pub fn track(&self, record: HostRecord, tracked: Tracked) {
        let mut hosts = self.write();
        match hosts.get_mut(&record.name) {
            Some(state) => state.record = record,
            None => {
                hosts.insert(
                    record.name.clone(),
                    HostState {
                        record,
                        tracked,
                        seen: None,
                        sample: None,
                        sample_at: None,
                        cpu_busy: None,
                        reconnects: 0,
                        samples_dropped: 0,
                        entries_dropped: 0,
                        pacer: Pacer::new(self.interval),
                        quarantine: Backoff::new(QUARANTINE, QUARANTINE_MAX),
                        history_minute: None,
                    },
                );
            }
        }
    }

    pub fn forget(&self, name: &str) {
        self.write().remove(name);
    }

    /// A sample arrived (already admitted: see `health::ingest`).
    pub fn sample(
        &self,
        name: &str,
        sample: HealthSample,
        admission: Admission,
        now: i64,
    ) -> Changes {
        let seen = health::observe(&sample);
        let mut hosts = self.write();
        let Some(state) = hosts.get_mut(name) else {
            return Changes::default();
        };
        state.entries_dropped += admission.dropped + admission.non_finite;
        let cpus = |s: &HealthSample| s.host.as_ref().map(|h| h.cpus.clone()).unwrap_or_default();
        if let Some(before) = &state.sample {
            state.cpu_busy = health::cpu_busy(&cpus(before), &cpus(&sample));
        }
        let version = sample
            .agent
            .as_ref()
            .map(|a| a.version.clone())
            .unwrap_or_default();
        state.sample = Some(sample);
        state.sample_at = Some(Instant::now());
        let mut changes = apply(state, seen, now);
        if changes.point.is_some() {
            changes.seen_version = Some(version);
        }
        changes
    }

    /// The stream ended or could not be opened; `reconnecting` when the
    /// daemon is about to try again.
    pub fn outage(&self, name: &str, error: String, now: i64) -> Changes {
        let mut hosts = self.write();
        let Some(state) = hosts.get_mut(name) else {
            return Changes::default();
        };
        state.reconnects += 1;
        state.cpu_busy = None;
        apply(state, Observation::unreachable(error), now)
    }

    /// Whether a sample of the host that arrived at `now` is taken (see
    /// `health::pacing`).
    pub fn pace(&self, name: &str, now: Instant) -> Pace {
        let mut hosts = self.write();
        let Some(state) = hosts.get_mut(name) else {
            return Pace::Drop;
        };
        let pace = state.pacer.judge(now);
        if pace != Pace::Take {
            state.samples_dropped += 1;
        }
        pace
    }

    /// The agent ended the host's stream early: a drop, as far as pacing
    /// goes.
    pub fn strike(&self, name: &str, now: Instant) -> Pace {
        self.write()
            .get_mut(name)
            .map_or(Pace::Drop, |state| state.pacer.strike(now))
    }

    /// How long the host's stream, closed for misbehaving, stays closed.
    pub fn quarantine(&self, name: &str) -> Duration {
        self.write()
            .get_mut(name)
            .map_or(QUARANTINE, |state| state.quarantine.next(1.0))
    }

    /// A stream of the host stayed clean for [`FORGIVEN_AFTER`]: its next
    /// quarantine is the first again.
    pub fn forgive(&self, name: &str) {
        if let Some(state) = self.write().get_mut(name) {
            state.quarantine.reset();
        }
    }

    /// The daemon closed the host's stream: it broke the limits (`why`).
    pub fn misbehaving(&self, name: &str, why: String, now: i64) -> Changes {
        let mut hosts = self.write();
        let Some(state) = hosts.get_mut(name) else {
            return Changes::default();
        };
        state.sample = None;
        state.cpu_busy = None;
        state.reconnects += 1;
        apply(state, Observation::misbehaving(why), now)
    }

    /// The agent answers but is too old for health streams: up, nothing
    /// known of its IM (no IM events), and `why` shown.
    pub fn too_old(&self, name: &str, why: String, now: i64) -> Changes {
        let mut hosts = self.write();
        let Some(state) = hosts.get_mut(name) else {
            return Changes::default();
        };
        state.sample = None;
        let seen = Observation {
            agent_up: true,
            im_detail: why,
            ..Default::default()
        };
        apply(state, seen, now)
    }

    /// Every host, as of now.
    pub fn snapshots(&self) -> Vec<HostSnapshot> {
        let now = crate::now_unix();
        let hosts = self.hosts.read().unwrap_or_else(|p| p.into_inner());
        hosts.values().map(|s| snapshot(s, now)).collect()
    }
}

fn apply(state: &mut HostState, seen: Observation, now: i64) -> Changes {
    let events = health::announce(&mut state.tracked, &seen, now);
    let minute = now.div_euclid(crate::store::HEALTH_STEP_SECONDS);
    // One point per minute, and at once when the agent or the IM changes
    // (the store keeps the worst of a minute).
    let changed = state.seen.as_ref().is_none_or(|s| {
        s.agent_up != seen.agent_up
            || s.deployed != seen.deployed
            || s.im_healthy != seen.im_healthy
    });
    let point = (changed || state.history_minute != Some(minute)).then(|| {
        let host = state.sample.as_ref().and_then(|s| s.host.as_ref());
        HealthPoint {
            host: state.record.name.clone(),
            at: now,
            agent_up: seen.agent_up,
            im_healthy: (seen.agent_up && seen.deployed).then_some(seen.im_healthy),
            cpu_busy: state.cpu_busy.filter(|_| seen.agent_up),
            memory_available_bytes: host
                .map(|h| h.memory_available_bytes)
                .filter(|_| seen.agent_up),
            memory_total_bytes: host.map(|h| h.memory_total_bytes).filter(|_| seen.agent_up),
            data_used: seen.disk_used.get("data").copied(),
            load1: host.map(|h| h.load1).filter(|_| seen.agent_up),
        }
    });
    if point.is_some() {
        state.history_minute = Some(minute);
    }
    state.seen = Some(seen);
    Changes {
        events,
        point,
        seen_version: None,
    }
}

fn snapshot(s: &HostState, now: i64) -> HostSnapshot {
    let up = s.seen.as_ref().is_some_and(|o| o.agent_up);
    HostSnapshot {
        host: s.record.name.clone(),
        address: crate::fleet::address_of(&s.record).to_string(),
        agent_up: up,
        error: s
            .seen
            .as_ref()
            .map(|o| o.agent_error.clone())
            .unwrap_or_else(|| "no health sample yet".into()),
        im_healthy: s
            .seen
            .as_ref()
            .filter(|o| o.agent_up && o.deployed)
            .map(|o| o.im_healthy),
        im_detail: s
            .seen
            .as_ref()
            .map(|o| o.im_detail.clone())
            .unwrap_or_default(),
        now_unix: now,
        sample_age_seconds: s.sample_at.map(|t| t.elapsed().as_secs_f64()),
        reconnects: s.reconnects,
        samples_dropped: s.samples_dropped,
        entries_dropped: s.entries_dropped,
        events_suppressed: s.tracked.damping.suppressed,
        cpu_busy: s.cpu_busy.filter(|_| up),
        sample: s.sample.clone().filter(|_| up),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::EventKind;
    use imfleet_proto::agent::v1::ContainerStatus;

    fn sample(healthy: bool) -> HealthSample {
        HealthSample {
            containers: vec![ContainerStatus {
                name: "portsip.instantmessage".into(),
                state: "running".into(),
                health: if healthy { "healthy" } else { "unhealthy" }.into(),
                ..Default::default()
            }],
            deployment_healthy: healthy,
            ..Default::default()
        }
    }

    #[test]
    fn samples_and_outages_become_events_points_and_snapshots() {
        let view = FleetView::default();
        view.track(
            crate::store::tests::host("im1", "10.0.0.5"),
            Tracked::default(),
        );
        // A minute boundary (1.8e9 is a multiple of 600).
        let t0 = 1_800_000_000;
        let first = view.sample("im1", sample(true), Admission::default(), t0);
        assert!(first.events.is_empty());
        assert!(first.point.is_some(), "the first sample is a point");
        assert!(first.seen_version.is_some());
        // Same minute, nothing new: no point, no event.
        let again = view.sample("im1", sample(true), Admission::default(), t0 + 5);
        assert!(again.events.is_empty() && again.point.is_none());
        let sick = view.sample("im1", sample(false), Admission::default(), t0 + 10);
        assert_eq!(sick.events[0].kind, EventKind::ImUnhealthy);
        assert_eq!(
            sick.point.unwrap().im_healthy,
            Some(false),
            "a change is a point at once"
        );
        let snap = &view.snapshots()[0];
        assert_eq!((snap.agent_up, snap.im_healthy), (true, Some(false)));
        assert!(snap.sample.is_some());
        // The agent goes away: an event and a point at once, no stale sample.
        let gone = view.outage("im1", "connection refused".into(), t0 + 20);
        assert_eq!(gone.events[0].kind, EventKind::AgentUnreachable);
        let point = gone.point.unwrap();
        assert!(!point.agent_up && point.im_healthy.is_none());
        let snap = &view.snapshots()[0];
        assert!(!snap.agent_up && snap.sample.is_none() && snap.im_healthy.is_none());
        assert_eq!(
            (snap.error.as_str(), snap.reconnects),
            ("connection refused", 1)
        );
        // Unknown hosts are ignored.
        assert!(
            view.sample("im9", sample(true), Admission::default(), t0)
                .events
                .is_empty()
        );
        assert_eq!(view.snapshots().len(), 1);
        // An agent too old for streams is up, says why, and has no IM.
        let old = view.too_old("im1", "revision 7".into(), t0 + 30);
        assert_eq!(old.events[0].kind, EventKind::AgentBack);
        let snap = &view.snapshots()[0];
        assert!(snap.agent_up && snap.im_healthy.is_none() && snap.im_detail == "revision 7");
        view.forget("im1");
        assert!(view.snapshots().is_empty() && !view.knows("im1"));
    }
}
