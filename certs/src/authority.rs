//! The controller's CA and the policy it signs under.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::{CertError, ORGANISATION, Role};

/// The window in which a certificate is valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// Valid from a little before now (clock skew) for `lifetime`.
    pub fn starting_now(lifetime: time::Duration) -> Self {
        let now = OffsetDateTime::now_utc();
        Validity {
            not_before: now - crate::CLOCK_SKEW_ALLOWANCE,
            not_after: now + lifetime,
        }
    }
}

/// A certificate with the private key generated for it (PEM). Used for the
/// controller's own identity, whose key is made where the CA lives.
pub struct IssuedIdentity {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for IssuedIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedIdentity")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

/// The imfleet CA: a self-signed ECDSA P-256 root that signs controller and
/// agent identities.
pub struct CertificateAuthority {
    cert_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Creates a new CA named `common_name`, valid for [`crate::CA_LIFETIME`].
    pub fn generate(common_name: &str) -> Result<Self, CertError> {
        Self::generate_with_validity(common_name, Validity::starting_now(crate::CA_LIFETIME))
    }

    pub fn generate_with_validity(
        common_name: &str,
        validity: Validity,
    ) -> Result<Self, CertError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = subject(common_name, None);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        params.serial_number = Some(random_serial(key.public_key_raw()));
        let cert = params.self_signed(&key)?;
        let key_pem = key.serialize_pem();
        Ok(CertificateAuthority {
            cert_pem: cert.pem(),
            key_pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a CA saved with [`Self::cert_pem`] and [`Self::key_pem`], checking
    /// that the key belongs to the certificate.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CertError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| CertError::Pem {
            what: "CA private key",
            detail: e.to_string(),
        })?;
        crate::inspect::check_key_matches(cert_pem, &key)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(|e| CertError::Parse {
            what: "CA certificate",
            detail: e.to_string(),
        })?;
        Ok(CertificateAuthority {
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
            issuer,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key in PEM. Secret: write it only to a 0600 file.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// Issues the controller's client identity (key generated here).
    pub fn issue_controller(
        &self,
        common_name: &str,
        validity: Validity,
    ) -> Result<IssuedIdentity, CertError> {
        self.issue(Role::Controller, common_name, &[], validity)
    }

    /// Issues an identity of `role` with its key generated here: the
    /// controller's own, an operator's (handed to that person), the
    /// daemon's API server (kept in memory). Agents' keys never leave their
    /// host: see [`Self::sign_agent_request`].
    pub fn issue(
        &self,
        role: Role,
        common_name: &str,
        subject_alt_names: &[String],
        validity: Validity,
    ) -> Result<IssuedIdentity, CertError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let params = leaf_params(role, common_name, subject_alt_names, validity, &key)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedIdentity {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Signs an agent's CSR. Policy: only the CSR's public key is used (after
    /// its self-signature is checked); subject, SANs, usages and lifetime come
    /// from the arguments, so a CSR cannot ask for CA rights, extra names or
    /// a longer life.
    pub fn sign_agent_request(
        &self,
        csr_pem: &str,
        common_name: &str,
        subject_alt_names: &[String],
        validity: Validity,
    ) -> Result<String, CertError> {
        let csr =
            CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| CertError::Parse {
                what: "certificate signing request",
                detail: e.to_string(),
            })?;
        let params = leaf_params(
            Role::Agent,
            common_name,
            subject_alt_names,
            validity,
            &csr.public_key,
        )?;
        let policy_request = CertificateSigningRequestParams {
            params,
            public_key: csr.public_key,
        };
        Ok(policy_request.signed_by(&self.issuer)?.pem())
    }
}

fn subject(common_name: &str, role: Option<Role>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, ORGANISATION);
    if let Some(role) = role {
        dn.push(DnType::OrganizationalUnitName, role.as_str());
    }
    dn.push(DnType::CommonName, common_name);
    dn
}

fn leaf_params(
    role: Role,
    common_name: &str,
    subject_alt_names: &[String],
    validity: Validity,
    public_key: &impl rcgen::PublicKeyData,
) -> Result<CertificateParams, CertError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = subject(common_name, Some(role));
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![if role.is_client() {
        ExtendedKeyUsagePurpose::ClientAuth
    } else {
        ExtendedKeyUsagePurpose::ServerAuth
    }];
    params.subject_alt_names = subject_alt_names
        .iter()
        .map(|name| san(name))
        .collect::<Result<_, _>>()?;
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial(public_key.der_bytes()));
    Ok(params)
}

fn san(name: &str) -> Result<SanType, CertError> {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let dns = name
        .to_owned()
        .try_into()
        .map_err(|_| CertError::InvalidName(name.to_owned()))?;
    Ok(SanType::DnsName(dns))
}

/// A 128-bit serial that is unique per issuance: hash of the subject key,
/// the time and a process-wide counter (RFC 5280 wants positive, <= 20 bytes).
fn random_serial(key_material: &[u8]) -> SerialNumber {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = Sha256::new();
    hasher.update(key_material);
    hasher.update(
        OffsetDateTime::now_utc()
            .unix_timestamp_nanos()
            .to_be_bytes(),
    );
    hasher.update(std::process::id().to_be_bytes());
    hasher.update(COUNTER.fetch_add(1, Ordering::Relaxed).to_be_bytes());
    let mut bytes = hasher.finalize()[..16].to_vec();
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01; // keep it positive and 16 bytes long
    SerialNumber::from_slice(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AGENT_LIFETIME, inspect_pem, verify_server_identity};

    fn hostile_request(sans: &[&str]) -> (KeyPair, String) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ClientAuth,
            ExtendedKeyUsagePurpose::CodeSigning,
        ];
        params.distinguished_name = subject("evil", Some(Role::Controller));
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        (key, csr)
    }

    #[test]
    fn csr_cannot_obtain_ca_rights_usages_role_or_extra_names() {
        let ca = CertificateAuthority::generate("test CA").unwrap();
        let (_key, csr) = hostile_request(&["127.0.0.9", "pbx01.example", "10.0.0.1"]);
        let validity = Validity::starting_now(AGENT_LIFETIME);
        let pem = ca
            .sign_agent_request(&csr, "im1", &["127.0.0.2".to_owned()], validity)
            .unwrap();
        let info = inspect_pem(&pem).unwrap();
        assert!(!info.is_ca, "CSR obtained CA rights");
        assert_eq!(info.subject_alt_names, vec!["127.0.0.2".to_owned()]);
        assert_eq!(info.role, Some(Role::Agent));
        assert_eq!(info.common_name, "im1");
        assert!(info.server_auth);
        assert!(
            !info.client_auth,
            "agent certificate must not be usable as a client"
        );
        let lifetime = info.not_after - info.not_before;
        assert!(lifetime <= AGENT_LIFETIME + crate::CLOCK_SKEW_ALLOWANCE + time::Duration::SECOND);

        // The issued certificate really is usable by its name and only by it.
        verify_server_identity(ca.cert_pem(), &pem, "127.0.0.2", OffsetDateTime::now_utc())
            .unwrap();
        assert!(
            verify_server_identity(ca.cert_pem(), &pem, "127.0.0.9", OffsetDateTime::now_utc())
                .is_err()
        );
    }

    #[test]
    fn csr_with_bad_signature_is_refused() {
        let ca = CertificateAuthority::generate("test CA").unwrap();
        let (_key, csr) = hostile_request(&[]);
        // Flip one base64 character inside the body: the self-signature no longer verifies.
        let mut lines: Vec<String> = csr.lines().map(str::to_owned).collect();
        let mid = lines.len() / 2;
        let flipped: String = lines[mid]
            .chars()
            .enumerate()
            .map(|(i, c)| {
                if i == 10 {
                    if c == 'A' { 'B' } else { 'A' }
                } else {
                    c
                }
            })
            .collect();
        lines[mid] = flipped;
        let tampered = lines.join("\n");
        let err = ca
            .sign_agent_request(
                &tampered,
                "im1",
                &["127.0.0.2".to_owned()],
                Validity::starting_now(AGENT_LIFETIME),
            )
            .unwrap_err();
        assert!(matches!(err, CertError::Parse { .. }), "{err}");
    }

    #[test]
    fn ca_round_trips_through_pem_and_rejects_a_foreign_key() {
        let ca = CertificateAuthority::generate("test CA").unwrap();
        let again = CertificateAuthority::from_pem(ca.cert_pem(), ca.key_pem()).unwrap();
        let other = CertificateAuthority::generate("other CA").unwrap();
        assert!(matches!(
            CertificateAuthority::from_pem(ca.cert_pem(), other.key_pem()),
            Err(CertError::KeyMismatch)
        ));
        // A certificate issued by the reloaded CA verifies against the original.
        let agent = crate::generate_key_and_request("im1").unwrap();
        let pem = again
            .sign_agent_request(
                &agent.csr_pem,
                "im1",
                &["im1.example".to_owned()],
                Validity::starting_now(AGENT_LIFETIME),
            )
            .unwrap();
        verify_server_identity(
            ca.cert_pem(),
            &pem,
            "im1.example",
            OffsetDateTime::now_utc(),
        )
        .unwrap();
        assert!(
            verify_server_identity(
                other.cert_pem(),
                &pem,
                "im1.example",
                OffsetDateTime::now_utc()
            )
            .is_err()
        );
        crate::key_matches_certificate(&pem, &agent.key_pem).unwrap();
    }

    #[test]
    fn controller_identity_is_client_only() {
        let ca = CertificateAuthority::generate("test CA").unwrap();
        let id = ca
            .issue_controller(
                "controller@pbx01",
                Validity::starting_now(time::Duration::days(1)),
            )
            .unwrap();
        let info = inspect_pem(&id.cert_pem).unwrap();
        assert_eq!(info.role, Some(Role::Controller));
        assert!(info.client_auth && !info.server_auth && !info.is_ca);
        crate::key_matches_certificate(&id.cert_pem, &id.key_pem).unwrap();
    }
}
