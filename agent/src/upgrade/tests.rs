use super::*;

#[test]
fn only_an_executable_for_this_machine_passes_the_elf_check() {
    let me = std::env::current_exe().unwrap();
    check_elf(&me).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("agent");
    std::fs::write(&script, "#!/bin/sh\necho 0.2.0\n").unwrap();
    assert!(matches!(
        check_elf(&script),
        Err(UpgradeError::NotAnAgent(_))
    ));
    // Another machine's ELF (aarch64 on x86_64, or the reverse).
    let mut other = std::fs::read(&me).unwrap();
    let foreign: u16 = if std::env::consts::ARCH == "x86_64" {
        183
    } else {
        62
    };
    other[18..20].copy_from_slice(&foreign.to_le_bytes());
    std::fs::write(&script, other).unwrap();
    let err = check_elf(&script).unwrap_err().to_string();
    assert!(err.contains("ELF machine"), "{err}");
}

#[test]
fn the_previous_binary_is_kept_and_put_back() {
    let dir = tempfile::tempdir().unwrap();
    let layout = Layout::new(dir.path());
    std::fs::create_dir_all(layout.bin_dir()).unwrap();
    std::fs::write(layout.binary(), "old").unwrap();
    link_over(&layout.binary(), &layout.bin_dir().join(PREVIOUS)).unwrap();
    std::fs::write(layout.bin_dir().join("new"), "new").unwrap();
    std::fs::rename(layout.bin_dir().join("new"), layout.binary()).unwrap();
    restore_previous(&layout).unwrap();
    let read = |name: &str| std::fs::read_to_string(layout.bin_dir().join(name)).unwrap();
    assert_eq!(read("agent"), "old");
    assert_eq!(read(PREVIOUS), "old");
    assert_eq!(read(FAILED), "new");
}

#[test]
fn notes_move_through_their_states_and_a_newer_note_still_reads() {
    let dir = tempfile::tempdir().unwrap();
    let layout = Layout::new(dir.path());
    assert!(note::read(&layout).is_none());
    let pending = Note::pending("0.1.0", crate::version(), 11);
    note::write(&layout, &pending).unwrap();
    assert!(note::read(&layout).unwrap().state.is_under_way());
    // The new binary serving says so; the report follows.
    note::note_serving(&layout);
    assert_eq!(note::read(&layout).unwrap().state, State::Started);
    assert_eq!(note::last_upgrade(&layout).unwrap().state, "started");
    // A field a later build adds is ignored, a missing one defaulted.
    let newer =
        r#"{"state":"rolled-back","from_version":"0.1.0","to_version":"0.3.0","reason_code":7}"#;
    std::fs::write(layout.state_dir().join("agent-upgrade.json"), newer).unwrap();
    let read = note::read(&layout).unwrap();
    assert_eq!((read.state, read.to_revision), (State::RolledBack, 0));
    assert!(!read.state.is_under_way());
}

#[tokio::test]
async fn a_restart_request_reaches_whoever_waits_for_it() {
    let restart = RestartRequest::default();
    let waiting = {
        let restart = restart.clone();
        tokio::spawn(async move { restart.wanted().await })
    };
    assert!(!restart.is_wanted());
    restart.request();
    waiting.await.unwrap();
    // Asked before anyone waits: still seen.
    let late = RestartRequest::default();
    late.request();
    late.wanted().await;
}
