//! Agent certificates renewed over mTLS, and the rule that only a host's
//! current certificate is accepted.
//!
//! A renewal: the agent makes a new key and sends a CSR; the CA signs it
//! with the names the current certificate carries; the certificate is
//! recorded as `issued` before it leaves; the agent installs it and serves
//! it from its next handshake (open streams go on); a fresh handshake that
//! presents it confirms it, and from then on the previous one is refused.
//! Started by any command whose agent is due (two thirds of the lifetime
//! gone), by `controller serve` every hour, or by `controller certs renew`.

use imfleet_certs::{AGENT_LIFETIME, CertError, CertificateInfo, Validity};
use serde::Serialize;

use crate::agent_client::{Agent, AgentError};
use crate::fleet::{Fleet, FleetError, HostResult, address_of};
use crate::store::{CertificateRecord, CertificateState, HostRecord, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum RenewalError {
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot sign the agent's request: {0}")]
    Sign(#[from] CertError),
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    #[error("the agent took certificate {expected} but serves {served}; it stays unconfirmed")]
    NotServed { expected: String, served: String },
    #[error(
        "{0} certificates issued to this host in the last day were never taken by its agent; no more until one is (see `controller certs` and the agent's log)"
    )]
    Unconfirmed(usize),
}

/// Unconfirmed renewals of one host in a day before renewal stops.
pub const MAX_UNCONFIRMED: usize = 3;

/// A renewal that completed.
#[derive(Debug, Clone, Serialize)]
pub struct Renewed {
    pub previous_serial: String,
    pub serial: String,
    /// RFC 3339.
    pub not_after: String,
}

/// Whether the certificate `agent` presented is due for renewal now.
pub fn due(presented: &CertificateInfo) -> bool {
    imfleet_certs::renewal_due(
        presented.not_before,
        presented.not_after,
        time::OffsetDateTime::now_utc(),
    )
}

/// Why the certificate with `serial` is refused for `host`, if it is:
/// only the host's current one (or one issued to it and not yet confirmed)
/// is accepted.
pub fn refusal(host: &str, record: Option<&CertificateRecord>) -> Option<String> {
    let Some(record) = record else {
        return Some("this controller has no record of issuing it".into());
    };
    if record.host.as_deref() != Some(host) || record.role != "agent" {
        return Some("it was issued to another host".into());
    }
    match record.state {
        CertificateState::Current | CertificateState::Issued => None,
        CertificateState::Superseded => Some(format!(
            "a renewal replaced it on {}",
            crate::rfc3339(record.changed_at)
        )),
        CertificateState::Revoked => Some(format!(
            "it was revoked on {}",
            crate::rfc3339(record.changed_at)
        )),
    }
}

/// Accepts the certificate `agent` presented for `host`, confirming one
/// that was issued and is now seen in use; refuses any other.
pub async fn accept(fleet: &Fleet, host: &HostRecord, agent: &Agent) -> Result<(), AgentError> {
    let refused = |serial: &str, why: String| AgentError::CertificateRefused {
        address: agent.address().to_string().into(),
        host: host.name.as_str().into(),
        serial: serial.into(),
        why: why.into(),
    };
    let Some(presented) = agent.presented_certificate() else {
        return Err(refused("(none)", "no certificate was presented".into()));
    };
    let serial = presented.serial_hex.to_ascii_lowercase();
    let record = fleet
        .store()
        .certificate(&serial)
        .await
        .map_err(|e| refused(&serial, format!("it cannot be checked: {e}")))?;
    if let Some(why) = refusal(&host.name, record.as_ref()) {
        return Err(refused(&serial, why));
    }
    if record.is_some_and(|r| r.state == CertificateState::Issued) {
        fleet
            .store()
            .confirm_certificate(&host.name, &serial, crate::now_unix())
            .await
            .map_err(|e| refused(&serial, format!("it cannot be confirmed: {e}")))?;
        tracing::info!(host = %host.name, %serial, "the agent serves its renewed certificate");
    }
    Ok(())
}

/// Renews the certificate of `host`, whose agent is `agent`.
pub async fn renew(
    fleet: &Fleet,
    host: &HostRecord,
    agent: &Agent,
) -> Result<Renewed, RenewalError> {
    let presented = agent
        .presented_certificate()
        .ok_or_else(|| RenewalError::NotServed {
            expected: "a certificate".into(),
            served: "none".into(),
        })?;
    // A host that keeps not taking its renewals is not given one more
    // certificate an hour.
    let day_ago = crate::now_unix() - 86_400;
    let pending = fleet
        .store()
        .unconfirmed_certificates(&host.name, day_ago)
        .await?;
    if pending >= MAX_UNCONFIRMED {
        return Err(RenewalError::Unconfirmed(pending));
    }
    let csr = agent.renew_identity().await?;
    // The names the controller chose at bootstrap; the handshake proved the
    // certificate is this CA's and names the address dialled.
    let certificate = fleet.ca().load()?.sign_agent_request(
        &csr,
        &host.name,
        &presented.subject_alt_names,
        Validity::starting_now(AGENT_LIFETIME),
    )?;
    let info = imfleet_certs::inspect_pem(&certificate)?;
    let record = CertificateRecord::new(
        &info,
        Some(&host.name),
        CertificateState::Issued,
        crate::now_unix(),
    );
    fleet.store().record_certificate(&record).await?;
    agent.install_identity(certificate).await?;
    let fresh = Agent::connect(fleet.identity(), &address_of(host)).await?;
    let served = fresh
        .presented_certificate()
        .map(|c| c.serial_hex.to_ascii_lowercase())
        .unwrap_or_default();
    if served != record.serial {
        return Err(RenewalError::NotServed {
            expected: record.serial,
            served,
        });
    }
    fleet
        .store()
        .confirm_certificate(&host.name, &record.serial, crate::now_unix())
        .await?;
    Ok(Renewed {
        previous_serial: presented.serial_hex.to_ascii_lowercase(),
        serial: record.serial,
        not_after: crate::rfc3339(record.not_after),
    })
}

/// Renews the certificates of `hosts` now (at most four at once), due or not.
pub async fn renew_hosts(fleet: &Fleet, hosts: &[HostRecord]) -> Vec<HostResult<Renewed>> {
    crate::fleet::bounded(hosts.to_vec(), 4, |host| async move {
        let result = async {
            let agent = fleet.connect_current(&host).await?;
            renew(fleet, &host, &agent)
                .await
                .map_err(|e| FleetError::Renewal(Box::new(e)))
        }
        .await;
        HostResult { host, result }
    })
    .await
}

/// The certificates the controller issued, and its own and its CA's.
#[derive(Debug, Serialize)]
pub struct CertificateList {
    pub ca: Summary,
    /// The controller certificate in use.
    pub controller: Summary,
    /// Every controller certificate agents are told of, and the version of
    /// that list.
    pub controllers: crate::controller_list::ControllerCertificates,
    /// Every agent certificate issued.
    pub certificates: Vec<CertificateRecord>,
}

/// A certificate of the controller's own.
#[derive(Debug, Serialize)]
pub struct Summary {
    pub subject: String,
    pub serial: String,
    pub sha256_fingerprint: String,
    /// Unix seconds.
    pub not_after: i64,
}

impl Summary {
    fn of(pem: &str) -> Result<Summary, CertError> {
        let info = imfleet_certs::inspect_pem(pem)?;
        Ok(Summary {
            subject: info.common_name,
            serial: info.serial_hex,
            sha256_fingerprint: info.sha256_fingerprint,
            not_after: info.not_after.unix_timestamp(),
        })
    }
}

/// The certificates of the state directory `dir`, whose fleet is `fleet`.
pub async fn list(
    fleet: &Fleet,
    dir: &std::path::Path,
) -> Result<CertificateList, crate::state::StateError> {
    let summary = |pem: &str| {
        Summary::of(pem).map_err(|source| crate::state::StateError::Cert {
            path: dir.display().to_string(),
            source,
        })
    };
    Ok(CertificateList {
        ca: summary(fleet.ca().cert_pem())?,
        controller: summary(&fleet.identity().cert_pem)?,
        controllers: crate::controller_list::ControllerCertificates::load(dir)?,
        certificates: fleet.store().certificates().await?,
    })
}

/// Renews when due, as a side effect of talking to an agent: a failure is
/// logged, never the caller's failure (the certificate is still valid).
pub async fn renew_if_due(fleet: &Fleet, host: &HostRecord, agent: &Agent) {
    let Some(presented) = agent.presented_certificate() else {
        return;
    };
    if !due(&presented) {
        return;
    }
    // One renewal per host at a time in this process (the daemon's hourly
    // pass and a stream's reconnection may meet); across processes, the
    // record keeps every renewal acceptable until one is confirmed.
    let Some(_renewing) = Renewing::claim(&host.name) else {
        return;
    };
    match renew(fleet, host, agent).await {
        Ok(renewed) => tracing::info!(
            host = %host.name,
            serial = %renewed.serial,
            not_after = %renewed.not_after,
            "renewed the agent's certificate"
        ),
        Err(RenewalError::Agent(AgentError::TooOld { .. })) => tracing::debug!(
            host = %host.name,
            "the agent is due for a new certificate but too old to renew it; upgrade it (`controller agents upgrade`)"
        ),
        Err(e) => tracing::warn!(
            host = %host.name,
            "could not renew the agent's certificate (valid until {}): {}",
            presented.not_after,
            crate::error_chain(&e)
        ),
    }
}

/// A host being renewed by this process; released when dropped.
struct Renewing(String);

static RENEWING: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

impl Renewing {
    fn claim(host: &str) -> Option<Renewing> {
        let mut hosts = RENEWING.lock().unwrap_or_else(|p| p.into_inner());
        if hosts.iter().any(|h| h == host) {
            return None;
        }
        hosts.push(host.to_owned());
        Some(Renewing(host.to_owned()))
    }
}

impl Drop for Renewing {
    fn drop(&mut self) {
        let mut hosts = RENEWING.lock().unwrap_or_else(|p| p.into_inner());
        hosts.retain(|h| *h != self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(host: &str, state: CertificateState) -> CertificateRecord {
        CertificateRecord {
            serial: "0a".into(),
            host: Some(host.into()),
            role: "agent".into(),
            key_sha256: String::new(),
            not_before: 0,
            not_after: 1,
            state,
            issued_at: 0,
            changed_at: 86_400,
        }
    }

    #[test]
    fn one_renewal_per_host_at_a_time() {
        let first = Renewing::claim("im7").unwrap();
        assert!(Renewing::claim("im7").is_none());
        assert!(Renewing::claim("im8").is_some());
        drop(first);
        assert!(Renewing::claim("im7").is_some());
    }

    #[test]
    fn only_the_current_or_a_pending_certificate_of_the_host_is_accepted() {
        assert!(refusal("im1", Some(&record("im1", CertificateState::Current))).is_none());
        assert!(refusal("im1", Some(&record("im1", CertificateState::Issued))).is_none());
        let superseded = refusal("im1", Some(&record("im1", CertificateState::Superseded)));
        assert!(
            superseded
                .unwrap()
                .contains("renewal replaced it on 1970-01-02")
        );
        assert!(refusal("im1", Some(&record("im1", CertificateState::Revoked))).is_some());
        assert!(refusal("im1", Some(&record("im2", CertificateState::Current))).is_some());
        assert!(refusal("im1", None).is_some());
        let mut controller = record("im1", CertificateState::Current);
        controller.role = "controller".into();
        assert!(refusal("im1", Some(&controller)).is_some());
    }
}
