//! Bootstrapped hosts.

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

use super::certificates::{self, CertificateRecord};
use super::events::{EventKind, insert_event};
use super::{Store, StoreError};

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

/// What a host said of itself (its agent's version, how it is supervised),
/// as it is kept: root on the host chooses it, so it is printable and short.
fn reported(text: &str) -> String {
    crate::text::printable(text, MAX_REPORTED_CHARS).into_owned()
}

/// Longest version or supervision text kept of a host.
const MAX_REPORTED_CHARS: usize = 64;

fn upsert(conn: &Connection, host: &HostRecord) -> rusqlite::Result<()> {
    conn.execute(
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
            reported(&host.agent_version),
            host.agent_sha256,
            host.cert_serial,
            host.cert_not_after,
            reported(&host.supervision),
            host.bootstrapped_at,
            host.last_seen_at,
        ],
    )?;
    Ok(())
}

impl Store {
    pub async fn upsert_host(&self, host: &HostRecord) -> Result<(), StoreError> {
        let host = host.clone();
        self.call(move |c| Ok(upsert(c, &host)?)).await
    }

    /// Records a (re-)bootstrapped host, the certificate it serves (now its
    /// only accepted one) and its event together.
    pub async fn record_bootstrap(
        &self,
        host: &HostRecord,
        certificate: &CertificateRecord,
        detail: &str,
    ) -> Result<(), StoreError> {
        let (host, certificate, detail) = (host.clone(), certificate.clone(), detail.to_owned());
        self.call(move |c| {
            let tx = c.transaction()?;
            upsert(&tx, &host)?;
            certificates::insert(&tx, &certificate)?;
            certificates::make_current(&tx, &host.name, &certificate.serial, host.bootstrapped_at)?;
            insert_event(&tx, Some(&host.name), EventKind::Bootstrap, &detail, None)?;
            Ok(tx.commit()?)
        })
        .await
    }

    /// Finds a host by its name, or failing that by its agent address.
    pub async fn host(&self, name_or_address: &str) -> Result<Option<HostRecord>, StoreError> {
        let key = name_or_address.to_owned();
        self.call(move |c| {
            Ok(c.query_row(
                &format!(
                    "SELECT {HOST_COLUMNS} FROM hosts WHERE name = ?1
                     UNION ALL SELECT {HOST_COLUMNS} FROM hosts WHERE agent_address = ?1 LIMIT 1"
                ),
                [key],
                host_from_row,
            )
            .optional()?)
        })
        .await
    }

    pub async fn hosts(&self) -> Result<Vec<HostRecord>, StoreError> {
        self.call(|c| {
            let mut stmt = c.prepare(&format!("SELECT {HOST_COLUMNS} FROM hosts ORDER BY name"))?;
            let rows = stmt.query_map([], host_from_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    /// Notes that the agent answered at `at` with `version`.
    pub async fn mark_seen(&self, name: &str, at: i64, version: &str) -> Result<(), StoreError> {
        let (name, version) = (name.to_owned(), version.to_owned());
        self.call(move |c| Ok(set_seen(c, &name, at, &version)?))
            .await
    }
}

pub(super) fn set_seen(
    c: &rusqlite::Connection,
    name: &str,
    at: i64,
    version: &str,
) -> rusqlite::Result<()> {
    c.execute(
        "UPDATE hosts SET last_seen_at = ?2, agent_version = ?3 WHERE name = ?1",
        params![name, at, reported(version)],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::store::tests::{certificate_of, host, open};

    #[tokio::test]
    async fn hosts_upsert_and_lookup_by_name_or_address() {
        let (_dir, store) = open();
        store.upsert_host(&host("im1", "10.0.0.5")).await.unwrap();
        let im2 = host("im2", "10.0.0.6");
        store
            .record_bootstrap(&im2, &certificate_of(&im2), "agent 0.1.0")
            .await
            .unwrap();
        let mut changed = host("im1", "10.0.0.7");
        changed.agent_version = "0.2.0".into();
        store.upsert_host(&changed).await.unwrap();

        assert_eq!(store.hosts().await.unwrap().len(), 2);
        assert_eq!(store.host("im1").await.unwrap().unwrap(), changed);
        assert_eq!(store.host("10.0.0.6").await.unwrap().unwrap().name, "im2");
        assert!(store.host("10.0.0.5").await.unwrap().is_none());

        store.mark_seen("im2", 42, "0.3.0").await.unwrap();
        let im2 = store.host("im2").await.unwrap().unwrap();
        assert_eq!(
            (im2.last_seen_at, im2.agent_version.as_str()),
            (Some(42), "0.3.0")
        );
        let events = store.events("im2", 10).await.unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].kind, crate::store::EventKind::Bootstrap);
    }
}
