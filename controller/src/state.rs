//! The controller's state directory: CA, the controller's client identity and
//! the state database. Created by `controller init` or implicitly by the first
//! command that needs it; creating it again changes nothing.

use std::fs::File;
use std::path::{Path, PathBuf};

use imfleet_certs::storage::{ensure_private_dir, write_atomically};
use imfleet_certs::{CONTROLLER_LIFETIME, CertificateAuthority, Validity};

use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state directory {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("state directory {path}: {source}")]
    Cert {
        path: String,
        source: imfleet_certs::CertError,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Controllers(#[from] crate::controller_list::ControllerListError),
    #[error("{path}: {detail}")]
    Corrupt { path: String, detail: String },
    #[error(
        "state directory {0} is incomplete: the CA key is missing but certificates issued by it exist; restore it from backup (creating a new CA would orphan every bootstrapped agent)"
    )]
    MissingCaKey(String),
    #[error(
        "state directory {0} is incomplete: the CA key exists but the CA certificate (ca.pem) is missing; restore ca.pem from backup (a new CA would orphan every bootstrapped agent)"
    )]
    MissingCaCert(String),
    #[error(
        "{0} is not empty and is not an imfleet state directory; pass an empty or new directory as --state-dir (nothing was changed)"
    )]
    ForeignDirectory(String),
    #[error(
        "no home directory to keep controller state in; pass --state-dir or set IMFLEET_STATE_DIR"
    )]
    NoDefault,
    #[error(
        "{path} {what}, so there is no imfleet state here. If the state lives on the PBX cluster's failover filesystem, it is not mounted on this node: run the command where it is. For a new fleet, run `controller init` (it creates a new CA, which agents bootstrapped elsewhere do not trust). Nothing was created"
    )]
    NotInitialised { path: String, what: &'static str },
}

/// Makes `dir` a private (0700) state directory: creates it, or takes over
/// an empty one, or re-secures one that already holds imfleet state. Never
/// changes the mode of someone else's non-empty directory.
fn prepare_state_dir(dir: &Path) -> Result<(), StateError> {
    let io = |source| StateError::Io {
        path: dir.display().to_string(),
        source,
    };
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            let ours = [files::CA_CERT, files::CA_KEY, files::DATABASE, files::LOCK]
                .iter()
                .any(|f| dir.join(f).exists());
            if entries.next().is_some() && !ours {
                return Err(StateError::ForeignDirectory(dir.display().to_string()));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    ensure_private_dir(dir).map_err(io)
}

/// Where the controller keeps its state unless told otherwise:
/// `/var/lib/imfleet` for root, `$XDG_DATA_HOME/imfleet` for anyone else.
pub fn default_state_dir() -> Result<PathBuf, StateError> {
    if nix::unistd::geteuid().is_root() {
        return Ok(PathBuf::from("/var/lib/imfleet"));
    }
    dirs::data_dir()
        .map(|d| d.join("imfleet"))
        .ok_or(StateError::NoDefault)
}

/// File names inside the state directory.
pub mod files {
    pub const CA_CERT: &str = "ca.pem";
    pub const CA_KEY: &str = "ca.key";
    /// A new CA key until its certificate is written.
    pub const CA_KEY_PENDING: &str = "ca.key.pending";
    pub const CONTROLLER_CERT: &str = "controller.pem";
    pub const CONTROLLER_KEY: &str = "controller.key";
    pub const DATABASE: &str = "state.db";
    pub const LOCK: &str = ".lock";
    /// Scratch space for SSH control sockets during bootstrap.
    pub const RUN: &str = "run";
}

/// The controller's TLS client identity (with the CA it trusts).
#[derive(Clone)]
pub struct ClientIdentity {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    /// The CA-signed list of accepted controller certificates, sent with
    /// every request (see `controller_list`); none sends nothing.
    pub controllers: Option<String>,
}

impl std::fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientIdentity").finish_non_exhaustive()
    }
}

/// The CA that signs: its certificate, and the file its key is in. The key
/// is read only to issue or sign ([`SigningCa::load`]), so a long-running
/// daemon does not hold it in memory between two renewals.
#[derive(Debug, Clone)]
pub struct SigningCa {
    pub(crate) cert_pem: String,
    pub(crate) key_path: PathBuf,
}

impl SigningCa {
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA with its key, for one issuance; drop it once done.
    pub fn load(&self) -> Result<CertificateAuthority, StateError> {
        let path = self.key_path.display().to_string();
        let key = std::fs::read_to_string(&self.key_path).map_err(|source| StateError::Io {
            path: path.clone(),
            source,
        })?;
        CertificateAuthority::from_pem(&self.cert_pem, &key)
            .map_err(|source| StateError::Cert { path, source })
    }
}

/// What `init` found or created.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct InitReport {
    pub state_dir: String,
    pub created: Vec<String>,
    pub ca_fingerprint: String,
}

/// An opened state directory.
#[derive(Debug)]
pub struct ControllerState {
    dir: PathBuf,
    pub ca: SigningCa,
    pub identity: ClientIdentity,
    pub store: Store,
}

impl ControllerState {
    /// Opens an initialised state directory (every command but `init`):
    /// never creates a CA or a database, so a state directory that is not
    /// there (an unmounted failover filesystem) is an error, not a new
    /// fleet. The controller's own certificate is renewed when due.
    pub fn open(dir: &Path) -> Result<ControllerState, StateError> {
        let missing = |what| StateError::NotInitialised {
            path: dir.display().to_string(),
            what,
        };
        match std::fs::read_dir(dir) {
            Ok(mut entries) => {
                if entries.next().is_none() {
                    return Err(missing("is empty"));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(missing("does not exist"));
            }
            Err(source) => {
                return Err(StateError::Io {
                    path: dir.display().to_string(),
                    source,
                });
            }
        }
        let has = |name: &str| dir.join(name).exists();
        if !has(files::CA_CERT) && !has(files::CA_KEY) {
            return Err(missing("holds no fleet CA (ca.pem, ca.key)"));
        }
        if !has(files::DATABASE) {
            return Err(missing("holds no state database (state.db)"));
        }
        Ok(ControllerState::open_or_init(dir)?.0)
    }

    /// Opens the state directory, creating whatever is missing (`init`).
    pub fn open_or_init(dir: &Path) -> Result<(ControllerState, InitReport), StateError> {
        let io = |path: &Path| {
            let path = path.display().to_string();
            move |source| StateError::Io { path, source }
        };
        prepare_state_dir(dir)?;
        // One controller process at a time creates files; others wait here.
        let (ca, identity, store, created) = with_lock(dir, || {
            let mut created = Vec::new();
            // A CA rotation cut while the new CA was moved into place is finished.
            use crate::ca_rotation::{Phase, Rotation};
            let rotation = match Rotation::load(dir)? {
                Some(r) if r.phase == Phase::Finishing => {
                    Rotation::finish(dir)?;
                    None
                }
                other => other,
            };
            let ca = load_or_create_ca(dir, &mut created)?;
            // During a rotation both CAs are trusted; the new one signs from the
            // re-issue phase on.
            let (signing, key_file, trusted) = match &rotation {
                None => (ca, files::CA_KEY, None),
                Some(r) => {
                    let next = Rotation::next_ca(dir)?;
                    let trusted = format!("{}{}", ca.cert_pem(), next.cert_pem());
                    if r.phase == Phase::Trust {
                        (ca, files::CA_KEY, Some(trusted))
                    } else {
                        (next, crate::ca_rotation::NEXT_KEY, Some(trusted))
                    }
                }
            };
            let ca = signing;
            let mut identity = load_or_issue_identity(dir, &ca, &mut created)?;
            if let Some(trusted) = trusted {
                identity.ca_pem = trusted;
            }
            identity.controllers = Some(controller_list(dir, &ca, &identity)?);
            let db_path = dir.join(files::DATABASE);
            if !db_path.exists() {
                created.push(files::DATABASE.to_owned());
            }
            let store = Store::open(&db_path)?;
            ensure_private_dir(&run_dir(dir)).map_err(io(dir))?;
            let ca = SigningCa {
                cert_pem: ca.cert_pem().to_owned(),
                key_path: dir.join(key_file),
            };
            Ok((ca, identity, store, created))
        })?;

        let report = InitReport {
            state_dir: dir.display().to_string(),
            created,
            ca_fingerprint: imfleet_certs::inspect_pem(ca.cert_pem())
                .map(|i| i.sha256_fingerprint)
                .unwrap_or_default(),
        };
        Ok((
            ControllerState {
                dir: dir.to_owned(),
                ca,
                identity,
                store,
            },
            report,
        ))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn run_dir(&self) -> PathBuf {
        run_dir(&self.dir)
    }
}

/// The private `run/` directory of a state directory (SSH control sockets
/// during bootstrap, the daemon's socket).
pub fn run_dir(state_dir: &Path) -> PathBuf {
    state_dir.join(files::RUN)
}

fn read(dir: &Path, name: &str) -> Result<Option<String>, StateError> {
    let path = dir.join(name);
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StateError::Io {
            path: path.display().to_string(),
            source,
        }),
    }
}

fn write(dir: &Path, name: &str, text: &str, mode: u32) -> Result<(), StateError> {
    let path = dir.join(name);
    write_atomically(&path, text.as_bytes(), mode).map_err(|source| StateError::Io {
        path: path.display().to_string(),
        source,
    })
}

fn cert_err(dir: &Path, name: &str) -> impl FnOnce(imfleet_certs::CertError) -> StateError {
    let path = dir.join(name).display().to_string();
    move |source| StateError::Cert { path, source }
}

fn load_or_create_ca(
    dir: &Path,
    created: &mut Vec<String>,
) -> Result<CertificateAuthority, StateError> {
    let pending = dir.join(files::CA_KEY_PENDING);
    match (read(dir, files::CA_CERT)?, read(dir, files::CA_KEY)?) {
        (Some(cert), Some(key)) => {
            CertificateAuthority::from_pem(&cert, &key).map_err(cert_err(dir, files::CA_KEY))
        }
        (Some(cert), None) => {
            // A crash between writing the certificate and moving its key
            // into place: finish, if the pending key really is its key.
            let ca = read(dir, files::CA_KEY_PENDING)?
                .and_then(|key| CertificateAuthority::from_pem(&cert, &key).ok())
                .ok_or_else(|| StateError::MissingCaKey(dir.display().to_string()))?;
            std::fs::rename(&pending, dir.join(files::CA_KEY)).map_err(|source| {
                StateError::Io {
                    path: pending.display().to_string(),
                    source,
                }
            })?;
            Ok(ca)
        }
        (None, Some(_)) => Err(StateError::MissingCaCert(dir.display().to_string())),
        (None, None) => {
            let host = hostname_or_default();
            let ca = CertificateAuthority::generate(&format!("imfleet CA ({host})"))
                .map_err(cert_err(dir, files::CA_CERT))?;
            // The key becomes `ca.key` only once its certificate is written:
            // an existing `ca.key` always has its certificate, and is never
            // overwritten.
            write(dir, files::CA_KEY_PENDING, ca.key_pem(), 0o600)?;
            write(dir, files::CA_CERT, ca.cert_pem(), 0o644)?;
            std::fs::rename(&pending, dir.join(files::CA_KEY)).map_err(|source| {
                StateError::Io {
                    path: pending.display().to_string(),
                    source,
                }
            })?;
            // A new CA invalidates any identity issued by a previous one.
            let _ = std::fs::remove_file(dir.join(files::CONTROLLER_CERT));
            created.push(files::CA_CERT.to_owned());
            created.push(files::CA_KEY.to_owned());
            Ok(ca)
        }
    }
}

fn load_or_issue_identity(
    dir: &Path,
    ca: &CertificateAuthority,
    created: &mut Vec<String>,
) -> Result<ClientIdentity, StateError> {
    let existing = match (
        read(dir, files::CONTROLLER_CERT)?,
        read(dir, files::CONTROLLER_KEY)?,
    ) {
        (Some(cert), Some(key)) => {
            // Issued by the CA that signs now (a CA rotation moves it on),
            // matching its key, and not due for renewal.
            let usable = imfleet_certs::key_matches_certificate(&cert, &key).is_ok()
                && imfleet_certs::verify_client_identity(
                    ca.cert_pem(),
                    &cert,
                    time::OffsetDateTime::now_utc(),
                )
                .is_ok()
                && imfleet_certs::inspect_pem(&cert).is_ok_and(|info| {
                    !imfleet_certs::renewal_due(
                        info.not_before,
                        info.not_after,
                        time::OffsetDateTime::now_utc(),
                    )
                });
            usable.then_some((cert, key))
        }
        _ => None,
    };
    let (cert_pem, key_pem) = match existing {
        Some(pair) => pair,
        None => {
            let issued = ca
                .issue_controller(
                    &format!("controller@{}", hostname_or_default()),
                    Validity::starting_now(CONTROLLER_LIFETIME),
                )
                .map_err(cert_err(dir, files::CONTROLLER_CERT))?;
            write(dir, files::CONTROLLER_KEY, &issued.key_pem, 0o600)?;
            write(dir, files::CONTROLLER_CERT, &issued.cert_pem, 0o644)?;
            created.push(files::CONTROLLER_CERT.to_owned());
            created.push(files::CONTROLLER_KEY.to_owned());
            (issued.cert_pem, issued.key_pem)
        }
    };
    Ok(ClientIdentity {
        ca_pem: ca.cert_pem().to_owned(),
        cert_pem,
        key_pem,
        controllers: None,
    })
}

/// Records the identity in use among the controller certificates and
/// returns the list agents accept, signed.
fn controller_list(
    dir: &Path,
    ca: &CertificateAuthority,
    identity: &ClientIdentity,
) -> Result<String, StateError> {
    use crate::controller_list::ControllerCertificates;
    let info = imfleet_certs::inspect_pem(&identity.cert_pem)
        .map_err(cert_err(dir, files::CONTROLLER_CERT))?;
    let now = crate::now_unix();
    let mut certificates = ControllerCertificates::load(dir)?;
    if certificates.observe(&info, now) {
        certificates.save(dir)?;
    }
    Ok(certificates.signed(ca, now)?)
}

/// Runs `f` holding the state directory's lock (what `open_or_init` takes).
pub(crate) fn with_lock<T>(
    dir: &Path,
    f: impl FnOnce() -> Result<T, StateError>,
) -> Result<T, StateError> {
    let lock_path = dir.join(files::LOCK);
    let lock = File::create(&lock_path).map_err(|source| StateError::Io {
        path: lock_path.display().to_string(),
        source,
    })?;
    lock.lock().map_err(|source| StateError::Io {
        path: lock_path.display().to_string(),
        source,
    })?;
    f()
}

/// The controller's own identity is issued anew at the next open.
pub(crate) fn drop_identity(dir: &Path) {
    for name in [files::CONTROLLER_CERT, files::CONTROLLER_KEY] {
        let _ = std::fs::remove_file(dir.join(name));
    }
}

/// Revokes the controller certificate `serial`: agents refuse it from
/// their next contact with this controller. Revoking the certificate in
/// use issues a new one first. Returns the state opened afterwards and
/// whether anything changed.
pub fn revoke_controller(dir: &Path, serial: &str) -> Result<(ControllerState, bool), StateError> {
    use crate::controller_list::ControllerCertificates;
    let state = ControllerState::open(dir)?;
    let current = imfleet_certs::inspect_pem(&state.identity.cert_pem)
        .map_err(cert_err(dir, files::CONTROLLER_CERT))?;
    drop(state);
    let changed = with_lock(dir, || {
        let mut certificates = ControllerCertificates::load(dir)?;
        let changed = certificates.revoke(serial, crate::now_unix())?;
        certificates.save(dir)?;
        if current.serial_hex.eq_ignore_ascii_case(serial) {
            drop_identity(dir);
        }
        Ok(changed)
    })?;
    Ok((ControllerState::open(dir)?, changed))
}

fn hostname_or_default() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "controller".to_owned())
}

#[cfg(test)]
#[path = "state_tests.rs"]
mod tests;
