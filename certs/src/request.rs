//! The agent side of enrolment: a fresh key and a CSR carrying its public half.

use rcgen::{CertificateParams, DnType, KeyPair};

use crate::CertError;

/// A private key (PKCS#8 PEM) and a CSR (PEM) for it.
pub struct KeyAndRequest {
    pub key_pem: String,
    pub csr_pem: String,
}

impl std::fmt::Debug for KeyAndRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("KeyAndRequest").finish_non_exhaustive()
    }
}

/// Generates an ECDSA P-256 key and a CSR naming `common_name`. The CSR says
/// nothing else: the CA decides SANs, usages and lifetime.
pub fn generate_key_and_request(common_name: &str) -> Result<KeyAndRequest, CertError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    let csr = params.serialize_request(&key)?;
    Ok(KeyAndRequest {
        key_pem: key.serialize_pem(),
        csr_pem: csr.pem()?,
    })
}
