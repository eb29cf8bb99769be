//! A test IM host that boots systemd as PID 1, as every real one does: a
//! Debian 12 tree (`scripts/systemd-rootfs`, built once and kept in
//! [`ROOT_TREE`]) booted with `systemd-nspawn` read-only under a private
//! writable layer of its own (kept across a reboot), in the network
//! namespace of its own Docker Engine ([`Engine`]), which it reaches at
//! `/var/run/docker.sock`. Root logs in over SSH with a key of the test's.
//! There bootstrap installs `imfleet-agent.service`, systemd restarts the
//! agent, and its log goes to journald.
//!
//! The IM's data path is one directory bound at the same path inside the
//! host and outside, because the Engine (outside the host's mount
//! namespace, as `dockerd` is a sibling here, not a child of the host's
//! systemd) resolves bind mounts on this machine's filesystem.
//!
//! What it cannot show: the Engine is not the host's own systemd unit, so a
//! reboot restarts it by hand ([`SystemdHost::reboot`] does, as the host's
//! boot would); the kernel, cgroups and disk are this machine's.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::engine::Engine;

/// Where the root tree is kept between runs.
pub const ROOT_TREE: &str = "/var/cache/imfleet-tests/rootfs-bookworm-systemd-1";

pub struct SystemdHost {
    name: String,
    dir: tempfile::TempDir,
    /// Bound at the same path inside: the IM's data lives here.
    shared: PathBuf,
    nspawn: Option<Child>,
    init: Option<i32>,
    /// Dropped last: the namespace outlives the host in it.
    engine: Engine,
}

fn must(out: Output, what: &str) -> Output {
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Builds the root tree once per machine (under a lock: tests start
/// together); `scripts/test` builds it before the tests run.
pub fn ensure_root_tree() -> PathBuf {
    let tree = PathBuf::from(ROOT_TREE);
    if tree.join("sbin/init").exists() {
        return tree;
    }
    let lock = File::create(std::env::temp_dir().join("imfleet-test-rootfs.lock")).unwrap();
    lock.lock().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/systemd-rootfs");
    let out = Command::new(&script)
        .arg(&tree)
        .stdin(Stdio::null())
        .output()
        .expect("scripts/systemd-rootfs");
    must(out, "building the systemd root tree");
    tree
}

impl SystemdHost {
    /// Boots a host whose Engine holds `images`, and waits until its sshd
    /// answers.
    pub fn boot(images: &[&str]) -> SystemdHost {
        let tree = ensure_root_tree();
        let engine = Engine::start(images);
        let dir = tempfile::Builder::new()
            .prefix("imfleet-sysd-")
            .tempdir()
            .unwrap();
        let name = format!("imhost{}", engine.address().octets()[2]);
        let shared = Path::new("/var/lib/imfleet-test").join(&name);
        let _ = std::fs::remove_dir_all(&shared); // a killed run's
        std::fs::create_dir_all(&shared).unwrap();
        let keys = dir.path().join("keys");
        std::fs::create_dir(&keys).unwrap();
        crate::host::keygen(&dir.path().join("client_key"));
        std::fs::copy(
            dir.path().join("client_key.pub"),
            keys.join("authorized_keys"),
        )
        .unwrap();
        std::fs::set_permissions(
            keys.join("authorized_keys"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        std::fs::create_dir(dir.path().join("upper")).unwrap();
        std::fs::write(
            dir.path().join("ssh_config"),
            format!(
                "Host *\n  UserKnownHostsFile {known}\n  GlobalKnownHostsFile /dev/null\n  IdentityFile {key}\n  IdentitiesOnly yes\n  LogLevel ERROR\n",
                known = dir.path().join("known_hosts").display(),
                key = dir.path().join("client_key").display()
            ),
        )
        .unwrap();
        let mut host = SystemdHost {
            name,
            dir,
            shared,
            nspawn: None,
            init: None,
            engine,
        };
        host.start(&tree);
        host
    }

    fn start(&mut self, tree: &Path) {
        let d = self.dir.path();
        let log = File::create(d.join("console.log")).unwrap();
        let child = Command::new("systemd-nspawn")
            .args(["--register=no", "--keep-unit", "--quiet", "--boot"])
            .arg("--directory")
            .arg(tree)
            // Read-only tree, this host's writes in its own layer.
            .arg(format!(
                "--overlay={}:{}:/",
                tree.display(),
                d.join("upper").display()
            ))
            .args(["--machine", &self.name, "--hostname", &self.name])
            .arg(format!(
                "--network-namespace-path=/run/netns/{}",
                self.engine.netns()
            ))
            .arg(format!(
                "--bind={}:/var/run/docker.sock",
                self.engine.socket().display()
            ))
            .arg(format!("--bind={0}:{0}", self.shared.display()))
            .arg(format!("--bind-ro={}:/root/.ssh", d.join("keys").display()))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("systemd-nspawn (scripts/setup installs systemd-container)");
        let nspawn = child.id() as i32;
        self.nspawn = Some(child);
        self.init = None;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            // The host's init is nspawn's child running systemd (nspawn
            // forks a helper first that goes away).
            if self.init.is_none() {
                self.init = host_init(nspawn);
            }
            let ssh = SocketAddr::from((self.address(), 22));
            if self.init.is_some()
                && TcpStream::connect_timeout(&ssh, Duration::from_millis(200)).is_ok()
            {
                return;
            }
            if let Some(status) = self.nspawn.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "the host exited while booting ({status}): {}",
                    self.console()
                );
            }
            assert!(
                Instant::now() < deadline,
                "the host did not boot: {}",
                self.console()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The host's init (systemd) as this machine numbers it: a new one
    /// after each boot.
    pub fn init_pid(&self) -> i32 {
        self.init.expect("the host is up")
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn address(&self) -> Ipv4Addr {
        self.engine.address()
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// A directory for the IM's data, the same path inside and outside.
    pub fn data_path(&self) -> PathBuf {
        self.shared.join("portsip")
    }

    /// Controller arguments that reach the host over SSH as root.
    pub fn ssh_args(&self) -> Vec<String> {
        vec![
            "-F".into(),
            self.dir.path().join("ssh_config").display().to_string(),
            "--ssh-user".into(),
            "root".into(),
        ]
    }

    /// What nspawn and the host's systemd printed on its console.
    pub fn console(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("console.log")).unwrap_or_default()
    }

    /// Runs a program inside the host (all its namespaces: its own files,
    /// processes and systemd).
    pub fn exec(&self, args: &[&str]) -> Output {
        let init = self.init.expect("the host is up").to_string();
        Command::new("nsenter")
            .args(["-t", &init, "-m", "-u", "-i", "-n", "-p", "--"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("nsenter")
    }

    /// [`Self::exec`]'s standard output, trimmed; panics when it fails.
    pub fn exec_ok(&self, args: &[&str]) -> String {
        let out = must(self.exec(args), &format!("{args:?} on {}", self.name));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// A property of a unit (`systemctl show -p NAME --value`).
    pub fn unit_property(&self, unit: &str, property: &str) -> String {
        self.exec_ok(&["systemctl", "show", unit, "-p", property, "--value"])
    }

    /// A unit's journal, messages only.
    pub fn journal(&self, unit: &str) -> String {
        self.exec_ok(&["journalctl", "-u", unit, "-o", "cat", "--no-pager"])
    }

    /// Reboots the host: its systemd shuts down, its Engine stops and starts
    /// again (as the host's boot would start it), the host boots from the
    /// same writable layer. Waits until sshd answers again.
    pub fn reboot(&mut self) {
        let _ = self.exec(&["systemctl", "reboot"]);
        let mut nspawn = self.nspawn.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while nspawn.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "the host did not go down");
            std::thread::sleep(Duration::from_millis(50));
        }
        self.engine.restart();
        self.start(&PathBuf::from(ROOT_TREE));
    }

    /// Powers the host off through its own systemd; kills it if it does
    /// not go.
    fn power_off(&mut self) {
        let Some(mut nspawn) = self.nspawn.take() else {
            return;
        };
        if self.init.is_some() {
            let _ = self.exec(&["systemctl", "poweroff"]);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while nspawn.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        // Still up: SIGKILL to the host's init ends its whole PID namespace
        // (only while nspawn runs is the pid surely still that init's).
        if let Some(init) = self.init.take()
            && nspawn.try_wait().ok().flatten().is_none()
        {
            let init = nix::unistd::Pid::from_raw(init);
            let _ = nix::sys::signal::kill(init, nix::sys::signal::Signal::SIGKILL);
        }
        let _ = nspawn.kill();
        let _ = nspawn.wait();
    }
}

impl Drop for SystemdHost {
    fn drop(&mut self) {
        self.power_off();
        let _ = std::fs::remove_dir_all(&self.shared);
    }
}

/// The child of `nspawn` that runs systemd: the host's PID 1.
fn host_init(nspawn: i32) -> Option<i32> {
    let children =
        std::fs::read_to_string(format!("/proc/{nspawn}/task/{nspawn}/children")).ok()?;
    children
        .split_whitespace()
        .filter_map(|pid| pid.parse::<i32>().ok())
        .find(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "systemd")
        })
}

/// The `Overall exposure level` `systemd-analyze security` gives a unit.
pub fn exposure(analysis: &str) -> Option<f64> {
    analysis
        .lines()
        .find_map(|l| l.split_once("Overall exposure level for"))
        .and_then(|(_, rest)| rest.split_once(':'))
        .and_then(|(_, score)| score.split_whitespace().next()?.parse().ok())
}
