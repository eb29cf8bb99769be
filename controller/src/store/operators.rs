//! Operators: people whose certificate (role `operator`) lets their CLI use
//! the daemon's API from any PBX node. Their certificates are rows of
//! `certificates` with a holder; the daemon accepts a client certificate
//! only while its row is `current`, so a revocation takes effect on the
//! next request, also on a connection already open.

use rusqlite::{OptionalExtension, params};
use serde::Serialize;

use super::certificates::{CertificateRecord, CertificateState, insert};
use super::events::{EventKind, insert_event};
use super::{Store, StoreError};

/// One operator certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Operator {
    pub name: String,
    pub serial: String,
    pub state: CertificateState,
    /// Unix seconds.
    pub not_after: i64,
    pub issued_at: i64,
    pub changed_at: i64,
}

impl Store {
    /// Records an operator certificate just issued (before it is written
    /// out), with its event. Refused when `name` holds an accepted one: two
    /// live certificates for one name would make `revoke` ambiguous.
    pub async fn add_operator(
        &self,
        name: &str,
        cert: &CertificateRecord,
    ) -> Result<(), StoreError> {
        let (name, cert) = (name.to_owned(), cert.clone());
        self.call(move |c| {
            let tx = c.transaction()?;
            let held: Option<String> = tx
                .query_row(
                    "SELECT serial FROM certificates
                     WHERE holder = ?1 AND role = 'operator' AND state = 'current'",
                    [&name],
                    |r| r.get(0),
                )
                .optional()?;
            if let Some(serial) = held {
                return Err(StoreError::OperatorExists { name, serial });
            }
            insert(&tx, &cert)?;
            tx.execute(
                "UPDATE certificates SET holder = ?2 WHERE serial = ?1",
                params![cert.serial, name],
            )?;
            insert_event(
                &tx,
                None,
                EventKind::OperatorAdded,
                &format!("operator {name}: certificate {} issued", cert.serial),
                None,
            )?;
            Ok(tx.commit()?)
        })
        .await
    }

    /// Every operator certificate, by name and age.
    pub async fn operators(&self) -> Result<Vec<Operator>, StoreError> {
        self.call(|c| {
            let mut stmt = c.prepare(
                "SELECT holder, serial, state, not_after, issued_at, changed_at
                 FROM certificates WHERE role = 'operator' AND holder IS NOT NULL
                 ORDER BY holder, issued_at, serial",
            )?;
            let rows = stmt.query_map([], |r| {
                let state: String = r.get(2)?;
                Ok(Operator {
                    name: r.get(0)?,
                    serial: r.get(1)?,
                    state: CertificateState::parse(&state).unwrap_or(CertificateState::Revoked),
                    not_after: r.get(3)?,
                    issued_at: r.get(4)?,
                    changed_at: r.get(5)?,
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    /// Revokes every accepted certificate of operator `name`; how many.
    /// Zero when there was none (revoked already, or an unknown name: the
    /// caller tells which from [`Store::operators`]).
    pub async fn revoke_operator(&self, name: &str, now: i64) -> Result<usize, StoreError> {
        let name = name.to_owned();
        self.call(move |c| {
            let tx = c.transaction()?;
            let revoked = tx.execute(
                "UPDATE certificates SET state = 'revoked', changed_at = ?2
                 WHERE holder = ?1 AND role = 'operator' AND state = 'current'",
                params![name, now],
            )?;
            if revoked > 0 {
                insert_event(
                    &tx,
                    None,
                    EventKind::OperatorRevoked,
                    &format!("operator {name}: {revoked} certificate(s) revoked"),
                    None,
                )?;
            }
            tx.commit()?;
            Ok(revoked)
        })
        .await
    }

    /// The operator a client certificate belongs to while it is accepted:
    /// its serial recorded for an operator, current, unexpired at `now`,
    /// and the key it holds the one issued (a serial alone is no secret).
    /// `None` for anything else.
    pub async fn accepted_operator(
        &self,
        serial: &str,
        key_sha256: &str,
        now: i64,
    ) -> Result<Option<String>, StoreError> {
        let (serial, key) = (serial.to_ascii_lowercase(), key_sha256.to_owned());
        self.call(move |c| {
            Ok(c.query_row(
                "SELECT holder FROM certificates
                 WHERE serial = ?1 AND key_sha256 = ?2 AND role = 'operator'
                   AND state = 'current' AND not_after > ?3",
                params![serial, key, now],
                |r| r.get(0),
            )
            .optional()?)
        })
        .await
    }

    /// Revokes one operator certificate (one issued but never handed out).
    pub async fn revoke_operator_certificate(
        &self,
        serial: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        let serial = serial.to_ascii_lowercase();
        self.call(move |c| {
            c.execute(
                "UPDATE certificates SET state = 'revoked', changed_at = ?2
                 WHERE serial = ?1 AND role = 'operator'",
                params![serial, now],
            )?;
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::EventQuery;
    use crate::store::tests::open;

    fn cert(serial: &str, role: &str) -> CertificateRecord {
        CertificateRecord {
            serial: serial.into(),
            host: None,
            role: role.into(),
            key_sha256: "k".into(),
            not_before: 0,
            not_after: 100,
            state: CertificateState::Current,
            issued_at: 1,
            changed_at: 1,
        }
    }

    #[tokio::test]
    async fn an_operator_is_accepted_until_revoked_and_one_name_holds_one_certificate() {
        let (_dir, store) = open();
        store
            .add_operator("alice", &cert("0a", "operator"))
            .await
            .unwrap();
        assert_eq!(
            store
                .accepted_operator("0A", "k", 50)
                .await
                .unwrap()
                .as_deref(),
            Some("alice")
        );
        // Another key under the serial, or past its expiry: refused.
        assert_eq!(
            store.accepted_operator("0a", "other", 50).await.unwrap(),
            None
        );
        assert_eq!(store.accepted_operator("0a", "k", 100).await.unwrap(), None);
        let twice = store.add_operator("alice", &cert("0b", "operator")).await;
        assert!(
            matches!(twice, Err(StoreError::OperatorExists { ref serial, .. }) if serial == "0a"),
            "{twice:?}"
        );
        assert_eq!(store.accepted_operator("0b", "k", 50).await.unwrap(), None);

        assert_eq!(store.revoke_operator("alice", 5).await.unwrap(), 1);
        assert_eq!(store.accepted_operator("0a", "k", 50).await.unwrap(), None);
        assert_eq!(store.revoke_operator("alice", 6).await.unwrap(), 0);
        // A new certificate for the name once the old one is revoked.
        store
            .add_operator("alice", &cert("0c", "operator"))
            .await
            .unwrap();
        let listed = store.operators().await.unwrap();
        let states: Vec<_> = listed
            .iter()
            .map(|o| (o.serial.as_str(), o.state))
            .collect();
        assert_eq!(
            states,
            [
                ("0a", CertificateState::Revoked),
                ("0c", CertificateState::Current)
            ]
        );
        let events = store
            .query_events(EventQuery {
                host: None,
                since: 0,
                after_id: 0,
                limit: 100,
            })
            .await
            .unwrap();
        let kinds: Vec<EventKind> = events.iter().map(|e| e.kind).collect();
        assert_eq!(
            kinds,
            [
                EventKind::OperatorAdded,
                EventKind::OperatorRevoked,
                EventKind::OperatorAdded
            ]
        );
    }

    #[tokio::test]
    async fn only_an_operator_row_makes_an_operator() {
        let (_dir, store) = open();
        store
            .record_certificate(&cert("0d", "controller"))
            .await
            .unwrap();
        assert_eq!(store.accepted_operator("0d", "k", 50).await.unwrap(), None);
    }
}
