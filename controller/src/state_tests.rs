//! Tests of `state.rs`.

use super::*;
use std::os::unix::fs::PermissionsExt;

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn init_creates_private_files_and_is_idempotent() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("state");
    let (_, first) = ControllerState::open_or_init(&dir).unwrap();
    assert_eq!(first.created.len(), 5, "{:?}", first.created);
    assert_eq!(mode(&dir), 0o700);
    for secret in [files::CA_KEY, files::CONTROLLER_KEY, files::DATABASE] {
        assert_eq!(mode(&dir.join(secret)), 0o600, "{secret}");
    }
    let identity_files = || -> Vec<Vec<u8>> {
        [
            files::CA_CERT,
            files::CA_KEY,
            files::CONTROLLER_CERT,
            files::CONTROLLER_KEY,
        ]
        .iter()
        .map(|f| std::fs::read(dir.join(f)).unwrap())
        .collect()
    };
    let before = identity_files();

    let (_, second) = ControllerState::open_or_init(&dir).unwrap();
    assert!(second.created.is_empty(), "{:?}", second.created);
    assert_eq!(second.ca_fingerprint, first.ca_fingerprint);
    assert_eq!(before, identity_files());
}

#[test]
fn a_lost_ca_key_is_reported_not_silently_replaced() {
    let tmp = tempfile::tempdir().unwrap();
    ControllerState::open_or_init(tmp.path()).unwrap();
    std::fs::remove_file(tmp.path().join(files::CA_KEY)).unwrap();
    let err = ControllerState::open_or_init(tmp.path()).unwrap_err();
    assert!(matches!(err, StateError::MissingCaKey(_)), "{err}");
    assert!(!tmp.path().join(files::CA_KEY).exists());
}

#[test]
fn the_ca_key_is_read_only_to_sign() {
    let dir = tempfile::tempdir().unwrap();
    let (state, _) = ControllerState::open_or_init(dir.path()).unwrap();
    let key = dir.path().join(files::CA_KEY);
    let aside = dir.path().join("ca.key.aside");
    std::fs::rename(&key, &aside).unwrap();
    // An opened state works without the key until something is signed.
    assert!(state.ca.cert_pem().contains("BEGIN CERTIFICATE"));
    let err = state.ca.load().unwrap_err().to_string();
    assert!(err.contains("ca.key"), "{err}");
    std::fs::rename(&aside, &key).unwrap();
    let ca = state.ca.load().unwrap();
    assert_eq!(ca.cert_pem(), state.ca.cert_pem());
}

#[test]
fn a_lost_ca_certificate_never_replaces_the_ca_key() {
    let tmp = tempfile::tempdir().unwrap();
    ControllerState::open_or_init(tmp.path()).unwrap();
    let key = std::fs::read(tmp.path().join(files::CA_KEY)).unwrap();
    std::fs::remove_file(tmp.path().join(files::CA_CERT)).unwrap();
    let err = ControllerState::open_or_init(tmp.path()).unwrap_err();
    assert!(matches!(err, StateError::MissingCaCert(_)), "{err}");
    assert_eq!(std::fs::read(tmp.path().join(files::CA_KEY)).unwrap(), key);
    assert!(!tmp.path().join(files::CA_CERT).exists());
}

#[test]
fn an_interrupted_ca_creation_is_finished() {
    let tmp = tempfile::tempdir().unwrap();
    let (first, _) = ControllerState::open_or_init(tmp.path()).unwrap();
    drop(first);
    // As if the process died right after writing ca.pem.
    std::fs::rename(
        tmp.path().join(files::CA_KEY),
        tmp.path().join(files::CA_KEY_PENDING),
    )
    .unwrap();
    ControllerState::open_or_init(tmp.path()).unwrap();
    assert!(tmp.path().join(files::CA_KEY).exists());
    assert!(!tmp.path().join(files::CA_KEY_PENDING).exists());
}

#[test]
fn only_init_creates_state() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("mnt/imfleet");
    for dir in [missing.clone(), tmp.path().to_owned()] {
        let err = ControllerState::open(&dir).unwrap_err();
        assert!(matches!(err, StateError::NotInitialised { .. }), "{err}");
        assert!(
            err.to_string().contains("not mounted on this node"),
            "{err}"
        );
    }
    assert!(!missing.exists());
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
    // A directory holding something else is not a fleet either.
    std::fs::write(tmp.path().join("notes.txt"), "x").unwrap();
    assert!(ControllerState::open(tmp.path()).is_err());
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
    // Initialised, it opens.
    let dir = tmp.path().join("state");
    ControllerState::open_or_init(&dir).unwrap();
    ControllerState::open(&dir).unwrap();
}

#[test]
fn a_foreign_non_empty_directory_is_not_taken_over() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    std::fs::create_dir(&home).unwrap();
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(home.join("notes.txt"), "mine").unwrap();
    let err = ControllerState::open_or_init(&home).unwrap_err();
    assert!(matches!(err, StateError::ForeignDirectory(_)), "{err}");
    let mode = std::fs::metadata(&home).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o755);
    assert_eq!(std::fs::read_dir(&home).unwrap().count(), 1);
    // An empty directory is fine, and becomes private.
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    ControllerState::open_or_init(&empty).unwrap();
    let mode = std::fs::metadata(&empty).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
}
