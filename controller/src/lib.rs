//! The imfleet controller: runs on pbx01, owns the CA and the state database,
//! bootstraps agents over SSH once, then drives them over mutual TLS.
//!
//! Module map:
//! - [`state`]: the state directory (CA, controller identity, database).
//! - [`store`]: the SQLite state database.
//! - [`ssh`]: the one-time SSH channel, through the system OpenSSH client.
//! - [`bootstrap`]: installing the agent on a host; `plan` holds its pure logic.
//! - [`agent_client`]: mTLS gRPC to agents.
//! - [`agent_tls`]: the TLS half of that: imfleet's rules on the agent's certificate.
#![forbid(unsafe_code)]

pub mod agent_client;
pub mod agent_tls;
pub mod bootstrap;
pub mod deployment;
pub mod pbx;
pub mod preflight;
pub mod ssh;
pub mod state;
pub mod store;

/// Version of this controller build.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Seconds since the Unix epoch.
pub fn now_unix() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
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
