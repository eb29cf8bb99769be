//! Accepting connections before anyone is authenticated: the only part of
//! the agent an arbitrary host on the network can reach. It must not let
//! idle or slow clients starve the controller, nor spin when the process
//! runs out of file descriptors (tonic's own accept loop retries at once).
//!
//! So: TLS handshakes run here, each with a deadline; at most
//! [`MAX_PENDING_HANDSHAKES`] at once, and when a new client arrives at the
//! cap the oldest pending one is dropped (a slow-loris client holds a slot
//! for seconds, a controller needs milliseconds). Accept errors from
//! exhausted resources back off instead of retrying in a busy loop.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::server::WebPkiClientVerifier;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;

use crate::identity::ServingIdentity;

/// TLS handshakes in progress at once.
pub const MAX_PENDING_HANDSHAKES: usize = 256;
/// How long a client gets to complete the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest pause after an accept error such as EMFILE.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    #[error("the agent's TLS identity is unusable: {0}")]
    Identity(String),
}

/// The server side of mutual TLS: the agent's certificate, client
/// certificates required and verified against the controller's CA, HTTP/2.
pub fn tls_acceptor(identity: &ServingIdentity) -> Result<TlsAcceptor, ListenerError> {
    use imfleet_certs::tls;
    let bad = |e: &dyn std::fmt::Display| ListenerError::Identity(e.to_string());
    let provider = tls::provider();
    let roots = tls::root_store(&identity.ca_pem).map_err(|e| bad(&e))?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| bad(&e))?;
    let (chain, key) =
        tls::chain_and_key(&identity.cert_pem, &identity.key_pem).map_err(|e| bad(&e))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(&e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| bad(&e))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// An authenticated connection, as tonic serves it.
pub struct Connection {
    tls: TlsStream<TcpStream>,
}

impl Connected for Connection {
    type ConnectInfo = <TlsStream<TcpStream> as Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.tls.connect_info()
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
    }
}

/// A handshake in progress, as the accept loop tracks it.
struct Pending {
    cancel: CancellationToken,
    done: Arc<AtomicBool>,
}

/// Whether an accept error means the process or system ran out of
/// something (descriptors, buffers, memory): worth a pause, not a retry.
fn is_exhaustion(e: &io::Error) -> bool {
    use nix::errno::Errno;
    matches!(
        e.raw_os_error().map(Errno::from_raw),
        Some(Errno::EMFILE | Errno::ENFILE | Errno::ENOBUFS | Errno::ENOMEM)
    )
}

/// Accepts connections on `listener` and yields those that completed the
/// mutual-TLS handshake. Runs until the returned receiver is dropped.
pub fn incoming(
    listener: TcpListener,
    acceptor: TlsAcceptor,
) -> mpsc::Receiver<io::Result<Connection>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let mut pending: VecDeque<Pending> = VecDeque::new();
        let mut backoff = Duration::from_millis(10);
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = tx.closed() => return,
            };
            let (tcp, peer) = match accepted {
                Ok(conn) => {
                    backoff = Duration::from_millis(10);
                    conn
                }
                Err(e) if is_exhaustion(&e) => {
                    tracing::warn!("cannot accept connections ({e}); pausing {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_ACCEPT_BACKOFF);
                    continue;
                }
                Err(e) => {
                    tracing::debug!("accept failed: {e}");
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            pending.retain(|p| !p.done.load(Ordering::Acquire));
            if pending.len() >= MAX_PENDING_HANDSHAKES
                && let Some(oldest) = pending.pop_front()
            {
                oldest.cancel.cancel();
            }
            let entry = Pending {
                cancel: CancellationToken::new(),
                done: Arc::new(AtomicBool::new(false)),
            };
            let (cancel, done) = (entry.cancel.clone(), entry.done.clone());
            pending.push_back(entry);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp));
                let result = tokio::select! {
                    r = handshake => r,
                    () = cancel.cancelled() => {
                        tracing::debug!(%peer, "dropped a pending handshake to make room");
                        done.store(true, Ordering::Release);
                        return;
                    }
                };
                done.store(true, Ordering::Release);
                match result {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(Connection { tls })).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    rx
}
