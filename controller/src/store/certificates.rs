//! Every certificate the CA issued, and whether it is still accepted. An
//! agent certificate is `issued` when it is signed (before it leaves the
//! controller), `current` once the agent is seen serving it, and the one it
//! replaced `superseded` at that moment; the controller accepts only a
//! host's current one. A crash between signing and confirming leaves an
//! `issued` record, confirmed the next time the agent presents it.

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

use super::events::{EventKind, insert_event};
use super::{Store, StoreError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CertificateState {
    /// Signed, not yet seen in use.
    Issued,
    /// What the host serves, and the only one of it accepted.
    Current,
    /// Replaced by a renewal: refused.
    Superseded,
    /// Withdrawn by the operator: refused.
    Revoked,
}

named!(CertificateState {
    Issued => "issued",
    Current => "current",
    Superseded => "superseded",
    Revoked => "revoked",
});

/// One issued certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CertificateRecord {
    /// Lower-case hex, as the certificate carries it.
    pub serial: String,
    /// The host it was issued to; none for the controller's own.
    pub host: Option<String>,
    /// `agent` or `controller`.
    pub role: String,
    /// SHA-256 of its public key (empty for records older than this table).
    pub key_sha256: String,
    /// Unix seconds.
    pub not_before: i64,
    pub not_after: i64,
    pub state: CertificateState,
    pub issued_at: i64,
    /// When it reached its state.
    pub changed_at: i64,
}

impl CertificateRecord {
    pub fn new(
        info: &imfleet_certs::CertificateInfo,
        host: Option<&str>,
        state: CertificateState,
        now: i64,
    ) -> CertificateRecord {
        CertificateRecord {
            serial: info.serial_hex.to_ascii_lowercase(),
            host: host.map(str::to_owned),
            role: info.role.map(|r| r.as_str()).unwrap_or("none").to_owned(),
            key_sha256: info.public_key_sha256.clone(),
            not_before: info.not_before.unix_timestamp(),
            not_after: info.not_after.unix_timestamp(),
            state,
            issued_at: now,
            changed_at: now,
        }
    }
}

const COLUMNS: &str =
    "serial, host, role, key_sha256, not_before, not_after, state, issued_at, changed_at";

fn from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<CertificateRecord> {
    let state: String = row.get(6)?;
    Ok(CertificateRecord {
        serial: row.get(0)?,
        host: row.get(1)?,
        role: row.get(2)?,
        key_sha256: row.get(3)?,
        not_before: row.get(4)?,
        not_after: row.get(5)?,
        state: CertificateState::parse(&state).unwrap_or(CertificateState::Revoked),
        issued_at: row.get(7)?,
        changed_at: row.get(8)?,
    })
}

/// Records `cert` (its state as given), unless its serial is known.
pub(super) fn insert(conn: &Connection, cert: &CertificateRecord) -> rusqlite::Result<()> {
    conn.execute(
        &format!(
            "INSERT INTO certificates ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
             ON CONFLICT(serial) DO NOTHING"
        ),
        params![
            cert.serial,
            cert.host,
            cert.role,
            cert.key_sha256,
            cert.not_before,
            cert.not_after,
            cert.state.as_str(),
            cert.issued_at,
            cert.changed_at,
        ],
    )?;
    Ok(())
}

/// Makes `serial` the host's current certificate and supersedes whatever
/// else of the host was current or pending. Also moves the host's record.
pub(super) fn make_current(
    conn: &Connection,
    host: &str,
    serial: &str,
    now: i64,
) -> rusqlite::Result<()> {
    // Only what was issued before it: a renewal another process started
    // since stays acceptable until it is confirmed in its turn.
    conn.execute(
        "UPDATE certificates SET state = 'superseded', changed_at = ?3
         WHERE host = ?1 AND serial != ?2 AND state IN ('issued', 'current')
           AND rowid < (SELECT rowid FROM certificates WHERE serial = ?2)",
        params![host, serial, now],
    )?;
    conn.execute(
        "UPDATE certificates SET state = 'current', changed_at = ?3
         WHERE host = ?1 AND serial = ?2 AND state != 'current'",
        params![host, serial, now],
    )?;
    conn.execute(
        "UPDATE hosts SET cert_serial = ?2,
            cert_not_after = (SELECT not_after FROM certificates WHERE serial = ?2)
         WHERE name = ?1",
        params![host, serial],
    )?;
    Ok(())
}

fn host_exists(conn: &Connection, host: &str) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM hosts WHERE name = ?1)",
        [host],
        |r| r.get(0),
    )
}

impl Store {
    /// Records a certificate just signed, before it leaves the controller;
    /// refused for a host no longer known (forgotten meanwhile).
    pub async fn record_certificate(&self, cert: &CertificateRecord) -> Result<(), StoreError> {
        let cert = cert.clone();
        self.call(move |c| {
            let tx = c.transaction()?;
            if let Some(host) = &cert.host
                && !host_exists(&tx, host)?
            {
                return Err(StoreError::NotIssued {
                    host: host.clone(),
                    serial: cert.serial,
                });
            }
            insert(&tx, &cert)?;
            Ok(tx.commit()?)
        })
        .await
    }

    /// How many certificates issued to `host` since `since` are still
    /// unconfirmed (renewals its agent has not taken).
    pub async fn unconfirmed_certificates(
        &self,
        host: &str,
        since: i64,
    ) -> Result<usize, StoreError> {
        let host = host.to_owned();
        self.call(move |c| {
            Ok(c.query_row(
                "SELECT COUNT(*) FROM certificates
                 WHERE host = ?1 AND issued_at >= ?2 AND state = 'issued'",
                params![host, since],
                |r| r.get::<_, i64>(0),
            )? as usize)
        })
        .await
    }

    pub async fn certificate(&self, serial: &str) -> Result<Option<CertificateRecord>, StoreError> {
        let serial = serial.to_ascii_lowercase();
        self.call(move |c| {
            Ok(c.query_row(
                &format!("SELECT {COLUMNS} FROM certificates WHERE serial = ?1"),
                [serial],
                from_row,
            )
            .optional()?)
        })
        .await
    }

    /// Every certificate, by host (the controller's first) and age.
    pub async fn certificates(&self) -> Result<Vec<CertificateRecord>, StoreError> {
        self.call(|c| {
            let mut stmt = c.prepare(&format!(
                "SELECT {COLUMNS} FROM certificates ORDER BY host IS NOT NULL, host, issued_at, serial"
            ))?;
            let rows = stmt.query_map([], from_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    /// The agent of `host` was seen serving `serial`, which the CA issued to
    /// it: from now on only that one is accepted. Returns false when it was
    /// current already.
    pub async fn confirm_certificate(
        &self,
        host: &str,
        serial: &str,
        now: i64,
    ) -> Result<bool, StoreError> {
        let (host, serial) = (host.to_owned(), serial.to_ascii_lowercase());
        self.call(move |c| {
            let tx = c.transaction()?;
            let state: Option<String> = tx
                .query_row(
                    "SELECT state FROM certificates WHERE serial = ?1 AND host = ?2",
                    params![serial, host],
                    |r| r.get(0),
                )
                .optional()?;
            if !host_exists(&tx, &host)? {
                return Err(StoreError::NotIssued { host, serial });
            }
            let changed = match state.as_deref() {
                Some("current") => false,
                Some("issued") => {
                    make_current(&tx, &host, &serial, now)?;
                    insert_event(
                        &tx,
                        Some(&host),
                        EventKind::CertificateRenewed,
                        &format!("the agent serves certificate {serial}; the previous one is refused from now on"),
                        None,
                    )?;
                    true
                }
                _ => return Err(StoreError::NotIssued { host, serial }),
            };
            tx.commit()?;
            Ok(changed)
        })
        .await
    }
}

impl Store {
    /// Forgets a host (decommission): revokes every certificate of it still
    /// accepted (superseded ones are refused already), removes it with its deployments, history and rollout steps, and
    /// records the event. Refused while a rollout holds the host. Returns
    /// how many certificates were revoked.
    pub async fn forget_host(&self, host: &str, now: i64) -> Result<usize, StoreError> {
        let host = host.to_owned();
        self.call(move |c| {
            let tx = c.transaction()?;
            if let Some(rollout) = super::rollouts::active_rollout_holding(&tx, &host)? {
                return Err(StoreError::HostInRollout { host, rollout });
            }
            let revoked = tx.execute(
                "UPDATE certificates SET state = 'revoked', changed_at = ?2
                 WHERE host = ?1 AND state IN ('issued', 'current')",
                params![host, now],
            )?;
            tx.execute("DELETE FROM rollout_steps WHERE host = ?1", [&host])?;
            tx.execute("DELETE FROM hosts WHERE name = ?1", [&host])?;
            insert_event(
                &tx,
                Some(&host),
                EventKind::HostForgotten,
                &format!("forgotten; {revoked} certificate(s) revoked"),
                None,
            )?;
            tx.commit()?;
            Ok(revoked)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::{host, kinds, open};

    fn cert(serial: &str, host: &str, state: CertificateState) -> CertificateRecord {
        CertificateRecord {
            serial: serial.into(),
            host: Some(host.into()),
            role: "agent".into(),
            key_sha256: "ab".into(),
            not_before: 1,
            not_after: 1_000 + serial.len() as i64,
            state,
            issued_at: 1,
            changed_at: 1,
        }
    }

    #[tokio::test]
    async fn a_confirmed_renewal_supersedes_the_old_certificate_and_moves_the_host() {
        let (_dir, store) = open();
        let mut im1 = host("im1", "10.0.0.5");
        im1.cert_serial = "01".into();
        store
            .record_bootstrap(&im1, &cert("01", "im1", CertificateState::Current), "x")
            .await
            .unwrap();
        store
            .record_certificate(&cert("0202", "im1", CertificateState::Issued))
            .await
            .unwrap();
        // Another host's certificate, or one never issued, is not confirmed.
        for (h, s) in [("im2", "0202"), ("im1", "99")] {
            assert!(matches!(
                store.confirm_certificate(h, s, 5).await,
                Err(StoreError::NotIssued { .. })
            ));
        }
        assert_eq!(store.unconfirmed_certificates("im1", 0).await.unwrap(), 1);
        // Another process's renewal, issued later, is not superseded by the
        // confirmation of this one.
        store
            .record_certificate(&cert("0303", "im1", CertificateState::Issued))
            .await
            .unwrap();
        assert!(store.confirm_certificate("im1", "0202", 5).await.unwrap());
        assert_eq!(
            store.certificate("0303").await.unwrap().unwrap().state,
            CertificateState::Issued
        );
        assert!(store.confirm_certificate("im1", "0303", 5).await.unwrap());
        assert!(store.confirm_certificate("im1", "0202", 5).await.is_err());
        assert_eq!(store.unconfirmed_certificates("im1", 0).await.unwrap(), 0);
        assert!(!store.confirm_certificate("im1", "0303", 6).await.unwrap());
        let states: Vec<_> = store
            .certificates()
            .await
            .unwrap()
            .into_iter()
            .map(|c| (c.serial, c.state))
            .collect();
        assert_eq!(
            states,
            vec![
                ("01".to_owned(), CertificateState::Superseded),
                ("0202".to_owned(), CertificateState::Superseded),
                ("0303".to_owned(), CertificateState::Current)
            ]
        );
        let moved = store.host("im1").await.unwrap().unwrap();
        assert_eq!(
            (moved.cert_serial.as_str(), moved.cert_not_after),
            ("0303", 1_004)
        );
        // The superseded one can never come back.
        assert!(store.confirm_certificate("im1", "01", 7).await.is_err());
        assert!(
            kinds(&store, "im1")
                .await
                .contains(&EventKind::CertificateRenewed)
        );

        // Forgotten: every certificate of the host revoked, the host gone,
        // and nothing more recorded for it.
        assert_eq!(store.forget_host("im1", 9).await.unwrap(), 1);
        assert!(store.host("im1").await.unwrap().is_none());
        assert!(
            store
                .record_certificate(&cert("0404", "im1", CertificateState::Issued))
                .await
                .is_err()
        );
        let states: Vec<_> = store
            .certificates()
            .await
            .unwrap()
            .into_iter()
            .map(|c| c.state)
            .collect();
        use CertificateState::{Revoked, Superseded};
        assert_eq!(states, vec![Superseded, Superseded, Revoked]);
        assert!(
            kinds(&store, "im1")
                .await
                .contains(&EventKind::HostForgotten)
        );
    }
}
