//! Health as both sides see it: when a container counts as serving (the
//! one rule behind the agent's `healthy` answers and the controller's
//! events and metrics), and the sampling intervals a health stream allows.

use std::time::Duration;

use crate::agent::v1::ContainerStatus;

/// A health stream's interval when the caller names none...
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);
/// ...and the bounds of what it may name.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);
pub const MAX_INTERVAL: Duration = Duration::from_secs(3600);

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
