//! The Docker Engine operations deployments need, over the Engine API.

use std::collections::HashMap;
use std::time::Duration;

use bollard::Docker;
use bollard::models::{
    ContainerCreateBody, ContainerSummaryStateEnum, HealthConfig, HealthStatusEnum, HostConfig,
    RestartPolicy, RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    CreateContainerOptions, CreateImageOptions, ListContainersOptions, LogsOptions,
    RemoveContainerOptions, RenameContainerOptions, StopContainerOptions,
};
use futures::StreamExt;
use imfleet_proto::agent::v1::{ContainerSpec, ContainerStatus};

/// Labels imfleet puts on every container it manages.
pub const LABEL_DEPLOYMENT: &str = "io.imfleet.deployment";
pub const LABEL_ORDER: &str = "io.imfleet.order";
pub const LABEL_CONFIG_HASH: &str = "io.imfleet.config-hash";

pub type DockerError = bollard::errors::Error;

/// Time the Engine gets beyond a stop's grace period to kill the container
/// and answer (a busy host may take a while to reap a large process).
const STOP_MARGIN: Duration = Duration::from_secs(60);

/// How long the client waits for the Engine to answer a stop: never less
/// than the grace period the Engine itself waits before killing.
pub fn stop_timeout(grace: Duration) -> Duration {
    grace + STOP_MARGIN
}

pub fn is_not_found(err: &DockerError) -> bool {
    matches!(
        err,
        DockerError::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

/// A container of a deployment as the Engine reports it.
#[derive(Debug, Clone)]
pub struct Managed {
    pub name: String,
    pub order: u32,
    pub config_hash: String,
    pub image_id: String,
    pub running: bool,
}

/// Containers labelled as part of `deployment` (running or not), in start order.
pub async fn managed(docker: &Docker, deployment: &str) -> Result<Vec<Managed>, DockerError> {
    let filters: HashMap<String, Vec<String>> = [(
        "label".to_owned(),
        vec![format!("{LABEL_DEPLOYMENT}={deployment}")],
    )]
    .into();
    let list = docker
        .list_containers(Some(ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        }))
        .await?;
    let mut out: Vec<Managed> = list
        .into_iter()
        .filter_map(|c| {
            let name = c.names?.first()?.trim_start_matches('/').to_owned();
            let label = |key: &str| c.labels.as_ref().and_then(|l| l.get(key)).cloned();
            let order = label(LABEL_ORDER)
                .and_then(|o| o.parse().ok())
                .unwrap_or(u32::MAX);
            Some(Managed {
                name,
                order,
                config_hash: label(LABEL_CONFIG_HASH).unwrap_or_default(),
                image_id: c.image_id.clone().unwrap_or_default(),
                running: c.state == Some(ContainerSummaryStateEnum::RUNNING),
            })
        })
        .collect();
    out.sort_by_key(|m| (m.order, m.name.clone()));
    Ok(out)
}

/// Whether a container of that name exists, and if so its deployment label.
pub async fn owner_of(docker: &Docker, name: &str) -> Result<Option<Option<String>>, DockerError> {
    match docker.inspect_container(name, None).await {
        Ok(c) => Ok(Some(
            c.config
                .and_then(|cfg| cfg.labels)
                .and_then(|l| l.get(LABEL_DEPLOYMENT).cloned()),
        )),
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// `image` as it may stand in an Engine URL path (`/images/{image}/json`,
/// which bollard does not encode): Docker's reference grammar only, which
/// has no `..`, `?`, `#`, `%` or space, so the path cannot leave `/images/`.
/// Requests are checked on entry; this holds for every other source too.
fn engine_image(image: &str) -> Result<&str, DockerError> {
    if imfleet_proto::model::reference::valid_image_reference(image) {
        Ok(image)
    } else {
        Err(DockerError::DockerResponseServerError {
            status_code: 400,
            message: format!("`{}` is not an image reference", image.escape_debug()),
        })
    }
}

/// The id (`sha256:...`) of a local image, if present.
pub async fn image_id(docker: &Docker, image: &str) -> Result<Option<String>, DockerError> {
    match docker.inspect_image(engine_image(image)?).await {
        Ok(i) => Ok(i.id),
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

pub async fn image_present(docker: &Docker, image: &str) -> Result<bool, DockerError> {
    match docker.inspect_image(engine_image(image)?).await {
        Ok(_) => Ok(true),
        Err(e) if is_not_found(&e) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Pulls `image`, reporting "downloaded of total" bytes as the Engine tells them.
pub async fn pull(
    docker: &Docker,
    image: &str,
    mut progress: impl FnMut(u64, u64),
) -> Result<(), DockerError> {
    let (name, tag) = match image.rsplit_once(':') {
        Some((n, t)) if !t.contains('/') => (n.to_owned(), t.to_owned()),
        _ => (image.to_owned(), "latest".to_owned()),
    };
    let mut stream = docker.create_image(
        Some(CreateImageOptions {
            from_image: Some(name),
            tag: Some(tag),
            ..Default::default()
        }),
        None,
        None,
    );
    // Per layer: the latest (current, total) the Engine reported.
    let mut layers: HashMap<String, (u64, u64)> = HashMap::new();
    while let Some(item) = stream.next().await {
        let info = item?;
        if let (Some(id), Some(detail)) = (info.id, info.progress_detail) {
            let current = detail.current.unwrap_or(0).max(0) as u64;
            let total = detail.total.unwrap_or(0).max(0) as u64;
            if total > 0 {
                layers.insert(id, (current, total));
                let (done, all) = layers
                    .values()
                    .fold((0, 0), |(d, a), (c, t)| (d + c, a + t));
                progress(done, all);
            }
        }
    }
    Ok(())
}

/// Creates (not starts) a container from its spec, with secrets substituted.
pub async fn create(
    docker: &Docker,
    spec: &ContainerSpec,
    labels: HashMap<String, String>,
    resolve: impl Fn(&str) -> Result<String, super::secrets::UnknownSecret>,
) -> Result<(), super::DeployError> {
    let resolve_all = |items: &[String]| -> Result<Vec<String>, super::DeployError> {
        items
            .iter()
            .map(|s| resolve(s).map_err(super::DeployError::from))
            .collect()
    };
    let mut env: Vec<String> = Vec::new();
    let mut keys: Vec<&String> = spec.env.keys().collect();
    keys.sort();
    for k in keys {
        env.push(format!("{k}={}", resolve(&spec.env[k])?));
    }
    let mut all_labels = spec.labels.clone();
    all_labels.extend(labels);
    let health = spec
        .health
        .as_ref()
        .filter(|h| !h.test.is_empty())
        .map(|h| {
            let secs = |s: u32| Some(i64::from(s) * 1_000_000_000);
            HealthConfig {
                test: Some(h.test.clone()),
                interval: secs(h.interval_seconds.max(1)),
                timeout: secs(h.timeout_seconds.max(1)),
                retries: Some(i64::from(h.retries.max(1))),
                start_period: secs(h.start_period_seconds),
                start_interval: None,
            }
        });
    let binds = spec
        .mounts
        .iter()
        .map(|m| {
            format!(
                "{}:{}{}",
                m.source,
                m.target,
                if m.read_only { ":ro" } else { "" }
            )
        })
        .collect();
    let body = ContainerCreateBody {
        image: Some(spec.image.clone()),
        entrypoint: (!spec.entrypoint.is_empty())
            .then(|| resolve_all(&spec.entrypoint))
            .transpose()?,
        cmd: (!spec.command.is_empty())
            .then(|| resolve_all(&spec.command))
            .transpose()?,
        env: Some(env),
        user: (!spec.user.is_empty()).then(|| spec.user.clone()),
        labels: Some(all_labels),
        healthcheck: health,
        stop_timeout: Some(i64::from(spec.stop_grace_seconds.max(1))),
        host_config: Some(HostConfig {
            binds: Some(binds),
            network_mode: spec.host_network.then(|| "host".to_owned()),
            restart_policy: Some(RestartPolicy {
                name: Some(if spec.one_shot {
                    RestartPolicyNameEnum::NO
                } else {
                    RestartPolicyNameEnum::UNLESS_STOPPED
                }),
                maximum_retry_count: None,
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    docker
        .create_container(
            Some(CreateContainerOptions {
                name: Some(spec.name.clone()),
                ..Default::default()
            }),
            body,
        )
        .await?;
    Ok(())
}

pub async fn start(docker: &Docker, name: &str) -> Result<(), DockerError> {
    docker.start_container(name, None).await
}

/// Stops with a grace period; a container that is already stopped is fine.
/// The Engine answers only once the container is gone, so the request may
/// take the whole grace period and then some.
pub async fn stop(docker: &Docker, name: &str, grace: Duration) -> Result<(), DockerError> {
    match docker
        .clone()
        .with_timeout(stop_timeout(grace))
        .stop_container(
            name,
            Some(StopContainerOptions {
                t: Some(grace.as_secs().min(i32::MAX as u64) as i32),
                signal: None,
            }),
        )
        .await
    {
        Ok(()) => Ok(()),
        Err(DockerError::DockerResponseServerError {
            status_code: 304, ..
        }) => Ok(()),
        Err(e) if is_not_found(&e) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Removes (forcefully); a missing container is fine.
pub async fn remove(docker: &Docker, name: &str) -> Result<(), DockerError> {
    match docker
        .remove_container(
            name,
            Some(RemoveContainerOptions {
                force: true,
                ..Default::default()
            }),
        )
        .await
    {
        Err(e) if is_not_found(&e) => Ok(()),
        other => other,
    }
}

pub async fn rename(docker: &Docker, from: &str, to: &str) -> Result<(), DockerError> {
    docker
        .rename_container(
            from,
            RenameContainerOptions {
                name: to.to_owned(),
            },
        )
        .await
}

/// The last `tail` log lines (stdout and stderr) of a container.
pub async fn tail_logs(docker: &Docker, name: &str, tail: usize) -> Vec<String> {
    let mut stream = docker.logs(
        name,
        Some(LogsOptions {
            stdout: true,
            stderr: true,
            tail: tail.to_string(),
            ..Default::default()
        }),
    );
    let mut lines = Vec::new();
    while let Some(Ok(chunk)) = stream.next().await {
        for line in chunk.to_string().lines() {
            lines.push(line.to_owned());
        }
    }
    lines
}

/// State and health of one container (`state = "missing"` when absent).
pub async fn status(
    docker: &Docker,
    name: &str,
) -> Result<(ContainerStatus, Vec<String>), DockerError> {
    let c = match docker.inspect_container(name, None).await {
        Ok(c) => c,
        Err(e) if is_not_found(&e) => {
            return Ok((
                ContainerStatus {
                    name: name.to_owned(),
                    state: "missing".into(),
                    health: "none".into(),
                    ..Default::default()
                },
                Vec::new(),
            ));
        }
        Err(e) => return Err(e),
    };
    let state = c.state.clone().unwrap_or_default();
    let health = state.health.clone().unwrap_or_default();
    let health_status = match health.status {
        Some(HealthStatusEnum::HEALTHY) => "healthy",
        Some(HealthStatusEnum::UNHEALTHY) => "unhealthy",
        Some(HealthStatusEnum::STARTING) => "starting",
        _ => "none",
    };
    let health_output: Vec<String> = health
        .log
        .unwrap_or_default()
        .iter()
        .rev()
        .take(3)
        .filter_map(|r| r.output.clone())
        .map(|o| o.trim().to_owned())
        .collect();
    let running = state.running.unwrap_or(false);
    let started_at = state
        .started_at
        .as_deref()
        .and_then(|t| {
            time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
        })
        .map(|t| t.unix_timestamp())
        .filter(|_| running)
        .unwrap_or(0);
    let config = c.config.clone().unwrap_or_default();
    let image_id = c.image.clone().unwrap_or_default();
    let image_version = match engine_image(&image_id) {
        Ok(image) => docker
            .inspect_image(image)
            .await
            .ok()
            .and_then(|img| img.config)
            .and_then(|cfg| cfg.labels)
            .and_then(|l| l.get("version").cloned())
            .unwrap_or_default(),
        Err(_) => String::new(),
    };
    Ok((
        ContainerStatus {
            name: name.to_owned(),
            image: config.image.unwrap_or_default(),
            image_id,
            image_version,
            state: state
                .status
                .map(|s| s.to_string())
                .unwrap_or_else(|| "unknown".into()),
            health: health_status.into(),
            started_at,
            exit_code: state.exit_code.unwrap_or(0) as i32,
            restart_count: c.restart_count.unwrap_or(0).max(0) as u32,
            oom_killed: state.oom_killed.unwrap_or(false),
        },
        health_output,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stop_request_outlasts_its_grace_period() {
        // The IM may take all of im.sh's 300 s to stop, or ignore SIGTERM
        // until killed: the request must not give up first.
        for grace in [0, 5, 120, 300, 3600] {
            let grace = Duration::from_secs(grace);
            assert!(stop_timeout(grace) >= grace + Duration::from_secs(30));
        }
    }
}
