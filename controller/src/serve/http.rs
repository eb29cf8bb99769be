//! The daemon's HTTP faces. On TCP (loopback by default): `/metrics`
//! (Prometheus text), `/healthz` (the process answers) and `/readyz` (hosts
//! loaded from the store). On the Unix socket in the state directory's
//! private `run/` (so only who may read the state may ask): the same plus
//! `/v1/hosts`, the fleet as JSON for `watch`, `/v1/status`, `/v1/events`,
//! the rollouts and those the daemon drives (`/v1/rollouts`, see `api`).
//! The same API goes over TLS to operators on other nodes (`remote`).

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::extract::{Path as UrlPath, Query};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use tokio::net::{TcpListener, UnixListener};

use super::api::{Accepted, EventsWanted, HostsWanted, MAX_LISTED, Submission};
use super::{ServeError, Shared};

const METRICS_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

pub(super) fn routes(shared: Shared, with_api: bool) -> Router {
    let mut router = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready));
    if with_api {
        router = router
            .route("/v1/hosts", get(hosts))
            .route("/v1/status", post(status))
            .route("/v1/events", get(events))
            .route("/v1/rollouts", post(submit).get(rollouts))
            .route("/v1/rollouts/driving", get(driving))
            .route("/v1/rollouts/runs/{run}", get(run_page));
    }
    router.with_state(shared)
}

async fn metrics(State(shared): State<Shared>) -> impl IntoResponse {
    let daemon = crate::health::metrics::DaemonCounts {
        webhook: shared.webhook.as_ref().map(|w| w.counts()),
        queue_dropped: shared.persist.dropped(),
    };
    let page = crate::health::metrics::page(&shared.view.snapshots(), daemon);
    ([(header::CONTENT_TYPE, METRICS_TYPE)], page)
}

async fn ready(State(shared): State<Shared>) -> impl IntoResponse {
    if shared.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "hosts not loaded yet\n")
    }
}

async fn hosts(State(shared): State<Shared>) -> impl IntoResponse {
    axum::Json(shared.view.snapshots())
}

/// What `controller status` shows, as the daemon sees it (the agents it
/// has not seen yet are asked).
async fn status(
    State(shared): State<Shared>,
    axum::Json(wanted): axum::Json<HostsWanted>,
) -> axum::response::Response {
    let fleet = match shared.fleet.read() {
        Ok(fleet) => fleet.clone(),
        Err(_) => {
            return failed(
                StatusCode::INTERNAL_SERVER_ERROR,
                "fleet lock poisoned".into(),
            );
        }
    };
    let hosts = match fleet.resolve(&wanted.selection()).await {
        Ok(hosts) => hosts,
        Err(e) => return failed(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let snapshots = shared.view.snapshots();
    let statuses = crate::fleet::ops::status_from_snapshots(&fleet, &snapshots, &hosts).await;
    axum::Json(statuses).into_response()
}

async fn events(
    State(shared): State<Shared>,
    Query(wanted): Query<EventsWanted>,
) -> axum::response::Response {
    let host = match &wanted.host {
        Some(name) => match shared.store.host(name).await {
            Ok(Some(host)) => Some(host.name),
            Ok(None) => {
                let unknown = crate::fleet::FleetError::UnknownHost(name.clone());
                return failed(StatusCode::BAD_REQUEST, unknown.to_string());
            }
            Err(e) => return failed(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        },
        None => None,
    };
    let query = crate::store::EventQuery {
        host,
        since: wanted.since,
        after_id: 0,
        limit: wanted.limit.min(MAX_LISTED),
    };
    match shared.store.query_events(query).await {
        Ok(events) => axum::Json(events).into_response(),
        Err(e) => failed(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

#[derive(serde::Deserialize)]
struct RolloutsQuery {
    limit: usize,
}

async fn rollouts(
    State(shared): State<Shared>,
    Query(query): Query<RolloutsQuery>,
) -> axum::response::Response {
    match shared.store.rollouts(query.limit.min(MAX_LISTED)).await {
        Ok(rollouts) => axum::Json(rollouts).into_response(),
        Err(e) => failed(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// An error the CLI shows as the daemon's refusal.
fn failed(status: StatusCode, error: String) -> axum::response::Response {
    (status, axum::Json(serde_json::json!({ "error": error }))).into_response()
}

async fn submit(
    State(shared): State<Shared>,
    remote: Option<axum::Extension<super::remote::Remote>>,
    axum::Json(submission): axum::Json<Submission>,
) -> axum::response::Response {
    // An image archive is a file on this node: only who may read the state
    // here (the socket) may name one, or any file could be sent to a host.
    if remote.is_some()
        && let Submission::Start { upgrade, .. } = &submission
        && !upgrade.image_files.is_empty()
    {
        return failed(
            StatusCode::BAD_REQUEST,
            "image archives (--image-file) are named only on the node that holds the state; run this upgrade there, or use images the hosts can pull".into(),
        );
    }
    match shared.rollouts.submit(submission) {
        Ok(run) => axum::Json(Accepted { run }).into_response(),
        Err(error) => failed(StatusCode::BAD_REQUEST, error),
    }
}

async fn driving(State(shared): State<Shared>) -> impl IntoResponse {
    axum::Json(shared.rollouts.driving())
}

#[derive(serde::Deserialize)]
struct PageQuery {
    #[serde(default)]
    after: u64,
    /// Milliseconds to wait for news.
    #[serde(default)]
    wait_ms: u64,
}

async fn run_page(
    State(shared): State<Shared>,
    UrlPath(run): UrlPath<u64>,
    Query(query): Query<PageQuery>,
) -> impl IntoResponse {
    let wait = Duration::from_millis(query.wait_ms);
    axum::Json(shared.rollouts.page(run, query.after, wait).await)
}

/// Serves both listeners until `stop` turns true.
pub(super) async fn serve(
    shared: Shared,
    tcp: TcpListener,
    unix: UnixListener,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let until = |mut stop: tokio::sync::watch::Receiver<bool>| async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    let tcp =
        axum::serve(tcp, routes(shared.clone(), false)).with_graceful_shutdown(until(stop.clone()));
    let unix = axum::serve(unix, routes(shared, true)).with_graceful_shutdown(until(stop));
    let (a, b) = tokio::join!(tcp.into_future(), unix.into_future());
    for e in [a.err(), b.err()].into_iter().flatten() {
        tracing::error!("HTTP server: {e}");
    }
}

/// Binds the daemon's socket (0600), refusing when a daemon answers on it
/// and replacing a stale one left by a daemon that died.
pub(super) async fn bind_socket(path: &Path) -> Result<UnixListener, ServeError> {
    if tokio::net::UnixStream::connect(path).await.is_ok() {
        return Err(ServeError::AlreadyRunning(path.to_owned()));
    }
    let listen_err = |source| ServeError::Listen {
        what: path.display().to_string(),
        source,
    };
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(listen_err(e)),
        _ => {}
    }
    let listener = UnixListener::bind(path).map_err(listen_err)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(listen_err)?;
    Ok(listener)
}

/// The daemon's socket for a state directory.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    crate::state::run_dir(state_dir).join(super::SOCKET)
}
