//! `agent.toml`: what bootstrap decided for this host.

use std::net::SocketAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::policy::Roots;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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

impl AgentConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.display().to_string(),
            source,
        })
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
    fn round_trips_and_refuses_unknown_keys() {
        let cfg = AgentConfig {
            listen: "127.0.0.2:7443".parse().unwrap(),
            data_path: Some("/var/lib/portsip".into()),
            storage_dir: Some("/data/im".into()),
        };
        let back: AgentConfig = toml::from_str(&cfg.to_toml()).unwrap();
        assert_eq!(back, cfg);
        assert!(
            toml::from_str::<AgentConfig>("listen = \"0.0.0.0:1\"\nlisten_typo = 1\n").is_err()
        );
        let old: AgentConfig = toml::from_str("listen = \"0.0.0.0:1\"\n").unwrap();
        assert_eq!(old.roots(Path::new("/opt/imfleet")), Ok(None));
        let bad = AgentConfig {
            data_path: Some("/etc".into()),
            ..cfg
        };
        assert!(bad.roots(Path::new("/opt/imfleet")).is_err());
    }
}
