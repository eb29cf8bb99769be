//! How many events one host may cause. A host whose agent or IM flaps
//! (root on it can make it flap every second) would otherwise write an
//! event, and POST a webhook, per change. So, per host:
//!
//! - **Flapping**: [`FLAP_CHANGES`] state changes within [`FLAP_WINDOW`]
//!   make one `flapping` event; further changes are held back (the state is
//!   still tracked and shown) until the host has been steady for
//!   [`STEADY_SECONDS`], which is one `steady` event saying how it is then.
//! - **A budget**: at most [`BURST`] events at once, then one a minute;
//!   what is over it is not announced and is counted.
//!
//! Pure: the caller passes the time.

use std::collections::VecDeque;

use super::{HealthEvent, event};
use crate::store::EventKind;

/// Seconds over which changes are counted.
pub const FLAP_WINDOW: i64 = 600;
/// Changes within the window that make a host flapping.
pub const FLAP_CHANGES: usize = 6;
/// Seconds without a change that end flapping.
pub const STEADY_SECONDS: i64 = 600;
/// Events a host may cause at once...
pub const BURST: i64 = 10;
/// ...and seconds per event after that.
pub const REFILL_SECONDS: i64 = 60;

/// What is remembered per host to damp its events.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Damping {
    /// When recent state changes happened, oldest first (within the window).
    changes: VecDeque<i64>,
    last_change: Option<i64>,
    /// Since when changes are held back.
    pub flapping_since: Option<i64>,
    /// Seconds of budget left (an event costs [`REFILL_SECONDS`]) and when
    /// that was; `None` until the first event.
    budget: Option<(i64, i64)>,
    /// Events not announced (held back or over the budget).
    pub suppressed: u64,
}

/// Whether an event tells of the host changing state (what flapping is
/// made of), rather than of a threshold or a date.
fn is_change(kind: EventKind) -> bool {
    matches!(
        kind,
        EventKind::AgentUnreachable
            | EventKind::AgentBack
            | EventKind::ImUnhealthy
            | EventKind::ImHealthy
            | EventKind::ContainerRestarting
            | EventKind::AgentMisbehaving
    )
}

impl Damping {
    /// Remembers a host that was flapping at `since` (from the event log).
    pub fn flapping_from(since: i64) -> Damping {
        Damping {
            flapping_since: Some(since),
            last_change: Some(since),
            ..Default::default()
        }
    }

    /// The events of one observation at `now` that are announced; `state`
    /// describes the host as it is now (for the `steady` event).
    pub fn filter(
        &mut self,
        events: Vec<HealthEvent>,
        now: i64,
        state: impl FnOnce() -> String,
    ) -> Vec<HealthEvent> {
        let mut out = Vec::new();
        for e in events {
            if is_change(e.kind) {
                self.changes.push_back(now);
                self.last_change = Some(now);
                while self
                    .changes
                    .front()
                    .is_some_and(|t| *t <= now - FLAP_WINDOW)
                {
                    self.changes.pop_front();
                }
                if self.flapping_since.is_some() {
                    self.suppressed += 1;
                    continue;
                }
                if self.changes.len() >= FLAP_CHANGES {
                    self.flapping_since = Some(now);
                    self.suppressed += 1;
                    out.push(event(
                        EventKind::Flapping,
                        format!(
                            "{} changes in {} min (the last: {}); further changes are not announced until the host is steady for {} min",
                            self.changes.len(),
                            FLAP_WINDOW / 60,
                            e.kind,
                            STEADY_SECONDS / 60
                        ),
                    ));
                    continue;
                }
            }
            if self.spend(now) {
                out.push(e);
            } else {
                self.suppressed += 1;
            }
        }
        if self.flapping_since.is_some()
            && self.last_change.is_none_or(|t| now - t >= STEADY_SECONDS)
        {
            self.flapping_since = None;
            self.changes.clear();
            out.push(event(
                EventKind::Steady,
                format!("steady for {} min: {}", STEADY_SECONDS / 60, state()),
            ));
        }
        out
    }

    /// Takes one event from the budget, if there is one left.
    fn spend(&mut self, now: i64) -> bool {
        let full = BURST * REFILL_SECONDS;
        let (left, at) = self.budget.unwrap_or((full, now));
        let left = left.saturating_add((now - at).max(0)).min(full);
        let ok = left >= REFILL_SECONDS;
        self.budget = Some((if ok { left - REFILL_SECONDS } else { left }, now));
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(kind: EventKind) -> HealthEvent {
        event(kind, "x")
    }

    fn kinds(events: &[HealthEvent]) -> Vec<EventKind> {
        events.iter().map(|e| e.kind).collect()
    }

    #[test]
    fn a_host_flapping_every_second_gives_one_event_then_one_when_steady() {
        let mut d = Damping::default();
        let mut announced = Vec::new();
        for t in 0..3600 {
            let kind = if t % 2 == 0 {
                EventKind::ImUnhealthy
            } else {
                EventKind::ImHealthy
            };
            announced.extend(d.filter(vec![ev(kind)], t, || "IM healthy".into()));
        }
        let k = kinds(&announced);
        assert_eq!(k.len(), FLAP_CHANGES, "{k:?}");
        assert_eq!(k[FLAP_CHANGES - 1], EventKind::Flapping);
        assert_eq!(d.suppressed, 3600 - (FLAP_CHANGES as u64 - 1));
        // Quiet: nothing until ten minutes have passed, then one `steady`.
        assert!(
            d.filter(vec![], 3600 + STEADY_SECONDS - 2, String::new)
                .is_empty()
        );
        let steady = d.filter(vec![], 3600 + STEADY_SECONDS, || "IM healthy".into());
        assert_eq!(kinds(&steady), [EventKind::Steady]);
        assert!(
            steady[0].detail.ends_with("IM healthy"),
            "{}",
            steady[0].detail
        );
        // A later change is announced again.
        let later = d.filter(vec![ev(EventKind::ImUnhealthy)], 5000, String::new);
        assert_eq!(kinds(&later), [EventKind::ImUnhealthy]);
    }

    #[test]
    fn a_few_changes_are_all_announced() {
        let mut d = Damping::default();
        let mut n = 0;
        for t in [0, 100, 700, 900, 1500, 2000, 2600] {
            n += d
                .filter(vec![ev(EventKind::AgentUnreachable)], t, String::new)
                .len();
        }
        assert_eq!(n, 7);
        assert_eq!(d.suppressed, 0);
    }

    #[test]
    fn other_events_are_held_to_the_budget() {
        let mut d = Damping::default();
        let burst: usize = (0..100)
            .map(|_| {
                d.filter(vec![ev(EventKind::DiskFull)], 0, String::new)
                    .len()
            })
            .sum();
        assert_eq!(burst, BURST as usize);
        assert!(
            d.filter(vec![ev(EventKind::DiskOk)], 30, String::new)
                .is_empty()
        );
        assert_eq!(
            d.filter(vec![ev(EventKind::DiskOk)], 60, String::new).len(),
            1
        );
        // An hour of one event a second: one a minute gets through.
        let hour: usize = (61..3661)
            .map(|t| {
                d.filter(vec![ev(EventKind::DiskFull)], t, String::new)
                    .len()
            })
            .sum();
        assert_eq!(hour, 60);
    }

    #[test]
    fn flapping_remembered_from_the_log_holds_changes_back() {
        let mut d = Damping::flapping_from(1000);
        assert!(
            d.filter(vec![ev(EventKind::AgentBack)], 1100, String::new)
                .is_empty()
        );
        let steady = d.filter(vec![], 1100 + STEADY_SECONDS, || "agent up".into());
        assert_eq!(kinds(&steady), [EventKind::Steady]);
    }
}
