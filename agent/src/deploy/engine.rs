//! Making sure the Docker Engine runs: install it with the host's package
//! manager when missing, start it when stopped. Planned by a pure function.

use std::path::Path;
use std::time::{Duration, Instant};

/// What the host looks like, as far as the Engine is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineFacts {
    pub answering: bool,
    pub installed: bool,
    pub apt: bool,
    pub systemd: bool,
}

/// Commands that bring the Engine up, or why that cannot be done here.
pub fn plan(f: EngineFacts) -> Result<Vec<Vec<String>>, String> {
    let cmd = |parts: &[&str]| parts.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    if f.answering {
        return Ok(Vec::new());
    }
    let mut steps = Vec::new();
    if !f.installed {
        if !f.apt {
            return Err("Docker Engine is not installed and this host has no apt-get; install Docker Engine, then deploy again".into());
        }
        steps.push(cmd(&["apt-get", "update", "-q"]));
        steps.push(cmd(&["apt-get", "install", "-y", "-q", "docker.io"]));
    }
    if f.systemd {
        steps.push(cmd(&["systemctl", "enable", "--now", "docker.service"]));
    } else if f.installed {
        return Err("Docker Engine is installed but not running, and there is no systemd to start it; start dockerd, then deploy again".into());
    }
    Ok(steps)
}

fn facts(answering: bool) -> EngineFacts {
    EngineFacts {
        answering,
        installed: [
            "/usr/bin/dockerd",
            "/usr/sbin/dockerd",
            "/usr/local/bin/dockerd",
        ]
        .iter()
        .any(|p| Path::new(p).exists()),
        apt: Path::new("/usr/bin/apt-get").exists(),
        systemd: crate::supervision::systemd_is_init(),
    }
}

/// Ensures the Engine answers; returns what was done (empty if nothing).
pub async fn ensure(docker: &bollard::Docker) -> Result<Vec<String>, String> {
    let answering = docker.version().await.is_ok();
    let steps = plan(facts(answering))?;
    let mut done = Vec::new();
    for step in steps {
        let out = tokio::process::Command::new(&step[0])
            .args(&step[1..])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
            .await
            .map_err(|e| format!("{}: {e}", step.join(" ")))?;
        if !out.status.success() {
            return Err(format!(
                "`{}` failed: {}",
                step.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        done.push(step.join(" "));
    }
    if !done.is_empty() {
        let deadline = Instant::now() + Duration::from_secs(60);
        while docker.version().await.is_err() {
            if Instant::now() > deadline {
                return Err(
                    "Docker Engine was installed/started but does not answer on its socket".into(),
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(answering: bool, installed: bool, apt: bool, systemd: bool) -> EngineFacts {
        EngineFacts {
            answering,
            installed,
            apt,
            systemd,
        }
    }

    #[test]
    fn the_engine_is_installed_started_or_left_alone() {
        assert!(plan(f(true, true, true, true)).unwrap().is_empty());
        let install = plan(f(false, false, true, true)).unwrap();
        assert_eq!(install[1], ["apt-get", "install", "-y", "-q", "docker.io"]);
        assert_eq!(
            install[2],
            ["systemctl", "enable", "--now", "docker.service"]
        );
        assert_eq!(
            plan(f(false, true, true, true)).unwrap(),
            vec![vec!["systemctl", "enable", "--now", "docker.service"]]
        );
        assert!(
            plan(f(false, false, false, true))
                .unwrap_err()
                .contains("no apt-get")
        );
        assert!(
            plan(f(false, true, true, false))
                .unwrap_err()
                .contains("no systemd")
        );
    }
}
