//! `controller upgrade` across three IM hosts that truly run side by side:
//! each an isolated host with its own network namespace, Docker Engine,
//! agent, data path and IM ports (see `imfleet_tests::engine` for what that
//! cannot show). Orders are asserted from the recorded event timeline.

use std::process::Stdio;
use std::time::{Duration, Instant};

use imfleet_tests::deploy::{DB_IMAGE, IMAGE};
use imfleet_tests::fleet::{Fleet, NEXT_IMAGE, NEXT_NEVER_HEALTHY, most_out_of_service};

fn position(timeline: &[(String, String)], host: &str, phase: &str) -> usize {
    timeline
        .iter()
        .position(|(h, p)| h == host && p == phase)
        .unwrap_or_else(|| panic!("{host} never {phase}: {timeline:?}"))
}

/// Waits (polling the record) until some host is in one of `phases`.
fn wait_for_phase(fleet: &Fleet, phases: &[&str]) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let now = fleet.phases();
        if now.iter().any(|p| phases.contains(&p.as_str())) {
            return now;
        }
        assert!(Instant::now() < deadline, "no host reached {phases:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `--dry-run` prints the plan (batches, canaries, images) and changes nothing.
fn dry_run_changes_nothing(fleet: &Fleet) {
    let started: Vec<String> = (0..3).map(|i| fleet.im_started_at(i)).collect();
    let mut args = vec!["upgrade".to_owned()];
    args.extend(fleet.names());
    args.extend(
        [
            "--image",
            NEXT_IMAGE,
            "--canary",
            "1",
            "--max-parallel",
            "2",
            "--force",
            "--dry-run",
            "--json",
        ]
        .map(str::to_owned),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let plan = fleet.controller.run(&args).json();
    let batches: Vec<(u64, bool)> = plan["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| (l["batch"].as_u64().unwrap(), l["canary"] == true))
        .collect();
    assert_eq!(batches, vec![(0, true), (1, false), (1, false)]);
    assert_eq!(plan["lines"][0]["to_image"], NEXT_IMAGE);
    assert_eq!(plan["lines"][0]["from_image"], IMAGE);
    let rollouts = fleet.controller.run(&["rollouts", "--json"]).json();
    assert_eq!(rollouts.as_array().unwrap().len(), 0, "nothing recorded");
    for (i, before) in started.iter().enumerate() {
        assert_eq!(&fleet.im_started_at(i), before);
    }
}

#[test]
fn a_good_image_rolls_out_one_host_at_a_time() {
    let fleet = Fleet::deployed(3);
    let names = fleet.names();
    dry_run_changes_nothing(&fleet);
    let run = fleet.upgrade(&["--image", NEXT_IMAGE]);
    assert!(run.success(), "{run:#?}");
    eprintln!(
        "rollout of 3 hosts, one at a time: {:.1} s",
        run.elapsed.as_secs_f64()
    );
    // --json: one event per line, the rollout last.
    let lines: Vec<serde_json::Value> = run
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}")))
        .collect();
    assert_eq!(lines.last().unwrap()["event"], "rollout");
    assert_eq!(lines.last().unwrap()["rollout"]["state"], "succeeded");
    assert!(lines.iter().any(|l| l["event"] == "healthy"));
    for i in 0..3 {
        assert_eq!(fleet.running(i), (NEXT_IMAGE.to_owned(), true), "host {i}");
    }
    assert_eq!(fleet.phases(), vec!["done"; 3]);
    let timeline = fleet.timeline();
    assert_eq!(most_out_of_service(&timeline), 1, "{timeline:?}");
    // Every host staged before any swap; each swap after the host before is done.
    let first_swap = timeline.iter().position(|(_, p)| p == "swapping").unwrap();
    for name in &names {
        assert!(position(&timeline, name, "staged") < first_swap);
    }
    for pair in names.windows(2) {
        assert!(
            position(&timeline, &pair[0], "done") < position(&timeline, &pair[1], "swapping"),
            "{timeline:?}"
        );
    }
    // History: the rollout and each host's outcome.
    let text = fleet.controller.run(&["rollouts"]);
    assert!(
        text.success() && text.stdout.contains("succeeded"),
        "{text:#?}"
    );
}

#[test]
fn an_image_that_never_becomes_healthy_rolls_back_the_first_host_only() {
    let fleet = Fleet::deployed(3);
    let started: Vec<String> = (0..3).map(|i| fleet.im_started_at(i)).collect();
    let run = fleet.upgrade(&["--image", NEXT_NEVER_HEALTHY, "--healthy-deadline", "10s"]);
    assert!(!run.success(), "{run:#?}");
    assert_eq!(fleet.phases(), vec!["rolled-back", "staged", "staged"]);
    let rollout = fleet.last_rollout();
    assert_eq!(rollout["state"], "paused", "{rollout}");
    for i in 0..3 {
        assert_eq!(fleet.running(i), (IMAGE.to_owned(), true), "host {i}");
    }
    // The others were never touched: their IM never restarted.
    for (i, before) in started.iter().enumerate().skip(1) {
        assert_eq!(&fleet.im_started_at(i), before, "host {i} was restarted");
    }
    // Resuming accepts the failure and goes on; the same image fails again
    // on the next host, which is rolled back too.
    let token = fleet.new_token();
    let resumed = fleet.controller.run(&[
        "upgrade",
        "--resume",
        "--token-file",
        &token.display().to_string(),
    ]);
    assert!(!resumed.success(), "{resumed:#?}");
    assert_eq!(fleet.phases(), vec!["rolled-back", "rolled-back", "staged"]);
    assert_eq!(fleet.running(1), (IMAGE.to_owned(), true));
}

#[test]
fn a_canary_failure_stops_everything_before_the_second_host() {
    let fleet = Fleet::deployed(3);
    let started: Vec<String> = (0..3).map(|i| fleet.im_started_at(i)).collect();
    let run = fleet.upgrade(&[
        "--image",
        NEXT_NEVER_HEALTHY,
        "--canary",
        "1",
        "--max-failures",
        "2",
        "--healthy-deadline",
        "10s",
    ]);
    assert!(!run.success(), "{run:#?}");
    assert_eq!(fleet.phases(), vec!["rolled-back", "staged", "staged"]);
    let rollout = fleet.last_rollout();
    assert_eq!(rollout["state"], "paused");
    assert!(rollout["steps"][0]["canary"] == true);
    let timeline = fleet.timeline();
    assert!(
        !timeline
            .iter()
            .any(|(h, p)| h != &fleet.names()[0] && p == "swapping"),
        "{timeline:?}"
    );
    for (i, before) in started.iter().enumerate().skip(1) {
        assert_eq!(&fleet.im_started_at(i), before, "host {i} was restarted");
        assert_eq!(fleet.running(i), (IMAGE.to_owned(), true));
    }
    // A second rollout is refused while this one waits, naming it.
    let second = fleet.upgrade(&["--image", NEXT_IMAGE]);
    assert!(!second.success());
    assert!(second.stderr.contains("--resume"), "{second:#?}");
}

#[test]
fn a_controller_killed_mid_rollout_resumes_to_completion() {
    let fleet = Fleet::deployed(3);
    let token = fleet.new_token();
    let mut child = fleet
        .upgrade_command(&token, &["--image", NEXT_IMAGE, "--min-healthy-time", "6s"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let at_kill = wait_for_phase(&fleet, &["swapping", "verifying"]);
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(fleet.last_rollout()["state"], "running");
    let resumed = imfleet_tests::run_with_limit(
        fleet.controller.command(&[
            "upgrade",
            "--resume",
            "--token-file",
            &token.display().to_string(),
        ]),
        Duration::from_secs(600),
    );
    assert!(resumed.success(), "killed at {at_kill:?}: {resumed:#?}");
    assert_eq!(fleet.phases(), vec!["done"; 3]);
    for i in 0..3 {
        assert_eq!(fleet.running(i), (NEXT_IMAGE.to_owned(), true), "host {i}");
    }
    assert_eq!(most_out_of_service(&fleet.timeline()), 1);
}

#[test]
fn abort_restores_the_old_version_on_every_changed_host() {
    let fleet = Fleet::deployed(3);
    let names = fleet.names();
    let token = fleet.new_token();
    let mut child = fleet
        .upgrade_command(&token, &["--image", NEXT_IMAGE, "--min-healthy-time", "8s"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Abort once the first host is done and the second is on its way.
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let phases = fleet.phases();
        if phases[0] == "done" && matches!(phases[1].as_str(), "swapping" | "verifying") {
            break;
        }
        assert!(Instant::now() < deadline, "{phases:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The running upgrade is told through the record; this one follows.
    let abort = imfleet_tests::run_with_limit(
        fleet.controller.command(&[
            "upgrade",
            "--abort",
            "--token-file",
            &token.display().to_string(),
        ]),
        Duration::from_secs(600),
    );
    assert!(abort.success(), "{abort:#?}");
    let status = child.wait().unwrap();
    assert!(!status.success(), "the aborted upgrade reports failure");
    assert_eq!(fleet.last_rollout()["state"], "aborted");
    // The first two changed and are restored; the third was never reached.
    assert_eq!(fleet.phases(), vec!["rolled-back", "rolled-back", "staged"]);
    for i in 0..3 {
        assert_eq!(fleet.running(i), (IMAGE.to_owned(), true), "host {i}");
    }
    let timeline = fleet.timeline();
    assert_eq!(most_out_of_service(&timeline), 1, "{timeline:?}");
    assert!(
        !timeline
            .iter()
            .any(|(h, p)| h == &names[2] && p == "swapping")
    );
}

#[test]
fn max_parallel_two_never_has_more_than_two_hosts_down() {
    let fleet = Fleet::deployed(3);
    let run = fleet.upgrade(&["--image", NEXT_IMAGE, "--max-parallel", "2"]);
    assert!(run.success(), "{run:#?}");
    let timeline = fleet.timeline();
    assert_eq!(most_out_of_service(&timeline), 2, "{timeline:?}");
    for i in 0..3 {
        assert_eq!(fleet.running(i), (NEXT_IMAGE.to_owned(), true), "host {i}");
    }
}

#[test]
fn a_missing_image_stops_before_any_host_and_an_archive_stages_it_everywhere() {
    let fleet = Fleet::deployed_with(3, &[IMAGE, DB_IMAGE]);
    let started: Vec<String> = (0..3).map(|i| fleet.im_started_at(i)).collect();
    // No registry here: the image can be neither found nor pulled.
    let run = fleet.upgrade(&["--image", NEXT_IMAGE]);
    assert!(!run.success(), "{run:#?}");
    assert!(run.stderr.contains("could not be pulled"), "{run:#?}");
    assert!(!fleet.timeline().iter().any(|(_, p)| p == "swapping"));
    for (i, before) in started.iter().enumerate() {
        assert_eq!(&fleet.im_started_at(i), before, "host {i} was touched");
    }
    // Nothing changed, so aborting restores nothing and ends the rollout.
    let token = fleet.new_token();
    let abort = fleet.controller.run(&[
        "upgrade",
        "--abort",
        "--token-file",
        &token.display().to_string(),
    ]);
    assert!(abort.success(), "{abort:#?}");
    assert_eq!(fleet.last_rollout()["state"], "aborted");

    // The archive (a `docker save` of the next version) is streamed to every
    // host before the first swap.
    let archive = tempfile::NamedTempFile::new().unwrap();
    let saved = std::process::Command::new("docker")
        .args(["save", "-o"])
        .arg(archive.path())
        .arg(NEXT_IMAGE)
        .status()
        .unwrap();
    assert!(saved.success());
    let run = fleet.upgrade(&["--image-file", &archive.path().display().to_string()]);
    assert!(run.success(), "{run:#?}");
    let timeline = fleet.timeline();
    let first_swap = timeline.iter().position(|(_, p)| p == "swapping").unwrap();
    let staged_before = timeline[..first_swap]
        .iter()
        .filter(|(_, p)| p == "staged")
        .count();
    assert_eq!(staged_before, 3, "{timeline:?}");
    for i in 0..3 {
        assert_eq!(fleet.running(i), (NEXT_IMAGE.to_owned(), true), "host {i}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn with_the_pbx_one_new_token_is_generated_and_each_host_registered_again() {
    use imfleet_tests::fake_pbx::FakePbx;
    use std::os::unix::fs::PermissionsExt;
    let pbx = FakePbx::start("pbx-admin-password").await;
    let old_token = pbx.state.lock().unwrap().im_token.clone();
    let (url, fingerprint) = (pbx.url(), pbx.fingerprint.clone());
    let (fleet, run) = tokio::task::spawn_blocking(move || {
        let fleet = Fleet::deployed(2);
        let password = fleet.data_path(0).with_extension("pbx-password");
        std::fs::write(&password, "pbx-admin-password\n").unwrap();
        std::fs::set_permissions(&password, std::fs::Permissions::from_mode(0o600)).unwrap();
        let mut args = vec!["upgrade".to_owned()];
        args.extend(fleet.names());
        args.extend(
            [
                "--image",
                NEXT_IMAGE,
                "--pbx-api",
                &url,
                "--pbx-password-file",
                &password.display().to_string(),
                "--pbx-fingerprint",
                &fingerprint,
                "--min-healthy-time",
                "2s",
                "--stop-grace",
                "5",
                "--force",
            ]
            .map(str::to_owned),
        );
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let run = imfleet_tests::run_with_limit(
            fleet.controller.command(&args),
            Duration::from_secs(600),
        );
        (fleet, run)
    })
    .await
    .unwrap();
    assert!(run.success(), "{run:#?}");
    let state = pbx.state.lock().unwrap();
    let new_token = state.im_token.clone();
    assert_ne!(new_token, old_token, "a new token was generated");
    for i in 0..2 {
        let command = fleet.hosts[i]
            .engine()
            .unwrap()
            .inspect("portsip.instantmessage", "{{json .Config.Cmd}}");
        assert!(command.contains(&new_token), "host {i} runs the new token");
    }
    // Registered again after each swap (the PBX keeps one IM address: the last).
    assert_eq!(state.im["private_ipv4"], fleet.names()[1].as_str());
    assert!(state.revoked >= 1, "the PBX session was closed");
    for secret in [&new_token, &old_token, &"pbx-admin-password".to_owned()] {
        assert!(!run.stdout.contains(secret.as_str()) && !run.stderr.contains(secret.as_str()));
    }
}
