//! Before a rollout changes anything: every target has a deployment to
//! upgrade, an agent that answers and may apply, and passes preflight for
//! the new version; the image archives are readable and name their image.
//! The result is the plan a new rollout records (and `--dry-run` prints).

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::decide::batches;
use super::host::{HostTarget, deploy_request};
use super::{RolloutError, UpgradeRequest};
use crate::agent_client::Feature;
use crate::deployment::run::{Gate, check_agent, preflight_gate};
use crate::fleet::Fleet;
use crate::preflight::Check;
use crate::store::{HostRecord, PlannedStep};

/// One host's line of the plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct PlanLine {
    pub host: String,
    pub batch: u32,
    pub canary: bool,
    pub from_image: String,
    pub to_image: String,
    pub from_db_image: String,
    pub to_db_image: String,
    /// The revision the host returns to on rollback.
    pub from_revision: Option<i64>,
}

impl PlanLine {
    pub(super) fn of(target: &HostTarget, batch: u32, canary: bool) -> PlanLine {
        PlanLine {
            host: target.host.clone(),
            batch,
            canary,
            from_image: target.from.image.clone(),
            to_image: target.to.image.clone(),
            from_db_image: target.from.db_image.clone(),
            to_db_image: target.to.db_image.clone(),
            from_revision: target.from_revision,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct RolloutPlan {
    pub lines: Vec<PlanLine>,
    pub max_parallel: u32,
    /// The IM image every host gets (from `--image` or the archive).
    pub image: Option<String>,
    /// Preflight failures `--force` overrode, and warnings, per host.
    pub overridden: Vec<(String, Check)>,
    pub warnings: Vec<(String, Check)>,
}

impl RolloutPlan {
    pub fn steps(&self) -> Vec<PlannedStep> {
        self.lines
            .iter()
            .map(|l| PlannedStep {
                host: l.host.clone(),
                batch: l.batch,
                canary: l.canary,
                from_revision: l.from_revision,
            })
            .collect()
    }
}

/// The image tags a `docker save` archive names (its `manifest.json`).
pub fn archive_tags(path: &Path) -> std::io::Result<Vec<String>> {
    use std::io::{Read, Seek, SeekFrom};
    let invalid =
        |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    let mut file = std::fs::File::open(path)?;
    let mut header = [0u8; 512];
    loop {
        if file.read_exact(&mut header).is_err() || header.iter().all(|b| *b == 0) {
            return Err(invalid("no manifest.json: not a `docker save` archive"));
        }
        let name_end = header[..100].iter().position(|b| *b == 0).unwrap_or(100);
        let name = String::from_utf8_lossy(&header[..name_end]).into_owned();
        let size_text = String::from_utf8_lossy(&header[124..136]);
        let size = u64::from_str_radix(size_text.trim_matches(|c: char| c == '\0' || c == ' '), 8)
            .map_err(|_| invalid("a malformed tar header"))?;
        if name.trim_start_matches("./") == "manifest.json" {
            if size > 16 << 20 {
                return Err(invalid("manifest.json is implausibly large"));
            }
            let mut text = vec![0u8; size as usize];
            file.read_exact(&mut text)?;
            let manifest: Vec<serde_json::Value> =
                serde_json::from_slice(&text).map_err(|_| invalid("manifest.json is not JSON"))?;
            return Ok(manifest
                .iter()
                .filter_map(|m| m["RepoTags"].as_array())
                .flatten()
                .filter_map(|t| t.as_str().map(str::to_owned))
                .collect());
        }
        file.seek(SeekFrom::Current(size.div_ceil(512) as i64 * 512))?;
    }
}

/// The IM image a request installs: `--image`, else the one image the
/// single archive names.
pub fn target_image(request: &UpgradeRequest) -> Result<Option<String>, RolloutError> {
    if request.image.is_some() {
        return Ok(request.image.clone());
    }
    match request.image_files.as_slice() {
        [] => Ok(None),
        [one] => {
            let tags = archive_tags(one).map_err(|source| RolloutError::ImageFile {
                path: one.clone(),
                source,
            })?;
            match tags.as_slice() {
                [tag] => Ok(Some(tag.clone())),
                _ => Err(RolloutError::Usage(format!(
                    "{} names {} images ({}); say which with --image",
                    one.display(),
                    tags.len(),
                    tags.join(", ")
                ))),
            }
        }
        _ => Err(RolloutError::Usage(
            "with several --image-file archives, say which image the IM runs with --image".into(),
        )),
    }
}

fn check_files(files: &[PathBuf]) -> Result<(), RolloutError> {
    for path in files {
        std::fs::File::open(path).map_err(|source| RolloutError::ImageFile {
            path: path.clone(),
            source,
        })?;
    }
    Ok(())
}

/// Each host's target and the plan, after checking every host; nothing is
/// changed anywhere. Hosts are planned in the order given.
pub async fn prepare(
    fleet: &Fleet,
    hosts: &[HostRecord],
    request: &UpgradeRequest,
) -> Result<(RolloutPlan, Vec<HostTarget>), RolloutError> {
    check_files(&request.image_files)?;
    request.timing.check().map_err(RolloutError::Usage)?;
    if hosts.is_empty() {
        return Err(RolloutError::Usage("no hosts to upgrade".into()));
    }
    let image = target_image(request)?;
    let mut targets = Vec::new();
    for host in hosts {
        targets.push(
            HostTarget::load(
                fleet.store(),
                host,
                None,
                image.as_deref(),
                request.db_image.as_deref(),
            )
            .await?,
        );
    }
    // Agents and preflight, all hosts at once; the first problem stops it.
    let gates = futures::future::join_all(
        hosts
            .iter()
            .zip(&targets)
            .map(|(host, target)| check_host(fleet, host, target, request)),
    )
    .await;
    let mut overridden = Vec::new();
    let mut warnings = Vec::new();
    for (target, gate) in targets.iter().zip(gates) {
        let gate = gate?;
        let name = &target.host;
        overridden.extend(gate.failed.into_iter().map(|c| (name.clone(), c)));
        warnings.extend(gate.warnings.into_iter().map(|c| (name.clone(), c)));
    }
    let lines = batches(
        hosts.len(),
        request.canaries as usize,
        request.limits.max_parallel,
    )
    .into_iter()
    .zip(&targets)
    .map(|((batch, canary), t)| PlanLine::of(t, batch, canary))
    .collect();
    Ok((
        RolloutPlan {
            lines,
            max_parallel: request.limits.max_parallel,
            image,
            overridden,
            warnings,
        },
        targets,
    ))
}

/// Kept free on the Engine's filesystem beyond what the archives take.
const SPACE_HEADROOM: u64 = 256 << 20;

/// Whether the Engine's filesystem (`available` bytes free) can take the
/// archives: each is spooled and then loaded, so twice their size at the
/// peak when the spool shares the filesystem, plus headroom.
pub fn check_space(
    host: &str,
    root: &str,
    available: u64,
    archive_bytes: u64,
) -> Result<(), RolloutError> {
    if archive_bytes == 0 {
        return Ok(());
    }
    let needed = archive_bytes
        .saturating_mul(2)
        .saturating_add(SPACE_HEADROOM);
    if available >= needed {
        return Ok(());
    }
    Err(RolloutError::NoSpace {
        host: host.to_owned(),
        root: if root.is_empty() {
            "the Docker data root".into()
        } else {
            root.to_owned()
        },
        needed_mb: needed / 1_000_000,
        available_mb: available / 1_000_000,
    })
}

fn archive_bytes(files: &[PathBuf]) -> u64 {
    files
        .iter()
        .filter_map(|f| std::fs::metadata(f).ok())
        .map(|m| m.len())
        .sum()
}

/// One host: its agent answers, may apply in these directories, has room
/// for the new images, and the host passes preflight for the new version
/// (unless forced).
async fn check_host(
    fleet: &Fleet,
    host: &HostRecord,
    target: &HostTarget,
    request: &UpgradeRequest,
) -> Result<Gate, RolloutError> {
    let deploy_error = |e| RolloutError::Deploy(host.name.clone(), Box::new(e));
    let agent = fleet
        .connect(host)
        .await
        .map_err(|e| deploy_error(e.into()))?;
    let mut deploy = deploy_request(
        &target.host,
        &target.to,
        request.stop_grace_seconds,
        request.timing.healthy_deadline,
    )?;
    deploy.force = request.force;
    check_agent(&agent, &deploy).await.map_err(deploy_error)?;
    let agent_error = |e: crate::agent_client::AgentError| deploy_error(e.into());
    agent
        .require(Feature::PrepareImages)
        .await
        .map_err(agent_error)?;
    let space = agent
        .prepare_images(Vec::new())
        .await
        .map_err(agent_error)?;
    check_space(
        &host.name,
        &space.docker_root,
        space.docker_root_available_bytes,
        archive_bytes(&request.image_files),
    )?;
    preflight_gate(&agent, &deploy).await.map_err(deploy_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archives_need_twice_their_size_and_headroom() {
        let gb = 1_000_000_000;
        assert!(
            check_space("im1", "/var/lib/docker", 0, 0).is_ok(),
            "nothing to load"
        );
        assert!(check_space("im1", "/var/lib/docker", 3 * gb, gb).is_ok());
        let err = check_space("im1", "/var/lib/docker", 2 * gb, gb).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("im1") && text.contains("/var/lib/docker"),
            "{text}"
        );
        assert!(
            text.contains("2268 MB") && text.contains("2000 MB"),
            "{text}"
        );
        assert!(
            check_space("im1", "", 10, 1)
                .unwrap_err()
                .to_string()
                .contains("Docker data root")
        );
    }
}
