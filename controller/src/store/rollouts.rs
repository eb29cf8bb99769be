//! Rollouts and their per-host steps, written before each side effect so a
//! controller killed at any point can resume. At most one rollout is active
//! (running, paused or aborting): the database itself refuses a second.

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

use super::events::{EventKind, insert_event};
use super::{Store, StoreError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RolloutState {
    Running,
    /// Stopped by the failure budget; waits for `--resume` or `--abort`.
    Paused,
    Aborting,
    Succeeded,
    Failed,
    Aborted,
}
named!(RolloutState { Running => "running", Paused => "paused", Aborting => "aborting",
    Succeeded => "succeeded", Failed => "failed", Aborted => "aborted" });

impl RolloutState {
    /// The states of a rollout that is not over (at most one at a time).
    pub const ACTIVE: &'static [RolloutState] = &[
        RolloutState::Running,
        RolloutState::Paused,
        RolloutState::Aborting,
    ];

    pub fn is_active(self) -> bool {
        RolloutState::ACTIVE.contains(&self)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StepPhase {
    Pending,
    Staging,
    Staged,
    Swapping,
    Verifying,
    Done,
    RollingBack,
    RolledBack,
    Failed,
}
named!(StepPhase { Pending => "pending", Staging => "staging", Staged => "staged",
    Swapping => "swapping", Verifying => "verifying", Done => "done",
    RollingBack => "rolling-back", RolledBack => "rolled-back", Failed => "failed" });

impl StepPhase {
    /// The host is through: upgraded, restored or failed.
    pub fn has_ended(self) -> bool {
        matches!(
            self,
            StepPhase::Done | StepPhase::RolledBack | StepPhase::Failed
        )
    }
}

/// One host's place and progress in a rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutStep {
    pub host: String,
    pub position: u32,
    pub batch: u32,
    pub canary: bool,
    pub phase: StepPhase,
    pub from_revision: Option<i64>,
    pub to_revision: Option<i64>,
    pub detail: String,
    pub updated_at: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    pub id: i64,
    pub state: RolloutState,
    /// Who runs it (`host:pid`), for the refusal of a second one.
    pub holder: String,
    /// The operator's parameters (no secrets).
    pub params: serde_json::Value,
    pub created_at: i64,
    pub updated_at: i64,
    pub steps: Vec<RolloutStep>,
}

fn corrupt(what: &'static str) -> impl FnOnce(String) -> StoreError {
    move |value| StoreError::Corrupt { what, value }
}

fn load(conn: &Connection, id: i64) -> Result<Option<Rollout>, StoreError> {
    let head = conn
        .query_row(
            "SELECT state, holder, params, created_at, updated_at FROM rollouts WHERE id = ?1",
            [id],
            |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, i64>(4)?,
                ))
            },
        )
        .optional()?;
    let Some((state, holder, params, created_at, updated_at)) = head else {
        return Ok(None);
    };
    let state = RolloutState::parse(&state).ok_or_else(|| corrupt("a rollout state")(state))?;
    let params =
        serde_json::from_str(&params).map_err(|_| corrupt("rollout parameters")(params))?;
    let mut stmt = conn.prepare(
        "SELECT host, position, batch, canary, phase, from_revision, to_revision, detail, updated_at
         FROM rollout_steps WHERE rollout_id = ?1 ORDER BY position",
    )?;
    let rows = stmt.query_map([id], |r| {
        Ok((
            RolloutStep {
                host: r.get(0)?,
                position: r.get(1)?,
                batch: r.get(2)?,
                canary: r.get(3)?,
                phase: StepPhase::Pending,
                from_revision: r.get(5)?,
                to_revision: r.get(6)?,
                detail: r.get(7)?,
                updated_at: r.get(8)?,
            },
            r.get::<_, String>(4)?,
        ))
    })?;
    let mut steps = Vec::new();
    for row in rows {
        let (mut step, phase) = row?;
        step.phase =
            StepPhase::parse(&phase).ok_or_else(|| corrupt("a rollout step phase")(phase))?;
        steps.push(step);
    }
    Ok(Some(Rollout {
        id,
        state,
        holder,
        params,
        created_at,
        updated_at,
        steps,
    }))
}

/// A host's place in a new rollout's plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedStep {
    pub host: String,
    pub batch: u32,
    pub canary: bool,
    /// The revision running before the rollout, to return to.
    pub from_revision: Option<i64>,
}

/// The active rollout that has `host` among its steps, if any.
pub(super) fn active_rollout_holding(
    conn: &rusqlite::Connection,
    host: &str,
) -> rusqlite::Result<Option<i64>> {
    use rusqlite::OptionalExtension;
    conn.query_row(
        "SELECT r.id FROM rollout_steps s JOIN rollouts r ON r.id = s.rollout_id
         WHERE s.host = ?1 AND r.active",
        [host],
        |r| r.get(0),
    )
    .optional()
}

impl Store {
    /// Refuses, naming the rollout and the way out, when an active rollout
    /// holds `host` (deploy, start, stop and rm must not act under it).
    pub async fn check_not_in_rollout(&self, host: &str) -> Result<(), StoreError> {
        let host = host.to_owned();
        self.call(move |c| match active_rollout_holding(c, &host)? {
            Some(rollout) => Err(StoreError::HostInRollout { host, rollout }),
            None => Ok(()),
        })
        .await
    }

    /// Starts a rollout with its plan, unless another is active.
    pub async fn begin_rollout(
        &self,
        holder: &str,
        params: serde_json::Value,
        plan: Vec<PlannedStep>,
    ) -> Result<i64, StoreError> {
        let holder = holder.to_owned();
        self.call(move |c| {
            // Immediate: the check and the insert hold the write lock together,
            // so a second controller waits and then sees the first one's row.
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            if let Some((id, holder, started_at)) = tx
                .query_row(
                    "SELECT id, holder, created_at FROM rollouts WHERE active",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()?
            {
                return Err(StoreError::RolloutActive {
                    id,
                    holder,
                    started_at,
                });
            }
            let now = crate::now_unix();
            tx.execute(
                "INSERT INTO rollouts (state, holder, params, created_at, updated_at)
                 VALUES ('running', ?1, ?2, ?3, ?3)",
                params![holder, params.to_string(), now],
            )?;
            let id = tx.last_insert_rowid();
            for (position, step) in plan.iter().enumerate() {
                tx.execute(
                    "INSERT INTO rollout_steps (rollout_id, host, position, batch, canary, phase,
                        from_revision, detail, updated_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, 'pending', ?6, '', ?7)",
                    params![
                        id,
                        step.host,
                        position as i64,
                        step.batch,
                        step.canary,
                        step.from_revision,
                        now
                    ],
                )?;
            }
            insert_event(
                &tx,
                None,
                EventKind::RolloutStarted,
                &format!("rollout {id} of {} host(s)", plan.len()),
                Some(id),
            )?;
            tx.commit()?;
            Ok(id)
        })
        .await
    }

    /// Moves one host's step to `phase` (and its event) before the side
    /// effect the phase names is made.
    pub async fn set_step(
        &self,
        rollout: i64,
        host: &str,
        phase: StepPhase,
        to_revision: Option<i64>,
        detail: &str,
    ) -> Result<(), StoreError> {
        let (host, detail) = (
            host.to_owned(),
            super::events::cut_detail(detail).to_owned(),
        );
        self.call(move |c| {
            let tx = c.transaction()?;
            let changed = tx.execute(
                "UPDATE rollout_steps SET phase = ?3, to_revision = coalesce(?4, to_revision),
                    detail = ?5, updated_at = ?6 WHERE rollout_id = ?1 AND host = ?2",
                params![
                    rollout,
                    host,
                    phase.as_str(),
                    to_revision,
                    detail,
                    crate::now_unix()
                ],
            )?;
            if changed == 0 {
                return Err(StoreError::Corrupt {
                    what: "a rollout step",
                    value: format!("{host} is not in rollout {rollout}"),
                });
            }
            tx.execute(
                "UPDATE rollouts SET updated_at = ?2 WHERE id = ?1",
                params![rollout, crate::now_unix()],
            )?;
            insert_event(
                &tx,
                Some(&host),
                EventKind::RolloutStep,
                &format!(
                    "{}{}{detail}",
                    phase.as_str(),
                    if detail.is_empty() { "" } else { ": " }
                ),
                Some(rollout),
            )?;
            Ok(tx.commit()?)
        })
        .await
    }

    pub async fn set_rollout_state(
        &self,
        rollout: i64,
        state: RolloutState,
        detail: &str,
    ) -> Result<(), StoreError> {
        self.move_rollout(rollout, RolloutState::ALL, state, detail)
            .await
            .map(|_| ())
    }

    /// Moves a rollout to `state` only if it is in one of `from` now (another
    /// process may have changed it since it was read); whether it moved.
    pub async fn move_rollout(
        &self,
        rollout: i64,
        from: &'static [RolloutState],
        state: RolloutState,
        detail: &str,
    ) -> Result<bool, StoreError> {
        let detail = detail.to_owned();
        self.call(move |c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let now: Option<String> = tx
                .query_row("SELECT state FROM rollouts WHERE id = ?1", [rollout], |r| {
                    r.get(0)
                })
                .optional()?;
            if !now.is_some_and(|now| from.iter().any(|f| f.as_str() == now)) {
                return Ok(false);
            }
            tx.execute(
                "UPDATE rollouts SET state = ?2, updated_at = ?3 WHERE id = ?1",
                params![rollout, state.as_str(), crate::now_unix()],
            )?;
            if !state.is_active() {
                insert_event(
                    &tx,
                    None,
                    EventKind::RolloutFinished,
                    &format!("rollout {rollout} {}: {detail}", state.as_str()),
                    Some(rollout),
                )?;
            }
            tx.commit()?;
            Ok(true)
        })
        .await
    }

    /// Replaces a rollout's recorded parameters (a resume accepting the
    /// failures so far).
    pub async fn set_rollout_params(
        &self,
        rollout: i64,
        params: serde_json::Value,
    ) -> Result<(), StoreError> {
        self.call(move |c| {
            c.execute(
                "UPDATE rollouts SET params = ?2, updated_at = ?3 WHERE id = ?1",
                params![rollout, params.to_string(), crate::now_unix()],
            )?;
            Ok(())
        })
        .await
    }

    pub async fn rollout(&self, id: i64) -> Result<Option<Rollout>, StoreError> {
        self.call(move |c| load(c, id)).await
    }

    /// The running, paused or aborting rollout, if any.
    pub async fn active_rollout(&self) -> Result<Option<Rollout>, StoreError> {
        self.call(|c| {
            let id: Option<i64> = c
                .query_row("SELECT id FROM rollouts WHERE active", [], |r| r.get(0))
                .optional()?;
            match id {
                Some(id) => load(c, id),
                None => Ok(None),
            }
        })
        .await
    }

    /// Recent rollouts, newest first.
    pub async fn rollouts(&self, limit: usize) -> Result<Vec<Rollout>, StoreError> {
        self.call(move |c| {
            let mut stmt = c.prepare("SELECT id FROM rollouts ORDER BY id DESC LIMIT ?1")?;
            let ids: Vec<i64> = stmt
                .query_map([limit as i64], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            let mut out = Vec::new();
            for id in ids {
                out.extend(load(c, id)?);
            }
            Ok(out)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::{host, open};

    fn plan(hosts: &[&str]) -> Vec<PlannedStep> {
        hosts
            .iter()
            .enumerate()
            .map(|(i, h)| PlannedStep {
                host: (*h).into(),
                batch: i as u32,
                canary: i == 0,
                from_revision: None,
            })
            .collect()
    }

    #[tokio::test]
    async fn one_active_rollout_at_a_time_with_its_steps() {
        let (_dir, store) = open();
        for (name, ip) in [("im1", "10.0.0.5"), ("im2", "10.0.0.6")] {
            store.upsert_host(&host(name, ip)).await.unwrap();
        }
        let params = serde_json::json!({"image": "portsip/pbx:23"});
        let id = store
            .begin_rollout("pbx01:100", params.clone(), plan(&["im1", "im2"]))
            .await
            .unwrap();
        let second = store
            .begin_rollout("pbx01:200", params.clone(), plan(&["im2"]))
            .await
            .unwrap_err();
        match &second {
            StoreError::RolloutActive {
                id: held, holder, ..
            } => {
                assert_eq!((*held, holder.as_str()), (id, "pbx01:100"));
            }
            other => panic!("{other:?}"),
        }
        assert!(second.to_string().contains("--resume"));
        // The rollout holds its hosts: deploy, start, stop and rm refuse them.
        let held = store.check_not_in_rollout("im2").await.unwrap_err();
        assert!(matches!(held, StoreError::HostInRollout { rollout, .. } if rollout == id));
        assert!(held.to_string().contains("--abort"), "{held}");
        store.upsert_host(&host("im3", "10.0.0.7")).await.unwrap();
        store.check_not_in_rollout("im3").await.unwrap();

        store
            .set_step(id, "im1", StepPhase::Swapping, Some(7), "")
            .await
            .unwrap_err(); // no revision 7: the foreign key holds
        store
            .set_step(id, "im1", StepPhase::Swapping, None, "stopping the old set")
            .await
            .unwrap();
        assert!(
            store
                .set_step(id, "im9", StepPhase::Done, None, "")
                .await
                .is_err()
        );
        let active = store.active_rollout().await.unwrap().unwrap();
        assert_eq!(active.id, id);
        assert_eq!(active.params, params);
        let phases: Vec<(&str, StepPhase, bool)> = active
            .steps
            .iter()
            .map(|s| (s.host.as_str(), s.phase, s.canary))
            .collect();
        assert_eq!(
            phases,
            vec![
                ("im1", StepPhase::Swapping, true),
                ("im2", StepPhase::Pending, false)
            ]
        );

        store
            .set_rollout_state(id, RolloutState::Paused, "")
            .await
            .unwrap();
        assert!(
            store
                .begin_rollout("x", params.clone(), plan(&["im2"]))
                .await
                .is_err()
        );
        // A move from a state it is not in changes nothing.
        assert!(
            !store
                .move_rollout(id, &[RolloutState::Running], RolloutState::Succeeded, "")
                .await
                .unwrap()
        );
        assert_eq!(
            store.active_rollout().await.unwrap().unwrap().state,
            RolloutState::Paused
        );
        store
            .set_rollout_state(id, RolloutState::Aborted, "operator")
            .await
            .unwrap();
        assert!(store.active_rollout().await.unwrap().is_none());
        store.check_not_in_rollout("im2").await.unwrap();
        let next = store
            .begin_rollout("x", params, plan(&["im2"]))
            .await
            .unwrap();
        let all = store.rollouts(10).await.unwrap();
        assert_eq!(
            all.iter().map(|r| (r.id, r.state)).collect::<Vec<_>>(),
            vec![(next, RolloutState::Running), (id, RolloutState::Aborted)]
        );
        let kinds = crate::store::tests::kinds(&store, "im1").await;
        assert_eq!(kinds, vec![EventKind::RolloutStep]);
    }

    #[test]
    fn names_round_trip() {
        for s in RolloutState::ALL {
            assert_eq!(RolloutState::parse(s.as_str()), Some(*s));
        }
        for p in StepPhase::ALL {
            assert_eq!(StepPhase::parse(p.as_str()), Some(*p));
        }
    }
}
