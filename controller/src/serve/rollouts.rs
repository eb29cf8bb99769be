//! The daemon owns rollouts. It drives what the CLI submits on its socket
//! (a "run": one start, resume or abort, whose events followers page
//! through), and takes up by itself an active rollout nobody drives: after
//! a crash, a restart or a failover it goes on as `--resume` would, with
//! the credentials the rollout kept. A rollout stopped by an error is
//! tried again with a growing delay (from the failure), unless only the
//! operator can help (a refused password, a missing image); a paused one
//! waits for the operator.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use super::api::{Driving, RunEnd, RunPage, Submission};
use crate::rollout::{self, Credentials, EventSink, RolloutError, RolloutEvent};
use crate::state::ControllerState;
use crate::store::{Rollout, RolloutState, Store};

/// Events kept for followers, over all runs.
const KEPT_EVENTS: usize = 10_000;
/// Ended runs whose outcome is kept.
const KEPT_ENDS: usize = 64;
/// The longest a follower's request waits for news.
pub const LONGEST_WAIT: Duration = Duration::from_secs(20);
/// How often the store is looked at for a rollout nobody drives.
const LOOK_EVERY: Duration = Duration::from_secs(5);
const FIRST_RETRY: Duration = Duration::from_secs(30);
const LAST_RETRY: Duration = Duration::from_secs(600);

/// What a run does.
enum Op {
    Start(Box<rollout::UpgradeRequest>),
    Resume(Credentials),
    Abort(Credentials),
}

#[derive(Default)]
struct Log {
    next_run: u64,
    next_seq: u64,
    /// (sequence, run, event)
    events: VecDeque<(u64, u64, serde_json::Value)>,
    running: BTreeMap<u64, tokio::task::AbortHandle>,
    ended: BTreeMap<u64, RunEnd>,
    retry: Retry,
}

pub(crate) struct Rollouts {
    state_dir: PathBuf,
    log: Mutex<Log>,
    changed: watch::Sender<u64>,
    /// A run ended: look at the store again now.
    wake: Notify,
}

impl std::fmt::Debug for Rollouts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rollouts").finish_non_exhaustive()
    }
}

impl Rollouts {
    pub(crate) fn new(state_dir: &Path) -> Arc<Rollouts> {
        Arc::new(Rollouts {
            state_dir: state_dir.to_owned(),
            log: Mutex::default(),
            changed: watch::channel(0).0,
            wake: Notify::new(),
        })
    }

    fn log(&self) -> std::sync::MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a submission; its run number, or why it was refused (nothing
    /// was started then).
    pub(crate) fn submit(self: &Arc<Self>, submission: Submission) -> Result<u64, String> {
        let credentials = |stored: crate::rollout::credentials::Stored| {
            stored
                .credentials()
                .map_err(|e| format!("the credentials: {e}"))
        };
        let op = match submission {
            Submission::Start {
                upgrade,
                credentials: c,
            } => {
                let request = upgrade.request(credentials(c)?)?;
                for file in &request.image_files {
                    readable(file)?;
                }
                Op::Start(Box::new(request))
            }
            Submission::Resume { credentials: c } => Op::Resume(credentials(c)?),
            Submission::Abort { credentials: c } => Op::Abort(credentials(c)?),
        };
        // An abort may join a rollout being driven (it is told through the
        // record); anything else waits for the run going on.
        let exclusive = !matches!(op, Op::Abort(_));
        self.start(op, exclusive).ok_or_else(|| {
            "it is driving a rollout right now; `controller upgrade --follow` shows it, `--abort` rolls it back".to_owned()
        })
    }

    /// Starts a run; `None` when `exclusive` and one goes on.
    fn start(self: &Arc<Self>, op: Op, exclusive: bool) -> Option<u64> {
        let mut log = self.log();
        if exclusive && !log.running.is_empty() {
            return None;
        }
        log.next_run += 1;
        let run = log.next_run;
        let this = self.clone();
        let task = tokio::spawn(async move {
            let sink: EventSink = {
                let this = this.clone();
                Arc::new(move |event: RolloutEvent| this.push(run, &event))
            };
            let result = match ControllerState::open(&this.state_dir) {
                Err(e) => Err((e.to_string(), true)),
                Ok(state) => match op {
                    Op::Start(request) => rollout::upgrade(&state, *request, sink).await,
                    Op::Resume(given) => rollout::resume(&state, given, sink).await,
                    Op::Abort(given) => rollout::abort(&state, given, sink).await,
                }
                .map_err(|e: RolloutError| (e.to_string(), e.needs_operator())),
            };
            this.end(run, result);
        });
        log.running.insert(run, task.abort_handle());
        Some(run)
    }

    /// Stops every run where it is (the daemon is stopping; the next one
    /// takes the rollout up).
    pub(crate) fn stop(&self) {
        for (_, task) in std::mem::take(&mut self.log().running) {
            task.abort();
        }
    }

    fn push(&self, run: u64, event: &RolloutEvent) {
        log_event(run, event);
        let Ok(value) = serde_json::to_value(event) else {
            return;
        };
        let seq = {
            let mut log = self.log();
            log.next_seq += 1;
            let seq = log.next_seq;
            log.events.push_back((seq, run, value));
            while log.events.len() > KEPT_EVENTS {
                log.events.pop_front();
            }
            seq
        };
        self.changed.send_replace(seq);
    }

    fn end(&self, run: u64, result: Result<Rollout, (String, bool)>) {
        let mut log = self.log();
        let end = match result {
            Ok(rollout) => {
                tracing::info!(run, rollout = rollout.id, state = ?rollout.state, "rollout run ended");
                log.retry = Retry::default();
                RunEnd {
                    rollout: Some(rollout),
                    error: None,
                }
            }
            Err((error, needs_operator)) => {
                log.retry.failed(needs_operator);
                if needs_operator {
                    tracing::error!(
                        run,
                        "rollout run stopped: {error}; not taken up again until the operator runs `controller upgrade --resume` or `--abort`"
                    );
                } else {
                    tracing::warn!(run, "rollout run stopped: {error}; tried again later");
                }
                RunEnd {
                    rollout: None,
                    error: Some(error),
                }
            }
        };
        let seq = {
            log.running.remove(&run);
            log.ended.insert(run, end);
            while log.ended.len() > KEPT_ENDS {
                log.ended.pop_first();
            }
            log.next_seq += 1;
            log.next_seq
        };
        drop(log);
        self.changed.send_replace(seq);
        self.wake.notify_one();
    }

    pub(crate) fn driving(&self) -> Driving {
        let log = self.log();
        match log.running.keys().next_back() {
            Some(run) => Driving {
                run: Some(*run),
                running: true,
            },
            None => Driving {
                run: (log.next_run > 0).then_some(log.next_run),
                running: false,
            },
        }
    }

    fn collect(&self, run: u64, after: u64) -> RunPage {
        let log = self.log();
        let events: Vec<serde_json::Value> = log
            .events
            .iter()
            .filter(|(seq, r, _)| *r == run && *seq > after)
            .map(|(_, _, e)| e.clone())
            .collect();
        let ended = if log.running.contains_key(&run) {
            None
        } else {
            Some(log.ended.get(&run).cloned().unwrap_or(RunEnd {
                rollout: None,
                error: Some(format!(
                    "the daemon knows no run {run} (it restarted since?); see `controller rollouts`"
                )),
            }))
        };
        RunPage {
            events,
            next: log.next_seq,
            ended,
        }
    }

    /// `run`'s events after `after`, waiting up to `wait` for some.
    pub(crate) async fn page(&self, run: u64, after: u64, wait: Duration) -> RunPage {
        let mut changed = self.changed.subscribe();
        let deadline = Instant::now() + wait.min(LONGEST_WAIT);
        loop {
            let page = self.collect(run, after);
            if !page.events.is_empty() || page.ended.is_some() {
                return page;
            }
            match tokio::time::timeout_at(deadline, changed.changed()).await {
                Ok(Ok(())) => {}
                _ => return page,
            }
        }
    }

    /// Takes up an active rollout that no process drives, until the task
    /// is aborted.
    pub(crate) async fn own(self: Arc<Self>, store: Store) {
        loop {
            if let Err(e) = self.look(&store).await {
                tracing::warn!("cannot look for a rollout to take up: {e}");
            }
            tokio::select! {
                _ = tokio::time::sleep(LOOK_EVERY) => {}
                _ = self.wake.notified() => {}
            }
        }
    }

    async fn look(self: &Arc<Self>, store: &Store) -> Result<(), RolloutError> {
        if !self.log().running.is_empty() {
            return Ok(());
        }
        let Some(active) = store.active_rollout().await? else {
            // What a rollout kept outlives it only if its driver died
            // between the end and the clean-up.
            rollout::credentials::forget(&self.state_dir);
            self.log().retry = Retry::default();
            return Ok(());
        };
        if !matches!(active.state, RolloutState::Running | RolloutState::Aborting) {
            return Ok(());
        }
        let run_dir = crate::state::run_dir(&self.state_dir);
        if rollout::is_driven(&run_dir)? || !self.log().retry.due(active.id) {
            return Ok(());
        }
        let why = match rollout::credentials::load(&self.state_dir, active.id) {
            Ok(Some(_)) => {
                if self.start(Op::Resume(Credentials::default()), true).is_some() {
                    tracing::info!(
                        rollout = active.id,
                        state = ?active.state,
                        "taking up the active rollout nobody drives"
                    );
                }
                return Ok(());
            }
            Ok(None) => "it kept no credentials (started by an older controller); run `controller upgrade --resume --token-file FILE` once".to_owned(),
            Err(e) => e.to_string(),
        };
        let mut log = self.log();
        if !log.retry.told {
            tracing::error!(
                rollout = active.id,
                "cannot take up the active rollout: {why}"
            );
            log.retry.told = true;
        }
        Ok(())
    }
}

/// Whether the daemon can read an archive a submission names (its unit
/// hides /tmp and home directories).
fn readable(file: &Path) -> Result<(), String> {
    std::fs::File::open(file).map(drop).map_err(|e| {
        format!(
            "it cannot read the image archive {}: {e}. Its systemd unit hides /tmp, /var/tmp and home directories (PrivateTmp=, ProtectHome=): put the archive elsewhere, e.g. under /var/lib/imfleet or /srv",
            file.display()
        )
    })
}

/// When the daemon may take the active rollout up again after runs that
/// failed.
#[derive(Default)]
struct Retry {
    rollout: Option<i64>,
    failures: u32,
    failed_at: Option<Instant>,
    /// Only the operator can help: no more tries.
    held: bool,
    /// Why it cannot was logged.
    told: bool,
}

impl Retry {
    fn failed(&mut self, needs_operator: bool) {
        self.failures += 1;
        self.failed_at = Some(Instant::now());
        self.held |= needs_operator;
    }

    /// Whether `rollout` may be taken up now (another rollout starts afresh).
    fn due(&mut self, rollout: i64) -> bool {
        match self.rollout {
            // The failures seen so far were this one's (one is active at a time).
            None => self.rollout = Some(rollout),
            Some(seen) if seen != rollout => {
                *self = Retry {
                    rollout: Some(rollout),
                    ..Retry::default()
                }
            }
            Some(_) => {}
        }
        !self.held
            && self
                .failed_at
                .is_none_or(|at| Instant::now() >= at + retry_delay(self.failures))
    }
}

/// The delay after `failures` failed runs: 30 s, doubling, at most 10 min.
fn retry_delay(failures: u32) -> Duration {
    FIRST_RETRY
        .saturating_mul(1 << failures.saturating_sub(1).min(10))
        .min(LAST_RETRY)
}

/// What a run does goes to the daemon's log as well (journald).
fn log_event(run: u64, event: &RolloutEvent) {
    use crate::text::printable;
    match event {
        RolloutEvent::Started {
            rollout,
            resumed,
            hosts,
            ..
        } => tracing::info!(run, rollout, resumed, hosts = hosts.len(), "rollout driven"),
        RolloutEvent::Step {
            rollout,
            host,
            phase,
            detail,
            ..
        } => tracing::info!(
            run,
            rollout,
            host = %printable(host, 128),
            phase = ?phase,
            "{}",
            printable(detail, 512)
        ),
        RolloutEvent::Finished {
            rollout,
            state,
            detail,
        } => tracing::info!(run, rollout, state = ?state, "{}", printable(detail, 512)),
        RolloutEvent::Healthy { .. } | RolloutEvent::Host { .. } => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_from_half_a_minute_to_ten() {
        assert_eq!(retry_delay(1), Duration::from_secs(30));
        assert_eq!(retry_delay(2), Duration::from_secs(60));
        assert_eq!(retry_delay(5), Duration::from_secs(480));
        assert_eq!(retry_delay(6), LAST_RETRY);
        assert_eq!(retry_delay(40), LAST_RETRY);
    }

    #[tokio::test(start_paused = true)]
    async fn a_rollout_is_retried_only_when_due_and_a_new_one_starts_afresh() {
        let mut retry = Retry::default();
        assert!(retry.due(1));
        retry.failed(false);
        assert!(!retry.due(1), "counted from the failure");
        tokio::time::advance(FIRST_RETRY).await;
        assert!(retry.due(1));
        retry.failed(false);
        tokio::time::advance(FIRST_RETRY).await;
        assert!(!retry.due(1), "the second wait is longer");
        assert!(retry.due(2), "another rollout is not held back");
        retry.failed(true);
        tokio::time::advance(LAST_RETRY * 2).await;
        assert!(!retry.due(2), "a refused password is not tried again");
    }

    #[tokio::test(start_paused = true)]
    async fn followers_get_their_run_only_and_its_end() {
        let rollouts = Rollouts::new(Path::new("/nonexistent"));
        let finished = |id| RolloutEvent::Finished {
            rollout: id,
            state: RolloutState::Succeeded,
            detail: "done".into(),
        };
        {
            let idle = tokio::spawn(std::future::pending::<()>());
            let mut log = rollouts.log();
            log.next_run = 2;
            log.running
                .extend([(1, idle.abort_handle()), (2, idle.abort_handle())]);
        }
        rollouts.push(1, &finished(10));
        rollouts.push(2, &finished(20));
        let page = rollouts.page(2, 0, Duration::from_secs(1)).await;
        assert_eq!(page.events.len(), 1);
        assert_eq!(page.events[0]["rollout"], 20);
        assert!(page.ended.is_none());
        // Nothing new: the wait ends empty at its deadline.
        let empty = rollouts.page(2, page.next, Duration::from_secs(1)).await;
        assert!(empty.events.is_empty() && empty.ended.is_none());
        rollouts.end(2, Err(("host down".into(), false)));
        let last = rollouts.page(2, page.next, Duration::from_secs(1)).await;
        assert_eq!(last.ended.unwrap().error.as_deref(), Some("host down"));
        let unknown = rollouts.page(9, 0, Duration::ZERO).await;
        assert!(unknown.ended.unwrap().error.unwrap().contains("no run 9"));
    }
}
