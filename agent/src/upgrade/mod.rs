//! The agent replacing itself, over the channel the controller already has:
//! no SSH. The new binary is streamed in, checked on the host (size, sha256,
//! ELF architecture, and the version and protocol revision it reports when
//! run with `version --json`), the running binary is kept as
//! `agent.previous`, and the new one is renamed into place. Then it is
//! restarted by whoever supervises the agent, watched by code that is not
//! restarted with it (the previous binary in a transient systemd unit of
//! its own, or the agent's own supervisor): the new agent must start
//! serving within [`watch::START_DEADLINE`] and stay up for
//! [`watch::GRACE`], or the host itself puts the previous binary back and
//! restarts it. What happened is kept in a note the next agent reports in
//! every ping. The IM containers are not touched.

pub mod note;
pub mod watch;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use imfleet_proto::agent::v1::{AgentBinaryChunk, AgentBinaryHeader};
use imfleet_proto::model::layout::Layout;
use sha2::{Digest, Sha256};

pub use note::{Note, State, last_upgrade, note_serving};
pub use watch::watch_under_systemd;

/// The exit status with which a serving agent asks its own supervisor to
/// start the new binary (and watch it).
pub const EXIT_FOR_UPGRADE: u8 = 75;
/// The largest agent binary accepted.
pub const MAX_BINARY_BYTES: u64 = 512 * 1024 * 1024;
/// Longest silence between two chunks.
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the new binary may take to say what it is.
const VERSION_TIMEOUT: Duration = Duration::from_secs(10);
/// The transient unit the watcher runs in under systemd.
pub const WATCH_UNIT: &str = "imfleet-agent-upgrade.service";

#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("the upload did not start with a header")]
    NoHeader,
    #[error("the binary is {0} bytes; the limit is {MAX_BINARY_BYTES}")]
    TooLarge(u64),
    #[error("{0}")]
    Refused(String),
    #[error("the uploaded binary is corrupt: {0}; nothing was changed")]
    Corrupt(String),
    #[error(
        "the uploaded binary is not one this host can run as its agent: {0}; nothing was changed"
    )]
    NotAnAgent(String),
    #[error("receiving the binary: {0}")]
    Transport(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> UpgradeError {
    let what = what.into();
    move |source| UpgradeError::Io { what, source }
}

/// A serving agent's wish to be restarted by its own supervisor (which then
/// starts the new binary): the server shuts down and exits with
/// [`EXIT_FOR_UPGRADE`].
#[derive(Debug, Clone, Default)]
pub struct RestartRequest {
    wanted: Arc<AtomicBool>,
    notify: Arc<tokio::sync::Notify>,
}

impl RestartRequest {
    pub fn request(&self) {
        self.wanted.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    pub fn is_wanted(&self) -> bool {
        self.wanted.load(Ordering::Acquire)
    }

    /// Completes when a restart is requested.
    pub async fn wanted(&self) {
        loop {
            let notified = self.notify.notified();
            if self.is_wanted() {
                return;
            }
            notified.await;
        }
    }
}

/// What was installed, for the reply.
#[derive(Debug, Clone)]
pub struct Installed {
    pub from_version: String,
    pub to_version: String,
}

/// Receives, checks and installs a new agent binary, and starts its watch.
/// `supervision` is how this agent runs ("systemd" or "supervisor"); under
/// the supervisor the caller requests the restart once it has answered.
/// `trusted_ca_pem` is the CA this agent trusts: the binary must carry its
/// signature.
pub async fn receive(
    layout: &Layout,
    supervision: &str,
    trusted_ca_pem: &str,
    mut chunks: impl futures::Stream<Item = Result<AgentBinaryChunk, tonic::Status>> + Unpin,
) -> Result<Installed, UpgradeError> {
    if !matches!(supervision, "systemd" | "supervisor") {
        return Err(UpgradeError::Refused(format!(
            "this agent runs without a supervisor ({supervision}); it cannot restart itself: run `controller bootstrap` for the host"
        )));
    }
    if let Some(note) = note::read(layout)
        && note.state.is_under_way()
    {
        return Err(UpgradeError::Refused(format!(
            "an agent upgrade to {} is under way on this host; wait for it to finish",
            note.to_version
        )));
    }
    let mut next = async || {
        tokio::time::timeout(IDLE_TIMEOUT, chunks.next())
            .await
            .map_err(|_| {
                UpgradeError::Transport(format!("nothing arrived for {} s", IDLE_TIMEOUT.as_secs()))
            })
    };
    let first = next()
        .await?
        .ok_or(UpgradeError::NoHeader)?
        .map_err(|s| UpgradeError::Transport(s.message().to_owned()))?;
    let header: AgentBinaryHeader = first.header.ok_or(UpgradeError::NoHeader)?;
    if header.size > MAX_BINARY_BYTES {
        return Err(UpgradeError::TooLarge(header.size));
    }
    // An older protocol would drop what this one enforces (the controller
    // list above all); only the host's own rollback goes back.
    if header.protocol_revision < crate::protocol_revision() {
        return Err(UpgradeError::Refused(format!(
            "the binary speaks protocol revision {}, older than this agent's {}: downgrades are refused",
            header.protocol_revision,
            crate::protocol_revision()
        )));
    }
    let bin_dir = layout.bin_dir();
    // In the binary's own directory (root's), so the swap is one rename;
    // removed on drop unless it is installed.
    let mut upload = tempfile::Builder::new()
        .prefix(".agent.upload-")
        .tempfile_in(&bin_dir)
        .map_err(io(format!(
            "create an upload file in {}",
            bin_dir.display()
        )))?;
    let mut hasher = Sha256::new();
    let mut received = 0u64;
    let mut write = |data: &[u8]| -> Result<(), UpgradeError> {
        received += data.len() as u64;
        if received > header.size {
            return Err(UpgradeError::Corrupt(format!(
                "more than the announced {} bytes arrived",
                header.size
            )));
        }
        hasher.update(data);
        upload.write_all(data).map_err(io("write the upload"))
    };
    write(&first.data)?;
    while let Some(chunk) = next().await? {
        let chunk = chunk.map_err(|s| UpgradeError::Transport(s.message().to_owned()))?;
        write(&chunk.data)?;
    }
    upload.as_file().sync_all().map_err(io("sync the upload"))?;
    // Closed before it is run (a file open for writing cannot be executed),
    // still removed on drop until it is installed.
    let upload = upload.into_temp_path();
    let digest = hex::encode(hasher.finalize());
    if received != header.size || digest != header.sha256 {
        return Err(UpgradeError::Corrupt(format!(
            "received {received} of {} bytes with sha256 {digest}, expected {}",
            header.size, header.sha256
        )));
    }
    let message =
        imfleet_certs::agent_binary_message(&digest, &header.version, header.protocol_revision);
    if !imfleet_certs::verify_ca_signature(trusted_ca_pem, &message, &header.signature) {
        return Err(UpgradeError::NotAnAgent(
            "it is not signed by the CA this agent trusts (the controller signs agent binaries with the fleet CA's key)".into(),
        ));
    }
    check_elf(&upload)?;
    std::fs::set_permissions(&upload, std::fs::Permissions::from_mode(0o755))
        .map_err(io("make the upload executable"))?;
    let info = build_info(&upload).await?;
    if info.version != header.version || info.protocol_revision != header.protocol_revision {
        return Err(UpgradeError::NotAnAgent(format!(
            "it says it is {} (protocol revision {}), the controller announced {} (revision {})",
            info.version, info.protocol_revision, header.version, header.protocol_revision
        )));
    }

    // The swap: the running binary kept as agent.previous, the new one
    // renamed into place. The note is written first: an agent that dies
    // between the two finds it and the watcher still runs.
    let from_version = crate::version().to_owned();
    let binary = layout.binary();
    link_over(&binary, &bin_dir.join(PREVIOUS))?;
    note::write(
        layout,
        &Note::pending(&from_version, &info.version, info.protocol_revision),
    )?;
    if let Err(e) = upload.persist(&binary) {
        note::clear(layout);
        return Err(io(format!("install {}", binary.display()))(e.error));
    }
    if supervision == "systemd" {
        start_systemd_watch(layout).await?;
    }
    tracing::info!(from = %from_version, to = %info.version, "agent binary replaced; restarting");
    Ok(Installed {
        from_version,
        to_version: info.version,
    })
}

/// The kept previous binary, beside `agent`.
pub const PREVIOUS: &str = "agent.previous";
/// A binary that failed its upgrade, kept for a look.
pub const FAILED: &str = "agent.failed";

/// Makes `to` the same file as `from` (a hard link renamed over `to`, so
/// `to` is never missing).
fn link_over(from: &Path, to: &Path) -> Result<(), UpgradeError> {
    let tmp = to.with_extension("linking");
    let _ = std::fs::remove_file(&tmp);
    std::fs::hard_link(from, &tmp).map_err(io(format!("link {}", from.display())))?;
    std::fs::rename(&tmp, to).map_err(io(format!("rename onto {}", to.display())))
}

/// Puts the previous binary back (the failed one kept as `agent.failed`).
pub fn restore_previous(layout: &Layout) -> Result<(), UpgradeError> {
    let bin = layout.bin_dir();
    let binary = layout.binary();
    link_over(&binary, &bin.join(FAILED))?;
    link_over(&bin.join(PREVIOUS), &binary)
}

/// The ELF machine this agent was built for.
fn elf_machine() -> Option<u16> {
    match std::env::consts::ARCH {
        "x86_64" => Some(62),
        "aarch64" => Some(183),
        _ => None,
    }
}

/// A 64-bit little-endian executable for this machine's architecture.
fn check_elf(path: &Path) -> Result<(), UpgradeError> {
    let mut head = [0u8; 20];
    use std::io::Read;
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .map_err(|_| UpgradeError::NotAnAgent("it is too short to be an executable".into()))?;
    let machine = u16::from_le_bytes([head[18], head[19]]);
    let executable = u16::from_le_bytes([head[16], head[17]]);
    if head[..4] != *b"\x7fELF" || head[4] != 2 || head[5] != 1 {
        return Err(UpgradeError::NotAnAgent(
            "it is not a 64-bit little-endian ELF executable".into(),
        ));
    }
    if !matches!(executable, 2 | 3) {
        return Err(UpgradeError::NotAnAgent("it is not an executable".into()));
    }
    if Some(machine) != elf_machine() {
        return Err(UpgradeError::NotAnAgent(format!(
            "it is built for ELF machine {machine}, this host is {}",
            std::env::consts::ARCH
        )));
    }
    Ok(())
}

/// What the new binary says it is (`version --json`), with a clean
/// environment and a deadline.
async fn build_info(path: &Path) -> Result<crate::cli::BuildInfo, UpgradeError> {
    let run = tokio::process::Command::new(path)
        .args(["version", "--json"])
        .env_clear()
        .env("PATH", crate::supervision::SAFE_PATH)
        .current_dir("/")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(VERSION_TIMEOUT, run)
        .await
        .map_err(|_| UpgradeError::NotAnAgent("`version --json` did not answer".into()))?
        .map_err(|e| UpgradeError::NotAnAgent(format!("it does not run here ({e})")))?;
    if !out.status.success() {
        return Err(UpgradeError::NotAnAgent(format!(
            "`version --json` failed ({})",
            out.status
        )));
    }
    serde_json::from_slice(&out.stdout)
        .map_err(|e| UpgradeError::NotAnAgent(format!("`version --json` printed no version ({e})")))
}

/// Starts the watcher in a transient unit of its own (outside the agent's
/// unit, so restarting the agent does not kill it), running the previous
/// binary: known to work, whatever the new one does.
async fn start_systemd_watch(layout: &Layout) -> Result<(), UpgradeError> {
    // A watcher that failed earlier leaves its unit behind until reset.
    let _ = tokio::process::Command::new("systemctl")
        .args(["reset-failed", WATCH_UNIT])
        .output()
        .await;
    let previous = layout.bin_dir().join(PREVIOUS);
    let out = tokio::process::Command::new("systemd-run")
        .arg(format!("--unit={WATCH_UNIT}"))
        .args(["--collect", "--quiet", "--property=Type=exec"])
        .arg(format!("--setenv=PATH={}", crate::supervision::SAFE_PATH))
        .arg(&previous)
        .arg("--root")
        .arg(layout.root())
        .arg("upgrade-watch")
        .output()
        .await
        .map_err(io("run systemd-run"))?;
    if !out.status.success() {
        // Nothing will restart the new binary: put the old one back now.
        restore_previous(layout)?;
        note::clear(layout);
        return Err(UpgradeError::Refused(format!(
            "cannot start the upgrade's watcher ({}); the running binary is kept",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
