//! The daemon's API for operators on any PBX node (`--api-listen`, the
//! cluster's virtual IP): the Unix socket's routes over TLS 1.3. The server
//! certificate (role `daemon`, naming the listen address and `--api-name`s)
//! is issued by the fleet CA when the daemon starts, again when half its
//! life has passed or the CA changed; its key lives in memory only. A
//! client must present a certificate of role `operator` from a CA the
//! fleet trusts, whose record is current, unexpired and holds its key: checked
//! after the handshake and again on every request, so a revocation holds
//! from the next request, also on a connection already open. Connections
//! are bounded in all, per source, in header time and in lifetime; image
//! archives (files on this node) cannot be named from here.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use imfleet_certs::{Role, Validity};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use time::OffsetDateTime;
use tokio::net::TcpListener;

use super::{ServeError, Shared};
use crate::fleet::Fleet;
use crate::store::Store;

/// Connections served at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 64;
/// Connections from one source address at once (a node's CLIs).
const MAX_PER_SOURCE: usize = 8;
/// A TLS handshake, or a request's headers, that take longer are dropped.
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);
/// The longest a connection lives (the CLI opens one per exchange; the
/// longest exchange is a 20 s long-poll).
const CONNECTION_LIFETIME: Duration = Duration::from_secs(90);
/// Refusals are logged at most once per this long (with a count).
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Marks a request as come through the API, not the local socket.
#[derive(Debug, Clone, Copy)]
pub(super) struct Remote;

/// The API's listener address, identity and TLS configuration.
#[derive(Debug)]
pub(super) struct Api {
    addr: SocketAddr,
    names: Vec<String>,
    /// The server key and certificate; the CA that issued it; renew after.
    current: RwLock<(Arc<CertifiedKey>, String, OffsetDateTime)>,
    config: RwLock<Arc<rustls::ServerConfig>>,
    refused: Mutex<(Instant, u64)>,
}

impl Api {
    /// The identity for `addr` and `names` (an unspecified address names
    /// nothing a client could check: names are needed then).
    pub(super) fn new(
        fleet: &Fleet,
        addr: SocketAddr,
        extra: &[String],
    ) -> Result<Arc<Api>, ServeError> {
        let mut names = Vec::new();
        if !addr.ip().is_unspecified() {
            names.push(addr.ip().to_string());
        }
        names.extend(extra.iter().cloned());
        if names.is_empty() {
            return Err(ServeError::ApiIdentity(format!(
                "{addr} names no address a client could check; give the virtual IP (--api-listen VIP:PORT) or --api-name"
            )));
        }
        let issued = issue_key(fleet, &names)?;
        let config = tls_config(fleet, issued.0.clone())?;
        Ok(Arc::new(Api {
            addr,
            names,
            current: RwLock::new(issued),
            config: RwLock::new(config),
            refused: Mutex::new((Instant::now(), 0)),
        }))
    }

    /// After the state was re-read (a CA rotation, a renewal): the CAs
    /// clients may come from, and a new server certificate when the CA
    /// that signs changed or half the current one's life has passed.
    pub(super) fn refresh(&self, fleet: &Fleet) {
        let (key, signer, renew_at) = match self.current.read() {
            Ok(current) => current.clone(),
            Err(_) => return,
        };
        let due = signer != fleet.ca().cert_pem() || OffsetDateTime::now_utc() >= renew_at;
        let key = if due {
            match issue_key(fleet, &self.names) {
                Ok(fresh) => {
                    let key = fresh.0.clone();
                    if let Ok(mut current) = self.current.write() {
                        *current = fresh;
                    }
                    tracing::info!("the API's server certificate was renewed");
                    key
                }
                Err(e) => {
                    tracing::error!("cannot renew the API's server certificate: {e}");
                    key
                }
            }
        } else {
            key
        };
        match tls_config(fleet, key) {
            Ok(config) => {
                if let Ok(mut current) = self.config.write() {
                    *current = config;
                }
            }
            Err(e) => tracing::error!("cannot rebuild the API's TLS configuration: {e}"),
        }
    }

    fn acceptor(&self) -> Option<tokio_rustls::TlsAcceptor> {
        let config = self.config.read().ok()?.clone();
        Some(tokio_rustls::TlsAcceptor::from(config))
    }

    /// Logs a refusal, at most one line per [`LOG_EVERY`]: strangers must
    /// not flood the log.
    fn refused(&self, address: SocketAddr, why: &str) {
        let Ok(mut seen) = self.refused.lock() else {
            return;
        };
        seen.1 += 1;
        if seen.0.elapsed() >= LOG_EVERY || seen.1 == 1 {
            tracing::info!(%address, refused = seen.1, "API: refused a client: {why}");
            *seen = (Instant::now(), 0);
        }
    }
}

/// A fresh key and certificate, the CA that issued them, and when to renew.
fn issue_key(
    fleet: &Fleet,
    names: &[String],
) -> Result<(Arc<CertifiedKey>, String, OffsetDateTime), ServeError> {
    let bad = |detail: String| ServeError::ApiIdentity(detail);
    let lifetime = imfleet_certs::DAEMON_API_LIFETIME;
    let renew_at = OffsetDateTime::now_utc() + lifetime / 2;
    let authority = fleet.ca().load()?;
    let issued = authority
        .issue(
            Role::Daemon,
            "imfleet controller API",
            names,
            Validity::starting_now(lifetime),
        )
        .map_err(|e| bad(e.to_string()))?;
    drop(authority);
    let (chain, key) = imfleet_certs::tls::chain_and_key(&issued.cert_pem, &issued.key_pem)
        .map_err(|e| bad(e.to_string()))?;
    let signer = imfleet_certs::tls::provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| bad(e.to_string()))?;
    Ok((
        Arc::new(CertifiedKey::new(chain, signer)),
        fleet.ca().cert_pem().to_owned(),
        renew_at,
    ))
}

#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// TLS 1.3 only (a TLS 1.2 handshake shows the client certificate on the
/// wire); clients chain to a CA the fleet trusts (both during a rotation).
fn tls_config(
    fleet: &Fleet,
    key: Arc<CertifiedKey>,
) -> Result<Arc<rustls::ServerConfig>, ServeError> {
    let bad = |detail: String| ServeError::ApiIdentity(detail);
    let provider = imfleet_certs::tls::provider();
    let roots =
        imfleet_certs::tls::root_store(&fleet.identity().ca_pem).map_err(|e| bad(e.to_string()))?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| bad(e.to_string()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| bad(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(Fixed(key)));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Who a connection is: its operator certificate's serial and key.
#[derive(Debug, Clone)]
struct Peer {
    serial: String,
    key_sha256: String,
    address: SocketAddr,
}

impl Peer {
    async fn operator(&self, store: &Store) -> Result<Option<String>, crate::store::StoreError> {
        store
            .accepted_operator(&self.serial, &self.key_sha256, crate::now_unix())
            .await
    }
}

/// Binds (retrying while the address is not there yet: the VIP may come
/// up after the daemon) and serves until `stop` turns true. The rest of
/// the daemon never waits on it.
pub(super) async fn serve(
    api: Arc<Api>,
    shared: Shared,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut told = false;
    let listener = loop {
        match TcpListener::bind(api.addr).await {
            Ok(listener) => break listener,
            Err(e) => {
                if !told {
                    tracing::error!(addr = %api.addr, "API: cannot listen yet ({e}); trying again every second");
                    told = true;
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
        }
    };
    tracing::info!(addr = %api.addr, "API: listening");
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let sources: Arc<Mutex<HashMap<IpAddr, usize>>> = Arc::default();
    loop {
        // A slot first: beyond the limit, connections wait in the backlog.
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => permit,
            _ = stop.wait_for(|s| *s) => return,
        };
        let Ok(permit) = permit else { return };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|s| *s) => return,
        };
        let (tcp, address) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // EMFILE and the like: give the descriptors time to free.
                tracing::warn!("API: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(source) = SourceSlot::take(&sources, address.ip()) else {
            api.refused(address, "too many connections from one address");
            continue;
        };
        let (api, shared) = (api.clone(), shared.clone());
        tokio::spawn(async move {
            let _held = (permit, source);
            let _ =
                tokio::time::timeout(CONNECTION_LIFETIME, connection(&api, shared, tcp, address))
                    .await;
        });
    }
}

/// A connection's share of its source's connections, given back on drop.
struct SourceSlot {
    sources: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl SourceSlot {
    fn take(sources: &Arc<Mutex<HashMap<IpAddr, usize>>>, ip: IpAddr) -> Option<SourceSlot> {
        let mut map = sources.lock().ok()?;
        let count = map.entry(ip).or_default();
        if *count >= MAX_PER_SOURCE {
            return None;
        }
        *count += 1;
        Some(SourceSlot {
            sources: sources.clone(),
            ip,
        })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        if let Ok(mut map) = self.sources.lock()
            && let Some(count) = map.get_mut(&self.ip)
        {
            *count -= 1;
            if *count == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

async fn connection(api: &Api, shared: Shared, tcp: tokio::net::TcpStream, address: SocketAddr) {
    let Some(acceptor) = api.acceptor() else {
        return;
    };
    let tls = match tokio::time::timeout(HANDSHAKE_DEADLINE, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => return api.refused(address, &format!("TLS: {e}")),
        Err(_) => return api.refused(address, "no TLS handshake in time"),
    };
    let leaf = tls.get_ref().1.peer_certificates().and_then(|c| c.first());
    let peer = match leaf.map(|der| imfleet_certs::check_peer(der, Role::Operator)) {
        Some(Ok(info)) => Peer {
            serial: info.serial_hex.to_ascii_lowercase(),
            key_sha256: info.public_key_sha256,
            address,
        },
        Some(Err(e)) => return api.refused(address, &e.to_string()),
        None => return,
    };
    // A revoked operator gets one answer saying so, then the connection
    // closes: it reaches none of the routes.
    let accepted = match peer.operator(&shared.store).await {
        Ok(accepted) => accepted.is_some(),
        Err(e) => return tracing::warn!("API: cannot check an operator: {e}"),
    };
    let state = (shared.store.clone(), peer);
    let app = if accepted {
        super::http::routes(shared, true)
            .layer(axum::middleware::from_fn_with_state(state, authorise))
            .layer(axum::Extension(Remote))
    } else {
        api.refused(
            address,
            "a revoked, expired or unknown operator certificate",
        );
        axum::Router::new()
            .fallback(|| async {})
            .layer(axum::middleware::from_fn_with_state(state, authorise))
    };
    let service = hyper_util::service::TowerToHyperService::new(app);
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HANDSHAKE_DEADLINE)
        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
        .await;
}

/// Lets a request through while its operator's certificate is accepted;
/// records who asked for a change.
async fn authorise(
    State((store, peer)): State<(Store, Peer)>,
    request: Request,
    next: Next,
) -> Response {
    match peer.operator(&store).await {
        Ok(Some(operator)) => {
            if request.method() == axum::http::Method::POST && request.uri().path() != "/v1/status"
            {
                tracing::info!(
                    operator,
                    address = %peer.address,
                    path = request.uri().path(),
                    "API: operator request"
                );
            }
            next.run(request).await
        }
        Ok(None) => {
            let mut refused = refuse(
                StatusCode::FORBIDDEN,
                format!(
                    "operator certificate {} is revoked, expired or was never issued by this fleet",
                    peer.serial
                ),
            );
            refused.headers_mut().insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
            refused
        }
        Err(e) => refuse(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

fn refuse(status: StatusCode, error: String) -> Response {
    (status, axum::Json(serde_json::json!({ "error": error }))).into_response()
}
