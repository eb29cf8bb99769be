//! `controller serve` as a resource of the PBX cluster's own Pacemaker:
//! the OCF agent (`ocf-agent.sh`, written to every node), the resource and
//! constraints it needs (`plan`: pure, from the CIB as observed by `cib`),
//! and the `pcs` commands that make them so (`pacemaker`).
//!
//! What keeps the PBX safe from the daemon: the daemon is colocated with
//! the resources it needs (`with`: the filesystem holding its state, the
//! virtual IP of its API), never the other way round, with `influence=false`
//! (and `critical=false`, its default), so its failures never move them while
//! they run. It starts after them and stops before them by two one-way
//! orders (the stop one optional), so a stop of the daemon that blocks never
//! holds them back; its stop does not fail (the agent ends with SIGKILL) and
//! `on-fail=block` keeps a failed one from fencing the node;
//! `migration-threshold` and `failure-timeout` make a daemon that keeps
//! failing stay stopped for a while instead of looping.

pub mod cib;
pub mod pacemaker;
pub mod plan;

use serde::Serialize;

/// The OCF resource agent, as `--apply` installs it.
pub const AGENT_SCRIPT: &str = include_str!("ocf-agent.sh");
/// Where Pacemaker looks for `ocf:imfleet:controller`.
pub const AGENT_PATH: &str = "/usr/lib/ocf/resource.d/imfleet/controller";
/// PortSIP's filesystem resource on DRBD, which holds `/var/lib/portsip`.
pub const PORTSIP_FS_RESOURCE: &str = "datapath_fs";

/// What the cluster should run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HaConfig {
    /// The daemon's resource id.
    pub resource: String,
    /// Resources it runs with and after: the state's filesystem first.
    pub with: Vec<String>,
    pub binary: String,
    pub state_dir: String,
    pub metrics_listen: String,
    pub api_listen: Option<String>,
    /// Where the daemon's output goes.
    pub log_file: String,
}

impl HaConfig {
    /// The agent's parameters, in a fixed order.
    pub fn params(&self) -> Vec<(&'static str, String)> {
        let mut params = vec![
            ("binary", self.binary.clone()),
            ("state_dir", self.state_dir.clone()),
            ("metrics_listen", self.metrics_listen.clone()),
            ("logfile", self.log_file.clone()),
        ];
        if let Some(api) = &self.api_listen {
            params.push(("api_listen", api.clone()));
        }
        params
    }

    /// The colocation and order constraint ids for `with` resource `r`.
    pub fn colocation_id(&self, r: &str) -> String {
        format!("{}-with-{r}", self.resource)
    }

    pub fn order_id(&self, r: &str) -> String {
        format!("{}-after-{r}", self.resource)
    }

    pub fn stop_order_id(&self, r: &str) -> String {
        format!("{}-stops-before-{r}", self.resource)
    }
}

/// The daemon's meta attributes: why each is there is in the module docs.
pub const META: &[(&str, &str)] = &[
    ("critical", "false"),
    ("migration-threshold", "3"),
    ("failure-timeout", "10min"),
];

#[derive(Debug, thiserror::Error)]
pub enum HaError {
    #[error(
        "the cluster has no resource `{0}`: name the filesystem resource that holds the state (and the virtual IP's) with --with (see `pcs resource status`); nothing was changed"
    )]
    MissingResource(String),
    #[error(
        "resource id `{0}` is not allowed: letters, digits, '-', '_' and '.', starting with a letter"
    )]
    BadId(String),
    #[error(
        "`{value}` cannot be a parameter of the resource ({what}): no quotes, spaces or control characters"
    )]
    BadValue { what: &'static str, value: String },
    #[error(
        "the state directory {state_dir} is not on {resource} (mounted on {mount}): the daemon's state must be on the replicated filesystem it runs with; give --state-dir under {mount}"
    )]
    StateNotReplicated {
        state_dir: String,
        resource: String,
        mount: String,
    },
    #[error("the cluster configuration could not be read: {0}")]
    Cib(String),
    #[error("`{command}` failed: {detail}")]
    Command { command: String, detail: String },
    #[error("cannot install the resource agent at {path}: {source}")]
    Install {
        path: String,
        source: std::io::Error,
    },
}

/// Checks what goes into the CIB and onto `pcs` command lines.
pub fn check(config: &HaConfig) -> Result<(), HaError> {
    let id_ok = |id: &str| {
        id.starts_with(|c: char| c.is_ascii_alphabetic())
            && id.len() <= 64
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    for id in std::iter::once(&config.resource).chain(&config.with) {
        if !id_ok(id) {
            return Err(HaError::BadId(crate::text::printable(id, 80).into_owned()));
        }
    }
    for (what, value) in config.params() {
        let plain = !value.is_empty()
            && value.len() <= 4096
            && !value
                .chars()
                .any(|c| c.is_control() || c.is_whitespace() || "'\"\\`$".contains(c));
        if !plain {
            return Err(HaError::BadValue {
                what,
                value: crate::text::printable(&value, 200).into_owned(),
            });
        }
    }
    Ok(())
}
