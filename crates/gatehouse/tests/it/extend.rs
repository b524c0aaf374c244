//! The library face (`gatehouse::extend`): the repository's example binary's endpoint
//! (`examples/dashboard.rs`), served in-process, reached through the real Keycloak login, with a
//! test upstream standing in for PocketBase on the `/api/pb/` route.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::extract::{Request, State};
use axum::response::IntoResponse;
use http_body_util::BodyExt as _;
use serde_json::json;

use crate::harness::*;

#[allow(dead_code)] // its `main` is the example binary's
#[path = "../../examples/dashboard.rs"]
mod dashboard_example;

#[derive(Default)]
struct Pb {
    hits: AtomicUsize,
    sessions: std::sync::Mutex<Vec<String>>,
}

/// PocketBase's list answer, with fields the endpoint must not pass on.
async fn notes(State(pb): State<Arc<Pb>>, req: Request) -> axum::response::Response {
    pb.hits.fetch_add(1, Ordering::SeqCst);
    let s = req.headers().get("x-gatehouse-session").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
    pb.sessions.lock().unwrap().push(s);
    assert_eq!(req.uri().path_and_query().unwrap().as_str(), "/api/collections/notes/records?perPage=5&sort=-created");
    axum::Json(json!({"page": 1, "perPage": 5, "totalItems": 2, "items": [
        {"id": "a1", "title": "first", "body": "private", "owner": "u"},
        {"id": "a2", "title": "second", "body": "private", "owner": "u"},
    ]}))
    .into_response()
}

#[tokio::test]
async fn the_example_endpoint_answers_the_signed_in_user_behind_the_public_rules() {
    let pb = Arc::new(Pb::default());
    let app = Router::new().route("/api/collections/notes/records", axum::routing::get(notes)).with_state(pb.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });

    let work = Workdir::new();
    let o = Options {
        extra: format!(
            "[[routes]]\nprefix = \"/api/pb/\"\nupstream = \"http://127.0.0.1:{port}/\"\nrelay = \"session\"\n"
        ),
        ..Options::default()
    };
    let gate = Gate::start_with(&work, &o, dashboard_example::extensions()).await;
    let url = format!("{}/api/dashboard", gate.base);

    // No session: the standard 401, and the handler (so the upstream) never runs.
    let anon = http().get(&url).send().await.unwrap();
    assert_eq!(anon.status(), 401);
    assert_eq!(anon.json::<serde_json::Value>().await.unwrap()["error"], "unauthenticated");
    assert_eq!(pb.hits.load(Ordering::SeqCst), 0);

    let mut b = Browser::default();
    b.login(&gate.base, "alice").await; // the real Keycloak login form
    let id = b.cookie(&gate.base, COOKIE).unwrap();
    let r = b.get(&url).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["user"]["username"], "alice");
    assert_eq!(
        v["notes"],
        json!({"total": 2, "recent": [{"id": "a1", "title": "first"}, {"id": "a2", "title": "second"}]})
    );
    assert!(v["session_expires_at"].as_i64().unwrap() > 0);
    assert!(!r.body.contains(&id) && !looks_like_jwt(&r.body), "no session id or token in the answer");
    assert_eq!(r.header("cache-control").as_deref(), Some("no-store"));
    assert_eq!(r.header("x-frame-options").as_deref(), Some("DENY"));
    assert_eq!(*pb.sessions.lock().unwrap(), vec![id.clone()], "the route's session relay, from the core");

    // The public rules hold: cross-origin reads and unsafe methods without CSRF are refused.
    let cross = b.send(http().get(&url).header("sec-fetch-site", "cross-site"), &url).await;
    assert_eq!(cross.status, 403);
    let post = b.send(http().post(&url), &url).await;
    assert_eq!(post.status, 403, "CSRF check before the handler: {}", post.body);
    assert_eq!(pb.hits.load(Ordering::SeqCst), 1);
    gate.stop().await;

    // An extension may not shadow a configured route.
    let clash = gatehouse::extend::Extensions::new().route("/api/pb/x", axum::routing::get(|| async { "x" }));
    let err = gatehouse::start_with(Workdir::new().config(&o), gatehouse::system_clock(), clash).await.err().unwrap();
    assert!(err.to_string().contains("/api/pb/x"), "{err}");
}

/// SECURITY 8 and 24: a handler that panics (a bug, here an extension's) costs its own request a
/// JSON 500 with the usual hardening, and nothing else — the same keep-alive connection, the other
/// routes and the process go on.
#[tokio::test]
async fn a_panicking_handler_gets_a_json_500_and_nothing_else_breaks() {
    async fn boom(user: gatehouse::extend::User) -> &'static str {
        panic!("extension bug while serving {}", user.claims().sub);
    }
    let work = Workdir::new();
    let ext = gatehouse::extend::Extensions::new().route("/api/boom", axum::routing::get(boom));
    let gate = Gate::start_with(&work, &Options::default(), ext).await;
    let mut b = Browser::default();
    b.login(&gate.base, "alice").await;
    let cookie = format!("{COOKIE}={}", b.cookie(&gate.base, COOKIE).unwrap());
    // One HTTP/1.1 connection, opened by hand, for every request below: a dropped connection
    // would fail the next request instead of being quietly replaced.
    let port = gate.running.as_ref().unwrap().public_addr.port();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (mut conn, driver) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(driver);
    for _ in 0..3 {
        for (path, status) in [("/api/boom", 500), ("/auth/me", 200)] {
            let req = http::Request::get(format!("http://localhost:{port}{path}"))
                .header("host", format!("localhost:{port}"))
                .header("cookie", &cookie)
                .body(http_body_util::Empty::<axum::body::Bytes>::new())
                .unwrap();
            let r = conn.send_request(req).await.expect("the same connection still serves");
            assert_eq!(r.status().as_u16(), status, "{path}");
            let headers = r.headers().clone();
            let body = String::from_utf8(r.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
            if status == 500 {
                assert_eq!(headers["cache-control"], "no-store");
                assert_eq!(headers["x-frame-options"], "DENY");
                assert_eq!(serde_json::from_str::<serde_json::Value>(&body).unwrap()["error"], "internal_error");
                assert!(!body.contains("extension bug") && !body.contains(&cookie[COOKIE.len() + 1..]), "{body}");
            }
        }
    }
    let metrics = http().get(format!("{}/metrics", gate.admin)).send().await.unwrap().text().await.unwrap();
    let counted = metrics
        .lines()
        .filter(|l| l.starts_with("gatehouse_http_requests_total") && l.contains("/api/boom") && l.contains("5xx"))
        .any(|l| l.ends_with(" 3"));
    assert!(counted, "the 500s are counted:\n{metrics}");
    gate.stop().await;
}
