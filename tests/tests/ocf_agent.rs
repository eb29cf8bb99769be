//! The OCF resource agent `controller ha agent` ships, run the way
//! pacemaker-execd runs it, against the real `controller serve`: it passes
//! `ocf-tester` (resource-agents' conformance checks), refuses a state
//! directory that is not there, and stops a running daemon whatever its
//! configuration or installation has become since.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use imfleet_tests::Controller;

struct Agent {
    dir: tempfile::TempDir,
    script: std::path::PathBuf,
    binary: std::path::PathBuf,
}

impl Agent {
    /// The agent as `controller ha agent` prints it, and a controller
    /// binary of its own (so that one can be removed).
    fn new() -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let printed = Command::new(imfleet_tests::bin("controller"))
            .args(["ha", "agent"])
            .output()
            .unwrap();
        assert!(printed.status.success());
        let script = dir.path().join("controller.ocf");
        std::fs::write(&script, &printed.stdout).unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let binary = dir.path().join("controller");
        std::fs::copy(imfleet_tests::bin("controller"), &binary).unwrap();
        Agent {
            dir,
            script,
            binary,
        }
    }

    /// One action as pacemaker-execd runs it: its exit code and output.
    fn run(&self, action: &str, params: &[(&str, String)]) -> (i32, String) {
        let mut cmd = Command::new(&self.script);
        cmd.arg(action)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("OCF_ROOT", "/usr/lib/ocf")
            .env("OCF_RESOURCE_INSTANCE", "imfleet-controller")
            .env("HA_RSCTMP", self.dir.path())
            .env("OCF_RESKEY_CRM_meta_timeout", "20000");
        for (name, value) in params {
            cmd.env(format!("OCF_RESKEY_{name}"), value);
        }
        let out = cmd.output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code().unwrap_or(-1), text)
    }
}

/// The resource's parameters, as the CIB would hold them.
fn params(agent: &Agent, state: &str, metrics: &str) -> Vec<(&'static str, String)> {
    vec![
        ("binary", agent.binary.display().to_string()),
        ("state_dir", state.to_owned()),
        ("metrics_listen", metrics.to_owned()),
        ("logfile", agent.log().display().to_string()),
    ]
}

impl Agent {
    /// Only read when something fails.
    fn log(&self) -> std::path::PathBuf {
        self.dir.path().join("log/controller.log")
    }
}

#[test]
fn the_agent_passes_ocf_tester_against_the_real_daemon() {
    let agent = Agent::new();
    let controller = Controller::new();
    let state = controller.state.path().display().to_string();
    let metrics = imfleet_tests::daemon::free_port().to_string();
    let mut cmd = Command::new("ocf-tester");
    cmd.args(["-n", "imfleet-controller"]);
    for (name, value) in params(&agent, &state, &metrics) {
        cmd.args(["-o", &format!("{name}={value}")]);
    }
    let out = cmd.arg(&agent.script).output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.contains("passed all tests"),
        "{said}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(agent.log()).unwrap_or_default()
    );
}

#[test]
fn start_refuses_missing_state_and_stop_ends_the_daemon_whatever_became_of_its_configuration() {
    let agent = Agent::new();
    let metrics = imfleet_tests::daemon::free_port().to_string();

    // No state there (the replicated filesystem not mounted): a soft error
    // naming why, and nothing runs.
    let absent = agent.dir.path().join("not-mounted").display().to_string();
    let (code, said) = agent.run("start", &params(&agent, &absent, &metrics));
    assert_eq!(code, 1, "{said}");
    assert!(
        said.contains("is the replicated filesystem mounted"),
        "{said}"
    );
    let (code, _) = agent.run("monitor", &params(&agent, &absent, &metrics));
    assert_eq!(code, 7);

    let controller = Controller::new();
    let state = controller.state.path().display().to_string();
    let (code, said) = agent.run("start", &params(&agent, &state, &metrics));
    assert_eq!(code, 0, "{said}");
    let (code, _) = agent.run("monitor", &params(&agent, &state, &metrics));
    assert_eq!(code, 0);
    let pid: i32 = std::fs::read_to_string(agent.dir.path().join("imfleet-controller.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();

    // A nonsense stop_grace is a configuration error for every action but
    // stop, which must still stop.
    let mut bad = params(&agent, &state, &metrics);
    bad.push(("stop_grace", "abc".into()));
    let (code, said) = agent.run("validate-all", &bad);
    assert_eq!(code, 6, "{said}");

    // The binary removed under the running daemon (an uninstall, a
    // package that renames): stop still ends it.
    std::fs::remove_file(&agent.binary).unwrap();
    let (code, said) = agent.run("stop", &bad);
    assert_eq!(code, 0, "{said}");
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.contains(") Z ")),
        "the daemon still runs after stop"
    );
    let mut probe = params(&agent, &state, &metrics);
    probe.push(("CRM_meta_interval", "0".into()));
    let (code, _) = agent.run("monitor", &probe);
    assert_eq!(code, 7, "a probe without the binary finds nothing running");
}
