//! The controller's own certificates and the list of them agents accept.
//!
//! `controllers.json` in the state directory records every controller
//! certificate issued (serial, expiry, revoked or not) and a version that
//! only grows. The serials neither revoked nor expired, signed by the CA
//! (`imfleet_certs::ControllerList`), go with every request to an agent; an
//! agent keeps the newest list it has verified and refuses any controller
//! certificate it does not name. A renewed controller certificate is added
//! before it is first used, and the one it replaces stays valid until it
//! expires (a running daemon may still hold it); a revoked one is dropped
//! and refused by each agent from its next contact with the controller.

use std::path::Path;

use imfleet_certs::{CertificateAuthority, CertificateInfo, ControllerList};
use serde::{Deserialize, Serialize};

/// File name inside the state directory.
pub const FILE: &str = "controllers.json";

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControllerCertificates {
    pub version: u64,
    pub certificates: Vec<ControllerCertificate>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControllerCertificate {
    pub serial: String,
    /// Unix seconds.
    pub not_after: i64,
    /// Unix seconds, when revoked.
    pub revoked_at: Option<i64>,
}

#[derive(Debug, thiserror::Error)]
pub enum ControllerListError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not a controller certificate list ({detail}); restore it from backup")]
    Corrupt { path: String, detail: String },
    #[error(
        "no controller certificate with serial {0} was issued by this state directory (see `controller certs`)"
    )]
    Unknown(String),
    #[error("cannot sign the controller list: {0}")]
    Sign(#[from] imfleet_certs::CertError),
}

impl ControllerCertificates {
    pub fn load(dir: &Path) -> Result<ControllerCertificates, ControllerListError> {
        let path = dir.join(FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| ControllerListError::Corrupt {
                path: path.display().to_string(),
                detail: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(ControllerListError::Io {
                path: path.display().to_string(),
                source,
            }),
        }
    }

    pub fn save(&self, dir: &Path) -> Result<(), ControllerListError> {
        let path = dir.join(FILE);
        let text = serde_json::to_string_pretty(self).unwrap_or_default();
        imfleet_certs::storage::write_atomically(&path, text.as_bytes(), 0o644).map_err(|source| {
            ControllerListError::Io {
                path: path.display().to_string(),
                source,
            }
        })
    }

    /// Records `current` (the identity in use) and forgets entries expired
    /// for a day; true when anything changed (the version then grew).
    pub fn observe(&mut self, current: &CertificateInfo, now: i64) -> bool {
        let before = self.certificates.len();
        self.certificates.retain(|c| c.not_after + 86_400 > now);
        let mut changed = self.certificates.len() != before;
        if !self
            .certificates
            .iter()
            .any(|c| c.serial == current.serial_hex)
        {
            self.certificates.push(ControllerCertificate {
                serial: current.serial_hex.clone(),
                not_after: current.not_after.unix_timestamp(),
                revoked_at: None,
            });
            changed = true;
        }
        if changed {
            self.bump(now);
        }
        changed
    }

    /// Marks `serial` revoked; false when it already was.
    pub fn revoke(&mut self, serial: &str, now: i64) -> Result<bool, ControllerListError> {
        let serial = serial.to_ascii_lowercase();
        let entry = self
            .certificates
            .iter_mut()
            .find(|c| c.serial == serial)
            .ok_or(ControllerListError::Unknown(serial))?;
        if entry.revoked_at.is_some() {
            return Ok(false);
        }
        entry.revoked_at = Some(now);
        self.bump(now);
        Ok(true)
    }

    fn bump(&mut self, now: i64) {
        let millis = u64::try_from(now).unwrap_or_default() * 1000;
        self.version = (self.version + 1).max(millis);
    }

    /// The serials agents accept now, and those revoked not yet expired.
    pub fn accepted(&self, now: i64) -> ControllerList {
        let live = self.certificates.iter().filter(|c| c.not_after > now);
        ControllerList {
            version: self.version,
            serials: live
                .clone()
                .filter(|c| c.revoked_at.is_none())
                .map(|c| c.serial.clone())
                .collect(),
            revoked: live
                .filter(|c| c.revoked_at.is_some())
                .map(|c| (c.serial.clone(), c.not_after))
                .collect(),
        }
    }

    /// The accepted list signed by `ca`, as requests carry it.
    pub fn signed(
        &self,
        ca: &CertificateAuthority,
        now: i64,
    ) -> Result<String, ControllerListError> {
        Ok(self.accepted(now).sign(ca)?)
    }
}

/// Revokes every controller certificate but `keep` (the end of a CA
/// rotation: the old CA's are refused from then on). Hold the state lock.
pub fn revoke_all_but(dir: &Path, keep: &str) -> Result<(), ControllerListError> {
    let mut certificates = ControllerCertificates::load(dir)?;
    let now = crate::now_unix();
    let others: Vec<String> = certificates
        .certificates
        .iter()
        .filter(|c| c.serial != keep && c.revoked_at.is_none())
        .map(|c| c.serial.clone())
        .collect();
    for serial in others {
        certificates.revoke(&serial, now)?;
    }
    certificates.save(dir)
}

/// What revoking a controller certificate did.
#[derive(Debug, Serialize)]
pub struct Revoked {
    pub serial: String,
    /// False when it was revoked already.
    pub changed: bool,
    /// The controller certificate in use now.
    pub controller_serial: String,
    /// The version of the list agents must hold to refuse it.
    pub list_version: u64,
    /// Each host, and whether its agent holds that list now.
    pub hosts: Vec<Told>,
}

#[derive(Debug, Serialize)]
pub struct Told {
    pub host: String,
    pub holds_list: bool,
    pub error: Option<String>,
}

/// Revokes the controller certificate `serial` (issuing a new one first if
/// it is the one in use) and tells every reachable agent.
pub async fn revoke(dir: &Path, serial: &str) -> Result<Revoked, crate::state::StateError> {
    let (state, changed) = crate::state::revoke_controller(dir, serial)?;
    let list_version = ControllerCertificates::load(dir)?.version;
    let fleet = crate::fleet::Fleet::new(&state);
    let hosts = fleet.store().hosts().await?;
    let hosts = crate::fleet::ops::ping(&fleet, &hosts)
        .await
        .into_iter()
        .map(|s| Told {
            holds_list: s.controllers_version.is_some_and(|v| v >= list_version),
            host: s.host,
            error: s.error,
        })
        .collect();
    Ok(Revoked {
        serial: serial.to_ascii_lowercase(),
        changed,
        controller_serial: imfleet_certs::inspect_pem(&state.identity.cert_pem)
            .map(|i| i.serial_hex)
            .unwrap_or_default(),
        list_version,
        hosts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(ca: &CertificateAuthority) -> CertificateInfo {
        let id = ca
            .issue_controller(
                "c",
                imfleet_certs::Validity::starting_now(imfleet_certs::CONTROLLER_LIFETIME),
            )
            .unwrap();
        imfleet_certs::inspect_pem(&id.cert_pem).unwrap()
    }

    #[test]
    fn renewal_adds_revocation_drops_and_the_version_only_grows() {
        let ca = CertificateAuthority::generate("CA").unwrap();
        let now = crate::now_unix();
        let mut list = ControllerCertificates::default();
        let first = info(&ca);
        assert!(list.observe(&first, now));
        let v1 = list.version;
        assert!(!list.observe(&first, now), "nothing new");
        let second = info(&ca);
        assert!(list.observe(&second, now));
        let v2 = list.version;
        assert!(v2 > v1);
        assert_eq!(list.accepted(now).serials.len(), 2);

        assert!(list.revoke(&first.serial_hex, now).unwrap());
        assert!(!list.revoke(&first.serial_hex, now).unwrap());
        assert!(list.version > v2);
        assert_eq!(list.accepted(now).serials, vec![second.serial_hex.clone()]);
        assert_eq!(list.accepted(now).revoked[0].0, first.serial_hex);
        assert!(matches!(
            list.revoke("00ff", now),
            Err(ControllerListError::Unknown(_))
        ));
        // Expired a day ago: gone from the record.
        let later = first.not_after.unix_timestamp() + 2 * 86_400;
        list.observe(&second, later);
        assert!(list.certificates.len() <= 1);

        let signed = list.signed(&ca, now).unwrap();
        let verified = ControllerList::verify(&signed, ca.cert_pem()).unwrap();
        assert_eq!(verified.version, list.version);
    }
}
