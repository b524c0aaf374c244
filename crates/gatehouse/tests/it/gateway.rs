//! The check face (`[check]`, `/check`) behind a real nginx (Debian's, run unprivileged per test)
//! using `auth_request`, in the plain nginx form and in the form ingress-nginx generates for its
//! `auth-url` annotation, in front of an echo upstream: what the upstream sees, what a browser
//! without a session gets, CSRF, one refresh under concurrency, and who may call the check.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::extract::Request;
use axum::response::IntoResponse;
use serde_json::{Value, json};

use crate::harness::*;

const CHECK_KEY: &str = "nginx-check-key-0123456789abcdefghijklmnop";

/// Echo the headers that arrived (repeated headers joined with " | ", so a duplicate shows).
async fn echo(req: Request) -> axum::response::Response {
    let mut headers = serde_json::Map::new();
    for k in req.headers().keys() {
        let all: Vec<&str> = req.headers().get_all(k).iter().map(|v| v.to_str().unwrap_or("?")).collect();
        headers.insert(k.as_str().into(), Value::String(all.join(" | ")));
    }
    axum::Json(json!({"method": req.method().as_str(), "path": req.uri().to_string(), "headers": headers}))
        .into_response()
}

async fn start_echo() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, axum::Router::new().fallback(echo)).await });
    addr
}

fn nginx_bin() -> PathBuf {
    for p in ["/usr/sbin/nginx", "/usr/bin/nginx"] {
        if Path::new(p).exists() {
            return p.into();
        }
    }
    panic!("nginx is not installed: run scripts/setup.sh");
}

/// An unprivileged nginx with every path inside its own temporary directory.
struct Nginx {
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Drop for Nginx {
    /// SIGTERM, not SIGKILL: the master then stops its workers (a killed master leaves them
    /// running, holding the port and the test's output pipe).
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
    }
}

impl Nginx {
    async fn start(port: u16, public: SocketAddr, check: SocketAddr, upstream: SocketAddr) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let conf = format!(
            r#"
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 512; }}
http {{
  access_log off;
  client_body_temp_path {d}/client_body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  server {{
    listen 127.0.0.1:{port};
    # Gatehouse's own browser routes on the same origin.
    location /auth/ {{
      proxy_pass http://{public};
      proxy_set_header Host $http_host;
    }}

    # Plain nginx auth_request.
    location /app/ {{
      auth_request /_gatehouse;
      auth_request_set $gh_auth $upstream_http_authorization;
      auth_request_set $gh_cookie $upstream_http_x_gatehouse_cookie;
      auth_request_set $gh_sub $upstream_http_x_gatehouse_sub;
      auth_request_set $gh_login $upstream_http_x_gatehouse_login;
      error_page 401 = @gatehouse_login;
      proxy_set_header Authorization $gh_auth;
      proxy_set_header Cookie $gh_cookie;
      proxy_set_header X-Gatehouse-Sub $gh_sub;
      proxy_pass http://{upstream};
    }}
    location = /_gatehouse {{
      internal;
      proxy_pass http://{check}/check;
      proxy_pass_request_body off;
      proxy_set_header Content-Length "";
      proxy_set_header X-Original-URL $scheme://$http_host$request_uri;
      proxy_set_header X-Original-Method $request_method;
      proxy_set_header X-Gatehouse-Check-Key "{CHECK_KEY}";
    }}
    location @gatehouse_login {{
      if ($gh_login) {{ return 302 $gh_login; }}
      default_type application/json;
      return 401 '{{"error":"unauthenticated","message":"authentication required"}}';
    }}

    # What ingress-nginx generates for nginx.ingress.kubernetes.io/auth-url (with auth-method GET
    # and auth-response-headers Authorization, X-Gatehouse-Sub): the subrequest is always GET, so
    # the original method arrives only in X-Original-Method.
    location /ing/ {{
      auth_request /_external-auth-ing;
      auth_request_set $auth_authorization $upstream_http_authorization;
      auth_request_set $auth_x_gatehouse_sub $upstream_http_x_gatehouse_sub;
      auth_request_set $auth_cookie $upstream_http_x_gatehouse_cookie;
      proxy_set_header Authorization $auth_authorization;
      proxy_set_header X-Gatehouse-Sub $auth_x_gatehouse_sub;
      proxy_set_header Cookie $auth_cookie;
      proxy_pass http://{upstream};
    }}
    location = /_external-auth-ing {{
      internal;
      proxy_method GET;
      proxy_pass_request_body off;
      proxy_set_header Content-Length "";
      proxy_set_header X-Forwarded-Proto "";
      proxy_set_header X-Original-URL $scheme://$http_host$request_uri;
      proxy_set_header X-Original-Method $request_method;
      proxy_set_header X-Sent-From "nginx-ingress-controller";
      proxy_set_header X-Auth-Request-Redirect $request_uri;
      proxy_set_header X-Gatehouse-Check-Key "{CHECK_KEY}";
      proxy_pass http://{check}/check;
    }}
  }}
}}
"#
        );
        let path = dir.path().join("nginx.conf");
        std::fs::write(&path, conf).unwrap();
        let child = std::process::Command::new(nginx_bin())
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&path)
            .args(["-g", "daemon off;"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nginx starts");
        let mut me = Self { child, _dir: dir };
        wait_port(port).await;
        // Something answering on the port is not enough: it must be our gateway, still running.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(me.child.try_wait().unwrap().is_none(), "the gateway exited (port {port} taken?)");
        me
    }
}

fn caddy_bin() -> PathBuf {
    let cache = std::env::var("GATEHOUSE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/gatehouse"));
    let p = cache.join("caddy-v2.11.9/bin/caddy");
    assert!(p.exists(), "caddy is not installed: run scripts/caddy.sh");
    p
}

impl Nginx {
    /// Caddy (same process handling: one child, SIGTERM on drop) with `forward_auth`.
    async fn caddy(port: u16, public: SocketAddr, check: SocketAddr, upstream: SocketAddr) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let conf = format!(
            r#"{{
  admin off
  auto_https off
  persist_config off
  storage file_system {d}/data
}}
http://localhost:{port} {{
  bind 127.0.0.1
  handle /auth/* {{
    reverse_proxy {public}
  }}
  handle {{
    forward_auth {check} {{
      uri /check?redirect=1
      header_up X-Gatehouse-Check-Key "{CHECK_KEY}"
      copy_headers Authorization X-Gatehouse-Sub X-Gatehouse-Cookie>Cookie
    }}
    reverse_proxy {upstream}
  }}
}}
"#,
            d = dir.path().display()
        );
        let path = dir.path().join("Caddyfile");
        std::fs::write(&path, conf).unwrap();
        let child = std::process::Command::new(caddy_bin())
            .args(["run", "--adapter", "caddyfile", "--config"])
            .arg(&path)
            .env("HOME", dir.path())
            .env("XDG_DATA_HOME", dir.path())
            .env("XDG_CONFIG_HOME", dir.path())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("caddy starts");
        let mut me = Self { child, _dir: dir };
        wait_port(port).await;
        // Something answering on the port is not enough: it must be our gateway, still running.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(me.child.try_wait().unwrap().is_none(), "the gateway exited (port {port} taken?)");
        me
    }
}

struct Setup {
    gate: Gate,
    _work: Workdir,
    _nginx: Nginx,
    /// `http://localhost:PORT` of nginx: the origin browsers see.
    edge: String,
    check: SocketAddr,
}

fn check_config(work: &Workdir) -> String {
    let key = work.dir.path().join("check.key");
    std::fs::write(&key, format!("{CHECK_KEY}\n")).unwrap();
    format!("[check]\nlisten = \"127.0.0.1:0\"\nkey_file = \"{}\"\nclaim_headers = [\"sub\"]\n", key.display())
}

async fn setup(base: Options) -> Setup {
    setup_with(base, Gateway::Nginx).await
}

#[derive(Clone, Copy)]
enum Gateway {
    Nginx,
    Caddy,
}

async fn setup_with(base: Options, gw: Gateway) -> Setup {
    let work = Workdir::new();
    // An ephemeral port, not one of the registered 18000-18039 (other tests' Gatehouses take
    // those round-robin and could grab it before the gateway binds). No test here completes a
    // code flow through the edge, so Keycloak never checks this redirect URI.
    let edge_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let o = Options { external_port: Some(edge_port), extra: check_config(&work), ..base };
    let gate = Gate::start(&work, &o).await;
    let r = gate.running.as_ref().unwrap();
    let check = r.check_addr.expect("check listener");
    let upstream = start_echo().await;
    let nginx = match gw {
        Gateway::Nginx => Nginx::start(edge_port, r.public_addr, check, upstream).await,
        Gateway::Caddy => Nginx::caddy(edge_port, r.public_addr, check, upstream).await,
    };
    Setup { gate, _work: work, _nginx: nginx, edge: format!("http://localhost:{edge_port}"), check }
}

/// Password login through nginx (the origin Gatehouse advertises); returns the session id.
async fn edge_login(s: &Setup, user: &str) -> String {
    let mut b = Browser::default();
    let r =
        b.post_json(&s.edge, "/auth/login", &json!({"username": user, "password": format!("{user}-password")})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    b.cookie(&s.edge, COOKIE).unwrap()
}

fn session_cookie(sid: &str) -> String {
    format!("theme=dark; {COOKIE}={sid}")
}

#[tokio::test]
async fn nginx_auth_request_forwards_the_users_token_and_nothing_forged() {
    let s = setup(Options::default()).await;
    let sid = edge_login(&s, "alice").await;
    let (rec, tokens) = session_tokens(&s.gate, &sid).await;
    for prefix in ["/app/", "/ing/"] {
        let r = http()
            .get(format!("{}{prefix}items?x=1", s.edge))
            .header("cookie", session_cookie(&sid))
            .header("cookie", "lang=en")
            .header("authorization", "Bearer forged")
            .header("x-gatehouse-sub", "admin")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{prefix}");
        let seen: Value = r.json().await.unwrap();
        let h = &seen["headers"];
        let auth = h["authorization"].as_str().unwrap();
        assert_eq!(
            auth,
            format!("Bearer {}", tokens.access_token),
            "{prefix}: the user's token, once, not the forged one"
        );
        assert!(looks_like_jwt(auth));
        assert_eq!(h["x-gatehouse-sub"], rec.claims.sub.as_str(), "{prefix}: the claim header is ours");
        let cookies = h["cookie"].as_str().unwrap_or("");
        assert!(!cookies.contains(&sid) && !cookies.contains(COOKIE), "{prefix}: session cookie leaked: {cookies}");
        assert!(
            cookies.contains("theme=dark") && cookies.contains("lang=en"),
            "{prefix}: other cookies kept: {cookies}"
        );
        // The token is a live Keycloak access token (userinfo verifies it at the issuer).
        let ui = http()
            .get(format!("{}/protocol/openid-connect/userinfo", issuer()))
            .header("authorization", auth)
            .send()
            .await
            .unwrap();
        assert_eq!(ui.status(), 200, "{prefix}: Keycloak accepts the forwarded token");
        assert_eq!(ui.json::<Value>().await.unwrap()["preferred_username"], "alice");
    }
    s.gate.stop().await;
}

#[tokio::test]
async fn no_session_is_401_for_fetch_and_a_login_redirect_for_navigation() {
    let s = setup(Options::default()).await;
    let c = http();
    let fetch = c.get(format!("{}/app/items", s.edge)).header("sec-fetch-mode", "cors").send().await.unwrap();
    assert_eq!(fetch.status(), 401);
    assert_eq!(fetch.json::<Value>().await.unwrap()["error"], "unauthenticated");
    let forged = c
        .get(format!("{}/app/items", s.edge))
        .header("cookie", format!("{COOKIE}=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"))
        .header("authorization", "Bearer forged")
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 401, "an unknown session id and a forged Authorization do not pass");
    let nav = c
        .get(format!("{}/app/page?a=1&b=2", s.edge))
        .header("sec-fetch-mode", "navigate")
        .header("accept", "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(nav.status(), 302);
    let loc = nav.headers()["location"].to_str().unwrap();
    assert_eq!(loc, format!("{}/auth/login?return_to=%2Fapp%2Fpage%3Fa%3D1%26b%3D2", s.edge));
    // ...and the login route it points at is served on the same origin.
    let login = c.get(loc).send().await.unwrap();
    assert_eq!(login.status(), 303, "the login starts");
    assert!(login.headers()["location"].to_str().unwrap().starts_with(&issuer()));
    s.gate.stop().await;
}

#[tokio::test]
async fn unsafe_methods_need_the_csrf_header_and_our_origin() {
    let s = setup(Options::default()).await;
    let sid = edge_login(&s, "alice").await;
    let c = http();
    for prefix in ["/app/", "/ing/"] {
        let url = format!("{}{prefix}items", s.edge);
        let send = |origin: &str, csrf: bool| {
            let mut r = c.post(&url).header("cookie", session_cookie(&sid)).header("origin", origin).body("{}");
            if csrf {
                r = r.header("x-csrf", "1");
            }
            r.send()
        };
        // nginx passes only 401/403 from auth_request; the 403 is Gatehouse's CSRF refusal.
        assert_eq!(send(&s.edge, false).await.unwrap().status(), 403, "{prefix}: no X-CSRF");
        assert_eq!(send("http://evil.example", true).await.unwrap().status(), 403, "{prefix}: foreign Origin");
        let ok = send(&s.edge, true).await.unwrap();
        assert_eq!(ok.status(), 200, "{prefix}: same origin with X-CSRF");
        assert_eq!(ok.json::<Value>().await.unwrap()["method"], "POST");
    }
    s.gate.stop().await;
}

#[tokio::test]
async fn an_expired_token_is_refreshed_once_for_twenty_concurrent_requests_through_nginx() {
    let s = setup(Options::short_tokens()).await;
    let sid = edge_login(&s, "bob").await;
    let (rec, before) = session_tokens(&s.gate, &sid).await;
    let admin = KcAdmin::connect().await;
    tokio::time::sleep(Duration::from_secs(11)).await;
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let (url, cookie) = (format!("{}/app/x", s.edge), session_cookie(&sid));
        tasks.push(tokio::spawn(async move {
            let r = http().get(url).header("cookie", cookie).send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.json::<Value>().await.unwrap()["headers"]["authorization"].as_str().unwrap().to_string()
        }));
    }
    let mut seen = std::collections::HashSet::new();
    for t in tasks {
        seen.insert(t.await.unwrap());
    }
    assert_eq!(seen.len(), 1, "every request carried the one refreshed token");
    assert_ne!(seen.iter().next().unwrap(), &format!("Bearer {}", before.access_token), "the token was refreshed");
    assert_eq!(admin.refresh_events(rec.provider_sid.as_deref().unwrap()).await, 1, "exactly one refresh at Keycloak");
    s.gate.stop().await;
}

#[tokio::test]
async fn the_check_listener_refuses_unauthenticated_callers_and_the_public_one_has_no_check() {
    let s = setup(Options::default()).await;
    let sid = edge_login(&s, "alice").await;
    let c = http();
    let url = format!("http://{}/check", s.check);
    for key in [None, Some("wrong"), Some(&CHECK_KEY[..CHECK_KEY.len() - 1])] {
        let mut r = c.get(&url).header("cookie", session_cookie(&sid));
        if let Some(k) = key {
            r = r.header("x-gatehouse-check-key", k);
        }
        let r = r.send().await.unwrap();
        assert_eq!(r.status(), 403, "key {key:?}");
        assert!(r.headers().get("authorization").is_none());
    }
    let ok = c
        .get(&url)
        .header("cookie", session_cookie(&sid))
        .header("x-gatehouse-check-key", CHECK_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200, "the right key is accepted");
    assert!(ok.headers()["authorization"].to_str().unwrap().starts_with("Bearer "));
    for path in ["/check", "/check?redirect=1"] {
        let r = c
            .get(format!("{}{path}", s.gate.base))
            .header("cookie", session_cookie(&sid))
            .header("x-gatehouse-check-key", CHECK_KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "public listener {path}");
        assert!(r.headers().get("authorization").is_none());
    }
    // The check listener has its own RED series, refusals included.
    let series = |class: &str| {
        format!(
            "gatehouse_http_requests_total{{face=\"check\",route=\"/check\",method=\"GET\",status_class=\"{class}\"}}"
        )
    };
    assert_eq!(s.gate.metric(&series("4xx")).await, 3.0, "three refused callers counted");
    assert_eq!(s.gate.metric(&series("2xx")).await, 1.0, "one allowed check counted");
    s.gate.stop().await;
}

#[tokio::test]
async fn with_mutual_tls_only_allowed_gateway_identities_may_check() {
    const GATEWAY: &str = "spiffe://gatehouse.local/ns/edge/sa/nginx";
    let work = Workdir::new();
    let pki = work.pki();
    let extra = format!(
        "[check]\nlisten = \"127.0.0.1:0\"\ncert = \"{p}/gatehouse.crt\"\nkey = \"{p}/gatehouse.key\"\nclient_ca = \"{p}/ca.crt\"\nallow = [\"{GATEWAY}\"]\n",
        p = pki.display()
    );
    let gate = Gate::start(&work, &Options { extra, ..Options::default() }).await;
    let sid = logged_in(&gate, "alice").await;
    let url = format!("https://localhost:{}/check", gate.running.as_ref().unwrap().check_addr.unwrap().port());
    let ca = work.ca();
    let allowed = mtls_client(&ca.cert_pem, Some(&client_cert(&ca, vec![gatehouse::pki::San::Uri(GATEWAY.into())])));
    let other = mtls_client(&ca.cert_pem, Some(&client_cert(&ca, vec![gatehouse::pki::San::Uri(POCKETBASE.into())])));
    let none = mtls_client(&ca.cert_pem, None);
    let r = other.get(&url).header("cookie", session_cookie(&sid)).send().await.unwrap();
    assert_eq!(r.status(), 403, "an identity not on check.allow");
    assert!(none.get(&url).send().await.is_err(), "no client certificate, no handshake");
    let r = allowed.get(&url).header("cookie", session_cookie(&sid)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(looks_like_jwt(r.headers()["authorization"].to_str().unwrap()));
    let r = allowed.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 401, "allowed gateway, no session");
    gate.stop().await;
}

#[tokio::test]
async fn a_store_outage_denies_with_503_never_allows() {
    let mut redis = Redis::start().await;
    let s = setup(Options { redis_url: Some(redis.url()), ..Options::default() }).await;
    let sid = edge_login(&s, "alice").await;
    let check = |path: &'static str| {
        http()
            .get(format!("http://{}{path}", s.check))
            .header("cookie", session_cookie(&sid))
            .header("x-gatehouse-check-key", CHECK_KEY)
            .send()
    };
    assert_eq!(check("/check").await.unwrap().status(), 200, "before the outage");
    redis.stop().await;
    let r = check("/check").await.unwrap();
    assert_eq!(r.status(), 503, "store down: unavailable, not allowed and not logged out");
    assert!(r.headers().get("authorization").is_none());
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "store_unavailable");
    // nginx's auth_request turns any status but 2xx/401/403 into 500: still a denial, and the
    // upstream never sees the request.
    let through = http().get(format!("{}/app/x", s.edge)).header("cookie", session_cookie(&sid)).send().await.unwrap();
    assert_eq!(through.status(), 500);
    assert!(!through.text().await.unwrap().contains("\"headers\""), "the upstream was not reached");
    s.gate.stop().await;
}

/// Caddy's `forward_auth` (the auth subrequest is always GET; the method arrives in
/// `X-Forwarded-Method`, the URI in `X-Forwarded-Uri`): token forwarded, forgeries replaced,
/// session cookie not forwarded, 401 for fetch, login redirect for page loads, CSRF on POST.
#[tokio::test]
async fn caddy_forward_auth_forwards_the_token_and_enforces_the_same_rules() {
    let s = setup_with(Options::default(), Gateway::Caddy).await;
    let sid = edge_login(&s, "alice").await;
    let (rec, tokens) = session_tokens(&s.gate, &sid).await;
    let c = http();
    let r = c
        .get(format!("{}/items?x=1", s.edge))
        .header("cookie", session_cookie(&sid))
        .header("authorization", "Bearer forged")
        .header("x-gatehouse-sub", "admin")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen: Value = r.json().await.unwrap();
    let h = &seen["headers"];
    assert_eq!(h["authorization"], format!("Bearer {}", tokens.access_token).as_str(), "ours, once");
    assert_eq!(h["x-gatehouse-sub"], rec.claims.sub.as_str());
    let cookies = h["cookie"].as_str().unwrap_or("");
    assert!(!cookies.contains(&sid) && cookies.contains("theme=dark"), "cookies upstream: {cookies}");
    let fetch = c.get(format!("{}/items", s.edge)).header("sec-fetch-mode", "cors").send().await.unwrap();
    assert_eq!(fetch.status(), 401);
    assert_eq!(fetch.json::<Value>().await.unwrap()["error"], "unauthenticated");
    let nav = c.get(format!("{}/page", s.edge)).header("sec-fetch-mode", "navigate").send().await.unwrap();
    assert_eq!(nav.status(), 302);
    assert_eq!(nav.headers()["location"].to_str().unwrap(), format!("{}/auth/login?return_to=%2Fpage", s.edge));
    let post = |csrf: bool| {
        let mut r =
            c.post(format!("{}/items", s.edge)).header("cookie", session_cookie(&sid)).header("origin", &s.edge);
        if csrf {
            r = r.header("x-csrf", "1");
        }
        r.send()
    };
    assert_eq!(post(false).await.unwrap().status(), 403, "CSRF applies to the original POST");
    let ok = post(true).await.unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(ok.json::<Value>().await.unwrap()["method"], "POST");
    s.gate.stop().await;
}

/// Envoy's ext_authz `http_service` (`path_prefix: /check`): the original method is the check
/// request's own, the original path follows `/check`.
#[tokio::test]
async fn envoy_http_service_form_reads_the_path_after_check() {
    let s = setup(Options::default()).await;
    let sid = edge_login(&s, "alice").await;
    let c = http();
    let url = format!("http://{}/check/app/page?a=1", s.check);
    let ok = c
        .get(&url)
        .header("cookie", session_cookie(&sid))
        .header("x-gatehouse-check-key", CHECK_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    assert!(looks_like_jwt(ok.headers()["authorization"].to_str().unwrap()));
    let nav = c
        .get(&url)
        .header("x-gatehouse-check-key", CHECK_KEY)
        .header("sec-fetch-mode", "navigate")
        .send()
        .await
        .unwrap();
    assert_eq!(nav.status(), 401);
    assert_eq!(
        nav.headers()["x-gatehouse-login"].to_str().unwrap(),
        format!("{}/auth/login?return_to=%2Fapp%2Fpage%3Fa%3D1", s.edge)
    );
    let post = c
        .post(&url)
        .header("cookie", session_cookie(&sid))
        .header("x-gatehouse-check-key", CHECK_KEY)
        .header("origin", "http://evil.example")
        .header("x-csrf", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), 403, "CSRF on the check request's own method");
    s.gate.stop().await;
}
