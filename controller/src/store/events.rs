//! The append-only event log: what happened to which host, and when.

use rusqlite::{Connection, params};
use serde::{Deserialize, Serialize};

use super::{Store, StoreError};

/// What an event tells of. Stored by name; names never change meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    Bootstrap,
    Deploy,
    /// A deploy that changed nothing (the same spec already ran healthy).
    DeployUnchanged,
    DeployFailed,
    Start,
    Stop,
    Restart,
    Remove,
    /// Removal together with the IM data.
    Purge,
    RolloutStarted,
    RolloutStep,
    RolloutFinished,
    /// The daemon lost the host's health stream (or never had it).
    AgentUnreachable,
    /// The daemon closed the host's stream: it broke the protocol's limits
    /// (samples faster than asked, a message over the size limit).
    AgentMisbehaving,
    AgentBack,
    ImUnhealthy,
    ImHealthy,
    ContainerRestarting,
    /// A data filesystem above 90 % used.
    DiskFull,
    DiskOk,
    /// The agent's certificate expires within 21 days (renewal failing).
    CertificateExpiring,
    /// The agent serves a renewed certificate; the previous one is refused.
    CertificateRenewed,
    /// The host was forgotten: its certificates are revoked.
    HostForgotten,
    /// The host changed state too often: further changes are held back.
    Flapping,
    /// A flapping host has been steady long enough; how it is now.
    Steady,
    /// The agent was upgraded over mTLS and the host confirmed it.
    AgentUpgraded,
    /// An agent upgrade did not hold: the host put the previous one back.
    AgentUpgradeFailed,
    /// An operator certificate was issued (`controller operators add`).
    OperatorAdded,
    /// An operator's certificates were revoked.
    OperatorRevoked,
}

named!(EventKind {
    Bootstrap => "bootstrap",
    Deploy => "deploy",
    DeployUnchanged => "deploy-unchanged",
    DeployFailed => "deploy-failed",
    Start => "start",
    Stop => "stop",
    Restart => "restart",
    Remove => "remove",
    Purge => "purge",
    RolloutStarted => "rollout-started",
    RolloutStep => "rollout-step",
    RolloutFinished => "rollout-finished",
    AgentUnreachable => "agent-unreachable",
    AgentMisbehaving => "agent-misbehaving",
    AgentBack => "agent-back",
    ImUnhealthy => "im-unhealthy",
    ImHealthy => "im-healthy",
    ContainerRestarting => "container-restarting",
    DiskFull => "disk-full",
    DiskOk => "disk-ok",
    CertificateExpiring => "certificate-expiring",
    CertificateRenewed => "certificate-renewed",
    HostForgotten => "host-forgotten",
    Flapping => "flapping",
    Steady => "steady",
    AgentUpgraded => "agent-upgraded",
    AgentUpgradeFailed => "agent-upgrade-failed",
    OperatorAdded => "operator-added",
    OperatorRevoked => "operator-revoked",
});

impl EventKind {
    /// What `controller serve` records of hosts' health (pruned with the
    /// health history; everything else is the operators' own record).
    pub const HEALTH: &'static [EventKind] = &[
        EventKind::AgentUnreachable,
        EventKind::AgentMisbehaving,
        EventKind::AgentBack,
        EventKind::ImUnhealthy,
        EventKind::ImHealthy,
        EventKind::ContainerRestarting,
        EventKind::DiskFull,
        EventKind::DiskOk,
        EventKind::CertificateExpiring,
        EventKind::Flapping,
        EventKind::Steady,
    ];
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One recorded event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub id: i64,
    /// Unix seconds.
    pub at: i64,
    pub host: Option<String>,
    pub kind: EventKind,
    pub detail: String,
    pub rollout_id: Option<i64>,
}

/// The longest detail stored; longer ones are cut (at a character).
pub const MAX_DETAIL_BYTES: usize = 1024;

pub(super) fn insert_event(
    conn: &Connection,
    host: Option<&str>,
    kind: EventKind,
    detail: &str,
    rollout_id: Option<i64>,
) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO events (at, host, kind, detail, rollout_id) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![
            crate::now_unix(),
            host,
            kind.as_str(),
            cut_detail(detail),
            rollout_id
        ],
    )?;
    Ok(())
}

/// A detail as it is stored: at most [`MAX_DETAIL_BYTES`], cut at a
/// character (details quote agents, whose errors may be any length).
pub(super) fn cut_detail(detail: &str) -> &str {
    let mut end = detail.len().min(MAX_DETAIL_BYTES);
    while !detail.is_char_boundary(end) {
        end -= 1;
    }
    &detail[..end]
}

impl Store {
    pub async fn record_event(
        &self,
        host: Option<&str>,
        kind: EventKind,
        detail: &str,
    ) -> Result<(), StoreError> {
        let (host, detail) = (host.map(str::to_owned), detail.to_owned());
        self.call(move |c| Ok(insert_event(c, host.as_deref(), kind, &detail, None)?))
            .await
    }

    /// The most recent events of one host, newest first.
    pub async fn events(&self, host: &str, limit: usize) -> Result<Vec<Event>, StoreError> {
        let query = EventQuery {
            host: Some(host.to_owned()),
            limit,
            ..Default::default()
        };
        let mut events = self.query_events(query).await?;
        events.reverse();
        Ok(events)
    }

    /// Events matching `query`, oldest first (the newest `limit` of them).
    pub async fn query_events(&self, query: EventQuery) -> Result<Vec<Event>, StoreError> {
        self.call(move |c| {
            // Two statements, so each uses its index (by host, by time).
            let (sql, host) = match &query.host {
                Some(host) => (
                    "SELECT id, at, host, kind, detail, rollout_id FROM events
                     WHERE host = ?1 AND at >= ?2 AND id > ?3 ORDER BY id DESC LIMIT ?4",
                    host.as_str(),
                ),
                None => (
                    "SELECT id, at, host, kind, detail, rollout_id FROM events
                     WHERE ?1 = '' AND at >= ?2 AND id > ?3 ORDER BY id DESC LIMIT ?4",
                    "",
                ),
            };
            let mut stmt = c.prepare(sql)?;
            let limit = query.limit.min(i64::MAX as usize) as i64;
            let rows = stmt.query_map(params![host, query.since, query.after_id, limit], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, Option<String>>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, Option<i64>>(5)?,
                ))
            })?;
            let mut events = Vec::new();
            for row in rows {
                let (id, at, host, kind, detail, rollout_id) = row?;
                let kind = EventKind::parse(&kind).ok_or(StoreError::Corrupt {
                    what: "an event kind",
                    value: kind,
                })?;
                events.push(Event {
                    id,
                    at,
                    host,
                    kind,
                    detail,
                    rollout_id,
                });
            }
            events.reverse();
            Ok(events)
        })
        .await
    }
}

/// Which events to read.
#[derive(Debug, Clone, Default)]
pub struct EventQuery {
    pub host: Option<String>,
    /// Unix seconds; events at or after.
    pub since: i64,
    /// Only events with a larger id (to follow the log).
    pub after_id: i64,
    pub limit: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_by_name() {
        for kind in EventKind::ALL.iter().copied() {
            assert_eq!(EventKind::parse(kind.as_str()), Some(kind));
            assert_eq!(
                serde_json::to_value(kind).unwrap(),
                serde_json::json!(kind.as_str())
            );
        }
        assert_eq!(EventKind::parse("nonsense"), None);
    }
}
