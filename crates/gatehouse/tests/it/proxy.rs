//! The `/api/*` proxy (DESIGN §3, SECURITY 6–9) against a real upstream HTTP server in the test
//! process: what reaches the upstream, what comes back, streaming, upgrades and failures.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::*;

#[derive(Default)]
struct Upstream {
    hits: AtomicUsize,
    /// Released by the test once it has seen the first SSE event.
    sse_go: tokio::sync::Notify,
}

/// Echo what arrived (method, path, headers, body length) and try to plant cookies and CORS.
async fn echo(State(up): State<Arc<Upstream>>, req: Request) -> Response {
    up.hits.fetch_add(1, Ordering::SeqCst);
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX).await.map(|b| b.len()).unwrap_or(usize::MAX);
    let mut headers = serde_json::Map::new();
    for (k, v) in &parts.headers {
        headers.insert(k.as_str().into(), Value::String(v.to_str().unwrap_or("?").into()));
    }
    let mut resp = axum::Json(json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or(""),
        "headers": headers,
        "body_len": body,
    }))
    .into_response();
    let h = resp.headers_mut();
    h.append("set-cookie", HeaderValue::from_static("__Host-Http-gatehouse=fixated; Path=/; Secure"));
    h.append("set-cookie", HeaderValue::from_static("theme=dark; Path=/"));
    h.insert("access-control-allow-origin", HeaderValue::from_static("http://localhost:1"));
    h.insert("access-control-allow-credentials", HeaderValue::from_static("true"));
    // A weak policy of its own, as an upstream serving user files might send.
    h.insert("content-security-policy", HeaderValue::from_static("default-src * 'unsafe-inline' 'unsafe-eval'"));
    h.insert("x-frame-options", HeaderValue::from_static("ALLOWALL"));
    h.insert("cross-origin-resource-policy", HeaderValue::from_static("cross-origin"));
    resp
}

async fn sse(State(up): State<Arc<Upstream>>) -> Response {
    up.hits.fetch_add(1, Ordering::SeqCst);
    // One event, then wait for the test to release the second: a buffering proxy would deadlock.
    let stream = futures_util::stream::unfold(0u8, move |step| {
        let up = up.clone();
        async move {
            match step {
                0 => Some((Ok::<_, std::io::Error>("data: one\n\n"), 1)),
                1 => {
                    up.sse_go.notified().await;
                    Some((Ok("data: two\n\n"), 2))
                }
                _ => None,
            }
        }
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(Body::from_stream(stream))
        .unwrap()
}

async fn slow(State(up): State<Arc<Upstream>>) -> &'static str {
    up.hits.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(5)).await;
    "late"
}

/// A minimal WebSocket-style upgrade: 101, then echo every byte back.
async fn upgrade(State(up): State<Arc<Upstream>>, mut req: Request) -> Response {
    up.hits.fetch_add(1, Ordering::SeqCst);
    if req.headers().get("upgrade").map(|v| v.as_bytes()) != Some(b"websocket") {
        return (StatusCode::BAD_REQUEST, "no upgrade header").into_response();
    }
    let on = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        if let Ok(io) = on.await {
            let mut io = hyper_util::rt::TokioIo::new(io);
            let mut buf = [0u8; 1024];
            while let Ok(n) = io.read(&mut buf).await {
                if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .body(Body::empty())
        .unwrap()
}

async fn start_upstream() -> (u16, Arc<Upstream>) {
    let up = Arc::new(Upstream::default());
    let app = Router::new()
        .route("/base/sse", axum::routing::get(sse))
        .route("/base/slow", axum::routing::get(slow))
        .route("/base/ws", axum::routing::get(upgrade))
        .fallback(echo)
        .with_state(up.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (port, up)
}

fn routes(port: u16) -> String {
    format!(
        r#"
[[routes]]
prefix = "/api/echo/"
upstream = "http://127.0.0.1:{port}/base/"
relay = "session"
timeout = "1s"
max_body_bytes = 2097152
session_recheck = "1s"
[[routes]]
prefix = "/api/echo/deeper/"
upstream = "http://127.0.0.1:{port}/other/"
relay = "session"
[[routes]]
prefix = "/api/bearer/"
upstream = "http://127.0.0.1:{port}/base/"
relay = "bearer"
[[routes]]
prefix = "/api/down/"
upstream = "http://127.0.0.1:1/"
relay = "session"
[[routes]]
prefix = "/api/allow/"
upstream = "http://127.0.0.1:{port}/base/"
relay = "session"
request_headers = ["X-Tenant-Hint"]
[[routes]]
prefix = "/api/own-headers/"
upstream = "http://127.0.0.1:{port}/base/"
relay = "session"
upstream_security_headers = true
[[routes]]
prefix = "/api/tight/"
upstream = "http://127.0.0.1:{port}/base/"
relay = "session"
max_in_flight = 1
"#
    )
}

struct Env {
    gate: Gate,
    up: Arc<Upstream>,
    sid: String,
    _work: Workdir,
}

async fn env() -> Env {
    let (port, up) = start_upstream().await;
    let work = Workdir::new();
    let gate = Gate::start(&work, &Options { extra: routes(port), ..Options::default() }).await;
    let sid = logged_in(&gate, "alice").await;
    Env { gate, up, sid, _work: work }
}

impl Env {
    fn get(&self, path: &str) -> reqwest::RequestBuilder {
        http().get(format!("{}{path}", self.gate.base)).header("cookie", format!("{COOKIE}={}", self.sid))
    }
    fn post(&self, path: &str) -> reqwest::RequestBuilder {
        http()
            .post(format!("{}{path}", self.gate.base))
            .header("cookie", format!("{COOKIE}={}", self.sid))
            .header("x-csrf", "1")
            .header("origin", &self.gate.base)
    }
    fn hits(&self) -> usize {
        self.up.hits.load(Ordering::SeqCst)
    }
}

/// Identity-looking header names, generated from the families upstream frameworks trust, half of
/// them in the underscore spelling CGI-style servers map onto the dashed one (70 names: a request
/// stays under the server's header-count limit).
fn identity_header_names() -> Vec<String> {
    let mut out = Vec::new();
    for p in ["x-", "x-auth-", "x-remote-", "remote-", "x-consumer-", "x-authenticated-", ""] {
        for w in ["user", "user-id", "email", "roles", "groups", "tenant", "principal", "sub", "username", "org-id"] {
            let name = format!("{p}{w}");
            out.push(if out.len() % 2 == 0 { name } else { name.replace('-', "_") });
        }
    }
    out
}

#[tokio::test]
async fn identity_header_families_never_reach_the_upstream_and_allow_lists_pass_only_what_they_list() {
    let e = env().await;
    let names = identity_header_names();
    for (path, expect_extra) in [("/api/echo/who", None), ("/api/allow/who", Some("x-tenant-hint"))] {
        let mut req = e.get(path).header("x-feature-flag", "on").header("x-tenant-hint", "blue");
        for n in &names {
            req = req.header(n.as_str(), "admin");
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 200);
        let seen = r.json::<Value>().await.unwrap()["headers"].as_object().unwrap().clone();
        for n in &names {
            assert!(!seen.contains_key(&n.to_ascii_lowercase()), "{path}: {n} reached the upstream");
        }
        assert!(!seen.values().any(|v| v == "admin"), "{path}: no identity value at all: {seen:?}");
        match expect_extra {
            // Deny mode: ordinary application headers pass.
            None => {
                assert_eq!(seen["x-feature-flag"], "on");
                assert!(!seen.contains_key("x-tenant-hint"), "the tenant family is identity-looking");
            }
            // Allow-list mode: standard headers, the listed one (even from an identity family: the
            // operator chose it), and Gatehouse's own; nothing else.
            Some(listed) => {
                assert_eq!(seen[listed], "blue");
                assert!(!seen.contains_key("x-feature-flag"), "unlisted header passed: {seen:?}");
                assert!(seen.contains_key("x-gatehouse-session"), "the relay still arrives");
            }
        }
    }
    e.gate.stop().await;
}

#[tokio::test]
async fn the_upstream_sees_the_session_relay_and_nothing_the_browser_could_forge() {
    let e = env().await;
    let r = e
        .get("/api/echo/collections/notes/records?page=2&filter=a%20b")
        .header("authorization", "Bearer forged")
        .header("x-gatehouse-session", "forged")
        .header("x-forwarded-user", "admin")
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-forwarded-host", "evil.example")
        .header("x-auth-request-email", "admin@example.com")
        .header("x-http-method-override", "DELETE")
        .header("x_forwarded_user", "admin")
        .header("x_gatehouse_session", "forged")
        .header("x-keep-me", "yes")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let cookies: Vec<String> =
        r.headers().get_all("set-cookie").iter().map(|v| v.to_str().unwrap().to_owned()).collect();
    assert!(cookies.is_empty(), "the upstream sets no cookie on our origin: {cookies:?}");
    assert_eq!(r.headers()["cache-control"], "no-store", "user data is not cached");
    assert!(r.headers().get("access-control-allow-origin").is_none(), "upstream CORS is dropped");
    assert!(r.headers().get("access-control-allow-credentials").is_none());
    let j: Value = r.json().await.unwrap();
    assert_eq!(j["method"], "GET");
    assert_eq!(j["path"], "/base/collections/notes/records?page=2&filter=a%20b", "prefix replaced, query kept");
    let h = &j["headers"];
    assert_eq!(h["x-gatehouse-session"], e.sid.as_str(), "relay = session sends the real session id");
    assert!(h.get("cookie").is_none(), "browser cookie stripped: {h}");
    assert!(h.get("authorization").is_none(), "browser Authorization stripped: {h}");
    assert!(h.get("x-forwarded-user").is_none() && h.get("x-auth-request-email").is_none(), "{h}");
    assert!(h.get("x-http-method-override").is_none(), "{h}");
    assert!(h.get("x_forwarded_user").is_none() && h.get("x_gatehouse_session").is_none(), "underscore names: {h}");
    assert_eq!(h["x-forwarded-for"], "127.0.0.1", "spoofed XFF from an untrusted peer replaced: {h}");
    let port = e.gate.base.rsplit(':').next().unwrap();
    assert_eq!(h["x-forwarded-host"], format!("localhost:{port}"));
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-prefix"], "/api/echo");
    assert_eq!(h["x-keep-me"], "yes", "ordinary headers pass");
    assert!(h["host"].as_str().unwrap().starts_with("127.0.0.1:"), "Host is the upstream's: {h}");

    // TRACE would echo the relay header to page script.
    let r = http()
        .request(reqwest::Method::from_bytes(b"TRACE").unwrap(), format!("{}/api/echo/x", e.gate.base))
        .header("cookie", format!("{COOKIE}={}", e.sid))
        .header("x-csrf", "1")
        .header("origin", &e.gate.base)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405, "TRACE with a valid CSRF proof is still refused");

    // The longest prefix wins.
    let j: Value = e.get("/api/echo/deeper/x").send().await.unwrap().json().await.unwrap();
    assert_eq!(j["path"], "/other/x");
}

#[tokio::test]
async fn bearer_relay_sends_the_users_access_token() {
    let e = env().await;
    let j: Value = e
        .get("/api/bearer/whoami")
        .header("authorization", "Bearer forged")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let auth = j["headers"]["authorization"].as_str().unwrap();
    let token = auth.strip_prefix("Bearer ").expect("bearer");
    assert!(looks_like_jwt(token), "a JWT from Keycloak");
    let payload = token.split('.').nth(1).unwrap();
    let claims: Value =
        serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
    assert_eq!(claims["preferred_username"], "alice");
    assert_eq!(claims["iss"], issuer());
    assert!(j["headers"].get("x-gatehouse-session").is_none(), "bearer relay does not also send the session");
}

#[tokio::test]
async fn no_session_no_forwarding() {
    let e = env().await;
    let before = e.hits();
    for cookie in [None, Some("garbage".to_string()), Some("A".repeat(43))] {
        let mut req = http().get(format!("{}/api/echo/x", e.gate.base));
        if let Some(c) = &cookie {
            req = req.header("cookie", format!("{COOKIE}={c}"));
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 401, "{cookie:?}");
        let j: Value = r.json().await.unwrap();
        assert_eq!(j["error"], "unauthenticated");
    }
    // A logged-out session is dead on the proxy at once.
    let r = e.post("/auth/logout").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(e.get("/api/echo/x").send().await.unwrap().status(), 401);
    assert_eq!(e.hits(), before, "the upstream was never called");
    let r = e.get("/api/nothing-here/x").send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "not_found");
}

#[tokio::test]
async fn ambiguous_paths_are_refused_before_routing() {
    let e = env().await;
    let before = e.hits();
    // Raw TCP: HTTP clients normalise dot segments before sending.
    let port = e.gate.base.rsplit(':').next().unwrap().parse::<u16>().unwrap();
    for path in [
        "/api/echo/../../auth/me",
        "/api/echo/%2e%2e/admin",
        "/api/echo/..%2fadmin",
        "/api/echo/%5c..%5cadmin",
        "/api/echo/..;/admin",
        "/api/echo//x",
        "/api/%65cho/x",
        "/api/echo/%2541",
    ] {
        let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: localhost:{port}\r\nCookie: {COOKIE}={}\r\nConnection: close\r\n\r\n",
            e.sid
        );
        tcp.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        tcp.read_to_string(&mut out).await.unwrap();
        let status = out.split(' ').nth(1).unwrap_or("");
        assert!(status == "400" || status == "404", "{path}: {}", out.lines().next().unwrap_or(""));
    }
    assert_eq!(e.hits(), before, "nothing ambiguous reached the upstream");
}

#[tokio::test]
async fn csrf_and_cross_origin_rules_hold_on_proxied_routes() {
    let e = env().await;
    let before = e.hits();
    let url = format!("{}/api/echo/notes", e.gate.base);
    let cookie = format!("{COOKIE}={}", e.sid);
    for method in ["POST", "PUT", "PATCH", "DELETE"] {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let r = http()
            .request(m.clone(), &url)
            .header("cookie", &cookie)
            .header("origin", &e.gate.base)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "{method} without X-CSRF");
        let r = http()
            .request(m, &url)
            .header("cookie", &cookie)
            .header("x-csrf", "1")
            .header("origin", "http://localhost:18099")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "{method} from another origin");
    }
    // Reads from a page of another origin (same site: another localhost port) are refused too.
    for site in ["same-site", "cross-site"] {
        let r = e.get("/api/echo/notes").header("sec-fetch-site", site).send().await.unwrap();
        assert_eq!(r.status(), 403, "{site}");
        assert_eq!(r.json::<Value>().await.unwrap()["error"], "cross_origin");
    }
    // The same for the user's profile.
    let r = e.get("/auth/me").header("sec-fetch-site", "same-site").send().await.unwrap();
    assert_eq!(r.status(), 403, "/auth/me from another origin");
    assert_eq!(e.get("/auth/me").header("sec-fetch-site", "same-origin").send().await.unwrap().status(), 200);
    // CORS preflights are never granted.
    let r = http()
        .request(reqwest::Method::OPTIONS, &url)
        .header("origin", "http://localhost:18099")
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "x-csrf")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.headers().get("access-control-allow-origin").is_none());
    assert_eq!(e.hits(), before, "none of these reached the upstream");

    // Our own page, with the header: goes through, body streamed to the upstream.
    let body = vec![b'x'; 1024 * 1024];
    let r = e.post("/api/echo/notes").header("sec-fetch-site", "same-origin").body(body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let j: Value = r.json().await.unwrap();
    assert_eq!(j["method"], "POST");
    assert_eq!(j["body_len"], 1024 * 1024);
    assert!(j["headers"].get("x-csrf").is_none(), "our CSRF header is ours");
    // Over the route's body limit.
    let r = e.post("/api/echo/notes").body(vec![b'x'; 3 * 1024 * 1024]).send().await.unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(e.hits(), before + 1);
}

#[tokio::test]
async fn upstream_failures_are_json_502_and_504() {
    let e = env().await;
    let r = e.get("/api/down/x").send().await.unwrap();
    assert_eq!(r.status(), 502);
    let j: Value = r.json().await.unwrap();
    assert_eq!(j["error"], "bad_gateway");
    assert!(!j["message"].as_str().unwrap().contains("127.0.0.1"), "no upstream detail leaks: {j}");
    let r = e.get("/api/echo/slow").send().await.unwrap();
    assert_eq!(r.status(), 504, "route timeout is 1s, the upstream takes 5s");
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "upstream_timeout");
    // The proxy keeps working afterwards.
    assert_eq!(e.get("/api/echo/x").send().await.unwrap().status(), 200);
    let failed = e.gate.metric("gatehouse_proxied_requests_total{route=\"/api/down/\",outcome=\"5xx\"}").await;
    assert_eq!(failed, 1.0, "the failure is counted for its route");
}

#[tokio::test]
async fn server_sent_events_stream_through_unbuffered() {
    let e = env().await;
    let mut r = e.get("/api/echo/sse").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    // The first event must arrive while the upstream still holds the second back.
    let first = tokio::time::timeout(Duration::from_secs(5), r.chunk()).await.expect("first event streamed").unwrap();
    assert_eq!(first.as_deref(), Some(&b"data: one\n\n"[..]));
    e.up.sse_go.notify_one();
    let second = tokio::time::timeout(Duration::from_secs(5), r.chunk()).await.unwrap().unwrap();
    assert_eq!(second.as_deref(), Some(&b"data: two\n\n"[..]));
}

#[tokio::test]
async fn a_streaming_response_ends_within_the_recheck_interval_after_logout() {
    let e = env().await;
    // The upstream sends one event and then holds the stream open without ever checking the
    // session again; /api/echo/ re-checks every second.
    let mut r = e.get("/api/echo/sse").send().await.unwrap();
    assert_eq!(r.status(), 200);
    let first = tokio::time::timeout(Duration::from_secs(5), r.chunk()).await.expect("first event").unwrap();
    assert_eq!(first.as_deref(), Some(&b"data: one\n\n"[..]));
    // Still open after more than one re-check while the session lives.
    let quiet = tokio::time::timeout(Duration::from_millis(2500), r.chunk()).await;
    assert!(quiet.is_err(), "the stream must stay open while the session is valid: {quiet:?}");
    assert_eq!(e.post("/auth/logout").send().await.unwrap().status(), 200);
    let started = std::time::Instant::now();
    let after = tokio::time::timeout(Duration::from_secs(5), r.chunk()).await;
    match after {
        Err(_) => panic!("the stream was still open 5 s after logout"),
        Ok(Ok(Some(chunk))) => panic!("data after logout: {chunk:?}"),
        // Cut off (an error), or ended: either way nothing more arrives.
        Ok(_) => {}
    }
    assert!(started.elapsed() < Duration::from_secs(3), "ended within the 1 s re-check: {:?}", started.elapsed());
    // A reconnect is refused.
    assert_eq!(e.get("/api/echo/sse").send().await.unwrap().status(), 401);
}

#[tokio::test]
async fn proxied_responses_carry_gatehouses_security_headers_not_the_upstreams() {
    let e = env().await;
    let r = e.get("/api/echo/file.svg").send().await.unwrap();
    assert_eq!(r.status(), 200);
    let h = r.headers();
    let csp: Vec<_> = h.get_all("content-security-policy").iter().map(|v| v.to_str().unwrap().to_owned()).collect();
    assert_eq!(csp.len(), 1, "exactly one policy: {csp:?}");
    assert!(csp[0].contains("default-src 'none'") && csp[0].contains("sandbox"), "Gatehouse's policy: {csp:?}");
    assert!(!csp[0].contains("unsafe"), "the upstream's weak policy is gone: {csp:?}");
    assert_eq!(h["x-frame-options"], "DENY");
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert_eq!(h["referrer-policy"], "no-referrer");
    assert_eq!(h["cross-origin-resource-policy"], "same-origin");
    // A route that opts out keeps the upstream's own.
    let r = e.get("/api/own-headers/file.svg").send().await.unwrap();
    assert_eq!(r.status(), 200);
    let h = r.headers();
    assert_eq!(h["content-security-policy"], "default-src * 'unsafe-inline' 'unsafe-eval'");
    assert_eq!(h["x-frame-options"], "ALLOWALL");
    assert_eq!(h["cross-origin-resource-policy"], "cross-origin");
    assert_eq!(h["x-content-type-options"], "nosniff", "what the upstream did not send is still filled in");
}

#[tokio::test]
async fn open_streams_count_against_the_routes_in_flight_limit() {
    let e = env().await;
    // max_in_flight = 1 on /api/tight/: an open SSE stream holds the one slot.
    let mut stream = e.get("/api/tight/sse").send().await.unwrap();
    assert_eq!(stream.status(), 200);
    let first = tokio::time::timeout(Duration::from_secs(5), stream.chunk()).await.unwrap().unwrap();
    assert!(first.is_some());
    let r = e.get("/api/tight/x").send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "upstream_busy");
    // Other routes are not affected, and the slot frees when the stream ends.
    assert_eq!(e.get("/api/echo/x").send().await.unwrap().status(), 200);
    e.up.sse_go.notify_one();
    while stream.chunk().await.unwrap().is_some() {}
    drop(stream);
    let mut ok = false;
    for _ in 0..50 {
        if e.get("/api/tight/x").send().await.unwrap().status() == 200 {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "the slot is released when the stream ends");
}

#[tokio::test]
async fn websocket_upgrades_pass_through_and_foreign_origins_do_not() {
    let e = env().await;
    let port = e.gate.base.rsplit(':').next().unwrap().parse::<u16>().unwrap();
    let handshake = |origin: &str| {
        format!(
            "GET /api/echo/ws HTTP/1.1\r\nHost: localhost:{port}\r\nCookie: {COOKIE}={}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nOrigin: {origin}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            e.sid
        )
    };
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    tcp.write_all(handshake(&e.gate.base).as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tcp.read(&mut buf).await.unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    tcp.write_all(b"ping through the tunnel").await.unwrap();
    let mut echoed = vec![0u8; 23];
    tokio::time::timeout(Duration::from_secs(5), tcp.read_exact(&mut echoed)).await.unwrap().unwrap();
    assert_eq!(&echoed, b"ping through the tunnel");
    let tunnel = tcp;

    // Only WebSocket is tunnelled: an h2c upgrade reaches the upstream as a plain request.
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let h2c = handshake(&e.gate.base).replace("Upgrade: websocket", "Upgrade: h2c");
    tcp.write_all(h2c.as_bytes()).await.unwrap();
    let n = tcp.read(&mut buf).await.unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(head.starts_with("HTTP/1.1 400"), "the upstream saw no upgrade: {head}");

    // Cross-site WebSocket hijacking: the cookie rides along, the Origin gives it away.
    let before = e.hits();
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    tcp.write_all(handshake("http://localhost:18099").as_bytes()).await.unwrap();
    let n = tcp.read(&mut buf).await.unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    assert_eq!(e.hits(), before);

    // Signing out closes the open tunnel (re-checked every second on this route).
    let mut tunnel = tunnel;
    assert_eq!(e.post("/auth/logout").send().await.unwrap().status(), 200);
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), tunnel.read_to_end(&mut rest)).await;
    assert!(matches!(closed, Ok(Ok(_))), "the tunnel is closed after logout");
}

/// An upstream that speaks TLS only and requires a client certificate from the work dir's CA.
async fn start_tls_upstream(work: &Workdir) -> u16 {
    use rustls_pki_types::pem::PemObject;
    let pki = work.pki();
    let certs: Vec<rustls_pki_types::CertificateDer<'static>> =
        rustls_pki_types::CertificateDer::pem_file_iter(pki.join("gatehouse.crt"))
            .unwrap()
            .map(|c| c.unwrap())
            .collect();
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(pki.join("gatehouse.key")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_file_iter(pki.join("ca.crt")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build().unwrap();
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let app = Router::new().fallback(|req: Request| async move {
        axum::Json(json!({"path": req.uri().path(), "session": req.headers().get("x-gatehouse-session").is_some()}))
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { break };
            let (acceptor, app) = (acceptor.clone(), app.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(
                        hyper_util::rt::TokioIo::new(tls),
                        hyper_util::service::TowerToHyperService::new(app),
                    )
                    .await;
            });
        }
    });
    port
}

#[tokio::test]
async fn https_upstreams_are_verified_against_their_ca_and_get_a_client_certificate() {
    let work = Workdir::new();
    let port = start_tls_upstream(&work).await;
    let client = client_cert(&work.ca(), vec![gatehouse::pki::San::Dns("gatehouse.local".into())]);
    let dir = work.dir.path();
    std::fs::write(dir.join("gh-client.crt"), &client.cert_pem).unwrap();
    std::fs::write(dir.join("gh-client.key"), &client.key_pem).unwrap();
    let other = tempfile::tempdir().unwrap();
    gatehouse::pki::init(other.path()).unwrap();
    let pki = work.pki();
    let routes = format!(
        r#"
[[routes]]
prefix = "/api/tls/"
upstream = "https://localhost:{port}/svc/"
relay = "session"
ca_file = "{ca}"
client_cert_file = "{cert}"
client_key_file = "{key}"
[[routes]]
prefix = "/api/nocert/"
upstream = "https://localhost:{port}/svc/"
relay = "session"
ca_file = "{ca}"
[[routes]]
prefix = "/api/wrongca/"
upstream = "https://localhost:{port}/svc/"
relay = "session"
ca_file = "{other_ca}"
client_cert_file = "{cert}"
client_key_file = "{key}"
"#,
        ca = pki.join("ca.crt").display(),
        cert = dir.join("gh-client.crt").display(),
        key = dir.join("gh-client.key").display(),
        other_ca = other.path().join("ca.crt").display(),
    );
    let gate = Gate::start(&work, &Options { extra: routes, ..Options::default() }).await;
    let sid = logged_in(&gate, "alice").await;
    let get =
        |path: &str| http().get(format!("{}{path}", gate.base)).header("cookie", format!("{COOKIE}={sid}")).send();
    let r = get("/api/tls/notes").await.unwrap();
    assert_eq!(r.status(), 200, "mutual TLS to the upstream");
    let j: Value = r.json().await.unwrap();
    assert_eq!(j["path"], "/svc/notes");
    assert_eq!(j["session"], true, "the relay header crossed the TLS hop");
    assert_eq!(get("/api/nocert/notes").await.unwrap().status(), 502, "the upstream requires our certificate");
    assert_eq!(get("/api/wrongca/notes").await.unwrap().status(), 502, "an upstream we do not trust is refused");

    // A route whose CA file is missing stops start-up (and check-config) with the route named.
    let bad = Workdir::new();
    let text = bad.config_text(&Options {
        extra: format!(
            "[[routes]]\nprefix = \"/api/x/\"\nupstream = \"https://localhost:{port}/\"\nrelay = \"session\"\nca_file = \"/nonexistent/ca.crt\"\n"
        ),
        ..Options::default()
    });
    let config = gatehouse::config::Config::from_figment(
        figment::Figment::new().merge(<figment::providers::Toml as figment::providers::Format>::string(&text)),
    )
    .unwrap();
    let err =
        gatehouse::start(config, Arc::new(gatehouse::clock::SystemClock::default())).await.err().expect("refused");
    assert!(err.to_string().contains("/api/x/") && err.to_string().contains("ca_file"), "{err}");
    gate.stop().await;
}
