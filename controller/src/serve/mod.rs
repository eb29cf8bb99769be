//! `controller serve`: the long-running daemon on pbx01. It holds a health
//! stream to every bootstrapped agent (`watcher`), keeps the latest sample
//! per host in memory (`view`) and a bounded history and the events in
//! SQLite, notifies a webhook (`webhook`), and serves Prometheus metrics
//! plus its own liveness/readiness on TCP and the fleet's state to the CLI
//! on a Unix socket in the state directory (`http`; the CLI's side is
//! `client`). It owns rollouts (`rollouts`): it drives those the CLI submits
//! (`api`) and takes up an active one nobody drives. New hosts are picked
//! up by rescanning the store; a reload re-reads the controller identity
//! and restarts every stream.

pub mod api;
pub mod client;
pub mod http;
mod queue;
mod remote;
mod rollouts;
mod view;
mod watcher;
pub mod webhook;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use imfleet_proto::agent::v1::HealthSample;
use tokio::sync::mpsc;

use crate::health::ingest::Admission;

use crate::fleet::Fleet;
use crate::state::{ControllerState, StateError};
use crate::store::{HostRecord, Store, StoreError};
use view::{Changes, FleetView};
use webhook::{Notification, Webhook, WebhookError};

/// Where `/metrics` listens unless told otherwise (loopback only).
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9743";
/// How often the store is read for hosts bootstrapped meanwhile.
pub const RESCAN_EVERY: Duration = Duration::from_secs(5);
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// How often certificates are checked for renewal (due at two thirds of a
/// 90-day life: an hour late is nothing).
const RENEW_EVERY: Duration = Duration::from_secs(3600);
/// On SIGTERM, how long what is queued may take to be written (the unit
/// allows 30 s to stop; the store waits at most 10 s for a lock).
pub const FLUSH_DEADLINE: Duration = Duration::from_secs(15);
/// The daemon's socket, in the state directory's private `run/`.
pub const SOCKET: &str = "serve.sock";

#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Sampling interval asked of every agent.
    pub interval: Duration,
    pub metrics_listen: SocketAddr,
    /// Serve `/metrics` without TLS on an address other hosts can reach.
    pub metrics_insecure: bool,
    pub webhook: Option<String>,
    /// How long health history is kept.
    pub retention: Duration,
    /// Where operators' CLIs on other nodes reach the API (TLS, operator
    /// certificates): the cluster's virtual IP. None: the socket only.
    pub api_listen: Option<SocketAddr>,
    /// Further names (IP addresses or DNS names) the API's certificate
    /// carries besides the listen address.
    pub api_names: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(
        "{0} is reachable from other hosts and metrics are served without TLS; listen on 127.0.0.1 (and scrape through a reverse proxy with TLS), or pass --metrics-insecure to accept plain HTTP"
    )]
    InsecureListen(SocketAddr),
    #[error("interval {0:?} is out of range: 1 s to 1 h")]
    Interval(Duration),
    #[error("cannot listen on {what}: {source}")]
    Listen {
        what: String,
        source: std::io::Error,
    },
    #[error("a daemon already serves {0}; stop it first (systemctl stop imfleet-controller)")]
    AlreadyRunning(PathBuf),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Webhook(#[from] WebhookError),
    #[error("the API's server certificate: {0}")]
    ApiIdentity(String),
}

/// What the watchers, the HTTP handlers and the main loop share.
#[derive(Debug, Clone)]
pub(crate) struct Shared {
    config: Arc<ServeConfig>,
    view: FleetView,
    store: Store,
    webhook: Option<Webhook>,
    ready: Arc<AtomicBool>,
    rollouts: Arc<rollouts::Rollouts>,
    /// The hosts and the means to reach them, as the main loop last
    /// (re)opened them: what the API answers `status` with.
    fleet: Arc<std::sync::RwLock<Fleet>>,
    /// Changes go to one persister task in the order they were decided, so
    /// a watcher aborted by a reload or rescan never loses one.
    persist: Arc<queue::Queue>,
}

impl Shared {
    fn sample(&self, host: &str, sample: HealthSample, admission: Admission) {
        let changes = self.view.sample(host, sample, admission, crate::now_unix());
        self.queue(host, changes);
    }

    fn misbehaving(&self, host: &str, why: String) {
        let changes = self.view.misbehaving(host, why, crate::now_unix());
        self.queue(host, changes);
    }

    fn outage(&self, host: &str, why: String) {
        let changes = self.view.outage(host, why, crate::now_unix());
        self.queue(host, changes);
    }

    fn too_old(&self, host: &str, why: String) {
        let changes = self.view.too_old(host, why, crate::now_unix());
        self.queue(host, changes);
    }

    fn queue(&self, host: &str, changes: Changes) {
        self.persist.push(host, changes);
    }
}

/// Writes what the queue holds (events, history, "seen" marks) in one
/// transaction at a time, then tells the webhook, until the queue is
/// closed and empty.
async fn persister(store: Store, webhook: Option<Webhook>, queue: Arc<queue::Queue>) {
    loop {
        let closed = queue.ready().await;
        let batch = queue.take();
        if !batch.is_empty() {
            let now = crate::now_unix();
            for (host, observed) in &batch {
                for (kind, detail) in &observed.events {
                    tracing::info!(%host, %kind, "{detail}");
                }
            }
            if let Err(err) = store.record_observed(batch.clone()).await {
                let events: usize = batch.iter().map(|(_, o)| o.events.len()).sum();
                tracing::error!("cannot record {events} event(s) and the health history: {err}");
            }
            if let Some(webhook) = &webhook {
                for (host, observed) in batch {
                    for (kind, detail) in observed.events {
                        webhook.send(Notification {
                            host: host.clone(),
                            kind: kind.as_str().to_owned(),
                            detail,
                            at: crate::rfc3339(now),
                            at_unix: now,
                        });
                    }
                }
            }
        }
        if closed && queue.is_empty() {
            return;
        }
    }
}

/// Checks the configuration before anything is opened.
pub fn check(config: &ServeConfig) -> Result<(), ServeError> {
    use imfleet_proto::model::health::{MAX_INTERVAL, MIN_INTERVAL};
    if !(MIN_INTERVAL..=MAX_INTERVAL).contains(&config.interval) {
        return Err(ServeError::Interval(config.interval));
    }
    if !config.metrics_listen.ip().is_loopback() && !config.metrics_insecure {
        return Err(ServeError::InsecureListen(config.metrics_listen));
    }
    Ok(())
}

/// Runs the daemon until `shutdown` completes; each message on `reload`
/// re-reads the identity and hosts and reconnects every stream.
pub async fn run(
    state_dir: &Path,
    config: ServeConfig,
    mut reload: mpsc::Receiver<()>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    check(&config)?;
    let state = ControllerState::open(state_dir)?;
    let socket_path = http::socket_path(state_dir);
    let unix = http::bind_socket(&socket_path).await?;
    let tcp = tokio::net::TcpListener::bind(config.metrics_listen)
        .await
        .map_err(|source| ServeError::Listen {
            what: config.metrics_listen.to_string(),
            source,
        })?;
    let api = match config.api_listen {
        Some(addr) => Some(remote::Api::new(
            &Fleet::new(&state),
            addr,
            &config.api_names,
        )?),
        None => None,
    };
    let webhook = config.webhook.as_deref().map(Webhook::start).transpose()?;
    let persist = Arc::new(queue::Queue::default());
    let persisting = tokio::spawn(persister(
        state.store.clone(),
        webhook.clone(),
        persist.clone(),
    ));
    let shared = Shared {
        view: FleetView::new(config.interval),
        config: Arc::new(config),
        store: state.store.clone(),
        webhook,
        ready: Arc::default(),
        rollouts: rollouts::Rollouts::new(state_dir),
        fleet: Arc::new(std::sync::RwLock::new(Fleet::new(&state))),
        persist: persist.clone(),
    };
    let owning = tokio::spawn(shared.rollouts.clone().own(state.store.clone()));
    let (stop_http, http_stopped) = tokio::sync::watch::channel(false);
    let servers = tokio::spawn(http::serve(shared.clone(), tcp, unix, http_stopped.clone()));
    if let Some(api) = &api {
        tokio::spawn(remote::serve(api.clone(), shared.clone(), http_stopped));
    }
    tracing::info!(
        metrics = %shared.config.metrics_listen,
        socket = %socket_path.display(),
        interval_ms = shared.config.interval.as_millis() as u64,
        api = ?shared.config.api_listen,
        "serving"
    );
    let mut fleet = Fleet::new(&state);
    let mut marks = state_marks(state_dir);
    let mut watchers: HashMap<String, (HostRecord, tokio::task::AbortHandle)> = HashMap::new();
    let mut rescan = tokio::time::interval(RESCAN_EVERY);
    rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut prune = tokio::time::interval(PRUNE_EVERY);
    let mut renew = tokio::time::interval(RENEW_EVERY);
    renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(()) = reload.recv() => {
                reopen(state_dir, &shared, &mut fleet, &mut watchers, "reloaded");
                if let Some(api) = &api {
                    api.refresh(&fleet);
                }
                marks = state_marks(state_dir);
                rescan_hosts(&shared, &fleet, &mut watchers).await;
            }
            _ = rescan.tick() => {
                // Another command renewed or revoked the controller's
                // certificate, or moved a CA rotation on: re-read them.
                let now = state_marks(state_dir);
                if now != marks {
                    reopen(state_dir, &shared, &mut fleet, &mut watchers, "the controller's certificates changed");
                    if let Some(api) = &api {
                        api.refresh(&fleet);
                    }
                    marks = now;
                }
                rescan_hosts(&shared, &fleet, &mut watchers).await;
            }
            _ = renew.tick() => {
                // The daemon's own identity first (renewed where the CA is,
                // by re-opening the state), then the agents'.
                if identity_due(fleet.identity()) {
                    reopen(state_dir, &shared, &mut fleet, &mut watchers, "renewed the controller's certificate");
                    marks = state_marks(state_dir);
                    rescan_hosts(&shared, &fleet, &mut watchers).await;
                }
                tokio::spawn(renew_due_agents(fleet.clone()));
                if let Some(api) = &api {
                    api.refresh(&fleet);
                }
            }
            _ = prune.tick() => {
                let keep = shared.config.retention.as_secs().min(i64::MAX as u64) as i64;
                match shared.store.prune_health(crate::now_unix(), keep).await {
                    Ok(n) if n > 0 => tracing::debug!(removed = n, "health history pruned"),
                    Ok(_) => {}
                    Err(e) => tracing::warn!("cannot prune health history: {e}"),
                }
            }
        }
    }
    tracing::info!("stopping");
    // A rollout being driven stops where it is (every step is recorded
    // before its side effect); the next daemon takes it up. No more
    // samples are taken; what was decided is written, within a deadline
    // well inside the unit's stop timeout.
    owning.abort();
    shared.rollouts.stop();
    for (_, (_, task)) in watchers.drain() {
        task.abort();
    }
    let _ = stop_http.send(true);
    persist.close();
    match tokio::time::timeout(FLUSH_DEADLINE, persisting).await {
        Ok(_) => {}
        Err(_) => tracing::error!(
            "the state database did not take the last changes within {} s; they are lost",
            FLUSH_DEADLINE.as_secs()
        ),
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), servers).await;
    let _ = std::fs::remove_file(&socket_path);
    Ok(())
}

/// The files whose change makes the daemon re-open the state: its
/// certificate, the list of accepted controller certificates, a CA
/// rotation's record.
fn state_marks(dir: &Path) -> Vec<Option<Vec<u8>>> {
    [
        crate::state::files::CONTROLLER_CERT,
        crate::controller_list::FILE,
        crate::ca_rotation::ROTATION,
    ]
    .iter()
    .map(|name| std::fs::read(dir.join(name)).ok())
    .collect()
}

/// Re-opens the state (identity, CAs, list) and restarts every stream
/// with it; on failure keeps what it has.
fn reopen(
    dir: &Path,
    shared: &Shared,
    fleet: &mut Fleet,
    watchers: &mut HashMap<String, (HostRecord, tokio::task::AbortHandle)>,
    why: &str,
) {
    match ControllerState::open(dir) {
        Ok(fresh) => {
            *fleet = Fleet::new(&fresh);
            if let Ok(mut kept) = shared.fleet.write() {
                *kept = fleet.clone();
            }
            for (_, (_, task)) in watchers.drain() {
                task.abort();
            }
            tracing::info!("{why}: identity re-read, every stream reconnects");
        }
        Err(e) => tracing::error!("{why}, but the state cannot be re-read (keeping the old): {e}"),
    }
}

/// Whether the controller's own certificate is due for renewal.
fn identity_due(identity: &crate::state::ClientIdentity) -> bool {
    imfleet_certs::inspect_pem(&identity.cert_pem).is_ok_and(|info| {
        imfleet_certs::renewal_due(
            info.not_before,
            info.not_after,
            time::OffsetDateTime::now_utc(),
        )
    })
}

/// Connects to every host whose certificate is due, which renews it
/// (streams stay on the connections they have).
async fn renew_due_agents(fleet: Fleet) {
    let Ok(hosts) = fleet.store().hosts().await else {
        return;
    };
    let horizon = crate::now_unix() + imfleet_certs::AGENT_LIFETIME.whole_seconds() / 3;
    let due: Vec<HostRecord> = hosts
        .into_iter()
        .filter(|h| h.cert_not_after <= horizon)
        .collect();
    crate::fleet::bounded(due, 4, |host| {
        let fleet = fleet.clone();
        async move {
            if let Err(e) = fleet.connect(&host).await {
                tracing::debug!(host = %host.name, "renewal check: {e}");
            }
        }
    })
    .await;
}

/// Starts a watcher for every host not watched yet (or whose agent moved)
/// and stops those of hosts no longer known. A renewed certificate does
/// not restart a stream.
async fn rescan_hosts(
    shared: &Shared,
    fleet: &Fleet,
    watchers: &mut HashMap<String, (HostRecord, tokio::task::AbortHandle)>,
) {
    let hosts = match shared.store.hosts().await {
        Ok(hosts) => hosts,
        Err(e) => {
            tracing::error!("cannot read the hosts: {e}");
            return;
        }
    };
    let same = |a: &HostRecord, b: &HostRecord| {
        (&a.agent_address, a.agent_port) == (&b.agent_address, b.agent_port)
    };
    let by_name: HashMap<&str, &HostRecord> = hosts.iter().map(|h| (h.name.as_str(), h)).collect();
    watchers.retain(|name, (record, task)| {
        let current = by_name.get(name.as_str());
        let keep = current.is_some_and(|h| same(h, record));
        if !keep {
            task.abort();
            if current.is_none() {
                shared.view.forget(name);
            }
        }
        keep
    });
    for host in &hosts {
        if watchers.contains_key(&host.name) {
            continue;
        }
        tracing::info!(host = %host.name, "watching");
        if !shared.view.knows(&host.name) {
            // What the event log says, so a restarted daemon does not
            // announce again what it announced before.
            let query = crate::store::EventQuery {
                host: Some(host.name.clone()),
                limit: 500,
                ..Default::default()
            };
            let past = shared.store.query_events(query).await.unwrap_or_default();
            shared.view.track(host.clone(), crate::health::seed(&past));
        } else {
            shared.view.track(host.clone(), Default::default());
        }
        let task = tokio::spawn(watcher::run(shared.clone(), fleet.clone(), host.clone()));
        watchers.insert(host.name.clone(), (host.clone(), task.abort_handle()));
    }
    shared.ready.store(true, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(listen: &str, insecure: bool) -> ServeConfig {
        ServeConfig {
            interval: Duration::from_secs(5),
            metrics_listen: listen.parse().unwrap(),
            metrics_insecure: insecure,
            webhook: None,
            retention: Duration::from_secs(86_400),
            api_listen: None,
            api_names: Vec::new(),
        }
    }

    #[test]
    fn metrics_stay_on_loopback_unless_the_operator_says_otherwise() {
        assert!(check(&config("127.0.0.1:9743", false)).is_ok());
        assert!(check(&config("[::1]:9743", false)).is_ok());
        let err = check(&config("0.0.0.0:9743", false)).unwrap_err();
        assert!(err.to_string().contains("--metrics-insecure"), "{err}");
        assert!(check(&config("0.0.0.0:9743", true)).is_ok());
        let mut fast = config("127.0.0.1:9743", false);
        fast.interval = Duration::from_millis(200);
        assert!(matches!(check(&fast), Err(ServeError::Interval(_))));
    }
}
