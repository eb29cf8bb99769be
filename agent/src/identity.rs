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
    #[error(
        "no renewal is under way on this host (ask for one with RenewIdentity first); nothing was changed"
    )]
    NoRenewal,
    #[error(
        "the certificate is not for the key of the last renewal request (another renewal may have begun since); nothing was changed"
    )]
    NotForRenewalKey,
    #[error("refused certificate: {0}; nothing was changed")]
    Refused(&'static str),
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

/// Longest certificate text a renewal may install.
pub const MAX_CERTIFICATE_BYTES: usize = 16 * 1024;

/// Renewal over the channel, first half: a fresh key kept as the renewal key
/// (0600) beside the one served with, and a CSR for it under the current
/// certificate's name (the CA decides everything else).
pub fn request_renewal(layout: &Layout) -> Result<String, IdentityError> {
    let current = load(layout)?;
    let generated = imfleet_certs::generate_key_and_request(&current.info.common_name)?;
    let path = layout.renewal_key();
    write_file_atomically(&path, generated.key_pem.as_bytes(), 0o600).map_err(io_err(&path))?;
    Ok(generated.csr_pem)
}

/// Renewal, second half: installs `cert_pem` (one agent certificate from the
/// CA this agent trusts, for the renewal key) and returns the identity to
/// serve with. The replaced identity is kept as `agent.pem.previous`. Files
/// are written so that a crash at any point leaves a certificate whose key
/// [`load`] finds.
pub fn install_renewal(layout: &Layout, cert_pem: &str) -> Result<ServingIdentity, IdentityError> {
    if cert_pem.len() > MAX_CERTIFICATE_BYTES {
        return Err(IdentityError::Refused("too long"));
    }
    let current = load(layout)?;
    let certs = imfleet_certs::split_certificates_pem(cert_pem);
    let [leaf] = certs.as_slice() else {
        return Err(IdentityError::Refused(
            "exactly one certificate is expected",
        ));
    };
    let info = imfleet_certs::inspect_pem(leaf)?;
    if info.role != Some(imfleet_certs::Role::Agent)
        || !info.server_auth
        || info.client_auth
        || info.is_ca
    {
        return Err(IdentityError::Refused("not an agent certificate"));
    }
    let name = info
        .subject_alt_names
        .first()
        .ok_or(IdentityError::Refused("it names no address"))?;
    imfleet_certs::verify_server_identity(
        &current.ca_pem,
        leaf,
        name,
        time::OffsetDateTime::now_utc(),
    )?;
    let key_path = layout.renewal_key();
    let key_pem = std::fs::read_to_string(&key_path).map_err(|_| IdentityError::NoRenewal)?;
    imfleet_certs::key_matches_certificate(leaf, &key_pem)
        .map_err(|_| IdentityError::NotForRenewalKey)?;

    let keep = [
        (layout.previous_key(), current.key_pem.as_str(), 0o600),
        (
            layout.previous_certificate(),
            current.cert_pem.as_str(),
            0o644,
        ),
        (layout.certificate(), leaf.as_str(), 0o644),
    ];
    for (path, text, mode) in keep {
        write_file_atomically(&path, text.as_bytes(), mode).map_err(io_err(&path))?;
    }
    let key = layout.key();
    std::fs::rename(&key_path, &key).map_err(io_err(&key))?;
    let etc = layout.etc_dir();
    imfleet_certs::storage::sync_dir(&etc).map_err(io_err(&etc))?;
    Ok(ServingIdentity {
        cert_pem: leaf.clone(),
        key_pem,
        ca_pem: current.ca_pem,
        info,
    })
}

/// Most CAs an agent trusts at once (two during a rotation).
pub const MAX_TRUSTED_CAS: usize = 4;

/// Replaces the CAs this agent trusts with `bundle` (CA rotation): taken
/// only if a CA it trusts now signed it, and only CA certificates.
pub fn replace_trusted_cas(
    layout: &Layout,
    bundle: &str,
    signature: &[u8],
) -> Result<ServingIdentity, IdentityError> {
    if bundle.len() > MAX_CERTIFICATE_BYTES {
        return Err(IdentityError::Refused("too long"));
    }
    let current = load(layout)?;
    let message =
        imfleet_certs::trusted_cas_message(&imfleet_certs::fingerprints(&current.ca_pem), bundle);
    if !imfleet_certs::verify_ca_signature(&current.ca_pem, &message, signature) {
        return Err(IdentityError::Refused(
            "the CA bundle is not signed by a CA this host trusts",
        ));
    }
    let certs = imfleet_certs::split_certificates_pem(bundle);
    if certs.is_empty() || certs.len() > MAX_TRUSTED_CAS {
        return Err(IdentityError::Refused(
            "one to four CA certificates are expected",
        ));
    }
    for cert in &certs {
        if !imfleet_certs::inspect_pem(cert)?.is_ca {
            return Err(IdentityError::Refused("not a CA certificate"));
        }
    }
    let text = certs.concat();
    let path = layout.ca_certificate();
    write_file_atomically(&path, text.as_bytes(), 0o644).map_err(io_err(&path))?;
    load(layout)
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
    let mut key_pem = read(layout.key())?;
    let ca_pem = read(layout.ca_certificate())?;
    if let Err(e) = imfleet_certs::key_matches_certificate(&cert_pem, &key_pem) {
        // A renewal that stopped between writing the certificate and moving
        // its key into place: finish it.
        let next = layout.renewal_key();
        match std::fs::read_to_string(&next) {
            Ok(renewed) if imfleet_certs::key_matches_certificate(&cert_pem, &renewed).is_ok() => {
                let key = layout.key();
                std::fs::rename(&next, &key).map_err(io_err(&key))?;
                key_pem = renewed;
            }
            _ => return Err(e.into()),
        }
    }
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

    /// A host enrolled under `ca` for 127.0.0.2: its layout and certificate.
    fn enrolled(ca: &CertificateAuthority) -> (tempfile::TempDir, Layout, String) {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        let csr = request(&layout, "im1").unwrap();
        let sans = ["127.0.0.2".to_owned()];
        let validity = Validity::starting_now(AGENT_LIFETIME);
        let cert = ca.sign_agent_request(&csr, "im1", &sans, validity).unwrap();
        install(&layout, &format!("{cert}{}", ca.cert_pem())).unwrap();
        (dir, layout, cert)
    }

    #[test]
    fn renewal_swaps_the_identity_keeps_the_previous_and_refuses_what_is_not_its_own() {
        let ca = CertificateAuthority::generate("test CA").unwrap();
        let (_dir, layout, first) = enrolled(&ca);
        let sans = vec!["127.0.0.2".to_owned()];
        let validity = Validity::starting_now(AGENT_LIFETIME);
        let before = load(&layout).unwrap();

        // Nothing asked for: refused.
        assert!(matches!(
            install_renewal(&layout, &first),
            Err(IdentityError::NoRenewal)
        ));
        let csr = request_renewal(&layout).unwrap();
        assert_eq!(
            std::fs::metadata(layout.renewal_key())
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
        // For another key, from another CA, a controller role, two certificates: refused, nothing changed.
        let other = imfleet_certs::generate_key_and_request("x").unwrap();
        let foreign_key = ca
            .sign_agent_request(&other.csr_pem, "im1", &sans, validity)
            .unwrap();
        let stranger = CertificateAuthority::generate("stranger").unwrap();
        let foreign_ca = stranger
            .sign_agent_request(&csr, "im1", &sans, validity)
            .unwrap();
        let controller = ca.issue_controller("c", validity).unwrap().cert_pem;
        let renewed = ca.sign_agent_request(&csr, "im1", &sans, validity).unwrap();
        for bad in [
            foreign_key,
            foreign_ca,
            controller,
            format!("{renewed}{renewed}"),
            "x".repeat(MAX_CERTIFICATE_BYTES + 1),
        ] {
            assert!(install_renewal(&layout, &bad).is_err());
            assert_eq!(load(&layout).unwrap().cert_pem, before.cert_pem);
        }

        let now = install_renewal(&layout, &renewed).unwrap();
        assert_ne!(now.info.serial_hex, before.info.serial_hex);
        let loaded = load(&layout).unwrap();
        assert_eq!(loaded.cert_pem, renewed);
        assert!(!layout.renewal_key().exists());
        assert_eq!(
            std::fs::read_to_string(layout.previous_certificate()).unwrap(),
            before.cert_pem
        );
        assert_eq!(
            std::fs::metadata(layout.previous_key())
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
        // The same certificate again: its key is used up.
        assert!(matches!(
            install_renewal(&layout, &renewed),
            Err(IdentityError::NoRenewal)
        ));
    }

    #[test]
    fn a_renewal_cut_between_certificate_and_key_is_finished_at_load() {
        let ca = CertificateAuthority::generate("test CA").unwrap();
        let (_dir, layout, _) = enrolled(&ca);
        let sans = vec!["127.0.0.2".to_owned()];
        let validity = Validity::starting_now(AGENT_LIFETIME);
        let csr = request_renewal(&layout).unwrap();
        let renewed = ca.sign_agent_request(&csr, "im1", &sans, validity).unwrap();
        // As if the agent died right after writing the certificate.
        std::fs::write(layout.certificate(), &renewed).unwrap();
        let loaded = load(&layout).unwrap();
        assert_eq!(loaded.cert_pem, renewed);
        assert!(!layout.renewal_key().exists());
        imfleet_certs::key_matches_certificate(
            &renewed,
            &std::fs::read_to_string(layout.key()).unwrap(),
        )
        .unwrap();
    }

    #[test]
    fn trusted_cas_change_only_with_a_trusted_signature_and_only_to_cas() {
        let ca = CertificateAuthority::generate("old").unwrap();
        let next = CertificateAuthority::generate("new").unwrap();
        let (_dir, layout, cert) = enrolled(&ca);
        let both = format!("{}{}", ca.cert_pem(), next.cert_pem());
        let sign = |by: &CertificateAuthority, bundle: &str| {
            let current = imfleet_certs::fingerprints(&load(&layout).unwrap().ca_pem);
            by.sign(&imfleet_certs::trusted_cas_message(&current, bundle))
                .unwrap()
        };
        // Signed by a CA it does not trust yet, or over another bundle: refused.
        for (bundle, signature) in [
            (both.clone(), sign(&next, &both)),
            (both.clone(), sign(&ca, next.cert_pem())),
            (cert.clone(), sign(&ca, &cert)),
        ] {
            assert!(replace_trusted_cas(&layout, &bundle, &signature).is_err());
            assert_eq!(load(&layout).unwrap().ca_pem, ca.cert_pem());
        }
        let trusting_both = sign(&ca, &both);
        let now = replace_trusted_cas(&layout, &both, &trusting_both).unwrap();
        assert_eq!(imfleet_certs::split_certificates_pem(&now.ca_pem).len(), 2);
        // Then the new CA alone, signed by the new CA.
        let only = next.cert_pem().to_owned();
        let dropping_old = sign(&next, &only);
        let now = replace_trusted_cas(&layout, &only, &dropping_old).unwrap();
        assert_eq!(now.ca_pem, only);
        // A change signed for another set is not replayed on this one.
        assert!(replace_trusted_cas(&layout, &both, &trusting_both).is_err());
        assert!(replace_trusted_cas(&layout, &only, &dropping_old).is_err());
    }
}
