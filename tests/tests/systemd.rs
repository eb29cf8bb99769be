//! The agent on IM hosts that boot systemd, as every real one does
//! (`SystemdHost`: Debian 12 with systemd as PID 1 in `systemd-nspawn`,
//! each host in its own network namespace with its own Docker Engine).
//! Bootstrap installs a unit systemd keeps running, the journal gets clean
//! lines, the daemon sees a killed agent go and come back, a deploy and a
//! rolling upgrade run across two such hosts, and a reboot brings the agent
//! and the IM back by themselves.

use std::time::{Duration, Instant};

use imfleet_tests::daemon::Daemon;
use imfleet_tests::deploy::IMAGE;
use imfleet_tests::fleet::{Fleet, IMAGES, NEXT_IMAGE};
use imfleet_tests::systemd_host::{SystemdHost, exposure};
use imfleet_tests::{Controller, ImHost};

const UNIT: &str = "imfleet-agent.service";
const UNIT_FILE: &str = "/etc/systemd/system/imfleet-agent.service";

/// Waits up to `limit` for `check` to hold, polling; panics with `what`.
fn until(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "gave up waiting: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The kinds of a host's events, oldest first.
fn kinds(controller: &Controller, host: &str) -> Vec<String> {
    let events = controller
        .run(&["events", "--json", "--host", host, "-n", "1000"])
        .json();
    events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_owned())
        .collect()
}

/// Whether the daemon sees the host's agent up (and, if asked, its IM
/// healthy).
fn daemon_sees(controller: &Controller, host: &str, im_healthy: bool) -> bool {
    let watch = controller.run(&["watch", "--once", "--json"]);
    let Ok(fleet) = serde_json::from_str::<serde_json::Value>(watch.stdout.trim()) else {
        return false;
    };
    fleet.as_array().is_some_and(|hosts| {
        hosts.iter().any(|h| {
            h["host"] == host && h["agent_up"] == true && (!im_healthy || h["im_healthy"] == true)
        })
    })
}

#[test]
fn bootstrap_installs_a_unit_systemd_restarts_and_journald_keeps_clean() {
    let host = SystemdHost::boot(&[]);
    let controller = Controller::new();
    let address = host.address().to_string();
    let first = controller.bootstrap_root(&host, &[]);
    assert!(first.success(), "{first:#?}\n{}", host.console());
    assert!(first.stdout.contains("(systemd)"), "{}", first.stdout);
    assert_eq!(host.exec_ok(&["systemctl", "is-enabled", UNIT]), "enabled");
    assert_eq!(host.exec_ok(&["systemctl", "is-active", UNIT]), "active");
    // The unit's documentation is there to read.
    let docs = host.unit_property(UNIT, "Documentation");
    let page = docs.trim_start_matches("file://");
    assert!(host.exec(&["test", "-s", page]).status.success(), "{docs}");
    // The unit as installed passes systemd's own checks; its exposure is
    // stated (SECURITY.md) and may not grow.
    let verify = host.exec(&["systemd-analyze", "verify", UNIT_FILE]);
    let said = String::from_utf8_lossy(&verify.stderr).to_string();
    assert!(
        verify.status.success() && !said.contains("imfleet-agent"),
        "systemd-analyze verify: {said}"
    );
    let security = host.exec(&["systemd-analyze", "security", "--no-pager", UNIT]);
    let analysis = String::from_utf8_lossy(&security.stdout).to_string();
    let score = exposure(&analysis).unwrap_or_else(|| panic!("no score in: {analysis}"));
    println!("systemd-analyze security {UNIT}: exposure {score}");
    assert!(score <= 6.5, "exposure {score}:\n{analysis}");

    // Bootstrap again: nothing doubles, the unit runs on.
    let again = controller.bootstrap_root(&host, &[]);
    assert!(again.success(), "{again:#?}");
    assert!(
        again.stdout.contains("already up to date") && again.stdout.contains("certificate kept"),
        "{}",
        again.stdout
    );
    let units = host.exec_ok(&["sh", "-c", "ls /etc/systemd/system | grep -c imfleet"]);
    assert_eq!(units, "1");
    assert_eq!(host.exec_ok(&["systemctl", "is-enabled", UNIT]), "enabled");
    assert_eq!(host.exec_ok(&["systemctl", "is-active", UNIT]), "active");

    // Killed as a crash would: systemd starts it again, the daemon sees the
    // outage and the return.
    let daemon = Daemon::start(&controller, &[]);
    until(Duration::from_secs(30), "the daemon sees the agent", || {
        daemon_sees(&controller, &address, false)
    });
    let killed = host.unit_property(UNIT, "MainPID");
    host.exec_ok(&["systemctl", "kill", "--kill-whom=main", "-s", "KILL", UNIT]);
    until(
        Duration::from_secs(30),
        "systemd restarts the agent",
        || {
            host.unit_property(UNIT, "NRestarts") == "1"
                && host.unit_property(UNIT, "ActiveState") == "active"
                && host.unit_property(UNIT, "MainPID") != killed
        },
    );
    let recorded = || {
        let k = kinds(&controller, &address);
        let down = k.iter().position(|k| k == "agent-unreachable");
        down.is_some_and(|d| k[d..].iter().any(|k| k == "agent-back"))
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !recorded() {
        assert!(
            Instant::now() < deadline,
            "no outage and return recorded: {:?}\n{}",
            kinds(&controller, &address),
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(daemon);

    // Its log reached the journal, plain, at the expected level.
    let journal = host.journal(UNIT);
    assert!(
        journal.contains("serving over mutual TLS"),
        "journal:\n{journal}"
    );
    assert!(
        !journal.contains('\x1b'),
        "escape codes in the journal:\n{journal}"
    );
    assert!(
        journal.contains(" INFO ") && !journal.contains("DEBUG"),
        "{journal}"
    );
}

#[test]
fn a_deploy_and_a_rolling_upgrade_across_two_systemd_hosts() {
    let fleet = Fleet::deploy_on(vec![SystemdHost::boot(IMAGES), SystemdHost::boot(IMAGES)]);
    for i in 0..2 {
        assert_eq!(fleet.running(i), (fleet_image(), true));
        assert_eq!(
            fleet.hosts[i].exec_ok(&["systemctl", "is-active", UNIT]),
            "active"
        );
    }
    let run = fleet.upgrade(&["--image", NEXT_IMAGE]);
    assert!(run.success(), "{run:#?}");
    assert_eq!(fleet.last_rollout()["state"], "succeeded");
    for i in 0..2 {
        assert_eq!(fleet.running(i), (NEXT_IMAGE.to_owned(), true), "host {i}");
    }
}

fn fleet_image() -> String {
    IMAGE.to_owned()
}

#[test]
fn a_reboot_brings_back_the_agent_and_the_im_and_the_daemon_records_it() {
    let mut fleet = Fleet::deploy_on(vec![SystemdHost::boot(IMAGES)]);
    let address = fleet.names()[0].clone();
    let daemon = Daemon::start(&fleet.controller, &[]);
    until(
        Duration::from_secs(60),
        "the daemon sees the IM healthy",
        || daemon_sees(&fleet.controller, &address, true),
    );
    let started = fleet.im_started_at(0);
    let booted = fleet.hosts[0].init_pid();

    fleet.hosts[0].reboot();
    // A new boot of the host (a new init), not the old one still running.
    assert_ne!(fleet.hosts[0].init_pid(), booted);
    until(
        Duration::from_secs(90),
        "agent and IM back by themselves",
        || daemon_sees(&fleet.controller, &address, true),
    );
    // The IM was started again by the Engine (restart: unless-stopped), not
    // by anyone's command.
    assert_ne!(fleet.im_started_at(0), started);
    assert_eq!(fleet.running(0), (fleet_image(), true));
    assert_eq!(
        fleet.hosts[0].exec_ok(&["systemctl", "is-active", UNIT]),
        "active"
    );
    let k = kinds(&fleet.controller, &address);
    let down = k.iter().position(|k| k == "agent-unreachable");
    assert!(
        down.is_some_and(|d| k[d..].iter().any(|k| k == "agent-back")),
        "{k:?}"
    );
    assert_eq!(
        k.iter().filter(|k| *k == "deploy").count(),
        1,
        "nobody deployed again: {k:?}"
    );
    drop(daemon);
    assert!(!fleet.hosts[0].agent_log().is_empty());
}
