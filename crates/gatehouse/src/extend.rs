//! The library face: endpoints written in Rust, served by Gatehouse's public listener behind the
//! same rules as the built-in routes — CSRF on unsafe methods, the per-IP rate limit, the header
//! size limit, browser security headers, same-origin reads only, `Cache-Control: no-store`.
//!
//! ```no_run
//! use gatehouse::extend::{Extensions, User};
//! use axum::{Json, routing::get};
//!
//! async fn hello(user: User) -> Json<serde_json::Value> {
//!     Json(serde_json::json!({ "hello": user.claims().sub }))
//! }
//!
//! # async fn run(config: gatehouse::config::Config) -> Result<(), gatehouse::StartError> {
//! let ext = Extensions::new().route("/api/hello", get(hello));
//! let running = gatehouse::start_with(config, gatehouse::system_clock(), ext).await?;
//! running.until_signal().await;
//! # Ok(()) }
//! ```
//!
//! A handler takes [`User`]: a request without a live session never reaches it (it gets the
//! standard `401 {"error":"unauthenticated"}`), and the session is resolved — refreshed if due —
//! once per request through the core. [`User::get_json`] calls a configured `[[routes]]`
//! upstream as that user (the route's relay, TLS and limits). Handlers never see the session id,
//! the access token or the refresh token: the relay is held privately and only written into the
//! upstream request.
//!
//! Stability: this module, [`crate::start_with`] and the re-exported [`UserClaims`] are the
//! public API for extensions; everything else in the crate is internal and may change.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::MethodRouter;

use crate::config::Relay;
use crate::error::ApiError;
pub use crate::oidc::UserClaims;
use crate::public::PublicState;
use crate::public::proxy::json_call::CallFailure;
use crate::session::SessionId;

/// Endpoints to add to the public listener. Paths must lie under `/api/` and not under a
/// configured route's prefix or `/api/views/` (checked at start-up).
#[derive(Default)]
pub struct Extensions {
    routes: Vec<(String, MethodRouter)>,
}

impl Extensions {
    /// No endpoints.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add an endpoint (axum syntax: `get(handler).post(other)`, path parameters as `{id}`).
    pub fn route(mut self, path: &str, handler: MethodRouter) -> Self {
        self.routes.push((path.to_owned(), handler));
        self
    }

    /// The endpoints' path templates.
    pub(crate) fn paths(&self) -> impl Iterator<Item = &str> {
        self.routes.iter().map(|(path, _)| path.as_str())
    }

    /// The router of all endpoints, or why a path may not be used.
    pub(crate) fn into_router(self, route_prefixes: &[String]) -> Result<Router, String> {
        let mut router = Router::new();
        let mut seen: Vec<String> = Vec::new();
        for (path, handler) in self.routes {
            let ok = path.starts_with("/api/")
                && path.len() > "/api/".len()
                && !path.starts_with(crate::public::views::config::VIEWS_PREFIX)
                && !route_prefixes.iter().any(|p| path.starts_with(p.as_str()) || path == p.trim_end_matches('/'))
                && !seen.contains(&path);
            if !ok {
                return Err(format!(
                    "extension path `{path}` must be under /api/, unique, and not under /api/views/ or a [[routes]] prefix"
                ));
            }
            seen.push(path.clone());
            router = router.route(&path, handler);
        }
        Ok(router)
    }
}

/// The boundary rules of extension endpoints that the public router's own layers do not already
/// apply: same-origin reads only, and `no-store` on every answer (user data).
pub(crate) async fn guard(req: Request, next: Next) -> Response {
    if let Some(refused) = crate::public::csrf::cross_origin_read(req.headers()) {
        return refused.into_response();
    }
    let mut resp = next.run(req).await;
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// The signed-in user of a request: an extractor. Without a live session the request is answered
/// `401` before the handler runs.
pub struct User {
    claims: UserClaims,
    session_expires_at: i64,
    access_expires_at: i64,
    state: Arc<PublicState>,
    id: SessionId,
    access_token: Option<String>,
    peer: SocketAddr,
    headers: HeaderMap,
}

/// Never prints the session id or the token.
impl fmt::Debug for User {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("User").field("sub", &self.claims.sub).finish_non_exhaustive()
    }
}

/// Why an upstream call made by an extension failed. Never carries upstream text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("upstream call failed: {reason}")]
pub struct UpstreamError {
    /// `timeout`, `too_large`, `upstream_denied`, `upstream_not_found`, `upstream_refused`,
    /// `upstream_error`, `not_json`, `unreachable`, `upstream_busy` or `unknown_route`.
    pub reason: &'static str,
}

/// An `UpstreamError` returned from a handler answers `502 {"error":"bad_gateway"}` (or `504` for
/// a timeout), never the upstream's status or body.
impl IntoResponse for UpstreamError {
    fn into_response(self) -> Response {
        tracing::warn!(reason = self.reason, "extension upstream call failed");
        if self.reason == "timeout" { ApiError::UpstreamTimeout } else { ApiError::BadGateway }.into_response()
    }
}

impl User {
    /// The user's identity (as `/auth/me` shows it).
    pub fn claims(&self) -> &UserClaims {
        &self.claims
    }

    /// When the session ends unless used again (Unix seconds): the earlier of idle and absolute expiry.
    pub fn session_expires_at(&self) -> i64 {
        self.session_expires_at
    }

    /// When the current access token expires (Unix seconds); the core refreshes it before then.
    pub fn access_expires_at(&self) -> i64 {
        self.access_expires_at
    }

    /// `GET` a path relative to the upstream URL of the `[[routes]]` entry with this prefix, as
    /// this user, and parse the JSON answer (at most `max_bytes`, within the route's timeout).
    /// `path` is sent as given: build it from trusted parts, never from unchecked request input.
    pub async fn get_json(
        &self,
        route: &str,
        path: &str,
        max_bytes: usize,
    ) -> Result<serde_json::Value, UpstreamError> {
        let proxy = &self.state.proxy;
        let r = proxy.route_by_prefix(route).ok_or(UpstreamError { reason: "unknown_route" })?;
        if path.starts_with('/')
            || crate::public::proxy::path::check(&format!("/{}", path.split('?').next().unwrap_or_default())).is_err()
        {
            return Err(UpstreamError { reason: "bad_path" });
        }
        let relay = match r.relay() {
            Relay::Bearer => format!("Bearer {}", self.access_token.as_deref().unwrap_or_default()),
            Relay::Session => self.id.expose().to_owned(),
        };
        let timeout: Duration = r.timeout();
        let trusted = &self.state.settings.trusted_proxies;
        proxy
            .get_json(route, path, &relay, self.peer, &self.headers, trusted, timeout, max_bytes)
            .await
            .map_err(|e: CallFailure| UpstreamError { reason: e.reason() })
    }
}

impl<S: Send + Sync> FromRequestParts<S> for User {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let state = parts.extensions.get::<Arc<PublicState>>().cloned().ok_or(ApiError::Internal)?;
        let peer = parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0).ok_or(ApiError::Internal)?;
        let id = crate::public::cookies::read(&parts.headers, &state.cookie.name)
            .and_then(|v| SessionId::parse(&v))
            .ok_or(ApiError::Unauthenticated)?;
        // The token is decrypted only when some route relays it.
        let resolved = state.core.exchange.resolve(&id, state.settings.any_bearer_route).await?;
        let r = &resolved.record;
        Ok(Self {
            claims: r.claims.clone(),
            session_expires_at: r.expires_at(),
            access_expires_at: r.access_expires_at,
            access_token: resolved.access_token,
            headers: parts.headers.clone(),
            state,
            id,
            peer,
        })
    }
}
