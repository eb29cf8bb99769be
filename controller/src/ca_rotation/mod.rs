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
pub use files::{NEXT_KEY, ROTATION, Rotation};

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
    #[error("another `controller ca rotate` is running on this state directory; let it finish")]
    Busy,
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
    // One run at a time: each moves the phase on from what it observed.
    let _ = ControllerState::open(dir)?;
    let lock_path = crate::state::run_dir(dir).join("rotation.lock");
    let lock = std::fs::File::create(&lock_path).map_err(|source| StateError::Io {
        path: lock_path.display().to_string(),
        source,
    })?;
    if lock.try_lock().is_err() {
        return Err(RotationError::Busy);
    }
    loop {
        let state = ControllerState::open(dir)?;
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
        let cas = Cas::of(&state, &rotation)?;
        let new = rotation.new_ca.clone();
        let hosts = fleet.store().hosts().await?;
        let names: Vec<String> = hosts.iter().map(|h| h.name.clone()).collect();
        let outcomes = crate::fleet::bounded(hosts, 4, |host| {
            let (fleet, state, rotation, cas) = (&fleet, &state, &rotation, &cas);
            async move { advance(fleet, state, rotation, cas, host).await }
        })
        .await;
        let steps: Vec<Step> = outcomes.iter().map(|o| o.step).collect();
        // A host bootstrapped meanwhile is taken through this phase too.
        let now: Vec<String> = fleet
            .store()
            .hosts()
            .await?
            .into_iter()
            .map(|h| h.name)
            .collect();
        if now != names {
            continue;
        }
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
                // Controller certificates of the old CA are refused from now
                // on, also on connections made before the old CA was dropped.
                let state = ControllerState::open(dir)?;
                let current = imfleet_certs::inspect_pem(&state.identity.cert_pem)
                    .map(|i| i.serial_hex)
                    .unwrap_or_default();
                crate::state::with_lock(dir, || {
                    crate::controller_list::revoke_all_but(dir, &current)?;
                    Ok(())
                })?;
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
        // From `reissue` on, the next open issues the controller's own
        // certificate from the new CA (one the signing CA did not issue is
        // never kept).
        crate::state::with_lock(dir, || {
            rotation.phase = next;
            rotation.save(dir)
        })?;
        tracing::info!(phase = ?next, "CA rotation: next phase");
    }
}

/// The two CAs of a rotation, as the state opened with them trusts them.
struct Cas {
    old: String,
    new: String,
    new_pem: String,
    /// Both, as agents are told to trust them in the `trust` phase.
    both_pem: String,
}

impl Cas {
    fn of(state: &ControllerState, rotation: &Rotation) -> Result<Cas, StateError> {
        let trusted = imfleet_certs::split_certificates_pem(&state.identity.ca_pem);
        let fingerprint = |pem: &String| {
            imfleet_certs::inspect_pem(pem)
                .map(|i| i.sha256_fingerprint)
                .unwrap_or_default()
        };
        let new_pem = trusted
            .iter()
            .find(|pem| fingerprint(pem) == rotation.new_ca);
        let old_pem = trusted
            .iter()
            .find(|pem| fingerprint(pem) != rotation.new_ca);
        match (old_pem, new_pem, trusted.len()) {
            (Some(old), Some(new), 2) => Ok(Cas {
                old: fingerprint(old),
                new: rotation.new_ca.clone(),
                new_pem: new.clone(),
                both_pem: format!("{old}{new}"),
            }),
            _ => Err(StateError::Corrupt {
                path: state.dir().join(ROTATION).display().to_string(),
                detail: "the CAs of the rotation under way are not the two the state directory trusts; restore the state directory from backup".into(),
            }),
        }
    }
}

/// Observes one host, does what its step asks, and observes it again.
async fn advance(
    fleet: &Fleet,
    state: &ControllerState,
    rotation: &Rotation,
    cas: &Cas,
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
    let (seen, agent, why) = observe(fleet, state, &host, cas).await;
    let step = decide::step(rotation.phase, &seen, false);
    let Some((agent, trusted)) = agent else {
        return outcome(step, why);
    };
    let acted = match step {
        Step::TrustBoth | Step::TrustNew => {
            let bundle = if step == Step::TrustBoth {
                cas.both_pem.clone()
            } else {
                cas.new_pem.clone()
            };
            // Bound to what the host trusts now: not replayable later.
            let message = imfleet_certs::trusted_cas_message(&trusted, &bundle);
            match state
                .ca
                .load()
                .map_err(|e| e.to_string())
                .and_then(|ca| ca.sign(&message).map_err(|e| e.to_string()))
            {
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
    let (seen, _, why) = observe(fleet, state, &host, cas).await;
    let step = decide::step(rotation.phase, &seen, false);
    outcome(step, if step.settled() { None } else { why })
}

/// What a host trusts and serves now, with a connection to it and the CAs
/// it trusts if it answers (else why not).
async fn observe(
    fleet: &Fleet,
    state: &ControllerState,
    host: &HostRecord,
    cas: &Cas,
) -> (Observed, Option<(Agent, Vec<String>)>, Option<String>) {
    let agent = match fleet.connect(host).await {
        Ok(agent) => agent,
        Err(e) => return (Observed::default(), None, Some(crate::error_chain(&e))),
    };
    let pong = match agent.ping().await {
        Ok(pong) => pong,
        Err(e) => return (Observed::default(), None, Some(crate::error_chain(&e))),
    };
    let trusted = pong.reply.trusted_ca_fingerprints;
    // Its certificate is the new CA's if a client trusting only that CA
    // completes a handshake with it.
    let new_only = ClientIdentity {
        ca_pem: cas.new_pem.clone(),
        ..state.identity.clone()
    };
    let serves_new = Agent::connect(&new_only, &address_of(host)).await.is_ok();
    let seen = Observed {
        reachable: true,
        can_rotate: Feature::CaRotation
            .check(pong.reply.protocol_revision)
            .is_ok(),
        trusts_old: trusted.contains(&cas.old),
        trusts_new: trusted.contains(&cas.new),
        serves_new,
    };
    let why = (!seen.can_rotate).then(|| {
        "its agent is too old to rotate CAs: upgrade it first (`controller agents upgrade`)"
            .to_owned()
    });
    (seen, Some((agent, trusted)), why)
}
