//! Whether a container just started is ready, still coming up, or has
//! failed: a pure judgement over what the Engine reports, so that crash
//! loops fail the deploy at once instead of being waited out.

use imfleet_proto::agent::v1::ContainerStatus;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// Long-running and healthy (or running without any health check), or a
    /// one-shot container that finished with status 0.
    Ready,
    /// Still coming up; look again.
    Waiting(String),
    /// Will not become ready: why, in words for the operator.
    Failed(String),
}

/// How long a container without any health check must keep running before
/// it counts as ready: long enough to see it fall over at start.
pub const SETTLE_SECONDS: i64 = 5;

/// Judges one observation of a container this apply created, at Unix time
/// `now`. `health` is the Engine's: "none" only when neither the spec nor the
/// image defines a check, so an image's own HEALTHCHECK is waited for too.
pub fn judge(observed: &ContainerStatus, one_shot: bool, now: i64) -> Readiness {
    let state = observed.state.as_str();
    // A process inside killed for memory is fatal only if the container went
    // down with it (PostgreSQL, say, survives losing one backend).
    let stopped = state != "running" || observed.restart_count > 0;
    if observed.oom_killed && stopped && !(one_shot && observed.exit_code == 0) {
        return Readiness::Failed(format!(
            "was killed for lack of memory (OOM, exit status {})",
            observed.exit_code
        ));
    }
    if one_shot {
        return match state {
            "exited" if observed.exit_code == 0 => Readiness::Ready,
            "exited" | "dead" => {
                Readiness::Failed(format!("exited with status {}", observed.exit_code))
            }
            "missing" => Readiness::Failed("disappeared before it finished".into()),
            other => Readiness::Waiting(format!("is {other}")),
        };
    }
    // This apply created the container: any restart means it stopped on its own.
    if state == "restarting" || observed.restart_count > 0 {
        // Once it runs again the Engine has reset its exit code to 0.
        let exit = if state == "running" {
            String::new()
        } else {
            format!("it exited with status {} and ", observed.exit_code)
        };
        return Readiness::Failed(format!(
            "is crash-looping: {exit}the Engine restarted it {} time(s)",
            observed.restart_count.max(1)
        ));
    }
    match (state, observed.health.as_str()) {
        ("running", "healthy") => Readiness::Ready,
        ("running", "none") if now - observed.started_at >= SETTLE_SECONDS => Readiness::Ready,
        ("running", "none") => Readiness::Waiting("has no health check; settling".into()),
        ("running", "unhealthy") => Readiness::Failed("is unhealthy".into()),
        ("running", health) => Readiness::Waiting(format!("health check is {health}")),
        ("exited" | "dead", _) => {
            Readiness::Failed(format!("exited with status {}", observed.exit_code))
        }
        ("missing", _) => Readiness::Failed("disappeared".into()),
        (other, _) => Readiness::Waiting(format!("is {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_000_000;

    fn seen(state: &str, health: &str, exit_code: i32, restarts: u32) -> ContainerStatus {
        ContainerStatus {
            state: state.into(),
            health: health.into(),
            exit_code,
            restart_count: restarts,
            started_at: NOW - 60,
            ..Default::default()
        }
    }

    fn judge(observed: &ContainerStatus, one_shot: bool) -> Readiness {
        super::judge(observed, one_shot, NOW)
    }

    fn failed(r: Readiness) -> String {
        match r {
            Readiness::Failed(why) => why,
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    #[test]
    fn long_running_containers_are_ready_only_when_healthy() {
        assert_eq!(
            judge(&seen("running", "healthy", 0, 0), false),
            Readiness::Ready
        );
        assert_eq!(
            judge(&seen("running", "none", 0, 0), false),
            Readiness::Ready
        );
        // An image's own health check still starting is not ready.
        assert!(matches!(
            judge(&seen("running", "starting", 0, 0), false),
            Readiness::Waiting(_)
        ));
        assert!(matches!(
            judge(&seen("created", "none", 0, 0), false),
            Readiness::Waiting(_)
        ));
        assert_eq!(
            failed(judge(&seen("running", "unhealthy", 0, 0), false)),
            "is unhealthy"
        );
    }

    #[test]
    fn crash_loops_fail_at_once_whatever_the_moment_observed() {
        // Between restarts and while restarting: its exit status is told.
        for observed in [
            seen("restarting", "starting", 3, 1),
            seen("exited", "none", 3, 0),
        ] {
            let why = failed(judge(&observed, false));
            assert!(why.contains("status 3"), "{why}");
        }
        // Running again after one: the Engine has reset the status to 0,
        // which is not told as the reason.
        let why = failed(judge(&seen("running", "starting", 0, 2), false));
        assert!(
            why.contains("crash-looping") && !why.contains("status"),
            "{why}"
        );
        assert!(failed(judge(&seen("running", "starting", 1, 4), false)).contains("4 time(s)"));
        let mut oom = seen("running", "starting", 137, 1);
        oom.oom_killed = true;
        assert!(failed(judge(&oom, false)).contains("OOM"));
        // One process killed for memory while the container keeps running.
        let mut survived = seen("running", "healthy", 0, 0);
        survived.oom_killed = true;
        assert_eq!(judge(&survived, false), Readiness::Ready);
    }

    #[test]
    fn without_a_health_check_a_container_must_keep_running_a_while() {
        let mut fresh = seen("running", "none", 0, 0);
        fresh.started_at = NOW - 1;
        assert!(matches!(judge(&fresh, false), Readiness::Waiting(_)));
        fresh.started_at = NOW - SETTLE_SECONDS;
        assert_eq!(judge(&fresh, false), Readiness::Ready);
    }

    #[test]
    fn one_shot_containers_must_exit_zero() {
        assert_eq!(judge(&seen("exited", "none", 0, 0), true), Readiness::Ready);
        assert!(matches!(
            judge(&seen("running", "starting", 0, 0), true),
            Readiness::Waiting(_)
        ));
        assert_eq!(
            failed(judge(&seen("exited", "none", 2, 0), true)),
            "exited with status 2"
        );
        assert!(matches!(
            judge(&seen("missing", "none", 0, 0), true),
            Readiness::Failed(_)
        ));
    }
}
