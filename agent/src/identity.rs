//! The agent's serving identity. The private key is generated here, on the
//! IM host, and never leaves it; the controller only ever sees a CSR.

use std::path::Path;

use imfleet_certs::{CertError, CertificateInfo};

use imfleet_certs::storage::write_atomically as write_file_atomically;
use imfleet_proto::model::layout::Layout;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Cert(#[from] CertError),
    #[error("the bundle must hold the agent certificate followed by the CA certificate")]
    BadBundle,
    #[error("no private key is waiting for this certificate (run `agent identity request` first)")]
    NoKey,
    #[error("the agent has no identity yet: run `controller bootstrap` for this host")]
    Missing,
}

/// What the agent serves with.
pub struct ServingIdentity {
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
    pub info: CertificateInfo,
}

impl std::fmt::Debug for ServingIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingIdentity")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError + '_ {
    move |source| IdentityError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn ensure_etc(layout: &Layout) -> Result<(), IdentityError> {
    use std::os::unix::fs::DirBuilderExt;
    let etc = layout.etc_dir();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&etc)
        .map_err(io_err(&etc))
}

/// Generates a fresh key (kept as the pending key, 0600) and returns a CSR for it.
pub fn request(layout: &Layout, common_name: &str) -> Result<String, IdentityError> {
    ensure_etc(layout)?;
    let generated = imfleet_certs::generate_key_and_request(common_name)?;
    let path = layout.pending_key();
    write_file_atomically(&path, generated.key_pem.as_bytes(), 0o600).map_err(io_err(&path))?;
    Ok(generated.csr_pem)
}

/// Installs `bundle` (agent certificate, then CA certificate). The certificate
/// must belong to the pending key (or, failing that, the current key) and
/// chain to the CA in the bundle.
pub fn install(layout: &Layout, bundle: &str) -> Result<CertificateInfo, IdentityError> {
    let certs = imfleet_certs::split_certificates_pem(bundle);
    let [leaf, ca] = certs.as_slice() else {
        return Err(IdentityError::BadBundle);
    };
    let info = imfleet_certs::inspect_pem(leaf)?;
    let name = info
        .subject_alt_names
        .first()
        .ok_or(IdentityError::BadBundle)?;
    imfleet_certs::verify_server_identity(ca, leaf, name, time::OffsetDateTime::now_utc())?;

    let pending = layout.pending_key();
    let key_path = if pending.exists() {
        pending.clone()
    } else {
        layout.key()
    };
    let key_pem = std::fs::read_to_string(&key_path).map_err(|_| IdentityError::NoKey)?;
    imfleet_certs::key_matches_certificate(leaf, &key_pem)?;

    ensure_etc(layout)?;
    let ca_path = layout.ca_certificate();
    write_file_atomically(&ca_path, ca.as_bytes(), 0o644).map_err(io_err(&ca_path))?;
    let cert_path = layout.certificate();
    write_file_atomically(&cert_path, leaf.as_bytes(), 0o644).map_err(io_err(&cert_path))?;
    if key_path == pending {
        let key = layout.key();
        std::fs::rename(&pending, &key).map_err(io_err(&key))?;
    }
    Ok(info)
}

/// The installed certificate, if any.
pub fn current_certificate(layout: &Layout) -> Option<String> {
    std::fs::read_to_string(layout.certificate()).ok()
}

/// Loads the complete identity the server needs.
pub fn load(layout: &Layout) -> Result<ServingIdentity, IdentityError> {
    let read = |path: std::path::PathBuf| {
        std::fs::read_to_string(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                IdentityError::Missing
            } else {
                IdentityError::Io {
                    path: path.display().to_string(),
                    source: e,
                }
            }
        })
    };
    let cert_pem = read(layout.certificate())?;
    let key_pem = read(layout.key())?;
    let ca_pem = read(layout.ca_certificate())?;
    imfleet_certs::key_matches_certificate(&cert_pem, &key_pem)?;
    let info = imfleet_certs::inspect_pem(&cert_pem)?;
    Ok(ServingIdentity {
        cert_pem,
        key_pem,
        ca_pem,
        info,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use imfleet_certs::{AGENT_LIFETIME, CertificateAuthority, Validity};
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn enrolment_keeps_the_key_private_and_refuses_foreign_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        let ca = CertificateAuthority::generate("test CA").unwrap();
        let sans = vec!["127.0.0.2".to_owned()];

        let csr = request(&layout, "im1").unwrap();
        let mode = std::fs::metadata(layout.pending_key())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        // A certificate for some other key is refused and changes nothing.
        let other = imfleet_certs::generate_key_and_request("other").unwrap();
        let foreign = ca
            .sign_agent_request(
                &other.csr_pem,
                "other",
                &sans,
                Validity::starting_now(AGENT_LIFETIME),
            )
            .unwrap();
        let err = install(&layout, &format!("{foreign}{}", ca.cert_pem())).unwrap_err();
        assert!(
            matches!(err, IdentityError::Cert(CertError::KeyMismatch)),
            "{err}"
        );
        assert!(!layout.certificate().exists());

        // A bundle whose CA did not sign the leaf is refused too.
        let cert = ca
            .sign_agent_request(&csr, "im1", &sans, Validity::starting_now(AGENT_LIFETIME))
            .unwrap();
        let stranger = CertificateAuthority::generate("stranger").unwrap();
        assert!(install(&layout, &format!("{cert}{}", stranger.cert_pem())).is_err());
        assert!(matches!(
            install(&layout, &cert),
            Err(IdentityError::BadBundle)
        ));

        let info = install(&layout, &format!("{cert}{}", ca.cert_pem())).unwrap();
        assert_eq!(info.subject_alt_names, sans);
        assert!(!layout.pending_key().exists());
        let key_mode = std::fs::metadata(layout.key())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(key_mode & 0o777, 0o600);
        let loaded = load(&layout).unwrap();
        assert_eq!(loaded.ca_pem, ca.cert_pem());
    }
}
