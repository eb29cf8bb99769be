//! `controller serve` owns rollouts: the CLI hands an upgrade to it and may
//! detach; a daemon killed at any point is replaced by one that takes the
//! rollout up by itself, and the records end where the hosts are.

use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

use imfleet_tests::daemon::Daemon;
use imfleet_tests::fleet::{Fleet, NEXT_IMAGE, most_out_of_service};

/// Waits (polling the record) until the timeline holds more than `len` entries.
fn wait_for_timeline_beyond(fleet: &Fleet, len: usize) -> Vec<(String, String)> {
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let timeline = fleet.timeline();
        if timeline.len() > len {
            return timeline;
        }
        assert!(
            Instant::now() < deadline,
            "the rollout stopped moving: {timeline:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_daemon_drives_a_detached_rollout_and_a_new_daemon_takes_it_up_after_each_kill() {
    let fleet = Fleet::deployed(2);
    let state = fleet.controller.state.path().to_owned();
    let mut daemon = Daemon::start(&fleet.controller, &[]);

    // Refusals come back from the daemon as clear errors; nothing starts.
    let token = fleet.new_token();
    let refused = fleet.controller.run(&[
        "upgrade",
        "nosuchhost",
        "--image",
        NEXT_IMAGE,
        "--token-file",
        &token.display().to_string(),
    ]);
    assert_eq!(refused.status, Some(1), "{refused:#?}");
    assert!(
        refused.stderr.contains("unknown host `nosuchhost`"),
        "{refused:#?}"
    );
    assert!(fleet.controller.run(&["rollouts", "--json"]).json()[0].is_null());
    assert!(
        daemon.log().contains("rollout run stopped"),
        "{}",
        daemon.log()
    );

    // Submitted to the daemon; the CLI follows, then detaches on Ctrl-C.
    let cli = fleet
        .upgrade_command(&token, &["--image", NEXT_IMAGE, "--min-healthy-time", "4s"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut seen = wait_for_timeline_beyond(&fleet, 0).len();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(cli.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let detached = cli.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&detached.stderr);
    assert!(detached.status.success(), "{said}");
    assert!(said.contains("detached"), "{said}");
    // The token and PBX login are kept for the rollout's life, privately.
    let kept = state.join("rollout.credentials");
    let mode = std::fs::metadata(&kept).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    // The daemon is killed at three points of the rollout; each new one
    // takes it up by itself.
    for _ in 0..3 {
        let timeline = wait_for_timeline_beyond(&fleet, seen);
        seen = timeline.len();
        if fleet.last_rollout()["state"] != "running" {
            break;
        }
        daemon.signal(nix::sys::signal::Signal::SIGKILL);
        drop(daemon);
        daemon = Daemon::start(&fleet.controller, &[]);
    }
    let followed = imfleet_tests::run_with_limit(
        fleet.controller.command(&["upgrade", "--follow", "--json"]),
        Duration::from_secs(600),
    );
    assert!(followed.success(), "{followed:#?}\n{}", daemon.log());
    let last: serde_json::Value =
        serde_json::from_str(followed.stdout.lines().last().unwrap()).unwrap();
    assert_eq!(last["rollout"]["state"], "succeeded", "{last:#}");
    assert!(
        daemon.log().contains("taking up the active rollout"),
        "{}",
        daemon.log()
    );

    // The records end where the hosts are.
    assert_eq!(fleet.phases(), vec!["done"; 2]);
    for i in 0..2 {
        assert_eq!(fleet.running(i), (NEXT_IMAGE.to_owned(), true), "host {i}");
    }
    let mut args = vec!["status".to_owned(), "--json".to_owned()];
    args.extend(fleet.names());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let status = fleet.controller.run(&args).json();
    for host in status.as_array().unwrap() {
        assert_eq!(host["deployment"]["image"], NEXT_IMAGE, "{status:#}");
    }
    assert_eq!(most_out_of_service(&fleet.timeline()), 1);
    assert!(!kept.exists(), "the credentials outlived the rollout");
    // Following once it has ended says how it ended.
    let again = fleet.controller.run(&["upgrade", "--follow"]);
    assert!(again.success(), "{again:#?}");
    assert!(again.stdout.contains("succeeded"), "{again:#?}");
    // The token never reached the daemon's log.
    let secret = std::fs::read_to_string(&token).unwrap();
    assert!(!daemon.log().contains(secret.trim()));
}

/// A small deterministic generator (xorshift64*): the seed is printed, and
/// IMFLEET_TEST_SEED replays a run.
struct Points(u64);

impl Points {
    fn next_below(&mut self, bound: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % bound
    }
}

#[test]
fn the_daemon_killed_at_random_points_of_rollouts_leaves_records_matching_the_hosts() {
    let fleet = Fleet::deployed(2);
    let seed = std::env::var("IMFLEET_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    println!("kill points from IMFLEET_TEST_SEED={seed}");
    let mut points = Points(seed);
    let mut daemon = Daemon::start(&fleet.controller, &[]);
    let mut kills = 0;
    // Up to the next image and back: two rollouts, each cut many times.
    for image in [NEXT_IMAGE, imfleet_tests::deploy::IMAGE] {
        let token = fleet.new_token();
        let mut cli = fleet
            .upgrade_command(&token, &["--image", image])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        for _ in 0..6 {
            // A kill point anywhere in the next 3 s of the rollout: between
            // steps, inside an apply, while a record is written.
            let after = Duration::from_millis(points.next_below(3000));
            std::thread::sleep(after);
            daemon.signal(nix::sys::signal::Signal::SIGKILL);
            drop(daemon);
            kills += 1;
            daemon = Daemon::start(&fleet.controller, &[]);
            if fleet.last_rollout()["state"] != "running" {
                break;
            }
        }
        // The CLI may have found no daemon at a kill and driven the rollout
        // itself: killed too, it leaves the rollout to the daemon.
        let _ = cli.kill();
        let _ = cli.wait();
        if fleet.last_rollout()["state"] != "succeeded" {
            let followed = imfleet_tests::run_with_limit(
                fleet.controller.command(&["upgrade", "--follow", "--json"]),
                Duration::from_secs(600),
            );
            assert!(
                followed.success(),
                "seed {seed}: {followed:#?}\n{}",
                daemon.log()
            );
            let last: serde_json::Value =
                serde_json::from_str(followed.stdout.lines().last().unwrap()).unwrap();
            assert_eq!(
                last["rollout"]["state"], "succeeded",
                "seed {seed}: {last:#}"
            );
        }
        assert_eq!(fleet.last_rollout()["state"], "succeeded", "seed {seed}");
        // The records end where the hosts are.
        assert_eq!(fleet.phases(), vec!["done"; 2], "seed {seed}");
        for i in 0..2 {
            assert_eq!(
                fleet.running(i),
                (image.to_owned(), true),
                "seed {seed}: host {i}"
            );
        }
        let mut args = vec!["status".to_owned(), "--json".to_owned()];
        args.extend(fleet.names());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let status = fleet.controller.run(&args).json();
        for host in status.as_array().unwrap() {
            assert_eq!(
                host["deployment"]["image"], image,
                "seed {seed}: {status:#}"
            );
        }
        assert_eq!(most_out_of_service(&fleet.timeline()), 1, "seed {seed}");
    }
    assert!(
        kills >= 4,
        "only {kills} kill(s): the rollouts ended too soon"
    );
    println!("{kills} kills");
}
