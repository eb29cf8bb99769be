//! `controller watch`: the fleet live, from the daemon's latest samples,
//! redrawn in place on a terminal (80 columns, plain ANSI: fine over SSH),
//! one frame after another otherwise, one JSON line per refresh with --json.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use imfleet_controller::health::HostSnapshot;
use imfleet_controller::serve::client::{self, Endpoint};
use imfleet_controller::state::ControllerState;
use imfleet_controller::store::{Rollout, StepPhase};
use imfleet_controller::text::printable;

#[derive(Args)]
pub struct WatchArgs {
    /// Seconds between refreshes.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    every: Duration,
    /// Print one frame and exit.
    #[arg(long)]
    once: bool,
    /// One JSON array of hosts per refresh, one per line.
    #[arg(long)]
    json: bool,
}

/// The active rollout, from the store here or through the API.
async fn active_rollout(state: Option<&ControllerState>, endpoint: &Endpoint) -> Option<Rollout> {
    match state {
        Some(state) => state.store.active_rollout().await.ok().flatten(),
        None => client::rollouts(endpoint, 1)
            .await
            .ok()
            .flatten()?
            .into_iter()
            .find(|r| r.state.is_active()),
    }
}

pub async fn watch(
    dir: &Path,
    remote: Option<&Endpoint>,
    args: WatchArgs,
) -> anyhow::Result<ExitCode> {
    let terminal = std::io::stdout().is_terminal() && !args.json;
    // The store is read here only for the active rollout's line.
    let state = match remote {
        Some(_) => None,
        None => Some(super::open_state(dir)?),
    };
    let endpoint = remote.cloned().unwrap_or_else(|| Endpoint::local(dir));
    let mut ticker = tokio::time::interval(args.every.max(Duration::from_millis(200)));
    loop {
        ticker.tick().await;
        let Some(hosts) = client::fetch_hosts(&endpoint).await? else {
            anyhow::bail!(
                "no `controller serve` answers for {}; start it (systemctl start imfleet-controller, or `controller serve`) to watch the fleet live, or use `controller status`",
                dir.display()
            );
        };
        let mut out = std::io::stdout().lock();
        if args.json {
            writeln!(out, "{}", super::output::json_line(&hosts)?)?;
        } else {
            if terminal {
                // Home, then clear: the frame is redrawn in place.
                write!(out, "\x1b[H\x1b[2J")?;
            }
            write!(out, "{}", frame(&hosts, imfleet_controller::now_unix()))?;
            if let Some(rollout) = active_rollout(state.as_ref(), &endpoint).await {
                writeln!(out, "\n{}", rollout_line(&rollout))?;
            }
            if !terminal {
                writeln!(out)?;
            }
        }
        out.flush()?;
        if args.once {
            return Ok(ExitCode::SUCCESS);
        }
    }
}

const WIDTH: usize = 80;

/// One screen: a summary line, then a line per host, none wider than 80.
pub fn frame(hosts: &[HostSnapshot], now: i64) -> String {
    let up = hosts.iter().filter(|h| h.agent_up).count();
    let healthy = hosts.iter().filter(|h| h.im_healthy == Some(true)).count();
    let mut out = format!(
        "imfleet  {}  agents up {up}/{}  IM healthy {healthy}\n\n",
        imfleet_controller::rfc3339(now),
        hosts.len()
    );
    out.push_str(&format!(
        "{:<18} {:<5} {:<9} {:>4} {:>4} {:>4} {:>5}  {}\n",
        "HOST", "AGENT", "IM", "CPU", "MEM", "DISK", "AGE", "NOTE"
    ));
    for h in hosts {
        let sample = h.sample.as_ref();
        let host = sample.and_then(|s| s.host.as_ref());
        let percent = |v: Option<f64>| {
            v.map(|v| format!("{:.0}%", v * 100.0))
                .unwrap_or_else(|| "-".into())
        };
        let memory = host
            .filter(|m| m.memory_total_bytes > 0)
            .map(|m| 1.0 - m.memory_available_bytes as f64 / m.memory_total_bytes as f64);
        let disk = host
            .and_then(|m| m.filesystems.iter().find(|f| f.role == "data"))
            .filter(|f| f.size_bytes > 0)
            .map(|f| 1.0 - f.available_bytes as f64 / f.size_bytes as f64);
        let im = match h.im_healthy {
            Some(true) => "healthy",
            Some(false) => "UNHEALTHY",
            None if h.agent_up => "none",
            None => "?",
        };
        let note = printable(
            if !h.agent_up {
                h.error.as_str()
            } else {
                h.im_detail.as_str()
            },
            WIDTH,
        );
        let age = h
            .sample_age_seconds
            .map(|a| format!("{a:.0}s"))
            .unwrap_or_else(|| "-".into());
        let line = format!(
            "{:<18} {:<5} {:<9} {:>4} {:>4} {:>4} {:>5}  {}",
            clip(&printable(&h.host, 18), 18),
            if h.agent_up { "up" } else { "DOWN" },
            im,
            percent(h.cpu_busy),
            percent(memory),
            percent(disk),
            age,
            note
        );
        out.push_str(&clip(&line, WIDTH));
        out.push('\n');
    }
    out
}

/// The active rollout in one line: how far it is and who is out of service.
pub fn rollout_line(rollout: &Rollout) -> String {
    let ended = rollout.steps.iter().filter(|s| s.phase.has_ended()).count();
    let moving: Vec<String> = rollout
        .steps
        .iter()
        .filter(|s| {
            matches!(
                s.phase,
                StepPhase::Swapping | StepPhase::Verifying | StepPhase::RollingBack
            )
        })
        .map(|s| format!("{} {}", s.host, s.phase.as_str()))
        .collect();
    let line = format!(
        "rollout {} {}: {ended}/{} ended{}{}",
        rollout.id,
        rollout.state.as_str(),
        rollout.steps.len(),
        if moving.is_empty() { "" } else { "; " },
        moving.join(", ")
    );
    clip(&line, WIDTH)
}

/// `text` cut to `width` characters (with `~` marking the cut).
fn clip(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        return text.to_owned();
    }
    let mut cut: String = text.chars().take(width - 1).collect();
    cut.push('~');
    cut
}

#[cfg(test)]
mod tests {
    use super::*;
    use imfleet_controller::store::{RolloutState, RolloutStep};
    use imfleet_proto::agent::v1::{FilesystemUsage, HealthSample, HostMetrics};

    #[test]
    fn the_rollout_line_says_how_far_and_who_is_down() {
        let step = |host: &str, phase| RolloutStep {
            host: host.into(),
            position: 0,
            batch: 0,
            canary: false,
            phase,
            from_revision: None,
            to_revision: None,
            detail: String::new(),
            updated_at: 0,
        };
        let rollout = Rollout {
            id: 7,
            state: RolloutState::Running,
            holder: "pbx01:1".into(),
            params: serde_json::Value::Null,
            created_at: 0,
            updated_at: 0,
            steps: vec![
                step("im1", StepPhase::Done),
                step("im2", StepPhase::Verifying),
                step(&"x".repeat(90), StepPhase::Staged),
            ],
        };
        assert_eq!(
            rollout_line(&rollout),
            "rollout 7 running: 1/3 ended; im2 verifying"
        );
    }

    #[test]
    fn every_line_fits_80_columns_and_says_what_matters() {
        let up = HostSnapshot {
            host: "im-frankfurt-01.example.internal".into(),
            agent_up: true,
            im_healthy: Some(false),
            im_detail: "portsip.instantmessage exited (none); http://127.0.0.1:8902/svr_stats: connection refused".into(),
            sample_age_seconds: Some(1.2),
            cpu_busy: Some(0.254),
            sample: Some(HealthSample {
                host: Some(HostMetrics {
                    memory_total_bytes: 1000,
                    memory_available_bytes: 250,
                    filesystems: vec![FilesystemUsage {
                        role: "data".into(),
                        size_bytes: 100,
                        available_bytes: 5,
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let down = HostSnapshot {
            host: "im2".into(),
            error: "connection refused".into(),
            reconnects: 3,
            ..Default::default()
        };
        let text = frame(&[up, down], 1_800_000_000);
        for line in text.lines() {
            assert!(line.chars().count() <= WIDTH, "{} wide: {line}", line.len());
        }
        assert!(text.contains("agents up 1/2  IM healthy 0"), "{text}");
        let first = text.lines().nth(3).unwrap();
        assert!(first.starts_with("im-frankfurt-01.e~ up"), "{first}");
        assert!(
            first.contains("UNHEALTHY")
                && first.contains("25%")
                && first.contains("75%")
                && first.contains("95%"),
            "{first}"
        );
        let second = text.lines().nth(4).unwrap();
        assert!(
            second.contains("DOWN") && second.contains("connection refused"),
            "{second}"
        );
    }
}
