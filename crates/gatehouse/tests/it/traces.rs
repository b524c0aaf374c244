//! One trace across Gatehouse and a service, read back from a real Jaeger (built by
//! `scripts/jaeger.sh`): the real `gatehouse` binary exports OTLP/HTTP; a browser signs in through
//! Keycloak and calls a proxied route with its own `traceparent`; the upstream (a small service
//! here) calls the East-West exchange back, passing the `traceparent` it got. The trace must hold
//! browser span → proxy server span → upstream client span → exchange server span, with store
//! and Keycloak client spans, and no attribute, event or resource anywhere may contain the
//! session id, a token, the authorization code or the cookie. The JSON log lines of the request
//! carry the same trace id. A second test puts the real PocketBase integration in the middle.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gatehouse::pki::San;
use serde_json::{Value, json};

use crate::bin;
use crate::harness::*;

fn jaeger_bin() -> PathBuf {
    if let Ok(p) = std::env::var("JAEGER_BIN") {
        return PathBuf::from(p);
    }
    let cache = std::env::var("GATEHOUSE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/gatehouse"));
    let p = cache.join("bin/jaeger-v1.76.0");
    assert!(p.exists(), "Jaeger not built: run scripts/jaeger.sh build (or set JAEGER_BIN)");
    p
}

/// The binary under test; `GATEHOUSE_BIN` overrides Cargo's (several work trees may share one
/// target directory).
fn gatehouse_bin() -> PathBuf {
    std::env::var("GATEHOUSE_BIN").map(PathBuf::from).unwrap_or_else(|_| bin().to_path_buf())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Killed(std::process::Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Jaeger all-in-one, in-memory, every port chosen here. Returns (process, OTLP URL, query URL).
async fn start_jaeger(dir: &std::path::Path) -> (Killed, String, String) {
    let (otlp, query, grpc) = (free_port(), free_port(), free_port());
    let config = format!(
        r#"service:
  extensions: [jaeger_storage, jaeger_query]
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [jaeger_storage_exporter]
  telemetry:
    metrics:
      level: none
    logs:
      level: warn
extensions:
  jaeger_query:
    storage:
      traces: mem
    http:
      endpoint: 127.0.0.1:{query}
    grpc:
      endpoint: 127.0.0.1:{grpc}
  jaeger_storage:
    backends:
      mem:
        memory:
          max_traces: 10000
receivers:
  otlp:
    protocols:
      http:
        endpoint: 127.0.0.1:{otlp}
processors:
  batch:
    timeout: 100ms
exporters:
  jaeger_storage_exporter:
    trace_storage: mem
"#
    );
    let path = dir.join("jaeger.yaml");
    std::fs::write(&path, config).unwrap();
    let log = std::fs::File::create(dir.join("jaeger.log")).unwrap();
    let child = Killed(
        std::process::Command::new(jaeger_bin())
            .arg("--config")
            .arg(&path)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let query_url = format!("http://127.0.0.1:{query}");
    for _ in 0..100 {
        if let Ok(r) = http().get(format!("{query_url}/api/services")).send().await
            && r.status() == 200
        {
            return (child, format!("http://127.0.0.1:{otlp}/v1/traces"), query_url);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("Jaeger did not start; see {}", dir.join("jaeger.log").display());
}

#[derive(Default)]
struct Seen {
    traceparent: Option<String>,
    access_token: Option<String>,
}

/// The upstream service: exchanges the relayed session id on the internal listener, passing on
/// the `traceparent` Gatehouse sent (as a service without its own tracer would).
async fn start_upstream(internal: String, mtls: reqwest::Client, seen: Arc<Mutex<Seen>>) -> u16 {
    use axum::http::HeaderMap;
    let app = axum::Router::new().fallback(move |headers: HeaderMap| {
        let (internal, mtls, seen) = (internal.clone(), mtls.clone(), seen.clone());
        async move {
            let tp = headers.get("traceparent").and_then(|v| v.to_str().ok()).map(str::to_owned);
            let sid = headers.get("x-gatehouse-session").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
            let mut req =
                mtls.post(format!("{internal}/internal/v1/session/exchange")).json(&json!({"session_id": sid}));
            if let Some(tp) = &tp {
                req = req.header("traceparent", tp);
            }
            let answer: Value = req.send().await.unwrap().json().await.unwrap();
            let mut s = seen.lock().unwrap();
            s.traceparent = tp;
            s.access_token = answer["access_token"].as_str().map(str::to_owned);
            axum::Json(json!({"notes": []}))
        }
    });
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(l, app).await });
    port
}

async fn jaeger_trace(query: &str, trace_id: &str) -> Option<Value> {
    let r = http().get(format!("{query}/api/traces/{trace_id}")).send().await.ok()?;
    if r.status() != 200 {
        return None;
    }
    let v: Value = r.json().await.ok()?;
    v["data"].as_array()?.first().cloned()
}

fn span<'a>(trace: &'a Value, op: &str) -> &'a Value {
    trace["spans"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["operationName"] == op)
        .unwrap_or_else(|| panic!("no span {op} in {}", names(trace)))
}

fn names(trace: &Value) -> String {
    trace["spans"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["operationName"].as_str().unwrap_or("?"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn parent(span: &Value) -> Option<String> {
    span["references"]
        .as_array()?
        .iter()
        .find(|r| r["refType"] == "CHILD_OF")
        .and_then(|r| r["spanID"].as_str())
        .map(str::to_owned)
}

fn tag<'a>(span: &'a Value, key: &str) -> Option<&'a Value> {
    span["tags"].as_array()?.iter().find(|t| t["key"] == key).map(|t| &t["value"])
}

/// Start the real binary with this configuration; (process, its stdout log file) once `/readyz`
/// answers 200.
async fn spawn_gatehouse(work: &Workdir, config_text: &str) -> (Killed, PathBuf) {
    let config = work.dir.path().join("gatehouse.toml");
    std::fs::write(&config, config_text).unwrap();
    let stdout_path = work.dir.path().join("gatehouse.log");
    let child = Killed(
        std::process::Command::new(gatehouse_bin())
            .args(["serve", "--config"])
            .arg(&config)
            .env_remove("RUST_LOG")
            .stdout(std::fs::File::create(&stdout_path).unwrap())
            .stderr(std::fs::File::create(work.dir.path().join("gatehouse.err")).unwrap())
            .spawn()
            .unwrap(),
    );
    let base = format!("http://localhost:{}", work.port);
    for _ in 0..200 {
        if let Ok(r) = http().get(format!("{base}/readyz")).send().await
            && r.status() == 200
        {
            return (child, stdout_path);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("gatehouse did not become ready: {}", std::fs::read_to_string(&stdout_path).unwrap_or_default());
}

/// SIGTERM and wait (up to 10 s): a graceful stop flushes buffered spans.
async fn terminate(p: &mut Killed) {
    let _ = std::process::Command::new("kill").args(["-TERM", &p.0.id().to_string()]).status();
    for _ in 0..100 {
        if p.0.try_wait().unwrap().is_some() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Gatehouse's config for these tests: internal listener and admin on fixed ports, JSON logs,
/// tracing to `otlp` at 100 %, `traceparent` accepted from anyone (the test is the browser).
fn traced_config(work: &Workdir, routes: &str, otlp: &str, internal_port: u16, admin_port: u16) -> String {
    let extra = format!(
        "{routes}[tracing]\nendpoint = \"{otlp}\"\nsample_ratio = 1.0\npropagation = \"any\"\n\
         [log]\nformat = \"json\"\nlevel = \"info\"\n"
    );
    let o = Options { extra, ..Options::with_internal(&[POCKETBASE]) };
    work.config_text(&o)
        .replacen("[admin]\nlisten = \"127.0.0.1:0\"", &format!("[admin]\nlisten = \"127.0.0.1:{admin_port}\""), 1)
        .replacen(
            "[internal]\nlisten = \"127.0.0.1:0\"",
            &format!("[internal]\nlisten = \"127.0.0.1:{internal_port}\""),
            1,
        )
}

/// The code-flow login's session id and authorization code.
async fn browser_login(base: &str) -> (String, String) {
    let mut browser = Browser::default();
    browser.login(base, "alice").await;
    let sid = browser.cookie(base, COOKIE).unwrap();
    let code = url::Url::parse(browser.last_callback.as_ref().unwrap())
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "code")
        .unwrap()
        .1
        .into_owned();
    (sid, code)
}

/// Every trace of `service` Jaeger holds, as one JSON document.
async fn all_traces(query: &str, service: &str) -> Value {
    http()
        .get(format!("{query}/api/traces?service={service}&limit=100&lookback=1h"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// A trace once it holds a span named `op` (spans arrive per process, in batches).
async fn trace_with(query: &str, trace_id: &str, op: &str) -> Value {
    let mut trace = None;
    for _ in 0..50 {
        trace = jaeger_trace(query, trace_id).await;
        if trace.as_ref().is_some_and(|t| names(t).contains(op)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    trace.unwrap_or_else(|| panic!("Jaeger has no trace {trace_id}"))
}

#[tokio::test]
async fn one_trace_from_browser_through_proxy_and_upstream_back_into_the_exchange_without_secrets() {
    let work = Workdir::new();
    let (jaeger, otlp, query) = start_jaeger(work.dir.path()).await;

    let (internal_port, admin_port) = (free_port(), free_port());
    let ca = work.ca();
    let mtls = mtls_client(&ca.cert_pem, Some(&client_cert(&ca, vec![San::Uri(POCKETBASE.into())])));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let up = start_upstream(format!("https://localhost:{internal_port}"), mtls, seen.clone()).await;
    let routes =
        format!("[[routes]]\nprefix = \"/api/notes/\"\nupstream = \"http://127.0.0.1:{up}/\"\nrelay = \"session\"\n");
    let text = traced_config(&work, &routes, &otlp, internal_port, admin_port);
    let (mut gatehouse, stdout_path) = spawn_gatehouse(&work, &text).await;
    let base = format!("http://localhost:{}", work.port);

    // A real code-flow login, then the browser's request with its own trace context.
    let (sid, code) = browser_login(&base).await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let browser_span = "00f067aa0ba902b7";
    let r = http()
        .get(format!("{base}/api/notes/records"))
        .header("cookie", format!("{COOKIE}={sid}"))
        .header("traceparent", format!("00-{trace_id}-{browser_span}-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (upstream_tp, access_token) = {
        let s = seen.lock().unwrap();
        (s.traceparent.clone().expect("the upstream got a traceparent"), s.access_token.clone().expect("exchanged"))
    };
    assert!(
        upstream_tp.starts_with(&format!("00-{trace_id}-")),
        "the upstream joins the browser's trace: {upstream_tp}"
    );
    assert!(!upstream_tp.contains(browser_span), "Gatehouse's own client span is the upstream's parent");

    // SIGTERM: graceful shutdown flushes the buffered spans.
    terminate(&mut gatehouse).await;
    let logs = std::fs::read_to_string(&stdout_path).unwrap();

    let trace = trace_with(&query, trace_id, "POST /internal/v1/session/exchange").await;

    // Parent-child links: browser → proxy server span → upstream client span → exchange server span.
    let server = span(&trace, "GET /api/{*rest}");
    assert_eq!(parent(server).as_deref(), Some(browser_span), "the proxy span continues the browser's");
    assert_eq!(tag(server, "span.kind").unwrap(), "server");
    assert_eq!(tag(server, "http.route").unwrap(), "/api/{*rest}");
    assert_eq!(tag(server, "gatehouse.route").unwrap(), "/api/notes/");
    // (tracing records the u16 as u64, which OpenTelemetry carries as a string above i64's range
    // check; accept either form.)
    assert_eq!(tag(server, "http.response.status_code").unwrap().to_string().trim_matches('"'), "200");
    let key = gatehouse::session::SessionId::parse(&sid).unwrap().key();
    assert_eq!(tag(server, "gatehouse.session").unwrap(), key.prefix().as_str());
    let upstream = span(&trace, "GET /api/notes/");
    assert_eq!(tag(upstream, "span.kind").unwrap(), "client");
    assert_eq!(parent(upstream), server["spanID"].as_str().map(str::to_owned));
    assert!(upstream_tp.contains(upstream["spanID"].as_str().unwrap()), "the injected traceparent is the client span");
    let exchange = span(&trace, "POST /internal/v1/session/exchange");
    assert_eq!(parent(exchange), upstream["spanID"].as_str().map(str::to_owned));
    assert_eq!(tag(exchange, "gatehouse.face").unwrap(), "internal");
    assert_eq!(tag(exchange, "gatehouse.caller").unwrap(), POCKETBASE);
    assert_eq!(tag(exchange, "gatehouse.outcome").unwrap(), "ok");
    // Store client spans under the request spans.
    let spans = trace["spans"].as_array().unwrap();
    let store_under = |parent_id: &str| {
        spans.iter().any(|s| tag(s, "db.system.name").is_some() && parent(s).as_deref() == Some(parent_id))
    };
    assert!(store_under(server["spanID"].as_str().unwrap()), "store spans under the proxy span: {}", names(&trace));
    assert!(store_under(exchange["spanID"].as_str().unwrap()), "store spans under the exchange span");
    let process = &trace["processes"][server["processID"].as_str().unwrap()];
    assert_eq!(process["serviceName"], "gatehouse");

    // The login's trace: the callback's server span with the token call to Keycloak under it.
    let found: Value = http()
        .get(format!("{query}/api/traces?service=gatehouse&operation=GET%20%2Fauth%2Fcallback&limit=5"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let login = &found["data"][0];
    let callback = span(login, "GET /auth/callback");
    let token_call = span(login, "POST token");
    assert_eq!(parent(token_call), callback["spanID"].as_str().map(str::to_owned));
    assert_eq!(tag(token_call, "span.kind").unwrap(), "client");

    // No secret anywhere in any trace of the service (tags, events, process, operation names).
    let all = all_traces(&query, "gatehouse").await;
    let all_text = all.to_string();
    assert!(all["data"].as_array().unwrap().len() >= 2, "login and request traces");
    // The stored tokens, read through an in-process Gatehouse on the same store and key.
    let gate = Gate::start(&work, &Options::with_internal(&[POCKETBASE])).await;
    let (_, tokens) = session_tokens(&gate, &sid).await;
    gate.stop().await;
    let secrets = [
        ("session id", sid.clone()),
        ("authorization code", code),
        ("access token (exchanged)", access_token),
        ("access token", tokens.access_token.clone()),
        ("refresh token", tokens.refresh_token.clone().unwrap()),
        ("ID token", tokens.id_token.clone().unwrap()),
    ];
    for (what, secret) in &secrets {
        assert!(secret.len() >= 16);
        assert!(!all_text.contains(secret.as_str()), "the traces contain the {what}");
        assert!(!logs.contains(secret.as_str()), "the logs contain the {what}");
    }

    // JSON logs: lines inside the request's spans carry its trace id and their span's id.
    let lines: Vec<Value> = logs.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    assert!(!lines.is_empty(), "JSON log lines: {logs}");
    let audit = lines
        .iter()
        .find(|l| l["fields"]["message"] == "session exchange" && l["trace_id"] == trace_id)
        .unwrap_or_else(|| panic!("the exchange's audit line carries the trace id: {logs}"));
    assert_eq!(audit["span_id"], exchange["spanID"], "and the exchange span's id");
    assert_eq!(audit["fields"]["session"], key.prefix().as_str(), "users by session-hash prefix");
    drop(jaeger);
}

/// The PocketBase integration binary (`scripts/pocketbase.sh build`); `POCKETBASE_BIN` overrides.
fn pocketbase_bin() -> PathBuf {
    if let Ok(p) = std::env::var("POCKETBASE_BIN") {
        return PathBuf::from(p);
    }
    let cache = std::env::var("GATEHOUSE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/gatehouse"));
    let p = cache.join("pocketbase/gatehouse-pocketbase");
    assert!(p.exists(), "PocketBase not built: run scripts/pocketbase.sh build (or set POCKETBASE_BIN)");
    p
}

/// The whole chain with the real PocketBase integration: browser → Gatehouse proxy → PocketBase
/// (its own spans, OpenTelemetry Go SDK) → Gatehouse exchange, in one trace across three
/// services' processes, read back from Jaeger; no secret in any span of either service.
#[tokio::test]
async fn pocketbase_joins_the_trace_between_the_proxy_and_the_exchange() {
    let work = Workdir::new();
    let (jaeger, otlp, query) = start_jaeger(work.dir.path()).await;
    let (internal_port, admin_port, pb_port) = (free_port(), free_port(), free_port());
    let pki = work.pki();
    gatehouse::pki::issue_to_dir(&pki, "pocketbase", San::Uri(POCKETBASE.into()), &pki).unwrap();
    let pb_log = work.dir.path().join("pocketbase.log");
    let mut pocketbase = Killed(
        std::process::Command::new(pocketbase_bin())
            .args(["serve", "--http", &format!("127.0.0.1:{pb_port}"), "--dir"])
            .arg(work.dir.path().join("pb_data"))
            .env("GATEHOUSE_EXCHANGE_URL", format!("https://127.0.0.1:{internal_port}/internal/v1/session/exchange"))
            .env("GATEHOUSE_CLIENT_CERT", pki.join("pocketbase.crt"))
            .env("GATEHOUSE_CLIENT_KEY", pki.join("pocketbase.key"))
            .env("GATEHOUSE_CA", pki.join("ca.crt"))
            .env("GATEHOUSE_ISSUER", issuer())
            .env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", &otlp)
            .env("OTEL_SERVICE_NAME", "pocketbase")
            .stdout(std::fs::File::create(&pb_log).unwrap())
            .stderr(std::fs::File::create(work.dir.path().join("pocketbase.err")).unwrap())
            .spawn()
            .unwrap(),
    );
    let routes =
        format!("[[routes]]\nprefix = \"/api/pb/\"\nupstream = \"http://127.0.0.1:{pb_port}/\"\nrelay = \"session\"\n");
    let (mut gatehouse, _) =
        spawn_gatehouse(&work, &traced_config(&work, &routes, &otlp, internal_port, admin_port)).await;
    let base = format!("http://localhost:{}", work.port);
    let mut pb_up = false;
    for _ in 0..300 {
        if let Ok(r) = http().get(format!("http://127.0.0.1:{pb_port}/api/health")).send().await
            && r.status() == 200
        {
            pb_up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        pb_up,
        "PocketBase did not start: {}",
        std::fs::read_to_string(work.dir.path().join("pocketbase.err")).unwrap_or_default()
    );

    let (sid, code) = browser_login(&base).await;
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let browser_span = "b7ad6b7169203331";
    let r = http()
        .get(format!("{base}/api/pb/api/collections/notes/records"))
        .header("cookie", format!("{COOKIE}={sid}"))
        .header("traceparent", format!("00-{trace_id}-{browser_span}-01"))
        .send()
        .await
        .unwrap();
    let status = r.status();
    assert_eq!(status, 200, "{}", r.text().await.unwrap_or_default());
    terminate(&mut pocketbase).await;
    terminate(&mut gatehouse).await;

    let trace = trace_with(&query, trace_id, "POST /internal/v1/session/exchange").await;
    let spans = trace["spans"].as_array().unwrap();
    let service_of =
        |s: &Value| trace["processes"][s["processID"].as_str().unwrap()]["serviceName"].as_str().unwrap().to_owned();
    let find = |service: &str, kind: &str, name_prefix: &str| {
        spans
            .iter()
            .find(|s| {
                service_of(s) == service
                    && tag(s, "span.kind").is_some_and(|k| k == kind)
                    && s["operationName"].as_str().unwrap().starts_with(name_prefix)
            })
            .unwrap_or_else(|| panic!("no {kind} span {name_prefix}… of {service}: {}", names(&trace)))
    };
    let proxy = find("gatehouse", "server", "GET /api/{*rest}");
    let upstream = find("gatehouse", "client", "GET /api/pb/");
    let pb_server = find("pocketbase", "server", "GET /api/collections/");
    let pb_client = find("pocketbase", "client", "POST /internal/v1/session/exchange");
    let exchange = find("gatehouse", "server", "POST /internal/v1/session/exchange");
    let id = |s: &Value| s["spanID"].as_str().map(str::to_owned);
    assert_eq!(parent(proxy).as_deref(), Some(browser_span));
    assert_eq!(parent(upstream), id(proxy));
    assert_eq!(parent(pb_server), id(upstream), "PocketBase continues Gatehouse's upstream span");
    assert_eq!(parent(pb_client), id(pb_server));
    assert_eq!(parent(exchange), id(pb_client), "the exchange continues PocketBase's client span");
    assert_eq!(tag(exchange, "gatehouse.caller").unwrap(), POCKETBASE);

    // No secret in any trace of either service.
    let gate = Gate::start(&work, &Options::with_internal(&[POCKETBASE])).await;
    let (_, tokens) = session_tokens(&gate, &sid).await;
    gate.stop().await;
    let text = format!("{}{}", all_traces(&query, "gatehouse").await, all_traces(&query, "pocketbase").await);
    for (what, secret) in [
        ("session id", sid.as_str()),
        ("authorization code", code.as_str()),
        ("access token", tokens.access_token.as_str()),
        ("refresh token", tokens.refresh_token.as_deref().unwrap()),
        ("ID token", tokens.id_token.as_deref().unwrap()),
    ] {
        assert!(!text.contains(secret), "a trace contains the {what}");
    }
    drop(jaeger);
}
