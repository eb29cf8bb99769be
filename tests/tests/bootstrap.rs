//! Bootstrap end to end: the real `controller` binary, a real OpenSSH server,
//! the real agent started on the host, real mTLS and a real SQLite database.

use std::os::unix::fs::{MetadataExt, PermissionsExt};

use imfleet_tests::{Controller, SshUser, TestHost};

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn bootstrap_as_root_then_ping_hosts_and_rerun_safely() {
    let host = TestHost::start();
    let controller = Controller::new();

    let first = controller.bootstrap(&host, SshUser::Root, &["--json"]);
    assert!(
        first.success(),
        "{first:#?}\nagent log:\n{}",
        host.agent_log()
    );
    let report = first.json();
    let address = host.address().to_string();
    assert_eq!(report["host"]["agent_address"], address.as_str());
    assert_eq!(report["supervision"], "supervisor");
    assert!(report["uploaded_bytes"].as_u64().unwrap() > 1_000_000);
    assert!(report["certificate_issued"].is_string());

    // The agent's files on the host: binary installed, key private and made there.
    let opt = host.opt_imfleet();
    let installed = std::fs::read(opt.join("bin/agent")).unwrap();
    assert_eq!(
        installed,
        std::fs::read(imfleet_tests::bin("agent")).unwrap()
    );
    assert_eq!(mode(&opt.join("etc/agent.key")), 0o600);
    assert!(!opt.join("etc/agent.key.pending").exists());
    let cert = std::fs::read_to_string(opt.join("etc/agent.pem")).unwrap();
    let info = imfleet_certs::inspect_pem(&cert).unwrap();
    assert_eq!(info.subject_alt_names, vec![address.clone()]);
    assert_eq!(info.role, Some(imfleet_certs::Role::Agent));
    // The controller never had the agent's key: it is not in its state dir.
    let agent_key = std::fs::read_to_string(opt.join("etc/agent.key")).unwrap();
    for entry in std::fs::read_dir(controller.state.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            let bytes = std::fs::read(&path).unwrap();
            assert!(
                !String::from_utf8_lossy(&bytes).contains(agent_key.trim()),
                "agent key found in {}",
                path.display()
            );
        }
    }
    // The scratch directory is gone. (Other tests' bootstraps, running at
    // the same time, have theirs for a moment: a leftover is one that stays.)
    let scratch_dirs = || -> Vec<std::path::PathBuf> {
        std::fs::read_dir("/tmp")
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("imfleet-bootstrap.")
                    && e.metadata().is_ok_and(|m| m.uid() == 0)
                    && std::fs::read_dir(e.path()).is_ok_and(|mut d| {
                        d.any(|f| {
                            f.is_ok_and(|f| {
                                f.metadata()
                                    .is_ok_and(|m| m.len() == installed.len() as u64)
                            })
                        })
                    })
            })
            .map(|e| e.path())
            .collect()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let mut leftovers = scratch_dirs();
    while !leftovers.is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
        leftovers.retain(|dir| dir.exists());
    }
    assert!(
        leftovers.is_empty(),
        "scratch dirs left behind: {leftovers:?}"
    );

    // ping and hosts, by address and as JSON.
    let ping = controller.run(&["ping", "--json", &address]).json();
    let entry = &ping[0];
    assert_eq!(entry["reachable"], true, "{ping}");
    assert_eq!(entry["agent_version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(entry["supervision"], "supervisor");
    assert!(entry["round_trip_ms"].as_f64().unwrap() > 0.0);
    assert!(entry["certificate_days_left"].as_i64().unwrap() >= 89);
    let hosts = controller.run(&["hosts", "--json"]).json();
    assert_eq!(hosts.as_array().unwrap().len(), 1);
    assert_eq!(hosts[0]["host"], address.as_str());
    let table = controller.run(&["hosts"]);
    assert!(
        table.success() && table.stdout.contains(&address),
        "{table:#?}"
    );

    // Re-running keeps the identity and does not re-upload the same binary.
    let pid_before = host.supervisor_pid();
    let again = controller
        .bootstrap(&host, SshUser::Root, &["--json"])
        .json();
    assert_eq!(again["uploaded_bytes"], 0);
    assert!(again["certificate_issued"].is_null(), "{again}");
    assert_eq!(
        std::fs::read_to_string(opt.join("etc/agent.pem")).unwrap(),
        cert
    );
    assert_ne!(host.supervisor_pid(), pid_before, "the agent was restarted");
    assert_eq!(
        controller.run(&["ping", "--json", &address]).json()[0]["reachable"],
        true
    );
}

#[test]
fn bootstrap_replaces_a_different_agent_binary() {
    let host = TestHost::start();
    let controller = Controller::new();
    assert!(controller.bootstrap(&host, SshUser::Root, &[]).success());

    // Same program, different bytes: a build that differs from the installed one.
    let other = tempfile::tempdir().unwrap();
    let modified = other.path().join("agent");
    let mut bytes = std::fs::read(imfleet_tests::bin("agent")).unwrap();
    bytes.extend_from_slice(b"\0imfleet-test-build-2");
    std::fs::write(&modified, &bytes).unwrap();
    std::fs::set_permissions(&modified, std::fs::Permissions::from_mode(0o755)).unwrap();

    let run = controller.bootstrap(
        &host,
        SshUser::Root,
        &["--json", "--agent-binary", modified.to_str().unwrap()],
    );
    let report = run.json();
    assert_eq!(
        report["uploaded_bytes"].as_u64().unwrap(),
        bytes.len() as u64
    );
    assert_eq!(
        std::fs::read(host.opt_imfleet().join("bin/agent")).unwrap(),
        bytes
    );
    assert_eq!(
        controller
            .run(&["ping", "--json", &host.address().to_string()])
            .json()[0]["reachable"],
        true
    );
}

#[test]
fn bootstrap_as_a_passwordless_sudoer() {
    let host = TestHost::start();
    let controller = Controller::new();
    let run = controller.bootstrap(&host, SshUser::Sudoer, &["--json"]);
    assert!(run.success(), "{run:#?}\nsshd:\n{}", host.sshd_log());
    let report = run.json();
    assert_eq!(report["host"]["ssh_user"], "imfleet-sudoer");
    // Installed by root through sudo, not owned by the login user.
    let meta = std::fs::metadata(host.opt_imfleet().join("bin/agent")).unwrap();
    assert_eq!(meta.uid(), 0);
    let key = std::fs::metadata(host.opt_imfleet().join("etc/agent.key")).unwrap();
    assert_eq!((key.uid(), key.permissions().mode() & 0o777), (0, 0o600));
    let ping = controller
        .run(&["ping", "--json", &host.address().to_string()])
        .json();
    assert_eq!(ping[0]["reachable"], true);
}

/// The agent's own supervisor brings a crashed agent back; a stopped agent
/// shows as unreachable with a non-zero exit status.
#[test]
fn supervisor_restarts_a_crashed_agent_and_ping_reports_a_dead_one() {
    let host = TestHost::start();
    let controller = Controller::new();
    assert!(controller.bootstrap(&host, SshUser::Root, &[]).success());
    let address = host.address().to_string();

    let supervisor = host.supervisor_pid().expect("supervisor running");
    let serving = host.kill_serving_agent();
    // Poll until a new agent process answers (the supervisor backs off 1 s first).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let run = controller.run(&["ping", "--json", &address]);
        if run.success() {
            let now =
                std::fs::read_to_string(format!("/proc/{supervisor}/task/{supervisor}/children"))
                    .unwrap();
            assert_ne!(
                now.split_whitespace().next(),
                Some(serving.to_string().as_str())
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "agent not restarted: {}",
            host.agent_log()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }

    host.stop_agent();
    let run = controller.run(&["ping", "--json", &address]);
    assert_eq!(run.status, Some(1), "{run:#?}");
    let report: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(report[0]["reachable"], false);
    let error = report[0]["error"].as_str().unwrap();
    assert!(
        error.contains("unreachable") && error.contains("refused"),
        "{error}"
    );
    let table = controller.run(&["hosts"]);
    assert!(
        table.success() && table.stdout.contains("UNREACHABLE"),
        "{table:#?}"
    );
}

/// The fingerprint `ssh-keygen -l` gives the host's key.
fn fingerprint_of(public_key: &str) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new("ssh-keygen")
        .args(["-l", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(public_key.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .find(|w| w.starts_with("SHA256:"))
        .unwrap()
        .to_owned()
}

#[test]
fn a_pinned_host_key_is_checked_before_anything_is_sent() {
    let host = TestHost::start();
    let controller = Controller::new();
    let real = fingerprint_of(&host.host_public_key());
    let sessions = |host: &TestHost| host.sshd_log().matches("Accepted publickey").count();

    // A wrong pin: refused before any login, nothing on the host.
    let wrong = format!("SHA256:{}", "A".repeat(43));
    let run = controller.bootstrap(
        &host,
        SshUser::Root,
        &["--ssh-host-key-fingerprint", &wrong],
    );
    assert!(!run.success(), "{run:#?}");
    assert!(
        run.stderr.contains("does not present the SSH host key") && run.stderr.contains(&real),
        "{}",
        run.stderr
    );
    assert_eq!(sessions(&host), 0, "{}", host.sshd_log());
    assert!(!host.opt_imfleet().join("bin").exists());
    // Not a fingerprint at all: told how one looks.
    let run = controller.bootstrap(&host, SshUser::Root, &["--ssh-host-key-fingerprint", "abc"]);
    assert_eq!(run.status, Some(2), "{run:#?}");
    assert!(run.stderr.contains("ssh-keygen -lf"), "{}", run.stderr);

    // The right pin: one session, and the report says which key it was.
    let run = controller.bootstrap(
        &host,
        SshUser::Root,
        &["--ssh-host-key-fingerprint", &real, "--json"],
    );
    let report = run.json();
    assert_eq!(
        report["ssh_host_key_fingerprints"],
        serde_json::json!([real])
    );
    assert_eq!(sessions(&host), 1, "{}", host.sshd_log());

    // Without a pin the key is trusted on first use, recorded and shown.
    let fresh = Controller::new();
    let run = fresh.bootstrap(&host, SshUser::Root, &[]);
    assert!(run.success(), "{run:#?}");
    assert!(
        run.stdout
            .contains(&format!("SSH host key {real} (as recorded")),
        "{}",
        run.stdout
    );
}
