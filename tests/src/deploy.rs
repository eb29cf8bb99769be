//! The deploy tests' fixture: a bootstrapped host, a controller and a work
//! directory, with `controller deploy` run the way the tests need it.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{Controller, Run, TestHost, bootstrapped_host_with};

pub const IMAGE: &str = "imfleet-test/pbx:22";
pub const DB_IMAGE: &str = "imfleet-test/postgresql:14.12";
/// Deploy arguments for an IM that never becomes healthy, failing fast.
pub const NEVER_HEALTHY_DEPLOY: &[&str] = &[
    "--image",
    "imfleet-test/pbx:22-never-healthy",
    "--health-timeout",
    "8",
];
pub const TOKEN: &str = "imtok-0123456789abcdef0123456789";

pub struct Setup {
    pub host: TestHost,
    pub controller: Controller,
    pub work: tempfile::TempDir,
}

impl Default for Setup {
    fn default() -> Self {
        Self::new()
    }
}

impl Setup {
    /// Starts a host, bootstraps it (its data directories in a scratch
    /// directory) and writes the token file.
    pub fn new() -> Setup {
        let work = tempfile::tempdir().unwrap();
        let data = work.path().join("portsip").display().to_string();
        let storage = work.path().join("storage").display().to_string();
        let (host, controller) =
            bootstrapped_host_with(&["--data-path", &data, "--storage-dir", &storage]);
        let s = Setup {
            host,
            controller,
            work,
        };
        s.write_token(TOKEN);
        s
    }

    pub fn data_path(&self) -> PathBuf {
        self.work.path().join("portsip")
    }

    /// The `-f` directory the agent was bootstrapped with (not created).
    pub fn storage_dir(&self) -> PathBuf {
        self.work.path().join("storage")
    }

    pub fn token_file(&self) -> PathBuf {
        self.work.path().join("im.token")
    }

    pub fn write_token(&self, token: &str) {
        std::fs::write(self.token_file(), format!("{token}\n")).unwrap();
        std::fs::set_permissions(self.token_file(), std::fs::Permissions::from_mode(0o600))
            .unwrap();
    }

    pub fn address(&self) -> String {
        self.host.address().to_string()
    }

    /// `controller deploy` with the test images and `--force` (the test host
    /// is not Ubuntu 24.04); `extra` overrides/extends. `--token-file` is
    /// passed while the token file exists.
    pub fn deploy(&self, extra: &[&str]) -> Run {
        self.deploy_with(extra, true)
    }

    pub fn deploy_with(&self, extra: &[&str], force: bool) -> Run {
        crate::run_with_limit(self.deploy_command(extra, force), Duration::from_secs(120))
    }

    /// The `controller deploy` command [`Self::deploy_with`] runs.
    pub fn deploy_command(&self, extra: &[&str], force: bool) -> std::process::Command {
        let token = self.token_file();
        let token = token.exists().then(|| token.display().to_string());
        let args = deploy_args(
            &self.address(),
            &self.data_path().display().to_string(),
            token.as_deref(),
            extra,
            force,
        );
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.controller.command(&args)
    }

    pub fn status(&self) -> serde_json::Value {
        let run = self.controller.run(&["status", "--json", &self.address()]);
        serde_json::from_str(&run.stdout).unwrap_or_else(|_| panic!("{run:#?}"))
    }
}

/// `controller deploy` arguments for a test host at `address`: the test
/// images, `--force` (test hosts are not Ubuntu 24.04) when asked, short
/// timeouts; `extra` overrides/extends.
pub fn deploy_args(
    address: &str,
    data: &str,
    token_file: Option<&str>,
    extra: &[&str],
    force: bool,
) -> Vec<String> {
    let mut args = vec![
        "deploy",
        address,
        "-a",
        address,
        "-A",
        address,
        "--pbx",
        "127.0.0.1",
        "--db-image",
        DB_IMAGE,
        "--data-path",
        data,
        "--users",
        "5000",
    ];
    if force {
        args.push("--force");
    }
    if let Some(token) = token_file {
        args.extend(["--token-file", token]);
    }
    for (flag, default) in [
        ("--image", IMAGE),
        ("--health-timeout", "60"),
        ("--stop-grace", "5"),
    ] {
        if !extra.contains(&flag) {
            args.extend([flag, default]);
        }
    }
    args.extend_from_slice(extra);
    args.into_iter().map(str::to_owned).collect()
}

pub fn owner(path: &Path) -> (u32, u32, u32) {
    let m = std::fs::metadata(path).unwrap();
    (m.uid(), m.gid(), m.permissions().mode() & 0o777)
}

/// The status code the IM's stats port (8902) answers for `url_path`.
pub fn http_status(url_path: &str) -> Option<u16> {
    crate::daemon::http_get(([127, 0, 0, 1], 8902).into(), url_path).map(|(code, _)| code)
}

pub fn wait_until_healthy(setup: &Setup) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let status = setup.status();
        if status[0]["healthy"] == true {
            return status;
        }
        assert!(Instant::now() < deadline, "never healthy: {status}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

pub fn containers(status: &serde_json::Value) -> Vec<(String, String, String)> {
    status[0]["status"]["containers"]
        .as_array()
        .map(|cs| {
            cs.iter()
                .map(|c| {
                    (
                        c["name"].as_str().unwrap().to_owned(),
                        c["image"].as_str().unwrap().to_owned(),
                        c["health"].as_str().unwrap().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The docker CLI (test tooling, not what imfleet uses).
pub fn docker(args: &[&str]) -> std::process::Output {
    std::process::Command::new("docker")
        .args(args)
        .output()
        .expect("docker")
}
