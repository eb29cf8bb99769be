//! The IM deployment on each host: the current row, and every applied
//! revision (what rollouts roll back to and what history shows).

use std::collections::BTreeMap;

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

use super::events::{EventKind, insert_event};
use super::{Store, StoreError};

/// The IM deployment recorded for a host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentRecord {
    pub host: String,
    pub name: String,
    pub private_ip: String,
    pub public_ip: String,
    pub pbx: String,
    pub data_path: String,
    pub storage_dir: Option<String>,
    pub image: String,
    pub db_image: String,
    /// Container name -> image id (sha256 digest) actually running.
    pub image_ids: BTreeMap<String, String>,
    pub config_hash: String,
    pub users: u32,
    /// Preflight checks that `--force` overrode.
    pub overridden: Vec<String>,
    /// Unix seconds.
    pub deployed_at: i64,
}

/// How an apply ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// The spec runs healthy now.
    Applied,
    /// The same spec already ran healthy; nothing was changed.
    Unchanged,
    /// The apply failed; the previous deployment runs again.
    RolledBack,
    /// The apply failed and nothing was restored (there was nothing to restore).
    Failed,
}

named!(Outcome {
    Applied => "applied",
    Unchanged => "unchanged",
    RolledBack => "rolled-back",
    Failed => "failed",
});

impl Outcome {
    fn succeeded(self) -> bool {
        matches!(self, Outcome::Applied | Outcome::Unchanged)
    }

    fn event(self) -> EventKind {
        match self {
            Outcome::Applied => EventKind::Deploy,
            Outcome::Unchanged => EventKind::DeployUnchanged,
            Outcome::RolledBack | Outcome::Failed => EventKind::DeployFailed,
        }
    }
}

/// One apply of a spec on a host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Revision {
    pub id: i64,
    pub outcome: Outcome,
    pub detail: String,
    /// What was asked for; `deployed_at` is when the apply ended.
    pub deployment: DeploymentRecord,
}

fn upsert(conn: &Connection, d: &DeploymentRecord) -> rusqlite::Result<()> {
    let image_ids = serde_json::to_string(&d.image_ids).unwrap_or_default();
    let overridden = serde_json::to_string(&d.overridden).unwrap_or_default();
    conn.execute(
        "INSERT INTO deployments (host, name, private_ip, public_ip, pbx, data_path, storage_dir,
            image, db_image, image_ids, config_hash, users, overridden, deployed_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)
         ON CONFLICT(host) DO UPDATE SET name = excluded.name, private_ip = excluded.private_ip,
            public_ip = excluded.public_ip, pbx = excluded.pbx, data_path = excluded.data_path,
            storage_dir = excluded.storage_dir, image = excluded.image, db_image = excluded.db_image,
            image_ids = excluded.image_ids, config_hash = excluded.config_hash, users = excluded.users,
            overridden = excluded.overridden, deployed_at = excluded.deployed_at",
        params![
            d.host,
            d.name,
            d.private_ip,
            d.public_ip,
            d.pbx,
            d.data_path,
            d.storage_dir,
            d.image,
            d.db_image,
            image_ids,
            d.config_hash,
            d.users,
            overridden,
            d.deployed_at,
        ],
    )?;
    Ok(())
}

fn deployment_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DeploymentRecord> {
    let image_ids: String = r.get(9)?;
    let overridden: String = r.get(12)?;
    Ok(DeploymentRecord {
        host: r.get(0)?,
        name: r.get(1)?,
        private_ip: r.get(2)?,
        public_ip: r.get(3)?,
        pbx: r.get(4)?,
        data_path: r.get(5)?,
        storage_dir: r.get(6)?,
        image: r.get(7)?,
        db_image: r.get(8)?,
        image_ids: serde_json::from_str(&image_ids).unwrap_or_default(),
        config_hash: r.get(10)?,
        users: r.get(11)?,
        overridden: serde_json::from_str(&overridden).unwrap_or_default(),
        deployed_at: r.get(13)?,
    })
}

impl Store {
    /// Records an apply: its revision, the event, and (when it succeeded) the
    /// host's current deployment, in one transaction. Returns the revision id.
    pub async fn record_apply(
        &self,
        deployment: &DeploymentRecord,
        outcome: Outcome,
        detail: &str,
    ) -> Result<i64, StoreError> {
        let (d, detail) = (deployment.clone(), detail.to_owned());
        self.call(move |c| {
            let tx = c.transaction()?;
            if outcome.succeeded() {
                upsert(&tx, &d)?;
            }
            tx.execute(
                "INSERT INTO deployment_revisions (host, name, config_hash, image, db_image,
                    image_ids, params, outcome, detail, at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                params![
                    d.host,
                    d.name,
                    d.config_hash,
                    d.image,
                    d.db_image,
                    serde_json::to_string(&d.image_ids).unwrap_or_default(),
                    serde_json::to_string(&d).unwrap_or_default(),
                    outcome.as_str(),
                    detail,
                    d.deployed_at,
                ],
            )?;
            let id = tx.last_insert_rowid();
            let text = format!(
                "{} with {}; config {}{}{}",
                d.name,
                d.image,
                d.config_hash,
                if d.overridden.is_empty() {
                    String::new()
                } else {
                    format!("; overridden: [{}]", d.overridden.join(", "))
                },
                if detail.is_empty() {
                    String::new()
                } else {
                    format!("; {detail}")
                }
            );
            insert_event(&tx, Some(&d.host), outcome.event(), &text, None)?;
            tx.commit()?;
            Ok(id)
        })
        .await
    }

    pub async fn deployment(&self, host: &str) -> Result<Option<DeploymentRecord>, StoreError> {
        let host = host.to_owned();
        self.call(move |c| {
            Ok(c.query_row(
                "SELECT host, name, private_ip, public_ip, pbx, data_path, storage_dir, image,
                    db_image, image_ids, config_hash, users, overridden, deployed_at
                 FROM deployments WHERE host = ?1",
                [host],
                deployment_from_row,
            )
            .optional()?)
        })
        .await
    }

    /// A host's revisions, newest first.
    pub async fn revisions(&self, host: &str, limit: usize) -> Result<Vec<Revision>, StoreError> {
        let host = host.to_owned();
        self.call(move |c| {
            let mut stmt = c.prepare(
                "SELECT id, outcome, detail, params FROM deployment_revisions
                 WHERE host = ?1 ORDER BY id DESC LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![host, limit as i64], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (id, outcome, detail, params) = row?;
                let outcome = Outcome::parse(&outcome).ok_or(StoreError::Corrupt {
                    what: "a revision outcome",
                    value: outcome,
                })?;
                let deployment =
                    serde_json::from_str(&params).map_err(|_| StoreError::Corrupt {
                        what: "a revision's parameters",
                        value: params,
                    })?;
                out.push(Revision {
                    id,
                    outcome,
                    detail,
                    deployment,
                });
            }
            Ok(out)
        })
        .await
    }

    /// One revision's deployment, by id.
    pub async fn revision(&self, id: i64) -> Result<Option<DeploymentRecord>, StoreError> {
        self.call(move |c| {
            let params: Option<String> = c
                .query_row(
                    "SELECT params FROM deployment_revisions WHERE id = ?1",
                    [id],
                    |r| r.get(0),
                )
                .optional()?;
            params
                .map(|p| {
                    serde_json::from_str(&p).map_err(|_| StoreError::Corrupt {
                        what: "a revision's parameters",
                        value: p,
                    })
                })
                .transpose()
        })
        .await
    }

    /// The newest revision of `host` that ended running healthy.
    pub async fn last_good_revision(&self, host: &str) -> Result<Option<i64>, StoreError> {
        let host = host.to_owned();
        self.call(move |c| {
            Ok(c.query_row(
                "SELECT id FROM deployment_revisions
                 WHERE host = ?1 AND outcome IN ('applied', 'unchanged') ORDER BY id DESC LIMIT 1",
                [host],
                |r| r.get(0),
            )
            .optional()?)
        })
        .await
    }

    /// Records a start/stop/restart/remove of a host's deployment; a removal
    /// also forgets the current row (revisions stay as history).
    pub async fn record_control(
        &self,
        host: &str,
        kind: EventKind,
        detail: &str,
    ) -> Result<(), StoreError> {
        let (host, detail) = (host.to_owned(), detail.to_owned());
        self.call(move |c| {
            let tx = c.transaction()?;
            if matches!(kind, EventKind::Remove | EventKind::Purge) {
                tx.execute("DELETE FROM deployments WHERE host = ?1", [&host])?;
            }
            insert_event(&tx, Some(&host), kind, &detail, None)?;
            Ok(tx.commit()?)
        })
        .await
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::store::tests::{host, open};

    pub(crate) fn sample(host: &str, hash: &str) -> DeploymentRecord {
        DeploymentRecord {
            host: host.into(),
            name: "portsip-im".into(),
            private_ip: "10.0.0.5".into(),
            public_ip: "203.0.113.5".into(),
            pbx: "10.0.0.2".into(),
            data_path: "/var/lib/portsip".into(),
            storage_dir: Some("/srv/im".into()),
            image: "portsip/pbx:22".into(),
            db_image: "portsip/postgresql:14.12".into(),
            image_ids: [("portsip.instantmessage".to_owned(), "sha256:ab".to_owned())].into(),
            config_hash: hash.into(),
            users: 50_000,
            overridden: vec!["os.release".into()],
            deployed_at: 1_700_000_000,
        }
    }

    #[tokio::test]
    async fn every_apply_is_a_revision_and_only_successes_change_the_row() {
        let (_dir, store) = open();
        store.upsert_host(&host("im1", "10.0.0.5")).await.unwrap();
        let first = store
            .record_apply(&sample("im1", "h1"), Outcome::Applied, "")
            .await
            .unwrap();
        let failed = store
            .record_apply(&sample("im1", "h2"), Outcome::RolledBack, "IM unhealthy")
            .await
            .unwrap();
        assert!(failed > first);
        // The failed h2 did not replace what runs.
        assert_eq!(
            store.deployment("im1").await.unwrap().unwrap().config_hash,
            "h1"
        );
        store
            .record_apply(&sample("im1", "h1"), Outcome::Unchanged, "")
            .await
            .unwrap();
        let revisions = store.revisions("im1", 10).await.unwrap();
        let seen: Vec<(&str, Outcome)> = revisions
            .iter()
            .map(|r| (r.deployment.config_hash.as_str(), r.outcome))
            .collect();
        assert_eq!(
            seen,
            vec![
                ("h1", Outcome::Unchanged),
                ("h2", Outcome::RolledBack),
                ("h1", Outcome::Applied)
            ]
        );
        assert_eq!(revisions[1].detail, "IM unhealthy");
        assert_eq!(revisions[2].deployment, sample("im1", "h1"));
        let kinds = crate::store::tests::kinds(&store, "im1").await;
        assert_eq!(
            kinds,
            vec![
                EventKind::DeployUnchanged,
                EventKind::DeployFailed,
                EventKind::Deploy
            ]
        );
    }

    #[tokio::test]
    async fn removal_forgets_the_row_keeps_history_and_needs_a_known_host() {
        let (_dir, store) = open();
        store.upsert_host(&host("im1", "10.0.0.5")).await.unwrap();
        store
            .record_apply(&sample("im1", "h1"), Outcome::Applied, "")
            .await
            .unwrap();
        store
            .record_control("im1", EventKind::Stop, "portsip-im")
            .await
            .unwrap();
        assert!(store.deployment("im1").await.unwrap().is_some());
        store
            .record_control("im1", EventKind::Remove, "portsip-im")
            .await
            .unwrap();
        assert!(store.deployment("im1").await.unwrap().is_none());
        assert_eq!(store.revisions("im1", 10).await.unwrap().len(), 1);
        // Neither a row nor a revision for an unknown host, and no event either.
        let stray = sample("ghost", "h1");
        assert!(
            store
                .record_apply(&stray, Outcome::Applied, "")
                .await
                .is_err()
        );
        assert!(store.events("ghost", 10).await.unwrap().is_empty());
    }
}
