//! Any PBX node drives the fleet: an operator's CLI on a node without the
//! state reaches `controller serve` through its API (TLS, operator
//! certificate) and gets the answers the active node gets; it drives an
//! upgrade there; a revoked operator, another fleet's operator and a
//! certificate of another role are refused.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use imfleet_tests::daemon::{Daemon, free_port};
use imfleet_tests::fleet::{Fleet, NEXT_IMAGE};
use imfleet_tests::{Controller, Run, run_with_limit};

/// `controller --daemon URL --operator BUNDLE ARGS` on `node`.
fn remote(node: &Controller, url: &str, bundle: &std::path::Path, args: &[&str]) -> Command {
    let bundle = bundle.display().to_string();
    let mut all = vec!["--daemon", url, "--operator", bundle.as_str()];
    all.extend_from_slice(args);
    node.command(&all)
}

fn run(cmd: Command) -> Run {
    run_with_limit(cmd, Duration::from_secs(600))
}

/// `status --json` without what changes from one sample to the next, and
/// who answered (the agent itself until the daemon has seen the host).
fn steady(status: serde_json::Value) -> serde_json::Value {
    let mut status = status;
    for host in status.as_array_mut().expect("an array of hosts") {
        let host = host.as_object_mut().unwrap();
        host.remove("sample_age_seconds");
        host.remove("source");
    }
    status
}

/// `curl` with a client certificate against the API: the HTTP code, or
/// None when the TLS exchange failed.
fn curl(
    url: &str,
    cert: &std::path::Path,
    key: &std::path::Path,
    ca: &std::path::Path,
) -> Option<u16> {
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "10",
        ])
        .arg("--cacert")
        .arg(ca)
        .arg("--cert")
        .arg(cert)
        .arg("--key")
        .arg(key)
        .arg(format!("{url}/v1/hosts"))
        .output()
        .expect("curl");
    let code: u16 = String::from_utf8_lossy(&out.stdout).trim().parse().ok()?;
    (out.status.success() && code != 0).then_some(code)
}

#[test]
fn an_operator_on_another_node_gets_the_same_answers_and_drives_an_upgrade() {
    let fleet = Fleet::deployed(1);
    let api = free_port();
    let listen = api.to_string();
    let daemon = Daemon::start(&fleet.controller, &["--api-listen", &listen]);
    let url = format!("https://{api}");
    let bundles = tempfile::tempdir().unwrap();

    // Issued on the active node; the bundle is private and never overwritten.
    let alice = bundles.path().join("alice.pem");
    let alice_arg = alice.display().to_string();
    let added = fleet
        .controller
        .run(&["operators", "add", "alice", "--out", &alice_arg, "--json"]);
    assert!(added.success(), "{added:#?}");
    let mode = std::fs::metadata(&alice).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let again = fleet
        .controller
        .run(&["operators", "add", "bob", "--out", &alice_arg]);
    assert_eq!(again.status, Some(1), "{again:#?}");
    assert!(again.stderr.contains("exists already"), "{again:#?}");

    // Another node: no state directory there at all.
    let other = Controller::uninitialised();
    std::fs::remove_dir(other.state.path()).unwrap();

    let local = fleet.controller.run(&["status", "--all", "--json"]);
    let far = run(remote(&other, &url, &alice, &["status", "--all", "--json"]));
    assert!(far.success(), "{far:#?}\n{}", daemon.log());
    assert_eq!(steady(far.json()), steady(local.json()));
    for args in [["rollouts", "--json"], ["events", "--json"]] {
        let here = fleet.controller.run(&args).json();
        let there = run(remote(&other, &url, &alice, &args)).json();
        // What was recorded in between (a health event) is not compared.
        let newest = here[0]["id"].as_i64();
        let until = |list: serde_json::Value| -> Vec<serde_json::Value> {
            let list = list.as_array().cloned().unwrap_or_default();
            list.into_iter()
                .filter(|e| e["id"].as_i64() <= newest)
                .collect()
        };
        assert!(!until(here.clone()).is_empty() || args[0] == "rollouts");
        assert_eq!(until(there), until(here), "{args:?}");
    }
    // A refusal comes back as the active node would say it.
    let unknown = run(remote(&other, &url, &alice, &["status", "nosuchhost"]));
    assert_eq!(unknown.status, Some(1), "{unknown:#?}");
    assert!(
        unknown.stderr.contains("unknown host `nosuchhost`"),
        "{unknown:#?}"
    );
    // What acts from the state's node says where to run it.
    let deploy = run(remote(&other, &url, &alice, &["rm", "--all"]));
    assert_eq!(deploy.status, Some(1), "{deploy:#?}");
    assert!(
        deploy.stderr.contains("node that holds the state"),
        "{deploy:#?}"
    );

    // An upgrade driven from the other node, by the daemon.
    let token = fleet.new_token();
    let args = fleet.upgrade_args(&token, &["--image", NEXT_IMAGE]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let upgraded = run(remote(&other, &url, &alice, &args));
    assert!(upgraded.success(), "{upgraded:#?}\n{}", daemon.log());
    assert_eq!(fleet.running(0), (NEXT_IMAGE.to_owned(), true));
    assert!(
        daemon.log().contains("operator=\"alice\"") || daemon.log().contains("operator=alice"),
        "the change is not attributed: {}",
        daemon.log()
    );
    assert!(
        !daemon.log().contains("imtok-fleet"),
        "the token was logged"
    );
    let rollouts = run(remote(&other, &url, &alice, &["rollouts", "--json"])).json();
    assert_eq!(rollouts[0]["state"], "succeeded", "{rollouts:#}");

    // The same certificate through curl: accepted (the control for what
    // follows), then other certificates are not.
    let ca = bundles.path().join("ca.pem");
    std::fs::copy(fleet.controller.state.path().join("ca.pem"), &ca).unwrap();
    assert_eq!(curl(&url, &alice, &alice, &ca), Some(200));
    // The controller's own certificate (role `controller`) is no operator.
    let state = fleet.controller.state.path();
    let controller_code = curl(
        &url,
        &state.join("controller.pem"),
        &state.join("controller.key"),
        &ca,
    );
    assert_eq!(controller_code, None, "a controller certificate was served");
    assert!(
        daemon
            .log()
            .contains("certificate role `controller` is not `operator`"),
        "{}",
        daemon.log()
    );
    // The API never takes an image archive (a file on the active node: any
    // file could be sent to a host), whatever the client.
    let submission = serde_json::json!({
        "action": "start",
        "upgrade": {
            "all": false, "hosts": fleet.names(), "image": "x",
            "db_image": null, "image_files": [state.join("ca.key")],
            "canaries": 0,
            "limits": {"max_parallel": 1, "max_failures": 0, "auto_rollback": true},
            "timing": {"min_healthy": 1000, "healthy_deadline": 60000, "progress_deadline": 120000},
            "stop_grace_seconds": 5, "force": true
        },
        "credentials": {"token": "imtok-x"}
    });
    let posted = Command::new("curl")
        .args(["-s", "-w", "\n%{http_code}", "--max-time", "10", "--cacert"])
        .arg(&ca)
        .arg("--cert")
        .arg(&alice)
        .args(["-H", "content-type: application/json", "--data"])
        .arg(submission.to_string())
        .arg(format!("{url}/v1/rollouts"))
        .output()
        .unwrap();
    let posted = String::from_utf8_lossy(&posted.stdout).into_owned();
    assert!(posted.ends_with("\n400"), "{posted}");
    assert!(posted.contains("image archives"), "{posted}");
    let rollouts = run(remote(&other, &url, &alice, &["rollouts", "--json"])).json();
    assert_eq!(rollouts.as_array().unwrap().len(), 1, "{rollouts:#}");

    // Another fleet's operator is refused at the handshake.
    let stranger_fleet = Controller::new();
    let stranger = bundles.path().join("stranger.pem");
    let stranger_arg = stranger.display().to_string();
    assert!(
        stranger_fleet
            .run(&["operators", "add", "mallory", "--out", &stranger_arg])
            .success()
    );
    assert_eq!(curl(&url, &stranger, &stranger, &ca), None);
    let refused = run(remote(&other, &url, &stranger, &["status", "--all"]));
    assert_eq!(refused.status, Some(1), "{refused:#?}");
    assert!(refused.stderr.contains("cannot reach"), "{refused:#?}");

    // Revoked: refused from the next request.
    let revoked = fleet.controller.run(&["operators", "revoke", "alice"]);
    assert!(revoked.success(), "{revoked:#?}");
    assert_eq!(curl(&url, &alice, &alice, &ca), Some(403));
    let after = run(remote(&other, &url, &alice, &["status", "--all"]));
    assert_eq!(after.status, Some(1), "{after:#?}");
    assert!(after.stderr.contains("revoked"), "{after:#?}");
    let listed = fleet.controller.run(&["operators", "--json"]).json();
    assert_eq!(listed[0]["name"], "alice");
    assert_eq!(listed[0]["state"], "revoked");
    drop(daemon);
}
