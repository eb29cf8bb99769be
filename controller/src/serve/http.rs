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
    let webhook = shared.webhook.as_ref().map(|w| w.counts());
    let page = crate::health::metrics::page(&shared.view.snapshots(), webhook);
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

/// The fleet as the running daemon sees it; `None` when no daemon answers
/// (quickly: the CLI then asks the agents itself).
pub async fn fetch_hosts(state_dir: &Path) -> Option<Vec<HostSnapshot>> {
    let body = get_over_socket(&socket_path(state_dir), "/v1/hosts").await?;
    serde_json::from_slice(&body).ok()
}

async fn get_over_socket(socket: &Path, path: &str) -> Option<Vec<u8>> {
    use http_body_util::BodyExt;
    let exchange = async {
        let stream = tokio::net::UnixStream::connect(socket).await.ok()?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .ok()?;
        tokio::spawn(connection);
        let request = http::Request::get(path)
            .header(http::header::HOST, "imfleet")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .ok()?;
        let answer = sender.send_request(request).await.ok()?;
        if answer.status() != http::StatusCode::OK {
            return None;
        }
        Some(answer.into_body().collect().await.ok()?.to_bytes().to_vec())
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .ok()?
}
