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

/// A certificate signed by `ca` with whatever subject units and EKUs a
/// hostile or careless issuer might put in it (the imfleet CA never does).
pub fn custom_identity(
    ca: &CertificateAuthority,
    organizational_units: &[&str],
    ekus: Vec<rcgen::ExtendedKeyUsagePurpose>,
    sans: &[&str],
) -> IssuedIdentity {
    let issuer = rcgen::Issuer::from_ca_cert_pem(
        ca.cert_pem(),
        rcgen::KeyPair::from_pem(ca.key_pem()).expect("CA key"),
    )
    .expect("issuer");
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params =
        rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .expect("params");
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::OrganizationName, imfleet_certs::ORGANISATION);
    // rcgen keeps one value per attribute type: a second OU goes in under
    // the same OID (2.5.4.11) spelled as a custom type.
    assert!(organizational_units.len() <= 2, "at most two units");
    for (i, ou) in organizational_units.iter().enumerate() {
        let kind = match i {
            0 => rcgen::DnType::OrganizationalUnitName,
            _ => rcgen::DnType::CustomDnType(vec![2, 5, 4, 11]),
        };
        dn.push(kind, *ou);
    }
    dn.push(rcgen::DnType::CommonName, "custom");
    params.distinguished_name = dn;
    params.extended_key_usages = ekus;
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    let validity = Validity::starting_now(time::Duration::days(1));
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;
    let cert = params.signed_by(&key, &issuer).expect("sign");
    IssuedIdentity {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}
