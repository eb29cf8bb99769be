//! SSH failures end in a clear, actionable error, within a bounded time, and
//! leave the host untouched.

use imfleet_tests::{Controller, SshUser, TestHost};

/// Every failing bootstrap must end by itself well inside this.
const BOUND_SECS: u64 = 60;

fn assert_failed_within_bound(run: &imfleet_tests::Run) {
    assert!(
        run.status.is_some(),
        "still running after {BOUND_SECS}s: {run:#?}"
    );
    assert_eq!(run.status, Some(1), "{run:#?}");
    assert!(run.elapsed.as_secs() < BOUND_SECS, "{run:#?}");
}

fn nothing_installed(host: &TestHost) -> bool {
    std::fs::read_dir(host.opt_imfleet())
        .unwrap()
        .next()
        .is_none()
}

#[test]
fn unreachable_host_is_reported_with_what_to_check() {
    let mut host = TestHost::start();
    host.kill_sshd();
    let controller = Controller::new();
    let run = controller.bootstrap(&host, SshUser::Root, &[]);
    assert_failed_within_bound(&run);
    assert!(run.stderr.contains("cannot reach"), "{}", run.stderr);
    assert!(run.stderr.contains("Connection refused"), "{}", run.stderr);
    assert!(run.stderr.contains("port 2222"), "{}", run.stderr);
    // No host was recorded.
    assert_eq!(
        controller.run(&["hosts", "--json"]).json(),
        serde_json::json!([])
    );
}

#[test]
fn a_key_the_host_does_not_trust_is_refused() {
    let host = TestHost::start();
    let controller = Controller::new();
    let args = host.ssh_args_with_key(SshUser::Root, &host.stranger_key());
    let run = controller.bootstrap_with(&host, args, &[]);
    assert_failed_within_bound(&run);
    assert!(
        run.stderr.contains("refused the SSH login"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("ssh-copy-id root@"), "{}", run.stderr);
    assert!(nothing_installed(&host));

    // The right key, given the same way, works.
    let args = host.ssh_args_with_key(SshUser::Root, &host.client_key());
    let ok = controller.bootstrap_with(&host, args, &[]);
    assert!(ok.success(), "{ok:#?}");
}

#[test]
fn first_host_key_is_recorded_and_a_changed_one_refused() {
    let host = TestHost::start();
    let controller = Controller::new();
    assert!(!host.known_hosts().exists());
    let first = controller.bootstrap(&host, SshUser::Root, &[]);
    assert!(first.success(), "{first:#?}");
    let known = std::fs::read_to_string(host.known_hosts()).unwrap();
    let host_key = host.host_public_key();
    let key_body = host_key.split_whitespace().nth(1).unwrap();
    assert!(known.contains(key_body), "host key not recorded: {known}");

    // Now the host presents a key other than the recorded one.
    let stranger = std::fs::read_to_string(host.stranger_key().with_extension("pub")).unwrap();
    let stranger_body = stranger.split_whitespace().nth(1).unwrap();
    std::fs::write(host.known_hosts(), known.replace(key_body, stranger_body)).unwrap();
    let pid = host.supervisor_pid();
    let run = controller.bootstrap(&host, SshUser::Root, &[]);
    assert_failed_within_bound(&run);
    assert!(run.stderr.contains("has CHANGED"), "{}", run.stderr);
    let fix = format!("ssh-keygen -R [{}]:2222", host.address());
    assert!(run.stderr.contains(&fix), "{}", run.stderr);
    assert_eq!(host.supervisor_pid(), pid, "the agent must not be touched");
}

#[test]
fn sudo_that_wants_a_password_is_refused_with_the_fix() {
    let host = TestHost::start();
    let controller = Controller::new();
    let run = controller.bootstrap(&host, SshUser::PasswordSudoer, &[]);
    assert_failed_within_bound(&run);
    assert!(run.stderr.contains("imfleet-pwsudo"), "{}", run.stderr);
    assert!(run.stderr.contains("NOPASSWD"), "{}", run.stderr);
    assert!(run.stderr.contains("/etc/sudoers.d/"), "{}", run.stderr);
    assert!(nothing_installed(&host));
    let leftovers = std::fs::read_dir("/tmp")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            use std::os::unix::fs::MetadataExt;
            let pwsudo_uid = nix::unistd::User::from_name("imfleet-pwsudo")
                .unwrap()
                .unwrap()
                .uid
                .as_raw();
            e.file_name()
                .to_string_lossy()
                .starts_with("imfleet-bootstrap.")
                && e.metadata().is_ok_and(|m| m.uid() == pwsudo_uid)
        })
        .count();
    assert_eq!(
        leftovers, 0,
        "the scratch directory must be removed on failure"
    );
}
