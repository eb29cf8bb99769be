//! `agent.toml`: what bootstrap decided for this host.

use std::net::SocketAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::policy::Roots;

/// Unknown keys are ignored (and logged), not refused: a newer agent may add
/// settings, and the previous binary must still start after a rollback.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentConfig {
    /// Address and port of the mTLS gRPC listener.
    pub listen: SocketAddr,
    /// The IM data path: every directory, secret and bind mount a deployment
    /// asks for lies under it or under `storage_dir`. Unset in configs
    /// written before roots existed; such an agent refuses to deploy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_path: Option<String>,
    /// The operator's `-f` storage directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_dir: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not a valid agent config: {source}")]
    Parse {
        path: String,
        source: toml::de::Error,
    },
    #[error("{path}: {reason}")]
    Roots { path: String, reason: String },
}

/// The keys this build reads.
const KNOWN_KEYS: &[&str] = &["listen", "data_path", "storage_dir"];

impl AgentConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let parse = |source| ConfigError::Parse {
            path: path.display().to_string(),
            source,
        };
        let table: toml::Table = toml::from_str(&text).map_err(parse)?;
        let unknown: Vec<&str> = table
            .keys()
            .map(String::as_str)
            .filter(|k| !KNOWN_KEYS.contains(k))
            .collect();
        if !unknown.is_empty() {
            tracing::warn!(
                path = %path.display(),
                "settings this agent does not know are ignored (written by a newer agent?): {}",
                unknown.join(", ")
            );
        }
        toml::from_str(&text).map_err(parse)
    }

    /// The deployment roots, checked against the agent's own directory;
    /// `None` when bootstrap fixed none (an older config).
    pub fn roots(&self, agent_root: &Path) -> Result<Option<Roots>, String> {
        self.data_path
            .as_deref()
            .map(|data| Roots::new(data, self.storage_dir.as_deref(), agent_root))
            .transpose()
    }

    /// [`Self::roots`], and on this host no root is reached through a
    /// symlink (what exists of it).
    pub fn roots_on_host(&self, agent_root: &Path) -> Result<Option<Roots>, String> {
        let roots = self.roots(agent_root)?;
        for root in roots.iter().flat_map(Roots::all) {
            for prefix in root.ancestors() {
                if let Ok(meta) = std::fs::symlink_metadata(prefix)
                    && meta.file_type().is_symlink()
                {
                    let real = std::fs::canonicalize(prefix)
                        .map(|p| p.display().to_string())
                        .unwrap_or_else(|_| "a dangling link".into());
                    return Err(format!(
                        "{}: {} is a symbolic link (to {real}); give the real path",
                        root.display(),
                        prefix.display()
                    ));
                }
            }
        }
        Ok(roots)
    }

    pub fn to_toml(&self) -> String {
        format!(
            "# Written by `controller bootstrap`; re-run bootstrap to change it.\n{}",
            toml::to_string(self).unwrap_or_default()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_a_newer_agents_keys_do_not_stop_an_older_one() {
        let cfg = AgentConfig {
            listen: "127.0.0.2:7443".parse().unwrap(),
            data_path: Some("/var/lib/portsip".into()),
            storage_dir: Some("/data/im".into()),
        };
        let back: AgentConfig = toml::from_str(&cfg.to_toml()).unwrap();
        assert_eq!(back, cfg);
        // A rollback's previous binary reads what a newer one wrote.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, format!("{}renew_at = 0.66\n", cfg.to_toml())).unwrap();
        assert_eq!(AgentConfig::load(&path).unwrap(), cfg);
        // What it does know stays checked.
        std::fs::write(&path, "listen = \"not an address\"\n").unwrap();
        assert!(AgentConfig::load(&path).is_err());
        let old: AgentConfig = toml::from_str("listen = \"0.0.0.0:1\"\n").unwrap();
        assert_eq!(old.roots(Path::new("/opt/imfleet")), Ok(None));
        let bad = AgentConfig {
            data_path: Some("/etc".into()),
            ..cfg
        };
        assert!(bad.roots(Path::new("/opt/imfleet")).is_err());
    }
}
