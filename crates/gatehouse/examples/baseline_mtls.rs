//! Benchmark baseline for the internal listener: rustls' own mutual-TLS handshake (the same
//! `gatehouse::tls::load` server config: same certificates, same verifier) in front of a hyper
//! service answering a fixed exchange-shaped body. `make bench` reports Gatehouse's handshake and
//! exchange rates as a ratio of this.
//!
//! Usage: `baseline_mtls PORT CERT KEY CLIENT_CA`

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark fixture, not product code

use std::convert::Infallible;
use std::path::PathBuf;

use http::{Request, Response};
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};

const BODY: &str = r#"{"access_token":"x","token_type":"Bearer","expires_at":1767225600,"claims":{"sub":"s"},"session":{"expires_at":1,"idle_expires_at":1}}"#;

async fn handle(_req: Request<Incoming>) -> Result<Response<http_body_util::Full<Bytes>>, Infallible> {
    Ok(Response::builder()
        .header("content-type", "application/json")
        .header("cache-control", "no-store")
        .body(http_body_util::Full::new(Bytes::from_static(BODY.as_bytes())))
        .unwrap())
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let port: u16 = args[1].parse().expect("port");
    let paths = gatehouse::tls::TlsPaths {
        cert: PathBuf::from(&args[2]),
        key: PathBuf::from(&args[3]),
        client_ca: PathBuf::from(&args[4]),
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(gatehouse::tls::load(&paths).expect("tls config"));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.expect("bind");
    loop {
        let Ok((tcp, _)) = listener.accept().await else { continue };
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else { return };
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), service_fn(handle))
                .await;
        });
    }
}
