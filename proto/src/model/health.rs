//! When a container counts as serving: the one rule behind the agent's
//! `healthy` answers and the controller's health events and metrics.

use crate::agent::v1::ContainerStatus;

/// Running, and healthy where it has a health check.
pub fn container_serving(c: &ContainerStatus) -> bool {
    c.state == "running" && matches!(c.health.as_str(), "healthy" | "none")
}

/// A deployment serves when it has containers and every one does.
pub fn all_serving(containers: &[ContainerStatus]) -> bool {
    !containers.is_empty() && containers.iter().all(container_serving)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_and_healthy_or_unchecked() {
        let c = |state: &str, health: &str| ContainerStatus {
            state: state.into(),
            health: health.into(),
            ..Default::default()
        };
        assert!(container_serving(&c("running", "healthy")));
        assert!(container_serving(&c("running", "none")));
        assert!(!container_serving(&c("running", "starting")));
        assert!(!container_serving(&c("restarting", "none")));
        assert!(all_serving(&[
            c("running", "none"),
            c("running", "healthy")
        ]));
        assert!(!all_serving(&[]));
    }
}
