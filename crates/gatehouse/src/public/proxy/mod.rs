//! The API proxy: `/api/<route>/...` → an internal service, as the signed-in user (DESIGN §3).
//! The session is resolved through the one exchange core; the upstream gets either the access
//! token (`relay = "bearer"`) or the session id to exchange itself (`relay = "session"`), never the
//! browser's cookie. Bodies, SSE and WebSocket upgrades stream through untouched, and end when
//! the session does (re-checked every `session_recheck`). Responses carry Gatehouse's own browser
//! security headers (`response_headers.rs`).

pub(crate) mod headers;
pub mod json_call;
pub mod path;
mod response_headers;
mod stream;

pub use response_headers::UpstreamSecurityHeaders;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use http_body_util::{BodyExt, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use ipnet::IpNet;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::{PublicState, cookies};
use crate::config::{Config, Relay, RouteConfig};
use crate::error::ApiError;
use crate::metrics::RouteOutcome;
use crate::session::SessionId;

/// One configured route with its own connection pool.
struct Route {
    prefix: String,
    /// The prefix as the metrics label of the request (shared, not copied per request).
    label: Arc<str>,
    /// The route's metric handles, made on its first request: looking a label set up in a
    /// family allocates its strings every time.
    metrics: std::sync::OnceLock<RouteMetrics>,
    /// `scheme://authority` of the upstream.
    origin: String,
    /// The upstream path that replaces the prefix (ends in `/`).
    base_path: String,
    relay: Relay,
    timeout: Duration,
    max_body_bytes: usize,
    /// Requests (and streams, and tunnels) in flight at once; over it, 503 rather than letting one
    /// user's SSE streams exhaust file descriptors here and upstream.
    in_flight: Arc<tokio::sync::Semaphore>,
    /// How often a WebSocket tunnel or a streaming response re-checks its session, so a logout
    /// or revocation ends it.
    session_recheck: Duration,
    /// Which browser headers reach the upstream.
    request_headers: headers::RequestHeaderPolicy,
    /// The route keeps the upstream's browser security headers instead of Gatehouse's.
    upstream_security_headers: bool,
    client: Client<HttpsConnector<HttpConnector>, Body>,
}

/// Pre-made handles of one route's series (each a shared atomic, like the family's own).
struct RouteMetrics {
    ok: prometheus_client::metrics::counter::Counter,
    client_error: prometheus_client::metrics::counter::Counter,
    server_error: prometheus_client::metrics::counter::Counter,
    upgraded: prometheus_client::metrics::counter::Counter,
    upstream_duration: prometheus_client::metrics::histogram::Histogram,
}

impl RouteMetrics {
    fn new(m: &crate::metrics::Metrics, prefix: &str) -> Self {
        use crate::metrics::ProxyOutcome as P;
        let proxied = |class: P| m.proxied.get_or_create(&RouteOutcome::new(prefix, class)).clone();
        Self {
            ok: proxied(P::Ok),
            client_error: proxied(P::ClientError),
            server_error: proxied(P::ServerError),
            upgraded: proxied(P::Upgraded),
            upstream_duration: m
                .upstream_duration
                .get_or_create(&crate::metrics::HttpDurationLabels {
                    face: crate::metrics::Face::public,
                    route: Arc::from(prefix),
                })
                .clone(),
        }
    }
}

/// A route whose TLS files cannot be used; start-up stops on it.
#[derive(Debug, thiserror::Error)]
#[error("route {prefix}: {problem}")]
pub struct RouteError {
    pub(crate) prefix: String,
    pub(crate) problem: String,
}

pub struct Proxy {
    /// Longest prefix first, so the most specific route wins.
    routes: Vec<Route>,
    /// `X-Forwarded-Host` / `-Proto` values, from `public.external_url`, made once.
    forwarded_host: HeaderValue,
    forwarded_proto: HeaderValue,
}

impl Proxy {
    pub fn new(config: &Config) -> Result<Self, RouteError> {
        let mut routes: Vec<Route> = config.routes.iter().map(Route::new).collect::<Result<_, _>>()?;
        routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        let ext = &config.public.external_url;
        let host = match ext.port() {
            Some(p) => format!("{}:{p}", ext.host_str().unwrap_or_default()),
            None => ext.host_str().unwrap_or_default().to_owned(),
        };
        Ok(Self {
            routes,
            forwarded_host: HeaderValue::from_str(&host).unwrap_or(HeaderValue::from_static("localhost")),
            forwarded_proto: HeaderValue::from_static(if ext.scheme() == "https" { "https" } else { "http" }),
        })
    }

    fn route_for(&self, path: &str) -> Option<&Route> {
        self.routes.iter().find(|r| path.starts_with(&r.prefix))
    }
}

impl Route {
    fn new(c: &RouteConfig) -> Result<Self, RouteError> {
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(c.connect_timeout));
        http.set_nodelay(true);
        http.enforce_http(false);
        let fail = |problem: String| RouteError { prefix: c.prefix.clone(), problem };
        let tls = upstream_tls(c).map_err(fail)?;
        let builder = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls);
        // An https route never falls back to plain http, and an http route never speaks TLS.
        let connector = if c.upstream.scheme() == "https" {
            builder.https_only().enable_http1().wrap_connector(http)
        } else {
            builder.https_or_http().enable_http1().wrap_connector(http)
        };
        // The pool needs a timer, or idle connections are only noticed when next checked out.
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(64)
            .build(connector);
        Ok(Self {
            prefix: c.prefix.clone(),
            label: Arc::from(c.prefix.as_str()),
            metrics: std::sync::OnceLock::new(),
            origin: c.upstream.origin().ascii_serialization(),
            base_path: c.upstream.path().to_owned(),
            relay: c.relay,
            timeout: c.timeout,
            max_body_bytes: c.max_body_bytes,
            in_flight: Arc::new(tokio::sync::Semaphore::new(c.max_in_flight)),
            session_recheck: c.session_recheck,
            request_headers: match &c.request_headers {
                Some(names) => {
                    headers::RequestHeaderPolicy::AllowOnly(names.iter().map(|n| n.to_ascii_lowercase()).collect())
                }
                None => headers::RequestHeaderPolicy::DenyIdentity,
            },
            upstream_security_headers: c.upstream_security_headers,
            client,
        })
    }
}

/// The TLS client configuration of a route: its own CA (never the system's roots) and, if
/// configured, Gatehouse's client certificate. For an http route: an empty one, never used.
fn upstream_tls(c: &RouteConfig) -> Result<rustls::ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let mut roots = rustls::RootCertStore::empty();
    if let Some(ca) = &c.ca_file {
        let certs = CertificateDer::pem_file_iter(ca)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("ca_file {}: {e}", ca.display()))?;
        for cert in certs {
            roots.add(cert).map_err(|e| format!("ca_file {}: {e}", ca.display()))?;
        }
        if roots.is_empty() {
            return Err(format!("ca_file {}: no certificate", ca.display()));
        }
    }
    let builder = builder.with_root_certificates(roots);
    // No ALPN here: the connector sets `http/1.1` itself (and panics if it is preset).
    let config = match (&c.client_cert_file, &c.client_key_file) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("client_cert_file {}: {e}", cert.display()))?;
            let key =
                PrivateKeyDer::from_pem_file(key).map_err(|e| format!("client_key_file {}: {e}", key.display()))?;
            builder.with_client_auth_cert(chain, key).map_err(|e| format!("client certificate: {e}"))?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(config)
}

/// `ANY /api/...`: route, check, authenticate, forward.
pub async fn handle(
    State(st): State<Arc<PublicState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    let proxy = &st.proxy;
    let Some(route) = proxy.route_for(req.uri().path()) else {
        return ApiError::NotFound.into_response();
    };
    let metrics = route.metrics.get_or_init(|| RouteMetrics::new(&st.core.metrics, &route.prefix));
    let mut outcome = match forward(&st, route, metrics, peer, req).await {
        Ok(resp) => resp,
        Err(e) => e.into_response(),
    };
    match outcome.status().as_u16() {
        101 => &metrics.upgraded,
        s if s < 400 => &metrics.ok,
        s if s < 500 => &metrics.client_error,
        _ => &metrics.server_error,
    }
    .inc();
    outcome.extensions_mut().insert(crate::telemetry::RouteLabel(route.label.clone()));
    outcome
}

/// The proxy in five steps: refuse what must not pass, authenticate, build the upstream request,
/// send it under the route's timeout, and hand back the answer (or a tunnel for a WebSocket).
async fn forward(
    st: &PublicState,
    route: &Route,
    metrics: &RouteMetrics,
    peer: SocketAddr,
    mut req: Request,
) -> Result<Response, ApiError> {
    let upgrade = refuse_early(st, route, &req)?;

    let id = cookies::read(req.headers(), &st.cookie.name)
        .and_then(|v| SessionId::parse(&v))
        .ok_or(ApiError::Unauthenticated)?;
    let resolved = st.core.exchange.resolve(&id, route.relay == Relay::Bearer).await?;
    let known = resolved.live_check();
    let permit = route.in_flight.clone().try_acquire_owned().map_err(|_| {
        tracing::warn!(route = %route.prefix, "too many requests in flight to this upstream");
        ApiError::UpstreamBusy
    })?;
    let bearer;
    let relay = match route.relay {
        Relay::Bearer => {
            bearer = zeroize::Zeroizing::new(format!("Bearer {}", resolved.access_token.ok_or(ApiError::Internal)?));
            bearer.as_str()
        }
        Relay::Session => id.expose(),
    };

    // Take the client's side of a possible upgrade before the request is consumed.
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let mut upstream_req = upstream_request(st, route, peer, req, upgrade, relay)?;

    // The client span of the upstream call (sampled requests only); its context replaces any
    // `traceparent` the browser sent.
    let span = if !crate::telemetry::tracing_request() {
        tracing::Span::none()
    } else {
        tracing::info_span!(
            "upstream",
            otel.name = format!("{} {}", upstream_req.method(), route.prefix),
            otel.kind = "client",
            otel.status_code = tracing::field::Empty,
            http.request.method = upstream_req.method().as_str(),
            server.address = upstream_req.uri().host().unwrap_or_default(),
            server.port = upstream_req.uri().port_u16(),
            gatehouse.route = route.prefix.as_str(),
            http.response.status_code = tracing::field::Empty,
        )
    };
    crate::telemetry::inject(&st.core.propagation, &span, upstream_req.headers_mut());
    let started = std::time::Instant::now();
    let sent = tracing::Instrument::instrument(route.client.request(upstream_req), span.clone());
    let answered = tokio::time::timeout(route.timeout, sent).await;
    metrics.upstream_duration.observe(started.elapsed().as_secs_f64());
    match &answered {
        Ok(Ok(r)) => {
            span.record("http.response.status_code", r.status().as_u16());
            if r.status().is_server_error() {
                span.record("otel.status_code", "ERROR");
            }
        }
        _ => {
            span.record("otel.status_code", "ERROR");
        }
    }
    let mut resp = match answered {
        Err(_) => {
            tracing::warn!(route = %route.prefix, "upstream did not answer in time");
            return Err(ApiError::UpstreamTimeout);
        }
        Ok(Err(e)) => return Err(upstream_error(route, &e)),
        Ok(Ok(resp)) => resp,
    };
    tracing::debug!(route = %route.prefix, status = resp.status().as_u16(), ms = started.elapsed().as_millis() as u64, "proxied");

    let upgraded = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    headers::for_browser(resp.headers_mut(), upgraded);
    response_headers::apply(resp.headers_mut(), route.upstream_security_headers);
    if route.upstream_security_headers {
        resp.extensions_mut().insert(UpstreamSecurityHeaders);
    }
    if upgraded {
        // The upstream switched protocols nobody asked for.
        let client_upgrade = client_upgrade.ok_or(ApiError::BadGateway)?;
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        let (prefix, every) = (route.prefix.clone(), route.session_recheck);
        let (client, upstream) = (client_upgrade, upstream_upgrade);
        tokio::spawn(tunnel(prefix, every, st.core.exchange.clone(), (id, known), client, upstream, permit));
        return Ok(resp.map(Body::new));
    }
    // The permit lives as long as the response body (an SSE stream holds it until it ends), and
    // a body still streaming after `session_recheck` ends when the session does.
    let exchange = st.core.exchange.clone();
    Ok(resp.map(move |body| stream::rechecked(body, route.session_recheck, exchange, id, known, &route.label, permit)))
}

/// Everything refused before the session is even looked at. Returns whether the request is a
/// WebSocket handshake.
fn refuse_early(st: &PublicState, route: &Route, req: &Request) -> Result<bool, ApiError> {
    // TRACE would echo the relay header back to page script; CONNECT makes a tunnel to anywhere.
    if matches!(req.method().as_str(), "TRACE" | "TRACK" | "CONNECT") {
        return Err(ApiError::MethodNotAllowed);
    }
    if let Err(why) = path::check(req.uri().path()) {
        return Err(ApiError::bad_request("bad_path", format!("path refused: {why}")));
    }
    let h = req.headers();
    if let Some(refused) = super::csrf::cross_origin_read(h) {
        return Err(refused);
    }
    // CORS preflights are never granted; an upstream's CORS answer would open it to other origins.
    if req.method() == Method::OPTIONS && h.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD) {
        return Err(ApiError::Forbidden("cross_origin", "cross-origin requests are not allowed".into()));
    }
    let upgrade = req.method() == Method::GET && headers::wants_websocket(h);
    // A WebSocket handshake is a GET, so the CSRF check lets it pass: check its Origin here
    // (cross-site WebSocket hijacking). Browsers always send Origin on WebSocket handshakes.
    if upgrade && h.get(header::ORIGIN).is_some_and(|o| o.as_bytes() != st.origin.as_bytes()) {
        return Err(ApiError::Forbidden("cross_origin", "WebSocket from another origin".into()));
    }
    if let Some(len) = h.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        && len > route.max_body_bytes as u64
    {
        return Err(ApiError::PayloadTooLarge);
    }
    Ok(upgrade)
}

/// The request as the upstream gets it: prefix replaced, headers filtered, our `X-Forwarded-*`
/// and the relay header added, the body streamed through a size limit.
fn upstream_request(
    st: &PublicState,
    route: &Route,
    peer: SocketAddr,
    req: Request,
    upgrade: bool,
    relay: &str,
) -> Result<axum::http::Request<Body>, ApiError> {
    let raw_path = req.uri().path();
    let rest = &raw_path[route.prefix.len()..];
    let query = req.uri().query().map(|q| format!("?{q}")).unwrap_or_default();
    let uri: Uri = format!("{}{}{rest}{query}", route.origin, route.base_path)
        .parse()
        .map_err(|_| ApiError::bad_request("bad_path", "path cannot be forwarded"))?;

    let proxy = &st.proxy;
    let mut out = headers::for_upstream(req.headers(), upgrade, &route.request_headers);
    let trusted = &st.settings.trusted_proxies;
    if let Ok(v) = HeaderValue::from_str(&forwarded_for(req.headers(), peer, trusted)) {
        out.insert("x-forwarded-for", v);
    }
    out.insert("x-forwarded-proto", proxy.forwarded_proto.clone());
    out.insert("x-forwarded-host", proxy.forwarded_host.clone());
    if let Ok(v) = HeaderValue::from_str(route.prefix.trim_end_matches('/')) {
        out.insert("x-forwarded-prefix", v);
    }
    let mut relay = HeaderValue::from_str(relay).map_err(|_| ApiError::Internal)?;
    relay.set_sensitive(true);
    match route.relay {
        Relay::Bearer => out.insert(header::AUTHORIZATION, relay),
        Relay::Session => out.insert("x-gatehouse-session", relay),
    };

    let (parts, body) = req.into_parts();
    let body = Body::new(Limited::new(body, route.max_body_bytes).map_err(axum::Error::new));
    let mut builder =
        axum::http::Request::builder().method(parts.method).uri(uri).version(axum::http::Version::HTTP_11);
    if let Some(h) = builder.headers_mut() {
        *h = out;
    }
    builder.body(body).map_err(|_| ApiError::Internal)
}

/// A WebSocket after the 101: bytes both ways until either side closes, or the session ends
/// (re-checked every `session_recheck`: logout, expiry, revocation; a store outage does not close
/// it, but a back-channel logout this replica holds for the session does, store or no store).
async fn tunnel(
    prefix: String,
    every: Duration,
    exchange: Arc<crate::exchange::Exchange>,
    (id, known): (SessionId, crate::exchange::LiveCheck),
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let _permit = permit;
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::info!(route = %prefix, error = %e, "upgrade failed");
            return;
        }
    };
    let (mut a, mut b) = (TokioIo::new(client), TokioIo::new(upstream));
    let copy = tokio::io::copy_bidirectional(&mut a, &mut b);
    tokio::pin!(copy);
    let mut recheck = tokio::time::interval(every);
    recheck.tick().await;
    loop {
        tokio::select! {
            ended = &mut copy => {
                if let Err(e) = ended {
                    tracing::debug!(route = %prefix, error = %e, "tunnel ended");
                }
                return;
            }
            _ = recheck.tick() => {
                if matches!(exchange.still_live(&id, &known).await, Err(crate::exchange::ExchangeError::InvalidSession)) {
                    tracing::info!(route = %prefix, "session ended: tunnel closed");
                    return;
                }
            }
        }
    }
}

/// `X-Forwarded-For` for the upstream: the chain from trusted proxies, plus our peer.
fn forwarded_for(headers: &axum::http::HeaderMap, peer: SocketAddr, trusted: &[IpNet]) -> String {
    let peer_ip = peer.ip();
    if !trusted.iter().any(|n| n.contains(&peer_ip)) {
        return peer_ip.to_string();
    }
    let chain: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|s| s.parse::<std::net::IpAddr>().is_ok())
        .collect();
    let mut out = chain.join(", ");
    if !out.is_empty() {
        out.push_str(", ");
    }
    out.push_str(&peer_ip.to_string());
    out
}

/// Who is at fault: the body limit is the client's, anything else the upstream's.
fn upstream_error(route: &Route, e: &hyper_util::client::legacy::Error) -> ApiError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err.is::<http_body_util::LengthLimitError>() {
            return ApiError::PayloadTooLarge;
        }
        source = err.source();
    }
    if e.is_connect() {
        tracing::warn!(route = %route.prefix, error = %e, "upstream unreachable");
    } else {
        tracing::warn!(route = %route.prefix, error = %e, "upstream request failed");
    }
    ApiError::BadGateway
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_for_trusts_only_configured_proxies() {
        let mut h = axum::http::HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("1.2.3.4, not-an-ip"));
        let peer: SocketAddr = "10.0.0.7:5000".parse().unwrap();
        assert_eq!(forwarded_for(&h, peer, &[]), "10.0.0.7", "untrusted peer: the header is dropped");
        let trusted = vec!["10.0.0.0/8".parse().unwrap()];
        assert_eq!(forwarded_for(&h, peer, &trusted), "1.2.3.4, 10.0.0.7");
    }
}
