//! The mutual-TLS accept loop. `axum::serve` has no TLS, so: accept TCP → rustls handshake under
//! a timeout (with the config current at accept time) → the verified peer certificate becomes a
//! `Caller` extension on every request of that connection → hyper serves the router, with
//! graceful shutdown.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use super::ReloadingConfig;
use super::identity::{self, Caller};

pub async fn serve_mtls(
    listener: TcpListener,
    tls: Arc<ReloadingConfig>,
    router: Router,
    handshake_timeout: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let graceful = GracefulShutdown::new();
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "internal listener accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = async { let _ = stop.wait_for(|s| *s).await; } => break,
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = TlsAcceptor::from(tls.current());
        let router = router.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::info!(%peer, error = %e, "internal TLS handshake refused");
                    return;
                }
                Err(_) => {
                    tracing::info!(%peer, "internal TLS handshake timed out");
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
            let service = TowerToHyperService::new(router.layer(axum::Extension(caller)));
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            if let Err(e) = watcher.watch(conn.into_owned()).await {
                tracing::debug!(%peer, error = %e, "internal connection ended with an error");
            }
        });
    }
    // Let in-flight requests finish, but not forever.
    let _ = tokio::time::timeout(Duration::from_secs(10), graceful.shutdown()).await;
}
