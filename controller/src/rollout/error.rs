//! Why a rollout command stopped, and whether trying again can help.

use std::path::PathBuf;

use crate::deployment::DeployError;
use crate::fleet::FleetError;
use crate::pbx::PbxError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error("{0}")]
    Usage(String),
    #[error("image archive {}: {source}", path.display())]
    ImageFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{0} has no healthy IM deployment recorded to upgrade; deploy it first (`controller deploy {0} ...`)"
    )]
    NotDeployed(String),
    #[error("{0}: {1}")]
    Deploy(String, Box<DeployError>),
    #[error(
        "{host}: the new images need about {needed_mb} MB in {root} (where the Docker Engine keeps images), {available_mb} MB are free; free some space there first (nothing was changed)"
    )]
    NoSpace {
        host: String,
        root: String,
        needed_mb: u64,
        available_mb: u64,
    },
    #[error(transparent)]
    Fleet(#[from] FleetError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Pbx(#[from] PbxError),
    #[error(
        "rollout {id} is being driven by another controller process right now ({holder}); wait for it, or run `controller upgrade --abort` to have it roll back"
    )]
    Busy { id: i64, holder: String },
    #[error(
        "another `controller upgrade` is checking its hosts right now; wait for it to start its rollout (see `controller rollouts`)"
    )]
    Starting,
    #[error("there is no active rollout to {0}; see `controller rollouts`")]
    NoActive(&'static str),
    #[error("the IM token: {0}")]
    Token(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Credentials(#[from] super::credentials::CredentialsError),
    #[error(
        "rollout {id} stopped: {cause}. Nothing more was started; fix this, then `controller upgrade --resume` (or `--abort`)"
    )]
    Stopped { id: i64, cause: Box<RolloutError> },
}

impl RolloutError {
    /// Whether trying again later cannot help until the operator acts (a
    /// wrong token or password, an image missing, a bad request): the
    /// daemon then stops taking the rollout up by itself.
    pub fn needs_operator(&self) -> bool {
        match self {
            RolloutError::Stopped { cause, .. } => cause.needs_operator(),
            RolloutError::Usage(_)
            | RolloutError::ImageFile { .. }
            | RolloutError::NotDeployed(_)
            | RolloutError::NoSpace { .. }
            | RolloutError::Token(_)
            | RolloutError::Credentials(_) => true,
            RolloutError::Pbx(e) => matches!(
                e,
                PbxError::LoginRefused { .. }
                    | PbxError::Unauthorized { .. }
                    | PbxError::Forbidden { .. }
                    | PbxError::Redirected { .. }
                    | PbxError::Config(_)
                    | PbxError::Blacklisted { .. }
            ),
            _ => false,
        }
    }
}
