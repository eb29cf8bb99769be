//! The CLI's side of the daemon's socket: the fleet as the daemon sees it
//! (`status`, `watch`), and rollouts submitted to it and followed.

use std::path::Path;
use std::time::Duration;

use super::api::{Accepted, Driving, RunPage, Submission};
use super::http::socket_path;
use crate::health::HostSnapshot;

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
    let Some((status, body)) = ask(state_dir, "GET", "/v1/hosts", None, SHORT).await? else {
        return Ok(None);
    };
    let hosts: Vec<serde_json::Value> = read(state_dir, status, &body)?;
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

/// The daemon refused a submission (nothing was started).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Unreadable(#[from] UnreadableAnswer),
    #[error("`controller serve` refused: {0}")]
    Refused(String),
}

/// Hands `submission` to the daemon; the run to follow, or `Ok(None)` when
/// no daemon listens (the CLI then does the work itself).
pub async fn submit(state_dir: &Path, submission: &Submission) -> Result<Option<u64>, ClientError> {
    let body = serde_json::to_vec(submission).unwrap_or_default();
    let Some((status, answer)) = ask(state_dir, "POST", "/v1/rollouts", Some(body), SHORT).await?
    else {
        return Ok(None);
    };
    if status == http::StatusCode::BAD_REQUEST {
        let why: serde_json::Value = serde_json::from_slice(&answer).unwrap_or_default();
        let why = why["error"].as_str().unwrap_or("no reason given");
        return Err(ClientError::Refused(
            crate::text::printable(why, 1024).into_owned(),
        ));
    }
    let accepted: Accepted = read(state_dir, status, &answer)?;
    Ok(Some(accepted.run))
}

/// What the daemon is driving; `Ok(None)` when no daemon listens.
pub async fn driving(state_dir: &Path) -> Result<Option<Driving>, UnreadableAnswer> {
    match ask(state_dir, "GET", "/v1/rollouts/driving", None, SHORT).await? {
        None => Ok(None),
        Some((status, answer)) => read(state_dir, status, &answer).map(Some),
    }
}

/// `run`'s events after `after`, waiting a while for some; `Ok(None)` when
/// the daemon is gone.
pub async fn run_page(
    state_dir: &Path,
    run: u64,
    after: u64,
) -> Result<Option<RunPage>, UnreadableAnswer> {
    let wait = super::rollouts::LONGEST_WAIT;
    let path = format!(
        "/v1/rollouts/runs/{run}?after={after}&wait_ms={}",
        wait.as_millis()
    );
    match ask(state_dir, "GET", &path, None, wait + SHORT).await? {
        None => Ok(None),
        Some((status, answer)) => read(state_dir, status, &answer).map(Some),
    }
}

/// How long a plain exchange with the daemon may take.
const SHORT: Duration = Duration::from_secs(5);

fn unreadable(state_dir: &Path, detail: String) -> UnreadableAnswer {
    UnreadableAnswer {
        socket: socket_path(state_dir).display().to_string(),
        detail: crate::text::printable(&detail, 256).into_owned(),
    }
}

fn read<T: serde::de::DeserializeOwned>(
    state_dir: &Path,
    status: http::StatusCode,
    answer: &[u8],
) -> Result<T, UnreadableAnswer> {
    if status != http::StatusCode::OK {
        return Err(unreadable(state_dir, format!("HTTP {status}")));
    }
    serde_json::from_slice(answer).map_err(|e| unreadable(state_dir, e.to_string()))
}

/// One exchange on the daemon's socket; `Ok(None)` when nothing listens
/// there, `Err` when something does but the exchange fails.
async fn ask(
    state_dir: &Path,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
    limit: Duration,
) -> Result<Option<(http::StatusCode, Vec<u8>)>, UnreadableAnswer> {
    use http_body_util::BodyExt;
    let socket = socket_path(state_dir);
    let Ok(stream) = tokio::net::UnixStream::connect(&socket).await else {
        return Ok(None);
    };
    let exchange = async {
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        let request = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, "imfleet")
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(
                body.unwrap_or_default(),
            )))
            .map_err(|e| e.to_string())?;
        let answer = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let status = answer.status();
        let body = http_body_util::Limited::new(answer.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|e| e.to_string())?;
        Ok(Some((status, body.to_bytes().to_vec())))
    };
    tokio::time::timeout(limit, exchange)
        .await
        .map_err(|_| format!("no answer within {} s", limit.as_secs()))
        .and_then(|r| r)
        .map_err(|detail| unreadable(state_dir, detail))
}

/// The most the CLI reads of the daemon's answer (a host's snapshot is at
/// most about 60 KB: see `health::ingest`).
const MAX_ANSWER_BYTES: usize = 256 << 20;
