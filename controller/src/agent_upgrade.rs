//! `controller agents upgrade`: the agent built with this controller sent
//! to hosts over mTLS, never SSH. The host checks and swaps the binary and
//! restarts it under a watcher of its own (see the agent's `upgrade`
//! module); this side checks what may be upgraded, streams the binary, and
//! follows the host's report until the new agent is confirmed or the host
//! has put the previous one back. The IM containers are not touched.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use imfleet_proto::agent::v1::{AgentBinaryChunk, AgentBinaryHeader};
use sha2::{Digest, Sha256};

use crate::agent_client::{AgentError, Feature};
use crate::fleet::{Fleet, HostResult};
use crate::progress::{Phase, ProgressSink, Reporter};
use crate::store::{EventKind, HostRecord, StepPhase};

/// How long the host may take from the swap to confirming the new agent (its
/// own deadline and grace window, plus restarts).
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(90);
/// Bytes per chunk on the wire.
const CHUNK: usize = 256 * 1024;

/// An agent binary to ship, as it describes itself.
#[derive(Debug, Clone)]
pub struct AgentBuild {
    pub path: PathBuf,
    pub version: String,
    pub protocol_revision: u32,
    pub sha256: String,
    pub bytes: Arc<Vec<u8>>,
    /// The fleet CA's signature, which the agent requires.
    pub signature: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentUpgradeError {
    #[error("agent binary {path}: {detail}")]
    LocalBinary { path: String, detail: String },
    #[error(
        "the agent on {host} speaks protocol revision {have}, which cannot upgrade itself (revision {} or later can); run `controller bootstrap {host}` once, and upgrades go over mTLS from then on",
        Feature::UpgradeAgent.revision()
    )]
    CannotSelfUpgrade { host: String, have: u32 },
    #[error(
        "{host} is in rollout {rollout} ({phase}); upgrade its agent when the rollout is over (`controller rollouts`)"
    )]
    HeldByRollout {
        host: String,
        rollout: i64,
        phase: String,
    },
    #[error("the host put the previous agent ({from}) back: {detail}")]
    RolledBack { from: String, detail: String },
    #[error(
        "the new agent on {host} was not confirmed within {} s (last seen: {last}); see `journalctl -u imfleet-agent` or /opt/imfleet/log/agent.log there",
        CONFIRM_TIMEOUT.as_secs()
    )]
    NotConfirmed { host: String, last: String },
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// What happened on one host.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum Upgraded {
    /// It already runs this build.
    UpToDate {
        version: String,
    },
    Upgraded {
        from: String,
        to: String,
    },
}

impl AgentBuild {
    /// Reads an agent binary, asks it what it is (`version --json`) and signs
    /// it with the fleet CA.
    pub async fn read(
        path: &Path,
        ca: &imfleet_certs::CertificateAuthority,
    ) -> Result<AgentBuild, AgentUpgradeError> {
        let bad = |detail: String| AgentUpgradeError::LocalBinary {
            path: path.display().to_string(),
            detail,
        };
        let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        let out = tokio::process::Command::new(path)
            .args(["version", "--json"])
            .env_clear()
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .map_err(|e| bad(format!("cannot run it ({e})")))?;
        #[derive(serde::Deserialize)]
        struct Info {
            version: String,
            protocol_revision: u32,
        }
        let info: Info = serde_json::from_slice(&out.stdout).map_err(|_| {
            bad("`version --json` printed no version: is it an imfleet agent?".into())
        })?;
        let sha256 = hex::encode(Sha256::digest(&bytes));
        let message =
            imfleet_certs::agent_binary_message(&sha256, &info.version, info.protocol_revision);
        let signature = ca
            .sign(&message)
            .map_err(|e| bad(format!("cannot sign it with the CA: {e}")))?;
        Ok(AgentBuild {
            path: path.to_owned(),
            version: info.version,
            protocol_revision: info.protocol_revision,
            sha256,
            bytes: Arc::new(bytes),
            signature,
        })
    }
}

/// Upgrades the agents of `hosts`, at most `max_parallel` at once.
pub async fn upgrade_agents(
    fleet: &Fleet,
    hosts: &[HostRecord],
    build: &AgentBuild,
    max_parallel: usize,
    progress: Arc<dyn ProgressSink>,
) -> Vec<HostResult<Upgraded>> {
    crate::fleet::bounded(hosts.to_vec(), max_parallel.max(1), |host| {
        let progress = Reporter::new(progress.clone(), host.name.clone());
        async move {
            let result = upgrade_host(fleet, &host, build, &progress)
                .await
                .map_err(|e| crate::fleet::FleetError::AgentUpgrade(Box::new(e)));
            HostResult { host, result }
        }
    })
    .await
}

/// One host: checked, shipped, followed until the host's verdict.
pub async fn upgrade_host(
    fleet: &Fleet,
    host: &HostRecord,
    build: &AgentBuild,
    progress: &Reporter,
) -> Result<Upgraded, AgentUpgradeError> {
    let agent = fleet.connect(host).await?;
    let pong = agent.ping().await?;
    let running = pong.reply.agent_version.clone();
    if running == build.version && pong.reply.protocol_revision == build.protocol_revision {
        return Ok(Upgraded::UpToDate { version: running });
    }
    if Feature::UpgradeAgent
        .check(pong.reply.protocol_revision)
        .is_err()
    {
        return Err(AgentUpgradeError::CannotSelfUpgrade {
            host: host.name.clone(),
            have: pong.reply.protocol_revision,
        });
    }
    if let Some(rollout) = fleet.store().active_rollout().await?
        && let Some(step) = rollout
            .steps
            .iter()
            .find(|s| s.host == host.name && !s.phase.has_ended() && s.phase != StepPhase::Pending)
    {
        return Err(AgentUpgradeError::HeldByRollout {
            host: host.name.clone(),
            rollout: rollout.id,
            phase: step.phase.as_str().to_owned(),
        });
    }
    let header = AgentBinaryHeader {
        size: build.bytes.len() as u64,
        sha256: build.sha256.clone(),
        version: build.version.clone(),
        protocol_revision: build.protocol_revision,
        signature: build.signature.clone(),
    };
    let bytes = build.bytes.clone();
    let chunks = futures::stream::iter((0..bytes.len().div_ceil(CHUNK).max(1)).map(move |i| {
        let data = bytes[i * CHUNK..((i + 1) * CHUNK).min(bytes.len())].to_vec();
        AgentBinaryChunk {
            header: (i == 0).then(|| header.clone()),
            data,
        }
    }));
    progress
        .phase(
            Phase::UploadAgent,
            format!(
                "{} ({:.1} MB)",
                build.version,
                build.bytes.len() as f64 / 1e6
            ),
            agent.upgrade_agent(chunks),
        )
        .await?;
    let outcome = progress
        .phase(
            Phase::AwaitAgentUpgrade,
            build.version.clone(),
            follow(fleet, host, build, &running),
        )
        .await;
    let store = fleet.store();
    match &outcome {
        Ok(_) => {
            store
                .record_event(
                    Some(&host.name),
                    EventKind::AgentUpgraded,
                    &format!("agent {running} -> {}", build.version),
                )
                .await?;
            store
                .mark_seen(&host.name, crate::now_unix(), &build.version)
                .await?;
        }
        Err(e) => {
            store
                .record_event(
                    Some(&host.name),
                    EventKind::AgentUpgradeFailed,
                    &e.to_string(),
                )
                .await?;
        }
    }
    outcome.map(|()| Upgraded::Upgraded {
        from: running,
        to: build.version.clone(),
    })
}

/// Pings the host (it restarts meanwhile) until its note says the new
/// agent is confirmed, or that the previous one is back.
async fn follow(
    fleet: &Fleet,
    host: &HostRecord,
    build: &AgentBuild,
    from: &str,
) -> Result<(), AgentUpgradeError> {
    let started = Instant::now();
    let mut last = String::from("no answer yet");
    while started.elapsed() < CONFIRM_TIMEOUT {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let pong = match fleet.connect(host).await {
            Ok(agent) => agent.ping().await,
            Err(e) => Err(e),
        };
        let reply = match pong {
            Ok(p) => p.reply,
            Err(e) => {
                last = crate::error_chain(&e);
                continue;
            }
        };
        let Some(note) = reply.last_upgrade.filter(|n| n.to_version == build.version) else {
            last = format!("agent {} answers", reply.agent_version);
            continue;
        };
        match note.state.as_str() {
            "confirmed" if reply.agent_version == build.version => return Ok(()),
            "rolled-back" => {
                return Err(AgentUpgradeError::RolledBack {
                    from: from.to_owned(),
                    detail: crate::text::printable(&note.detail, 512).into_owned(),
                });
            }
            state => last = format!("agent {} answers, upgrade {state}", reply.agent_version),
        }
    }
    Err(AgentUpgradeError::NotConfirmed {
        host: host.name.clone(),
        last: crate::text::printable(&last, 256).into_owned(),
    })
}
