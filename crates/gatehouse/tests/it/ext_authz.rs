//! The Envoy ext_authz v3 gRPC face (`envoy.service.auth.v3.Authorization/Check`) on the check
//! listener, called with the client generated from Envoy's canonical protos (envoy-types), the
//! way Envoy's `grpc_service` calls it: a real Gatehouse, the real Keycloak, real Redis for the
//! outage. Envoy itself cannot run here, so `envoy_applies` applies an `OkHttpResponse` to the
//! original headers with Envoy's documented semantics to show what the upstream would receive.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::ext_authz::v3::pb::{
    CheckRequest, CheckResponse, DeniedHttpResponse, HeaderAppendAction, HttpResponse, OkHttpResponse,
};
use envoy_types::pb::envoy::config::core::v3::{HeaderMap as EnvoyHeaderMap, HeaderValue};
use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use serde_json::Value;
use tonic::transport::{Channel, Endpoint};

use crate::harness::*;

const CHECK_KEY: &str = "envoy-check-key-0123456789abcdefghijklmnopq";
const NO_KEY: &str = "";

struct Setup {
    gate: Gate,
    _work: Workdir,
    check: SocketAddr,
}

async fn setup(base: Options) -> Setup {
    let work = Workdir::new();
    let key = work.dir.path().join("check.key");
    std::fs::write(&key, format!("{CHECK_KEY}\n")).unwrap();
    let extra = format!(
        "[check]\nlisten = \"127.0.0.1:0\"\nkey_file = \"{}\"\nclaim_headers = [\"sub\", \"preferred_username\"]\n",
        key.display()
    );
    let gate = Gate::start(&work, &Options { extra, ..base }).await;
    let check = gate.running.as_ref().unwrap().check_addr.expect("check listener");
    Setup { gate, _work: work, check }
}

/// A gRPC client over h2c (prior knowledge), as Envoy's `envoy_grpc` cluster speaks it.
async fn client(check: SocketAddr) -> AuthorizationClient<Channel> {
    AuthorizationClient::connect(format!("http://{check}")).await.unwrap()
}

/// The original request's headers the way Envoy's `headers` map carries them: one entry per
/// name, lower-cased; several `cookie` headers joined with "; ", other repeats with ",".
fn envoy_headers(headers: &[(&str, &str)]) -> HashMap<String, String> {
    let mut out: HashMap<String, String> = HashMap::new();
    for (k, v) in headers {
        let k = k.to_ascii_lowercase();
        let sep = if k == "cookie" { "; " } else { "," };
        out.entry(k).and_modify(|e| *e = format!("{e}{sep}{v}")).or_insert_with(|| v.to_string());
    }
    out
}

fn check_request(method: &str, path: &str, headers: &[(&str, &str)]) -> CheckRequest {
    let http = HttpRequest {
        id: "req-1".into(),
        method: method.into(),
        headers: envoy_headers(headers),
        path: path.into(),
        host: "app.example".into(),
        scheme: "https".into(),
        protocol: "HTTP/2".into(),
        size: -1,
        ..Default::default()
    };
    with_http(http)
}

fn with_http(http: HttpRequest) -> CheckRequest {
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request { http: Some(http), ..Default::default() }),
            ..Default::default()
        }),
    }
}

/// Call Check with the shared key in gRPC metadata (Envoy: `grpc_service.initial_metadata`).
async fn call(
    c: &mut AuthorizationClient<Channel>,
    key: &str,
    req: CheckRequest,
) -> Result<CheckResponse, tonic::Status> {
    let mut r = tonic::Request::new(req);
    if !key.is_empty() {
        r.metadata_mut().insert("x-gatehouse-check-key", key.parse().unwrap());
    }
    c.check(r).await.map(|r| r.into_inner())
}

fn ok(r: &CheckResponse) -> &OkHttpResponse {
    assert_eq!(r.status.as_ref().unwrap().code, 0, "status OK");
    match &r.http_response {
        Some(HttpResponse::OkResponse(ok)) => ok,
        other => panic!("not an OkHttpResponse: {other:?}"),
    }
}

fn denied(r: &CheckResponse) -> &DeniedHttpResponse {
    assert_ne!(r.status.as_ref().unwrap().code, 0, "a denial never carries status OK");
    match &r.http_response {
        Some(HttpResponse::DeniedResponse(d)) => d,
        other => panic!("not a DeniedHttpResponse: {other:?}"),
    }
}

fn denied_status(d: &DeniedHttpResponse) -> i32 {
    d.status.as_ref().unwrap().code
}

fn denied_header<'a>(d: &'a DeniedHttpResponse, name: &str) -> Option<&'a str> {
    d.headers.iter().filter_map(|h| h.header.as_ref()).find(|h| h.key == name).map(|h| h.value.as_str())
}

/// What Envoy sends upstream for an `OkHttpResponse` (ext_authz filter semantics): each header
/// option by its append action, then `headers_to_remove`. Repeated headers are kept as repeats.
fn envoy_applies(original: &[(&str, &str)], ok: &OkHttpResponse) -> Vec<(String, String)> {
    let mut h: Vec<(String, String)> = original.iter().map(|(k, v)| (k.to_ascii_lowercase(), v.to_string())).collect();
    for o in &ok.headers {
        let hv = o.header.as_ref().unwrap();
        let (k, v) = (hv.key.to_ascii_lowercase(), hv.value.clone());
        let present = h.iter().any(|(n, _)| *n == k);
        match HeaderAppendAction::try_from(o.append_action).unwrap() {
            HeaderAppendAction::AppendIfExistsOrAdd => h.push((k, v)),
            HeaderAppendAction::AddIfAbsent if !present => h.push((k, v)),
            HeaderAppendAction::AddIfAbsent => {}
            HeaderAppendAction::OverwriteIfExistsOrAdd => {
                h.retain(|(n, _)| *n != k);
                h.push((k, v));
            }
            HeaderAppendAction::OverwriteIfExists if present => {
                h.retain(|(n, _)| *n != k);
                h.push((k, v));
            }
            HeaderAppendAction::OverwriteIfExists => {}
        }
    }
    h.retain(|(n, _)| !ok.headers_to_remove.iter().any(|r| r.eq_ignore_ascii_case(n)));
    h
}

fn all<'a>(h: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    h.iter().filter(|(n, _)| n == name).map(|(_, v)| v.as_str()).collect()
}

#[tokio::test]
async fn allowed_sets_the_users_token_over_any_forgery_and_rewrites_the_cookie() {
    let s = setup(Options::default()).await;
    let sid = logged_in(&s.gate, "alice").await;
    let (rec, tokens) = session_tokens(&s.gate, &sid).await;
    let mut c = client(s.check).await;
    let session = format!("theme=dark; {COOKIE}={sid}");
    // Two cookie headers (HTTP/2 browsers send one per cookie) that Envoy joins, plus forgeries.
    let original = [
        ("cookie", session.as_str()),
        ("cookie", "lang=en"),
        ("authorization", "Bearer forged"),
        ("x-gatehouse-sub", "admin"),
        ("x-gatehouse-realm-roles", "admin"),
        ("x-gatehouse-session", "forged-session"),
        ("x-forwarded-user", "admin"),
        ("x-auth-request-email", "admin@example.com"),
        ("accept", "application/json"),
    ];
    let r = call(&mut c, CHECK_KEY, check_request("GET", "/app/items?x=1", &original)).await.unwrap();
    let okr = ok(&r);
    // Every header Gatehouse sets replaces the client's: OVERWRITE_IF_EXISTS_OR_ADD, never the
    // default append (which would leave "Bearer forged" beside ours).
    for o in &okr.headers {
        assert_eq!(
            o.append_action,
            HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
            "{}",
            o.header.as_ref().unwrap().key
        );
    }
    let upstream = envoy_applies(&original, okr);
    let auth = all(&upstream, "authorization");
    assert_eq!(
        auth,
        [format!("Bearer {}", tokens.access_token).as_str()],
        "the user's token, once, not the forged one"
    );
    // The token verifies against Keycloak's JWKS (signature, issuer, expiry) and is alice's.
    let token = auth[0].strip_prefix("Bearer ").unwrap();
    let verified = s
        .gate
        .core()
        .exchange
        .oidc()
        .validate_jwt(
            token,
            gatehouse::oidc::id_token::TokenKind::Access,
            None,
            None,
            gatehouse::oidc::jwks::KeySource::TokenEndpoint,
        )
        .await
        .unwrap();
    assert_eq!(verified["sub"], rec.claims.sub.as_str());
    assert_eq!(verified["preferred_username"], "alice");
    assert_eq!(all(&upstream, "x-gatehouse-sub"), [rec.claims.sub.as_str()], "the claim header is ours");
    assert_eq!(all(&upstream, "x-gatehouse-preferred-username"), ["alice"]);
    assert_eq!(all(&upstream, "cookie"), ["theme=dark; lang=en"], "session cookie gone, other cookies kept");
    for gone in ["x-gatehouse-realm-roles", "x-gatehouse-session", "x-forwarded-user", "x-auth-request-email"] {
        assert!(all(&upstream, gone).is_empty(), "{gone} must not reach the upstream");
        assert!(okr.headers_to_remove.iter().any(|r| r == gone), "{gone} in headers_to_remove");
    }
    assert_eq!(all(&upstream, "accept"), ["application/json"], "unrelated headers untouched");
    assert!(
        !okr.headers_to_remove.iter().any(|r| r == "authorization" || r == "x-gatehouse-sub" || r == "cookie"),
        "a header set is never also removed: {:?}",
        okr.headers_to_remove
    );

    // Only the session cookie: the cookie header is removed, not set to "".
    let only = [("cookie", &format!("{COOKIE}={sid}")[..])];
    let r = call(&mut c, CHECK_KEY, check_request("GET", "/", &only)).await.unwrap();
    let okr = ok(&r);
    assert!(okr.headers_to_remove.iter().any(|r| r == "cookie"));
    assert!(all(&envoy_applies(&only, okr), "cookie").is_empty());

    // Envoy with `encode_raw_headers: true`: `header_map` with one entry per header line.
    let raw = HttpRequest {
        method: "GET".into(),
        path: "/app/items".into(),
        header_map: Some(EnvoyHeaderMap {
            headers: [("cookie", "lang=en"), ("cookie", &format!("{COOKIE}={sid}")[..]), ("cookie", "theme=dark")]
                .iter()
                .map(|(k, v)| HeaderValue {
                    key: k.to_string(),
                    value: String::new(),
                    raw_value: v.as_bytes().to_vec(),
                })
                .collect(),
        }),
        ..Default::default()
    };
    let r = call(&mut c, CHECK_KEY, with_http(raw)).await.unwrap();
    let okr = ok(&r);
    let set = |name: &str| {
        okr.headers.iter().filter_map(|h| h.header.as_ref()).find(|h| h.key == name).map(|h| h.value.clone())
    };
    assert_eq!(set("authorization"), Some(format!("Bearer {}", tokens.access_token)));
    assert_eq!(set("cookie").as_deref(), Some("lang=en; theme=dark"));
    s.gate.stop().await;
}

#[tokio::test]
async fn no_session_is_401_json_for_fetch_and_a_login_redirect_for_navigation() {
    let s = setup(Options::default()).await;
    let mut c = client(s.check).await;
    let fetch =
        call(&mut c, CHECK_KEY, check_request("GET", "/app/items", &[("sec-fetch-mode", "cors")])).await.unwrap();
    assert_eq!(fetch.status.as_ref().unwrap().code, tonic::Code::Unauthenticated as i32);
    let d = denied(&fetch);
    assert_eq!(denied_status(d), 401);
    assert_eq!(serde_json::from_str::<Value>(&d.body).unwrap()["error"], "unauthenticated");
    assert_eq!(denied_header(d, "content-type"), Some("application/json"));
    assert_eq!(denied_header(d, "cache-control"), Some("no-store"));

    let unknown = format!("{COOKIE}=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA");
    let forged = call(
        &mut c,
        CHECK_KEY,
        check_request("GET", "/app/items", &[("cookie", &unknown), ("authorization", "Bearer forged")]),
    )
    .await
    .unwrap();
    assert_eq!(denied_status(denied(&forged)), 401, "an unknown session id and a forged Authorization do not pass");

    let nav = call(
        &mut c,
        CHECK_KEY,
        check_request("GET", "/app/page?a=1&b=2", &[("sec-fetch-mode", "navigate"), ("accept", "text/html")]),
    )
    .await
    .unwrap();
    let d = denied(&nav);
    assert_eq!(denied_status(d), 302);
    let loc = denied_header(d, "location").unwrap();
    assert_eq!(loc, format!("{}/auth/login?return_to=%2Fapp%2Fpage%3Fa%3D1%26b%3D2", s.gate.base));
    assert_eq!(denied_header(d, "cache-control"), Some("no-store"));
    // ...and the login it points at starts.
    let login = http().get(loc).send().await.unwrap();
    assert_eq!(login.status(), 303);
    assert!(login.headers()["location"].to_str().unwrap().starts_with(&issuer()));
    s.gate.stop().await;
}

#[tokio::test]
async fn unsafe_methods_need_the_csrf_header_and_our_origin() {
    let s = setup(Options::default()).await;
    let sid = logged_in(&s.gate, "alice").await;
    let mut c = client(s.check).await;
    let cookie = format!("{COOKIE}={sid}");
    let origin = s.gate.base.clone();
    for (why, headers) in [
        ("no X-CSRF", vec![("cookie", cookie.as_str()), ("origin", origin.as_str())]),
        ("foreign Origin", vec![("cookie", &cookie), ("origin", "http://evil.example"), ("x-csrf", "1")]),
        (
            "cross-site fetch",
            vec![("cookie", &cookie), ("origin", &origin), ("x-csrf", "1"), ("sec-fetch-site", "cross-site")],
        ),
    ] {
        let r = call(&mut c, CHECK_KEY, check_request("POST", "/app/items", &headers)).await.unwrap();
        assert_eq!(r.status.as_ref().unwrap().code, tonic::Code::PermissionDenied as i32, "{why}");
        let d = denied(&r);
        assert_eq!(denied_status(d), 403, "{why}");
        assert_eq!(serde_json::from_str::<Value>(&d.body).unwrap()["error"], "csrf", "{why}");
        assert!(denied_header(d, "authorization").is_none());
    }
    let good = [("cookie", cookie.as_str()), ("origin", origin.as_str()), ("x-csrf", "1")];
    let r = call(&mut c, CHECK_KEY, check_request("POST", "/app/items", &good)).await.unwrap();
    assert!(looks_like_jwt(&ok(&r).headers[0].header.as_ref().unwrap().value));
    s.gate.stop().await;
}

#[tokio::test]
async fn a_store_outage_denies_with_503_never_allows() {
    let mut redis = Redis::start().await;
    let s = setup(Options { redis_url: Some(redis.url()), ..Options::default() }).await;
    let sid = logged_in(&s.gate, "alice").await;
    let mut c = client(s.check).await;
    let cookie = format!("{COOKIE}={sid}");
    let req = || check_request("GET", "/app/items", &[("cookie", cookie.as_str())]);
    ok(&call(&mut c, CHECK_KEY, req()).await.unwrap());
    redis.stop().await;
    let r = call(&mut c, CHECK_KEY, req()).await.unwrap();
    assert_eq!(r.status.as_ref().unwrap().code, tonic::Code::Unavailable as i32);
    let d = denied(&r);
    assert_eq!(denied_status(d), 503, "store down: unavailable, not allowed and not logged out");
    assert_eq!(serde_json::from_str::<Value>(&d.body).unwrap()["error"], "store_unavailable");
    assert_eq!(denied_header(d, "retry-after"), Some("5"));
    assert!(!format!("{r:?}").contains("eyJ"), "no token anywhere in the answer");
    s.gate.stop().await;
}

#[tokio::test]
async fn the_check_listener_refuses_unauthenticated_grpc_callers() {
    let s = setup(Options::default()).await;
    let sid = logged_in(&s.gate, "alice").await;
    let mut c = client(s.check).await;
    let cookie = format!("{COOKIE}={sid}");
    let req = || check_request("GET", "/app/items", &[("cookie", cookie.as_str())]);
    for key in [NO_KEY, "wrong", &CHECK_KEY[..CHECK_KEY.len() - 1]] {
        let e = call(&mut c, key, req()).await.expect_err("refused");
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "key {key:?}");
        assert_eq!(e.message(), "caller is not allowed");
    }
    // The same key in the original request's headers (a browser trying) is not a credential.
    let smuggled = check_request("GET", "/", &[("cookie", &cookie), ("x-gatehouse-check-key", CHECK_KEY)]);
    assert_eq!(call(&mut c, "", smuggled).await.expect_err("refused").code(), tonic::Code::PermissionDenied);
    ok(&call(&mut c, CHECK_KEY, req()).await.unwrap());
    // Counted in the check listener's RED series (a gRPC answer is HTTP 200 whatever it says).
    let series = "gatehouse_http_requests_total{face=\"check\",route=\"/envoy.service.auth.v3.Authorization/{*method}\",method=\"POST\",status_class=\"2xx\"}";
    assert_eq!(s.gate.metric(series).await, 5.0, "four refused calls and one check");
    s.gate.stop().await;
}

/// A rustls client presenting `cert` with ALPN `h2`, as Envoy's upstream TLS to a gRPC cluster.
async fn mtls_grpc(port: u16, ca_pem: &str, cert: &gatehouse::pki::Issued) -> AuthorizationClient<Channel> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(cert.cert_pem.as_bytes()).map(|c| c.unwrap()).collect();
    let key = PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(gatehouse::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let channel = Endpoint::from_shared(format!("http://localhost:{port}"))
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let connector = connector.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
                let tls = connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await?;
                assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]), "the check listener offers h2");
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await
        .unwrap();
    AuthorizationClient::new(channel)
}

#[tokio::test]
async fn with_mutual_tls_only_allowed_gateway_identities_may_check() {
    const ENVOY: &str = "spiffe://gatehouse.local/ns/edge/sa/envoy";
    let work = Workdir::new();
    let pki = work.pki();
    let extra = format!(
        "[check]\nlisten = \"127.0.0.1:0\"\ncert = \"{p}/gatehouse.crt\"\nkey = \"{p}/gatehouse.key\"\nclient_ca = \"{p}/ca.crt\"\nallow = [\"{ENVOY}\"]\n",
        p = pki.display()
    );
    let gate = Gate::start(&work, &Options { extra, ..Options::default() }).await;
    let sid = logged_in(&gate, "alice").await;
    let port = gate.running.as_ref().unwrap().check_addr.unwrap().port();
    let ca = work.ca();
    let cookie = format!("{COOKIE}={sid}");
    let req = || check_request("GET", "/app/items", &[("cookie", cookie.as_str())]);
    let mut other =
        mtls_grpc(port, &ca.cert_pem, &client_cert(&ca, vec![gatehouse::pki::San::Uri(POCKETBASE.into())])).await;
    let e = call(&mut other, "", req()).await.expect_err("an identity not on check.allow");
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    let mut envoy =
        mtls_grpc(port, &ca.cert_pem, &client_cert(&ca, vec![gatehouse::pki::San::Uri(ENVOY.into())])).await;
    let r = call(&mut envoy, "", req()).await.unwrap();
    assert!(looks_like_jwt(&ok(&r).headers[0].header.as_ref().unwrap().value));
    let r = call(&mut envoy, "", check_request("GET", "/app/items", &[])).await.unwrap();
    assert_eq!(denied_status(denied(&r)), 401, "allowed gateway, no session");
    gate.stop().await;
}

#[tokio::test]
async fn an_expired_token_is_refreshed_once_for_twenty_concurrent_grpc_checks() {
    let s = setup(Options::short_tokens()).await;
    let sid = logged_in(&s.gate, "bob").await;
    let (rec, before) = session_tokens(&s.gate, &sid).await;
    let admin = KcAdmin::connect().await;
    let c = client(s.check).await;
    tokio::time::sleep(Duration::from_secs(11)).await;
    let cookie = format!("{COOKIE}={sid}");
    let mut tasks = Vec::new();
    for _ in 0..20 {
        // One HTTP/2 connection, 20 concurrent streams: how Envoy's gRPC client calls.
        let (mut c, req) = (c.clone(), check_request("GET", "/app/x", &[("cookie", cookie.as_str())]));
        tasks.push(tokio::spawn(async move {
            let r = call(&mut c, CHECK_KEY, req).await.unwrap();
            ok(&r).headers[0].header.as_ref().unwrap().value.clone()
        }));
    }
    let mut seen = std::collections::HashSet::new();
    for t in tasks {
        seen.insert(t.await.unwrap());
    }
    assert_eq!(seen.len(), 1, "every check carried the one refreshed token");
    assert_ne!(seen.iter().next().unwrap(), &format!("Bearer {}", before.access_token), "the token was refreshed");
    assert_eq!(admin.refresh_events(rec.provider_sid.as_deref().unwrap()).await, 1, "exactly one refresh at Keycloak");
    s.gate.stop().await;
}

/// With neither mutual TLS nor a key (loopback only), the socket is the boundary: a gRPC caller
/// on loopback needs no credential, over h2c.
#[tokio::test]
async fn a_loopback_check_listener_without_credentials_serves_grpc_over_h2c() {
    let work = Workdir::new();
    let extra = "[check]\nlisten = \"127.0.0.1:0\"\n".to_string();
    let gate = Gate::start(&work, &Options { extra, ..Options::default() }).await;
    let sid = logged_in(&gate, "alice").await;
    let mut c = client(gate.running.as_ref().unwrap().check_addr.unwrap()).await;
    let cookie = format!("{COOKIE}={sid}");
    let r = call(&mut c, NO_KEY, check_request("GET", "/", &[("cookie", cookie.as_str())])).await.unwrap();
    assert!(looks_like_jwt(&ok(&r).headers[0].header.as_ref().unwrap().value));
    gate.stop().await;
}
