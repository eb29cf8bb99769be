//! The identity the agent serves with and the CAs it trusts, replaceable
//! while it runs: a renewal or a CA rotation swaps them for the next TLS
//! handshake, while connections already made (and the health streams on
//! them) go on with what they were made with.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};

use tokio_rustls::TlsAcceptor;

use crate::identity::ServingIdentity;
use crate::listener::{ListenerError, tls_acceptor};

/// The current TLS acceptor and the expiry of the certificate it presents.
pub struct Credentials {
    acceptor: RwLock<TlsAcceptor>,
    not_after: Arc<AtomicI64>,
    /// The CAs trusted (controllers' certificates, signed binaries and lists).
    ca_pem: RwLock<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("not_after", &self.not_after())
            .finish_non_exhaustive()
    }
}

impl Credentials {
    pub fn new(identity: &ServingIdentity) -> Result<Arc<Credentials>, ListenerError> {
        Ok(Arc::new(Credentials {
            acceptor: RwLock::new(tls_acceptor(identity)?),
            not_after: Arc::new(AtomicI64::new(identity.info.not_after.unix_timestamp())),
            ca_pem: RwLock::new(identity.ca_pem.clone()),
        }))
    }

    /// What the next handshake is made with.
    pub fn acceptor(&self) -> TlsAcceptor {
        self.acceptor
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The CAs trusted now.
    pub fn ca_pem(&self) -> String {
        self.ca_pem
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Expiry (Unix seconds) of the certificate served now.
    pub fn not_after(&self) -> i64 {
        self.not_after.load(Ordering::Relaxed)
    }

    /// The expiry, for those who report it (pings, health samples).
    pub fn expiry(&self) -> Arc<AtomicI64> {
        self.not_after.clone()
    }

    /// Serves `identity` from the next handshake on; an unusable one changes
    /// nothing.
    pub fn replace(&self, identity: &ServingIdentity) -> Result<(), ListenerError> {
        let acceptor = tls_acceptor(identity)?;
        *self.acceptor.write().unwrap_or_else(|p| p.into_inner()) = acceptor;
        identity
            .ca_pem
            .clone_into(&mut self.ca_pem.write().unwrap_or_else(|p| p.into_inner()));
        self.not_after
            .store(identity.info.not_after.unix_timestamp(), Ordering::Relaxed);
        Ok(())
    }
}
