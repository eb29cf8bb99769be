//! Test support: throwaway "hosts" made of a real OpenSSH server on a unique
//! loopback address, running in a private mount namespace so each host has its
//! own `/opt/imfleet`, plus helpers to run the real `controller` binary.
//!
//! Needs root (sshd, useradd, mount namespaces) and openssh-server + sudo
//! installed; `scripts/test` sets that up.
#![forbid(unsafe_code)]

pub mod cluster;
pub mod daemon;
pub mod deploy;
pub mod engine;
pub mod fake_pbx;
pub mod fleet;
pub mod host;
pub mod inproc;
pub mod pki;
pub mod sim_agents;
pub mod systemd_host;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub use host::{SshUser, TestHost};

/// What the fleet fixtures need of a test IM host, whichever kind it is (a
/// [`TestHost`] or a [`systemd_host::SystemdHost`]).
pub trait ImHost {
    fn address(&self) -> std::net::Ipv4Addr;
    /// Bootstrap arguments that reach the host as root and place its agent.
    fn bootstrap_args(&self) -> Vec<String>;
    /// Where its IM data may live.
    fn data_path(&self) -> PathBuf;
    /// Its own Docker Engine, when it has one.
    fn engine(&self) -> Option<&engine::Engine>;
    /// What its agent logged, for a failure message.
    fn agent_log(&self) -> String;
}

impl ImHost for TestHost {
    fn address(&self) -> std::net::Ipv4Addr {
        TestHost::address(self)
    }
    fn bootstrap_args(&self) -> Vec<String> {
        let mut args = self.ssh_args(SshUser::Root);
        args.extend(self.agent_args());
        args
    }
    fn data_path(&self) -> PathBuf {
        self.dir().join("portsip")
    }
    fn engine(&self) -> Option<&engine::Engine> {
        TestHost::engine(self)
    }
    fn agent_log(&self) -> String {
        TestHost::agent_log(self)
    }
}

impl ImHost for systemd_host::SystemdHost {
    fn address(&self) -> std::net::Ipv4Addr {
        systemd_host::SystemdHost::address(self)
    }
    fn bootstrap_args(&self) -> Vec<String> {
        self.ssh_args()
    }
    fn data_path(&self) -> PathBuf {
        systemd_host::SystemdHost::data_path(self)
    }
    fn engine(&self) -> Option<&engine::Engine> {
        Some(systemd_host::SystemdHost::engine(self))
    }
    fn agent_log(&self) -> String {
        self.journal("imfleet-agent.service")
    }
}

/// Directory holding the built `controller` and `agent` binaries.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("IMFLEET_BIN_DIR") {
        return PathBuf::from(dir);
    }
    // Tests live in target/<profile>/deps/, the demo in target/<profile>/.
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("executable has a directory");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().expect("target/<profile>").to_owned()
    } else {
        dir.to_owned()
    }
}

/// Path of a workspace binary; panics with the fix when it was not built.
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the binaries first (`cargo build --workspace --bins`), or set IMFLEET_BIN_DIR",
        path.display()
    );
    path
}

/// The result of one `controller` run.
#[derive(Debug)]
pub struct Run {
    pub status: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Run {
    pub fn success(&self) -> bool {
        self.status == Some(0)
    }

    /// Stdout parsed as JSON, whatever the exit status (a command that
    /// failed for some hosts still prints every host's result).
    pub fn json_any(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:#?}"))
    }

    /// Asserts success and returns stdout parsed as JSON.
    pub fn json(&self) -> serde_json::Value {
        assert!(self.success(), "command failed: {self:#?}");
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", self.stdout))
    }
}

/// Runs `cmd` to completion, killing it if it outlives `limit` (then
/// `status` is `None`), so a hang fails the test instead of stalling CI.
pub fn run_with_limit(mut cmd: Command, limit: Duration) -> Run {
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let stdout = child.stdout.take().expect("stdout");
    let stderr = child.stderr.take().expect("stderr");
    let out_reader = std::thread::spawn(move || read_all(stdout));
    let err_reader = std::thread::spawn(move || read_all(stderr));
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status.code();
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Run {
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
        elapsed: started.elapsed(),
    }
}

/// Resident memory of a process, in bytes.
pub fn rss(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        * 1024
}

fn read_all(mut r: impl std::io::Read) -> String {
    let mut s = String::new();
    let _ = r.read_to_string(&mut s);
    s
}

/// A controller with its own throwaway state directory.
pub struct Controller {
    pub state: tempfile::TempDir,
}

impl Default for Controller {
    fn default() -> Self {
        Self::new()
    }
}

impl Controller {
    /// A controller whose state is initialised (as `controller init` does;
    /// no other command creates state).
    pub fn new() -> Self {
        let controller = Controller::uninitialised();
        imfleet_controller::state::ControllerState::open_or_init(controller.state.path())
            .expect("controller init");
        controller
    }

    /// A controller whose state directory is empty.
    pub fn uninitialised() -> Self {
        Controller {
            state: tempfile::tempdir().expect("tempdir"),
        }
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(bin("controller"));
        cmd.arg("--state-dir")
            .arg(self.state.path())
            .args(args)
            .env("IMFLEET_AGENT_BINARY", bin("agent"))
            .env_remove("IMFLEET_STATE_DIR");
        cmd
    }

    /// Runs the controller with a generous hard limit.
    pub fn run(&self, args: &[&str]) -> Run {
        run_with_limit(self.command(args), Duration::from_secs(120))
    }

    /// Bootstraps `host` as `user`; the test host's ssh_config is used.
    pub fn bootstrap(&self, host: &TestHost, user: SshUser, extra: &[&str]) -> Run {
        self.bootstrap_with(host, host.ssh_args(user), extra)
    }

    /// Bootstraps `host` with explicit SSH arguments.
    pub fn bootstrap_with(&self, host: &TestHost, ssh_args: Vec<String>, extra: &[&str]) -> Run {
        let mut args = ssh_args;
        args.extend(host.agent_args());
        self.bootstrap_at(&host.address().to_string(), args, extra)
    }

    /// Bootstraps any kind of host as root.
    pub fn bootstrap_root(&self, host: &impl ImHost, extra: &[&str]) -> Run {
        self.bootstrap_at(&host.address().to_string(), host.bootstrap_args(), extra)
    }

    fn bootstrap_at(&self, address: &str, host_args: Vec<String>, extra: &[&str]) -> Run {
        let mut args = vec!["bootstrap".to_owned()];
        args.extend(host_args);
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push(address.to_owned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.run(&args)
    }
}

/// Serialises tests that use the IM's fixed host ports (5432, 8887, 8902):
/// every test host shares one network stack, as real IM hosts do not.
pub fn im_ports_lock() -> std::fs::File {
    let file = std::fs::File::create(std::env::temp_dir().join("imfleet-test-im-ports.lock"))
        .expect("lock file");
    file.lock().expect("lock");
    file
}

/// Starts a host and bootstraps it as root; the usual start of a test.
pub fn bootstrapped_host() -> (TestHost, Controller) {
    bootstrapped_host_with(&[])
}

/// [`bootstrapped_host`] with extra bootstrap arguments.
pub fn bootstrapped_host_with(extra: &[&str]) -> (TestHost, Controller) {
    let host = TestHost::start();
    let controller = Controller::new();
    let run = controller.bootstrap(&host, SshUser::Root, extra);
    assert!(
        run.success(),
        "bootstrap failed: {run:#?}\nagent log:\n{}",
        host.agent_log()
    );
    (host, controller)
}

/// The PortSIP container names (global on the one Docker Engine tests share).
pub const IM_CONTAINERS: [&str; 4] = [
    "portsip.database",
    "portsip.initdt",
    "portsip.instantmessage",
    "portsip.webserver",
];

/// Holds the IM ports and Docker names for a test; removes every IM container
/// (and leftovers of earlier runs) when taken and when dropped.
pub struct ImSlot {
    _lock: std::fs::File,
}

impl ImSlot {
    pub fn take() -> ImSlot {
        let slot = ImSlot {
            _lock: im_ports_lock(),
        };
        remove_im_containers();
        slot
    }
}

impl Drop for ImSlot {
    fn drop(&mut self) {
        remove_im_containers();
    }
}

fn remove_im_containers() {
    let mut names: Vec<String> = IM_CONTAINERS.iter().map(|s| s.to_string()).collect();
    names.extend(IM_CONTAINERS.iter().map(|s| format!("{s}.previous")));
    let _ = Command::new("docker")
        .args(["rm", "-f"])
        .args(&names)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Names of existing containers among the IM ones (docker CLI: test tooling).
pub fn existing_im_containers() -> Vec<String> {
    let out = Command::new("docker")
        .args(["ps", "-a", "--format", "{{.Names}} {{.State}}"])
        .output()
        .expect("docker ps");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("portsip."))
        .map(str::to_owned)
        .collect()
}
