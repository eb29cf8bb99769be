//! The fleet: bootstrapped hosts resolved by name, address or `--all`,
//! connected over mTLS, and one operation run on many hosts at once with
//! bounded concurrency, each host's result or error kept apart. What the CLI
//! and (later) the daemon and rollouts build on.

pub mod ops;

use std::future::Future;

use futures::StreamExt;

use crate::agent_client::{Agent, AgentAddress, AgentError};
use crate::state::{ClientIdentity, ControllerState};
use crate::store::{HostRecord, Store, StoreError};

/// Hosts worked on at once unless told otherwise.
pub const DEFAULT_CONCURRENCY: usize = 32;

/// Which hosts an operation is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    All,
    /// By name or agent address, in the order given.
    Hosts(Vec<String>),
}

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error(
        "unknown host `{0}`: it has not been bootstrapped (see `controller hosts`, or run `controller bootstrap {0}`)"
    )]
    UnknownHost(String),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    AgentUpgrade(Box<crate::agent_upgrade::AgentUpgradeError>),
    #[error(transparent)]
    Renewal(Box<crate::renewal::RenewalError>),
}

/// One host's part of a fleet-wide operation.
#[derive(Debug)]
pub struct HostResult<T> {
    pub host: HostRecord,
    pub result: Result<T, FleetError>,
}

/// The bootstrapped hosts and the means to reach them.
#[derive(Debug, Clone)]
pub struct Fleet {
    identity: ClientIdentity,
    ca: crate::state::SigningCa,
    store: Store,
    concurrency: usize,
}

impl Fleet {
    pub fn new(state: &ControllerState) -> Fleet {
        Fleet {
            identity: state.identity.clone(),
            ca: state.ca.clone(),
            store: state.store.clone(),
            concurrency: DEFAULT_CONCURRENCY,
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn identity(&self) -> &ClientIdentity {
        &self.identity
    }

    pub fn ca(&self) -> &crate::state::SigningCa {
        &self.ca
    }

    /// The hosts selected, each once, or the first unknown name.
    pub async fn resolve(&self, selection: &Selection) -> Result<Vec<HostRecord>, FleetError> {
        let names = match selection {
            Selection::All => return Ok(self.store.hosts().await?),
            Selection::Hosts(names) => names,
        };
        let mut hosts: Vec<HostRecord> = Vec::new();
        for name in names {
            let host = self.host(name).await?;
            if !hosts.iter().any(|h| h.name == host.name) {
                hosts.push(host);
            }
        }
        Ok(hosts)
    }

    /// One bootstrapped host by name or agent address.
    pub async fn host(&self, name: &str) -> Result<HostRecord, FleetError> {
        self.store
            .host(name)
            .await?
            .ok_or_else(|| FleetError::UnknownHost(name.to_owned()))
    }

    /// Decommissions a host: its certificates revoked (refused from now on,
    /// also if it is bootstrapped again), its records removed. Returns the
    /// host and how many certificates were revoked.
    pub async fn forget(&self, name: &str) -> Result<(HostRecord, usize), FleetError> {
        let host = self.host(name).await?;
        let revoked = self
            .store
            .forget_host(&host.name, crate::now_unix())
            .await?;
        Ok((host, revoked))
    }

    /// Connects to the host's agent, accepting only the host's current
    /// certificate, and renews that certificate first if it is due.
    pub async fn connect(&self, host: &HostRecord) -> Result<Agent, AgentError> {
        let agent = self.connect_current(host).await?;
        crate::renewal::renew_if_due(self, host, &agent).await;
        // Asked once per connection anyway (every operation checks it).
        if let Ok(revision) = agent.protocol_revision().await
            && revision < imfleet_proto::PROTOCOL_REVISION
        {
            note_older(&host.name, revision);
        }
        Ok(agent)
    }

    /// Connects to the host's agent, accepting only the host's current
    /// certificate; renews nothing.
    pub async fn connect_current(&self, host: &HostRecord) -> Result<Agent, AgentError> {
        let agent = Agent::connect(&self.identity, &address_of(host)).await?;
        crate::renewal::accept(self, host, &agent).await?;
        Ok(agent)
    }

    /// Connects to each host and runs `op` on it, at most the fleet's
    /// concurrency at once; results come back in the order of `hosts`.
    pub async fn run<T, F, Fut>(&self, hosts: &[HostRecord], op: F) -> Vec<HostResult<T>>
    where
        F: Fn(HostRecord, Agent) -> Fut,
        Fut: Future<Output = Result<T, FleetError>>,
    {
        bounded(hosts.to_vec(), self.concurrency, |host| {
            let op = &op;
            async move {
                let result = match self.connect(&host).await {
                    Ok(agent) => op(host.clone(), agent).await,
                    Err(e) => Err(e.into()),
                };
                HostResult { host, result }
            }
        })
        .await
    }
}

/// Hosts whose agent this process found older than this controller's
/// build (name, protocol revision): what the CLI offers to upgrade.
static OLDER_AGENTS: std::sync::Mutex<Vec<(String, u32)>> = std::sync::Mutex::new(Vec::new());

fn note_older(host: &str, revision: u32) {
    let mut older = OLDER_AGENTS.lock().unwrap_or_else(|p| p.into_inner());
    if !older.iter().any(|(h, _)| h == host) {
        older.push((host.to_owned(), revision));
    }
}

/// The agents met so far that are older than this controller.
pub fn older_agents() -> Vec<(String, u32)> {
    OLDER_AGENTS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
}

/// Where a host's agent listens.
pub fn address_of(host: &HostRecord) -> AgentAddress {
    AgentAddress {
        host: host.agent_address.clone(),
        port: host.agent_port,
    }
}

/// Runs `f` on every item, at most `limit` at once, answers in input order.
pub async fn bounded<I, T, F, Fut>(items: Vec<I>, limit: usize, f: F) -> Vec<T>
where
    F: Fn(I) -> Fut,
    Fut: Future<Output = T>,
{
    futures::stream::iter(items.into_iter().map(f))
        .buffered(limit.max(1))
        .collect()
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn never_more_than_the_limit_at_once_and_answers_in_order() {
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let started = tokio::time::Instant::now();
        let out = bounded((0..10u64).collect(), 3, |i| {
            let (running, peak) = (running.clone(), peak.clone());
            async move {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                // Later items finish first: order must still hold.
                tokio::time::sleep(Duration::from_secs(10 - i)).await;
                running.fetch_sub(1, Ordering::SeqCst);
                i * 2
            }
        })
        .await;
        assert_eq!(out, (0..10).map(|i| i * 2).collect::<Vec<_>>());
        assert_eq!(peak.load(Ordering::SeqCst), 3);
        // Work overlapped: far less than the 55 s the items take in turn.
        assert!(started.elapsed() < Duration::from_secs(40));
    }

    #[tokio::test]
    async fn selection_resolves_names_and_addresses_once_and_refuses_unknown_ones() {
        let (_dir, store) = crate::store::tests::open();
        store
            .upsert_host(&crate::store::tests::host("im1", "10.0.0.5"))
            .await
            .unwrap();
        store
            .upsert_host(&crate::store::tests::host("im2", "10.0.0.6"))
            .await
            .unwrap();
        let fleet = Fleet {
            identity: ClientIdentity {
                ca_pem: String::new(),
                cert_pem: String::new(),
                key_pem: String::new(),
                controllers: None,
            },
            ca: crate::state::SigningCa {
                cert_pem: String::new(),
                key_path: "/nonexistent".into(),
            },
            store,
            concurrency: 2,
        };
        let names = |hosts: Vec<HostRecord>| hosts.into_iter().map(|h| h.name).collect::<Vec<_>>();
        assert_eq!(
            names(fleet.resolve(&Selection::All).await.unwrap()),
            vec!["im1", "im2"]
        );
        let picked = Selection::Hosts(vec!["10.0.0.6".into(), "im2".into(), "im1".into()]);
        assert_eq!(
            names(fleet.resolve(&picked).await.unwrap()),
            vec!["im2", "im1"]
        );
        let unknown = Selection::Hosts(vec!["im1".into(), "im9".into()]);
        let err = fleet.resolve(&unknown).await.unwrap_err();
        assert!(
            matches!(&err, FleetError::UnknownHost(n) if n == "im9"),
            "{err}"
        );
        assert!(err.to_string().contains("controller bootstrap im9"));
    }
}
