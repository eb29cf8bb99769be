//! A Docker Engine of a test host's own, in a network namespace of its own,
//! so several IM hosts run side by side with the IM's fixed ports and
//! container names, as separate machines do. The namespace reaches the
//! test process over a veth pair (`10.231.K.1` outside, `10.231.K.2`
//! inside); host-network containers live in it.
//!
//! What it cannot show: the engines share the machine's kernel, cgroups and
//! disk, so resource contention and a host's whole-machine failure are not
//! isolated; the image store is per engine (images are loaded from the
//! system engine when the host starts).

use std::fs::File;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub struct Engine {
    index: u8,
    dir: tempfile::TempDir,
    dockerd: Option<Child>,
    lock: File,
}

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"))
}

fn must(program: &str, args: &[&str]) {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A free namespace index, held by a lock file while the engine lives.
fn allocate() -> (u8, File) {
    let dir = std::env::temp_dir().join("imfleet-test-netns");
    std::fs::create_dir_all(&dir).unwrap();
    for k in 1u8..=250 {
        let file = File::create(dir.join(k.to_string())).unwrap();
        if file.try_lock().is_ok() {
            return (k, file);
        }
    }
    panic!("no free test network namespace left");
}

impl Engine {
    /// Creates the namespace, starts the engine in it and loads `images`
    /// from the system engine.
    pub fn start(images: &[&str]) -> Engine {
        assert!(
            Path::new("/var/run/docker.sock").exists(),
            "the system Docker Engine's socket is missing: the isolated engines need it as a mount point"
        );
        let (index, lock) = allocate();
        let dir = tempfile::Builder::new()
            .prefix("imfleet-engine-")
            .tempdir()
            .unwrap();
        let mut engine = Engine {
            index,
            dir,
            dockerd: None,
            lock,
        };
        engine.remove_network(); // leftovers of a killed run
        engine.create_network();
        engine.start_dockerd();
        engine.load(images);
        engine
    }

    pub fn netns(&self) -> String {
        format!("imft{}", self.index)
    }

    fn veth(&self) -> (String, String) {
        (
            format!("imft{}o", self.index),
            format!("imft{}i", self.index),
        )
    }

    /// The host's address, inside the namespace.
    pub fn address(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 231, self.index, 2)
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("docker.sock")
    }

    pub fn lock(&self) -> File {
        self.lock.try_clone().unwrap()
    }

    /// `nsenter` arguments that run a program in the namespace (unlike
    /// `ip netns exec`, which remounts /sys and hides cgroups from dockerd).
    pub fn enter(&self) -> Vec<String> {
        vec![
            "nsenter".into(),
            format!("--net=/run/netns/{}", self.netns()),
        ]
    }

    fn create_network(&self) {
        let ns = self.netns();
        let (outside, inside) = self.veth();
        let k = self.index;
        must("ip", &["netns", "add", &ns]);
        must(
            "ip",
            &[
                "link", "add", &outside, "type", "veth", "peer", "name", &inside,
            ],
        );
        must("ip", &["link", "set", &inside, "netns", &ns]);
        must(
            "ip",
            &["addr", "add", &format!("10.231.{k}.1/24"), "dev", &outside],
        );
        must("ip", &["link", "set", &outside, "up"]);
        must(
            "ip",
            &[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("10.231.{k}.2/24"),
                "dev",
                &inside,
            ],
        );
        must("ip", &["-n", &ns, "link", "set", &inside, "up"]);
        must("ip", &["-n", &ns, "link", "set", "lo", "up"]);
    }

    fn remove_network(&self) {
        let _ = run("ip", &["link", "del", &self.veth().0]);
        let _ = run("ip", &["netns", "del", &self.netns()]);
    }

    fn start_dockerd(&mut self) {
        let d = self.dir.path();
        // Its own (empty) configuration: the system's daemon.json names a
        // data root and storage driver of its own.
        std::fs::write(d.join("daemon.json"), "{}").unwrap();
        let log = File::create(d.join("dockerd.log")).unwrap();
        let ns = self.netns();
        let mut args = self.enter();
        args.extend(
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "dockerd",
                "--config-file",
                &d.join("daemon.json").display().to_string(),
                "--data-root",
                &d.join("root").display().to_string(),
                "--exec-root",
                &d.join("exec").display().to_string(),
                "--pidfile",
                &d.join("docker.pid").display().to_string(),
                "-H",
                &format!("unix://{}", self.socket().display()),
                "--bridge=none",
                "--iptables=false",
                "--ip6tables=false",
                "--storage-driver",
                "overlay2",
                "--containerd-namespace",
                &ns,
                "--containerd-plugins-namespace",
                &format!("{ns}-plugins"),
                "--cgroup-parent",
                &format!("/{ns}"),
            ]
            .map(str::to_owned),
        );
        let child = Command::new(&args[0])
            .args(&args[1..])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start dockerd");
        self.dockerd = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self.docker(&["version"]).status.success() {
                return;
            }
            if let Some(status) = self.dockerd.as_mut().unwrap().try_wait().unwrap() {
                panic!("dockerd exited ({status}): {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "dockerd did not start: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dockerd.log")).unwrap_or_default()
    }

    fn load(&self, images: &[&str]) {
        if images.is_empty() {
            return;
        }
        let script = format!(
            "docker save {} | docker -H 'unix://{}' load -q",
            images.join(" "),
            self.socket().display()
        );
        let out = run("sh", &["-c", &script]);
        assert!(
            out.status.success(),
            "loading {images:?} into the host's engine: {} (built? scripts/build-test-images)",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The docker CLI against this engine (test tooling).
    pub fn docker(&self, args: &[&str]) -> Output {
        Command::new("docker")
            .arg("-H")
            .arg(format!("unix://{}", self.socket().display()))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("docker")
    }

    /// `docker inspect -f FORMAT NAME`, trimmed; empty when it fails.
    pub fn inspect(&self, name: &str, format: &str) -> String {
        let out = self.docker(&["inspect", "-f", format, name]);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Engine {
    /// Stops the engine (its containers stop with it) and starts it again,
    /// as a host's reboot does: containers whose restart policy says so
    /// come back.
    pub fn restart(&mut self) {
        self.stop_dockerd();
        self.start_dockerd();
    }

    fn stop_dockerd(&mut self) {
        if let Some(mut child) = self.dockerd.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(40);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop_dockerd();
        self.remove_network();
        let ns = self.netns();
        if let Ok(controllers) = std::fs::read_dir("/sys/fs/cgroup") {
            for c in controllers.flatten() {
                let _ = std::fs::remove_dir(c.path().join(&ns));
            }
        }
    }
}
