//! Docker Engine presence and version, through the Engine API (bollard).

use std::path::Path;
use std::time::Duration;

use imfleet_proto::agent::v1::DockerInfo;

const COMPOSE_PLUGIN_PATHS: &[&str] = &[
    "/usr/libexec/docker/cli-plugins/docker-compose",
    "/usr/lib/docker/cli-plugins/docker-compose",
    "/usr/local/lib/docker/cli-plugins/docker-compose",
];

pub async fn collect() -> DockerInfo {
    let installed = [
        "/usr/bin/docker",
        "/usr/bin/dockerd",
        "/usr/local/bin/docker",
    ]
    .iter()
    .any(|p| Path::new(p).exists());
    let mut info = DockerInfo {
        installed,
        compose_plugin: COMPOSE_PLUGIN_PATHS.iter().any(|p| Path::new(p).exists()),
        ..Default::default()
    };
    let Ok(docker) = bollard::Docker::connect_with_unix_defaults() else {
        return info;
    };
    if let Ok(Ok(version)) = tokio::time::timeout(Duration::from_secs(3), docker.version()).await {
        info.running = true;
        info.installed = true;
        info.version = version.version.unwrap_or_default();
        info.api_version = version.api_version.unwrap_or_default();
    }
    info
}
