//! The SSH side of bootstrap, through the system OpenSSH client so the admin's
//! `~/.ssh/config`, keys, ssh-agent and known_hosts work exactly as for `ssh`.
//! One master connection carries every command of a bootstrap.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use openssh::{KnownHosts, Session, SessionBuilder};
use tokio::io::AsyncWriteExt;

use crate::error_chain;

/// How to reach a host over SSH. Unset fields fall back to the admin's config.
#[derive(Debug, Clone, Default)]
pub struct SshOptions {
    pub user: Option<String>,
    pub port: Option<u16>,
    pub identity_file: Option<PathBuf>,
    /// Alternative `ssh_config` (`ssh -F`).
    pub config_file: Option<PathBuf>,
    pub connect_timeout: Option<Duration>,
    /// The host key the host must present, as `ssh-keygen -l` prints its
    /// fingerprint (`SHA256:...`); without it a new key is trusted and
    /// recorded (`accept-new`).
    pub host_key_fingerprint: Option<String>,
}

/// Checks a host key fingerprint as an operator types it (`SHA256:` and 43
/// characters of unpadded base64, as `ssh-keygen -l` prints).
pub fn check_fingerprint(text: &str) -> Result<String, String> {
    let b64 = text.strip_prefix("SHA256:").ok_or_else(|| {
        format!("{text:?} is not a SHA256 host key fingerprint; take it from `ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub` on the host (SHA256:...)")
    })?;
    let ok = b64.len() == 43
        && b64
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '+' || c == '/');
    if ok {
        Ok(text.to_owned())
    } else {
        Err(format!(
            "{text:?} is not a SHA256 host key fingerprint (SHA256: then 43 characters of base64)"
        ))
    }
}

/// One key a host offered, and its fingerprint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostKey {
    /// As a known_hosts line (`host type base64`).
    pub known_hosts_line: String,
    pub fingerprint: String,
}

/// Default bound on establishing the connection (TCP and SSH handshake).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The effective destination after `ssh_config` is applied (`ssh -G`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedTarget {
    pub hostname: String,
    pub port: u16,
    pub user: String,
    /// Where the client records host keys (`UserKnownHostsFile`).
    pub known_hosts_files: Vec<PathBuf>,
}

impl ResolvedTarget {
    /// The host as known_hosts names it.
    pub fn known_hosts_name(&self) -> String {
        if self.port == 22 {
            self.hostname.clone()
        } else {
            format!("[{}]:{}", self.hostname, self.port)
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error(
        "cannot reach {target} over SSH: {detail}. Check the address, that sshd listens on port {port}, and that no firewall blocks it"
    )]
    Unreachable {
        target: String,
        port: u16,
        detail: String,
    },
    #[error("cannot resolve the host name of {target}: {detail}")]
    UnknownHost { target: String, detail: String },
    #[error(
        "the SSH host key of {target} has CHANGED since it was recorded in known_hosts. This can be an attack, or the host was reinstalled. If you know why it changed, remove the old key with `ssh-keygen -R {known_hosts_name}` and retry"
    )]
    HostKeyChanged {
        target: String,
        known_hosts_name: String,
    },
    #[error(
        "{target} refused the SSH login of user `{user}` ({detail}). Install the controller's public key for that user (`ssh-copy-id {user}@{host}`), or choose the key with -i/--identity"
    )]
    AuthRejected {
        target: String,
        user: String,
        host: String,
        detail: String,
    },
    #[error(
        "{target} does not present the SSH host key {expected} (it offered {offered}); nothing was sent to it. Check the fingerprint on the host's console (`ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub`): a mismatch can be an attack"
    )]
    HostKeyMismatch {
        target: String,
        expected: String,
        offered: String,
    },
    #[error("SSH connection to {target} did not complete within {secs} s")]
    Timeout { target: String, secs: u64 },
    #[error("SSH to {target} failed: {detail}")]
    Other { target: String, detail: String },
    #[error("cannot run the local `ssh` client ({0}); install openssh-client")]
    LocalClient(std::io::Error),
    #[error("on {target}: {what} failed (exit status {status}): {stderr}")]
    Remote {
        target: String,
        what: String,
        status: i32,
        stderr: String,
    },
    #[error("on {target}: {what}: the SSH connection failed: {detail}")]
    Transport {
        target: String,
        what: String,
        detail: String,
    },
}

/// The keys the host offers, read with `ssh-keyscan` (no login, no session)
/// and fingerprinted with `ssh-keygen -l`: OpenSSH's own tools.
pub async fn offered_host_keys(
    target: &str,
    resolved: &ResolvedTarget,
    timeout: Duration,
) -> Result<Vec<HostKey>, SshError> {
    let scan = tokio::process::Command::new("ssh-keyscan")
        .arg("-T")
        .arg(timeout.as_secs().max(1).to_string())
        .arg("-p")
        .arg(resolved.port.to_string())
        .arg("--")
        .arg(&resolved.hostname)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(SshError::LocalClient)?;
    let lines: Vec<String> = String::from_utf8_lossy(&scan.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect();
    if lines.is_empty() {
        return Err(SshError::Unreachable {
            target: target.to_owned(),
            port: resolved.port,
            detail: format!(
                "ssh-keyscan read no host key ({})",
                String::from_utf8_lossy(&scan.stderr).trim()
            ),
        });
    }
    let fingerprints = fingerprints_of(&lines.join("\n")).await?;
    if fingerprints.len() != lines.len() {
        return Err(SshError::Other {
            target: target.to_owned(),
            detail: "ssh-keygen did not fingerprint every key the host offered".into(),
        });
    }
    Ok(lines
        .into_iter()
        .zip(fingerprints)
        .map(|(known_hosts_line, fingerprint)| HostKey {
            known_hosts_line,
            fingerprint,
        })
        .collect())
}

/// The fingerprints recorded for the host in the client's known_hosts files.
pub async fn recorded_fingerprints(resolved: &ResolvedTarget) -> Vec<String> {
    let mut found = Vec::new();
    for file in resolved.known_hosts_files.iter().filter(|f| f.exists()) {
        let out = tokio::process::Command::new("ssh-keygen")
            .arg("-l")
            .arg("-F")
            .arg(resolved.known_hosts_name())
            .arg("-f")
            .arg(file)
            .stdin(Stdio::null())
            .output()
            .await;
        if let Ok(out) = out {
            found.extend(sha256_tokens(&String::from_utf8_lossy(&out.stdout)));
        }
    }
    found.dedup();
    found
}

/// `ssh-keygen -l` over known_hosts lines: one fingerprint per line.
async fn fingerprints_of(known_hosts: &str) -> Result<Vec<String>, SshError> {
    let mut child = tokio::process::Command::new("ssh-keygen")
        .args(["-l", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(SshError::LocalClient)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(known_hosts.as_bytes())
            .await
            .map_err(SshError::LocalClient)?;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(SshError::LocalClient)?;
    Ok(sha256_tokens(&String::from_utf8_lossy(&out.stdout)))
}

/// Every `SHA256:...` word of `ssh-keygen -l` output, in order.
fn sha256_tokens(text: &str) -> Vec<String> {
    text.split_whitespace()
        .filter(|w| w.starts_with("SHA256:"))
        .map(str::to_owned)
        .collect()
}

/// Asks the local OpenSSH client how it would connect (`ssh -G`), so aliases,
/// `HostName`, `Port` and `User` from the admin's config are honoured.
pub async fn resolve(target: &str, opts: &SshOptions) -> Result<ResolvedTarget, SshError> {
    let mut cmd = tokio::process::Command::new("ssh");
    cmd.arg("-G");
    if let Some(config) = &opts.config_file {
        cmd.arg("-F").arg(config);
    }
    if let Some(port) = opts.port {
        cmd.arg("-p").arg(port.to_string());
    }
    if let Some(user) = &opts.user {
        cmd.arg("-l").arg(user);
    }
    let out = cmd
        .arg("--")
        .arg(target)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(SshError::LocalClient)?;
    if !out.status.success() {
        return Err(SshError::Other {
            target: target.to_owned(),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    parse_ssh_g(&String::from_utf8_lossy(&out.stdout)).ok_or_else(|| SshError::Other {
        target: target.to_owned(),
        detail: "`ssh -G` printed no hostname/port/user".to_owned(),
    })
}

/// Parses the `hostname`, `port` and `user` lines of `ssh -G` output.
pub fn parse_ssh_g(text: &str) -> Option<ResolvedTarget> {
    let mut hostname = None;
    let mut port = None;
    let mut user = None;
    let mut known_hosts_files = Vec::new();
    for line in text.lines() {
        match line.split_once(' ') {
            Some(("hostname", v)) => hostname = Some(v.trim().to_owned()),
            Some(("port", v)) => port = v.trim().parse().ok(),
            Some(("user", v)) => user = Some(v.trim().to_owned()),
            Some(("userknownhostsfile", v)) => {
                known_hosts_files.extend(v.split_whitespace().map(PathBuf::from))
            }
            _ => {}
        }
    }
    Some(ResolvedTarget {
        hostname: hostname?,
        port: port?,
        user: user?,
        known_hosts_files,
    })
}

/// Turns the OpenSSH client's complaint into an error that says what to do.
pub fn classify_connect_failure(target: &str, resolved: &ResolvedTarget, stderr: &str) -> SshError {
    let detail = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("Warning: Permanently added"))
        .rfind(|l| !l.chars().all(|c| c == '@'))
        .unwrap_or("ssh exited without saying why")
        .to_owned();
    let target = target.to_owned();
    if stderr.contains("REMOTE HOST IDENTIFICATION HAS CHANGED")
        || stderr.contains("Host key verification failed")
    {
        return SshError::HostKeyChanged {
            target,
            known_hosts_name: resolved.known_hosts_name(),
        };
    }
    if stderr.contains("Permission denied (") || stderr.contains("Too many authentication failures")
    {
        return SshError::AuthRejected {
            target,
            user: resolved.user.clone(),
            host: resolved.hostname.clone(),
            detail,
        };
    }
    if stderr.contains("Could not resolve hostname") {
        return SshError::UnknownHost { target, detail };
    }
    let unreachable = [
        "Connection refused",
        "Connection timed out",
        "Operation timed out",
        "No route to host",
        "Network is unreachable",
        "Connection closed by",
        "Connection reset by",
        "timed out during banner exchange",
    ];
    if unreachable.iter().any(|m| stderr.contains(m)) {
        return SshError::Unreachable {
            target,
            port: resolved.port,
            detail,
        };
    }
    SshError::Other { target, detail }
}

/// Seconds the SSH master connection outlives its last use.
const MASTER_IDLE_SECONDS: std::num::NonZeroUsize = std::num::NonZeroUsize::new(60).unwrap();

/// Output of one remote command.
#[derive(Debug)]
pub struct RemoteOutput {
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

/// An authenticated SSH connection to one host.
#[derive(Debug)]
pub struct Remote {
    session: Session,
    target: String,
    /// Prefix privileged commands with `sudo -n` (login user is not root).
    use_sudo: bool,
}

impl Remote {
    /// Opens the master connection. A host key seen for the first time is
    /// accepted and recorded; a changed one is refused (`accept-new`). With
    /// `pinned` (a known_hosts file holding the one key the operator named)
    /// only that key is accepted.
    pub async fn connect(
        target: &str,
        resolved: &ResolvedTarget,
        opts: &SshOptions,
        control_dir: &Path,
        pinned: Option<&Path>,
    ) -> Result<Remote, SshError> {
        let timeout = opts.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT);
        let mut builder = SessionBuilder::default();
        match pinned {
            Some(known_hosts) => builder
                .known_hosts_check(KnownHosts::Strict)
                .user_known_hosts_file(known_hosts),
            None => builder.known_hosts_check(KnownHosts::Add),
        };
        builder
            .connect_timeout(timeout)
            .server_alive_interval(Duration::from_secs(5))
            // A controller killed mid-bootstrap must not leave a master
            // connection (a root session on the host) behind for long.
            .control_persist(openssh::ControlPersist::IdleFor(MASTER_IDLE_SECONDS))
            .control_directory(control_dir);
        if let Some(user) = &opts.user {
            builder.user(user.clone());
        }
        if let Some(port) = opts.port {
            builder.port(port);
        }
        if let Some(key) = &opts.identity_file {
            builder.keyfile(key);
        }
        if let Some(config) = &opts.config_file {
            builder.config_file(config);
        }
        // ConnectTimeout bounds TCP connect and banner; this bounds the rest
        // (key exchange, authentication) too.
        let bound = timeout + Duration::from_secs(10);
        let session = match tokio::time::timeout(bound, builder.connect(target)).await {
            Err(_) => {
                return Err(SshError::Timeout {
                    target: target.to_owned(),
                    secs: bound.as_secs(),
                });
            }
            Ok(Err(openssh::Error::Connect(e))) => {
                return Err(classify_connect_failure(target, resolved, &e.to_string()));
            }
            Ok(Err(e)) => {
                return Err(SshError::Other {
                    target: target.to_owned(),
                    detail: error_chain(&e),
                });
            }
            Ok(Ok(session)) => session,
        };
        Ok(Remote {
            session,
            target: target.to_owned(),
            use_sudo: false,
        })
    }

    pub fn target(&self) -> &str {
        &self.target
    }

    /// Whether privileged commands go through `sudo -n`.
    pub fn set_use_sudo(&mut self, use_sudo: bool) {
        self.use_sudo = use_sudo;
    }

    /// Runs `argv` (each argument shell-quoted), optionally as root, optionally
    /// feeding `stdin`, and returns whatever it printed, whatever its status.
    pub async fn exec(
        &self,
        what: &str,
        argv: &[&str],
        privileged: bool,
        stdin: Option<&[u8]>,
    ) -> Result<RemoteOutput, SshError> {
        let transport = |e: openssh::Error| SshError::Transport {
            target: self.target.clone(),
            what: what.to_owned(),
            detail: error_chain(&e),
        };
        let (program, rest): (&str, Vec<&str>) = if privileged && self.use_sudo {
            ("sudo", [&["-n", "--"], argv].concat())
        } else {
            (argv[0], argv[1..].to_vec())
        };
        let mut cmd = self.session.command(program);
        cmd.args(rest)
            .stdin(if stdin.is_some() {
                openssh::Stdio::piped()
            } else {
                openssh::Stdio::null()
            })
            .stdout(openssh::Stdio::piped())
            .stderr(openssh::Stdio::piped());
        let mut child = cmd.spawn().await.map_err(transport)?;
        if let (Some(data), Some(mut pipe)) = (stdin, child.stdin().take()) {
            pipe.write_all(data)
                .await
                .map_err(|e| transport(openssh::Error::ChildIo(e)))?;
            pipe.shutdown()
                .await
                .map_err(|e| transport(openssh::Error::ChildIo(e)))?;
        }
        let out = child.wait_with_output().await.map_err(transport)?;
        Ok(RemoteOutput {
            status: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }

    /// Like [`Self::exec`] but a non-zero exit status is an error.
    pub async fn run(
        &self,
        what: &str,
        argv: &[&str],
        privileged: bool,
        stdin: Option<&[u8]>,
    ) -> Result<String, SshError> {
        let out = self.exec(what, argv, privileged, stdin).await?;
        if out.status == 0 {
            Ok(out.stdout)
        } else {
            Err(SshError::Remote {
                target: self.target.clone(),
                what: what.to_owned(),
                status: out.status,
                stderr: out.stderr,
            })
        }
    }

    /// Closes the master connection.
    pub async fn close(self) {
        let _ = self.session.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolved(port: u16) -> ResolvedTarget {
        ResolvedTarget {
            hostname: "10.1.2.3".into(),
            port,
            user: "pbx".into(),
            known_hosts_files: Vec::new(),
        }
    }

    #[test]
    fn ssh_g_output_is_parsed() {
        let text = "user pbx\nhostname 10.1.2.3\nport 2222\nidentityfile ~/.ssh/id_ed25519\n";
        assert_eq!(parse_ssh_g(text), Some(resolved(2222)));
        assert_eq!(parse_ssh_g("user pbx\n"), None);
    }

    #[test]
    fn openssh_complaints_become_actionable_errors() {
        let changed = "@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@\n\
            @    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @\n\
            @@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@\n\
            Host key for [10.1.2.3]:2222 has changed and you have requested strict checking.\n\
            Host key verification failed.";
        let err = classify_connect_failure("im1", &resolved(2222), changed);
        assert!(matches!(err, SshError::HostKeyChanged { .. }));
        assert!(
            err.to_string().contains("ssh-keygen -R [10.1.2.3]:2222"),
            "{err}"
        );
        let err = classify_connect_failure("im1", &resolved(22), changed);
        assert!(err.to_string().contains("ssh-keygen -R 10.1.2.3`"), "{err}");

        let denied = "Warning: Permanently added '[10.1.2.3]:2222' (ED25519) to the list of known hosts.\r\n\
                      pbx@10.1.2.3: Permission denied (publickey).";
        let err = classify_connect_failure("im1", &resolved(2222), denied);
        assert!(matches!(err, SshError::AuthRejected { .. }));
        assert!(
            err.to_string().contains("ssh-copy-id pbx@10.1.2.3"),
            "{err}"
        );

        let refused = "ssh: connect to host 10.1.2.3 port 2222: Connection refused";
        let err = classify_connect_failure("im1", &resolved(2222), refused);
        assert!(
            matches!(err, SshError::Unreachable { port: 2222, .. }),
            "{err}"
        );

        let dns = "ssh: Could not resolve hostname im9: Name or service not known";
        assert!(matches!(
            classify_connect_failure("im9", &resolved(22), dns),
            SshError::UnknownHost { .. }
        ));
        assert!(matches!(
            classify_connect_failure(
                "im1",
                &resolved(22),
                "kex_exchange_identification: something odd"
            ),
            SshError::Other { .. }
        ));
    }
}
