//! The imfleet agent: a small daemon on an IM host that serves the controller
//! over mutual TLS, and the on-host half of the one-time SSH bootstrap.
//!
//! Module map:
//! - `imfleet_proto::model::layout`: where the agent keeps its files (shared).
//! - [`config`]: `agent.toml`, written at bootstrap.
//! - [`identity`]: key generation on the host, CSR out, certificate in.
//! - [`server`]: the gRPC service.
//! - [`gate`]: the mTLS role gate in front of it, with the signed list of
//!   accepted controller certificates.
//! - [`listener`]: accepting connections and TLS handshakes, bounded.
//! - [`serving`]: the identity served with, swapped by a renewal in place.
//! - [`policy`]: what a spec may ask for (roots fixed at bootstrap).
//! - [`audit`]: the log of every mutating request.
//! - [`deploy`]: applying and operating deployments on the Docker Engine;
//!   an apply the agent died in is finished or undone at start-up.
//! - [`facts`]: measuring the host for inventory and preflight.
//! - [`health`]: the health stream's samples (host, containers, service, agent).
//! - [`supervision`]: running under systemd or under the agent's own supervisor.
//! - [`upgrade`]: replacing its own binary over mTLS, watched, rolled back
//!   by the host itself when the new one fails.
//! - [`cli`]: the command line (the binary's `main`).
#![forbid(unsafe_code)]

pub mod audit;
pub mod cli;
pub mod config;
pub mod deploy;
pub mod facts;
pub mod gate;
pub mod health;
pub mod identity;
pub mod listener;
pub mod policy;
pub mod server;
pub mod serving;
pub mod supervision;
pub mod upgrade;

#[cfg(feature = "test-flavors")]
pub mod flavor;

/// Version of this agent build.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The version this build reports of itself (a test flavour reports a
/// newer one).
pub fn version() -> &'static str {
    #[cfg(feature = "test-flavors")]
    if let Some(flavor) = flavor::current() {
        return flavor.version();
    }
    VERSION
}

/// The protocol revision this build speaks.
pub fn protocol_revision() -> u32 {
    #[cfg(feature = "test-flavors")]
    if let Some(flavor) = flavor::current() {
        return flavor.protocol_revision();
    }
    imfleet_proto::PROTOCOL_REVISION
}

/// What this build runs on, e.g. `x86_64-linux`.
pub fn platform() -> String {
    format!("{}-{}", std::env::consts::ARCH, std::env::consts::OS)
}
