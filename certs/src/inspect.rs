//! Reading certificates: what they say, and whether they verify.

use std::sync::Arc;

use rustls::client::danger::ServerCertVerifier;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::{CertError, Role};

/// The facts about a certificate that imfleet shows and decides on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateInfo {
    pub common_name: String,
    /// The role the first OU names (see [`check_peer`] for the strict rule).
    pub role: Option<Role>,
    /// Every organisational unit of the subject, in order.
    pub organizational_units: Vec<String>,
    /// Whether the certificate has an extended key usage extension at all.
    pub has_eku: bool,
    /// Lower-case hex.
    pub serial_hex: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    /// IP addresses and DNS names, as text.
    pub subject_alt_names: Vec<String>,
    pub is_ca: bool,
    pub server_auth: bool,
    pub client_auth: bool,
    /// Lower-case hex SHA-256 of the DER encoding.
    pub sha256_fingerprint: String,
    /// Lower-case hex SHA-256 of the subject public key info: the key,
    /// whatever certificate carries it.
    pub public_key_sha256: String,
}

/// Parses the first certificate of a PEM text.
pub fn inspect_pem(pem: &str) -> Result<CertificateInfo, CertError> {
    inspect_der(&first_der(pem)?)
}

pub fn inspect_der(der: &[u8]) -> Result<CertificateInfo, CertError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| CertError::Parse {
        what: "certificate",
        detail: e.to_string(),
    })?;
    let subject = cert.subject();
    let first_attr =
        |attrs: &mut dyn Iterator<Item = &x509_parser::x509::AttributeTypeAndValue<'_>>| {
            attrs
                .next()
                .and_then(|a| a.as_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
    let common_name = first_attr(&mut subject.iter_common_name());
    let organizational_units: Vec<String> = subject
        .iter_organizational_unit()
        .map(|a| a.as_str().unwrap_or_default().to_owned())
        .collect();
    let role = organizational_units.first().and_then(|ou| Role::parse(ou));

    let mut subject_alt_names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(dns) => subject_alt_names.push((*dns).to_owned()),
                GeneralName::IPAddress(bytes) => {
                    if let Some(ip) = ip_from_bytes(bytes) {
                        subject_alt_names.push(ip.to_string());
                    }
                }
                _ => {}
            }
        }
    }
    let (has_eku, server_auth, client_auth) = match cert.extended_key_usage() {
        Ok(Some(eku)) => (true, eku.value.server_auth, eku.value.client_auth),
        _ => (false, false, false),
    };
    let is_ca = matches!(cert.basic_constraints(), Ok(Some(bc)) if bc.value.ca);
    Ok(CertificateInfo {
        common_name,
        role,
        organizational_units,
        has_eku,
        serial_hex: cert
            .raw_serial_as_string()
            .replace(':', "")
            .to_ascii_lowercase(),
        not_before: cert.validity().not_before.to_datetime(),
        not_after: cert.validity().not_after.to_datetime(),
        subject_alt_names,
        is_ca,
        server_auth,
        client_auth,
        sha256_fingerprint: hex::encode(Sha256::digest(der)),
        public_key_sha256: hex::encode(Sha256::digest(cert.public_key().raw)),
    })
}

/// The role a DER certificate claims, if it parses and claims one.
pub fn role_of_der(der: &[u8]) -> Option<Role> {
    inspect_der(der).ok().and_then(|info| info.role)
}

/// What a peer's certificate must say on top of chaining to the CA: exactly
/// one organisational unit, naming `role`, and an EKU extension naming the
/// role's purpose (clientAuth for the controller, serverAuth for an agent).
/// TLS libraries accept a certificate without any EKU; imfleet does not.
pub fn check_peer(der: &[u8], role: Role) -> Result<CertificateInfo, CertError> {
    let info = inspect_der(der)?;
    let refuse = |why: String| Err(CertError::Verify(why));
    match info.organizational_units.as_slice() {
        [only] if Role::parse(only) == Some(role) => {}
        [] => {
            return refuse(format!(
                "the certificate carries no imfleet role; `{role}` is required"
            ));
        }
        [only] => return refuse(format!("certificate role `{only}` is not `{role}`")),
        many => {
            return refuse(format!(
                "the certificate names {} roles; exactly one (`{role}`) is allowed",
                many.len()
            ));
        }
    }
    let purpose_ok = if role.is_client() {
        info.client_auth
    } else {
        info.server_auth
    };
    if !info.has_eku || !purpose_ok || info.is_ca {
        let purpose = if role.is_client() {
            "clientAuth"
        } else {
            "serverAuth"
        };
        return refuse(format!(
            "a `{role}` certificate must be a leaf with an extended key usage naming {purpose}"
        ));
    }
    Ok(info)
}

/// Verifies `cert_pem` as an agent would be verified by the controller's TLS
/// client: chains to `ca_pem`, is valid at `now`, is for server auth and names
/// `server_name` (an IP address or DNS name) in its SANs.
pub fn verify_server_identity(
    ca_pem: &str,
    cert_pem: &str,
    server_name: &str,
    now: OffsetDateTime,
) -> Result<(), CertError> {
    let roots = crate::tls::root_store(ca_pem)?;
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        crate::tls::provider(),
    )
    .build()
    .map_err(|e| CertError::Verify(e.to_string()))?;
    let name = ServerName::try_from(server_name.to_owned())
        .map_err(|_| CertError::InvalidName(server_name.to_owned()))?;
    let leaf = CertificateDer::from(first_der(cert_pem)?);
    let secs = u64::try_from(now.unix_timestamp()).unwrap_or_default();
    verifier
        .verify_server_cert(
            &leaf,
            &[],
            &name,
            &[],
            UnixTime::since_unix_epoch(std::time::Duration::from_secs(secs)),
        )
        .map(|_| ())
        .map_err(|e| CertError::Verify(e.to_string()))
}

/// Verifies `cert_pem` as an agent's TLS server verifies a client: chains
/// to `ca_pem`, is valid at `now`, is for client auth.
pub fn verify_client_identity(
    ca_pem: &str,
    cert_pem: &str,
    now: OffsetDateTime,
) -> Result<(), CertError> {
    let roots = crate::tls::root_store(ca_pem)?;
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        crate::tls::provider(),
    )
    .build()
    .map_err(|e| CertError::Verify(e.to_string()))?;
    let leaf = CertificateDer::from(first_der(cert_pem)?);
    let secs = u64::try_from(now.unix_timestamp()).unwrap_or_default();
    verifier
        .verify_client_cert(
            &leaf,
            &[],
            UnixTime::since_unix_epoch(std::time::Duration::from_secs(secs)),
        )
        .map(|_| ())
        .map_err(|e| CertError::Verify(e.to_string()))
}

/// Checks that `key` is the private half of the certificate's public key.
pub(crate) fn check_key_matches(cert_pem: &str, key: &rcgen::KeyPair) -> Result<(), CertError> {
    let der = first_der(cert_pem)?;
    let (_, cert) = X509Certificate::from_der(&der).map_err(|e| CertError::Parse {
        what: "certificate",
        detail: e.to_string(),
    })?;
    if cert.public_key().subject_public_key.data.as_ref() == key.public_key_raw() {
        Ok(())
    } else {
        Err(CertError::KeyMismatch)
    }
}

/// Checks that a PEM private key belongs to a PEM certificate.
pub fn key_matches_certificate(cert_pem: &str, key_pem: &str) -> Result<(), CertError> {
    let key = rcgen::KeyPair::from_pem(key_pem).map_err(|e| CertError::Pem {
        what: "private key",
        detail: e.to_string(),
    })?;
    check_key_matches(cert_pem, &key)
}

fn first_der(pem: &str) -> Result<Vec<u8>, CertError> {
    let (_, parsed) =
        x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|e| CertError::Pem {
            what: "certificate",
            detail: e.to_string(),
        })?;
    if parsed.label != "CERTIFICATE" {
        return Err(CertError::Pem {
            what: "certificate",
            detail: format!("found a {} block", parsed.label),
        });
    }
    Ok(parsed.contents)
}

fn ip_from_bytes(bytes: &[u8]) -> Option<std::net::IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(std::net::IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(std::net::IpAddr::from),
        _ => None,
    }
}

/// Splits a PEM bundle into its CERTIFICATE blocks, in order, each as PEM text.
pub fn split_certificates_pem(bundle: &str) -> Vec<String> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let mut out = Vec::new();
    let mut rest = bundle;
    while let Some(start) = rest.find(BEGIN) {
        let Some(len) = rest[start..].find(END) else {
            break;
        };
        let end = start + len + END.len();
        out.push(format!("{}\n", &rest[start..end]));
        rest = &rest[end..];
    }
    out
}
