//! Agents upgraded over mTLS, never SSH: `controller agents upgrade` with
//! test builds of the agent (`test-flavors`: a newer working build, one
//! that exits at start, one that never serves), under the agent's own
//! supervisor and under systemd. A good build is confirmed with the IM
//! running on untouched; a bad one is put back by the host itself; an
//! upgrade during an apply is refused. Bootstrap's one SSH session stays
//! the only one.

use std::time::{Duration, Instant};

use imfleet_tests::deploy::{NEVER_HEALTHY_DEPLOY, Setup, docker};
use imfleet_tests::systemd_host::SystemdHost;
use imfleet_tests::{Controller, ImHost, ImSlot, Run, bin};

const NEXT: &str = "0.1.0+next";

fn upgrade(controller: &Controller, host: &str, flavor: &str) -> Run {
    let binary = bin(flavor);
    controller.run(&[
        "agents",
        "upgrade",
        host,
        "--agent-binary",
        binary.to_str().unwrap(),
        "--json",
    ])
}

/// The agent's version and protocol revision as its ping says.
fn pinged(controller: &Controller, host: &str) -> (String, u64) {
    let pong = controller.run(&["ping", host, "--json"]).json();
    (
        pong[0]["agent_version"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        pong[0]["protocol_revision"].as_u64().unwrap_or_default(),
    )
}

fn im_started_at() -> String {
    let out = docker(&[
        "inspect",
        "-f",
        "{{.State.StartedAt}}",
        "portsip.instantmessage",
    ]);
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn sessions(log: &str) -> usize {
    log.matches("Accepted publickey").count()
}

#[test]
fn under_the_supervisor_a_good_build_is_confirmed_and_the_im_runs_on() {
    let _slot = ImSlot::take();
    let s = Setup::new();
    assert!(s.deploy(&[]).success());
    let host = s.address();
    let started = im_started_at();
    assert!(!started.is_empty());

    let run = upgrade(&s.controller, &host, "agent-next");
    let result = run.json();
    assert_eq!(result[0]["ok"], true, "{result:#}\n{}", s.host.agent_log());
    assert_eq!(result[0]["result"]["outcome"], "upgraded");
    assert_eq!(result[0]["result"]["to"], NEXT);
    let (version, revision) = pinged(&s.controller, &host);
    assert_eq!(version, NEXT);
    assert_eq!(revision, u64::from(imfleet_proto::PROTOCOL_REVISION) + 1);
    // The IM was not restarted; the previous agent is kept on the host.
    assert_eq!(im_started_at(), started);
    assert!(s.host.opt_imfleet().join("bin/agent.previous").exists());
    assert_eq!(s.status()[0]["healthy"], true);
    // Again: nothing to do.
    let again = upgrade(&s.controller, &host, "agent-next").json();
    assert_eq!(again[0]["result"]["outcome"], "up-to-date", "{again:#}");
    // One SSH session in this host's life: bootstrap's.
    assert_eq!(sessions(&s.host.sshd_log()), 1, "{}", s.host.sshd_log());
    let audit = std::fs::read_to_string(s.host.opt_imfleet().join("log/audit.log")).unwrap();
    assert!(audit.contains("\"rpc\":\"upgrade_agent\""), "{audit}");
}

#[test]
fn under_the_supervisor_a_build_that_exits_at_start_is_put_back_by_the_host() {
    let (host, controller) = imfleet_tests::bootstrapped_host();
    let address = host.address().to_string();
    let run = upgrade(&controller, &address, "agent-crash-at-start");
    let result = run.json_any();
    assert_eq!(result[0]["ok"], false, "{result:#}");
    let error = result[0]["error"].as_str().unwrap();
    assert!(
        error.contains("put the previous agent (0.1.0) back") && error.contains("exited"),
        "{error}"
    );
    assert_eq!(pinged(&controller, &address).0, "0.1.0");
    assert!(host.opt_imfleet().join("bin/agent.failed").exists());
    let events = controller
        .run(&["events", "--json", "--host", &address])
        .json();
    assert!(
        events
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "agent-upgrade-failed"),
        "{events:#}"
    );
}

#[test]
fn an_upgrade_during_an_apply_is_refused() {
    let _slot = ImSlot::take();
    let s = Setup::new();
    // An apply that waits for a health check that never comes.
    let mut extra: Vec<&str> = NEVER_HEALTHY_DEPLOY.to_vec();
    let at = extra.iter().position(|a| *a == "--health-timeout").unwrap();
    extra[at + 1] = "60";
    let mut deploy = s.deploy_command(&extra, true);
    let mut running = deploy
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = s.status();
        if status[0]["status"]["applying"] == true {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the apply never showed: {status:#}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let run = upgrade(&s.controller, &s.address(), "agent-next");
    let result = run.json_any();
    assert_eq!(result[0]["ok"], false, "{result:#}");
    assert!(
        result[0]["error"]
            .as_str()
            .unwrap()
            .contains("change to the deployment is under way"),
        "{result:#}"
    );
    assert_eq!(pinged(&s.controller, &s.address()).0, "0.1.0");
    let _ = running.kill();
    let _ = running.wait();
}

#[test]
fn under_systemd_a_good_build_is_confirmed_and_a_silent_one_put_back() {
    let host = SystemdHost::boot(&[]);
    let controller = Controller::new();
    let address = host.address().to_string();
    assert!(controller.bootstrap_root(&host, &[]).success());
    let unit = "imfleet-agent.service";

    // A build that runs but never serves: the host's watcher (a transient
    // unit of its own) puts the previous one back when its deadline passes.
    let run = upgrade(&controller, &address, "agent-never-serves");
    let result = run.json_any();
    assert_eq!(result[0]["ok"], false, "{result:#}");
    assert!(
        result[0]["error"]
            .as_str()
            .unwrap()
            .contains("did not serve"),
        "{result:#}"
    );
    assert_eq!(pinged(&controller, &address).0, "0.1.0");
    assert_eq!(host.exec_ok(&["systemctl", "is-active", unit]), "active");

    // A good one: restarted through systemd, confirmed, the watcher gone.
    let result = upgrade(&controller, &address, "agent-next").json();
    assert_eq!(result[0]["ok"], true, "{result:#}\n{}", host.agent_log());
    assert_eq!(pinged(&controller, &address).0, NEXT);
    assert_eq!(host.exec_ok(&["systemctl", "is-active", unit]), "active");
    let watcher = host.exec(&["systemctl", "is-active", "imfleet-agent-upgrade.service"]);
    assert!(!watcher.status.success(), "the watcher unit is still there");
    let journal = host.journal("imfleet-agent-upgrade.service");
    assert!(journal.contains("agent upgrade confirmed"), "{journal}");
}

#[test]
fn a_command_that_meets_an_older_agent_names_the_upgrade_and_does_it_when_asked() {
    let previous = bin("agent-previous");
    let (host, controller) =
        imfleet_tests::bootstrapped_host_with(&["--agent-binary", previous.to_str().unwrap()]);
    let address = host.address().to_string();
    assert_eq!(pinged(&controller, &address).0, "0.1.0-previous");

    // Named, not done.
    let run = controller.run(&["ping", &address]);
    assert!(run.success(), "{run:#?}");
    assert!(
        run.stderr.contains("older than this controller")
            && run
                .stderr
                .contains(&format!("controller agents upgrade {address}")),
        "{}",
        run.stderr
    );
    assert_eq!(pinged(&controller, &address).0, "0.1.0-previous");

    // Done when asked, over mTLS.
    let run = controller.run(&["status", &address, "--upgrade-agents"]);
    assert!(run.stderr.contains("upgrading the agents"), "{run:#?}");
    let (version, revision) = pinged(&controller, &address);
    assert_eq!(version, "0.1.0");
    assert_eq!(revision, u64::from(imfleet_proto::PROTOCOL_REVISION));
    let quiet = controller.run(&["ping", &address]);
    assert!(!quiet.stderr.contains("older than"), "{}", quiet.stderr);
    assert_eq!(sessions(&host.sshd_log()), 1, "{}", host.sshd_log());
}
