//! Watching a new agent binary after the swap, from outside it: the pure
//! judgement ([`judge`]) over what is observed, and the watcher that runs
//! under systemd (the previous binary in a transient unit of its own). The
//! agent's own supervisor uses the same judgement (`supervision.rs`).

use std::time::{Duration, Instant};

use imfleet_proto::model::layout::{Layout, SYSTEMD_UNIT};

use super::note::{self, State};

/// The new agent must serve within this...
pub const START_DEADLINE: Duration = Duration::from_secs(20);
/// ...and then stay up, not restarted, for this long.
pub const GRACE: Duration = Duration::from_secs(10);
/// How often the watcher looks.
const TICK: Duration = Duration::from_millis(250);

/// What the watcher sees, `elapsed` after it restarted the agent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Observed {
    pub elapsed: Duration,
    /// When (since the restart) the new agent first said it serves.
    pub serving_since: Option<Duration>,
    /// The new agent's process runs now.
    pub running: bool,
    /// Times it was started again since (it exited).
    pub restarts: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Wait,
    Confirm,
    RollBack(String),
}

pub fn judge(o: &Observed) -> Verdict {
    if o.restarts > 0 {
        return Verdict::RollBack(format!(
            "the new agent exited and was started again {} time(s)",
            o.restarts
        ));
    }
    match o.serving_since {
        Some(_) if !o.running => {
            Verdict::RollBack("the new agent exited after it started serving".into())
        }
        Some(since) if o.elapsed.saturating_sub(since) >= GRACE => Verdict::Confirm,
        Some(_) => Verdict::Wait,
        None if o.elapsed >= START_DEADLINE => Verdict::RollBack(format!(
            "the new agent did not serve within {} s",
            START_DEADLINE.as_secs()
        )),
        None => Verdict::Wait,
    }
}

/// Follows one watch: feed it observations, it says when it is over.
#[derive(Debug)]
pub struct Watch {
    restarted: Instant,
    serving_since: Option<Duration>,
}

impl Default for Watch {
    fn default() -> Self {
        Watch {
            restarted: Instant::now(),
            serving_since: None,
        }
    }
}

impl Watch {
    /// Judges the moment: whether the note says the new agent serves,
    /// whether its process runs, how often it was started again.
    pub fn look(&mut self, layout: &Layout, running: bool, restarts: u32) -> Verdict {
        let elapsed = self.restarted.elapsed();
        if self.serving_since.is_none()
            && note::read(layout).is_some_and(|n| n.state == State::Started)
        {
            self.serving_since = Some(elapsed);
        }
        judge(&Observed {
            elapsed,
            serving_since: self.serving_since,
            running,
            restarts,
        })
    }
}

/// Records the verdict's outcome: confirmed, or the previous binary put back
/// (the caller then restarts it). Returns whether the upgrade held.
pub fn conclude(layout: &Layout, verdict: &Verdict) -> bool {
    let Some(current) = note::read(layout) else {
        return false;
    };
    match verdict {
        Verdict::Confirm => {
            let _ = note::write(layout, &current.moved(State::Confirmed, ""));
            tracing::info!(version = %current.to_version, "agent upgrade confirmed");
            true
        }
        Verdict::RollBack(why) => {
            let detail = match super::restore_previous(layout) {
                Ok(()) => format!("{why}; {} restored", current.from_version),
                Err(e) => format!("{why}; restoring {} failed: {e}", current.from_version),
            };
            tracing::error!("agent upgrade rolled back: {detail}");
            let _ = note::write(layout, &current.moved(State::RolledBack, &detail));
            false
        }
        Verdict::Wait => false,
    }
}

/// `agent upgrade-watch`: restarts the agent's unit and watches the new
/// binary, restoring the previous one if it fails. Runs in a unit of its
/// own; returns whether the upgrade held.
pub async fn watch_under_systemd(layout: &Layout) -> anyhow::Result<bool> {
    // The agent that started us answers the controller first.
    tokio::time::sleep(Duration::from_secs(1)).await;
    systemctl(&["restart", SYSTEMD_UNIT]).await?;
    let base = unit_restarts().await;
    let mut watch = Watch::default();
    loop {
        tokio::time::sleep(TICK).await;
        let (running, restarts) = unit_state(base).await;
        let verdict = watch.look(layout, running, restarts);
        if verdict == Verdict::Wait {
            continue;
        }
        let held = conclude(layout, &verdict);
        if !held {
            systemctl(&["restart", SYSTEMD_UNIT]).await?;
        }
        return Ok(held);
    }
}

async fn systemctl(args: &[&str]) -> anyhow::Result<String> {
    let out = tokio::process::Command::new("systemctl")
        .args(args)
        .output()
        .await?;
    anyhow::ensure!(
        out.status.success(),
        "systemctl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn unit_restarts() -> u32 {
    systemctl(&["show", SYSTEMD_UNIT, "-p", "NRestarts", "--value"])
        .await
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Whether the agent's unit runs, and its restarts since `base`.
async fn unit_state(base: u32) -> (bool, u32) {
    let shown = systemctl(&["show", SYSTEMD_UNIT, "-p", "ActiveState,SubState,NRestarts"])
        .await
        .unwrap_or_default();
    let value = |key: &str| {
        shown
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_default()
            .to_owned()
    };
    let running = value("ActiveState") == "active" && value("SubState") == "running";
    let restarts: u32 = value("NRestarts").parse().unwrap_or(base);
    (running, restarts.saturating_sub(base))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(elapsed: u64, since: Option<u64>, running: bool, restarts: u32) -> Observed {
        Observed {
            elapsed: Duration::from_secs(elapsed),
            serving_since: since.map(Duration::from_secs),
            running,
            restarts,
        }
    }

    #[test]
    fn a_new_agent_that_serves_and_stays_up_is_confirmed() {
        assert_eq!(judge(&seen(1, None, true, 0)), Verdict::Wait);
        assert_eq!(judge(&seen(3, Some(2), true, 0)), Verdict::Wait);
        assert_eq!(judge(&seen(12, Some(2), true, 0)), Verdict::Confirm);
    }

    #[test]
    fn a_new_agent_that_exits_crash_loops_or_never_serves_is_rolled_back() {
        // Exits at start: started again by its supervisor.
        assert!(matches!(
            judge(&seen(3, None, false, 1)),
            Verdict::RollBack(_)
        ));
        // Serves, then dies within the grace window.
        assert!(matches!(
            judge(&seen(5, Some(2), false, 0)),
            Verdict::RollBack(_)
        ));
        // Runs but never serves.
        assert_eq!(judge(&seen(19, None, true, 0)), Verdict::Wait);
        let Verdict::RollBack(why) = judge(&seen(20, None, true, 0)) else {
            panic!("not rolled back");
        };
        assert!(why.contains("did not serve"), "{why}");
        // A restart counts even after the grace window began.
        assert!(matches!(
            judge(&seen(8, Some(2), true, 1)),
            Verdict::RollBack(_)
        ));
    }
}
