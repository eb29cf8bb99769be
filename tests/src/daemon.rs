//! `controller serve` as a child process of a test, with its metrics port,
//! a webhook receiver to point it at, and promtool to judge its page.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::Controller;

pub struct Daemon {
    child: Option<Child>,
    pub metrics: SocketAddr,
    log: std::path::PathBuf,
    _log_dir: tempfile::TempDir,
}

impl Daemon {
    /// Starts `controller serve` with `extra` arguments and waits until it
    /// is ready (its hosts loaded).
    pub fn start(controller: &Controller, extra: &[&str]) -> Daemon {
        let metrics = free_port();
        // Not in the state directory: the daemon may be the first to open it.
        let log_dir = tempfile::tempdir().unwrap();
        let log = log_dir.path().join("serve.log");
        let mut args = vec!["serve", "--interval", "1s"];
        let listen = metrics.to_string();
        args.extend(["--metrics-listen", &listen]);
        args.extend_from_slice(extra);
        let mut cmd = controller.command(&args);
        let file = std::fs::File::create(&log).unwrap();
        cmd.env("IMFLEET_LOG", "info")
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file);
        let child = cmd.spawn().expect("spawn controller serve");
        let mut daemon = Daemon {
            child: Some(child),
            metrics,
            log,
            _log_dir: log_dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while http_get(metrics, "/readyz").map(|(code, _)| code) != Some(200) {
            if let Some(status) = daemon.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("controller serve exited ({status}): {}", daemon.log());
            }
            assert!(
                Instant::now() < deadline,
                "serve not ready: {}",
                daemon.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        daemon
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The `/metrics` page.
    pub fn scrape(&self) -> String {
        let (code, body) = http_get(self.metrics, "/metrics").expect("scrape /metrics");
        assert_eq!(code, 200, "{body}");
        body
    }

    /// SIGTERM, then the exit status (killed after 20 s).
    pub fn stop(mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = self.child.as_ref().unwrap().id() as i32;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal).unwrap();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn free_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// One HTTP/1.1 GET on loopback: status code and body.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let code = out.split_whitespace().nth(1)?.parse().ok()?;
    let body = out.split_once("\r\n\r\n")?.1.to_owned();
    Some((code, body))
}

/// Judges a metrics page with promtool (the Prometheus project's own
/// parser and linter). Its only accepted complaint is the one it makes of
/// node_exporter too: `node_memory_*` names in camelCase, kept so existing
/// dashboards work. Panics with promtool's words otherwise.
pub fn promtool_accepts(page: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (scripts/setup installs the prometheus package)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(page.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    match out.status.code() {
        Some(0) => {}
        // 3: lint problems only; the page parsed.
        Some(3) => {
            for line in said.lines().filter(|l| !l.trim().is_empty()) {
                assert!(
                    line.starts_with("node_memory_") && line.contains("camelCase"),
                    "promtool complains: {line}\n{said}"
                );
            }
        }
        other => panic!("promtool rejects the page ({other:?}): {said}\n{page}"),
    }
}

/// The value of the sample `name{labels}` on a page (labels as written).
pub fn sample_value(page: &str, name: &str, labels: &str) -> Option<f64> {
    let key = format!("{name}{{{labels}}} ");
    page.lines()
        .find_map(|l| l.strip_prefix(&key))
        .and_then(|v| v.trim().parse().ok())
}

/// A webhook receiver on loopback: every request body, as it arrives.
pub struct WebhookReceiver {
    pub url: String,
    pub bodies: mpsc::Receiver<serde_json::Value>,
}

impl WebhookReceiver {
    pub fn start() -> WebhookReceiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let (tx, bodies) = mpsc::channel();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let tx = tx.clone();
                std::thread::spawn(move || {
                    let _ = serve_one(stream, &tx);
                });
            }
        });
        WebhookReceiver { url, bodies }
    }

    /// The first body whose `kind` is `kind`, waiting up to `limit`.
    pub fn wait_for(&self, kind: &str, limit: Duration) -> Option<serde_json::Value> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            match self.bodies.recv_timeout(left) {
                Ok(body) if body["kind"] == kind => return Some(body),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    }
}

fn serve_one(stream: TcpStream, tx: &mpsc::Sender<serde_json::Value>) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut length = 0usize;
        loop {
            let mut header = String::new();
            reader.read_line(&mut header)?;
            if header.trim().is_empty() {
                break;
            }
            if let Some((k, v)) = header.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                length = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0u8; length];
        reader.read_exact(&mut body)?;
        if let Ok(value) = serde_json::from_slice(&body) {
            let _ = tx.send(value);
        }
        let mut out = stream.try_clone()?;
        out.write_all(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")?;
    }
}
