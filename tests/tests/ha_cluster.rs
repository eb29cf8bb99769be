//! `controller serve` under a real three-node Pacemaker cluster (see
//! `imfleet_tests::cluster`): installed with `controller ha install
//! --apply` from every node, it runs where PortSIP's group runs; the node
//! running it loses power in the middle of a rolling upgrade; a survivor's
//! daemon takes the rollout up and finishes it, every record matching the
//! hosts, and the CLI on a surviving node shows it through the VIP. Then a
//! daemon that cannot start is left stopped and the PBX's resources never
//! move.

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use imfleet_tests::cluster::{API, Cluster, NODES, STATE_DIR, running_on};
use imfleet_tests::fleet::{Fleet, NEXT_IMAGE};

const DAEMON: &str = "imfleet-controller";

struct Ha<'a> {
    cluster: &'a Cluster,
    /// The controller binary, where every node sees it.
    binary: String,
    bundle: String,
}

impl Ha<'_> {
    /// The CLI on `node`, through the VIP as an operator.
    fn remote(&self, node: &str, args: &[&str]) -> Command {
        let url = format!("https://{API}");
        let mut all = vec!["--daemon", url.as_str(), "--operator", self.bundle.as_str()];
        all.extend_from_slice(args);
        self.cluster.on(node, &self.binary, &all)
    }

    fn remote_json(&self, node: &str, args: &[&str]) -> serde_json::Value {
        let out = self.remote(node, args).output().unwrap();
        assert!(
            out.status.success(),
            "{node} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn ha(&self, node: &str, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["--state-dir", STATE_DIR, "ha"];
        all.extend_from_slice(args);
        all.push("--json");
        let text = self.cluster.must_on(node, &self.binary, &all);
        serde_json::from_str(&text).unwrap()
    }
}

#[test]
fn the_daemon_fails_over_mid_rollout_and_one_that_cannot_start_never_moves_the_pbx() {
    let fleet = Fleet::deployed(2);
    // The fleet's state as pbx01 left it goes onto the replicated disk.
    let mut cluster = Cluster::up(fleet.controller.state.path());
    for host in &fleet.hosts {
        cluster.join_host(&host.engine().unwrap().netns(), host.address());
    }
    let binary = cluster.dir().join("controller");
    std::fs::copy(imfleet_tests::bin("controller"), &binary).unwrap();
    let ha = Ha {
        cluster: &cluster,
        binary: binary.display().to_string(),
        bundle: cluster.dir().join("ops.pem").display().to_string(),
    };

    // Installed from every node: the first changes the configuration, the
    // others find nothing to change (and install the agent where they run).
    let install = [
        "install",
        "--with",
        "datapath_fs",
        "--with",
        "vip",
        "--api-listen",
        API,
        "--binary",
        &ha.binary,
        "--log-file",
        "/var/log/pacemaker/imfleet-controller.log",
        "--apply",
    ];
    let first = ha.ha(NODES[0], &install);
    assert_eq!(first["steps"].as_array().unwrap().len(), 7, "{first:#}");
    for node in &NODES[1..] {
        // Once the change has reached this node's copy of the CIB.
        cluster.wait_for(
            node,
            "the configuration replicated",
            Duration::from_secs(30),
            |xml| xml.contains(&format!(r#"id="{DAEMON}""#)),
        );
        let again = ha.ha(node, &install);
        assert_eq!(again["steps"], serde_json::json!([]), "{node}: {again:#}");
    }
    cluster.wait_for(
        NODES[0],
        "the daemon started",
        Duration::from_secs(90),
        |xml| running_on(xml, DAEMON).is_some(),
    );
    let active = cluster.location(NODES[0], "pbx_services").unwrap();
    assert_eq!(cluster.location(NODES[0], DAEMON), Some(active.clone()));
    let other = NODES.iter().find(|n| **n != active).unwrap().to_string();

    // An operator, issued on the active node; the CLI on another node asks
    // the daemon through the VIP.
    cluster.must_on(
        &active,
        &ha.binary,
        &[
            "--state-dir",
            STATE_DIR,
            "operators",
            "add",
            "ops",
            "--out",
            &ha.bundle,
        ],
    );
    let status = ha.remote_json(&other, &["status", "--all", "--json"]);
    assert_eq!(status.as_array().unwrap().len(), 2, "{status:#}");
    assert!(
        status
            .as_array()
            .unwrap()
            .iter()
            .all(|h| h["healthy"] == true),
        "{status:#}"
    );

    // An upgrade submitted from that node, which follows it.
    let token = cluster.dir().join("token");
    std::fs::write(&token, "imtok-ha-0001-0123456789abcdef\n").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let args = fleet.upgrade_args(&token, &["--image", NEXT_IMAGE, "--min-healthy-time", "4s"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let follower = ha
        .remote(&other, &args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    // In the middle of it (the first host swapped, the rollout running),
    // the active node loses power.
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let rollouts = ha.remote_json(&other, &["rollouts", "--json"]);
        let steps = rollouts[0]["steps"].as_array().cloned().unwrap_or_default();
        let swapped = steps
            .iter()
            .any(|s| matches!(s["phase"].as_str(), Some("verifying" | "done")));
        if rollouts[0]["state"] == "running" && swapped {
            break;
        }
        assert!(
            rollouts[0]["state"] != "succeeded",
            "too late: {rollouts:#}"
        );
        assert!(
            Instant::now() < deadline,
            "the rollout did not get going: {rollouts:#}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let killed = Instant::now();
    cluster.kill_node(&active);
    cluster.wait_for(
        &other,
        "the daemon started on a survivor",
        Duration::from_secs(90),
        |xml| running_on(xml, DAEMON).is_some_and(|n| n != active),
    );
    // Failover ends when the CLI gets an answer through the VIP again.
    loop {
        let answered = ha
            .remote(&other, &["status", "--all", "--json"])
            .output()
            .unwrap();
        if answered.status.success() {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(120),
            "no answer through the VIP"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let failover = killed.elapsed();
    println!(
        "failover: {:.1} s from the power cut to an answer through the VIP",
        failover.as_secs_f64()
    );
    let now_active = cluster.location(&other, "pbx_services").unwrap();
    // The CLI that followed lost its daemon with the node; it is not needed.
    let mut follower = follower;
    let _ = follower.kill();
    let _ = follower.wait();

    // The new daemon takes the rollout up and finishes it.
    let out = ha
        .remote(&other, &["upgrade", "--follow", "--json"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        cluster.logs(&now_active)
    );
    let last: serde_json::Value = serde_json::from_str(said.lines().last().unwrap()).unwrap();
    assert_eq!(last["rollout"]["state"], "succeeded", "{last:#}");
    // Every record matches the hosts.
    let status = ha.remote_json(&other, &["status", "--all", "--json"]);
    for host in status.as_array().unwrap() {
        assert_eq!(host["deployment"]["image"], NEXT_IMAGE, "{status:#}");
        let im = host["status"]["containers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "portsip.instantmessage")
            .cloned()
            .unwrap_or_default();
        assert_eq!(im["image"], NEXT_IMAGE, "{status:#}");
        assert_eq!(host["healthy"], true, "{status:#}");
    }
    let steps = ha.remote_json(&other, &["rollouts", "--json"])[0]["steps"].clone();
    assert!(
        steps
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["phase"] == "done"),
        "{steps:#}"
    );

    // A daemon that cannot start (its state is not there) is restarted in
    // place, then left stopped; the PBX's resources stay where they are.
    let pbx_before: Vec<_> = ["datapath_fs", "vip", "pbx_services"]
        .iter()
        .map(|r| cluster.location(&other, r))
        .collect();
    let ca = format!("{STATE_DIR}/ca.pem");
    cluster.must_on(&now_active, "mv", &[&ca, &format!("{ca}.away")]);
    cluster.must_on(
        &now_active,
        "sh",
        &[
            "-c",
            "kill -9 $(cat /run/resource-agents/imfleet-controller.pid)",
        ],
    );
    cluster.wait_for(
        &other,
        "the daemon left stopped",
        Duration::from_secs(120),
        |xml| running_on(xml, DAEMON).is_none() && xml.contains("imfleet-controller_start_0"),
    );
    cluster.must_on(&other, "crm_resource", &["--wait", "--timeout", "60"]);
    let pbx_after: Vec<_> = ["datapath_fs", "vip", "pbx_services"]
        .iter()
        .map(|r| cluster.location(&other, r))
        .collect();
    assert_eq!(pbx_after, pbx_before, "{}", cluster.logs(&now_active));
    // `ha status` says so, and fails: the daemon does not run.
    let said = cluster
        .on(
            &other,
            &ha.binary,
            &[
                "ha",
                "status",
                "--with",
                "datapath_fs",
                "--with",
                "vip",
                "--json",
            ],
        )
        .output()
        .unwrap();
    assert_eq!(said.status.code(), Some(1));
    let status: serde_json::Value = serde_json::from_slice(&said.stdout).unwrap();
    assert_eq!(status["daemon"]["active"], false, "{status:#}");
    assert!(
        !status["fail_counts"].as_object().unwrap().is_empty(),
        "{status:#}"
    );
}
