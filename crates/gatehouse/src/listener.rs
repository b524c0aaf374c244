//! The accept loop every listener uses. `axum::serve` has neither TLS nor a header-read timeout,
//! so: accept TCP (bounded number of connections) → a plain connection waits for its first bytes
//! (silent ones are cut off) and goes to hyper's HTTP/1 server, or to hyper-util's auto builder
//! for HTTP/2; a TLS connection does its rustls handshake under a timeout, with the config current
//! at accept time → per-connection extensions (peer address, and the verified caller for mutual
//! TLS) → hyper serves the router with a timer (slow-header clients are cut off) and graceful
//! shutdown.
//!
//! Memory per open connection matters (10,000 idle keep-alive connections are a normal load for a
//! gateway, see docs/benchmarks.md): the router is shared by every connection (an `Arc` clone),
//! the per-connection facts reach handlers as request extensions inserted per request, and each
//! connection's task is sized for its own path only.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::response::Response;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt as _;
use tower::util::Oneshot;

use crate::tls::ReloadingConfig;
use crate::tls::identity::{self, Caller};

/// Most connections one listener holds open; more wait in the kernel's accept queue.
const MAX_CONNECTIONS: usize = 10_000;
/// A client must finish sending request headers within this (slowloris defence).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

pub struct TlsSettings {
    pub config: Arc<ReloadingConfig>,
    pub handshake_timeout: Duration,
}

/// A face's service: its router, or its router behind its pipeline (`crate::pipeline`).
pub trait FaceService:
    tower::Service<http::Request<Incoming>, Response = Response, Error = Infallible, Future: Send>
    + Clone
    + Send
    + Sync
    + 'static
{
}

impl<S> FaceService for S where
    S: tower::Service<http::Request<Incoming>, Response = Response, Error = Infallible, Future: Send>
        + Clone
        + Send
        + Sync
        + 'static
{
}

/// Serve until `stop` turns true; then stop accepting and give in-flight requests `drain` to finish.
pub async fn serve<S: FaceService>(
    listener: TcpListener,
    service: S,
    tls: Option<TlsSettings>,
    mut stop: watch::Receiver<bool>,
    drain: Duration,
) {
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else { break };
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = async { let _ = stop.wait_for(|s| *s).await; } => break,
        };
        let _ = tcp.set_nodelay(true);
        let service = service.clone();
        let watcher = graceful.watcher();
        // One task per connection, sized for its own path: a plain connection's task does not
        // carry the (larger) state of a TLS handshake and stream, which every idle keep-alive
        // connection would pay for in memory.
        match &tls {
            None => {
                tokio::spawn(serve_plain(
                    tcp,
                    PerConnection { service, peer, caller: None },
                    watcher,
                    stop.clone(),
                    permit,
                ));
            }
            Some(t) => {
                let acceptor = TlsAcceptor::from(t.config.current());
                tokio::spawn(serve_tls(tcp, acceptor, t.handshake_timeout, service, peer, watcher, permit));
            }
        }
    }
    // Stop accepting now (the listener socket closes here), let in-flight requests finish, but
    // not forever: at the deadline the remaining connections are dropped with the runtime.
    drop(listener);
    if tokio::time::timeout(drain, graceful.shutdown()).await.is_err() {
        tracing::warn!(
            drain_ms = drain.as_millis() as u64,
            "requests still in flight at the drain deadline; closing them"
        );
    }
}

/// A plain-HTTP connection: wait for its first bytes (TLS listeners have their handshake timeout
/// instead), then serve it. A shutdown does not wait for a connection that has said nothing yet:
/// it holds a watcher that graceful shutdown would otherwise wait for.
async fn serve_plain<S: FaceService>(
    tcp: tokio::net::TcpStream,
    service: PerConnection<S>,
    watcher: hyper_util::server::graceful::Watcher,
    mut stopping: watch::Receiver<bool>,
    _permit: tokio::sync::OwnedSemaphorePermit,
) {
    let http2 = tokio::select! {
        known = tokio::time::timeout(HEADER_READ_TIMEOUT, protocol_known(&tcp)) => match known {
            Ok(Some(http2)) => http2,
            _ => return,
        },
        _ = stopping.wait_for(|s| *s) => return,
    };
    if http2 {
        // Boxed: an HTTP/2 connection's state is larger, and inline it would make every idle
        // HTTP/1.1 keep-alive connection's task that much larger too (docs/benchmarks.md).
        Box::pin(serve_connection(TokioIo::new(tcp), service, watcher)).await
    } else {
        serve_http1(TokioIo::new(tcp), service, watcher, stopping).await
    }
}

/// An HTTP/1.1 connection with hyper's own HTTP/1 server, not hyper-util's auto builder: the
/// auto connection's state has room for either protocol, and idle keep-alive connections paid for
/// it (17.5 → 12.2 KiB each, docs/benchmarks.md). Upgrades (WebSocket) stay on.
///
/// The graceful shutdown is done here because hyper-util's `Watcher::watch` does not take an
/// HTTP/1 connection with upgrades: on `stop` the connection finishes its request in flight and
/// closes; the watcher, held until then, lets `GracefulShutdown` know when it has.
async fn serve_http1<S: FaceService>(
    io: TokioIo<tokio::net::TcpStream>,
    service: PerConnection<S>,
    watcher: hyper_util::server::graceful::Watcher,
    mut stopping: watch::Receiver<bool>,
) {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT).max_buf_size(64 * 1024);
    let peer = service.peer;
    let conn = builder.serve_connection(io, service).with_upgrades();
    let mut conn = std::pin::pin!(conn);
    let ended = tokio::select! {
        // The connection first: it is what wakes this task on every request.
        biased;
        ended = conn.as_mut() => ended,
        // The guard `wait_for` returns is not `Send`: drop it before the branch awaits.
        _ = async { let _ = stopping.wait_for(|s| *s).await; } => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    drop(watcher);
    if let Err(e) = ended {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// A TLS connection: the handshake within its timeout, the verified caller from the client
/// certificate, then serve it.
async fn serve_tls<S: FaceService>(
    tcp: tokio::net::TcpStream,
    acceptor: TlsAcceptor,
    timeout: Duration,
    service: S,
    peer: SocketAddr,
    watcher: hyper_util::server::graceful::Watcher,
    _permit: tokio::sync::OwnedSemaphorePermit,
) {
    let stream = match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::info!(%peer, error = %e, "TLS handshake refused");
            return;
        }
        Err(_) => {
            tracing::info!(%peer, "TLS handshake timed out");
            return;
        }
    };
    let caller = Caller(
        stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or("no client certificate")
            .and_then(|c| identity::from_certificate(c)),
    );
    serve_connection(TokioIo::new(stream), PerConnection { service, peer, caller: Some(caller) }, watcher).await
}

/// Wait until the client has sent enough to tell HTTP/1.1 from HTTP/2: `Some(true)` for HTTP/2,
/// `Some(false)` for HTTP/1.x, `None` if it closed first.
///
/// It routes the connection (HTTP/1.1 to hyper's `http1` server, HTTP/2 to the auto builder),
/// and it bounds the wait for a client's first bytes: with hyper-util's auto builder, which read
/// them itself, a connection that sent nothing, or a part of the preface, held one of the
/// listener's slots for ever (10,000 of them lock the listener out). The caller bounds this wait
/// with the header timeout.
async fn protocol_known(tcp: &tokio::net::TcpStream) -> Option<bool> {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let mut head = [0u8; PREFACE.len()];
    let mut pause = Duration::from_millis(10);
    loop {
        match tcp.peek(&mut head).await {
            Ok(0) | Err(_) => return None,
            Ok(n) if n == PREFACE.len() && head == PREFACE => return Some(true),
            Ok(n) if head[..n] != PREFACE[..n] => return Some(false),
            // A prefix of the preface (or the `P` of a `POST`): the rest is on its way. `peek`
            // leaves the socket readable, so readiness cannot tell us when more arrives; look
            // again after a pause that doubles up to 1 s. Real clients send the preface in one
            // write, so this is rare, and a client that stalls here costs a dozen wake-ups, not a
            // busy loop.
            Ok(_) => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// The service of one connection: the shared face service, with the connection's peer address (read by
/// `ConnectInfo`) and, on mutual TLS, the verified caller put into each request's extensions.
///
/// Not `router.layer(Extension(..))` per connection: `Router::layer` rebuilds the whole route
/// table, so every open connection held its own copy (tens of KiB each with 10,000 idle
/// keep-alive connections), and each accept paid for building it.
#[derive(Clone)]
struct PerConnection<S> {
    service: S,
    peer: SocketAddr,
    caller: Option<Caller>,
}

impl<S: FaceService> hyper::service::Service<http::Request<Incoming>> for PerConnection<S> {
    type Response = Response;
    type Error = Infallible;
    type Future = Oneshot<S, http::Request<Incoming>>;

    fn call(&self, mut req: http::Request<Incoming>) -> Self::Future {
        req.extensions_mut().insert(ConnectInfo(self.peer));
        if let Some(caller) = &self.caller {
            req.extensions_mut().insert(caller.clone());
        }
        self.service.clone().oneshot(req)
    }
}

async fn serve_connection<I, S: FaceService>(
    io: TokioIo<I>,
    service: PerConnection<S>,
    watcher: hyper_util::server::graceful::Watcher,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT).max_buf_size(64 * 1024);
    builder.http2().timer(TokioTimer::new()).max_concurrent_streams(256);
    let peer = service.peer;
    let conn = builder.serve_connection_with_upgrades(io, service);
    if let Err(e) = watcher.watch(conn.into_owned()).await {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}
