//! The imfleet agent: a small daemon on an IM host that serves the controller
//! over mutual TLS, and the on-host half of the one-time SSH bootstrap.
//!
//! Module map:
//! - `imfleet_proto::model::layout`: where the agent keeps its files (shared).
//! - [`config`]: `agent.toml`, written at bootstrap.
//! - [`identity`]: key generation on the host, CSR out, certificate in.
//! - [`server`]: the gRPC service and the mTLS role gate in front of it.
//! - [`listener`]: accepting connections and TLS handshakes, bounded.
//! - [`policy`]: what a spec may ask for (roots fixed at bootstrap).
//! - [`audit`]: the log of every mutating request.
//! - [`deploy`]: applying and operating deployments on the Docker Engine;
//!   an apply the agent died in is finished or undone at start-up.
//! - [`facts`]: measuring the host for inventory and preflight.
//! - [`health`]: the health stream's samples (host, containers, service, agent).
//! - [`supervision`]: running under systemd or under the agent's own supervisor.
#![forbid(unsafe_code)]

pub mod audit;
pub mod config;
pub mod deploy;
pub mod facts;
pub mod health;
pub mod identity;
pub mod listener;
pub mod policy;
pub mod server;
pub mod supervision;

/// Version of this agent build.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
