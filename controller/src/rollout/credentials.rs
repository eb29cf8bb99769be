//! What an active rollout needs to go on that the database never holds:
//! the IM token it installs and the PBX login. Kept for the rollout's
//! lifetime in `rollout.credentials` (0600, beside `ca.key` in the state
//! directory, so on the failover filesystem with it), so whichever process
//! drives the rollout next (`controller serve` after a crash, a restart or
//! a failover) can go on without the operator. Dropped when it ends.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::deployment::{ImToken, TokenSource};
use crate::pbx::{PbxOptions, PbxTrust, Secret};

/// In the state directory.
pub const FILE: &str = "rollout.credentials";

/// The token and PBX login a rollout was given. `Debug` shows neither.
#[derive(Clone, Default)]
pub struct Credentials {
    pub token: Option<ImToken>,
    pub pbx: Option<PbxOptions>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("token", &self.token.is_some())
            .field("pbx", &self.pbx.as_ref().map(|p| &p.base_url))
            .finish()
    }
}

impl Credentials {
    /// Where the token comes from when going on: given, or read back from
    /// the PBX (`later_token` decides whether a new one is due).
    pub fn token_source(&self) -> Option<TokenSource> {
        match (&self.token, &self.pbx) {
            (Some(token), _) => Some(TokenSource::Given(token.clone())),
            (None, Some(_)) => Some(TokenSource::FromPbx),
            (None, None) => None,
        }
    }
}

/// The on-disk and on-socket form.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stored {
    /// The rollout these belong to (none: not bound yet, as submitted).
    #[serde(default)]
    pub rollout: Option<i64>,
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    pbx: Option<StoredPbx>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredPbx {
    base_url: String,
    user: String,
    password: String,
    /// `system`, `insecure`, `ca-pem`, `sha256`: one of them.
    trust: StoredTrust,
    max_retries: u32,
    first_backoff_ms: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
enum StoredTrust {
    System,
    Insecure,
    CaPem(String),
    Sha256(String),
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "{path} cannot be read ({detail}); give the token and PBX login again with `controller upgrade --resume`"
    )]
    Unreadable { path: String, detail: String },
}

impl Stored {
    pub fn of(rollout: Option<i64>, credentials: &Credentials) -> Stored {
        Stored {
            rollout,
            token: credentials.token.as_ref().map(|t| t.expose().to_owned()),
            pbx: credentials.pbx.as_ref().map(|p| StoredPbx {
                base_url: p.base_url.clone(),
                user: p.user.clone(),
                password: p.password.expose().to_owned(),
                trust: match &p.trust {
                    PbxTrust::System => StoredTrust::System,
                    PbxTrust::Insecure => StoredTrust::Insecure,
                    PbxTrust::CaPem(pem) => StoredTrust::CaPem(pem.clone()),
                    PbxTrust::Fingerprint(fp) => StoredTrust::Sha256(hex::encode(fp)),
                },
                max_retries: p.max_retries,
                first_backoff_ms: p.first_backoff.as_millis() as u64,
            }),
        }
    }

    /// The credentials, checked as the operator's would be.
    pub fn credentials(self) -> Result<Credentials, String> {
        let token = self
            .token
            .map(|t| ImToken::parse(&t).map_err(|e| e.to_string()))
            .transpose()?;
        let pbx = match self.pbx {
            None => None,
            Some(p) => Some(PbxOptions {
                base_url: p.base_url,
                user: p.user,
                password: Secret::new(p.password),
                trust: match p.trust {
                    StoredTrust::System => PbxTrust::System,
                    StoredTrust::Insecure => PbxTrust::Insecure,
                    StoredTrust::CaPem(pem) => PbxTrust::CaPem(pem),
                    StoredTrust::Sha256(fp) => {
                        PbxTrust::Fingerprint(crate::pbx::parse_fingerprint(&fp)?)
                    }
                },
                max_retries: p.max_retries.min(20),
                first_backoff: Duration::from_millis(p.first_backoff_ms.min(60_000)),
            }),
        };
        Ok(Credentials { token, pbx })
    }
}

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE)
}

/// Keeps `credentials` for `rollout` (replacing what was kept).
pub fn save(
    state_dir: &Path,
    rollout: i64,
    credentials: &Credentials,
) -> Result<(), CredentialsError> {
    let path = path(state_dir);
    let text = serde_json::to_vec(&Stored::of(Some(rollout), credentials)).unwrap_or_default();
    imfleet_certs::storage::write_atomically(&path, &text, 0o600).map_err(|source| {
        CredentialsError::Io {
            path: path.display().to_string(),
            source,
        }
    })
}

/// What was kept for `rollout`; `None` when nothing was, or it was kept
/// for another one.
pub fn load(state_dir: &Path, rollout: i64) -> Result<Option<Credentials>, CredentialsError> {
    let path = path(state_dir);
    let text = match std::fs::read(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(CredentialsError::Io {
                path: path.display().to_string(),
                source,
            });
        }
    };
    let unreadable = |detail: String| CredentialsError::Unreadable {
        path: path.display().to_string(),
        detail,
    };
    let stored: Stored = serde_json::from_slice(&text).map_err(|e| unreadable(e.to_string()))?;
    if stored.rollout != Some(rollout) {
        return Ok(None);
    }
    stored.credentials().map(Some).map_err(unreadable)
}

/// Drops what was kept (the rollout ended).
pub fn forget(state_dir: &Path) {
    let path = path(state_dir);
    match std::fs::remove_file(&path) {
        Ok(()) => {
            let _ = imfleet_certs::storage::sync_dir(state_dir);
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!("cannot remove {}: {e}", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn given() -> Credentials {
        Credentials {
            token: Some(ImToken::parse("tok-123").unwrap()),
            pbx: Some(PbxOptions {
                base_url: "https://10.0.0.2:8887".into(),
                user: "admin".into(),
                password: Secret::new("pw"),
                trust: PbxTrust::Fingerprint([7; 32]),
                max_retries: 5,
                first_backoff: Duration::from_millis(500),
            }),
        }
    }

    #[test]
    fn kept_credentials_come_back_only_for_their_rollout_and_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        save(dir.path(), 4, &given()).unwrap();
        let mode = std::fs::metadata(path(dir.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(load(dir.path(), 5).unwrap().is_none());
        let back = load(dir.path(), 4).unwrap().unwrap();
        assert_eq!(back.token.unwrap().expose(), "tok-123");
        let pbx = back.pbx.unwrap();
        assert_eq!(pbx.password.expose(), "pw");
        assert!(matches!(pbx.trust, PbxTrust::Fingerprint(fp) if fp == [7; 32]));
        assert!(!format!("{:?}", given()).contains("tok-123"));
        forget(dir.path());
        assert!(load(dir.path(), 4).unwrap().is_none());
    }

    #[test]
    fn a_damaged_file_is_an_error_naming_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(path(dir.path()), b"{\"rollout\": 1, \"token\": \"a b\"}").unwrap();
        let err = load(dir.path(), 1).unwrap_err().to_string();
        assert!(err.contains("--resume"), "{err}");
    }
}
