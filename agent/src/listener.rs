//! Accepting connections before anyone is authenticated: the only part of
//! the agent an arbitrary host on the network can reach. It must not let
//! idle or slow clients starve the controller, nor spin when the process
//! runs out of file descriptors (tonic's own accept loop retries at once).
//!
//! So: TLS handshakes run here, each with a deadline, at most
//! [`MAX_PENDING_HANDSHAKES`] at once and [`MAX_PENDING_PER_SOURCE`] from one
//! source (an IPv4 address or an IPv6 /64), and a source may start at most
//! [`HANDSHAKES_PER_SECOND`] a second (more are closed before any TLS work).
//! A newcomer over its source's share takes the slot of that source's
//! oldest pending handshake. At the global cap, sources the controller has
//! completed a handshake from are preferred: a newcomer takes the slot of
//! the oldest handshake of the other source holding the most, never of a
//! controller's source, and an unknown newcomer is turned away rather than
//! take the last slot of a source that holds only one. So neither one
//! source reconnecting as fast as it can nor many sources holding a slot
//! each evict the controller (a slow-loris client holds a slot for seconds,
//! a controller needs milliseconds). Accept errors from exhausted resources
//! back off instead of retrying in a busy loop.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

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
/// ...and from one source...
pub const MAX_PENDING_PER_SOURCE: usize = 16;
/// ...which may start this many a second (and twice as many at once).
pub const HANDSHAKES_PER_SECOND: f64 = 20.0;
/// Sources whose handshake rate is remembered at most.
const MAX_RATED_SOURCES: usize = 65_536;
/// Sources remembered as the controller's.
const MAX_TRUSTED_SOURCES: usize = 16;
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
    /// Sources a controller completed a handshake from, newest last.
    trusted: VecDeque<Source>,
    /// Each source's handshake budget and when it was last refilled.
    rates: HashMap<Source, (f64, Instant)>,
}

/// What the accept loop does with a newcomer.
#[derive(Debug)]
enum Admission {
    /// Start its handshake (`id`), cancelling `evicted`'s if any.
    Start {
        id: u64,
        cancel: CancellationToken,
        evicted: Option<CancellationToken>,
    },
    /// Close it at once.
    TurnAway,
}

impl PendingTable {
    /// Decides on a newcomer from `source` at `now`.
    fn admit(&mut self, source: Source, now: Instant) -> Admission {
        if !self.within_rate(source, now) {
            return Admission::TurnAway;
        }
        let own = self.by_source.get(&source).map_or(0, VecDeque::len);
        let victim = if own >= MAX_PENDING_PER_SOURCE {
            Some(source)
        } else if self.total >= MAX_PENDING_HANDSHAKES {
            let trusted = self.trusted.contains(&source);
            let candidate = self
                .by_source
                .iter()
                .filter(|(s, _)| !self.trusted.contains(s))
                .max_by_key(|(_, q)| q.len())
                .map(|(s, q)| (*s, q.len()));
            match candidate {
                // A controller's source takes any other's slot; anyone else
                // only from a source holding more than one.
                Some((victim, held)) if trusted || held > 1 => Some(victim),
                _ => return Admission::TurnAway,
            }
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
        Admission::Start {
            id,
            cancel,
            evicted,
        }
    }

    /// Takes one handshake from `source`'s budget, if it has one.
    fn within_rate(&mut self, source: Source, now: Instant) -> bool {
        let burst = 2.0 * HANDSHAKES_PER_SECOND;
        if self.rates.len() > 4 * MAX_PENDING_HANDSHAKES {
            // Forget sources that have been quiet long enough to be full,
            // and all of them when that is not enough (a bound on memory,
            // at worst a fresh burst for each).
            self.rates
                .retain(|_, (_, at)| now.saturating_duration_since(*at) < Duration::from_secs(2));
            if self.rates.len() > MAX_RATED_SOURCES {
                self.rates.clear();
            }
        }
        let (budget, at) = self.rates.entry(source).or_insert((burst, now));
        *budget = (*budget
            + now.saturating_duration_since(*at).as_secs_f64() * HANDSHAKES_PER_SECOND)
            .min(burst);
        *at = now;
        if *budget >= 1.0 {
            *budget -= 1.0;
            true
        } else {
            false
        }
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

    /// A controller completed a handshake from `source`.
    fn trust(&mut self, source: Source) {
        self.trusted.retain(|s| *s != source);
        self.trusted.push_back(source);
        if self.trusted.len() > MAX_TRUSTED_SOURCES {
            self.trusted.pop_front();
        }
    }
}

/// Whether the client certificate of a completed handshake is a controller's.
fn is_controller(tls: &TlsStream<TcpStream>) -> bool {
    tls.get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .is_some_and(|leaf| {
            imfleet_certs::check_peer(leaf, imfleet_certs::Role::Controller).is_ok()
        })
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
/// mutual-TLS handshake, each with the credentials current when it was
/// accepted. Runs until the returned receiver is dropped.
pub fn incoming(
    listener: TcpListener,
    credentials: Arc<crate::serving::Credentials>,
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
            let admission = pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .admit(source, Instant::now());
            let Admission::Start {
                id,
                cancel,
                evicted,
            } = admission
            else {
                tracing::debug!(%peer, "turned away: too many handshakes from its source");
                continue;
            };
            if let Some(evicted) = evicted {
                evicted.cancel();
            }
            let acceptor = credentials.acceptor();
            let tx = tx.clone();
            let pending = pending.clone();
            tokio::spawn(async move {
                let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp));
                let result = tokio::select! {
                    r = handshake => Some(r),
                    () = cancel.cancelled() => None,
                };
                {
                    let mut table = pending.lock().unwrap_or_else(|p| p.into_inner());
                    table.finish(source, id);
                    if let Some(Ok(Ok(tls))) = &result
                        && is_controller(tls)
                    {
                        table.trust(source);
                    }
                }
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

    /// Admits, cancelling what is evicted; the newcomer's token, or None
    /// when turned away.
    fn admit(table: &mut PendingTable, s: Source, now: Instant) -> Option<CancellationToken> {
        match table.admit(s, now) {
            Admission::Start {
                cancel, evicted, ..
            } => {
                if let Some(e) = evicted {
                    e.cancel();
                }
                Some(cancel)
            }
            Admission::TurnAway => None,
        }
    }

    #[test]
    fn a_flooding_source_only_ever_evicts_itself_and_is_held_to_its_rate() {
        let mut table = PendingTable::default();
        let flood = source("10.0.0.66");
        let t0 = Instant::now();
        // At once: its burst, then turned away.
        let started = (0..1000)
            .filter(|_| admit(&mut table, flood, t0).is_some())
            .count();
        assert_eq!(started, 2 * HANDSHAKES_PER_SECOND as usize);
        assert_eq!(table.total, MAX_PENDING_PER_SOURCE);
        let controller = admit(&mut table, source("10.0.0.1"), t0).unwrap();
        // A second later it may start HANDSHAKES_PER_SECOND more, each
        // evicting one of its own.
        let t1 = t0 + Duration::from_secs(1);
        for _ in 0..1000 {
            admit(&mut table, flood, t1);
        }
        assert!(!controller.is_cancelled());
        assert_eq!(table.total, MAX_PENDING_PER_SOURCE + 1);
    }

    #[test]
    fn many_sources_holding_a_slot_each_never_evict_the_controller() {
        let mut table = PendingTable::default();
        let t0 = Instant::now();
        let controller = source("192.0.2.1");
        table.trust(controller);
        // The controller's handshake in flight, then the table filled by
        // other sources, one slot each.
        let ours = admit(&mut table, controller, t0).unwrap();
        let mut n = 0u32;
        while table.total < MAX_PENDING_HANDSHAKES {
            admit(
                &mut table,
                source(&format!("10.{}.{}.1", n / 250, n % 250)),
                t0,
            )
            .unwrap();
            n += 1;
        }
        // Thousands more sources: turned away, nobody evicted.
        for m in 0..5000u32 {
            let s = source(&format!("10.9.{}.{}", m / 250, m % 250));
            assert!(admit(&mut table, s, t0).is_none());
        }
        assert!(!ours.is_cancelled());
        // The controller's next handshake takes a stranger's slot.
        assert!(admit(&mut table, controller, t0).is_some());
        assert!(!ours.is_cancelled());
        assert_eq!(table.total, MAX_PENDING_HANDSHAKES);
    }

    #[test]
    fn at_the_global_cap_a_source_holding_several_gives_way() {
        let mut table = PendingTable::default();
        let t0 = Instant::now();
        for a in 0..=15u8 {
            for _ in 0..MAX_PENDING_PER_SOURCE {
                admit(&mut table, source(&format!("10.1.0.{a}")), t0).unwrap();
            }
        }
        assert_eq!(table.total, MAX_PENDING_HANDSHAKES);
        assert!(admit(&mut table, source("192.0.2.9"), t0).is_some());
        assert_eq!(table.total, MAX_PENDING_HANDSHAKES);
        // An IPv6 /64 is one source, however many addresses it uses.
        let a = source("2001:db8::1");
        assert_eq!(a, source("2001:db8::ffff:1"));
        assert_ne!(a, source("2001:db8:0:1::1"));
        assert_eq!(source("::ffff:10.0.0.1"), source("10.0.0.1"));
    }
}
