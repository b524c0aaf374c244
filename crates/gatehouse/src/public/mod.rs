//! The North-South face: what browsers reach through the load balancer. Login, callback,
//! logout, `/auth/me`, health, and static files — never an internal route.

pub(crate) mod auth;
mod backchannel;
pub mod cookies;
pub mod csrf;
mod limits;
mod login_state;
pub mod proxy;
pub mod return_to;
pub mod views;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, any, get, post};
use tower_http::services::ServeDir;

use crate::Core;
use crate::config::{Config, CookieSettings};
use crate::error::ApiError;
use crate::pipeline::{Pipeline, Steps, Templates, mark_sensitive};

/// Every public route: (method, path). The router is checked against this table in tests, and
/// the CSRF test walks it, so a new route cannot skip CSRF by accident.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/auth/login"),
    ("POST", "/auth/login"),
    ("GET", "/auth/callback"),
    ("POST", "/auth/logout"),
    ("GET", "/auth/me"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("POST", "/auth/backchannel-logout"),
];
// Plus `/api/{*rest}`, the proxy: configured routes, not fixed ones (its CSRF test uses `/api/anything`).

/// Total size of request headers we accept (SECURITY 24).
const MAX_HEADER_BYTES: usize = 16 * 1024;
/// The routes whose body Gatehouse reads itself: read whole, before the handler, within
/// `BODY_DEADLINE` (proxied and extension bodies stream and are not bounded here).
const BODY_ROUTES: &[&str] = &["/auth/login", "/auth/backchannel-logout"];
/// How long an anonymous client may take to send such a body (a few KiB at most). Without a
/// deadline a client trickling one byte every few seconds holds its connection for hours (hyper's
/// header timeout ends with the headers).
const BODY_DEADLINE: Duration = Duration::from_secs(10);

/// What the public face needs from the configuration, derived once at start-up: handlers never
/// read the configuration itself.
pub struct Settings {
    /// Peers whose `X-Forwarded-For` names the client (rate limits, audit).
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// `oidc.password_login`: `POST /auth/login` answers 404 when off.
    pub password_login: bool,
    /// Where the provider sends the browser after logout.
    pub post_logout_redirect_uri: String,
    /// Whether some route relays the access token (only then is it decrypted for extensions).
    pub any_bearer_route: bool,
    /// `public.max_body_bytes`: the largest request body a handler reads.
    pub max_body_bytes: usize,
}

impl Settings {
    pub fn from_config(config: &Config) -> Self {
        Self {
            trusted_proxies: config.public.trusted_proxies.clone(),
            password_login: config.oidc.password_login,
            post_logout_redirect_uri: config.post_logout_redirect_uri(),
            any_bearer_route: config.routes.iter().any(|r| r.relay == crate::config::Relay::Bearer),
            max_body_bytes: config.public.max_body_bytes,
        }
    }
}

pub struct PublicState {
    pub core: Arc<Core>,
    pub settings: Settings,
    pub cookie: CookieSettings,
    pub origin: String,
    pub proxy: proxy::Proxy,
    /// Composed views (`[[views]]`), served under `/api/views/`.
    pub views: views::Views,
}

/// The public face's fixed routes (views add theirs when configured). `ROUTES` lists the same,
/// by method; `route_paths` lets a test hold the two together both ways.
fn fixed_routes() -> Vec<(&'static str, MethodRouter<Arc<PublicState>>)> {
    vec![
        ("/auth/login", get(auth::login_start).post(auth::password_login)),
        ("/auth/callback", get(auth::callback)),
        ("/auth/logout", post(auth::logout)),
        ("/auth/me", get(auth::me)),
        ("/auth/backchannel-logout", post(backchannel::backchannel_logout)),
        ("/healthz", get(healthz)),
        ("/readyz", get(readyz)),
        // Everything under /api/ is the proxy's (a JSON 404 for unknown routes), never a static file.
        ("/api/{*rest}", any(proxy::handle)),
    ]
}

/// The paths the public router serves itself, as written in the router (`/api/{*rest}` included).
pub fn route_paths() -> Vec<&'static str> {
    fixed_routes().into_iter().map(|(path, _)| path).collect()
}

/// The public face: its pipeline (observe → header guard → rate limit → CSRF) in front of the
/// router, with any extension endpoints (`crate::extend`); fails if a route's TLS files cannot be
/// used or an extension path is not allowed.
pub fn router(
    core: Arc<Core>,
    config: &Config,
    extensions: crate::extend::Extensions,
) -> Result<Pipeline<PublicState>, proxy::RouteError> {
    let proxy = proxy::Proxy::new(config)?;
    let views = views::Views::new(&config.views, &proxy)
        .map_err(|problem| proxy::RouteError { prefix: "/api/views/".into(), problem })?;
    let state = Arc::new(PublicState {
        settings: Settings::from_config(config),
        cookie: config.cookie(),
        origin: config.public_origin(),
        proxy,
        views,
        core: core.clone(),
    });
    spawn_limit_cleanup(&state);
    let mut routes = fixed_routes();
    if !state.views.is_empty() {
        // More specific than `/api/{*rest}`: views own `/api/views/` (no route may sit there).
        routes.push(("/api/views/{*rest}", get(views::handle)));
    }
    let mut templates = Templates::default();
    let mut router = Router::new();
    for (path, handler) in routes {
        templates.add(path);
        router = router.route(path, handler);
    }
    router = match &config.public.static_dir {
        Some(dir) => router.fallback_service(ServeDir::new(dir).fallback(get(not_found).post(not_found))),
        None => router.fallback(not_found),
    };
    let mut router: Router =
        router.method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed }).with_state(state.clone());
    for path in extensions.paths() {
        templates.add(path);
    }
    let prefixes: Vec<String> = config.routes.iter().map(|r| r.prefix.clone()).collect();
    let ext = extensions
        .into_router(&prefixes)
        .map_err(|problem| proxy::RouteError { prefix: "extensions".into(), problem })?;
    // Extension endpoints sit behind every step of the pipeline (CSRF, rate limit, header guard),
    // plus their own guard (same-origin reads, no-store) and the state their `User` extractor reads.
    router = router.merge(ext.layer(middleware::from_fn(crate::extend::guard)).layer(axum::Extension(state.clone())));
    let observe = core.observer(crate::metrics::Face::public);
    Ok(Pipeline::new(state, router, observe, templates))
}

/// Why a body Gatehouse reads itself was refused before its handler ran.
pub enum BodyRefused {
    TooLarge,
    Unreadable,
    Late,
}

impl BodyRefused {
    fn into_api_error(self) -> ApiError {
        match self {
            Self::TooLarge => ApiError::PayloadTooLarge,
            Self::Unreadable => ApiError::bad_request("invalid_request", "the request body could not be read"),
            Self::Late => ApiError::RequestTimeout,
        }
    }
}

/// Read the request body whole, at most `limit` bytes within `deadline`, and put it back in
/// memory for the handler's extractor.
async fn read_body_within(req: &mut Request, limit: usize, deadline: Duration) -> Result<(), BodyRefused> {
    use http_body_util::BodyExt as _;
    let body = std::mem::replace(req.body_mut(), axum::body::Body::empty());
    match tokio::time::timeout(deadline, http_body_util::Limited::new(body, limit).collect()).await {
        Ok(Ok(read)) => {
            *req.body_mut() = axum::body::Body::from(read.to_bytes());
            Ok(())
        }
        Ok(Err(e)) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => Err(BodyRefused::TooLarge),
        Ok(Err(_)) => Err(BodyRefused::Unreadable),
        Err(_) => {
            tracing::info!(path = req.uri().path(), "request body not received within the deadline");
            Err(BodyRefused::Late)
        }
    }
}

impl Steps for PublicState {
    /// Oversized headers are refused before any handler parses them; then the per-IP limit and
    /// CSRF.
    async fn admit(&self, req: &mut Request) -> Option<Response> {
        let size: usize = req.headers().iter().map(|(k, v)| k.as_str().len() + v.len() + 4).sum();
        if size > MAX_HEADER_BYTES {
            let body = serde_json::json!({"error": "headers_too_large", "message": "request headers exceed 16 KiB"});
            return Some((StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, axum::Json(body)).into_response());
        }
        // Before anything can log them: secrets are redacted from `Debug` output.
        mark_sensitive(req.headers_mut(), &[header::COOKIE, header::AUTHORIZATION]);
        axum::extract::DefaultBodyLimit::max(self.settings.max_body_bytes).apply(req);
        if let Some(refused) = limits::refusal(self, req.uri().path(), req.headers(), req.extensions()).await {
            return Some(refused);
        }
        if let Some(refused) = csrf::refusal(self, req) {
            return Some(refused);
        }
        if req.method() == axum::http::Method::POST && BODY_ROUTES.contains(&req.uri().path()) {
            let Err(refused) = read_body_within(req, self.settings.max_body_bytes, BODY_DEADLINE).await else {
                return None;
            };
            // The provider's call keeps its own error format (Back-Channel Logout §2.8: 400).
            return Some(if req.uri().path() == "/auth/backchannel-logout" {
                backchannel::body_refused(refused)
            } else {
                refused.into_api_error().into_response()
            });
        }
        None
    }

    /// Every answer gets the browser-hardening headers, refusals included.
    fn finish(&self, resp: &mut Response) {
        mark_sensitive(resp.headers_mut(), &[header::SET_COOKIE]);
        security_headers(resp);
    }
}

fn spawn_limit_cleanup(state: &Arc<PublicState>) {
    let weak = Arc::downgrade(state);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tick.tick().await;
            let Some(state) = weak.upgrade() else { break };
            state.core.limiter.retain_recent();
        }
    });
}

async fn not_found() -> ApiError {
    ApiError::NotFound
}

async fn healthz() -> impl IntoResponse {
    ([(header::CACHE_CONTROL, "no-store")], axum::Json(serde_json::json!({"status": "ok"})))
}

/// Ready = the store answers and the provider's metadata was loaded once. A later provider outage
/// does not take the replica out: sessions with valid tokens keep working.
async fn readyz(State(state): State<Arc<PublicState>>) -> Response {
    let (ready, body) = state.core.readiness().await;
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, [(header::CACHE_CONTROL, "no-store")], axum::Json(body)).into_response()
}

/// The browser-hardening headers, on every answer.
fn security_headers(resp: &mut Response) {
    // A proxied route that keeps its upstream's security headers gets ours only where it sent none.
    let keep = resp.extensions().get::<proxy::UpstreamSecurityHeaders>().is_some();
    let h = resp.headers_mut();
    // `HeaderName` constants, not strings: a string name is parsed again on every insert.
    for (name, value) in [
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
    ] {
        if !keep || !h.contains_key(&name) {
            h.insert(name, HeaderValue::from_static(value));
        }
    }
    // The demo front end needs nothing more; a front end with other needs sets its own policy.
    if !h.contains_key(header::CONTENT_SECURITY_POLICY) {
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(
                "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'; object-src 'none'",
            ),
        );
    }
}
