//! Inventory and preflight against a real host: the agent measures this
//! machine, the controller judges it.

use imfleet_tests::{Run, bootstrapped_host, im_ports_lock};

fn meminfo_total_bytes() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap();
    let kb: u64 = text
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

#[test]
fn inventory_reports_what_the_host_really_has() {
    let (host, controller) = bootstrapped_host();
    let address = host.address().to_string();
    let inv = controller.run(&["inventory", "--json", &address]).json();

    let release = imfleet_proto::model::os_release::read_os_release();
    assert_eq!(inv["os"]["id"], release.id.as_str());
    assert_eq!(inv["os"]["version_id"], release.version_id.as_str());
    assert_eq!(inv["os"]["arch"], std::env::consts::ARCH);
    let cpus = std::thread::available_parallelism().unwrap().get() as u64;
    assert_eq!(inv["cpu"]["logical_cores"].as_u64().unwrap(), cpus);
    let total = inv["memory"]["total_bytes"].as_u64().unwrap();
    let expected = meminfo_total_bytes();
    assert!(
        total.abs_diff(expected) < expected / 100,
        "{total} vs {expected}"
    );

    // The agent sees its own listener and the host's sshd, with their processes.
    let listening = inv["listening"].as_array().unwrap();
    let owner = |port: u64| {
        listening
            .iter()
            .find(|s| s["port"].as_u64() == Some(port) && s["address"] == address.as_str())
            .map(|s| s["process"].as_str().unwrap().to_owned())
    };
    assert_eq!(
        owner(u64::from(imfleet_tests::host::AGENT_PORT)).as_deref(),
        Some("agent")
    );
    assert_eq!(
        owner(u64::from(imfleet_tests::host::SSH_PORT)).as_deref(),
        Some("sshd")
    );

    let lo = inv["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "lo")
        .expect("lo listed");
    assert_eq!(lo["loopback"], true);
    assert!(
        lo["addresses"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["address"] == "127.0.0.1")
    );
    assert_eq!(inv["agent"]["root"], true);
    assert!(!inv["filesystems"].as_array().unwrap().is_empty(), "{inv}");
    assert!(inv["collected_at"].as_i64().unwrap() > 1_700_000_000);

    let human = controller.run(&["inventory", &address]);
    assert!(human.success(), "{human:#?}");
    assert!(
        human.stdout.contains("Memory") && human.stdout.contains("INTERFACE"),
        "{}",
        human.stdout
    );
}

fn preflight(controller: &imfleet_tests::Controller, args: &[&str]) -> (Run, serde_json::Value) {
    let mut full = vec!["preflight", "--json"];
    full.extend_from_slice(args);
    let run = controller.run(&full);
    let report = serde_json::from_str(&run.stdout).unwrap_or(serde_json::Value::Null);
    (run, report)
}

fn check<'a>(report: &'a serde_json::Value, id: &str) -> &'a serde_json::Value {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == id)
        .unwrap_or_else(|| panic!("no check {id} in {report}"))
}

#[test]
fn preflight_judges_the_real_host_and_orders_failures_first() {
    let _ports = im_ports_lock();
    let (host, controller) = bootstrapped_host();
    let address = host.address().to_string();
    let (run, report) = preflight(
        &controller,
        &[&address, "-a", &address, "-A", &address, "--users", "5000"],
    );

    let release = imfleet_proto::model::os_release::read_os_release();
    let is_noble = release.id == "ubuntu" && release.version_id == "24.04";
    let os = check(&report, "os.release");
    assert_eq!(
        os["verdict"],
        if is_noble { "pass" } else { "fail" },
        "{os}"
    );
    assert_eq!(os["observed"], release.pretty_name.as_str());
    // The test host is this machine, so it runs what "pbx01" runs.
    assert_eq!(check(&report, "os.same-as-pbx")["verdict"], "pass");
    // A 127.77.x.y address is only covered by lo's 127.0.0.0/8.
    let private = check(&report, "net.private-ip");
    assert_eq!(private["verdict"], "warn", "{private}");
    assert!(private["remedy"].as_str().unwrap().contains("loopback"));
    assert_eq!(check(&report, "agent.privileges")["verdict"], "pass");
    assert_eq!(check(&report, "storage.data-path")["verdict"], "pass");

    // Exit status and summary agree with the checks, and failures come first.
    let checks = report["checks"].as_array().unwrap();
    let count = |v: &str| checks.iter().filter(|c| c["verdict"] == v).count();
    assert_eq!(
        report["summary"]["fail"].as_u64().unwrap() as usize,
        count("fail")
    );
    let expected_status = if count("fail") > 0 {
        2
    } else if count("warn") > 0 {
        1
    } else {
        0
    };
    assert_eq!(run.status, Some(expected_status), "{run:#?}");
    let rank = |c: &serde_json::Value| match c["verdict"].as_str().unwrap() {
        "fail" => 0,
        "warn" => 1,
        _ => 2,
    };
    assert!(
        checks.windows(2).all(|w| rank(&w[0]) <= rank(&w[1])),
        "{report}"
    );
    for c in checks.iter().filter(|c| c["verdict"] != "pass") {
        assert!(!c["remedy"].as_str().unwrap().is_empty(), "no remedy: {c}");
    }

    // Something listening on an IM port is a failure naming the process.
    let squatter = std::net::TcpListener::bind((host.address(), 8902)).unwrap();
    let (_, report) = preflight(&controller, &[&address, "-a", &address, "-A", &address]);
    let port = check(&report, "port.8902");
    assert_eq!(port["verdict"], "fail", "{port}");
    assert!(
        port["observed"].as_str().unwrap().contains("preflight"),
        "{port}"
    );
    drop(squatter);

    let human = controller.run(&["preflight", &address, "-a", &address, "-A", &address]);
    assert!(human.stdout.contains("Preflight of"), "{human:#?}");
}

#[test]
fn a_missing_storage_directory_fails_with_the_fix() {
    let (host, controller) = bootstrapped_host();
    let address = host.address().to_string();
    let missing = "/srv/imfleet-test-does-not-exist";
    let (run, report) = preflight(
        &controller,
        &[&address, "-a", &address, "-A", &address, "-f", missing],
    );
    assert_eq!(run.status, Some(2), "{run:#?}");
    let dir = check(&report, "storage.dir");
    assert_eq!(dir["verdict"], "fail");
    assert!(
        dir["remedy"]
            .as_str()
            .unwrap()
            .contains(&format!("mkdir -p {missing}")),
        "{dir}"
    );

    // An existing directory passes that check (owner aside).
    let existing = tempfile::tempdir().unwrap();
    let path = existing.path().to_str().unwrap();
    let (_, report) = preflight(
        &controller,
        &[&address, "-a", &address, "-A", &address, "-f", path],
    );
    assert_ne!(check(&report, "storage.dir")["verdict"], "fail");
}

#[test]
fn bad_input_is_refused_before_the_host_is_asked() {
    let (host, controller) = bootstrapped_host();
    let address = host.address().to_string();
    let bad_ip = controller.run(&["preflight", &address, "-a", "10.0.0.300", "-A", &address]);
    assert_eq!(bad_ip.status, Some(2));
    assert!(
        bad_ip.stderr.contains("invalid value '10.0.0.300'"),
        "{}",
        bad_ip.stderr
    );

    let relative = controller.run(&[
        "preflight",
        &address,
        "-a",
        &address,
        "-A",
        &address,
        "-f",
        "data/im",
    ]);
    assert_eq!(relative.status, Some(1));
    assert!(
        relative.stderr.contains("must be an absolute path"),
        "{}",
        relative.stderr
    );

    let users = controller.run(&[
        "preflight",
        &address,
        "-a",
        &address,
        "-A",
        &address,
        "--users",
        "1234",
    ]);
    assert_eq!(users.status, Some(2));
    assert!(
        users.stderr.contains("5000, 20000, 50000"),
        "{}",
        users.stderr
    );

    let unknown = controller.run(&["preflight", "im-nowhere", "-a", &address, "-A", &address]);
    assert_eq!(unknown.status, Some(1));
    assert!(
        unknown.stderr.contains("has not been bootstrapped"),
        "{}",
        unknown.stderr
    );
}
