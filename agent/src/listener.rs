//! Accepting connections before anyone is authenticated: the only part of
//! the agent an arbitrary host on the network can reach. It must not let
//! idle or slow clients starve the controller, nor spin when the process
//! runs out of file descriptors (tonic's own accept loop retries at once).
//!
//! So: TLS handshakes run here, each with a deadline, at most
//! [`MAX_PENDING_HANDSHAKES`] at once and [`MAX_PENDING_PER_SOURCE`] from one
//! source (an IPv4 address or an IPv6 /64). A newcomer over a limit takes
//! the slot of the oldest pending handshake of the source that holds the
//! most, which is its own when it is over its source's share: one source,
//! however fast it reconnects, only ever evicts its own handshakes, never
//! the controller's (a slow-loris client holds a slot for seconds, a
//! controller needs milliseconds). Accept errors from exhausted resources
//! back off instead of retrying in a busy loop.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
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

/// TLS handshakes in progress at once...
pub const MAX_PENDING_HANDSHAKES: usize = 256;
/// ...and from one source.
pub const MAX_PENDING_PER_SOURCE: usize = 16;
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

/// Where a connection comes from, for fairness: an IPv4 address, or an
/// IPv6 /64 (one host easily holds a whole /64).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Source(u128);

impl Source {
    pub fn of(peer: SocketAddr) -> Source {
        match peer.ip().to_canonical() {
            IpAddr::V4(v4) => Source(u128::from(u32::from(v4))),
            IpAddr::V6(v6) => Source((u128::from(v6) >> 64) | (1 << 127)),
        }
    }
}

/// The handshakes in progress, by source: who gets a slot and whose slot a
/// newcomer takes. Pure bookkeeping; the accept loop cancels what it says.
#[derive(Debug, Default)]
struct PendingTable {
    by_source: HashMap<Source, VecDeque<(u64, CancellationToken)>>,
    total: usize,
    next_id: u64,
}

impl PendingTable {
    /// Gives a newcomer from `source` a slot; the handshake to drop to make
    /// room, if any.
    fn admit(&mut self, source: Source) -> (u64, Option<CancellationToken>, CancellationToken) {
        let own = self.by_source.get(&source).map_or(0, VecDeque::len);
        let victim = if own >= MAX_PENDING_PER_SOURCE {
            Some(source)
        } else if self.total >= MAX_PENDING_HANDSHAKES {
            self.by_source
                .iter()
                .max_by_key(|(_, q)| q.len())
                .map(|(s, _)| *s)
        } else {
            None
        };
        let evicted = victim.and_then(|v| {
            let queue = self.by_source.get_mut(&v)?;
            let (_, cancel) = queue.pop_front()?;
            if queue.is_empty() {
                self.by_source.remove(&v);
            }
            self.total -= 1;
            Some(cancel)
        });
        let id = self.next_id;
        self.next_id += 1;
        let cancel = CancellationToken::new();
        self.by_source
            .entry(source)
            .or_default()
            .push_back((id, cancel.clone()));
        self.total += 1;
        (id, evicted, cancel)
    }

    /// The handshake `id` of `source` ended (done, failed or evicted).
    fn finish(&mut self, source: Source, id: u64) {
        if let Some(queue) = self.by_source.get_mut(&source)
            && let Some(at) = queue.iter().position(|(i, _)| *i == id)
        {
            queue.remove(at);
            self.total -= 1;
            if queue.is_empty() {
                self.by_source.remove(&source);
            }
        }
    }
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
        let pending = Arc::new(Mutex::new(PendingTable::default()));
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
            let source = Source::of(peer);
            let (id, evicted, cancel) = pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .admit(source);
            if let Some(evicted) = evicted {
                evicted.cancel();
            }
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            let pending = pending.clone();
            tokio::spawn(async move {
                let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp));
                let result = tokio::select! {
                    r = handshake => Some(r),
                    () = cancel.cancelled() => None,
                };
                pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .finish(source, id);
                match result {
                    None => tracing::debug!(%peer, "dropped a pending handshake to make room"),
                    Some(Ok(Ok(tls))) => {
                        let _ = tx.send(Ok(Connection { tls })).await;
                    }
                    Some(Ok(Err(e))) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
                    Some(Err(_)) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(text: &str) -> Source {
        Source::of(SocketAddr::new(text.parse().unwrap(), 1))
    }

    #[test]
    fn a_flooding_source_only_ever_evicts_itself() {
        let mut table = PendingTable::default();
        let flood = source("10.0.0.66");
        let mut flood_tokens = Vec::new();
        for _ in 0..10_000 {
            let (_, evicted, cancel) = table.admit(flood);
            if let Some(e) = evicted {
                e.cancel();
            }
            flood_tokens.push(cancel);
        }
        assert_eq!(table.total, MAX_PENDING_PER_SOURCE);
        let (id, evicted, controller) = table.admit(source("10.0.0.1"));
        assert!(evicted.is_none());
        for _ in 0..10_000 {
            let (_, evicted, _) = table.admit(flood);
            evicted.unwrap().cancel();
            assert!(!controller.is_cancelled());
        }
        table.finish(source("10.0.0.1"), id);
        assert_eq!(table.total, MAX_PENDING_PER_SOURCE);
        // Every flood handshake but the newest share was dropped.
        let alive = flood_tokens.iter().filter(|t| !t.is_cancelled()).count();
        assert!(alive <= MAX_PENDING_PER_SOURCE);
    }

    #[test]
    fn at_the_global_cap_the_largest_source_gives_way() {
        let mut table = PendingTable::default();
        // Many sources each at their share fill the table.
        let mut n = 0;
        'fill: for a in 0..=255u8 {
            for _ in 0..MAX_PENDING_PER_SOURCE {
                if table.total == MAX_PENDING_HANDSHAKES {
                    break 'fill;
                }
                table.admit(source(&format!("10.1.0.{a}")));
                n += 1;
            }
        }
        assert_eq!(n, MAX_PENDING_HANDSHAKES);
        let (_, evicted, _) = table.admit(source("192.0.2.1"));
        assert!(evicted.is_some());
        assert_eq!(table.total, MAX_PENDING_HANDSHAKES);
        // An IPv6 /64 is one source, however many addresses it uses.
        let a = source("2001:db8::1");
        assert_eq!(a, source("2001:db8::ffff:1"));
        assert_ne!(a, source("2001:db8:0:1::1"));
        assert_eq!(source("::ffff:10.0.0.1"), source("10.0.0.1"));
    }
}
