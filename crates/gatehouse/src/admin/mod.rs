//! The admin face (loopback by default): Prometheus metrics, health, and session administration
//! (list a user's sessions, revoke one, a user's, or all). Never mounted on the public listener.
//! Listings show hash prefixes only, never session ids or tokens.
//!
//! Two tiers: `/metrics`, `/healthz` and `/readyz` carry nothing secret and may be reached from the
//! network (in Kubernetes the kubelet and Prometheus call the pod IP). The session API under
//! `/admin/v1/` can end every session, so with `admin.token_file` set (required off loopback) it
//! answers only `Authorization: Bearer <token>`, compared in constant time.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use serde_json::json;

use crate::Core;
use crate::crypto::{ct_eq, sha256};
use crate::error::ApiError;
use crate::exchange::{RevokeError, Selector};
use crate::session::{SessionKey, SessionRecord};

/// The admin face's state: the core plus what it needs from `[admin]`, read at start-up.
pub struct AdminState {
    pub core: Arc<Core>,
    /// `admin.token_file`; re-read on every session-API call (rotation without restart).
    pub token_file: Option<std::path::PathBuf>,
}

pub fn router(core: Arc<Core>, config: &crate::config::AdminConfig) -> Router {
    let loopback = config.listen.ip().is_loopback();
    let state = Arc::new(AdminState { core, token_file: config.token_file.clone() });
    // `route_layer`: the token check runs for matched session-API routes only, so probes, metrics
    // and the 404 fallback are unaffected.
    let session_api = Router::new()
        .route("/admin/v1/sessions", get(list).delete(revoke_many))
        .route("/admin/v1/sessions/{prefix}", delete(revoke_one))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .merge(session_api)
        .fallback(|| async { ApiError::NotFound })
        .layer(axum::middleware::from_fn_with_state(loopback, loopback_host))
        .with_state(state)
}

/// On a loopback listener, only loopback `Host` names are answered: a web page cannot reach the
/// admin API through DNS rebinding (its requests carry the attacker's host name).
async fn loopback_host(
    State(loopback): State<bool>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if loopback {
        let host = req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
        // `[::1]:9090`, `[::1]`, `localhost:9090`, `127.0.0.1`…
        let name = match host.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or(""),
            None => host.split(':').next().unwrap_or(""),
        };
        if !matches!(name, "127.0.0.1" | "localhost" | "::1") {
            return ApiError::Forbidden("forbidden", "the admin API answers loopback host names only".into())
                .into_response();
        }
    }
    next.run(req).await
}

/// With `admin.token_file` set, the session API requires `Authorization: Bearer <token>`. The file
/// is read on every call (admin calls are rare) so a rotated Kubernetes Secret takes effect without
/// a restart; an unreadable file fails closed.
async fn require_token(
    State(st): State<Arc<AdminState>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(path) = &st.token_file else {
        return next.run(req).await;
    };
    let expected = match crate::config::read_admin_token(path) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, "admin token unavailable: refusing the session admin API");
            return ApiError::Internal.into_response();
        }
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    // Hash both sides first so neither the comparison time nor the length check depends on the secret.
    let ok = given.is_some_and(|g| {
        ct_eq(&sha256(g.as_bytes()), &sha256(secrecy::ExposeSecret::expose_secret(&expected).as_bytes()))
    });
    if !ok {
        tracing::warn!(target: "gatehouse::audit", method = %req.method(), path = req.uri().path(), "admin API: missing or wrong bearer token");
        let mut resp = ApiError::Unauthenticated.into_response();
        resp.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"gatehouse-admin\""));
        return resp;
    }
    next.run(req).await
}

/// OpenMetrics when the scraper asks for it (Prometheus does), the Prometheus text format
/// otherwise (curl, promtool, older agents).
async fn metrics(State(st): State<Arc<AdminState>>, headers: axum::http::HeaderMap) -> Response {
    let core = &st.core;
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, &core.registry).is_err() {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    let openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/openmetrics-text"));
    if openmetrics {
        ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], out).into_response()
    } else {
        let text = crate::metrics::to_prometheus_text(&out);
        ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
    }
}

async fn readyz(State(st): State<Arc<AdminState>>) -> Response {
    let core = &st.core;
    let (ready, body) = core.readiness().await;
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(body)).into_response()
}

fn describe(key: &SessionKey, r: &SessionRecord) -> serde_json::Value {
    json!({
        "session": key.prefix(),
        "sub": r.claims.sub,
        "preferred_username": r.claims.preferred_username,
        "email": r.claims.email,
        "created_at": r.created_at,
        "last_seen": r.last_seen,
        "idle_expires_at": r.idle_expires_at,
        "expires_at": r.absolute_expires_at,
        "client_ip": r.client_ip,
        "user_agent": r.user_agent,
    })
}

/// Largest page of `GET /admin/v1/sessions?all=true`.
const MAX_PAGE: usize = 500;

/// `GET /admin/v1/sessions?sub=SUB`, `?username=NAME`, `?email=ADDRESS` (exact, case-insensitive;
/// these two scan every session, fine for an operator's look-up, not for a hot path), or
/// `?all=true&limit=N&after=PREFIX` (every live session, ordered by hash, paginated).
async fn list(
    State(st): State<Arc<AdminState>>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let core = &st.core;
    let ex = &core.exchange;
    let eq = |a: Option<&String>, b: &str| a.is_some_and(|a| a.eq_ignore_ascii_case(b));
    let (sessions, next) = match (q.get("sub"), q.get("username"), q.get("email"), q.get("all").map(String::as_str)) {
        (Some(sub), None, None, None) => (ex.sessions_of(sub).await?, None),
        (None, Some(name), None, None) => {
            let all = ex.all_sessions().await?;
            (all.into_iter().filter(|(_, r)| eq(r.claims.preferred_username.as_ref(), name)).collect(), None)
        }
        (None, None, Some(email), None) => {
            let all = ex.all_sessions().await?;
            (all.into_iter().filter(|(_, r)| eq(r.claims.email.as_ref(), email)).collect(), None)
        }
        (None, None, None, Some("true")) => {
            let limit = match q.get("limit") {
                Some(l) => l
                    .parse::<usize>()
                    .ok()
                    .filter(|l| (1..=MAX_PAGE).contains(l))
                    .ok_or_else(|| ApiError::bad_request("invalid_request", format!("limit is 1 to {MAX_PAGE}")))?,
                None => 100,
            };
            let after = q.get("after").map(|a| a.to_ascii_lowercase()).unwrap_or_default();
            let mut all = ex.all_sessions().await?;
            all.sort_by_key(|(k, _)| crate::session::key_hex(k));
            let rest: Vec<_> = all.into_iter().filter(|(k, _)| crate::session::key_hex(k) > after).collect();
            let next =
                (rest.len() > limit).then(|| rest.get(limit - 1).map(|(k, _)| crate::session::key_hex(k))).flatten();
            (rest.into_iter().take(limit).collect(), next)
        }
        _ => {
            return Err(ApiError::bad_request(
                "invalid_request",
                "give one of ?sub=<user id>, ?username=<name>, ?email=<address> or ?all=true",
            ));
        }
    };
    let items: Vec<_> = sessions.iter().map(|(k, r)| describe(k, r)).collect();
    Ok(Json(json!({"sessions": items, "next": next})).into_response())
}

/// `DELETE /admin/v1/sessions?sub=SUB` (one user) or `?all=true` (everything).
async fn revoke_many(
    State(st): State<Arc<AdminState>>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let core = &st.core;
    let which = match (q.get("sub"), q.get("all").map(String::as_str)) {
        (Some(sub), None) => Selector::User(sub),
        (None, Some("true")) => Selector::All,
        _ => return Err(ApiError::bad_request("invalid_request", "give ?sub=<user id> or ?all=true")),
    };
    revoked(core.exchange.revoke(which).await)
}

/// `DELETE /admin/v1/sessions/{prefix}`: one session, by at least 8 hex characters of its hash.
async fn revoke_one(State(st): State<Arc<AdminState>>, Path(prefix): Path<String>) -> Result<Response, ApiError> {
    let core = &st.core;
    let prefix = prefix.to_ascii_lowercase();
    if prefix.len() < 8 || prefix.len() > 64 || !prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ApiError::bad_request("invalid_request", "give at least 8 hex characters of the session hash"));
    }
    revoked(core.exchange.revoke(Selector::Prefix(&prefix)).await)
}

/// What was revoked (the refresh tokens are revoked at the provider in the background).
fn revoked(result: Result<Vec<SessionKey>, RevokeError>) -> Result<Response, ApiError> {
    let keys = match result {
        Ok(keys) => keys,
        Err(RevokeError::NotFound) => return Err(ApiError::NotFound),
        Err(e @ RevokeError::Ambiguous(_)) => return Err(ApiError::bad_request("ambiguous", e.to_string())),
        Err(RevokeError::Exchange(e)) => return Err(e.into()),
    };
    let prefixes: Vec<String> = keys.iter().map(SessionKey::prefix).collect();
    tracing::info!(target: "gatehouse::audit", revoked = prefixes.len(), "admin revoked sessions");
    Ok(Json(json!({"revoked": prefixes.len(), "sessions": prefixes})).into_response())
}
