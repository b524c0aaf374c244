//! The benchmark baseline: a minimal hyper server answering `GET /auth/me` the way Gatehouse
//! does (find the session cookie, answer the same JSON body and headers), but with no session
//! store, no crypto and no router. `make bench` reports Gatehouse as a ratio of this, and also
//! uses it as the upstream behind Gatehouse's `/api/*` proxy (it then sees `X-Gatehouse-Session`).
//!
//! Usage: `baseline PORT`

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark fixture, not product code

use std::convert::Infallible;

use http::{Request, Response, StatusCode};
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};

const BODY: &str = r#"{"sub":"0b6f2f46-8d2e-4f8e-9d7a-3c9a1a2b3c4d","email":"alice@example.com","preferred_username":"alice","name":"Alice Liddell","realm_roles":["admin","user"],"client_roles":{"gatehouse":["notes-writer","notes-reader"]},"groups":["/staff/engineering"],"session":{"expires_at":1767268800,"idle_expires_at":1767227400}}"#;

async fn handle(req: Request<Incoming>) -> Result<Response<http_body_util::Full<Bytes>>, Infallible> {
    // The cookie when called directly; the relayed session when called through Gatehouse's proxy.
    let has_session = req.headers().contains_key("x-gatehouse-session")
        || req.headers().get_all(http::header::COOKIE).iter().any(|v| {
            v.to_str().is_ok_and(|s| s.split(';').any(|c| c.trim_start().starts_with("__Host-Http-gatehouse=")))
        });
    let (status, body) = if req.uri().path() == "/auth/me" && has_session {
        (StatusCode::OK, BODY)
    } else {
        (StatusCode::UNAUTHORIZED, r#"{"error":"unauthenticated","message":"authentication required"}"#)
    };
    Ok(Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("cache-control", "no-store")
        .header("x-content-type-options", "nosniff")
        .header("x-frame-options", "DENY")
        .header("referrer-policy", "no-referrer")
        .body(http_body_util::Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap())
}

#[tokio::main]
async fn main() {
    let port: u16 = std::env::args().nth(1).and_then(|p| p.parse().ok()).unwrap_or(18990);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.expect("bind");
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        tokio::spawn(async move {
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service_fn(handle))
                .await;
        });
    }
}
