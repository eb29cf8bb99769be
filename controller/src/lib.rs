//! The imfleet controller: runs on pbx01, owns the CA and the state database,
//! bootstraps agents over SSH once, then drives them over mutual TLS.
//!
//! Module map:
//! - [`state`]: the state directory (CA, controller identity, database).
//! - [`ca_rotation`]: replacing the fleet CA in phases (both trusted,
//!   certificates re-issued, the old one dropped), decisions pure.
//! - [`controller_list`]: the controller's own certificates and the signed
//!   list of them agents accept (revocation).
//! - [`store`]: the SQLite state database (one thread owns the connection;
//!   hosts, deployments and their revisions, rollouts, events).
//! - [`ssh`]: the one-time SSH channel, through the system OpenSSH client.
//! - [`bootstrap`]: installing the agent on a host; `plan` holds its pure logic.
//! - [`agent_client`]: mTLS gRPC to agents: one call helper, error
//!   classification, the protocol revision each operation needs.
//! - [`agent_tls`]: the TLS half of that: imfleet's rules on the agent's certificate.
//! - [`fleet`]: hosts by name, address or `--all`, one operation on many with
//!   bounded concurrency; `fleet::ops` are ping, status, control and logs.
//! - [`progress`]: typed progress events and the sinks they go to.
//! - [`renewal`]: agent certificates renewed over mTLS; only a host's
//!   current certificate is accepted.
//! - [`health`]: fleet health as pure functions (samples to observations to
//!   events), Prometheus exposition and metrics.
//! - [`operators`]: people's certificates for the daemon's API (any PBX
//!   node drives the fleet through it), and the bundle the CLI presents.
//! - [`ha`]: the daemon as a Pacemaker resource: the OCF agent, the pure
//!   plan of `pcs` changes from the observed CIB, and running them.
//! - [`serve`]: the daemon: health streams, history, events, webhook, HTTP.
//! - [`preflight`]: judging a host's inventory against PortSIP's needs (pure).
//! - [`deployment`]: the PortSIP spec (pure) and the deploy steps.
//! - [`pbx`]: the PBX REST API.
//! - [`rollout`]: rolling, health-gated upgrades: a persisted state machine
//!   whose decisions are pure (`rollout::decide`).
#![forbid(unsafe_code)]

pub mod agent_client;
pub mod agent_tls;
pub mod agent_upgrade;
pub mod bootstrap;
pub mod ca_rotation;
pub mod controller_list;
pub mod deployment;
pub mod fleet;
pub mod ha;
pub mod health;
pub mod operators;
pub mod pbx;
pub mod preflight;
pub mod progress;
pub mod renewal;
pub mod rollout;
pub mod serve;
pub mod ssh;
pub mod state;
pub mod store;
pub mod text;

/// Version of this controller build.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Seconds since the Unix epoch.
pub fn now_unix() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// RFC 3339 UTC text of Unix seconds.
pub fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}

/// An error and all its causes on one line, without repeating a cause that
/// the outer message already includes.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut parts = vec![err.to_string()];
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = cause.source();
    }
    parts.join(": ")
}
