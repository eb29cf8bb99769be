//! `controller ca rotate`: replacing the fleet CA without SSH and without
//! a moment when a host and the controller distrust each other, in phases
//! (as Teleport rotates its CAs):
//!
//! 1. `trust`: a new CA is made; every agent is told to trust the old and
//!    the new one (a bundle the old CA signed).
//! 2. `reissue`: the new CA signs from now on; the controller's certificate
//!    and every agent's are re-issued under it (agents renew over mTLS).
//! 3. `drop`: every agent is told to trust only the new CA (a bundle the new
//!    CA signed); then the new CA takes the old one's place in the state
//!    directory (`finishing`) and the rotation ends.
//!
//! A phase completes only when every host has taken it. A host that cannot
//! be reached stops the rotation there (it is listed; run the command again
//! when it is back); going on without it is the operator's choice
//! (`--skip HOST`), and that host will need `controller bootstrap` once the
//! old CA is dropped. The controller trusts both CAs until the end. Each run
//! observes every host afresh, so the command is resumable at any point.

pub mod decide;
mod files;

use std::path::Path;

use serde::{Deserialize, Serialize};

pub use decide::{Observed, Step};
pub use files::{ROTATION, Rotation};

use crate::agent_client::{Agent, Feature};
use crate::fleet::{Fleet, FleetError, address_of};
use crate::state::{ClientIdentity, ControllerState, StateError};
use crate::store::{HostRecord, StoreError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    Trust,
    Reissue,
    Drop,
    Finishing,
}

#[derive(Debug, thiserror::Error)]
pub enum RotationError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Fleet(#[from] FleetError),
}

/// One host's part in a run.
#[derive(Debug, Serialize)]
pub struct HostOutcome {
    pub host: String,
    pub step: Step,
    /// Why it is not settled, if it is not.
    pub detail: Option<String>,
}

/// Where a run left the rotation.
#[derive(Debug, Serialize)]
pub struct RotationReport {
    pub finished: bool,
    /// The phase the rotation waits in (none once finished).
    pub phase: Option<Phase>,
    /// SHA-256 of the new CA certificate.
    pub new_ca: String,
    pub hosts: Vec<HostOutcome>,
    /// Hosts gone on without: each needs `controller bootstrap`.
    pub skipped: Vec<String>,
}

/// Runs the rotation as far as it can go now (starting one if none is
/// under way); `skip` names hosts to go on without.
pub async fn rotate(dir: &Path, skip: &[String]) -> Result<RotationReport, RotationError> {
    loop {
        let (state, _) = ControllerState::open_or_init(dir)?;
        let fleet = Fleet::new(&state);
        let mut skipped = Vec::new();
        for name in skip {
            skipped.push(fleet.host(name).await?.name);
        }
        let Some(mut rotation) = Rotation::load(dir)? else {
            crate::state::with_lock(dir, || {
                if Rotation::load(dir)?.is_none() {
                    let name = format!(
                        "imfleet CA ({})",
                        crate::rfc3339(crate::now_unix())
                            .get(..10)
                            .unwrap_or_default()
                    );
                    Rotation::start(dir, &name)?;
                }
                Ok(())
            })?;
            // Opened again: the new CA is trusted from now on.
            continue;
        };
        if skipped.iter().any(|h| !rotation.skipped.contains(h)) {
            rotation.skipped.extend(skipped);
            rotation.skipped.sort();
            rotation.skipped.dedup();
            crate::state::with_lock(dir, || rotation.save(dir))?;
        }
        let old = fingerprint(&state, 0);
        let new = rotation.new_ca.clone();
        let hosts = fleet.store().hosts().await?;
        let outcomes = crate::fleet::bounded(hosts, 4, |host| {
            let (fleet, state, rotation, old, new) = (&fleet, &state, &rotation, &old, &new);
            async move { advance(fleet, state, rotation, old, new, host).await }
        })
        .await;
        let steps: Vec<Step> = outcomes.iter().map(|o| o.step).collect();
        if !decide::phase_done(&steps) {
            return Ok(RotationReport {
                finished: false,
                phase: Some(rotation.phase),
                new_ca: new,
                hosts: outcomes,
                skipped: rotation.skipped,
            });
        }
        let next = match rotation.phase {
            Phase::Trust => Phase::Reissue,
            Phase::Reissue => Phase::Drop,
            Phase::Drop | Phase::Finishing => {
                crate::state::with_lock(dir, || Rotation::finish(dir))?;
                tracing::info!(new_ca = %new, "CA rotation finished");
                return Ok(RotationReport {
                    finished: true,
                    phase: None,
                    new_ca: new,
                    hosts: outcomes,
                    skipped: rotation.skipped,
                });
            }
        };
        crate::state::with_lock(dir, || {
            rotation.phase = next;
            rotation.save(dir)?;
            if next == Phase::Reissue {
                // The controller's own certificate comes from the new CA now.
                crate::state::drop_identity(dir);
            }
            Ok(())
        })?;
        tracing::info!(phase = ?next, "CA rotation: next phase");
    }
}

/// SHA-256 of the `index`th CA the controller trusts (0: the one in place).
fn fingerprint(state: &ControllerState, index: usize) -> String {
    imfleet_certs::split_certificates_pem(&state.identity.ca_pem)
        .get(index)
        .and_then(|pem| imfleet_certs::inspect_pem(pem).ok())
        .map(|i| i.sha256_fingerprint)
        .unwrap_or_default()
}

/// Observes one host, does what its step asks, and observes it again.
async fn advance(
    fleet: &Fleet,
    state: &ControllerState,
    rotation: &Rotation,
    old: &str,
    new: &str,
    host: HostRecord,
) -> HostOutcome {
    let skipped = rotation.skipped.contains(&host.name);
    let outcome = |step, detail| HostOutcome {
        host: host.name.clone(),
        step,
        detail,
    };
    if skipped {
        return outcome(Step::Skipped, None);
    }
    let (seen, agent, why) = observe(fleet, state, &host, old, new).await;
    let step = decide::step(rotation.phase, &seen, false);
    let Some(agent) = agent else {
        return outcome(step, why);
    };
    let acted = match step {
        Step::TrustBoth | Step::TrustNew => {
            let bundle = if step == Step::TrustBoth {
                state.identity.ca_pem.clone()
            } else {
                imfleet_certs::split_certificates_pem(&state.identity.ca_pem)
                    .get(1)
                    .cloned()
                    .unwrap_or_default()
            };
            match state.ca.sign(&imfleet_certs::trusted_cas_message(&bundle)) {
                Ok(signature) => agent
                    .set_trusted_cas(bundle, signature)
                    .await
                    .map(drop)
                    .map_err(|e| crate::error_chain(&e)),
                Err(e) => Err(e.to_string()),
            }
        }
        Step::Reissue => crate::renewal::renew(fleet, &host, &agent)
            .await
            .map(drop)
            .map_err(|e| crate::error_chain(&e)),
        _ => return outcome(step, why),
    };
    if let Err(why) = acted {
        return outcome(step, Some(why));
    }
    let (seen, _, why) = observe(fleet, state, &host, old, new).await;
    let step = decide::step(rotation.phase, &seen, false);
    outcome(step, if step.settled() { None } else { why })
}

/// What a host trusts and serves now, with a connection to it if it
/// answers (else why not).
async fn observe(
    fleet: &Fleet,
    state: &ControllerState,
    host: &HostRecord,
    old: &str,
    new: &str,
) -> (Observed, Option<Agent>, Option<String>) {
    let agent = match fleet.connect(host).await {
        Ok(agent) => agent,
        Err(e) => return (Observed::default(), None, Some(crate::error_chain(&e))),
    };
    let pong = match agent.ping().await {
        Ok(pong) => pong,
        Err(e) => return (Observed::default(), None, Some(crate::error_chain(&e))),
    };
    let trusted = &pong.reply.trusted_ca_fingerprints;
    // Its certificate is the new CA's if a client trusting only that CA
    // completes a handshake with it.
    let new_only = ClientIdentity {
        ca_pem: imfleet_certs::split_certificates_pem(&state.identity.ca_pem)
            .get(1)
            .cloned()
            .unwrap_or_default(),
        ..state.identity.clone()
    };
    let serves_new = Agent::connect(&new_only, &address_of(host)).await.is_ok();
    let seen = Observed {
        reachable: true,
        can_rotate: Feature::CaRotation
            .check(pong.reply.protocol_revision)
            .is_ok(),
        trusts_old: trusted.iter().any(|f| f == old),
        trusts_new: trusted.iter().any(|f| f == new),
        serves_new,
    };
    let why = (!seen.can_rotate).then(|| {
        "its agent is too old to rotate CAs: upgrade it first (`controller agents upgrade`)"
            .to_owned()
    });
    (seen, Some(agent), why)
}
