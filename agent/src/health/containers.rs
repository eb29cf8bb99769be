//! The state of imfleet's containers for health samples, kept current from
//! the Engine's event stream instead of inspecting every container on every
//! sample: an event marks its container dirty, a sample inspects only the
//! dirty ones. A full listing happens when the stream (re)connects, when a
//! container appears or is renamed, and once a minute as a safety net.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::query_parameters::{EventsOptions, ListContainersOptions};
use futures::StreamExt;
use imfleet_proto::agent::v1::ContainerStatus;

use crate::deploy::PREVIOUS_SUFFIX;
use crate::deploy::docker::{self, DockerError, LABEL_DEPLOYMENT, LABEL_ORDER};

const RESYNC_EVERY: Duration = Duration::from_secs(60);
/// Container events that change what a sample shows (not exec_*: health
/// checks run an exec every few seconds).
const EVENTS: &[&str] = &[
    "create",
    "start",
    "restart",
    "die",
    "stop",
    "kill",
    "oom",
    "destroy",
    "rename",
    "pause",
    "unpause",
    "update",
    "health_status",
];

#[derive(Debug, Clone)]
struct Known {
    deployment: String,
    order: u32,
    status: ContainerStatus,
}

#[derive(Debug, Default)]
struct Cache {
    known: BTreeMap<String, Known>,
    dirty: BTreeSet<String>,
    last_resync: Option<Instant>,
    resync: bool,
}

/// Shared by every health stream of the agent.
#[derive(Debug, Clone)]
pub struct ContainerCache {
    /// For inspections and listings: a sample must not wait long on them.
    docker: Docker,
    /// For the event stream, one long request.
    events: Docker,
    cache: Arc<Mutex<Cache>>,
    refreshing: Arc<tokio::sync::Mutex<()>>,
    listening: Arc<std::sync::Once>,
}

impl ContainerCache {
    pub fn new(docker: Docker) -> ContainerCache {
        ContainerCache {
            docker: docker.clone().with_timeout(Duration::from_secs(3)),
            events: docker,
            cache: Arc::default(),
            refreshing: Arc::default(),
            listening: Arc::new(std::sync::Once::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts following the Engine's events (once, on the first sample).
    fn listen(&self) {
        self.listening.call_once(|| {
            let this = self.clone();
            tokio::spawn(async move { this.follow_events().await });
        });
    }

    async fn follow_events(self) {
        let mut backoff = Duration::from_secs(1);
        loop {
            let filters: HashMap<String, Vec<String>> = [
                ("type".to_owned(), vec!["container".to_owned()]),
                ("label".to_owned(), vec![LABEL_DEPLOYMENT.to_owned()]),
                (
                    "event".to_owned(),
                    EVENTS.iter().map(|e| (*e).to_owned()).collect(),
                ),
            ]
            .into();
            let mut stream = self.events.events(Some(EventsOptions {
                filters: Some(filters),
                ..Default::default()
            }));
            // Whatever happened while not listening is found by a listing.
            self.lock().resync = true;
            while let Some(item) = stream.next().await {
                let Ok(event) = item else { break };
                backoff = Duration::from_secs(1);
                let name = event
                    .actor
                    .and_then(|a| a.attributes)
                    .and_then(|mut a| a.remove("name"));
                let action = event.action.unwrap_or_default();
                let mut cache = self.lock();
                match name {
                    Some(name) if cache.known.contains_key(&name) && action != "rename" => {
                        cache.dirty.insert(name);
                    }
                    _ => cache.resync = true,
                }
            }
            tracing::debug!("the Engine's event stream ended; listening again");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    }

    /// The containers of `deployment` in start order (`.previous` ones left
    /// out), current as of the last event.
    pub async fn of(&self, deployment: &str) -> Result<Vec<ContainerStatus>, DockerError> {
        self.listen();
        // One refresh at a time: a second caller waits and sees its result.
        let _refreshing = self.refreshing.lock().await;
        let (resync, dirty) = {
            let mut cache = self.lock();
            let due = cache
                .last_resync
                .is_none_or(|t| t.elapsed() >= RESYNC_EVERY);
            let resync = std::mem::take(&mut cache.resync) || due;
            (resync, std::mem::take(&mut cache.dirty))
        };
        if resync {
            self.resync().await?;
        } else {
            for name in &dirty {
                let status = match docker::status(&self.docker, name).await {
                    Ok((status, _)) => status,
                    Err(e) => {
                        // Nothing seen is forgotten: the next sample lists all.
                        self.lock().resync = true;
                        return Err(e);
                    }
                };
                let name = name.clone();
                let mut cache = self.lock();
                if status.state == "missing" {
                    cache.known.remove(&name);
                } else if let Some(k) = cache.known.get_mut(&name) {
                    k.status = status;
                }
            }
        }
        let cache = self.lock();
        let mut mine: Vec<&Known> = cache
            .known
            .iter()
            .filter(|(name, k)| k.deployment == deployment && !name.ends_with(PREVIOUS_SUFFIX))
            .map(|(_, k)| k)
            .collect();
        mine.sort_by_key(|k| (k.order, k.status.name.clone()));
        Ok(mine.into_iter().map(|k| k.status.clone()).collect())
    }

    async fn resync(&self) -> Result<(), DockerError> {
        let filters: HashMap<String, Vec<String>> =
            [("label".to_owned(), vec![LABEL_DEPLOYMENT.to_owned()])].into();
        let listed = self
            .docker
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(filters),
                ..Default::default()
            }))
            .await;
        let listed = match listed {
            Ok(listed) => listed,
            Err(e) => {
                self.lock().resync = true;
                return Err(e);
            }
        };
        let mut known = BTreeMap::new();
        for c in listed {
            let Some(name) = c.names.and_then(|n| n.into_iter().next()) else {
                continue;
            };
            let name = name.trim_start_matches('/').to_owned();
            let labels = c.labels.unwrap_or_default();
            let (status, _) = docker::status(&self.docker, &name).await?;
            if status.state == "missing" {
                continue;
            }
            known.insert(
                name,
                Known {
                    deployment: labels.get(LABEL_DEPLOYMENT).cloned().unwrap_or_default(),
                    order: labels
                        .get(LABEL_ORDER)
                        .and_then(|o| o.parse().ok())
                        .unwrap_or(u32::MAX),
                    status,
                },
            );
        }
        let mut cache = self.lock();
        // Events that came in meanwhile stay dirty for the next sample.
        cache.known = known;
        cache.last_resync = Some(Instant::now());
        Ok(())
    }
}
