//! Preflight: judging an IM host against PortSIP's requirements. A pure
//! function from observed facts (the agent's inventory and the controller's
//! own OS) to one result per check, so every branch is unit-tested offline.

mod host;
mod network;
pub mod sizing;
mod software;

use host::*;
use network::*;
use software::*;

use std::net::IpAddr;

use imfleet_proto::agent::v1::{AddressOrigin, HostInventory, PathInfo};
use imfleet_proto::model::os_release::OsRelease;
use imfleet_proto::model::packages;
use serde::Serialize;

pub use sizing::Sizing;

pub use imfleet_proto::model::portsip::{
    DATABASE_PORT, DEFAULT_DATA_PATH, IM_CLIENT_PORT, IM_STATS_PORT, SERVICE_GID, SERVICE_UID,
};

/// What the operator is about to deploy.
#[derive(Debug, Clone)]
pub struct PreflightParams {
    pub private_ip: IpAddr,
    pub public_ip: IpAddr,
    /// `-f`: an existing directory for IM file storage.
    pub storage_dir: Option<String>,
    pub data_path: String,
    pub sizing: Sizing,
    /// The IM deployment already runs on the host: its own listeners on the
    /// IM ports are expected (deploy replaces them), not conflicts.
    pub redeploy: bool,
}

impl PreflightParams {
    /// The directory whose disk holds the IM's data: `-f` if given.
    pub fn storage_path(&self) -> &str {
        self.storage_dir.as_deref().unwrap_or(&self.data_path)
    }

    /// Paths the agent must examine.
    pub fn paths(&self) -> Vec<String> {
        let mut paths = vec![self.data_path.clone()];
        if let Some(dir) = &self.storage_dir {
            paths.push(dir.clone());
        }
        paths
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Fail,
    Warn,
    Pass,
}

/// One check's outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    pub id: &'static str,
    pub verdict: Verdict,
    pub observed: String,
    pub required: String,
    /// One line saying how to fix it (empty when it passed).
    pub remedy: String,
}

fn check(
    id: &'static str,
    verdict: Verdict,
    observed: impl Into<String>,
    required: impl Into<String>,
    remedy: impl Into<String>,
) -> Check {
    let remedy = if verdict == Verdict::Pass {
        String::new()
    } else {
        remedy.into()
    };
    Check {
        id,
        verdict,
        observed: observed.into(),
        required: required.into(),
        remedy,
    }
}

fn pass_if(ok: bool) -> Verdict {
    if ok { Verdict::Pass } else { Verdict::Fail }
}

/// Counts of each verdict.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub pass: usize,
    pub warn: usize,
    pub fail: usize,
}

impl Summary {
    pub fn of(checks: &[Check]) -> Summary {
        let count = |v| checks.iter().filter(|c| c.verdict == v).count();
        Summary {
            pass: count(Verdict::Pass),
            warn: count(Verdict::Warn),
            fail: count(Verdict::Fail),
        }
    }

    /// 0 all pass, 1 warnings only, 2 any failure.
    pub fn exit_code(&self) -> u8 {
        if self.fail > 0 {
            2
        } else if self.warn > 0 {
            1
        } else {
            0
        }
    }
}

/// Sorts failures first, then warnings, keeping check order within each.
pub fn failures_first(checks: &mut [Check]) {
    checks.sort_by_key(|c| c.verdict);
}

/// Judges the host. `controller_os` is pbx01's own os-release.
pub fn judge(
    inv: &HostInventory,
    params: &PreflightParams,
    controller_os: &OsRelease,
) -> Vec<Check> {
    let mut out = Vec::new();
    os_checks(inv, controller_os, &mut out);
    hardware_checks(inv, params, &mut out);
    address_checks(inv, params, &mut out);
    host_state_checks(inv, &mut out);
    conflict_checks(inv, params.redeploy, &mut out);
    platform_checks(inv, &mut out);
    out
}

#[cfg(test)]
pub(crate) mod tests;

/// Runs preflight on a connected agent: the agent measures, the controller
/// judges against pbx01's own OS. Failures first.
pub async fn assess(
    agent: &impl crate::deployment::api::AgentApi,
    params: &PreflightParams,
) -> Result<Vec<Check>, crate::agent_client::AgentError> {
    let inv = agent
        .inventory(params.paths(), SERVICE_UID, SERVICE_GID)
        .await?;
    let pbx = imfleet_proto::model::os_release::read_os_release();
    let mut checks = judge(&inv, params, &pbx);
    failures_first(&mut checks);
    Ok(checks)
}
