//! The fleet CA's signature over an agent binary. An agent replaces itself
//! only with a binary the CA it trusts signed: a stolen controller
//! certificate and key (all an attacker needs to call the agent) are not
//! enough to make every IM host run code of the attacker's choosing; that
//! takes the CA's private key too.

use rcgen::{KeyPair, SigningKey};
use rustls_pki_types::alg_id;

use crate::CertError;

/// What is signed: the binary's hash and what it says it is, bound
/// together and to this purpose.
pub fn agent_binary_message(sha256_hex: &str, version: &str, protocol_revision: u32) -> Vec<u8> {
    format!("imfleet agent binary\nsha256 {sha256_hex}\nversion {version}\nrevision {protocol_revision}\n")
        .into_bytes()
}

/// What is signed when the controller replaces the CAs an agent trusts (a
/// CA rotation): the bundle's hash and the set it replaces (the SHA-256 of
/// each CA trusted now, in any order), bound to this purpose. Bound to the
/// set it replaces, a signed change cannot be replayed once that set has
/// changed (in a later rotation, say).
pub fn trusted_cas_message(current: &[String], bundle_pem: &str) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    let mut current = current.to_vec();
    current.sort();
    format!(
        "imfleet trusted CAs\nfrom {}\nsha256 {}\n",
        current.join(","),
        hex::encode(Sha256::digest(bundle_pem.as_bytes()))
    )
    .into_bytes()
}

/// The SHA-256 of each certificate of a PEM bundle (lower-case hex).
pub fn fingerprints(bundle_pem: &str) -> Vec<String> {
    crate::split_certificates_pem(bundle_pem)
        .iter()
        .filter_map(|pem| crate::inspect_pem(pem).ok())
        .map(|info| info.sha256_fingerprint)
        .collect()
}

impl crate::CertificateAuthority {
    /// The CA's signature (ECDSA P-256, SHA-256, DER) over `message`.
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, CertError> {
        let key = KeyPair::from_pem(self.key_pem()).map_err(CertError::from)?;
        key.sign(message).map_err(CertError::from)
    }
}

/// Whether `signature` over `message` is that of a CA whose certificate is
/// in `ca_pem` (any of them: a CA being rotated trusts two).
pub fn verify_ca_signature(ca_pem: &str, message: &[u8], signature: &[u8]) -> bool {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let provider = crate::tls::provider();
    let algorithms: Vec<_> = provider
        .signature_verification_algorithms
        .all
        .iter()
        .filter(|alg| {
            alg.public_key_alg_id() == alg_id::ECDSA_P256
                && alg.signature_alg_id() == alg_id::ECDSA_SHA256
        })
        .collect();
    CertificateDer::pem_slice_iter(ca_pem.as_bytes())
        .flatten()
        .any(|der| {
            let Ok((_, cert)) = x509_parser::parse_x509_certificate(&der) else {
                return false;
            };
            let public_key = cert.public_key().subject_public_key.data.as_ref();
            algorithms
                .iter()
                .any(|alg| alg.verify_signature(public_key, message, signature).is_ok())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_trusted_ca_signs_a_binary() {
        let ca = crate::CertificateAuthority::generate("CA").unwrap();
        let other = crate::CertificateAuthority::generate("CA").unwrap();
        let message = agent_binary_message(&"ab".repeat(32), "0.2.0", 11);
        let signature = ca.sign(&message).unwrap();
        assert!(verify_ca_signature(ca.cert_pem(), &message, &signature));
        assert!(!verify_ca_signature(other.cert_pem(), &message, &signature));
        let changed = agent_binary_message(&"ab".repeat(32), "0.2.1", 11);
        assert!(!verify_ca_signature(ca.cert_pem(), &changed, &signature));
        assert!(!verify_ca_signature(
            ca.cert_pem(),
            &message,
            b"not a signature"
        ));
    }
}
