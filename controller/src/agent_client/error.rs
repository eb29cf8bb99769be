//! Agent errors, classified for the operator: unreachable, TLS (with what to
//! do about it), refused, rejected, too old, or a plain RPC failure.

use super::AgentAddress;
use crate::error_chain;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("agent at {address} is unreachable: {detail}")]
    Unreachable { address: String, detail: String },
    #[error("TLS with the agent at {address} failed: {detail}. {hint}")]
    Tls {
        address: String,
        detail: String,
        hint: &'static str,
    },
    #[error("agent at {address} refused the call: {message}")]
    Refused { address: String, message: String },
    #[error("on {address}: {message}")]
    Rejected { address: String, message: String },
    #[error("agent at {address}: {status}")]
    Rpc {
        address: String,
        status: Box<tonic::Status>,
    },
    #[error(
        "the agent at {address} speaks protocol revision {have}; {what} needs revision {need} or later. {}",
        upgrade_hint(*have)
    )]
    TooOld {
        address: String,
        have: u32,
        need: u32,
        what: &'static str,
    },
    #[error("invalid agent address {address}: {detail}")]
    BadAddress { address: String, detail: String },
    #[error(
        "the agent at {address} presented certificate {serial}, which is not {host}'s current one ({why}); nothing was sent to it. If the host was re-installed by hand, run `controller bootstrap {host}`; otherwise something else answers with an old key: check the host"
    )]
    CertificateRefused {
        // Boxed: the error stays as small as the others.
        address: Box<str>,
        host: Box<str>,
        serial: Box<str>,
        why: Box<str>,
    },
}

/// How to bring an agent speaking `have` up to date: over mTLS when it can
/// upgrade itself, else one more bootstrap (its last SSH session).
fn upgrade_hint(have: u32) -> &'static str {
    if super::Feature::UpgradeAgent.check(have).is_ok() {
        "Upgrade it over mTLS: `controller agents upgrade <host>` (the IM keeps running)"
    } else {
        "Re-run `controller bootstrap` for the host once to upgrade its agent (identity and data are kept); later upgrades go over mTLS (`controller agents upgrade`)"
    }
}

/// Classifies a failed call or stream item.
pub(super) fn from_status(address: &AgentAddress, status: tonic::Status) -> AgentError {
    let address = address.to_string();
    match status.code() {
        tonic::Code::FailedPrecondition | tonic::Code::InvalidArgument => AgentError::Rejected {
            address,
            message: status.message().to_owned(),
        },
        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => AgentError::Refused {
            address,
            message: status.message().to_owned(),
        },
        tonic::Code::Unavailable | tonic::Code::Unknown => {
            let detail = std::error::Error::source(&status)
                .map(error_chain)
                .unwrap_or_else(|| status.message().to_owned());
            if was_cut(&detail) {
                AgentError::Unreachable {
                    address,
                    detail: "the connection was cut (the agent stopped or restarted, or the network failed)".into(),
                }
            } else if looks_like_tls(&detail) {
                AgentError::Tls {
                    address,
                    hint: tls_hint(&detail),
                    detail,
                }
            } else if status.code() == tonic::Code::Unavailable {
                AgentError::Unreachable { address, detail }
            } else {
                AgentError::Rpc {
                    address,
                    status: Box::new(status),
                }
            }
        }
        _ => AgentError::Rpc {
            address,
            status: Box::new(status),
        },
    }
}

/// A connection that ended mid-call: the peer went away, which rustls words
/// as a TLS matter (no close_notify) though nothing about TLS is wrong.
fn was_cut(detail: &str) -> bool {
    let d = detail.to_ascii_lowercase();
    [
        "close_notify",
        "connection reset",
        "broken pipe",
        "unexpected eof",
    ]
    .iter()
    .any(|m| d.contains(m))
}

fn looks_like_tls(detail: &str) -> bool {
    let d = detail.to_ascii_lowercase();
    [
        "certificate",
        "tls",
        "handshake",
        "alert",
        "unknownissuer",
        "notvalidforname",
    ]
    .iter()
    .any(|m| d.contains(m))
}

/// What an operator should do about a TLS failure, judged by its wording.
fn tls_hint(detail: &str) -> &'static str {
    let d = detail.to_ascii_lowercase();
    if d.contains("alert: unknownca") {
        "The agent does not trust this controller's CA: it was bootstrapped by another controller (or this state directory was recreated); re-run `controller bootstrap` for the host"
    } else if d.contains("alert: certificateexpired") {
        "The controller's own certificate has expired; run `controller init` to renew it"
    } else if d.contains("alert:") {
        "The agent refused the certificate this controller presented"
    } else if d.contains("not valid for name") {
        "The agent's certificate does not name the address dialled: the address may belong to another machine, or the host was re-addressed; re-run `controller bootstrap` for it if that is expected"
    } else if d.contains("expired") {
        "The agent's certificate has expired: it was not renewed in time (renewal starts 30 days before expiry; was the controller off that long?). Run `controller bootstrap` for the host to enrol it again"
    } else if d.contains("unknownissuer") {
        "The agent's certificate is not one this controller issued; re-run `controller bootstrap` for the host if that is expected"
    } else {
        "Check that the address really is the bootstrapped host"
    }
}

pub(super) fn classify_transport(
    address: &AgentAddress,
    err: &tonic::transport::Error,
) -> AgentError {
    let detail = error_chain(err);
    if looks_like_tls(&detail) {
        AgentError::Tls {
            address: address.to_string(),
            hint: tls_hint(&detail),
            detail,
        }
    } else {
        AgentError::Unreachable {
            address: address.to_string(),
            detail,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cut_connection_is_unreachable_not_a_tls_problem() {
        let address = AgentAddress {
            host: "10.0.0.5".into(),
            port: 7443,
        };
        let cut = tonic::Status::unavailable(
            "error reading a body from connection: peer closed connection without sending TLS close_notify",
        );
        let err = from_status(&address, cut);
        assert!(matches!(err, AgentError::Unreachable { .. }), "{err}");
        let refused = tonic::Status::unavailable("invalid peer certificate: UnknownIssuer");
        assert!(matches!(
            from_status(&address, refused),
            AgentError::Tls { .. }
        ));
    }
}
