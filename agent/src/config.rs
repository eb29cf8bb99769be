//! `agent.toml`: what bootstrap decided for this host.

use std::net::SocketAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Address and port of the mTLS gRPC listener.
    pub listen: SocketAddr,
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
        };
        let back: AgentConfig = toml::from_str(&cfg.to_toml()).unwrap();
        assert_eq!(back, cfg);
        assert!(
            toml::from_str::<AgentConfig>("listen = \"0.0.0.0:1\"\nlisten_typo = 1\n").is_err()
        );
    }
}
