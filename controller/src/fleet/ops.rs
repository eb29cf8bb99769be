//! The operations `ping`, `hosts`, `status`, `start/stop/restart/rm` and
//! `logs` run on the fleet. They return data; the CLI presents it.

use imfleet_proto::agent::v1::{
    ControlRequest, DeploymentStatus, LogLine, LogsRequest, control_request::Action,
};
use serde::Serialize;

use super::{Fleet, FleetError, HostResult};
use crate::agent_client::Agent;
use crate::deployment::{DEPLOYMENT_NAME, portsip};
use crate::store::{DeploymentRecord, EventKind, HostRecord};

/// One agent's answer to a ping (or its silence).
#[derive(Debug, Clone, Serialize)]
pub struct AgentStatus {
    pub host: String,
    pub address: String,
    pub reachable: bool,
    pub agent_version: Option<String>,
    pub hostname: Option<String>,
    pub uptime_seconds: Option<u64>,
    pub supervision: Option<String>,
    pub protocol_revision: Option<u32>,
    pub certificate_not_after: String,
    pub certificate_days_left: i64,
    pub round_trip_ms: Option<f64>,
    pub bootstrapped_at: String,
    /// Version of the list of accepted controller certificates the agent
    /// holds (0: none; older agents keep none).
    pub controllers_version: Option<u64>,
    pub error: Option<String>,
}

/// Pings every host; an answer updates when the host was last seen.
pub async fn ping(fleet: &Fleet, hosts: &[HostRecord]) -> Vec<AgentStatus> {
    let results = fleet
        .run(hosts, |_, agent| async move { Ok(agent.ping().await?) })
        .await;
    let mut out = Vec::new();
    for HostResult { host, result } in results {
        let now = crate::now_unix();
        let mut status = AgentStatus {
            host: host.name.clone(),
            address: super::address_of(&host).to_string(),
            reachable: false,
            agent_version: None,
            hostname: None,
            uptime_seconds: None,
            supervision: None,
            protocol_revision: None,
            certificate_not_after: crate::rfc3339(host.cert_not_after),
            certificate_days_left: (host.cert_not_after - now) / 86_400,
            round_trip_ms: None,
            bootstrapped_at: crate::rfc3339(host.bootstrapped_at),
            controllers_version: None,
            error: None,
        };
        match result {
            Ok(pong) => {
                let reply = pong.reply;
                if let Err(e) = fleet
                    .store()
                    .mark_seen(&host.name, now, &reply.agent_version)
                    .await
                {
                    tracing::warn!(host = %host.name, "could not record the answer: {e}");
                }
                status.reachable = true;
                status.certificate_not_after = crate::rfc3339(pong.certificate_not_after);
                status.certificate_days_left = (pong.certificate_not_after - now) / 86_400;
                status.agent_version = Some(reply.agent_version);
                status.hostname = Some(reply.hostname);
                status.uptime_seconds = Some(reply.uptime_seconds);
                status.supervision = Some(reply.supervision);
                status.protocol_revision = Some(reply.protocol_revision);
                status.round_trip_ms = Some(pong.round_trip.as_secs_f64() * 1000.0);
                status.controllers_version = Some(reply.controllers_version);
            }
            Err(e) => status.error = Some(crate::error_chain(&e)),
        }
        out.push(status);
    }
    out
}

/// The IM service on one host, as recorded and as the agent sees it now.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct ServiceStatus {
    pub host: String,
    pub agent_reachable: bool,
    pub healthy: bool,
    pub deployment: Option<DeploymentRecord>,
    pub status: Option<DeploymentStatus>,
    pub error: Option<String>,
    /// Who answered: "agent" (asked now) or "daemon" (its latest sample).
    pub source: String,
    /// With the daemon: seconds since the host's last sample.
    pub sample_age_seconds: Option<f64>,
    /// The host's place in the active rollout, if it is in one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rollout: Option<HostRollout>,
}

/// A host's step in the active rollout, as `status` shows it.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct HostRollout {
    pub id: i64,
    pub state: crate::store::RolloutState,
    pub phase: crate::store::StepPhase,
    pub detail: String,
}

/// Marks each status with its host's step in the active rollout.
async fn attach_rollout(store: &crate::store::Store, statuses: &mut [ServiceStatus]) {
    let Ok(Some(rollout)) = store.active_rollout().await else {
        return;
    };
    for status in statuses {
        status.rollout = rollout
            .steps
            .iter()
            .find(|s| s.host == status.host)
            .map(|s| HostRollout {
                id: rollout.id,
                state: rollout.state,
                phase: s.phase,
                detail: s.detail.clone(),
            });
    }
}

pub async fn status(fleet: &Fleet, hosts: &[HostRecord]) -> Vec<ServiceStatus> {
    let results = fleet
        .run(hosts, |_, agent| async move {
            Ok(agent.status(DEPLOYMENT_NAME).await?)
        })
        .await;
    let mut out = Vec::new();
    for HostResult { host, result } in results {
        let deployment = fleet.store().deployment(&host.name).await.ok().flatten();
        out.push(match result {
            Ok(status) => ServiceStatus {
                host: host.name,
                agent_reachable: true,
                healthy: status.healthy,
                deployment,
                status: Some(status),
                error: None,
                source: "agent".into(),
                sample_age_seconds: None,
                rollout: None,
            },
            Err(e) => ServiceStatus {
                host: host.name,
                agent_reachable: false,
                healthy: false,
                deployment,
                status: None,
                error: Some(crate::error_chain(&e)),
                source: "agent".into(),
                sample_age_seconds: None,
                rollout: None,
            },
        });
    }
    out
}

/// The status from the running daemon's latest samples when it watches
/// every selected host (no agent is asked: milliseconds for any fleet);
/// from the agents otherwise.
pub async fn status_preferring_daemon(
    fleet: &Fleet,
    state_dir: &std::path::Path,
    hosts: &[HostRecord],
) -> Vec<ServiceStatus> {
    let snapshots =
        match crate::serve::client::fetch_hosts(&crate::serve::client::Endpoint::local(state_dir))
            .await
        {
            Ok(snapshots) => snapshots.unwrap_or_default(),
            // Said, not hidden: the agents are asked instead.
            Err(e) => {
                tracing::warn!("{e}; asking the agents instead");
                Vec::new()
            }
        };
    status_from_snapshots(fleet, &snapshots, hosts).await
}

/// The status of `hosts` from the daemon's `snapshots` where they hold a
/// host, from its agent otherwise (what the daemon answers its clients).
pub async fn status_from_snapshots(
    fleet: &Fleet,
    snapshots: &[crate::health::HostSnapshot],
    hosts: &[HostRecord],
) -> Vec<ServiceStatus> {
    let by_name: std::collections::HashMap<&str, &crate::health::HostSnapshot> =
        snapshots.iter().map(|s| (s.host.as_str(), s)).collect();
    // Each host from the daemon when it has seen it; the others (none, or
    // not yet tried) are asked directly, so one host never sends the whole
    // fleet to the agents.
    let mut known = std::collections::HashMap::new();
    let mut ask = Vec::new();
    for host in hosts {
        match by_name
            .get(host.name.as_str())
            .filter(|snap| snap.agent_up || snap.reconnects > 0)
        {
            Some(snap) => {
                known.insert(host.name.clone(), from_snapshot(fleet, host, snap).await);
            }
            None => ask.push(host.clone()),
        }
    }
    let mut asked: std::collections::HashMap<String, ServiceStatus> = status(fleet, &ask)
        .await
        .into_iter()
        .map(|s| (s.host.clone(), s))
        .collect();
    let mut statuses: Vec<ServiceStatus> = hosts
        .iter()
        .filter_map(|h| known.remove(&h.name).or_else(|| asked.remove(&h.name)))
        .collect();
    attach_rollout(fleet.store(), &mut statuses).await;
    statuses
}

/// A host's status as the daemon last saw it.
async fn from_snapshot(
    fleet: &Fleet,
    host: &HostRecord,
    snap: &crate::health::HostSnapshot,
) -> ServiceStatus {
    let deployment = fleet.store().deployment(&host.name).await.ok().flatten();
    let status = snap.sample.as_ref().map(|s| DeploymentStatus {
        name: DEPLOYMENT_NAME.into(),
        containers: s.containers.clone(),
        healthy: s.deployment_healthy,
        config_hash: deployment
            .as_ref()
            .map(|d| d.config_hash.clone())
            .unwrap_or_default(),
        applying: false,
    });
    ServiceStatus {
        host: host.name.clone(),
        agent_reachable: snap.agent_up,
        healthy: snap.im_healthy.unwrap_or(false),
        deployment,
        status,
        error: (!snap.agent_up)
            .then(|| snap.error.clone())
            .or_else(|| (!snap.im_detail.is_empty()).then(|| snap.im_detail.clone())),
        source: "daemon".into(),
        sample_age_seconds: snap.sample_age_seconds,
        rollout: None,
    }
}

/// Start, stop, restart or remove the IM service on each host, recording
/// each change. `purge` (with remove) also deletes the IM data directories
/// recorded for the host; the `-f` storage directory is the operator's.
pub async fn control(
    fleet: &Fleet,
    hosts: &[HostRecord],
    action: Action,
    grace_seconds: u32,
    purge: bool,
) -> Vec<HostResult<DeploymentStatus>> {
    fleet
        .run(hosts, |host, agent| async move {
            fleet.store().check_not_in_rollout(&host.name).await?;
            let purge_paths = match (purge, fleet.store().deployment(&host.name).await?) {
                (true, Some(d)) => portsip::purge_paths(&d.data_path),
                _ => Vec::new(),
            };
            let kind = match action {
                Action::Start => EventKind::Start,
                Action::Stop => EventKind::Stop,
                Action::Restart => EventKind::Restart,
                Action::Remove if !purge_paths.is_empty() => EventKind::Purge,
                Action::Remove | Action::Unspecified => EventKind::Remove,
            };
            let status = agent
                .control(ControlRequest {
                    deployment: DEPLOYMENT_NAME.into(),
                    action: action as i32,
                    stop_grace_seconds: grace_seconds,
                    purge_paths: purge_paths.clone(),
                })
                .await?;
            let detail = if purge_paths.is_empty() {
                DEPLOYMENT_NAME.to_owned()
            } else {
                format!("{DEPLOYMENT_NAME}; deleted {}", purge_paths.join(", "))
            };
            fleet
                .store()
                .record_control(&host.name, kind, &detail)
                .await?;
            Ok(status)
        })
        .await
}

/// A host's log stream.
#[derive(Debug)]
pub struct LogStream {
    agent: Agent,
    lines: tonic::Streaming<LogLine>,
}

impl LogStream {
    pub async fn next(&mut self) -> Result<Option<LogLine>, FleetError> {
        self.lines
            .message()
            .await
            .map_err(|s| self.agent.stream_error(s).into())
    }
}

pub async fn logs(
    fleet: &Fleet,
    host: &str,
    request: LogsRequest,
) -> Result<LogStream, FleetError> {
    let host = fleet.host(host).await?;
    let agent = fleet.connect(&host).await?;
    let lines = agent.logs(request).await?;
    Ok(LogStream { agent, lines })
}
