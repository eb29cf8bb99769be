//! A rotation's files in the state directory. The CA in `ca.pem`/`ca.key`
//! stays where it is until the rotation finishes; the new one lives in
//! `ca.next.pem`/`ca.next.key` meanwhile, and `rotation.json` says the phase
//! (so which of the two signs). Finishing renames the new CA into place:
//! the phase `finishing` is written first, so a crash part-way is completed
//! by the next open.

use std::path::Path;

use imfleet_certs::CertificateAuthority;
use imfleet_certs::storage::write_atomically;
use serde::{Deserialize, Serialize};

use super::Phase;
use crate::state::StateError;

pub const ROTATION: &str = "rotation.json";
pub const NEXT_CERT: &str = "ca.next.pem";
pub const NEXT_KEY: &str = "ca.next.key";
/// The CA a finished rotation replaced, kept for the record (key 0600).
pub const PREVIOUS_CERT: &str = "ca.previous.pem";
pub const PREVIOUS_KEY: &str = "ca.previous.key";

/// What `rotation.json` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rotation {
    pub phase: Phase,
    /// Unix seconds.
    pub started_at: i64,
    /// SHA-256 of the new CA certificate.
    pub new_ca: String,
    /// Hosts the operator chose to go on without: they will need
    /// `controller bootstrap` once the rotation is finished.
    #[serde(default)]
    pub skipped: Vec<String>,
}

fn io(dir: &Path, name: &str) -> impl FnOnce(std::io::Error) -> StateError {
    let path = dir.join(name).display().to_string();
    move |source| StateError::Io { path, source }
}

fn read(dir: &Path, name: &str) -> Result<Option<String>, StateError> {
    match std::fs::read_to_string(dir.join(name)) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(dir, name)(e)),
    }
}

impl Rotation {
    /// The rotation under way, if any.
    pub fn load(dir: &Path) -> Result<Option<Rotation>, StateError> {
        read(dir, ROTATION)?
            .map(|text| {
                serde_json::from_str(&text).map_err(|e| StateError::Corrupt {
                    path: dir.join(ROTATION).display().to_string(),
                    detail: e.to_string(),
                })
            })
            .transpose()
    }

    pub fn save(&self, dir: &Path) -> Result<(), StateError> {
        let text = serde_json::to_string_pretty(self).unwrap_or_default();
        write_atomically(&dir.join(ROTATION), text.as_bytes(), 0o600).map_err(io(dir, ROTATION))
    }

    /// Starts a rotation: a new CA (key first, as for the first CA).
    pub fn start(dir: &Path, common_name: &str) -> Result<Rotation, StateError> {
        let ca =
            CertificateAuthority::generate(common_name).map_err(|source| StateError::Cert {
                path: dir.join(NEXT_CERT).display().to_string(),
                source,
            })?;
        write_atomically(&dir.join(NEXT_KEY), ca.key_pem().as_bytes(), 0o600)
            .map_err(io(dir, NEXT_KEY))?;
        write_atomically(&dir.join(NEXT_CERT), ca.cert_pem().as_bytes(), 0o644)
            .map_err(io(dir, NEXT_CERT))?;
        let rotation = Rotation {
            phase: Phase::Trust,
            started_at: crate::now_unix(),
            new_ca: imfleet_certs::inspect_pem(ca.cert_pem())
                .map(|i| i.sha256_fingerprint)
                .unwrap_or_default(),
            skipped: Vec::new(),
        };
        rotation.save(dir)?;
        Ok(rotation)
    }

    /// The new CA.
    pub fn next_ca(dir: &Path) -> Result<CertificateAuthority, StateError> {
        let missing = || StateError::Corrupt {
            path: dir.join(NEXT_KEY).display().to_string(),
            detail: "a CA rotation is under way but the new CA is missing; restore it from backup"
                .into(),
        };
        let cert = read(dir, NEXT_CERT)?.ok_or_else(missing)?;
        let key = read(dir, NEXT_KEY)?.ok_or_else(missing)?;
        CertificateAuthority::from_pem(&cert, &key).map_err(|source| StateError::Cert {
            path: dir.join(NEXT_KEY).display().to_string(),
            source,
        })
    }

    /// Puts the new CA in place of the old (kept as `ca.previous.*`) and
    /// ends the rotation. Safe to run again after a crash at any point.
    pub fn finish(dir: &Path) -> Result<(), StateError> {
        let mut rotation = Rotation::load(dir)?.ok_or_else(|| StateError::Corrupt {
            path: dir.join(ROTATION).display().to_string(),
            detail: "no rotation to finish".into(),
        })?;
        if rotation.phase != Phase::Finishing {
            rotation.phase = Phase::Finishing;
            rotation.save(dir)?;
        }
        let names = crate::state::files::CA_CERT;
        if read(dir, NEXT_KEY)?.is_some() {
            for (from, to, mode) in [
                (crate::state::files::CA_KEY, PREVIOUS_KEY, 0o600),
                (names, PREVIOUS_CERT, 0o644),
            ] {
                if let Some(text) = read(dir, from)? {
                    write_atomically(&dir.join(to), text.as_bytes(), mode).map_err(io(dir, to))?;
                }
            }
            std::fs::rename(dir.join(NEXT_KEY), dir.join(crate::state::files::CA_KEY))
                .map_err(io(dir, NEXT_KEY))?;
        }
        if read(dir, NEXT_CERT)?.is_some() {
            std::fs::rename(dir.join(NEXT_CERT), dir.join(names)).map_err(io(dir, NEXT_CERT))?;
        }
        std::fs::remove_file(dir.join(ROTATION)).map_err(io(dir, ROTATION))?;
        imfleet_certs::storage::sync_dir(dir).map_err(io(dir, "."))
    }
}
