//! The agent's files on its host. Everything lives under one root
//! (default `/opt/imfleet`), so an install is easy to find and remove.

use std::path::{Path, PathBuf};

/// Default installation root on an IM host.
pub const DEFAULT_ROOT: &str = "/opt/imfleet";
/// Name of the systemd unit when systemd supervises the agent.
pub const SYSTEMD_UNIT: &str = "imfleet-agent.service";
/// Where the systemd unit file is written.
pub const SYSTEMD_UNIT_PATH: &str = "/etc/systemd/system/imfleet-agent.service";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    root: PathBuf,
}

impl Default for Layout {
    fn default() -> Self {
        Layout::new(DEFAULT_ROOT)
    }
}

impl Layout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Layout { root: root.into() }
    }
    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn bin_dir(&self) -> PathBuf {
        self.root.join("bin")
    }
    pub fn binary(&self) -> PathBuf {
        self.bin_dir().join("agent")
    }
    pub fn etc_dir(&self) -> PathBuf {
        self.root.join("etc")
    }
    pub fn config(&self) -> PathBuf {
        self.etc_dir().join("agent.toml")
    }
    /// Private key of the serving identity (0600).
    pub fn key(&self) -> PathBuf {
        self.etc_dir().join("agent.key")
    }
    /// Key generated for a CSR that has not been answered yet (0600). It only
    /// replaces `agent.key` when a certificate for it is installed, so an
    /// interrupted enrolment never breaks a working identity.
    pub fn pending_key(&self) -> PathBuf {
        self.etc_dir().join("agent.key.pending")
    }
    /// Key made for a renewal over the channel (0600); it becomes
    /// `agent.key` once its certificate is installed.
    pub fn renewal_key(&self) -> PathBuf {
        self.etc_dir().join("agent.key.next")
    }
    /// The identity a renewal replaced, kept for the operator (key 0600).
    pub fn previous_certificate(&self) -> PathBuf {
        self.etc_dir().join("agent.pem.previous")
    }
    pub fn previous_key(&self) -> PathBuf {
        self.etc_dir().join("agent.key.previous")
    }
    /// The newest CA-signed list of accepted controller certificates.
    pub fn controllers_list(&self) -> PathBuf {
        self.etc_dir().join("controllers.list")
    }
    pub fn certificate(&self) -> PathBuf {
        self.etc_dir().join("agent.pem")
    }
    pub fn ca_certificate(&self) -> PathBuf {
        self.etc_dir().join("ca.pem")
    }
    pub fn run_dir(&self) -> PathBuf {
        self.root.join("run")
    }
    pub fn supervisor_pid(&self) -> PathBuf {
        self.run_dir().join("supervisor.pid")
    }
    /// Image archives being received (root only, emptied at start).
    pub fn spool_dir(&self) -> PathBuf {
        self.root.join("spool")
    }
    /// What the agent remembers of each deployment (root only).
    pub fn state_dir(&self) -> PathBuf {
        self.root.join("state")
    }
    /// One JSON line per mutating request (root only, 0600).
    pub fn audit_log(&self) -> PathBuf {
        self.log_dir().join("audit.log")
    }
    /// What the agent is, for an operator who finds it on a host (the
    /// unit's `Documentation=`).
    pub fn readme(&self) -> PathBuf {
        self.root.join("README")
    }

    pub fn log_dir(&self) -> PathBuf {
        self.root.join("log")
    }
    pub fn log_file(&self) -> PathBuf {
        self.log_dir().join("agent.log")
    }
}
