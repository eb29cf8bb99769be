//! The rollout tests' fixture: one controller and several IM hosts that
//! truly run side by side, each with its own agent, data path, Docker Engine
//! and IM ports (an isolated [`TestHost`] or a [`crate::systemd_host::SystemdHost`]),
//! all deployed with the test image `imfleet-test/pbx:22`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::deploy::{DB_IMAGE, IMAGE, deploy_args};
use crate::{Controller, ImHost, Run, TestHost};

pub const NEXT_IMAGE: &str = "imfleet-test/pbx:23";
pub const NEXT_NEVER_HEALTHY: &str = "imfleet-test/pbx:23-never-healthy";
/// What every host's engine is given.
pub const IMAGES: &[&str] = &[IMAGE, DB_IMAGE, NEXT_IMAGE, NEXT_NEVER_HEALTHY];

pub struct Fleet<H: ImHost = TestHost> {
    pub controller: Controller,
    pub hosts: Vec<H>,
    work: tempfile::TempDir,
    tokens: AtomicU32,
}

impl Fleet<TestHost> {
    /// `n` isolated hosts, bootstrapped and deployed healthy, every test
    /// image on each.
    pub fn deployed(n: usize) -> Fleet {
        Fleet::deployed_with(n, IMAGES)
    }

    /// [`Fleet::deployed`] with only `images` on each host's engine.
    pub fn deployed_with(n: usize, images: &[&str]) -> Fleet {
        Fleet::deploy_on((0..n).map(|_| TestHost::start_isolated(images)).collect())
    }
}

impl<H: ImHost> Fleet<H> {
    /// `hosts` bootstrapped and deployed healthy.
    pub fn deploy_on(hosts: Vec<H>) -> Fleet<H> {
        let fleet = Fleet {
            controller: Controller::new(),
            hosts,
            work: tempfile::tempdir().unwrap(),
            tokens: AtomicU32::new(0),
        };
        let token = fleet.new_token();
        for (i, host) in fleet.hosts.iter().enumerate() {
            let data = fleet.data_path(i).display().to_string();
            let run = fleet
                .controller
                .bootstrap_root(host, &["--data-path", &data]);
            assert!(run.success(), "bootstrap: {run:#?}\n{}", host.agent_log());
            let args = deploy_args(
                &host.address().to_string(),
                &data,
                Some(&token.display().to_string()),
                &[],
                true,
            );
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let run =
                crate::run_with_limit(fleet.controller.command(&args), Duration::from_secs(180));
            assert!(run.success(), "deploy on host {i}: {run:#?}");
        }
        fleet
    }

    pub fn data_path(&self, i: usize) -> PathBuf {
        self.hosts[i].data_path()
    }

    pub fn names(&self) -> Vec<String> {
        self.hosts.iter().map(|h| h.address().to_string()).collect()
    }

    /// A file holding a token no host has run yet (0600).
    pub fn new_token(&self) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let n = self.tokens.fetch_add(1, Ordering::SeqCst);
        let path = self.work.path().join(format!("token-{n}"));
        std::fs::write(&path, format!("imtok-fleet-{n:04}-0123456789abcdef\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        path
    }

    /// `controller upgrade` of every host in order, with test timings
    /// (`extra` overrides/extends) and the given token file.
    pub fn upgrade_command(
        &self,
        token: &std::path::Path,
        extra: &[&str],
    ) -> std::process::Command {
        let args = self.upgrade_args(token, extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.controller.command(&args)
    }

    /// The arguments of [`Fleet::upgrade_command`], for a controller run
    /// elsewhere (another node).
    pub fn upgrade_args(&self, token: &std::path::Path, extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = vec!["upgrade".into()];
        args.extend(self.names());
        // --force: the test hosts are not Ubuntu 24.04.
        args.extend([
            "--token-file".into(),
            token.display().to_string(),
            "--json".into(),
            "--force".into(),
        ]);
        for (flag, default) in [
            ("--stop-grace", "5"),
            ("--min-healthy-time", "2s"),
            ("--healthy-deadline", "60s"),
        ] {
            if !extra.contains(&flag) {
                args.extend([flag.to_owned(), default.to_owned()]);
            }
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    pub fn upgrade(&self, extra: &[&str]) -> Run {
        let token = self.new_token();
        crate::run_with_limit(
            self.upgrade_command(&token, extra),
            Duration::from_secs(600),
        )
    }

    /// The newest rollout as `controller rollouts --json` shows it.
    pub fn last_rollout(&self) -> serde_json::Value {
        let rollouts = self.controller.run(&["rollouts", "--json"]).json();
        rollouts[0].clone()
    }

    /// Each host's phase in the newest rollout, in host order (empty
    /// before there is one).
    pub fn phases(&self) -> Vec<String> {
        let rollout = self.last_rollout();
        let steps = rollout["steps"].as_array().cloned().unwrap_or_default();
        self.names()
            .iter()
            .map(|name| {
                steps
                    .iter()
                    .find(|s| s["host"] == name.as_str())
                    .map(|s| s["phase"].as_str().unwrap().to_owned())
                    .unwrap_or_default()
            })
            .collect()
    }

    /// What the IM container runs on host `i`, and whether the deployment
    /// is healthy, as the agent reports it.
    pub fn running(&self, i: usize) -> (String, bool) {
        let status = self
            .controller
            .run(&["status", "--json", &self.names()[i]])
            .json();
        let image = status[0]["status"]["containers"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["name"] == "portsip.instantmessage"))
            .map(|c| c["image"].as_str().unwrap_or_default().to_owned())
            .unwrap_or_default();
        (image, status[0]["healthy"] == true)
    }

    /// When host `i`'s IM container last started (its own engine's word).
    pub fn im_started_at(&self, i: usize) -> String {
        self.hosts[i]
            .engine()
            .unwrap()
            .inspect("portsip.instantmessage", "{{.State.StartedAt}}")
    }

    /// The newest rollout's recorded steps, oldest first: (host, phase).
    pub fn timeline(&self) -> Vec<(String, String)> {
        let rollout = self.last_rollout()["id"].clone();
        let events = self
            .controller
            .run(&["events", "--json", "-n", "10000"])
            .json();
        let mut steps: Vec<(i64, String, String)> = events
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["kind"] == "rollout-step" && e["rollout_id"] == rollout)
            .map(|e| {
                let detail = e["detail"].as_str().unwrap_or_default();
                let phase = detail.split(':').next().unwrap_or_default().to_owned();
                (
                    e["id"].as_i64().unwrap(),
                    e["host"].as_str().unwrap_or_default().to_owned(),
                    phase,
                )
            })
            .collect();
        steps.sort();
        steps.into_iter().map(|(_, h, p)| (h, p)).collect()
    }
}

/// The most hosts out of service at once in a timeline: a host is out from
/// its swap (or rollback) until it is done, rolled back or failed.
pub fn most_out_of_service(timeline: &[(String, String)]) -> usize {
    let mut down = std::collections::BTreeSet::new();
    let mut most = 0;
    for (host, phase) in timeline {
        match phase.as_str() {
            "swapping" | "verifying" | "rolling-back" => {
                down.insert(host.clone());
            }
            // A failed host stays out of service.
            "done" | "rolled-back" | "staged" => {
                down.remove(host);
            }
            _ => {}
        }
        most = most.max(down.len());
    }
    most
}
