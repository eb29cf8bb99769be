//! Numbered schema migrations; index + 1 is the resulting `user_version`.

use rusqlite::Connection;

use super::StoreError;

pub(super) const MIGRATIONS: &[&str] = &[
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
    // 3: every applied spec per host, and rollouts with their per-host steps.
    "CREATE TABLE deployment_revisions (
        id            INTEGER PRIMARY KEY AUTOINCREMENT,
        host          TEXT NOT NULL REFERENCES hosts(name) ON DELETE CASCADE,
        name          TEXT NOT NULL,
        config_hash   TEXT NOT NULL,
        image         TEXT NOT NULL,
        db_image      TEXT NOT NULL,
        image_ids     TEXT NOT NULL,
        params        TEXT NOT NULL,
        outcome       TEXT NOT NULL,
        detail        TEXT NOT NULL,
        at            INTEGER NOT NULL
    );
    CREATE INDEX revisions_by_host ON deployment_revisions(host, id);
    CREATE TABLE rollouts (
        id            INTEGER PRIMARY KEY AUTOINCREMENT,
        state         TEXT NOT NULL,
        active        INTEGER GENERATED ALWAYS AS (state IN ('running', 'paused', 'aborting')) VIRTUAL,
        holder        TEXT NOT NULL,
        params        TEXT NOT NULL,
        created_at    INTEGER NOT NULL,
        updated_at    INTEGER NOT NULL
    );
    CREATE UNIQUE INDEX one_active_rollout ON rollouts(active) WHERE active;
    CREATE TABLE rollout_steps (
        rollout_id    INTEGER NOT NULL REFERENCES rollouts(id) ON DELETE CASCADE,
        host          TEXT NOT NULL REFERENCES hosts(name),
        position      INTEGER NOT NULL,
        batch         INTEGER NOT NULL,
        canary        INTEGER NOT NULL,
        phase         TEXT NOT NULL,
        from_revision INTEGER REFERENCES deployment_revisions(id),
        to_revision   INTEGER REFERENCES deployment_revisions(id),
        detail        TEXT NOT NULL,
        updated_at    INTEGER NOT NULL,
        PRIMARY KEY (rollout_id, host)
    );
    ALTER TABLE events ADD COLUMN rollout_id INTEGER REFERENCES rollouts(id);
    INSERT INTO deployment_revisions (host, name, config_hash, image, db_image, image_ids,
        params, outcome, detail, at)
    SELECT host, name, config_hash, image, db_image, image_ids,
        json_object('host', host, 'name', name, 'private_ip', private_ip,
            'public_ip', public_ip, 'pbx', pbx, 'data_path', data_path,
            'storage_dir', storage_dir, 'image', image, 'db_image', db_image,
            'image_ids', json(image_ids), 'config_hash', config_hash, 'users', users,
            'overridden', json(overridden), 'deployed_at', deployed_at),
        'applied', 'recorded before revisions were kept', deployed_at
    FROM deployments;",
    // 4: the daemon's health history, one point per host and minute (older
    // points thinned to one per ten minutes, see store::health).
    "CREATE TABLE health_history (
        host                   TEXT NOT NULL REFERENCES hosts(name) ON DELETE CASCADE,
        at                     INTEGER NOT NULL,
        agent_up               INTEGER NOT NULL,
        im_healthy             INTEGER,
        cpu_busy               REAL,
        memory_available_bytes INTEGER,
        memory_total_bytes     INTEGER,
        data_used              REAL,
        load1                  REAL,
        PRIMARY KEY (host, at)
    ) WITHOUT ROWID;
    CREATE INDEX health_by_time ON health_history(at);
    CREATE INDEX events_by_time ON events(at);",
    // 5: every certificate the CA issued, and whether it is still accepted
    // (see store::certificates). Hosts bootstrapped before have their
    // current one recorded.
    "CREATE TABLE certificates (
        serial        TEXT PRIMARY KEY,
        host          TEXT,
        role          TEXT NOT NULL,
        key_sha256    TEXT NOT NULL,
        not_before    INTEGER NOT NULL,
        not_after     INTEGER NOT NULL,
        state         TEXT NOT NULL,
        issued_at     INTEGER NOT NULL,
        changed_at    INTEGER NOT NULL
    );
    CREATE INDEX certificates_by_host ON certificates(host, state);
    INSERT INTO certificates (serial, host, role, key_sha256, not_before, not_after, state,
        issued_at, changed_at)
    SELECT cert_serial, name, 'agent', '', bootstrapped_at, cert_not_after, 'current',
        bootstrapped_at, bootstrapped_at
    FROM hosts WHERE cert_serial != '';",
    // 6: operators' certificates (role `operator`) name the person they
    // were issued to; see store::operators.
    "ALTER TABLE certificates ADD COLUMN holder TEXT;
    CREATE INDEX certificates_by_holder ON certificates(holder, state);",
];

/// Brings the schema up to date. Several processes may open one database at
/// once: the version is read under the write lock, so each migration runs
/// exactly once.
pub(super) fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let known = MIGRATIONS.len() as i64;
    let version = |c: &Connection| -> Result<i64, StoreError> {
        Ok(c.pragma_query_value(None, "user_version", |r| r.get(0))?)
    };
    let found = version(conn)?;
    if found > known {
        return Err(StoreError::TooNew { found, known });
    }
    if found == known {
        return Ok(());
    }
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let found = version(&tx)?;
    if found > known {
        return Err(StoreError::TooNew { found, known });
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", index as i64 + 1)?;
    }
    Ok(tx.commit()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_2_database_keeps_its_rows_when_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(MIGRATIONS[0]).unwrap();
            conn.execute_batch(MIGRATIONS[1]).unwrap();
            conn.pragma_update(None, "user_version", 2).unwrap();
            conn.execute(
                "INSERT INTO events (at, host, kind, detail) VALUES (1, 'im1', 'deploy', 'x')",
                [],
            )
            .unwrap();
            conn.execute_batch(
                "INSERT INTO hosts VALUES ('im1', '10.0.0.5', 7443, NULL, NULL, '0.1.0', 'ab',
                    '01', 2000000000, 'systemd', 1, NULL);
                 INSERT INTO deployments VALUES ('im1', 'portsip-im', '10.0.0.5', '203.0.113.5',
                    '10.0.0.2', '/var/lib/portsip', NULL, 'portsip/pbx:22',
                    'portsip/postgresql:14.12', '{\"im\":\"sha256:ab\"}', 'h1', 5000, '[]', 42);",
            )
            .unwrap();
        }
        let mut conn = Connection::open(&path).unwrap();
        migrate(&mut conn).unwrap();
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
        let kept: i64 = conn
            .query_row(
                "SELECT count(*) FROM events WHERE rollout_id IS NULL",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(kept, 1);
        // The deployment that ran before the upgrade is its first revision.
        let params: String = conn
            .query_row(
                "SELECT params FROM deployment_revisions WHERE host = 'im1'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        let first: crate::store::DeploymentRecord = serde_json::from_str(&params).unwrap();
        assert_eq!(
            (
                first.config_hash.as_str(),
                first.image_ids["im"].as_str(),
                first.deployed_at
            ),
            ("h1", "sha256:ab", 42)
        );
    }
}
