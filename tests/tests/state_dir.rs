//! Only `controller init` creates state: every other command, and the
//! daemon, on a state directory that is missing or empty (the failover
//! filesystem not mounted on this node) stops, says so, and creates nothing.

use imfleet_tests::Controller;

#[test]
fn without_init_no_command_creates_a_fleet() {
    let controller = Controller::uninitialised();
    let root = controller.state.path().to_owned();
    let unmounted = root.join("var/lib/imfleet");
    let dir = unmounted.to_str().unwrap();
    for args in [
        vec!["hosts"],
        vec!["certs", "--json"],
        vec!["bootstrap", "im1"],
        vec!["serve", "--metrics-listen", "127.0.0.1:0"],
        vec!["ca", "rotate"],
    ] {
        let mut command = std::process::Command::new(imfleet_tests::bin("controller"));
        command.arg("--state-dir").arg(dir).args(&args);
        let run = imfleet_tests::run_with_limit(command, std::time::Duration::from_secs(60));
        assert_eq!(run.status, Some(1), "{args:?}: {run:#?}");
        assert!(
            run.stderr.contains("controller init") && run.stderr.contains("not mounted"),
            "{args:?}: {}",
            run.stderr
        );
        assert!(!unmounted.exists(), "{args:?} created {dir}");
    }
    // The empty directory itself: the same.
    let run = controller.run(&["hosts"]);
    assert_eq!(run.status, Some(1), "{run:#?}");
    assert!(run.stderr.contains("is empty"), "{}", run.stderr);
    assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0);
    // init creates it; then commands work.
    assert!(controller.run(&["init"]).success());
    assert!(controller.run(&["hosts", "--json"]).success());
}
