//! Apply is idempotent and survives the agent dying in the middle of it:
//! against the real Docker Engine, with the agent killed by SIGKILL.

use std::process::Stdio;
use std::time::{Duration, Instant};

use imfleet_tests::deploy::{IMAGE, Setup, docker};
use imfleet_tests::{ImSlot, existing_im_containers};

/// Container id, by name (empty when absent).
fn container_id(name: &str) -> String {
    let out = docker(&["inspect", "-f", "{{.Id}}", name]);
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn image_of(name: &str) -> String {
    let out = docker(&["inspect", "-f", "{{.Config.Image}}", name]);
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Polls `done` until it holds or `limit` passes (then fails with `what`).
fn wait_for(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn deploying_the_running_spec_again_changes_nothing_and_says_so() {
    let _slot = ImSlot::take();
    let s = Setup::new();
    assert!(s.deploy(&[]).success());
    let before = container_id("portsip.instantmessage");
    assert!(!before.is_empty());

    let again = s.deploy(&["--json"]);
    assert!(again.success(), "{again:#?}");
    let report = again.json();
    assert_eq!(report["unchanged"], true, "{report}");
    assert_eq!(report["status"]["healthy"], true);
    // Not even restarted: the very same container.
    assert_eq!(container_id("portsip.instantmessage"), before);

    // Another configuration is a change again.
    s.write_token("imtok-fedcba9876543210fedcba98765");
    let changed = s.deploy(&["--json"]);
    assert!(changed.success(), "{changed:#?}");
    assert_eq!(changed.json()["unchanged"], false);
    assert_ne!(container_id("portsip.instantmessage"), before);
}

#[test]
fn an_agent_killed_mid_apply_brings_the_previous_deployment_back_when_it_restarts() {
    let _slot = ImSlot::take();
    let s = Setup::new();
    assert!(s.deploy(&[]).success());

    // A redeploy whose IM never gets healthy, given plenty of time to fail.
    let mut redeploy = s
        .deploy_command(
            &[
                "--image",
                "imfleet-test/pbx:22-never-healthy",
                "--health-timeout",
                "300",
            ],
            true,
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(Duration::from_secs(90), "the new IM container", || {
        existing_im_containers()
            .iter()
            .any(|c| c.starts_with("portsip.instantmessage.previous "))
            && image_of("portsip.instantmessage") == "imfleet-test/pbx:22-never-healthy"
    });

    // The agent dies with the old set aside and the new one half started.
    s.host.kill_serving_agent();
    let ended = redeploy.wait().unwrap();
    assert!(
        !ended.success(),
        "the interrupted deploy must not claim success"
    );

    // The restarted agent undoes the apply: the old set runs, nothing aside.
    wait_for(Duration::from_secs(90), "the previous deployment", || {
        let names = existing_im_containers();
        !names.iter().any(|c| c.contains(".previous"))
            && image_of("portsip.instantmessage") == IMAGE
            && names
                .iter()
                .any(|c| c.starts_with("portsip.instantmessage ") && c.ends_with(" running"))
    });
    imfleet_tests::deploy::wait_until_healthy(&s);
    assert!(
        s.host
            .agent_log()
            .contains("recovered an interrupted apply"),
        "{}",
        s.host.agent_log()
    );
}
