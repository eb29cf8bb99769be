//! Keeping the agent running: under systemd when systemd is PID 1, otherwise
//! under the agent's own small supervisor (containers, minimal hosts).

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::config::AgentConfig;
use crate::upgrade::{self, watch::Verdict, watch::Watch};
use imfleet_certs::storage::write_atomically as write_file_atomically;
use imfleet_proto::model::layout::{Layout, SYSTEMD_UNIT, SYSTEMD_UNIT_PATH};

/// Set in the agent's environment to say who supervises it.
pub const SUPERVISION_ENV: &str = "IMFLEET_SUPERVISION";
/// The only PATH the agent runs with, whoever started it.
pub const SAFE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Open files the agent may hold: connections, image uploads, tree walks.
pub const NOFILE_LIMIT: u64 = 65_536;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Supervision {
    Systemd,
    Supervisor,
}

impl Supervision {
    pub fn as_str(self) -> &'static str {
        match self {
            Supervision::Systemd => "systemd",
            Supervision::Supervisor => "supervisor",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SupervisionError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("`systemctl {args}` failed: {stderr}")]
    Systemctl { args: String, stderr: String },
    #[error("the previous supervisor (pid {0}) did not stop")]
    StuckSupervisor(i32),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SupervisionError {
    let what = what.into();
    move |source| SupervisionError::Io { what, source }
}

/// True when systemd is the init system (PID 1) of this host.
pub fn systemd_is_init() -> bool {
    Path::new("/run/systemd/system").is_dir()
        && std::fs::read_to_string("/proc/1/comm").is_ok_and(|c| c.trim() == "systemd")
}

/// The systemd unit that runs the agent. What it gives up, and why not
/// more: the agent is root because its work is a root's (it installs the
/// Docker Engine with apt, which writes `/usr` and `/etc` and runs package
/// scripts; opens the firewall; owns directories for uid 888 and 999 under
/// data roots anywhere on the host; reads other processes for the
/// inventory), so the file system stays writable (`ProtectSystem`,
/// `ProtectHome`, `PrivateTmp` would hide or freeze paths the Engine and
/// the packages see), and devices, `/proc/sys` and set-uid files stay as
/// apt's scripts expect. What it never needs goes: kernel modules, the
/// clock, rebooting, raw I/O, kernel logs and the audit and MAC controls,
/// other namespaces, other architectures' system calls, realtime,
/// writable-executable memory, new privileges. `systemd-analyze security`
/// scores it (tests/tests/systemd.rs prints the figure; SECURITY.md has it).
pub fn systemd_unit(layout: &Layout) -> String {
    format!(
        "[Unit]\n\
         Description=imfleet agent (PortSIP IM host management)\n\
         Documentation=file://{readme}\n\
         After=network-online.target docker.service\n\
         Wants=network-online.target\n\
         \n\
         [Service]\n\
         Type=simple\n\
         Environment={env}=systemd\n\
         Environment=PATH={path}\n\
         WorkingDirectory=/\n\
         LimitNOFILE={nofile}\n\
         ExecStart={bin} --root {root} serve\n\
         Restart=always\n\
         RestartSec=2\n\
         NoNewPrivileges=yes\n\
         CapabilityBoundingSet=~CAP_SYS_MODULE CAP_SYS_BOOT CAP_SYS_TIME CAP_WAKE_ALARM CAP_SYS_RAWIO CAP_SYSLOG CAP_SYS_PACCT CAP_SYS_TTY_CONFIG CAP_LINUX_IMMUTABLE CAP_BLOCK_SUSPEND CAP_LEASE CAP_AUDIT_CONTROL CAP_AUDIT_READ CAP_MAC_ADMIN CAP_MAC_OVERRIDE\n\
         ProtectKernelModules=yes\n\
         ProtectKernelLogs=yes\n\
         ProtectClock=yes\n\
         ProtectHostname=yes\n\
         ProtectControlGroups=yes\n\
         RestrictNamespaces=yes\n\
         RestrictRealtime=yes\n\
         RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK\n\
         LockPersonality=yes\n\
         MemoryDenyWriteExecute=yes\n\
         SystemCallArchitectures=native\n\
         KeyringMode=private\n\
         \n\
         [Install]\n\
         WantedBy=multi-user.target\n",
        readme = layout.readme().display(),
        env = SUPERVISION_ENV,
        path = SAFE_PATH,
        nofile = NOFILE_LIMIT,
        bin = layout.binary().display(),
        root = layout.root().display(),
    )
}

/// The page the unit's `Documentation=` names.
pub fn readme(layout: &Layout) -> String {
    format!(
        "imfleet agent\n\
         =============\n\
         \n\
         This host is an IM host of a PortSIP PBX cluster, managed with imfleet from the PBX node\n\
         (the `controller`). The agent ({bin}) runs as root and serves the controller only,\n\
         over mutual TLS on the port in {config}; it deploys and operates the PortSIP IM\n\
         containers through the Docker Engine and touches nothing outside the data directories\n\
         named in that file.\n\
         \n\
         Status:   systemctl status {unit}     Log: journalctl -u {unit}\n\
         Audit:    {audit} (every change asked of it)\n\
         Identity: {etc} (its key never leaves this host)\n\
         \n\
         Manage it from the PBX node (controller ping, status, deploy, upgrade); to take it off this\n\
         host: systemctl disable --now {unit}, then remove {root}.\n",
        bin = layout.binary().display(),
        config = layout.config().display(),
        unit = SYSTEMD_UNIT,
        audit = layout.audit_log().display(),
        etc = layout.etc_dir().display(),
        root = layout.root().display(),
    )
}

/// Writes the config and (re)starts the agent under the right supervisor.
pub fn install(layout: &Layout, config: &AgentConfig) -> Result<Supervision, SupervisionError> {
    let etc = layout.etc_dir();
    std::fs::create_dir_all(&etc).map_err(io(format!("create {}", etc.display())))?;
    let path = layout.config();
    write_file_atomically(&path, config.to_toml().as_bytes(), 0o644)
        .map_err(io(format!("write {}", path.display())))?;
    let page = layout.readme();
    write_file_atomically(&page, readme(layout).as_bytes(), 0o644)
        .map_err(io(format!("write {}", page.display())))?;

    if systemd_is_init() {
        stop_supervisor(layout)?;
        write_file_atomically(
            Path::new(SYSTEMD_UNIT_PATH),
            systemd_unit(layout).as_bytes(),
            0o644,
        )
        .map_err(io(format!("write {SYSTEMD_UNIT_PATH}")))?;
        systemctl(&["daemon-reload"])?;
        systemctl(&["enable", SYSTEMD_UNIT])?;
        systemctl(&["restart", SYSTEMD_UNIT])?;
        Ok(Supervision::Systemd)
    } else {
        stop_supervisor(layout)?;
        spawn_supervisor(layout)?;
        Ok(Supervision::Supervisor)
    }
}

fn systemctl(args: &[&str]) -> Result<(), SupervisionError> {
    let out = std::process::Command::new("systemctl")
        .args(args)
        .output()
        .map_err(io("run systemctl"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(SupervisionError::Systemctl {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// The pid in the supervisor pid file, if that process is alive and really
/// is an agent supervisor (pid files outlive reboots; pids get reused).
pub fn running_supervisor(layout: &Layout) -> Option<Pid> {
    let text = std::fs::read_to_string(layout.supervisor_pid()).ok()?;
    let pid: i32 = text.trim().parse().ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    args.iter()
        .any(|a| *a == b"supervise")
        .then_some(Pid::from_raw(pid))
}

/// Stops a running supervisor (and with it the agent). Returns whether one ran.
pub fn stop_supervisor(layout: &Layout) -> Result<bool, SupervisionError> {
    let Some(pid) = running_supervisor(layout) else {
        return Ok(false);
    };
    let _ = kill(pid, Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if kill(pid, None).is_err() || !Path::new(&format!("/proc/{pid}")).exists() {
            return Ok(true);
        }
        // A zombie still "exists"; treat it as gone.
        if std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z'))
        }) {
            return Ok(true);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = kill(pid, Signal::SIGKILL);
    Err(SupervisionError::StuckSupervisor(pid.as_raw()))
}

/// Starts `agent supervise` detached from the caller (its own process group,
/// no inherited stdio), so it survives the SSH session that started it.
fn spawn_supervisor(layout: &Layout) -> Result<(), SupervisionError> {
    let log_dir = layout.log_dir();
    std::fs::create_dir_all(&log_dir).map_err(io(format!("create {}", log_dir.display())))?;
    std::fs::create_dir_all(layout.run_dir()).map_err(io("create run dir"))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(layout.log_file())
        .map_err(io("open agent log"))?;
    let log2 = log.try_clone().map_err(io("open agent log"))?;
    let binary = agent_binary(layout);
    let mut command = std::process::Command::new(&binary);
    clean_environment(&mut command);
    command
        .arg("--root")
        .arg(layout.root())
        .arg("supervise")
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .process_group(0)
        .spawn()
        .map_err(io(format!("start {}", binary.display())))?;
    Ok(())
}

/// What the agent starts with, whoever called `service install` (a sudo
/// session, an SSH login): no inherited environment but the log filter, a
/// fixed PATH, and `/` as working directory.
fn clean_environment(command: &mut std::process::Command) {
    command
        .env_clear()
        .env("PATH", SAFE_PATH)
        .env(SUPERVISION_ENV, Supervision::Supervisor.as_str())
        .current_dir("/");
    if let Ok(filter) = std::env::var("IMFLEET_LOG") {
        command.env("IMFLEET_LOG", filter);
    }
}

/// Raises the soft open-files limit to [`NOFILE_LIMIT`] (or the hard limit,
/// if lower): the default 1,024 lets a few idle connections starve the agent.
pub fn raise_open_files_limit() -> Result<u64, nix::errno::Errno> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    let want = NOFILE_LIMIT.min(hard);
    if soft < want {
        setrlimit(Resource::RLIMIT_NOFILE, want, hard)?;
        return Ok(want);
    }
    Ok(soft)
}

/// The installed binary when present, else this very executable (dev runs).
fn agent_binary(layout: &Layout) -> std::path::PathBuf {
    let installed = layout.binary();
    if installed.exists() {
        installed
    } else {
        std::env::current_exe().unwrap_or(installed)
    }
}

/// Runs the agent as a child and restarts it when it exits, with backoff.
/// Returns when SIGTERM or SIGINT arrives, after stopping the child.
pub async fn supervise(layout: &Layout) -> Result<(), SupervisionError> {
    use tokio::signal::unix::{SignalKind, signal};

    std::fs::create_dir_all(layout.run_dir()).map_err(io("create run dir"))?;
    let pid_path = layout.supervisor_pid();
    write_file_atomically(
        &pid_path,
        format!("{}\n", std::process::id()).as_bytes(),
        0o644,
    )
    .map_err(io(format!("write {}", pid_path.display())))?;

    let mut term = signal(SignalKind::terminate()).map_err(io("install SIGTERM handler"))?;
    let mut int = signal(SignalKind::interrupt()).map_err(io("install SIGINT handler"))?;
    let mut backoff = Duration::from_secs(1);
    // An agent upgrade being watched: the new binary must serve and stay up,
    // or the previous one is put back (see `upgrade::watch`).
    let mut watch: Option<Watch> = None;
    loop {
        let started = Instant::now();
        let mut command = std::process::Command::new(agent_binary(layout));
        clean_environment(&mut command);
        let mut child = tokio::process::Command::from(command)
            .arg("--root")
            .arg(layout.root())
            .arg("serve")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(io("start agent"))?;
        tracing::info!(pid = child.id(), "agent started");
        let ended = loop {
            let ticking = watch.is_some();
            tokio::select! {
                status = child.wait() => break Ended::Exited(status.ok().and_then(|s| s.code())),
                _ = term.recv() => break Ended::Stop,
                _ = int.recv() => break Ended::Stop,
                () = tokio::time::sleep(WATCH_TICK), if ticking => {
                    let verdict = watch.as_mut().map(|w| w.look(layout, true, 0));
                    match verdict {
                        Some(Verdict::Confirm) => {
                            upgrade::watch::conclude(layout, &Verdict::Confirm);
                            watch = None;
                        }
                        Some(rollback @ Verdict::RollBack(_)) => {
                            upgrade::watch::conclude(layout, &rollback);
                            watch = None;
                            break Ended::Replace;
                        }
                        _ => {}
                    }
                }
            }
        };
        match ended {
            Ended::Stop => {
                stop_child(&mut child).await;
                let _ = std::fs::remove_file(&pid_path);
                return Ok(());
            }
            Ended::Replace => {
                stop_child(&mut child).await;
                continue;
            }
            Ended::Exited(code) => {
                if code == Some(i32::from(upgrade::EXIT_FOR_UPGRADE))
                    && upgrade::note::read(layout)
                        .is_some_and(|n| n.state == upgrade::State::Pending)
                {
                    tracing::info!("starting the upgraded agent");
                    watch = Some(Watch::default());
                    continue;
                }
                if let Some(mut w) = watch.take() {
                    // The new binary exited while watched: the old one returns.
                    upgrade::watch::conclude(layout, &w.look(layout, false, 1));
                    continue;
                }
                tracing::warn!(?code, "agent exited; restarting after {backoff:?}");
            }
        }
        if started.elapsed() > Duration::from_secs(60) {
            backoff = Duration::from_secs(1);
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = term.recv() => { let _ = std::fs::remove_file(&pid_path); return Ok(()); }
            _ = int.recv() => { let _ = std::fs::remove_file(&pid_path); return Ok(()); }
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

/// How a child's run ended, as the supervisor sees it.
enum Ended {
    Exited(Option<i32>),
    /// SIGTERM or SIGINT: the supervisor stops.
    Stop,
    /// An upgrade was rolled back: the child makes way for the previous binary.
    Replace,
}

const WATCH_TICK: Duration = Duration::from_millis(250);

/// SIGTERM, 10 s, then SIGKILL.
async fn stop_child(child: &mut tokio::process::Child) {
    if let Some(id) = child.id() {
        let _ = kill(Pid::from_raw(id as i32), Signal::SIGTERM);
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
    let _ = child.kill().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn systemd_unit_runs_the_installed_agent_and_restarts_it() {
        let unit = systemd_unit(&Layout::new("/opt/imfleet"));
        assert!(unit.contains("ExecStart=/opt/imfleet/bin/agent --root /opt/imfleet serve\n"));
        assert!(unit.contains("Restart=always\n"));
        assert!(unit.contains("Environment=IMFLEET_SUPERVISION=systemd\n"));
        assert!(unit.contains("WantedBy=multi-user.target\n"));
        assert!(unit.contains("LimitNOFILE=65536\n"));
        assert!(unit.contains("WorkingDirectory=/\n"));
        assert!(unit.contains(&format!("Environment=PATH={SAFE_PATH}\n")));
    }

    #[test]
    fn a_stale_pid_file_is_not_mistaken_for_a_supervisor() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        std::fs::create_dir_all(layout.run_dir()).unwrap();
        // Our own pid: alive, but not `agent supervise`.
        std::fs::write(layout.supervisor_pid(), format!("{}\n", std::process::id())).unwrap();
        assert_eq!(running_supervisor(&layout), None);
        assert!(!stop_supervisor(&layout).unwrap());
    }
}

#[cfg(test)]
mod environment_tests {
    use super::*;

    #[test]
    fn the_agent_starts_with_a_clean_environment_in_the_root_directory() {
        let mut command = std::process::Command::new("/bin/sh");
        clean_environment(&mut command);
        command.args(["-c", "env; pwd"]);
        // The test runner's own environment (HOME, CARGO_*, ...) is what
        // must not leak through.
        assert!(std::env::vars().any(|(k, _)| k.starts_with("CARGO") || k == "HOME"));
        let out = command.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let mut lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.pop(), Some("/"));
        // `sh` adds PWD (and some add SHLVL/_); nothing else is inherited.
        let vars: Vec<&str> = lines
            .iter()
            .filter_map(|l| l.split_once('=').map(|(k, _)| k))
            .filter(|k| !["PWD", "SHLVL", "_", "OLDPWD"].contains(k))
            .filter(|k| *k != "IMFLEET_LOG")
            .collect();
        let mut vars = vars;
        vars.sort();
        assert_eq!(vars, ["IMFLEET_SUPERVISION", "PATH"]);
        assert!(text.contains(&format!("PATH={SAFE_PATH}\n")));
        assert!(text.contains("IMFLEET_SUPERVISION=supervisor\n"));
    }
}
