//! A throwaway SSH host: `sshd -D` on its own loopback address, in a private
//! mount namespace where `/opt/imfleet` is a directory of the test's own.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

/// Port every test host's sshd listens on (on its own address).
pub const SSH_PORT: u16 = 2222;
/// Port test agents listen on (not 7443, so a real agent on the machine
/// cannot collide with tests).
pub const AGENT_PORT: u16 = 17443;

/// Who logs in over SSH.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SshUser {
    Root,
    /// A user with passwordless sudo (like PortSIP's `pbx` user).
    Sudoer,
    /// A user whose sudo asks for a password.
    PasswordSudoer,
}

impl SshUser {
    pub fn name(self) -> &'static str {
        match self {
            SshUser::Root => "root",
            SshUser::Sudoer => "imfleet-sudoer",
            SshUser::PasswordSudoer => "imfleet-pwsudo",
        }
    }
}

pub struct TestHost {
    address: Ipv4Addr,
    dir: tempfile::TempDir,
    sshd: Option<Child>,
    _address_lock: File,
    /// A network namespace and Docker Engine of its own (dropped last).
    engine: Option<crate::engine::Engine>,
}

impl TestHost {
    /// Starts a host and waits until its sshd accepts connections.
    pub fn start() -> TestHost {
        ensure_test_users();
        let (address, lock) = allocate_address();
        TestHost::launch(address, lock, None)
    }

    /// A host in a network namespace of its own with its own Docker Engine
    /// (holding `images`): sshd, the agent and the IM's containers all live
    /// there, so several such hosts run the IM side by side.
    pub fn start_isolated(images: &[&str]) -> TestHost {
        ensure_test_users();
        let engine = crate::engine::Engine::start(images);
        TestHost::launch(engine.address(), engine.lock(), Some(engine))
    }

    fn launch(address: Ipv4Addr, lock: File, engine: Option<crate::engine::Engine>) -> TestHost {
        let dir = tempfile::Builder::new()
            .prefix("imfleet-host-")
            .tempdir()
            .expect("tempdir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut host = TestHost {
            address,
            dir,
            sshd: None,
            _address_lock: lock,
            engine,
        };
        host.prepare_files();
        host.spawn_sshd();
        host
    }

    /// The host's own engine, for an isolated host.
    pub fn engine(&self) -> Option<&crate::engine::Engine> {
        self.engine.as_ref()
    }

    pub fn address(&self) -> Ipv4Addr {
        self.address
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// What the host sees as `/opt/imfleet`.
    pub fn opt_imfleet(&self) -> PathBuf {
        self.dir().join("opt-imfleet")
    }

    pub fn ssh_config(&self) -> PathBuf {
        self.dir().join("ssh_config")
    }

    pub fn known_hosts(&self) -> PathBuf {
        self.dir().join("known_hosts")
    }

    /// The key the host trusts for every test user.
    pub fn client_key(&self) -> PathBuf {
        self.dir().join("client_key")
    }

    /// A key the host does not trust.
    pub fn stranger_key(&self) -> PathBuf {
        self.dir().join("stranger_key")
    }

    pub fn host_public_key(&self) -> String {
        std::fs::read_to_string(self.dir().join("ssh_host_ed25519_key.pub")).unwrap()
    }

    /// Controller arguments that point SSH at this host.
    pub fn ssh_args(&self, user: SshUser) -> Vec<String> {
        vec![
            "-F".into(),
            self.ssh_config().display().to_string(),
            "--ssh-port".into(),
            SSH_PORT.to_string(),
            "--ssh-user".into(),
            user.name().into(),
        ]
    }

    /// Like [`Self::ssh_args`] but logging in with `key` only (the test
    /// ssh_config names no key in this variant).
    pub fn ssh_args_with_key(&self, user: SshUser, key: &Path) -> Vec<String> {
        let config = self.dir().join("ssh_config_nokey");
        let text = std::fs::read_to_string(self.ssh_config()).unwrap();
        let text: String = text
            .lines()
            .filter(|l| !l.trim_start().starts_with("IdentityFile"))
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(&config, text).unwrap();
        vec![
            "-F".into(),
            config.display().to_string(),
            "-i".into(),
            key.display().to_string(),
            "--ssh-port".into(),
            SSH_PORT.to_string(),
            "--ssh-user".into(),
            user.name().into(),
        ]
    }

    /// Stops sshd: the host no longer answers on its SSH port.
    pub fn kill_sshd(&mut self) {
        if let Some(mut child) = self.sshd.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Controller arguments that make the agent listen on this host's address.
    pub fn agent_args(&self) -> Vec<String> {
        vec![
            "--agent-port".into(),
            AGENT_PORT.to_string(),
            "--agent-bind".into(),
            self.address.to_string(),
        ]
    }

    fn prepare_files(&self) {
        let d = self.dir();
        keygen(&d.join("ssh_host_ed25519_key"));
        keygen(&self.client_key());
        keygen(&self.stranger_key());
        let keys = d.join("authorized_keys");
        std::fs::create_dir(&keys).unwrap();
        std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o755)).unwrap();
        let public = std::fs::read_to_string(d.join("client_key.pub")).unwrap();
        for user in [SshUser::Root, SshUser::Sudoer, SshUser::PasswordSudoer] {
            let path = keys.join(user.name());
            std::fs::write(&path, &public).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        std::fs::create_dir(self.opt_imfleet()).unwrap();
        std::fs::write(
            d.join("sshd_config"),
            format!(
                "ListenAddress {addr}:{SSH_PORT}\n\
                 HostKey {dir}/ssh_host_ed25519_key\n\
                 PidFile none\n\
                 AuthorizedKeysFile {dir}/authorized_keys/%u\n\
                 StrictModes no\n\
                 PubkeyAuthentication yes\n\
                 PasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\n\
                 PermitRootLogin prohibit-password\n\
                 UsePAM no\n\
                 MaxStartups 50\n\
                 LogLevel VERBOSE\n",
                addr = self.address,
                dir = d.display()
            ),
        )
        .unwrap();
        std::fs::write(
            self.ssh_config(),
            format!(
                "Host *\n  UserKnownHostsFile {known}\n  GlobalKnownHostsFile /dev/null\n  IdentityFile {key}\n  IdentitiesOnly yes\n  LogLevel ERROR\n",
                known = self.known_hosts().display(),
                key = self.client_key().display()
            ),
        )
        .unwrap();
    }

    fn spawn_sshd(&mut self) {
        std::fs::create_dir_all("/run/sshd").unwrap();
        std::fs::create_dir_all("/opt/imfleet").unwrap();
        let d = self.dir();
        let log = File::create(d.join("sshd.log")).unwrap();
        // A private mount namespace: inside it /opt/imfleet is this host's own
        // directory, for sshd and everything it starts (bootstrap, the agent).
        // An isolated host's programs see its own engine at the usual socket.
        let engine_socket = match &self.engine {
            Some(engine) => format!(
                "mount --bind '{}' /var/run/docker.sock && ",
                engine.socket().display()
            ),
            None => String::new(),
        };
        let script = format!(
            "mount --bind '{opt}' /opt/imfleet && {engine_socket}exec /usr/sbin/sshd -D -e -f '{cfg}'",
            opt = self.opt_imfleet().display(),
            cfg = d.join("sshd_config").display()
        );
        let enter = self.engine.as_ref().map(|e| e.enter()).unwrap_or_default();
        let (program, before): (&str, &[String]) = match enter.split_first() {
            Some((program, rest)) => (program, rest),
            None => ("unshare", &[]),
        };
        let unshare: &[&str] = if enter.is_empty() { &[] } else { &["unshare"] };
        let child = Command::new(program)
            .args(before)
            .args(unshare)
            .args([
                "--mount",
                "--propagation",
                "private",
                "--",
                "sh",
                "-c",
                &script,
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start sshd (is openssh-server installed?)");
        self.sshd = Some(child);
        let addr = SocketAddr::from((self.address, SSH_PORT));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return;
            }
            if let Some(status) = self.sshd.as_mut().unwrap().try_wait().unwrap() {
                panic!("sshd exited ({status}): {}", self.sshd_log());
            }
            assert!(
                Instant::now() < deadline,
                "sshd did not start: {}",
                self.sshd_log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn sshd_log(&self) -> String {
        std::fs::read_to_string(self.dir().join("sshd.log")).unwrap_or_default()
    }

    /// The agent's log on this host (when it runs under its own supervisor).
    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(self.opt_imfleet().join("log/agent.log")).unwrap_or_default()
    }

    /// Kills the serving agent (the supervisor's child) with SIGKILL, as a
    /// crash would; returns its pid. The supervisor starts a new one.
    pub fn kill_serving_agent(&self) -> i32 {
        let serving = self.serving_agent_pid();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(serving),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        serving
    }

    /// Pid of the serving agent: the supervisor's child.
    pub fn serving_agent_pid(&self) -> i32 {
        let supervisor = self.supervisor_pid().expect("supervisor running");
        let children =
            std::fs::read_to_string(format!("/proc/{supervisor}/task/{supervisor}/children"))
                .unwrap();
        children.split_whitespace().next().unwrap().parse().unwrap()
    }

    /// Pid of the agent supervisor running on this host, if any.
    pub fn supervisor_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.opt_imfleet().join("run/supervisor.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Stops the agent (as a host shutdown would).
    pub fn stop_agent(&self) {
        if let Some(pid) = self.supervisor_pid() {
            let pid = nix::unistd::Pid::from_raw(pid);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(15);
            while nix::sys::signal::kill(pid, None).is_ok() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        self.stop_agent();
        if let Some(mut child) = self.sshd.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub(crate) fn keygen(path: &Path) {
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "imfleet-test", "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .status()
        .expect("ssh-keygen (is openssh-client installed?)");
    assert!(status.success(), "ssh-keygen failed");
}

/// Picks a free 127.77.x.y address, held by an exclusive lock file for as
/// long as the host lives, so parallel test processes never share one.
fn allocate_address() -> (Ipv4Addr, File) {
    let dir = std::env::temp_dir().join("imfleet-test-addresses");
    std::fs::create_dir_all(&dir).unwrap();
    for n in 2u32..(250 * 250) {
        let address = Ipv4Addr::new(127, 77, (n / 250) as u8, (n % 250) as u8 + 1);
        let file = File::create(dir.join(address.to_string())).unwrap();
        if file.try_lock().is_ok() {
            return (address, file);
        }
    }
    panic!("no free test address left");
}

/// Creates the test users once per machine: a passwordless sudoer and a user
/// whose sudo wants a password. Accounts get password `*` (no password, but
/// not locked), so sshd lets them in with a key.
pub fn ensure_test_users() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let lock = File::create(std::env::temp_dir().join("imfleet-test-users.lock")).unwrap();
        lock.lock().unwrap();
        for user in [SshUser::Sudoer, SshUser::PasswordSudoer] {
            let exists = Command::new("id")
                .arg(user.name())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .unwrap()
                .success();
            if !exists {
                let ok = Command::new("useradd")
                    .args([
                        "--create-home",
                        "--shell",
                        "/bin/sh",
                        "--password",
                        "*",
                        user.name(),
                    ])
                    .status()
                    .expect("useradd")
                    .success();
                assert!(ok, "useradd {} failed", user.name());
            }
        }
        let sudoers = Path::new("/etc/sudoers.d/imfleet-tests");
        if !sudoers.exists() {
            std::fs::write(
                sudoers,
                "imfleet-sudoer ALL=(ALL) NOPASSWD: ALL\nimfleet-pwsudo ALL=(ALL) ALL\n",
            )
            .unwrap();
            std::fs::set_permissions(sudoers, std::fs::Permissions::from_mode(0o440)).unwrap();
        }
        assert!(
            Path::new("/usr/bin/sudo").exists(),
            "sudo is not installed: run scripts/test (it installs what the tests need)"
        );
    });
}
