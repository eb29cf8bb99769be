//! The daemon's HTTP faces. On TCP (loopback by default): `/metrics`
//! (Prometheus text), `/healthz` (the process answers) and `/readyz` (hosts
//! loaded from the store). On the Unix socket in the state directory's
//! private `run/` (so only who may read the state may ask): the same plus
//! `/v1/hosts`, the fleet as JSON for `controller status` and `watch`.
//! [`fetch_hosts`] is the CLI's side of that socket.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::{TcpListener, UnixListener};

use super::{ServeError, Shared};
use crate::health::HostSnapshot;

const METRICS_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

fn routes(shared: Shared, with_api: bool) -> Router {
    let mut router = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready));
    if with_api {
        router = router.route("/v1/hosts", get(hosts));
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

/// The daemon answered, but not with something the CLI could read.
#[derive(Debug, thiserror::Error)]
#[error(
    "`controller serve` answers on {socket} but its answer could not be read ({detail}); see its log (journalctl -u imfleet-controller)"
)]
pub struct UnreadableAnswer {
    pub socket: String,
    pub detail: String,
}

/// The fleet as the running daemon sees it; `Ok(None)` when no daemon
/// listens (quickly: the CLI then asks the agents itself). A host whose
/// record cannot be read is listed as down with the reason; it never
/// spoils the others.
pub async fn fetch_hosts(state_dir: &Path) -> Result<Option<Vec<HostSnapshot>>, UnreadableAnswer> {
    let socket = socket_path(state_dir);
    let unreadable = |detail: String| UnreadableAnswer {
        socket: socket.display().to_string(),
        detail: crate::text::printable(&detail, 256).into_owned(),
    };
    let Some(body) = get_over_socket(&socket, "/v1/hosts")
        .await
        .map_err(unreadable)?
    else {
        return Ok(None);
    };
    let hosts: Vec<serde_json::Value> = serde_json::from_slice(&body)
        .map_err(|e| unreadable(format!("not a JSON list of hosts: {e}")))?;
    Ok(Some(hosts.into_iter().map(host_from_json).collect()))
}

fn host_from_json(value: serde_json::Value) -> HostSnapshot {
    let name = value
        .get("host")
        .and_then(|h| h.as_str())
        .unwrap_or("?")
        .to_owned();
    serde_json::from_value(value).unwrap_or_else(|e| HostSnapshot {
        host: name,
        error: format!("the daemon's record of this host could not be read: {e}"),
        ..Default::default()
    })
}

/// The body of a GET on the daemon's socket; `Ok(None)` when nothing
/// listens there, `Err` when something does but the exchange fails.
async fn get_over_socket(socket: &Path, path: &str) -> Result<Option<Vec<u8>>, String> {
    use http_body_util::BodyExt;
    let Ok(stream) = tokio::net::UnixStream::connect(socket).await else {
        return Ok(None);
    };
    let exchange = async {
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        let request = http::Request::get(path)
            .header(http::header::HOST, "imfleet")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .map_err(|e| e.to_string())?;
        let answer = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        if answer.status() != http::StatusCode::OK {
            return Err(format!("HTTP {}", answer.status()));
        }
        let body = http_body_util::Limited::new(answer.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|e| e.to_string())?;
        Ok(Some(body.to_bytes().to_vec()))
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .map_err(|_| "no answer within 5 s".to_owned())?
}

/// The most the CLI reads of the daemon's answer (a host's snapshot is at
/// most about 60 KB: see `health::ingest`).
const MAX_ANSWER_BYTES: usize = 256 << 20;
