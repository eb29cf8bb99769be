//! Certificates over their life, without SSH after bootstrap: an agent's
//! renewed over mTLS (a new key made on the host, the certificate recorded
//! before it leaves, served from the next handshake while `controller
//! serve` streams on, the replaced one refused from then on even when the
//! host's old key answers again); a forgotten host's revoked; a revoked
//! controller certificate refused by every agent the controller has told.

use std::time::{Duration, Instant};

use imfleet_tests::daemon::Daemon;
use imfleet_tests::{Controller, SshUser, TestHost, bootstrapped_host};

fn certificates(controller: &imfleet_tests::Controller) -> Vec<serde_json::Value> {
    let list = controller.run(&["certs", "--json"]).json();
    assert!(list["ca"]["sha256_fingerprint"].is_string(), "{list:#}");
    assert!(list["controller"]["not_after"].as_i64().unwrap() > 0);
    list["certificates"].as_array().unwrap().clone()
}

fn state_of(certs: &[serde_json::Value], serial: &str) -> String {
    certs
        .iter()
        .find(|c| c["serial"] == serial)
        .map(|c| c["state"].as_str().unwrap().to_owned())
        .unwrap_or_else(|| panic!("no certificate {serial}: {certs:#?}"))
}

fn event_kinds(controller: &imfleet_tests::Controller, host: &str) -> Vec<String> {
    let events = controller.run(&["events", "--json", "--host", host]).json();
    events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn a_renewal_while_the_daemon_streams_keeps_the_stream_and_refuses_the_old_key() {
    let (host, controller) = bootstrapped_host();
    let address = host.address().to_string();
    let before = certificates(&controller);
    assert_eq!(before.len(), 1, "{before:#?}");
    assert_eq!(before[0]["state"], "current");
    assert_eq!(before[0]["host"], address);
    let old_serial = before[0]["serial"].as_str().unwrap().to_owned();
    let lifetime =
        before[0]["not_after"].as_i64().unwrap() - before[0]["not_before"].as_i64().unwrap();
    assert!(
        (89 * 86_400..=91 * 86_400).contains(&lifetime),
        "{lifetime} s"
    );

    let daemon = Daemon::start(&controller, &[]);
    let streaming = |after: Instant| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let status = controller.run(&["status", "--json", &address]).json_any();
            let age = status[0]["sample_age_seconds"].as_f64();
            if status[0]["source"] == "daemon"
                && status[0]["agent_reachable"] == true
                && age.is_some_and(|a| Duration::from_secs_f64(a) < after.elapsed())
            {
                return;
            }
            assert!(Instant::now() < deadline, "no fresh sample: {status:#}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    streaming(Instant::now());

    let renewed_at = Instant::now();
    let run = controller.run(&["certs", "renew", &address, "--json"]);
    let result = run.json();
    assert_eq!(result[0]["ok"], true, "{result:#}\n{}", host.agent_log());
    let new_serial = result[0]["renewed"]["serial"].as_str().unwrap().to_owned();
    assert_eq!(result[0]["renewed"]["previous_serial"], old_serial);
    assert_ne!(new_serial, old_serial);

    // The stream goes on: a sample taken after the renewal, and no outage.
    streaming(renewed_at);
    let kinds = event_kinds(&controller, &address);
    assert!(
        !kinds.iter().any(|k| k == "agent-unreachable"),
        "{kinds:?}\n{}",
        daemon.log()
    );
    assert!(
        kinds.iter().any(|k| k == "certificate-renewed"),
        "{kinds:?}"
    );
    assert_eq!(
        daemon.log().matches("watching").count(),
        1,
        "{}",
        daemon.log()
    );

    let after = certificates(&controller);
    assert_eq!(state_of(&after, &old_serial), "superseded");
    assert_eq!(state_of(&after, &new_serial), "current");
    let pong = controller.run(&["ping", &address, "--json"]).json();
    assert_eq!(pong[0]["reachable"], true, "{pong:#}");
    drop(daemon);

    // On the host: a new key (0600), the previous identity kept, both
    // renewal calls audited.
    use std::os::unix::fs::PermissionsExt;
    let etc = host.opt_imfleet().join("etc");
    let mode = |f: &str| std::fs::metadata(etc.join(f)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode("agent.key"), 0o600);
    assert_eq!(mode("agent.key.previous"), 0o600);
    assert!(!etc.join("agent.key.next").exists());
    let audit = std::fs::read_to_string(host.opt_imfleet().join("log/audit.log")).unwrap();
    assert!(audit.contains("\"rpc\":\"renew_identity\""), "{audit}");
    assert!(audit.contains("\"rpc\":\"install_identity\""), "{audit}");

    // Whoever holds the old key and certificate is refused, with the reason.
    for (previous, current) in [
        ("agent.pem.previous", "agent.pem"),
        ("agent.key.previous", "agent.key"),
    ] {
        std::fs::copy(etc.join(previous), etc.join(current)).unwrap();
    }
    let restarted = host.kill_serving_agent();
    let deadline = Instant::now() + Duration::from_secs(20);
    let refused = loop {
        let run = controller.run(&["ping", &address, "--json"]);
        let pong = run.json_any();
        let error = pong[0]["error"].as_str().unwrap_or_default().to_owned();
        if error.contains("not") && error.contains("current one") {
            break error;
        }
        assert!(
            Instant::now() < deadline,
            "the old certificate was not refused (agent {restarted} restarted?): {pong:#}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(refused.contains(&old_serial), "{refused}");
    assert!(refused.contains("renewal replaced it"), "{refused}");

    // One SSH session in the host's life: bootstrap's.
    assert_eq!(host.sshd_log().matches("Accepted publickey").count(), 1);
}

#[test]
fn renewing_an_unknown_host_changes_nothing() {
    let (host, controller) = bootstrapped_host();
    let before = certificates(&controller);
    let run = controller.run(&["certs", "renew", "no-such-host"]);
    assert_eq!(run.status, Some(1), "{run:#?}");
    assert!(run.stderr.contains("unknown host"), "{}", run.stderr);
    assert_eq!(certificates(&controller), before);
    drop(host);
}

/// Replaces the agent's identity on `host` with the files in `saved`
/// (agent.pem, agent.key) and restarts it.
fn serve_identity(host: &TestHost, saved: &std::path::Path) {
    let etc = host.opt_imfleet().join("etc");
    for file in ["agent.pem", "agent.key"] {
        std::fs::copy(saved.join(file), etc.join(file)).unwrap();
    }
    host.kill_serving_agent();
}

/// Pings until the agent answers (it may be restarting).
fn answers(controller: &Controller, address: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let pong = controller.run(&["ping", address, "--json"]).json_any();
        if pong[0]["reachable"] == true {
            return;
        }
        assert!(Instant::now() < deadline, "no answer: {pong:#}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Pings until the error says `wanted` (the agent restarts meanwhile).
fn refused_with(controller: &Controller, address: &str, wanted: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let pong = controller.run(&["ping", address, "--json"]).json_any();
        let error = pong[0]["error"].as_str().unwrap_or_default().to_owned();
        if error.contains(wanted) {
            return error;
        }
        assert!(
            Instant::now() < deadline,
            "not refused with {wanted:?}: {pong:#}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_forgotten_host_is_revoked_and_its_old_certificate_refused_when_it_comes_back() {
    let (host, controller) = bootstrapped_host();
    let address = host.address().to_string();
    let old_serial = certificates(&controller)[0]["serial"]
        .as_str()
        .unwrap()
        .to_owned();
    let saved = tempfile::tempdir().unwrap();
    for file in ["agent.pem", "agent.key"] {
        std::fs::copy(
            host.opt_imfleet().join("etc").join(file),
            saved.path().join(file),
        )
        .unwrap();
    }

    // Not without --yes: nothing changes.
    let refused = controller.run(&["hosts", "forget", &address]);
    assert_eq!(refused.status, Some(1), "{refused:#?}");
    assert!(refused.stderr.contains("--yes"), "{}", refused.stderr);
    assert_eq!(state_of(&certificates(&controller), &old_serial), "current");

    let forgotten = controller
        .run(&["hosts", "forget", &address, "--yes", "--json"])
        .json();
    assert_eq!(forgotten["certificates_revoked"], 1, "{forgotten:#}");
    assert_eq!(
        controller.run(&["hosts", "--json"]).json(),
        serde_json::json!([])
    );
    assert_eq!(state_of(&certificates(&controller), &old_serial), "revoked");
    let unknown = controller.run(&["ping", &address]);
    assert!(unknown.stderr.contains("unknown host"), "{unknown:#?}");

    // Bootstrapped again: its installed certificate is revoked, so a new
    // one is issued; the old one stays refused even with its key.
    let again = controller.bootstrap(&host, SshUser::Root, &["--json"]);
    assert!(again.success(), "{again:#?}");
    let report = again.json();
    assert!(
        report["certificate_issued"]
            .as_str()
            .is_some_and(|why| why.contains("revoked")),
        "{report:#}"
    );
    let certs = certificates(&controller);
    assert_eq!(state_of(&certs, &old_serial), "revoked");
    assert_eq!(certs.iter().filter(|c| c["state"] == "current").count(), 1);
    serve_identity(&host, saved.path());
    let error = refused_with(&controller, &address, "was revoked");
    assert!(error.contains(&old_serial), "{error}");
}

#[test]
fn a_revoked_controller_certificate_is_refused_by_every_agent_told() {
    let (host, controller) = bootstrapped_host();
    let address = host.address().to_string();
    let pong = controller.run(&["ping", &address, "--json"]).json();
    let told = pong[0]["controllers_version"].as_u64().unwrap();
    assert!(told > 0, "the agent holds no controller list: {pong:#}");

    // Someone copies pbx01's controller identity (here: the whole state)
    // into an empty directory: over an initialised one, the copied
    // database would meet the other fleet's write-ahead log.
    let thief = Controller::uninitialised();
    for entry in std::fs::read_dir(controller.state.path()).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), thief.state.path().join(entry.file_name())).unwrap();
        }
    }
    let stolen = certificates(&thief);
    let stolen_serial = controller.run(&["certs", "--json"]).json()["controller"]["serial"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(!stolen.is_empty());
    let works = thief.run(&["ping", &address, "--json"]).json();
    assert_eq!(works[0]["reachable"], true, "{works:#}");

    // An agent certificate is not revoked this way.
    let agent_serial = stolen[0]["serial"].as_str().unwrap();
    let wrong = controller.run(&["certs", "revoke", agent_serial]);
    assert_eq!(wrong.status, Some(1));
    assert!(wrong.stderr.contains("hosts forget"), "{}", wrong.stderr);

    let revoked = controller
        .run(&["certs", "revoke", &stolen_serial, "--json"])
        .json();
    assert_eq!(revoked["changed"], true, "{revoked:#}");
    assert_ne!(revoked["controller_serial"], stolen_serial.as_str());
    assert_eq!(revoked["hosts"][0]["holds_list"], true, "{revoked:#}");
    assert!(revoked["list_version"].as_u64().unwrap() > told);

    // The thief is refused (its older list changes nothing), the
    // controller is not, and a restarted agent still knows.
    let error = refused_with(&thief, &address, "no longer accepts controller certificate");
    assert!(error.contains(&stolen_serial), "{error}");
    for _ in 0..2 {
        answers(&controller, &address);
        refused_with(&thief, &address, "no longer accepts controller certificate");
        host.kill_serving_agent();
    }
    answers(&controller, &address);
    let listed = controller.run(&["certs", "--json"]).json();
    let entry = listed["controllers"]["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["serial"] == stolen_serial.as_str())
        .cloned()
        .unwrap_or_default();
    assert!(entry["revoked_at"].is_i64(), "{listed:#}");
    assert_eq!(host.sshd_log().matches("Accepted publickey").count(), 1);
}

#[test]
fn a_ca_rotation_across_three_hosts_waits_for_one_away_then_finishes() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let controller = Controller::new();
    let hosts: Vec<TestHost> = (0..3).map(|_| TestHost::start()).collect();
    for host in &hosts {
        let run = controller.bootstrap(host, SshUser::Root, &[]);
        assert!(run.success(), "{run:#?}");
    }
    let ca_of = |c: &Controller| {
        c.run(&["certs", "--json"]).json()["ca"]["sha256_fingerprint"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let old_ca = ca_of(&controller);

    // One host is away (its agent frozen) when the rotation starts.
    let away = hosts[2].serving_agent_pid();
    kill(Pid::from_raw(away), Signal::SIGSTOP).unwrap();
    let run = controller.run(&["ca", "rotate", "--json"]);
    let waiting = run.json_any();
    assert_eq!(run.status, Some(1), "{run:#?}");
    assert_eq!(waiting["finished"], false);
    assert_eq!(waiting["phase"], "trust", "{waiting:#}");
    let steps: Vec<&str> = waiting["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["step"].as_str().unwrap())
        .collect();
    assert_eq!(
        steps.iter().filter(|s| **s == "done").count(),
        2,
        "{waiting:#}"
    );
    assert_eq!(steps.iter().filter(|s| **s == "unreachable").count(), 1);
    // Meanwhile everything still works, with the old CA in place.
    assert_eq!(ca_of(&controller), old_ca);
    for host in &hosts[..2] {
        answers(&controller, &host.address().to_string());
    }

    // Back: the same command goes on from where it stopped, to the end.
    kill(Pid::from_raw(away), Signal::SIGCONT).unwrap();
    let run = controller.run(&["ca", "rotate", "--json"]);
    let done = run.json();
    assert_eq!(done["finished"], true, "{done:#}");
    let new_ca = ca_of(&controller);
    assert_ne!(new_ca, old_ca);
    assert_eq!(done["new_ca"], new_ca.as_str());

    // Only the controller certificate of the new CA is still accepted.
    let listed = controller.run(&["certs", "--json"]).json();
    let accepted: Vec<&serde_json::Value> = listed["controllers"]["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["revoked_at"].is_null())
        .collect();
    assert_eq!(accepted.len(), 1, "{listed:#}");
    assert_eq!(accepted[0]["serial"], listed["controller"]["serial"]);

    // Every host answers, trusts only the new CA and serves its certificate.
    let ca_pem = std::fs::read_to_string(controller.state.path().join("ca.pem")).unwrap();
    assert_eq!(imfleet_certs::split_certificates_pem(&ca_pem).len(), 1);
    let now = time::OffsetDateTime::now_utc();
    for host in &hosts {
        let address = host.address().to_string();
        answers(&controller, &address);
        let etc = host.opt_imfleet().join("etc");
        let trusted = std::fs::read_to_string(etc.join("ca.pem")).unwrap();
        let trusted = imfleet_certs::split_certificates_pem(&trusted);
        assert_eq!(trusted.len(), 1, "{trusted:?}");
        assert_eq!(
            imfleet_certs::inspect_pem(&trusted[0])
                .unwrap()
                .sha256_fingerprint,
            new_ca
        );
        let served = std::fs::read_to_string(etc.join("agent.pem")).unwrap();
        imfleet_certs::verify_server_identity(&ca_pem, &served, &address, now).unwrap();
        assert_eq!(host.sshd_log().matches("Accepted publickey").count(), 1);
    }
}
