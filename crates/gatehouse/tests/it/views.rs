//! Composed views (`[[views]]`, docs/views.md) against a real upstream in the test process that
//! can be slow, fail, send non-JSON or huge bodies, echo what it received, and record when each
//! request was in flight — and a real Keycloak behind the session.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::harness::*;

#[derive(Default)]
struct Upstream {
    hits: AtomicUsize,
    /// (name, start, end) of every `/v/slow` request.
    intervals: std::sync::Mutex<Vec<(String, Instant, Instant)>>,
    /// Every `Authorization` and `X-Gatehouse-Session` value received, in order.
    relays: std::sync::Mutex<Vec<(String, String)>>,
}

fn record(up: &Upstream, req: &Request) {
    up.hits.fetch_add(1, Ordering::SeqCst);
    let h = req.headers();
    let get = |n: &str| h.get(n).map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
    up.relays.lock().unwrap().push((get("authorization"), get("x-gatehouse-session")));
}

/// What arrived, plus fields the allow-list must cut away.
async fn echo(State(up): State<Arc<Upstream>>, req: Request) -> Response {
    record(&up, &req);
    let h = req.headers();
    let get = |n: &str| h.get(n).map(|v| v.to_str().unwrap().to_owned());
    axum::Json(json!({
        "path": req.uri().path_and_query().map(|p| p.as_str()).unwrap_or(""),
        "relay": {"authorization": get("authorization"), "session": get("x-gatehouse-session")},
        "user": {"name": "Alice", "email": "alice@example.test", "password_hash": "$2b$secret",
                 "address": {"city": "Berlin", "street": "hidden"}},
        "data": {"items": [
            {"id": "n1", "title": "first", "body": "private body", "meta": {"owner": "x"}},
            {"id": "n2", "title": "second", "body": "private body"},
        ], "total": 2},
        "internal": {"debug": true},
    }))
    .into_response()
}

async fn slow(State(up): State<Arc<Upstream>>, Path((name, ms)): Path<(String, u64)>, req: Request) -> Response {
    record(&up, &req);
    let start = Instant::now();
    tokio::time::sleep(Duration::from_millis(ms)).await;
    up.intervals.lock().unwrap().push((name.clone(), start, Instant::now()));
    axum::Json(json!({"name": name, "extra": "cut"})).into_response()
}

async fn status(State(up): State<Arc<Upstream>>, Path(code): Path<u16>, req: Request) -> Response {
    record(&up, &req);
    (StatusCode::from_u16(code).unwrap(), axum::Json(json!({"error": "upstream detail that must not leak"})))
        .into_response()
}

async fn text(State(up): State<Arc<Upstream>>, req: Request) -> Response {
    record(&up, &req);
    "plain text, not JSON".into_response()
}

async fn bad_json(State(up): State<Arc<Upstream>>, req: Request) -> Response {
    record(&up, &req);
    ([("content-type", "application/json")], "{\"unterminated\": ").into_response()
}

/// 2 MiB of valid JSON, streamed without a length (so only the counting limit can catch it).
async fn huge(State(up): State<Arc<Upstream>>, req: Request) -> Response {
    record(&up, &req);
    let chunk = format!("\"{}\",", "x".repeat(1023));
    let stream = futures_util::stream::iter(
        std::iter::once("[".to_owned())
            .chain(std::iter::repeat_n(chunk, 2048))
            .chain(std::iter::once("\"end\"]".to_owned()))
            .map(Ok::<_, std::io::Error>),
    );
    ([("content-type", "application/json")], axum::body::Body::from_stream(stream)).into_response()
}

async fn start_upstream() -> (u16, Arc<Upstream>) {
    let up = Arc::new(Upstream::default());
    let app = Router::new()
        .route("/v/slow/{name}/{ms}", axum::routing::get(slow))
        .route("/v/status/{code}", axum::routing::get(status))
        .route("/v/text", axum::routing::get(text))
        .route("/v/bad-json", axum::routing::get(bad_json))
        .route("/v/huge", axum::routing::get(huge))
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
prefix = "/api/svc/"
upstream = "http://127.0.0.1:{port}/v/"
relay = "session"
[[routes]]
prefix = "/api/tok/"
upstream = "http://127.0.0.1:{port}/v/"
relay = "bearer"
"#
    )
}

const DASHBOARD: &str = r#"
[[views]]
name = "dashboard"
[[views.parts]]
name = "profile"
route = "/api/svc/"
path = "profile"
target = "user"
fields = ["name", "address.city"]
rename = { "name" = "displayName" }
[[views.parts]]
name = "notes"
route = "/api/tok/"
path = "notes"
key = "recent"
target = "data.items"
fields = ["id", "title"]
[[views.parts]]
name = "a"
route = "/api/svc/"
path = "slow/a/300"
fields = ["name"]
[[views.parts]]
name = "b"
route = "/api/tok/"
path = "slow/b/300"
fields = ["name"]

[[views]]
name = "note"
path = "/api/views/note/{id}"
[[views.parts]]
name = "note"
route = "/api/svc/"
path = "items/{id}?owner={claim.sub}"
fields = ["path"]

[[views]]
name = "home"
[[views.parts]]
name = "me"
route = "@session"
fields = ["preferred_username", "client_roles.*", "session.expires_at"]
[[views.parts]]
name = "items"
route = "/api/svc/"
path = "list"
target = "data.items"
fields = ["id"]

[[views]]
name = "leaky"
[[views.parts]]
name = "echo"
route = "/api/svc/"
path = "echo"
fields = ["relay.session", "relay.authorization"]
[[views.parts]]
name = "echo2"
route = "/api/tok/"
path = "echo"
fields = ["relay.authorization"]
"#;

struct Env {
    _work: Workdir,
    gate: Gate,
    up: Arc<Upstream>,
    b: Browser,
    id: String,
}

async fn env(views: &str, o: Options) -> Env {
    let (port, up) = start_upstream().await;
    let work = Workdir::new();
    let o = Options { extra: format!("{}{views}", routes(port)), ..o };
    let gate = Gate::start(&work, &o).await;
    let mut b = Browser::default();
    b.login(&gate.base, "alice").await;
    let id = b.cookie(&gate.base, COOKIE).unwrap();
    Env { _work: work, gate, up, b, id }
}

impl Env {
    async fn view(&mut self, path: &str) -> Resp {
        let url = format!("{}{path}", self.gate.base);
        self.b.get(&url).await
    }
}

#[tokio::test]
async fn a_view_answers_exactly_the_allow_listed_fields_from_parts_that_ran_concurrently() {
    let mut e = env(DASHBOARD, Options::default()).await;
    let r = e.view("/api/views/dashboard").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.json(),
        json!({
            "profile": {"displayName": "Alice", "address": {"city": "Berlin"}},
            "recent": [{"id": "n1", "title": "first"}, {"id": "n2", "title": "second"}],
            "a": {"name": "a"},
            "b": {"name": "b"},
            "partial": [],
        }),
        "exactly the allow-listed fields, renamed, targeted, shaped per element"
    );
    assert_eq!(r.header("cache-control").as_deref(), Some("no-store"));
    assert_eq!(r.header("x-content-type-options").as_deref(), Some("nosniff"));
    assert!(r.header("content-security-policy").unwrap().contains("default-src 'none'"));
    assert!(!r.body.contains(&e.id) && !looks_like_jwt(&r.body), "no session id or token in the answer");

    // Concurrency: the two slow parts were in flight at the same time (ordering, not durations).
    let iv = e.up.intervals.lock().unwrap().clone();
    let a = iv.iter().find(|i| i.0 == "a").unwrap();
    let b = iv.iter().find(|i| i.0 == "b").unwrap();
    assert!(a.1 < b.2 && b.1 < a.2, "parts a and b overlapped");

    // Each part got its route's relay, and one session resolve served them all (one token).
    let relays = e.up.relays.lock().unwrap().clone();
    assert_eq!(relays.len(), 4);
    let session_parts: Vec<_> = relays.iter().filter(|r| !r.1.is_empty()).collect();
    let bearer_parts: Vec<_> = relays.iter().filter(|r| !r.0.is_empty()).collect();
    assert_eq!(session_parts.len(), 2);
    assert!(session_parts.iter().all(|r| r.1 == e.id && r.0.is_empty()), "session relay: the id, no token");
    assert_eq!(bearer_parts.len(), 2);
    assert!(bearer_parts.iter().all(|r| r.0.starts_with("Bearer ey") && r.1.is_empty() && r.0 == bearer_parts[0].0));

    // Conditional request: the ETag covers the shaped answer.
    let etag = r.header("etag").expect("ETag");
    let url = format!("{}/api/views/dashboard", e.gate.base);
    let again = e.b.send(http().get(&url).header("if-none-match", &etag), &url).await;
    assert_eq!(again.status, 304);
    assert_eq!(again.body, "");
    let other = e.b.send(http().get(&url).header("if-none-match", "\"nope\""), &url).await;
    assert_eq!(other.status, 200);
    assert_eq!(other.header("etag").unwrap(), etag, "same data, same tag");

    // The rules of the public API: GET only, same-origin reads only, a session required.
    let hits = e.up.hits.load(Ordering::SeqCst);
    let post = e.b.post(&e.gate.base, "/api/views/dashboard").await;
    assert_eq!(post.status, 405);
    let cross = e.b.send(http().get(&url).header("sec-fetch-site", "cross-site"), &url).await;
    assert_eq!(cross.status, 403);
    let anon = http().get(&url).send().await.unwrap();
    assert_eq!(anon.status(), 401);
    assert_eq!(e.up.hits.load(Ordering::SeqCst), hits, "refused requests never reach an upstream");
    assert_eq!(e.view("/api/views/nope").await.status, 404);

    // An allow-list that names the relay headers of an echoing upstream still leaks nothing.
    let leaky = e.view("/api/views/leaky").await;
    assert_eq!(leaky.status, 502, "{}", leaky.body);
    assert!(!leaky.body.contains(&e.id) && !looks_like_jwt(&leaky.body), "{}", leaky.body);
    assert_eq!(leaky.json()["error"], "view_leak");
    e.gate.stop().await;
}

#[tokio::test]
async fn parameters_are_substituted_safely_and_injections_are_refused_before_any_upstream_call() {
    let mut e = env(DASHBOARD, Options::default()).await;
    let sub = session_tokens(&e.gate, &e.id).await.0.claims.sub;
    let r = e.view("/api/views/note/n-1_a.b~").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["note"]["path"], format!("/v/items/n-1_a.b~?owner={sub}"));

    // An `@session` part: the user's claims as /auth/me has them, allow-listed, no upstream call
    // for it (only `items` reaches the upstream); `*` keeps every client's roles.
    let hits = e.up.hits.load(Ordering::SeqCst);
    let home = e.view("/api/views/home").await;
    assert_eq!(home.status, 200, "{}", home.body);
    let v = home.json();
    assert_eq!(v["me"]["preferred_username"], "alice");
    assert!(v["me"]["client_roles"]["gatehouse"].as_array().is_some_and(|r| !r.is_empty()), "{v}");
    assert!(v["me"]["session"]["expires_at"].as_i64().is_some());
    let me_keys: Vec<&String> = v["me"].as_object().unwrap().keys().collect();
    assert_eq!(me_keys, ["client_roles", "preferred_username", "session"], "only the allow-listed claims");
    assert_eq!(v["items"], json!([{"id": "n1"}, {"id": "n2"}]));
    assert_eq!(e.up.hits.load(Ordering::SeqCst), hits + 1);

    let hits = e.up.hits.load(Ordering::SeqCst);
    // Sent byte for byte: an HTTP client library would normalise `..` away before sending.
    for raw in ["..", ".", "%2e%2e", "a\\b", "a%00", "a\u{2024}"] {
        let status = raw_get(&e.gate.base, &format!("/api/views/note/{raw}"), &e.id).await;
        assert_eq!(status, 400, "{raw}");
    }
    assert_eq!(e.up.hits.load(Ordering::SeqCst), hits);
    // A raw `#` never reaches a handler (HTTP servers drop the fragment): the parameter is `a`.
    assert_eq!(raw_get(&e.gate.base, "/api/views/note/a#x/../../admin", &e.id).await, 200);
    let hits = e.up.hits.load(Ordering::SeqCst);
    let long = "a".repeat(129);
    for bad in [
        "a%2fb",
        "a%2Fb",
        "..%2fadmin",
        "a%3fx=1",
        "a%23frag",
        "a%20b",
        "%E2%80%A4%E2%80%A4", // one-dot leaders, look like `..`
        "a%EF%BC%8Fb",        // fullwidth solidus, looks like `/`
        "caf%C3%A9",
        "a;b",
        long.as_str(),
    ] {
        let r = e.view(&format!("/api/views/note/{bad}")).await;
        assert_eq!(r.status, 400, "{bad}: {}", r.body);
        assert_eq!(r.json()["error"], "bad_parameter", "{bad}");
    }
    let q = e.view("/api/views/note/abc?owner=someone-else").await;
    assert_eq!(q.status, 400, "a query string is refused, not forwarded");
    for extra in ["/api/views/note/a/b", "/api/views/note/", "/api/views/note"] {
        let status = e.view(extra).await.status;
        assert!(status == 404 || status == 400, "{extra}: no new or missing segments ({status})");
    }
    assert_eq!(e.up.hits.load(Ordering::SeqCst), hits, "no refused parameter reached an upstream");
    assert_eq!(e.view(&format!("/api/views/note/{}", "a".repeat(128))).await.status, 200, "128 characters pass");
    e.gate.stop().await;
}

const FAILURES: &str = r#"
[[views]]
name = "mixed"
deadline = "3s"
[[views.parts]]
name = "ok"
route = "/api/svc/"
path = "slow/ok/1"
fields = ["name"]
[[views.parts]]
name = "e500"
route = "/api/svc/"
path = "status/500"
fields = ["error"]
policy = "optional"
[[views.parts]]
name = "e401"
route = "/api/tok/"
path = "status/401"
fields = ["error"]
policy = "optional"
[[views.parts]]
name = "text"
route = "/api/svc/"
path = "text"
fields = ["x"]
policy = "optional"
[[views.parts]]
name = "badjson"
route = "/api/svc/"
path = "bad-json"
fields = ["x"]
policy = "optional"
[[views.parts]]
name = "huge"
route = "/api/svc/"
path = "huge"
fields = ["x"]
max_bytes = 65536
policy = "optional"
[[views.parts]]
name = "late"
route = "/api/svc/"
path = "slow/late/5000"
fields = ["name"]
timeout = "300ms"
policy = "optional"

[[views]]
name = "strict"
[[views.parts]]
name = "ok"
route = "/api/svc/"
path = "slow/ok/1"
fields = ["name"]
[[views.parts]]
name = "backend"
route = "/api/svc/"
path = "status/503"
fields = ["error"]

[[views]]
name = "strict-late"
deadline = "400ms"
[[views.parts]]
name = "late"
route = "/api/svc/"
path = "slow/late/5000"
fields = ["name"]

[[views]]
name = "strict-huge"
[[views.parts]]
name = "big"
route = "/api/tok/"
path = "huge"
fields = ["x"]
max_bytes = 65536
"#;

#[tokio::test]
async fn required_parts_fail_the_view_and_optional_parts_are_listed_as_partial() {
    let mut e = env(FAILURES, Options::default()).await;
    let r = e.view("/api/views/mixed").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["ok"], json!({"name": "ok"}));
    let mut partial: Vec<String> =
        v["partial"].as_array().unwrap().iter().map(|p| p.as_str().unwrap().to_owned()).collect();
    partial.sort();
    assert_eq!(partial, ["badjson", "e401", "e500", "huge", "late", "text"]);
    for p in &partial {
        assert_eq!(v[p], Value::Null, "{p} is null");
    }
    assert!(!r.body.contains("upstream detail"), "upstream error bodies never pass through");

    let m = |labels: &str| format!("gatehouse_view_part_failures_total{{{labels}}}");
    assert_eq!(e.gate.metric(&m("view=\"mixed\",part=\"late\",reason=\"timeout\"")).await, 1.0);
    assert_eq!(e.gate.metric(&m("view=\"mixed\",part=\"e401\",reason=\"upstream_denied\"")).await, 1.0);
    assert_eq!(e.gate.metric("gatehouse_views_total{view=\"mixed\",outcome=\"partial\"}").await, 1.0);

    // An upstream's 401 is that part's failure; the Gatehouse session lives on.
    assert_eq!(e.b.get(&format!("{}/auth/me", e.gate.base)).await.status, 200);

    for (view, part, reason) in [
        ("strict", "backend", "upstream_error"),
        ("strict-late", "late", "timeout"),
        ("strict-huge", "big", "too_large"),
    ] {
        let r = e.view(&format!("/api/views/{view}")).await;
        assert_eq!(r.status, 502, "{view}: {}", r.body);
        let v = r.json();
        assert_eq!(v["error"], "view_part_failed", "{view}");
        assert_eq!(v["part"], part, "{view}");
        assert_eq!(v["reason"], reason, "{view}");
        assert!(v.get("ok").is_none() && !r.body.contains("\"name\""), "{view}: no partial data: {}", r.body);
        assert_eq!(r.header("cache-control").as_deref(), Some("no-store"));
    }
    assert_eq!(e.gate.metric("gatehouse_views_total{view=\"strict\",outcome=\"part_failed\"}").await, 1.0);
    e.gate.stop().await;
}

const ALL_BEARER: &str = r#"
[[views]]
name = "tokens"
[[views.parts]]
name = "p1"
route = "/api/tok/"
path = "one"
fields = ["path"]
[[views.parts]]
name = "p2"
route = "/api/tok/"
path = "two"
fields = ["path"]
[[views.parts]]
name = "p3"
route = "/api/tok/"
path = "three"
fields = ["path"]
"#;

#[tokio::test]
async fn a_view_whose_parts_all_need_a_fresh_token_refreshes_it_once() {
    let mut e = env(ALL_BEARER, Options::short_tokens()).await; // 10 s access tokens, 2 s skew
    let (before, old) = session_tokens(&e.gate, &e.id).await;
    let sid = before.provider_sid.clone().expect("Keycloak sid recorded");
    let admin = KcAdmin::connect().await;
    assert_eq!(admin.refresh_events(&sid).await, 0);
    tokio::time::sleep(Duration::from_secs(11)).await; // the access token is now expired
    let r = e.view("/api/views/tokens").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(admin.refresh_events(&sid).await, 1, "exactly one refresh at Keycloak for the whole view");
    let (_, new) = session_tokens(&e.gate, &e.id).await;
    assert_ne!(new.access_token, old.access_token);
    let relays = e.up.relays.lock().unwrap().clone();
    assert_eq!(relays.len(), 3);
    assert!(relays.iter().all(|r| r.0 == format!("Bearer {}", new.access_token)), "every part got the fresh token");
    e.gate.stop().await;
}

#[tokio::test]
async fn check_config_refuses_views_on_unknown_routes_and_bad_templates() {
    use figment::Figment;
    use figment::providers::{Format, Toml};
    let work = Workdir::new();
    let part = |route: &str, path: &str, extra: &str| {
        format!(
            "{}\n[[views]]\nname = \"v\"\n[[views.parts]]\nname = \"p\"\nroute = \"{route}\"\npath = \"{path}\"\nfields = [\"a\"]\n{extra}",
            routes(1)
        )
    };
    let load = |extra: String| {
        let text = work.config_text(&Options { extra, ..Options::default() });
        Config::from_figment(Figment::new().merge(Toml::string(&text))).map(|_| ()).map_err(|e| e.to_string())
    };
    assert_eq!(load(part("/api/svc/", "x/{claim.sub}", "")), Ok(()));
    for (extra, needle) in [
        (part("/api/nope/", "x", ""), "no [[routes]] entry"),
        (part("@session", "x", ""), "no path"),
        (part("/api/svc/", "x", "rename = { \"a\" = \"b.c\" }"), "one key"),
        (part("/api/svc/", "x/{id}", ""), "{id}"),
        (part("/api/svc/", "/abs", ""), "relative"),
        (part("/api/svc/", "a/../b", ""), "dot segment"),
        (part("/api/svc/", "a#b", ""), "#"),
        (part("/api/svc/", "x", "key = \"partial\""), "reserved"),
        (part("/api/svc/", "x", "rename = { \"zz\" = \"y\" }"), "not an allow-listed field"),
        (part("/api/svc/", "x", "policy = \"sometimes\""), "sometimes"),
    ] {
        let err = load(extra.clone()).expect_err(&extra);
        assert!(err.contains(needle), "{needle} in {err}");
    }
}

use gatehouse::config::Config;

/// A GET written on the socket as given (no normalisation); returns the status code.
async fn raw_get(base: &str, path: &str, session: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let port = url::Url::parse(base).unwrap().port().unwrap();
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: localhost:{port}\r\nCookie: {COOKIE}={session}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out);
    text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("no status line: {text}"))
}
