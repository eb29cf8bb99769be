//! The CLI's side of the daemon: on the active node through the Unix socket
//! in the state directory, from any node through the API over TLS as an
//! operator ([`Endpoint`]). The fleet as the daemon sees it (`status`,
//! `watch`, `events`, `rollouts`), and rollouts submitted to it and
//! followed.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::api::{Accepted, Driving, EventsWanted, HostsWanted, RunPage, Submission};
use super::http::socket_path;
use crate::fleet::ops::ServiceStatus;
use crate::health::HostSnapshot;
use crate::store::{Event, Rollout};

/// Where the daemon is asked.
#[derive(Clone)]
pub enum Endpoint {
    /// The socket in a state directory (the node that holds the state):
    /// when nothing listens there, the CLI does the work itself.
    Local(std::path::PathBuf),
    /// The daemon's API over TLS, presenting an operator's certificate:
    /// it must answer.
    Remote(Arc<Remote>),
}

pub struct Remote {
    /// `https://host:port` as given.
    url: String,
    host: String,
    port: u16,
    server_name: rustls_pki_types::ServerName<'static>,
    tls: Arc<rustls::ClientConfig>,
}

/// A `--daemon` URL or operator bundle that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error(
        "--daemon `{0}` is not a daemon address: give https://HOST:PORT (the cluster's virtual IP and the port of `controller serve --api-listen`)"
    )]
    BadUrl(String),
    #[error(transparent)]
    Bundle(#[from] crate::operators::OperatorError),
    #[error("the operator bundle cannot be used for TLS: {0}")]
    Tls(String),
}

impl Endpoint {
    pub fn local(state_dir: &Path) -> Endpoint {
        Endpoint::Local(socket_path(state_dir))
    }

    /// The API at `url` (`https://host:port`), as the operator of `bundle`.
    pub fn remote(url: &str, bundle: &crate::operators::Bundle) -> Result<Endpoint, EndpointError> {
        let bad = || EndpointError::BadUrl(crate::text::printable(url, 256).into_owned());
        let authority = url.strip_prefix("https://").ok_or_else(bad)?;
        let authority = authority.strip_suffix('/').unwrap_or(authority);
        let (host, port) = authority.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || authority.contains(['/', '?', '#', '@']) {
            return Err(bad());
        }
        let server_name =
            rustls_pki_types::ServerName::try_from(host.to_owned()).map_err(|_| bad())?;
        let mut tls = crate::agent_tls::mtls_client_config(
            &bundle.ca_pem,
            (&bundle.cert_pem, &bundle.key_pem),
            imfleet_certs::Role::Daemon,
            // TLS 1.2 would show the operator's certificate on the wire.
            &[&rustls::version::TLS13],
        )
        .map_err(EndpointError::Tls)?;
        Arc::make_mut(&mut tls).alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Endpoint::Remote(Arc::new(Remote {
            url: url.to_owned(),
            host: host.to_owned(),
            port,
            server_name,
            tls,
        })))
    }

    /// What error messages name.
    fn describe(&self) -> String {
        match self {
            Endpoint::Local(socket) => socket.display().to_string(),
            Endpoint::Remote(remote) => remote.url.clone(),
        }
    }

    pub fn is_remote(&self) -> bool {
        matches!(self, Endpoint::Remote(_))
    }
}

/// The daemon answered, but not with something the CLI could read.
#[derive(Debug, thiserror::Error)]
#[error(
    "`controller serve` at {socket} did not give a usable answer ({detail}); see its log (journalctl -u imfleet-controller)"
)]
pub struct UnreadableAnswer {
    pub socket: String,
    pub detail: String,
}

/// Why the daemon did not give the CLI what it asked for.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Unreadable(#[from] UnreadableAnswer),
    /// The daemon said no, and why (nothing was changed).
    #[error("`controller serve` refused: {0}")]
    Refused(String),
    #[error("cannot reach `controller serve` at {url}: {detail}")]
    Unreachable { url: String, detail: String },
}

/// The fleet as the running daemon sees it; `Ok(None)` when no daemon
/// listens on the local socket (quickly: the CLI then asks the agents
/// itself). A host whose record cannot be read is listed as down with the
/// reason; it never spoils the others.
pub async fn fetch_hosts(endpoint: &Endpoint) -> Result<Option<Vec<HostSnapshot>>, ClientError> {
    let Some(hosts) = get::<Vec<serde_json::Value>>(endpoint, "/v1/hosts").await? else {
        return Ok(None);
    };
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

/// What `controller status` shows, as the daemon answers it.
pub async fn status(
    endpoint: &Endpoint,
    wanted: &HostsWanted,
) -> Result<Option<Vec<ServiceStatus>>, ClientError> {
    post(endpoint, "/v1/status", wanted, SHORT).await
}

/// Recorded events, newest first.
pub async fn events(
    endpoint: &Endpoint,
    wanted: &EventsWanted,
) -> Result<Option<Vec<Event>>, ClientError> {
    let mut path = format!("/v1/events?since={}&limit={}", wanted.since, wanted.limit);
    if let Some(host) = &wanted.host {
        path.push_str("&host=");
        path.push_str(&percent_encode(host));
    }
    get(endpoint, &path).await
}

/// The most recent rollouts.
pub async fn rollouts(
    endpoint: &Endpoint,
    limit: usize,
) -> Result<Option<Vec<Rollout>>, ClientError> {
    get(endpoint, &format!("/v1/rollouts?limit={limit}")).await
}

/// Hands `submission` to the daemon; the run to follow, or `Ok(None)` when
/// no daemon listens (the CLI then does the work itself).
pub async fn submit(
    endpoint: &Endpoint,
    submission: &Submission,
) -> Result<Option<u64>, ClientError> {
    let accepted: Option<Accepted> = post(endpoint, "/v1/rollouts", submission, SHORT).await?;
    Ok(accepted.map(|a| a.run))
}

/// What the daemon is driving; `Ok(None)` when no daemon listens.
pub async fn driving(endpoint: &Endpoint) -> Result<Option<Driving>, ClientError> {
    get(endpoint, "/v1/rollouts/driving").await
}

/// `run`'s events after `after`, waiting a while for some; `Ok(None)` when
/// the daemon is gone.
pub async fn run_page(
    endpoint: &Endpoint,
    run: u64,
    after: u64,
) -> Result<Option<RunPage>, ClientError> {
    let wait = super::rollouts::LONGEST_WAIT;
    let path = format!(
        "/v1/rollouts/runs/{run}?after={after}&wait_ms={}",
        wait.as_millis()
    );
    match ask(endpoint, "GET", &path, None, wait + SHORT).await? {
        None => Ok(None),
        Some((status, answer)) => read(endpoint, status, &answer).map(Some),
    }
}

/// How long a plain exchange with the daemon may take.
const SHORT: Duration = Duration::from_secs(5);

async fn get<T: serde::de::DeserializeOwned>(
    endpoint: &Endpoint,
    path: &str,
) -> Result<Option<T>, ClientError> {
    match ask(endpoint, "GET", path, None, SHORT).await? {
        None => Ok(None),
        Some((status, answer)) => read(endpoint, status, &answer).map(Some),
    }
}

async fn post<T: serde::de::DeserializeOwned>(
    endpoint: &Endpoint,
    path: &str,
    body: &impl serde::Serialize,
    limit: Duration,
) -> Result<Option<T>, ClientError> {
    let body = serde_json::to_vec(body).unwrap_or_default();
    match ask(endpoint, "POST", path, Some(body), limit).await? {
        None => Ok(None),
        Some((status, answer)) => read(endpoint, status, &answer).map(Some),
    }
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn unreadable(endpoint: &Endpoint, detail: String) -> UnreadableAnswer {
    UnreadableAnswer {
        socket: endpoint.describe(),
        detail: crate::text::printable(&detail, 256).into_owned(),
    }
}

/// The answer as `T`; a refusal (the daemon's `{"error": ...}` with 400,
/// 403 or 503) as its reason.
fn read<T: serde::de::DeserializeOwned>(
    endpoint: &Endpoint,
    status: http::StatusCode,
    answer: &[u8],
) -> Result<T, ClientError> {
    use http::StatusCode;
    if status == StatusCode::OK {
        return serde_json::from_slice(answer)
            .map_err(|e| unreadable(endpoint, e.to_string()).into());
    }
    let said: serde_json::Value = serde_json::from_slice(answer).unwrap_or_default();
    match said["error"].as_str() {
        Some(why)
            if [
                StatusCode::BAD_REQUEST,
                StatusCode::FORBIDDEN,
                StatusCode::SERVICE_UNAVAILABLE,
            ]
            .contains(&status) =>
        {
            Err(ClientError::Refused(
                crate::text::printable(why, 1024).into_owned(),
            ))
        }
        _ => Err(unreadable(endpoint, format!("HTTP {status}")).into()),
    }
}

/// One exchange with the daemon; `Ok(None)` when nothing listens on the
/// local socket, `Err` when something does but the exchange fails (or,
/// for the API, when it cannot be reached at all).
async fn ask(
    endpoint: &Endpoint,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
    limit: Duration,
) -> Result<Option<(http::StatusCode, Vec<u8>)>, ClientError> {
    let request = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, "imfleet")
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            body.unwrap_or_default(),
        )))
        .map_err(|e| unreadable(endpoint, e.to_string()))?;
    let timed_out = |_| format!("no answer within {} s", limit.as_secs());
    match endpoint {
        Endpoint::Local(socket) => {
            let Ok(stream) = tokio::net::UnixStream::connect(socket).await else {
                return Ok(None);
            };
            tokio::time::timeout(limit, exchange(stream, request, MAX_ANSWER_BYTES))
                .await
                .map_err(timed_out)
                .and_then(|r| r)
                .map(Some)
                .map_err(|detail| unreadable(endpoint, detail).into())
        }
        Endpoint::Remote(remote) => {
            let unreachable = |detail: String| ClientError::Unreachable {
                url: remote.url.clone(),
                detail: crate::text::printable(&detail, 512).into_owned(),
            };
            let connect = async {
                let tcp = tokio::net::TcpStream::connect((remote.host.as_str(), remote.port))
                    .await
                    .map_err(|e| e.to_string())?;
                tokio_rustls::TlsConnector::from(remote.tls.clone())
                    .connect(remote.server_name.clone(), tcp)
                    .await
                    .map_err(|e| format!("TLS: {e}"))
            };
            let tls = tokio::time::timeout(SHORT, connect)
                .await
                .map_err(|_| "no connection within 5 s".to_owned())
                .and_then(|r| r)
                .map_err(unreachable)?;
            tokio::time::timeout(limit, exchange(tls, request, MAX_REMOTE_ANSWER_BYTES))
                .await
                .map_err(timed_out)
                .and_then(|r| r)
                .map(Some)
                // A refused client certificate shows only once the server
                // reads: say so plainly.
                .map_err(unreachable)
        }
    }
}

/// One HTTP/1.1 request on `io` and its whole answer (bounded).
async fn exchange<IO>(
    io: IO,
    request: http::Request<http_body_util::Full<bytes::Bytes>>,
    most: usize,
) -> Result<(http::StatusCode, Vec<u8>), String>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use http_body_util::BodyExt;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let answer = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = answer.status();
    let body = http_body_util::Limited::new(answer.into_body(), most)
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    Ok((status, body.to_bytes().to_vec()))
}

/// The most the CLI reads of the daemon's answer (a host's snapshot is at
/// most about 60 KB: see `health::ingest`).
const MAX_ANSWER_BYTES: usize = 256 << 20;
/// The same from a daemon across the network, which may not be ours: a
/// few hundred hosts' snapshots.
const MAX_REMOTE_ANSWER_BYTES: usize = 32 << 20;
