//! The side effects of `controller ha`: the Pacemaker and pcs commands, run
//! on this node, and the resource agent written to it.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use super::cib::{ClusterStatus, Observed};
use super::plan::Step;
use super::{AGENT_PATH, AGENT_SCRIPT, HaError};

/// Runs `program args`, its standard output on success.
async fn run(program: &str, args: &[&str]) -> Result<String, HaError> {
    let failed = |detail: String| HaError::Command {
        command: format!("{program} {}", args.join(" ")),
        detail,
    };
    let out = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| failed(format!("{e} (is Pacemaker installed on this node?)")))?;
    if !out.status.success() {
        let said = String::from_utf8_lossy(&out.stderr);
        let said = crate::text::printable(said.trim(), 2048).into_owned();
        return Err(failed(format!("{}: {said}", out.status)));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The cluster configuration as `plan` needs it.
pub async fn observe(resource: &str) -> Result<Observed, HaError> {
    let cib = run("cibadmin", &["--query"]).await?;
    super::cib::observe(&cib, resource)
}

/// How the daemon's resource and those it runs with stand.
pub async fn status(resource: &str, with: &[String]) -> Result<ClusterStatus, HaError> {
    let xml = run(
        "crm_mon",
        &["--one-shot", "--output-as=xml", "--include=all"],
    )
    .await?;
    super::cib::status(&xml, resource, with)
}

/// After the agent was written on this node: has Pacemaker probe the
/// daemon's resource here again (a probe made before the agent was here
/// found it "not installed", which keeps the daemon off this node for good).
pub async fn reprobe_here(resource: &str) -> Result<(), HaError> {
    let node = run("crm_node", &["-n"]).await?;
    run(
        "crm_resource",
        &["--refresh", "--resource", resource, "--node", node.trim()],
    )
    .await
    .map(drop)
}

/// Writes the resource agent where Pacemaker finds it, when it differs;
/// whether it was written.
pub fn install_agent() -> Result<bool, HaError> {
    install_agent_at(Path::new(AGENT_PATH))
}

fn install_agent_at(path: &Path) -> Result<bool, HaError> {
    let failed = |source| HaError::Install {
        path: path.display().to_string(),
        source,
    };
    if std::fs::read(path).is_ok_and(|found| found == AGENT_SCRIPT.as_bytes()) {
        return Ok(false);
    }
    let dir = path.parent().unwrap_or(Path::new("/"));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(failed)?;
    imfleet_certs::storage::write_atomically(path, AGENT_SCRIPT.as_bytes(), 0o755)
        .map_err(failed)?;
    Ok(true)
}

/// Applies `steps` as one change: each on a scratch copy of the CIB, which
/// is then pushed as a diff against what it was copied from (a change made
/// by someone else meanwhile is kept, never overwritten). The cluster never
/// sees a half-made configuration.
pub async fn apply(steps: &[Step]) -> Result<(), HaError> {
    if steps.is_empty() {
        return Ok(());
    }
    let scratch = ScratchDir::new()?;
    let cib = scratch.path.join("cib.xml");
    let original = scratch.path.join("original.xml");
    let cib_arg = cib.display().to_string();
    run("pcs", &["cluster", "cib", &cib_arg]).await?;
    std::fs::copy(&cib, &original).map_err(|source| HaError::Install {
        path: original.display().to_string(),
        source,
    })?;
    for step in steps {
        let mut args = vec!["-f", cib_arg.as_str()];
        args.extend(step.pcs.iter().map(String::as_str));
        run("pcs", &args).await?;
    }
    let against = format!("diff-against={}", original.display());
    run("pcs", &["cluster", "cib-push", &cib_arg, &against]).await?;
    Ok(())
}

/// A private directory for the scratch CIB, removed when dropped.
struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    fn new() -> Result<ScratchDir, HaError> {
        let path = std::env::temp_dir().join(format!("imfleet-ha-{}", std::process::id()));
        // create, not reuse: a directory someone else made is refused.
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|source| HaError::Install {
                path: path.display().to_string(),
                source,
            })?;
        Ok(ScratchDir { path })
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_is_written_once_executable_and_rewritten_when_changed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("resource.d/imfleet/controller");
        assert!(install_agent_at(&path).unwrap());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755);
        assert!(!install_agent_at(&path).unwrap());
        std::fs::write(&path, "old").unwrap();
        assert!(install_agent_at(&path).unwrap());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), AGENT_SCRIPT);
    }
}
