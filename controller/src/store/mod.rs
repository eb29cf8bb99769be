//! The controller's SQLite state database: hosts, deployments with every
//! applied revision, rollouts with their per-host steps, and an append-only
//! event log. Schema changes are numbered migrations tracked in
//! `PRAGMA user_version`, so an old database upgrades in place.
//!
//! One thread owns the connection; [`Store`] is a cheap, cloneable handle
//! any task may use. A change and the event that tells of it are written in
//! one transaction.

/// Names stored for a field-less enum, `as_str`/`parse`/`ALL`: the names
/// are the schema and never change meaning.
macro_rules! named {
    ($ty:ident { $($variant:ident => $name:literal),+ $(,)? }) => {
        impl $ty {
            pub const ALL: &'static [$ty] = &[$($ty::$variant),+];
            pub fn as_str(self) -> &'static str {
                match self { $($ty::$variant => $name),+ }
            }
            pub fn parse(text: &str) -> Option<$ty> {
                match text { $($name => Some($ty::$variant),)+ _ => None }
            }
        }
    };
}

mod certificates;
mod deployments;
mod events;
mod health;
mod hosts;
mod migrations;
mod operators;
mod rollouts;

use std::path::Path;
use std::sync::mpsc;

use rusqlite::Connection;

pub use certificates::{CertificateRecord, CertificateState};
pub use deployments::{DeploymentRecord, Outcome, Revision};
pub use events::{Event, EventKind, EventQuery};
pub use health::{
    HealthPoint, MAX_HEALTH_EVENTS_PER_HOST, Observed, STEP_SECONDS as HEALTH_STEP_SECONDS,
};
pub use hosts::HostRecord;
pub use operators::Operator;
pub use rollouts::{PlannedStep, Rollout, RolloutState, RolloutStep, StepPhase};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state database {path}: {source}")]
    Open {
        path: String,
        source: rusqlite::Error,
    },
    #[error("state database {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("state database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("certificate {serial} was not issued to {host}, or is no longer accepted")]
    NotIssued { host: String, serial: String },
    #[error(
        "{host} is part of rollout {rollout}, which is not finished; finish it (`controller upgrade --resume`) or abort it (`controller upgrade --abort`) first (nothing was changed)"
    )]
    HostInRollout { host: String, rollout: i64 },
    #[error(
        "state database schema version {found} is newer than this controller understands ({known}); upgrade the controller"
    )]
    TooNew { found: i64, known: i64 },
    #[error(
        "the linked SQLite {0} has the WAL-reset corruption bug (fixed in 3.51.3, 3.50.7 and 3.44.6); rebuild imfleet with its bundled SQLite"
    )]
    UnsafeSqlite(&'static str),
    #[error(
        "operator {name} holds certificate {serial} already; revoke it first (`controller operators revoke {name}`) or choose another name (nothing was changed)"
    )]
    OperatorExists { name: String, serial: String },
    #[error("state database: the store thread has stopped")]
    Closed,
    #[error("state database: {what} holds a value this controller does not know: {value}")]
    Corrupt { what: &'static str, value: String },
    #[error(
        "rollout {id} is in progress (run by {holder}, started at {started_at}); resume it with `controller upgrade --resume` or stop it with `controller upgrade --abort`"
    )]
    RolloutActive {
        id: i64,
        holder: String,
        started_at: i64,
    },
}

/// The first SQLite releases without the WAL-reset race (two connections
/// writing or checkpointing one WAL at once could corrupt it, 3.7.0 to
/// 3.51.2): 3.51.3, and the backports 3.50.7 and 3.44.6.
const WAL_RESET_FIXED: [(i32, i32); 3] = [
    (3_051_003, i32::MAX),
    (3_050_007, 3_051_000),
    (3_044_006, 3_045_000),
];

/// Whether SQLite `version` (as `sqlite3_libversion_number`) has the fix.
pub fn has_wal_reset_fix(version: i32) -> bool {
    WAL_RESET_FIXED
        .iter()
        .any(|&(first, end)| (first..end).contains(&version))
}

/// How every connection to the state database behaves; the reasons are in
/// ARCHITECTURE.md ("The state database").
fn configure(conn: &mut Connection) -> Result<(), StoreError> {
    // A writer waits for another process's transaction instead of failing.
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // Every commit is on disk before it returns: a rollout phase is written
    // before the side effect it names, and must survive a power cut.
    conn.pragma_update(None, "synchronous", "FULL")?;
    // No memory-mapped I/O: other processes write the same file, and an I/O
    // error on a mapped page is a SIGBUS instead of an error.
    conn.pragma_update(None, "mmap_size", 0)?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // Every transaction takes the write lock when it begins: a deferred one
    // that read first cannot upgrade once another process has written
    // (SQLITE_BUSY at once, the busy timeout never consulted).
    conn.set_transaction_behavior(rusqlite::TransactionBehavior::Immediate);
    Ok(())
}

/// How long a write waits for other processes' transactions.
const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

type Job = Box<dyn FnOnce(&mut Connection) + Send>;

/// A handle on the state database, usable from any task.
#[derive(Debug, Clone)]
pub struct Store {
    jobs: mpsc::Sender<Job>,
}

impl Store {
    /// Opens (creating if needed, mode 0600) and migrates the database, then
    /// hands the connection to its own thread.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let linked = rusqlite::version_number();
        if !has_wal_reset_fix(linked) {
            return Err(StoreError::UnsafeSqlite(rusqlite::version()));
        }
        if !path.exists() {
            imfleet_certs::storage::create_private_file(path).map_err(|source| StoreError::Io {
                path: path.display().to_string(),
                source,
            })?;
        }
        let mut conn = Connection::open(path).map_err(|source| StoreError::Open {
            path: path.display().to_string(),
            source,
        })?;
        configure(&mut conn)?;
        migrations::migrate(&mut conn)?;
        let (jobs, queue) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("imfleet-store".into())
            .spawn(move || {
                // Ends when the last handle is dropped.
                for job in queue {
                    job(&mut conn);
                }
            })
            .map_err(|source| StoreError::Io {
                path: path.display().to_string(),
                source,
            })?;
        Ok(Store { jobs })
    }

    /// Runs `f` on the store thread and waits for its answer.
    async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move |conn| {
                let _ = reply.send(f(conn));
            }))
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    pub async fn schema_version(&self) -> Result<i64, StoreError> {
        self.call(|c| Ok(c.pragma_query_value(None, "user_version", |r| r.get(0))?))
            .await
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn host(name: &str, address: &str) -> HostRecord {
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

    /// The certificate `host` serves, as bootstrap records it.
    pub(crate) fn certificate_of(host: &HostRecord) -> CertificateRecord {
        CertificateRecord {
            serial: host.cert_serial.clone(),
            host: Some(host.name.clone()),
            role: "agent".into(),
            key_sha256: String::new(),
            not_before: host.bootstrapped_at,
            not_after: host.cert_not_after,
            state: CertificateState::Current,
            issued_at: host.bootstrapped_at,
            changed_at: host.bootstrapped_at,
        }
    }

    /// The kinds of a host's recent events, newest first.
    pub(crate) async fn kinds(store: &Store, host: &str) -> Vec<EventKind> {
        let events = store.events(host, 100).await.unwrap();
        events.iter().map(|e| e.kind).collect()
    }

    pub(crate) fn open() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state.db")).unwrap();
        (dir, store)
    }

    #[tokio::test]
    async fn reopening_is_idempotent_and_a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        drop(Store::open(&path).unwrap());
        let store = Store::open(&path).unwrap();
        assert_eq!(
            store.schema_version().await.unwrap(),
            migrations::MIGRATIONS.len() as i64
        );
        store
            .call(|c| Ok(c.pragma_update(None, "user_version", 999)?))
            .await
            .unwrap();
        drop(store);
        assert!(matches!(
            Store::open(&path),
            Err(StoreError::TooNew { found: 999, .. })
        ));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn sqlite_releases_with_and_without_the_wal_reset_fix() {
        for fixed in [
            3_051_003, 3_054_001, 3_050_007, 3_050_009, 3_044_006, 4_000_000,
        ] {
            assert!(has_wal_reset_fix(fixed), "{fixed}");
        }
        for broken in [
            3_007_000, 3_044_005, 3_045_000, 3_050_002, 3_050_006, 3_051_002,
        ] {
            assert!(!has_wal_reset_fix(broken), "{broken}");
        }
    }

    #[tokio::test]
    async fn an_unwritable_place_is_an_io_error_naming_the_path() {
        let err = Store::open(Path::new("/proc/imfleet-no/state.db")).unwrap_err();
        assert!(matches!(err, StoreError::Io { .. }), "{err:?}");
        assert!(err.to_string().contains("/proc/imfleet-no/state.db"));
    }

    #[tokio::test]
    async fn many_tasks_share_one_handle() {
        let (_dir, store) = open();
        store.upsert_host(&host("im1", "10.0.0.5")).await.unwrap();
        let writers = (0..32).map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .record_event(Some("im1"), EventKind::Start, &format!("n{i}"))
                    .await
            })
        });
        for w in writers {
            w.await.unwrap().unwrap();
        }
        assert_eq!(store.events("im1", 100).await.unwrap().len(), 32);
    }
}
