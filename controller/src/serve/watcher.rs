//! One host's health stream, held open for as long as the daemon runs:
//! connect, stream, and on any end reconnect after a capped, jittered
//! exponential backoff. Every sample and every outage goes to the
//! [`Daemon`](super::Daemon)'s handler.

use std::time::Duration;

use crate::agent_client::Agent;
use crate::deployment::DEPLOYMENT_NAME;
use crate::health::backoff::{Backoff, jitter};
use crate::state::ClientIdentity;
use crate::store::HostRecord;

use super::Shared;

/// Longest pause between reconnection attempts: a few intervals, so an
/// agent that comes back shows up soon, within 5 s to a minute.
pub fn reconnect_cap(interval: Duration) -> Duration {
    (interval * 6).clamp(Duration::from_secs(5), Duration::from_secs(60))
}

/// A stream that sends nothing for this long counts as lost (an agent that
/// vanished without closing its connection).
pub fn stall_limit(interval: Duration) -> Duration {
    interval * 2 + Duration::from_secs(1)
}

pub(super) async fn run(shared: Shared, identity: ClientIdentity, host: HostRecord) {
    let interval = shared.config.interval;
    let mut backoff = Backoff::new(Duration::from_millis(500), reconnect_cap(interval));
    loop {
        let (got_samples, why) = stream_once(&shared, &identity, &host).await;
        if got_samples {
            backoff.reset();
        }
        shared.outage(&host.name, why).await;
        tokio::time::sleep(backoff.next(jitter())).await;
    }
}

/// Streams until the stream ends: whether any sample came, and why it ended.
async fn stream_once(
    shared: &Shared,
    identity: &ClientIdentity,
    host: &HostRecord,
) -> (bool, String) {
    let address = crate::fleet::address_of(host);
    let agent = match Agent::connect(identity, &address).await {
        Ok(agent) => agent,
        Err(e) => return (false, crate::error_chain(&e)),
    };
    let interval = shared.config.interval;
    let mut stream = match agent.watch_health(DEPLOYMENT_NAME, interval).await {
        Ok(stream) => stream,
        Err(e) => return (false, crate::error_chain(&e)),
    };
    let limit = stall_limit(interval);
    let mut got = false;
    loop {
        match tokio::time::timeout(limit, stream.message()).await {
            Err(_) => {
                return (got, format!("no health sample for {} s", limit.as_secs()));
            }
            Ok(Err(status)) => return (got, crate::error_chain(&agent.stream_error(status))),
            Ok(Ok(None)) => return (got, "the agent ended the health stream".into()),
            Ok(Ok(Some(sample))) => {
                got = true;
                shared.sample(&host.name, sample).await;
            }
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
        // A lost agent is noticed within two intervals and a second.
        assert_eq!(stall_limit(s(5)), s(11));
    }
}
