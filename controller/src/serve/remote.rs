//! The daemon's API for operators on any PBX node (`--api-listen`, the
//! cluster's virtual IP): the Unix socket's routes over TLS. The server
//! certificate (role `daemon`, naming the listen address and `--api-name`s)
//! is issued by the fleet CA when the daemon starts and again when half its
//! life has passed; its key lives in memory only. A client must present a
//! certificate of role `operator` from the same CA, and every request is
//! checked against the store, so a revocation holds from the next request,
//! also on a connection already open.

use std::sync::{Arc, RwLock};
use std::time::Duration;

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
use crate::state::SigningCa;
use crate::store::Store;

/// Connections served at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 64;
/// A TLS handshake that takes longer is dropped.
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);

/// The daemon's API server certificate, renewed in place.
#[derive(Debug)]
pub(super) struct ServerIdentity {
    names: Vec<String>,
    current: RwLock<(Arc<CertifiedKey>, OffsetDateTime)>,
}

impl ServerIdentity {
    /// Issues the first certificate for `names` (IP addresses or DNS names).
    pub(super) fn issue(ca: &SigningCa, names: Vec<String>) -> Result<Arc<Self>, ServeError> {
        let first = issue_key(ca, &names)?;
        Ok(Arc::new(ServerIdentity {
            names,
            current: RwLock::new(first),
        }))
    }

    /// Issues a new certificate once half of the current one's life has
    /// passed (the next handshake serves it; open connections keep theirs).
    pub(super) fn renew_if_due(&self, ca: &SigningCa) {
        let due = self
            .current
            .read()
            .map(|c| c.1)
            .unwrap_or(OffsetDateTime::UNIX_EPOCH);
        if OffsetDateTime::now_utc() < due {
            return;
        }
        match issue_key(ca, &self.names) {
            Ok(fresh) => {
                if let Ok(mut current) = self.current.write() {
                    *current = fresh;
                }
                tracing::info!("the API's server certificate was renewed");
            }
            Err(e) => tracing::error!("cannot renew the API's server certificate: {e}"),
        }
    }
}

impl ResolvesServerCert for ServerIdentity {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().map(|c| c.0.clone())
    }
}

/// A fresh key and certificate, and when to renew them.
fn issue_key(
    ca: &SigningCa,
    names: &[String],
) -> Result<(Arc<CertifiedKey>, OffsetDateTime), ServeError> {
    let bad = |detail: String| ServeError::ApiIdentity(detail);
    let lifetime = imfleet_certs::DAEMON_API_LIFETIME;
    let validity = Validity::starting_now(lifetime);
    let renew_at = OffsetDateTime::now_utc() + lifetime / 2;
    let authority = ca.load()?;
    let issued = authority
        .issue(Role::Daemon, "imfleet controller API", names, validity)
        .map_err(|e| bad(e.to_string()))?;
    drop(authority);
    let (chain, key) = imfleet_certs::tls::chain_and_key(&issued.cert_pem, &issued.key_pem)
        .map_err(|e| bad(e.to_string()))?;
    let signer = imfleet_certs::tls::provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| bad(e.to_string()))?;
    Ok((Arc::new(CertifiedKey::new(chain, signer)), renew_at))
}

/// The TLS configuration: the identity above; clients must present a
/// certificate chaining to the fleet CA (the role is checked per request).
pub(super) fn tls_config(
    ca: &SigningCa,
    identity: Arc<ServerIdentity>,
) -> Result<Arc<rustls::ServerConfig>, ServeError> {
    let bad = |detail: String| ServeError::ApiIdentity(detail);
    let provider = imfleet_certs::tls::provider();
    let roots = imfleet_certs::tls::root_store(ca.cert_pem()).map_err(|e| bad(e.to_string()))?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| bad(e.to_string()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(identity);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Who a connection is: the serial of its operator certificate.
#[derive(Debug, Clone)]
struct Peer {
    serial: String,
    address: std::net::SocketAddr,
}

/// Serves `listener` until `stop` turns true.
pub(super) async fn serve(
    shared: Shared,
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
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
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%address, "API: {MAX_CONNECTIONS} connections open; refused one");
            continue;
        };
        let (acceptor, shared) = (acceptor.clone(), shared.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let tls = match tokio::time::timeout(HANDSHAKE_DEADLINE, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::info!(%address, "API: TLS handshake refused: {e}");
                    return;
                }
                Err(_) => return,
            };
            let leaf = tls.get_ref().1.peer_certificates().and_then(|c| c.first());
            let serial = match leaf.map(|der| imfleet_certs::check_peer(der, Role::Operator)) {
                Some(Ok(info)) => info.serial_hex.to_ascii_lowercase(),
                Some(Err(e)) => {
                    tracing::info!(%address, "API: refused a client certificate: {e}");
                    return;
                }
                None => return,
            };
            let peer = Peer { serial, address };
            let app = super::http::routes(shared.clone(), true).layer(
                axum::middleware::from_fn_with_state((shared.store.clone(), peer), authorise),
            );
            let service = hyper_util::service::TowerToHyperService::new(app);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                .await;
        });
    }
}

/// Lets a request through while its operator's certificate is accepted;
/// records who asked for a change.
async fn authorise(
    State((store, peer)): State<(Store, Peer)>,
    request: Request,
    next: Next,
) -> Response {
    match store.accepted_operator(&peer.serial).await {
        Ok(Some(operator)) => {
            if request.method() != axum::http::Method::GET {
                tracing::info!(
                    operator,
                    address = %peer.address,
                    method = %request.method(),
                    path = request.uri().path(),
                    "API: operator request"
                );
            }
            next.run(request).await
        }
        Ok(None) => {
            tracing::info!(address = %peer.address, serial = peer.serial, "API: refused a revoked or unknown operator certificate");
            refuse(
                StatusCode::FORBIDDEN,
                format!(
                    "operator certificate {} is revoked or was never issued by this fleet",
                    peer.serial
                ),
            )
        }
        Err(e) => refuse(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

fn refuse(status: StatusCode, error: String) -> Response {
    (status, axum::Json(serde_json::json!({ "error": error }))).into_response()
}
