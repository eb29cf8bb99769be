//! The controller's SQLite state database: the inventory of hosts and an
//! append-only event log. Schema changes are numbered migrations tracked in
//! `PRAGMA user_version`, so an old database upgrades in place.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state database {path}: {source}")]
    Open {
        path: String,
        source: rusqlite::Error,
    },
    #[error("state database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error(
        "state database schema version {found} is newer than this controller understands ({known}); upgrade the controller"
    )]
    TooNew { found: i64, known: i64 },
}

/// Numbered schema migrations; index + 1 is the resulting `user_version`.
const MIGRATIONS: &[&str] = &[
    // 1: hosts and events.
    "CREATE TABLE hosts (
        name            TEXT PRIMARY KEY,
        agent_address   TEXT NOT NULL,
        agent_port      INTEGER NOT NULL,
        ssh_user        TEXT,
        ssh_port        INTEGER,
        agent_version   TEXT NOT NULL,
        agent_sha256    TEXT NOT NULL,
        cert_serial     TEXT NOT NULL,
        cert_not_after  INTEGER NOT NULL,
        supervision     TEXT NOT NULL,
        bootstrapped_at INTEGER NOT NULL,
        last_seen_at    INTEGER
    );
    CREATE TABLE events (
        id      INTEGER PRIMARY KEY AUTOINCREMENT,
        at      INTEGER NOT NULL,
        host    TEXT,
        kind    TEXT NOT NULL,
        detail  TEXT NOT NULL
    );
    CREATE INDEX events_by_host ON events(host, at);",
    // 2: the IM deployment on each host (one per host, as PortSIP runs it).
    "CREATE TABLE deployments (
        host          TEXT PRIMARY KEY REFERENCES hosts(name) ON DELETE CASCADE,
        name          TEXT NOT NULL,
        private_ip    TEXT NOT NULL,
        public_ip     TEXT NOT NULL,
        pbx           TEXT NOT NULL,
        data_path     TEXT NOT NULL,
        storage_dir   TEXT,
        image         TEXT NOT NULL,
        db_image      TEXT NOT NULL,
        image_ids     TEXT NOT NULL,
        config_hash   TEXT NOT NULL,
        users         INTEGER NOT NULL,
        overridden    TEXT NOT NULL,
        deployed_at   INTEGER NOT NULL
    );",
];

/// The IM deployment recorded for a host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
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
    pub image_ids: std::collections::BTreeMap<String, String>,
    pub config_hash: String,
    pub users: u32,
    /// Preflight checks that `--force` overrode.
    pub overridden: Vec<String>,
    /// Unix seconds.
    pub deployed_at: i64,
}

/// A bootstrapped host as the controller remembers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostRecord {
    /// The name the operator used (SSH target); the key of every command.
    pub name: String,
    /// Address the controller dials for gRPC; also the agent certificate's SAN.
    pub agent_address: String,
    pub agent_port: u16,
    pub ssh_user: Option<String>,
    pub ssh_port: Option<u16>,
    pub agent_version: String,
    pub agent_sha256: String,
    pub cert_serial: String,
    /// Unix seconds.
    pub cert_not_after: i64,
    pub supervision: String,
    /// Unix seconds.
    pub bootstrapped_at: i64,
    pub last_seen_at: Option<i64>,
}

#[derive(Debug)]
pub struct Store {
    conn: Connection,
}

impl Store {
    /// Opens (creating if needed, mode 0600) and migrates the database.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        if !path.exists() {
            imfleet_certs::storage::create_private_file(path).map_err(|e| StoreError::Open {
                path: path.display().to_string(),
                source: rusqlite::Error::ToSqlConversionFailure(Box::new(e)),
            })?;
        }
        let conn = Connection::open(path).map_err(|source| StoreError::Open {
            path: path.display().to_string(),
            source,
        })?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let store = Store { conn };
        store.migrate()?;
        Ok(store)
    }

    fn migrate(&self) -> Result<(), StoreError> {
        let found: i64 = self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))?;
        let known = MIGRATIONS.len() as i64;
        if found > known {
            return Err(StoreError::TooNew { found, known });
        }
        for (index, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
            let tx = self.conn.unchecked_transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", index as i64 + 1)?;
            tx.commit()?;
        }
        Ok(())
    }

    pub fn schema_version(&self) -> Result<i64, StoreError> {
        Ok(self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))?)
    }

    pub fn upsert_host(&self, host: &HostRecord) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO hosts (name, agent_address, agent_port, ssh_user, ssh_port, agent_version,
                agent_sha256, cert_serial, cert_not_after, supervision, bootstrapped_at, last_seen_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
             ON CONFLICT(name) DO UPDATE SET
                agent_address = excluded.agent_address, agent_port = excluded.agent_port,
                ssh_user = excluded.ssh_user, ssh_port = excluded.ssh_port,
                agent_version = excluded.agent_version, agent_sha256 = excluded.agent_sha256,
                cert_serial = excluded.cert_serial, cert_not_after = excluded.cert_not_after,
                supervision = excluded.supervision, bootstrapped_at = excluded.bootstrapped_at,
                last_seen_at = excluded.last_seen_at",
            params![
                host.name,
                host.agent_address,
                host.agent_port,
                host.ssh_user,
                host.ssh_port,
                host.agent_version,
                host.agent_sha256,
                host.cert_serial,
                host.cert_not_after,
                host.supervision,
                host.bootstrapped_at,
                host.last_seen_at,
            ],
        )?;
        Ok(())
    }

    /// Finds a host by its name, or failing that by its agent address.
    pub fn host(&self, name_or_address: &str) -> Result<Option<HostRecord>, StoreError> {
        Ok(self
            .conn
            .query_row(
                &format!(
                    "SELECT {HOST_COLUMNS} FROM hosts WHERE name = ?1
                     UNION ALL SELECT {HOST_COLUMNS} FROM hosts WHERE agent_address = ?1 LIMIT 1"
                ),
                [name_or_address],
                host_from_row,
            )
            .optional()?)
    }

    pub fn hosts(&self) -> Result<Vec<HostRecord>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(&format!("SELECT {HOST_COLUMNS} FROM hosts ORDER BY name"))?;
        let rows = stmt.query_map([], host_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Notes that the agent answered at `at` with `version`.
    pub fn mark_seen(&self, name: &str, at: i64, version: &str) -> Result<(), StoreError> {
        self.conn.execute(
            "UPDATE hosts SET last_seen_at = ?2, agent_version = ?3 WHERE name = ?1",
            params![name, at, version],
        )?;
        Ok(())
    }

    pub fn upsert_deployment(&self, d: &DeploymentRecord) -> Result<(), StoreError> {
        let image_ids = serde_json::to_string(&d.image_ids).unwrap_or_default();
        let overridden = serde_json::to_string(&d.overridden).unwrap_or_default();
        self.conn.execute(
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

    pub fn deployment(&self, host: &str) -> Result<Option<DeploymentRecord>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT host, name, private_ip, public_ip, pbx, data_path, storage_dir, image, db_image,
                    image_ids, config_hash, users, overridden, deployed_at
                 FROM deployments WHERE host = ?1",
                [host],
                |r| {
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
                },
            )
            .optional()?)
    }

    pub fn remove_deployment(&self, host: &str) -> Result<(), StoreError> {
        self.conn
            .execute("DELETE FROM deployments WHERE host = ?1", [host])?;
        Ok(())
    }

    pub fn record_event(
        &self,
        host: Option<&str>,
        kind: &str,
        detail: &str,
    ) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO events (at, host, kind, detail) VALUES (?1, ?2, ?3, ?4)",
            params![crate::now_unix(), host, kind, detail],
        )?;
        Ok(())
    }

    /// The most recent events of one host, newest first.
    pub fn events(
        &self,
        host: &str,
        limit: usize,
    ) -> Result<Vec<(i64, String, String)>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT at, kind, detail FROM events WHERE host = ?1 ORDER BY id DESC LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![host, limit as i64], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

const HOST_COLUMNS: &str = "name, agent_address, agent_port, ssh_user, ssh_port, agent_version, \
     agent_sha256, cert_serial, cert_not_after, supervision, bootstrapped_at, last_seen_at";

fn host_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<HostRecord> {
    Ok(HostRecord {
        name: row.get(0)?,
        agent_address: row.get(1)?,
        agent_port: row.get(2)?,
        ssh_user: row.get(3)?,
        ssh_port: row.get(4)?,
        agent_version: row.get(5)?,
        agent_sha256: row.get(6)?,
        cert_serial: row.get(7)?,
        cert_not_after: row.get(8)?,
        supervision: row.get(9)?,
        bootstrapped_at: row.get(10)?,
        last_seen_at: row.get(11)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(name: &str, address: &str) -> HostRecord {
        HostRecord {
            name: name.into(),
            agent_address: address.into(),
            agent_port: 7443,
            ssh_user: Some("pbx".into()),
            ssh_port: Some(22),
            agent_version: "0.1.0".into(),
            agent_sha256: "ab".repeat(32),
            cert_serial: "01".into(),
            cert_not_after: 2_000_000_000,
            supervision: "systemd".into(),
            bootstrapped_at: 1_700_000_000,
            last_seen_at: None,
        }
    }

    #[test]
    fn hosts_upsert_and_lookup_by_name_or_address() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let store = Store::open(&path).unwrap();
        store.upsert_host(&sample("im1", "10.0.0.5")).unwrap();
        store.upsert_host(&sample("im2", "10.0.0.6")).unwrap();
        let mut changed = sample("im1", "10.0.0.7");
        changed.agent_version = "0.2.0".into();
        store.upsert_host(&changed).unwrap();

        assert_eq!(store.hosts().unwrap().len(), 2);
        assert_eq!(store.host("im1").unwrap().unwrap(), changed);
        assert_eq!(store.host("10.0.0.6").unwrap().unwrap().name, "im2");
        assert!(store.host("10.0.0.5").unwrap().is_none());

        store.mark_seen("im2", 42, "0.3.0").unwrap();
        let im2 = store.host("im2").unwrap().unwrap();
        assert_eq!(
            (im2.last_seen_at, im2.agent_version.as_str()),
            (Some(42), "0.3.0")
        );

        store.record_event(Some("im1"), "bootstrap", "ok").unwrap();
        assert_eq!(store.events("im1", 10).unwrap().len(), 1);

        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn deployments_round_trip_and_go_with_their_host() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state.db")).unwrap();
        store.upsert_host(&sample("im1", "10.0.0.5")).unwrap();
        let d = DeploymentRecord {
            host: "im1".into(),
            name: "portsip-im".into(),
            private_ip: "10.0.0.5".into(),
            public_ip: "203.0.113.5".into(),
            pbx: "10.0.0.2".into(),
            data_path: "/var/lib/portsip".into(),
            storage_dir: Some("/srv/im".into()),
            image: "portsip/pbx:22".into(),
            db_image: "portsip/postgresql:14.12".into(),
            image_ids: [("portsip.instantmessage".to_owned(), "sha256:ab".to_owned())].into(),
            config_hash: "h1".into(),
            users: 50_000,
            overridden: vec!["os.release".into()],
            deployed_at: 1_700_000_000,
        };
        store.upsert_deployment(&d).unwrap();
        assert_eq!(store.deployment("im1").unwrap().unwrap(), d);
        let mut again = d.clone();
        again.config_hash = "h2".into();
        store.upsert_deployment(&again).unwrap();
        assert_eq!(store.deployment("im1").unwrap().unwrap().config_hash, "h2");
        store.remove_deployment("im1").unwrap();
        assert!(store.deployment("im1").unwrap().is_none());
        // A deployment cannot exist for an unknown host.
        let mut stray = d;
        stray.host = "ghost".into();
        assert!(store.upsert_deployment(&stray).is_err());
    }

    #[test]
    fn reopening_is_idempotent_and_a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        drop(Store::open(&path).unwrap());
        let store = Store::open(&path).unwrap();
        assert_eq!(store.schema_version().unwrap(), MIGRATIONS.len() as i64);
        store.conn.pragma_update(None, "user_version", 999).unwrap();
        drop(store);
        assert!(matches!(
            Store::open(&path),
            Err(StoreError::TooNew { found: 999, .. })
        ));
    }
}
