//! Throwaway PKI for in-process TLS tests.

use imfleet_certs::{AGENT_LIFETIME, CertificateAuthority, IssuedIdentity, Validity};

/// Issues an agent identity (key and certificate) for `sans`.
pub fn agent_identity(
    ca: &CertificateAuthority,
    sans: &[&str],
    validity: Validity,
) -> IssuedIdentity {
    let req = imfleet_certs::generate_key_and_request("test-agent").expect("csr");
    let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
    let cert_pem = ca
        .sign_agent_request(&req.csr_pem, "test-agent", &sans, validity)
        .expect("sign");
    IssuedIdentity {
        cert_pem,
        key_pem: req.key_pem,
    }
}

pub fn agent_identity_now(ca: &CertificateAuthority, sans: &[&str]) -> IssuedIdentity {
    agent_identity(ca, sans, Validity::starting_now(AGENT_LIFETIME))
}
