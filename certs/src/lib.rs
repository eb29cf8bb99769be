//! The imfleet PKI: the controller's private CA, the identities it issues, and
//! the policy that decides what a signed certificate may say.
//!
//! Trust model, in one paragraph: the controller owns a CA key that never
//! leaves its state directory. The controller's own client identity carries
//! role `controller` and EKU clientAuth only; an agent's identity carries role
//! `agent` and EKU serverAuth only, with SANs chosen by the controller (the
//! addresses it dials). An agent creates its key on its own host and sends
//! only a CSR; from that CSR the CA takes the public key and nothing else.
#![forbid(unsafe_code)]

mod authority;
pub mod controllers;
mod error;
mod inspect;
mod request;
mod role;
mod signing;
pub mod storage;
pub mod tls;

pub use authority::{CertificateAuthority, IssuedIdentity, Validity};
pub use controllers::ControllerList;
pub use error::CertError;
pub use inspect::{
    CertificateInfo, check_peer, inspect_der, inspect_pem, key_matches_certificate, role_of_der,
    split_certificates_pem, verify_client_identity, verify_server_identity,
};
pub use request::{KeyAndRequest, generate_key_and_request};
pub use role::Role;
pub use signing::{agent_binary_message, fingerprints, trusted_cas_message, verify_ca_signature};

/// Lifetime of the CA certificate.
pub const CA_LIFETIME: time::Duration = time::Duration::days(3650);
/// Lifetime of the controller's client certificate. It is renewed where
/// the CA is (by any command, and by the daemon), so it can be short.
pub const CONTROLLER_LIFETIME: time::Duration = time::Duration::days(90);
/// Default lifetime of an operator's certificate (revocable at any time).
pub const OPERATOR_LIFETIME: time::Duration = time::Duration::days(365);
/// Lifetime of the daemon's API server certificate: issued when the daemon
/// starts, again once half of it has passed; its key lives in memory only.
pub const DAEMON_API_LIFETIME: time::Duration = time::Duration::days(30);
/// Lifetime of an agent's serving certificate: renewed over mTLS after 60
/// days, so a controller down for up to 30 days finds every agent valid.
pub const AGENT_LIFETIME: time::Duration = time::Duration::days(90);

/// Whether a certificate valid from `not_before` to `not_after` should be
/// renewed at `now`: once two thirds of its life have passed.
pub fn renewal_due(
    not_before: time::OffsetDateTime,
    not_after: time::OffsetDateTime,
    now: time::OffsetDateTime,
) -> bool {
    let life = not_after - not_before;
    now >= not_before + life * 2 / 3
}
/// Backdating of `not_before`, so small clock skew between hosts does not
/// make a fresh certificate "not yet valid".
pub const CLOCK_SKEW_ALLOWANCE: time::Duration = time::Duration::minutes(10);

/// Organisation name written into every subject this CA issues.
pub const ORGANISATION: &str = "imfleet";

/// Installs aws-lc-rs as the process-wide rustls provider. Call first thing
/// in every binary (and test) that does TLS: with more than one provider
/// compiled in, rustls refuses to guess. Calling it again is harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_due_after_two_thirds_of_the_life() {
        let start = time::OffsetDateTime::UNIX_EPOCH;
        let end = start + AGENT_LIFETIME;
        let day = time::Duration::days(1);
        assert!(!renewal_due(start, end, start));
        assert!(!renewal_due(start, end, start + 59 * day));
        assert!(renewal_due(start, end, start + 60 * day));
        assert!(renewal_due(start, end, end + day));
    }
}
