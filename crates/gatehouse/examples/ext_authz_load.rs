//! A closed-loop gRPC load generator for the Envoy ext_authz face (`make bench`,
//! scripts/bench-check.sh): `concurrency` workers, spread over `connections` HTTP/2 (h2c)
//! connections, each sends the next `envoy.service.auth.v3.Authorization/Check` as soon as the
//! previous one is answered, for `duration` seconds. The request is what Envoy's HTTP ext_authz
//! filter sends for a browser's `GET` of an API path: peer addresses, the original method, path,
//! host and headers (the session cookie among a few others), no body.
//!
//! Prints one JSON object on stdout: requests, requests/s, p50/p99 latency (ms), the count of
//! non-OK answers. Exits non-zero when any answer was not "allowed" (a denial, a gRPC error, an
//! `OkHttpResponse` without the bearer token), so that a broken session is never measured as fast
//! 401s.
//!
//! Usage: `ext_authz_load URL COOKIE [--concurrency 32] [--connections 4] [--duration 10]
//! [--key-file FILE]` — COOKIE is the `Cookie` header value, e.g. `__Host-Http-gatehouse=…`;
//! the key file holds the check listener's shared key (sent as `x-gatehouse-check-key`
//! metadata, like Envoy's `grpc_service.initial_metadata`).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark tool, not product code

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use envoy_types::ext_authz::v3::pb::{CheckRequest, HttpResponse};
use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, address, socket_address};
use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Peer, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};

#[derive(Parser)]
#[command(about = "Closed-loop load on Envoy ext_authz v3 Check (gRPC over h2c)")]
struct Args {
    /// The check listener, e.g. http://127.0.0.1:18965
    url: String,
    /// The browser's Cookie header value (with the session cookie)
    cookie: String,
    /// Requests in flight (workers)
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// HTTP/2 connections the workers are spread over (Envoy opens one per worker thread)
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Seconds of load
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// File holding the check listener's shared key (absent: no key is sent)
    #[arg(long)]
    key_file: Option<PathBuf>,
}

fn addr(ip: &str, port: u32) -> Option<Address> {
    Some(Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: ip.into(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(port)),
            ..Default::default()
        })),
    })
}

/// What Envoy's ext_authz filter sends for `GET /api/notes?limit=20` from a browser.
fn envoy_request(cookie: &str) -> CheckRequest {
    let headers: HashMap<String, String> = [
        (":authority", "app.example.com"),
        (":method", "GET"),
        (":path", "/api/notes?limit=20"),
        (":scheme", "https"),
        ("accept", "application/json"),
        ("accept-language", "en-GB,en;q=0.9"),
        ("user-agent", "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"),
        ("referer", "https://app.example.com/notes"),
        ("cookie", cookie),
        ("x-forwarded-proto", "https"),
        ("x-request-id", "6c1f8a4e-3b2d-4c5e-9f70-8a1b2c3d4e5f"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(Peer { address: addr("203.0.113.7", 51334), ..Default::default() }),
            destination: Some(Peer { address: addr("10.0.0.5", 443), ..Default::default() }),
            request: Some(Request {
                http: Some(HttpRequest {
                    id: "15877318146418862839".into(),
                    method: "GET".into(),
                    headers,
                    path: "/api/notes?limit=20".into(),
                    host: "app.example.com".into(),
                    scheme: "https".into(),
                    protocol: "HTTP/2".into(),
                    size: -1,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

#[derive(Default)]
struct Tally {
    ok: u64,
    not_ok: u64,
    first_error: Option<String>,
    latencies_us: Vec<u32>,
}

/// `None` when the answer is an allow carrying the bearer token, else why not.
fn refusal(r: Result<tonic::Response<envoy_types::ext_authz::v3::pb::CheckResponse>, tonic::Status>) -> Option<String> {
    let r = match r {
        Ok(r) => r.into_inner(),
        Err(s) => return Some(format!("gRPC error {:?}: {}", s.code(), s.message())),
    };
    let code = r.status.as_ref().map_or(-1, |s| s.code);
    match r.http_response {
        Some(HttpResponse::OkResponse(ok)) if code == 0 => {
            let bearer = ok
                .headers
                .iter()
                .filter_map(|h| h.header.as_ref())
                .any(|h| h.key == "authorization" && h.value.starts_with("Bearer "));
            (!bearer).then(|| "OkHttpResponse without authorization: Bearer".to_string())
        }
        Some(HttpResponse::DeniedResponse(d)) => {
            Some(format!("denied: status {code}, HTTP {:?}", d.status.map(|s| s.code)))
        }
        _ => Some(format!("not allowed: status {code}")),
    }
}

async fn worker(
    mut client: AuthorizationClient<Channel>,
    req: CheckRequest,
    key: Option<MetadataValue<tonic::metadata::Ascii>>,
    until: Instant,
) -> Tally {
    let mut t = Tally { latencies_us: Vec::with_capacity(1 << 16), ..Default::default() };
    while Instant::now() < until {
        let mut r = tonic::Request::new(req.clone());
        if let Some(k) = &key {
            r.metadata_mut().insert("x-gatehouse-check-key", k.clone());
        }
        let t0 = Instant::now();
        let answer = client.check(r).await;
        let us = t0.elapsed().as_micros();
        t.latencies_us.push(u32::try_from(us).unwrap_or(u32::MAX));
        match refusal(answer) {
            None => t.ok += 1,
            Some(why) => {
                t.not_ok += 1;
                t.first_error.get_or_insert(why);
            }
        }
    }
    t
}

fn pct(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    f64::from(sorted[i]) / 1000.0
}

// One thread, like `wrk -t1`: the generator is pinned to its own core by the bench script.
#[tokio::main(flavor = "current_thread")]
async fn main() {
    let a = Args::parse();
    let key = a.key_file.as_ref().map(|p| {
        let k = std::fs::read_to_string(p).expect("read the key file");
        MetadataValue::try_from(k.trim()).expect("key is ASCII")
    });
    let req = envoy_request(&a.cookie);
    let mut channels = Vec::new();
    for _ in 0..a.connections.max(1) {
        // One Endpoint::connect per connection: each Channel is its own HTTP/2 connection.
        let ch = Endpoint::from_shared(a.url.clone()).expect("URL").connect().await.expect("connect");
        channels.push(ch);
    }
    let until = Instant::now() + Duration::from_secs_f64(a.duration);
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..a.concurrency.max(1) {
        let client = AuthorizationClient::new(channels[i % channels.len()].clone());
        tasks.push(tokio::spawn(worker(client, req.clone(), key.clone(), until)));
    }
    let mut all = Tally::default();
    for t in tasks {
        let t = t.await.expect("worker");
        all.ok += t.ok;
        all.not_ok += t.not_ok;
        if all.first_error.is_none() {
            all.first_error = t.first_error;
        }
        all.latencies_us.extend(t.latencies_us);
    }
    let secs = t0.elapsed().as_secs_f64();
    all.latencies_us.sort_unstable();
    let total = all.ok + all.not_ok;
    let out = serde_json::json!({
        "requests": total,
        "ok": all.ok,
        "not_ok": all.not_ok,
        "seconds": secs,
        "rps": total as f64 / secs,
        "p50_ms": pct(&all.latencies_us, 0.50),
        "p99_ms": pct(&all.latencies_us, 0.99),
        "concurrency": a.concurrency,
        "connections": a.connections,
        "first_error": all.first_error,
    });
    println!("{out}");
    if all.not_ok > 0 || total == 0 {
        eprintln!(
            "ext_authz_load: {} of {total} answers were not \"allowed\" (first: {})",
            all.not_ok,
            all.first_error.as_deref().unwrap_or("no answers")
        );
        std::process::exit(1);
    }
}
