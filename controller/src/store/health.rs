//! The daemon's health history: one point per host and minute, thinned to
//! one per ten minutes after a day and dropped after the retention period,
//! so its size is bounded by the number of hosts.

use rusqlite::params;
use serde::Serialize;

use super::events::insert_event;
use super::{EventKind, Store, StoreError};

/// Seconds between the points of one host.
pub const STEP_SECONDS: i64 = 60;
/// Points older than this are thinned to one per [`THIN_STEP_SECONDS`].
pub const FULL_RESOLUTION_SECONDS: i64 = 86_400;
pub const THIN_STEP_SECONDS: i64 = 600;

/// How a point joins the one already kept for its host and time: a minute
/// is "up" (or "healthy") only if every sample in it was, so a short outage
/// is never overwritten by the recovery; figures are the latest known.
const MERGE: &str = "ON CONFLICT (host, at) DO UPDATE SET
    agent_up = min(agent_up, excluded.agent_up),
    im_healthy = CASE WHEN im_healthy IS NULL THEN excluded.im_healthy
        WHEN excluded.im_healthy IS NULL THEN im_healthy
        ELSE min(im_healthy, excluded.im_healthy) END,
    cpu_busy = coalesce(excluded.cpu_busy, cpu_busy),
    memory_available_bytes = coalesce(excluded.memory_available_bytes, memory_available_bytes),
    memory_total_bytes = coalesce(excluded.memory_total_bytes, memory_total_bytes),
    data_used = coalesce(excluded.data_used, data_used),
    load1 = coalesce(excluded.load1, load1)";

/// Health events kept per host at most (the newest); older ones go with
/// the hourly pruning.
pub const MAX_HEALTH_EVENTS_PER_HOST: i64 = 2000;

/// What the daemon learnt of one host since it last wrote: written with
/// the others in one transaction.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observed {
    pub events: Vec<(EventKind, String)>,
    /// Points in the order taken (the store merges those of one minute).
    pub points: Vec<HealthPoint>,
    /// When the agent was seen, and its version.
    pub seen: Option<(i64, String)>,
}

/// One host at one minute.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HealthPoint {
    pub host: String,
    /// Unix seconds, at the start of the minute.
    pub at: i64,
    pub agent_up: bool,
    /// `None` when the agent was down or nothing was deployed.
    pub im_healthy: Option<bool>,
    pub cpu_busy: Option<f64>,
    pub memory_available_bytes: Option<u64>,
    pub memory_total_bytes: Option<u64>,
    /// Share of the data filesystem used.
    pub data_used: Option<f64>,
    pub load1: Option<f64>,
}

impl Store {
    /// Adds `point` to its host's point for that minute: down or unhealthy
    /// if any sample in the minute was, the latest figures otherwise.
    pub async fn record_health(&self, point: HealthPoint) -> Result<(), StoreError> {
        self.call(move |c| Ok(insert_point(c, &point)?)).await
    }

    /// Everything the daemon learnt of these hosts, in one transaction (one
    /// sync for the lot). Events of a host no longer known are dropped.
    pub async fn record_observed(&self, batch: Vec<(String, Observed)>) -> Result<(), StoreError> {
        self.call(move |c| {
            let tx = c.transaction()?;
            for (host, observed) in &batch {
                let known: bool = tx.query_row(
                    "SELECT EXISTS (SELECT 1 FROM hosts WHERE name = ?1)",
                    [host],
                    |r| r.get(0),
                )?;
                if !known {
                    continue;
                }
                for (kind, detail) in &observed.events {
                    insert_event(&tx, Some(host), *kind, detail, None)?;
                }
                for point in &observed.points {
                    insert_point(&tx, point)?;
                }
                if let Some((at, version)) = &observed.seen {
                    super::hosts::set_seen(&tx, host, *at, version)?;
                }
            }
            Ok(tx.commit()?)
        })
        .await
    }

    /// Thins and drops old points; how many were removed.
    pub async fn prune_health(
        &self,
        now: i64,
        retention_seconds: i64,
    ) -> Result<usize, StoreError> {
        self.call(move |c| {
            let tx = c.transaction()?;
            // Each old ten minutes folded into its first minute (down if any
            // minute was), then the other minutes dropped.
            tx.execute(
                &format!(
                    "INSERT INTO health_history (host, at, agent_up, im_healthy, cpu_busy,
                        memory_available_bytes, memory_total_bytes, data_used, load1)
                     SELECT host, at - at % ?2, min(agent_up), min(im_healthy), avg(cpu_busy),
                        min(memory_available_bytes), max(memory_total_bytes), max(data_used),
                        max(load1)
                     FROM health_history WHERE at < ?1 AND at % ?2 != 0
                     GROUP BY host, at - at % ?2 {MERGE}"
                ),
                params![now - FULL_RESOLUTION_SECONDS, THIN_STEP_SECONDS],
            )?;
            let thinned = tx.execute(
                "DELETE FROM health_history WHERE at < ?1 AND at % ?2 != 0",
                params![now - FULL_RESOLUTION_SECONDS, THIN_STEP_SECONDS],
            )?;
            let dropped = tx.execute(
                "DELETE FROM health_history WHERE at < ?1",
                params![now - retention_seconds],
            )?;
            // The daemon's events go with the history, and no host keeps
            // more than its share however busy it was.
            let kinds = EventKind::HEALTH
                .iter()
                .map(|k| format!("'{}'", k.as_str()))
                .collect::<Vec<_>>()
                .join(",");
            let old_events = tx.execute(
                &format!("DELETE FROM events WHERE kind IN ({kinds}) AND at < ?1"),
                params![now - retention_seconds],
            )?;
            let excess_events = tx.execute(
                &format!(
                    "DELETE FROM events WHERE id IN (
                        SELECT id FROM (
                            SELECT id, row_number() OVER (PARTITION BY host ORDER BY id DESC) AS n
                            FROM events WHERE kind IN ({kinds}) AND host IS NOT NULL)
                        WHERE n > ?1)"
                ),
                params![MAX_HEALTH_EVENTS_PER_HOST],
            )?;
            tx.commit()?;
            Ok(thinned + dropped + old_events + excess_events)
        })
        .await
    }

    /// A host's points since `since` (Unix seconds), oldest first.
    pub async fn health_history(
        &self,
        host: &str,
        since: i64,
    ) -> Result<Vec<HealthPoint>, StoreError> {
        let host = host.to_owned();
        self.call(move |c| {
            let mut stmt = c.prepare(
                "SELECT host, at, agent_up, im_healthy, cpu_busy, memory_available_bytes,
                        memory_total_bytes, data_used, load1
                 FROM health_history WHERE host = ?1 AND at >= ?2 ORDER BY at",
            )?;
            let rows = stmt.query_map(params![host, since], |r| {
                Ok(HealthPoint {
                    host: r.get(0)?,
                    at: r.get(1)?,
                    agent_up: r.get(2)?,
                    im_healthy: r.get(3)?,
                    cpu_busy: r.get(4)?,
                    memory_available_bytes: r.get::<_, Option<i64>>(5)?.map(|b| b.max(0) as u64),
                    memory_total_bytes: r.get::<_, Option<i64>>(6)?.map(|b| b.max(0) as u64),
                    data_used: r.get(7)?,
                    load1: r.get(8)?,
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }
}

fn insert_point(c: &rusqlite::Connection, point: &HealthPoint) -> rusqlite::Result<()> {
    c.execute(
        &format!(
            "INSERT INTO health_history (host, at, agent_up, im_healthy, cpu_busy,
                memory_available_bytes, memory_total_bytes, data_used, load1)
             SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9
             WHERE EXISTS (SELECT 1 FROM hosts WHERE name = ?1) {MERGE}"
        ),
        params![
            point.host,
            point.at - point.at.rem_euclid(STEP_SECONDS),
            point.agent_up,
            point.im_healthy,
            point.cpu_busy,
            point.memory_available_bytes.map(|b| b as i64),
            point.memory_total_bytes.map(|b| b as i64),
            point.data_used,
            point.load1,
        ],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::{host, open};

    fn point(at: i64) -> HealthPoint {
        HealthPoint {
            host: "im1".into(),
            at,
            agent_up: true,
            im_healthy: Some(true),
            cpu_busy: Some(0.25),
            memory_available_bytes: Some(4 << 30),
            memory_total_bytes: Some(8 << 30),
            data_used: Some(0.5),
            load1: Some(0.7),
        }
    }

    #[tokio::test]
    async fn one_point_per_minute_thinned_then_dropped() {
        let (_dir, store) = open();
        store.upsert_host(&host("im1", "10.0.0.5")).await.unwrap();
        // On a ten-minute boundary.
        let now = 1_800_000_000;
        // An outage in a minute stays, whatever came after it in the minute.
        store.record_health(point(now - 30)).await.unwrap();
        let mut outage = point(now - 20);
        outage.agent_up = false;
        outage.im_healthy = None;
        outage.cpu_busy = None;
        store.record_health(outage).await.unwrap();
        let mut back = point(now - 10);
        back.cpu_busy = Some(0.5);
        store.record_health(back).await.unwrap();
        let kept = store.health_history("im1", 0).await.unwrap();
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].at, now - 60);
        assert!(!kept[0].agent_up);
        assert_eq!(kept[0].im_healthy, Some(true), "unknown while down");
        assert_eq!(kept[0].cpu_busy, Some(0.5), "the latest figure");
        let mut sick = point(now - 5);
        sick.im_healthy = Some(false);
        store.record_health(sick).await.unwrap();
        store.record_health(point(now - 1)).await.unwrap();
        let kept = store.health_history("im1", 0).await.unwrap();
        assert_eq!(kept[0].im_healthy, Some(false));
        // Two days of minutes: the older day thins to ten-minute points.
        for minute in 0..(2 * 1440) {
            store.record_health(point(now - minute * 60)).await.unwrap();
        }
        // One minute down in an old ten minutes: the ten minutes are down.
        let mut down = point(now - 2000 * 60 + 180);
        down.agent_up = false;
        store.record_health(down).await.unwrap();
        store.prune_health(now, 30 * 86_400).await.unwrap();
        let all = store.health_history("im1", 0).await.unwrap();
        let folded = all.iter().find(|p| p.at == now - 2000 * 60).unwrap();
        assert!(!folded.agent_up, "{folded:?}");
        let old_down = all.iter().filter(|p| !p.agent_up && p.at < now - 86_400);
        assert_eq!(old_down.count(), 1);
        let recent = all.iter().filter(|p| p.at >= now - 86_400).count();
        let old = all.len() - recent;
        assert_eq!(recent, 1441);
        // Minutes 1441..2879 ago fold into the ten-minute starts 1450..2880.
        assert_eq!(old, 144);
        // Past the retention nothing is left.
        store
            .prune_health(now + 40 * 86_400, 30 * 86_400)
            .await
            .unwrap();
        assert!(store.health_history("im1", 0).await.unwrap().is_empty());
        // A host that is not (or no longer) known gets no points.
        let mut stranger = point(now);
        stranger.host = "im9".into();
        store.record_health(stranger).await.unwrap();
        assert!(store.health_history("im9", 0).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn observations_are_written_together_and_health_events_pruned() {
        let (_dir, store) = open();
        store.upsert_host(&host("im1", "10.0.0.5")).await.unwrap();
        store
            .record_event(Some("im1"), EventKind::Deploy, "operator's record")
            .await
            .unwrap();
        let flood = Observed {
            events: (0..MAX_HEALTH_EVENTS_PER_HOST + 100)
                .map(|i| (EventKind::ImUnhealthy, format!("n{i}")))
                .collect(),
            points: vec![point(1_800_000_000)],
            seen: Some((1_800_000_000, "0.2.0".into())),
        };
        let stranger = Observed {
            events: vec![(EventKind::AgentBack, "who?".into())],
            ..Default::default()
        };
        store
            .record_observed(vec![("im1".into(), flood), ("im9".into(), stranger)])
            .await
            .unwrap();
        let seen = store.host("im1").await.unwrap().unwrap();
        assert_eq!(
            (seen.last_seen_at, seen.agent_version.as_str()),
            (Some(1_800_000_000), "0.2.0")
        );
        assert_eq!(store.health_history("im1", 0).await.unwrap().len(), 1);
        assert!(store.events("im9", 10).await.unwrap().is_empty());
        let count = |events: &[crate::store::Event], kind| {
            events.iter().filter(|e| e.kind == kind).count() as i64
        };
        let now = crate::now_unix();
        store.prune_health(now, 30 * 86_400).await.unwrap();
        let kept = store.events("im1", 10_000).await.unwrap();
        assert_eq!(
            count(&kept, EventKind::ImUnhealthy),
            MAX_HEALTH_EVENTS_PER_HOST
        );
        assert_eq!(
            kept[0].detail,
            format!("n{}", MAX_HEALTH_EVENTS_PER_HOST + 99)
        );
        store
            .prune_health(now + 40 * 86_400, 30 * 86_400)
            .await
            .unwrap();
        let kept = store.events("im1", 10_000).await.unwrap();
        assert_eq!(count(&kept, EventKind::ImUnhealthy), 0);
        assert_eq!(count(&kept, EventKind::Deploy), 1, "operators' events stay");
    }

    #[tokio::test]
    async fn an_event_detail_is_cut_to_its_limit() {
        let (_dir, store) = open();
        store.upsert_host(&host("im1", "10.0.0.5")).await.unwrap();
        let long = "é".repeat(crate::store::events::MAX_DETAIL_BYTES);
        store
            .record_event(Some("im1"), EventKind::Start, &long)
            .await
            .unwrap();
        let stored = &store.events("im1", 1).await.unwrap()[0].detail;
        assert_eq!(stored.len(), crate::store::events::MAX_DETAIL_BYTES);
    }
}
