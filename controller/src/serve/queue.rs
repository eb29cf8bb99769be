//! What the daemon decided and has not written yet. Watchers add to it and
//! never wait; one persister takes everything at once and writes it in one
//! transaction. It holds per host at most [`MAX_EVENTS`] events,
//! [`MAX_POINTS`] history points (the store merges points of one minute)
//! and the latest "seen" mark, so its size is bounded by the number of
//! hosts however fast any of them reports; what does not fit is counted.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::sync::Notify;

use super::view::Changes;
use crate::health::HealthEvent;
use crate::store::Observed;

/// Events of one host waiting at most (more means the store is stuck).
pub const MAX_EVENTS: usize = 32;
/// History points of one host waiting at most (the newest kept).
pub const MAX_POINTS: usize = 4;

#[derive(Debug, Default)]
pub struct Queue {
    pending: Mutex<BTreeMap<String, Observed>>,
    wake: Notify,
    closed: AtomicBool,
    dropped: AtomicU64,
}

impl Queue {
    /// Adds what one observation of `host` decided; never waits.
    pub fn push(&self, host: &str, changes: Changes) {
        if changes.is_empty() {
            return;
        }
        let mut dropped = 0;
        {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            let entry = pending.entry(host.to_owned()).or_default();
            for HealthEvent { kind, detail } in changes.events {
                if entry.events.len() < MAX_EVENTS {
                    entry.events.push((kind, detail));
                } else {
                    dropped += 1;
                }
            }
            if let Some(point) = changes.point {
                if entry.points.len() == MAX_POINTS {
                    entry.points.remove(0);
                    dropped += 1;
                }
                entry.points.push(point);
            }
            if let Some(version) = changes.seen_version {
                entry.seen = Some((crate::now_unix(), version));
            }
        }
        if dropped > 0 {
            self.dropped.fetch_add(dropped, Ordering::Relaxed);
        }
        self.wake.notify_one();
    }

    /// Everything waiting, each host once; the queue is empty after.
    pub fn take(&self) -> Vec<(String, Observed)> {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        std::mem::take(&mut *pending).into_iter().collect()
    }

    /// Waits until something is waiting or the queue is closed; whether it
    /// is closed.
    pub async fn ready(&self) -> bool {
        loop {
            let closed = self.closed.load(Ordering::Acquire);
            if closed || !self.is_empty() {
                return closed;
            }
            self.wake.notified().await;
        }
    }

    /// No more pushes are waited for; the persister writes what is left.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    pub fn is_empty(&self) -> bool {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    /// Events and points that did not fit, so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::HealthEvent;
    use crate::store::{EventKind, HealthPoint};

    fn changes(n_events: usize, at: i64) -> Changes {
        Changes {
            events: (0..n_events)
                .map(|i| HealthEvent {
                    kind: EventKind::ImUnhealthy,
                    detail: format!("e{i}"),
                })
                .collect(),
            point: Some(HealthPoint {
                host: "im1".into(),
                at,
                agent_up: true,
                im_healthy: Some(true),
                cpu_busy: None,
                memory_available_bytes: None,
                memory_total_bytes: None,
                data_used: None,
                load1: None,
            }),
            seen_version: Some(format!("v{at}")),
        }
    }

    #[test]
    fn a_host_reporting_without_end_holds_a_bounded_share() {
        let q = Queue::default();
        for at in 0..10_000 {
            q.push("im1", changes(3, at));
        }
        q.push("im2", changes(1, 5));
        let batch = q.take();
        assert_eq!(batch.len(), 2);
        let (host, im1) = &batch[0];
        assert_eq!(host, "im1");
        assert_eq!(im1.events.len(), MAX_EVENTS);
        // The first events are kept (what changed first), the newest points.
        assert_eq!(im1.events[0].1, "e0");
        let ats: Vec<i64> = im1.points.iter().map(|p| p.at).collect();
        assert_eq!(ats, [9996, 9997, 9998, 9999]);
        assert_eq!(im1.seen.as_ref().unwrap().1, "v9999");
        assert_eq!(batch[1].1.events.len(), 1);
        let expected = (30_000 - MAX_EVENTS) + (10_000 - MAX_POINTS);
        assert_eq!(q.dropped(), expected as u64);
        assert!(q.is_empty() && q.take().is_empty());
    }

    #[tokio::test]
    async fn the_persister_wakes_for_work_and_for_the_end() {
        let q = std::sync::Arc::new(Queue::default());
        let waiter = {
            let q = q.clone();
            tokio::spawn(async move { q.ready().await })
        };
        q.push("im1", changes(1, 0));
        assert!(!waiter.await.unwrap(), "woken for work, not closed");
        q.take();
        let waiter = {
            let q = q.clone();
            tokio::spawn(async move { q.ready().await })
        };
        q.close();
        assert!(waiter.await.unwrap());
        // Nothing pushed is ignored: the persister sees it before the end.
        q.push("im1", changes(0, 1));
        assert!(q.ready().await && !q.is_empty());
    }
}
