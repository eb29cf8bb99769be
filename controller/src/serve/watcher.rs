//! One host's health stream, held open for as long as the daemon runs:
//! connect, stream, and on any end reconnect after a capped, jittered
//! exponential backoff. Every sample and every outage goes to the daemon's
//! view; an agent too old for the stream is asked again rarely.

use std::time::{Duration, Instant};

use crate::agent_client::AgentError;
use crate::deployment::DEPLOYMENT_NAME;
use crate::fleet::Fleet;
use crate::health::MAX_EVENT_DETAIL;
use crate::health::backoff::{Backoff, jitter};
use crate::health::ingest::{MAX_MESSAGE_BYTES, admit};
use crate::health::pacing::Pace;
use crate::store::HostRecord;
use crate::text::printable;

use super::Shared;
use super::view::FORGIVEN_AFTER;

/// Longest pause between reconnection attempts: a few intervals, so an
/// agent that comes back shows up soon, within 5 s to a minute.
pub fn reconnect_cap(interval: Duration) -> Duration {
    (interval * 6).clamp(Duration::from_secs(5), Duration::from_secs(60))
}

/// A stream that sends nothing for this long counts as lost (an agent that
/// vanished without closing its connection): two intervals plus the most an
/// agent takes for one sample (it bounds that itself at 8 s).
pub fn stall_limit(interval: Duration) -> Duration {
    interval * 2 + Duration::from_secs(10)
}

/// How often an agent too old for health streams is asked again (it is
/// upgraded by re-running bootstrap, which the rescan notices sooner).
const TOO_OLD_RECHECK: Duration = Duration::from_secs(600);

/// How long a stream must last for its end to be nothing unusual: shorter
/// ones the agent ended count against its pace, and only longer ones reset
/// the reconnection backoff.
pub fn clean_stream(interval: Duration) -> Duration {
    (interval * 10).max(Duration::from_secs(30))
}

/// How often a stream looks for a renewed certificate of its host.
const RENEWAL_RECHECK: Duration = Duration::from_secs(60);

/// How long opening a stream may take (the agent's answer, headers only).
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);

/// How a stream ended.
enum Ended {
    /// The agent could not be reached (`opened` false) or the stream broke.
    Lost { opened: bool, why: String },
    /// The agent answers but does not speak the health stream.
    TooOld(String),
    /// The daemon closed the stream: the agent broke the limits.
    Misbehaved(String),
}

pub(super) async fn run(shared: Shared, fleet: Fleet, host: HostRecord) {
    let interval = shared.config.interval;
    let name = host.name.as_str();
    // A fleet's streams start spread over an interval, not all at once.
    tokio::time::sleep(interval.min(Duration::from_secs(5)).mul_f64(jitter())).await;
    let mut backoff = Backoff::new(Duration::from_millis(500), reconnect_cap(interval));
    loop {
        let started = Instant::now();
        let mut ended = stream_once(&shared, &fleet, &host).await;
        let lasted = started.elapsed();
        if lasted >= FORGIVEN_AFTER {
            shared.view.forgive(name);
        }
        if let Ended::Lost { opened: true, why } = &ended
            && lasted < clean_stream(interval)
            && shared.view.strike(name, Instant::now()) == Pace::Close
        {
            ended = Ended::Misbehaved(format!(
                "the agent keeps ending its health stream early (the last: {why})"
            ));
        }
        match ended {
            Ended::Lost { why, .. } => {
                if lasted >= clean_stream(interval) {
                    backoff.reset();
                }
                shared.outage(name, why);
                tokio::time::sleep(backoff.next(jitter())).await;
            }
            Ended::TooOld(why) => {
                shared.too_old(name, why);
                tokio::time::sleep(TOO_OLD_RECHECK).await;
            }
            Ended::Misbehaved(why) => {
                let wait = shared.view.quarantine(name);
                let why = format!("{why}; the stream is closed for {} s", wait.as_secs());
                tracing::warn!(host = %name, "{why}");
                shared.misbehaving(name, why);
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// Streams until the stream ends.
async fn stream_once(shared: &Shared, fleet: &Fleet, host: &HostRecord) -> Ended {
    let lost = |opened, why: String| Ended::Lost {
        opened,
        why: printable(&why, MAX_EVENT_DETAIL).into_owned(),
    };
    // Only the host's current certificate, renewed first when due.
    let agent = match fleet.connect(host).await {
        Ok(agent) => agent,
        Err(e) => return lost(false, crate::error_chain(&e)),
    };
    let interval = shared.config.interval;
    let opening = agent.watch_health(DEPLOYMENT_NAME, interval);
    let mut stream = match tokio::time::timeout(OPEN_TIMEOUT, opening).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e @ AgentError::TooOld { .. })) => {
            return Ended::TooOld(printable(&e.to_string(), MAX_EVENT_DETAIL).into_owned());
        }
        Ok(Err(e)) => return lost(false, crate::error_chain(&e)),
        Err(_) => {
            return lost(
                false,
                format!(
                    "the agent did not open a health stream within {} s",
                    OPEN_TIMEOUT.as_secs()
                ),
            );
        }
    };
    // The expiry the daemon reports is the certificate's, not the agent's
    // word: the one presented, or the one a renewal since confirmed (the
    // stream stays on the connection made with the old one).
    let mut presented = agent
        .presented_certificate()
        .map(|c| c.not_after.unix_timestamp());
    let mut renewal_checked = Instant::now();
    let limit = stall_limit(interval);
    loop {
        if renewal_checked.elapsed() >= RENEWAL_RECHECK {
            renewal_checked = Instant::now();
            if let Ok(Some(now)) = shared.store.host(&host.name).await
                && presented.is_some_and(|p| now.cert_not_after > p)
            {
                presented = Some(now.cert_not_after);
            }
        }
        match tokio::time::timeout(limit, stream.message()).await {
            Err(_) => return lost(true, format!("no health sample for {} s", limit.as_secs())),
            // tonic's decoder refuses a message over the limit this way.
            Ok(Err(status)) if status.code() == tonic::Code::OutOfRange => {
                return Ended::Misbehaved(format!(
                    "the agent sent a health message over the {} KiB limit",
                    MAX_MESSAGE_BYTES / 1024
                ));
            }
            Ok(Err(status)) => return lost(true, crate::error_chain(&agent.stream_error(status))),
            Ok(Ok(None)) => return lost(true, "the agent ended the health stream".into()),
            Ok(Ok(Some(sample))) => match shared.view.pace(&host.name, Instant::now()) {
                Pace::Take => {
                    let (sample, admission) = admit(sample, presented);
                    shared.sample(&host.name, sample, admission);
                }
                Pace::Drop => {}
                Pace::Close => {
                    return Ended::Misbehaved(format!(
                        "the agent sent health samples faster than every {:.1} s, as asked",
                        interval.as_secs_f64()
                    ));
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_scale_with_the_interval_within_bounds() {
        let s = Duration::from_secs;
        assert_eq!(reconnect_cap(s(1)), s(6));
        assert_eq!(reconnect_cap(s(5)), s(30));
        assert_eq!(reconnect_cap(s(600)), s(60));
        assert_eq!(reconnect_cap(Duration::from_millis(100)), s(5));
        // A silent stream is given up after two intervals and a slow sample.
        assert_eq!(stall_limit(s(5)), s(20));
        assert_eq!(stall_limit(s(1)), s(12));
    }
}
