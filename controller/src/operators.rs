//! Operators: the people who may drive the fleet from any PBX node through
//! the daemon's API (`controller serve --api-listen`). `add` issues a
//! certificate with role `operator` and writes it, its key and the CA in
//! one 0600 bundle for that person; `revoke` withdraws it (the daemon asks
//! the store on every request). The bundle is what the CLI on another node
//! presents (`--operator FILE`); see `serve::client`.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use imfleet_certs::{CertError, Role, Validity};
use serde::Serialize;

use crate::state::{ControllerState, StateError};
use crate::store::{CertificateRecord, CertificateState, Operator, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    #[error(
        "operator name `{0}` is not allowed: 1 to 64 of a-z, 0-9, '.', '_', '-', starting with a letter or digit"
    )]
    BadName(String),
    #[error("{0} exists already; choose another path or remove it (nothing was changed)")]
    BundleExists(PathBuf),
    #[error("cannot write the operator bundle {path}: {source} (nothing was changed)")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no operator is named `{0}` (see `controller operators`)")]
    Unknown(String),
    #[error("cannot read the operator bundle {path}: {detail}")]
    Bundle { path: PathBuf, detail: String },
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Cert(#[from] CertError),
}

/// What `operators add` did.
#[derive(Debug, Clone, Serialize)]
pub struct Added {
    pub name: String,
    pub serial: String,
    /// Unix seconds.
    pub not_after: i64,
    pub bundle: String,
}

/// A name as the store, the certificate's CN and the audit trail carry it.
pub fn check_name(name: &str) -> Result<(), OperatorError> {
    let ok = (1..=64).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(OperatorError::BadName(
            crate::text::printable(name, 80).into_owned(),
        ))
    }
}

/// Issues operator `name` a certificate valid for `lifetime` and writes the
/// bundle (certificate, key, CA) to `out`, created 0600 and never over an
/// existing file. The key exists nowhere else.
pub async fn add(
    state: &ControllerState,
    name: &str,
    lifetime: time::Duration,
    out: &Path,
) -> Result<Added, OperatorError> {
    check_name(name)?;
    let write_err = |source| OperatorError::Write {
        path: out.to_owned(),
        source,
    };
    // Claimed first, so a path in the way changes nothing.
    let mut file = match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
    {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(OperatorError::BundleExists(out.to_owned()));
        }
        Err(e) => return Err(write_err(e)),
    };
    let mut recorded = None;
    let issued = async {
        let ca = state.ca.load()?;
        let identity = ca.issue(Role::Operator, name, &[], Validity::starting_now(lifetime))?;
        let info = imfleet_certs::inspect_pem(&identity.cert_pem)?;
        let record =
            CertificateRecord::new(&info, None, CertificateState::Current, crate::now_unix());
        state.store.add_operator(name, &record).await?;
        recorded = Some(record.serial.clone());
        // Every CA the fleet trusts (both during a rotation): the daemon's
        // certificate chains to one of them.
        let bundle = format!(
            "{}{}{}",
            identity.cert_pem, identity.key_pem, state.identity.ca_pem
        );
        file.write_all(bundle.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(write_err)?;
        Ok::<_, OperatorError>(record)
    };
    match issued.await {
        Ok(record) => Ok(Added {
            name: name.to_owned(),
            serial: record.serial,
            not_after: record.not_after,
            bundle: out.display().to_string(),
        }),
        Err(e) => {
            let _ = std::fs::remove_file(out);
            if let Some(serial) = recorded {
                // Recorded but not handed out: withdrawn again (only it).
                let _ = state
                    .store
                    .revoke_operator_certificate(&serial, crate::now_unix())
                    .await;
            }
            Err(e)
        }
    }
}

/// Revokes operator `name`: refused by the daemon from its next request.
/// Returns how many certificates were withdrawn (0: revoked already).
pub async fn revoke(state: &ControllerState, name: &str) -> Result<usize, OperatorError> {
    check_name(name)?;
    let known = state.store.operators().await?;
    if !known.iter().any(|o| o.name == name) {
        return Err(OperatorError::Unknown(name.to_owned()));
    }
    Ok(state.store.revoke_operator(name, crate::now_unix()).await?)
}

pub async fn list(state: &ControllerState) -> Result<Vec<Operator>, OperatorError> {
    Ok(state.store.operators().await?)
}

/// An operator's bundle as the CLI reads it on any node.
#[derive(Debug, Clone)]
pub struct Bundle {
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
}

impl Bundle {
    /// Reads `path`, refusing one other users could read or that is not
    /// this user's (as OpenSSH refuses such a private key), a symbolic
    /// link, and one whose parts do not belong together. Opened once: what
    /// is checked is what is read.
    pub fn read(path: &Path) -> Result<Bundle, OperatorError> {
        use std::io::Read;
        let bad = |detail: String| OperatorError::Bundle {
            path: path.to_owned(),
            detail,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(path)
            .map_err(|e| bad(e.to_string()))?;
        let meta = file.metadata().map_err(|e| bad(e.to_string()))?;
        if meta.mode() & 0o077 != 0 {
            return Err(bad(format!(
                "it can be read by other users (mode {:o}); run `chmod 600 {}`",
                meta.mode() & 0o777,
                path.display()
            )));
        }
        if meta.uid() != nix::unistd::geteuid().as_raw() {
            return Err(bad("it belongs to another user".into()));
        }
        let mut text = String::new();
        file.take(MAX_BUNDLE_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(|e| bad(e.to_string()))?;
        if text.len() as u64 > MAX_BUNDLE_BYTES {
            return Err(bad("larger than an operator bundle can be".into()));
        }
        let certs = imfleet_certs::split_certificates_pem(&text);
        let [cert_pem, cas @ ..] = certs.as_slice() else {
            return Err(bad("it holds no certificate".into()));
        };
        if cas.is_empty() {
            return Err(bad(
                "it holds no CA certificate after the operator's (written by `controller operators add`)".into(),
            ));
        }
        let key_pem = private_key_block(&text)
            .ok_or_else(|| bad("it holds no private key".into()))?
            .to_owned();
        imfleet_certs::key_matches_certificate(cert_pem, &key_pem)
            .map_err(|e| bad(format!("the key is not the certificate's: {e}")))?;
        let info = imfleet_certs::inspect_pem(cert_pem).map_err(|e| bad(e.to_string()))?;
        if info.role != Some(Role::Operator) {
            return Err(bad("its certificate is not an operator's".into()));
        }
        Ok(Bundle {
            cert_pem: cert_pem.clone(),
            key_pem,
            ca_pem: cas.concat(),
        })
    }
}

/// No bundle is larger (a certificate, a key, a few CAs).
const MAX_BUNDLE_BYTES: u64 = 64 * 1024;

fn private_key_block(text: &str) -> Option<&str> {
    const BEGIN: &str = "-----BEGIN PRIVATE KEY-----";
    const END: &str = "-----END PRIVATE KEY-----";
    let start = text.find(BEGIN)?;
    let end = text[start..].find(END)? + start + END.len();
    Some(&text[start..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_plain() {
        for good in ["alice", "ops-1", "a.b_c", "0"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        let long = "a".repeat(65);
        for bad in ["", "Alice", "-x", "a b", "a/b", "ä", long.as_str(), "a\nb"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn a_bundle_is_private_complete_and_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let state = ControllerState::open_or_init(&dir.path().join("state"))
            .unwrap()
            .0;
        let out = dir.path().join("alice.pem");
        let added = add(&state, "alice", time::Duration::days(1), &out)
            .await
            .unwrap();
        let mode = std::fs::metadata(&out).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let bundle = Bundle::read(&out).unwrap();
        assert!(bundle.ca_pem.contains(state.ca.cert_pem().trim()));
        let info = imfleet_certs::inspect_pem(&bundle.cert_pem).unwrap();
        assert_eq!(info.serial_hex.to_ascii_lowercase(), added.serial);
        // An agent never takes it for the controller.
        use rustls_pki_types::pem::PemObject;
        let der =
            rustls_pki_types::CertificateDer::from_pem_slice(bundle.cert_pem.as_bytes()).unwrap();
        assert!(imfleet_certs::check_peer(&der, Role::Controller).is_err());
        assert!(imfleet_certs::check_peer(&der, Role::Operator).is_ok());

        // The same path again: refused, the file untouched, nothing issued.
        let before = std::fs::read(&out).unwrap();
        let again = add(&state, "bob", time::Duration::days(1), &out).await;
        assert!(
            matches!(again, Err(OperatorError::BundleExists(_))),
            "{again:?}"
        );
        assert_eq!(std::fs::read(&out).unwrap(), before);
        assert_eq!(list(&state).await.unwrap().len(), 1);

        // Readable by others: refused.
        std::fs::set_permissions(&out, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .unwrap();
        let open = Bundle::read(&out).unwrap_err().to_string();
        assert!(open.contains("chmod 600"), "{open}");
        // A link to it: refused, not followed.
        std::fs::set_permissions(&out, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let link = dir.path().join("link.pem");
        std::os::unix::fs::symlink(&out, &link).unwrap();
        assert!(Bundle::read(&link).is_err());
        assert!(Bundle::read(&out).is_ok());
    }
}
