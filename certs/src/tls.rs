//! rustls material from imfleet's PEM texts: the one place that turns a CA
//! and an identity into what the TLS configurations on either side need.

use std::sync::Arc;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::CertError;

/// The crypto provider every imfleet TLS configuration uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A trust store holding every certificate of `ca_pem` (at least one).
pub fn root_store(ca_pem: &str) -> Result<RootCertStore, CertError> {
    let bad = |detail: String| CertError::Pem {
        what: "CA certificate",
        detail,
    };
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots
            .add(cert.map_err(|e| bad(e.to_string()))?)
            .map_err(|e| bad(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(bad("no certificate found".into()));
    }
    Ok(roots)
}

/// A certificate chain and its private key, for a TLS identity.
pub fn chain_and_key(
    cert_pem: &str,
    key_pem: &str,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), CertError> {
    let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::Pem {
            what: "certificate",
            detail: e.to_string(),
        })?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| CertError::Pem {
        what: "private key",
        detail: e.to_string(),
    })?;
    Ok((chain, key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_and_identities_come_from_pem() {
        let ca = crate::CertificateAuthority::generate("test CA").unwrap();
        assert_eq!(root_store(ca.cert_pem()).unwrap().len(), 1);
        assert!(root_store("no pem here").is_err());
        let (chain, _) = chain_and_key(ca.cert_pem(), ca.key_pem()).unwrap();
        assert_eq!(chain.len(), 1);
        assert!(chain_and_key(ca.cert_pem(), "not a key").is_err());
    }
}
