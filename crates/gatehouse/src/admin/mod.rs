//! The admin face (loopback by default): Prometheus metrics, health, and session administration
//! (list a user's sessions, revoke one, a user's, or all). Never mounted on the public listener.
//! Listings show hash prefixes only, never session ids or tokens.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use serde_json::json;

use crate::Core;
use crate::error::ApiError;
use crate::exchange::ExchangeError;
use crate::oidc::UserClaims;
use crate::session::{SessionKey, SessionRecord};

pub fn router(core: Arc<Core>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/admin/v1/sessions", get(list).delete(revoke_many))
        .route("/admin/v1/sessions/{prefix}", delete(revoke_one))
        .fallback(|| async { ApiError::NotFound })
        .layer(axum::middleware::from_fn_with_state(core.config.admin.listen.ip().is_loopback(), loopback_host))
        .with_state(core)
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

/// OpenMetrics when the scraper asks for it (Prometheus does), the Prometheus text format
/// otherwise (curl, promtool, older agents).
async fn metrics(State(core): State<Arc<Core>>, headers: axum::http::HeaderMap) -> Response {
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

async fn readyz(State(core): State<Arc<Core>>) -> Response {
    let (ready, body) = core.readiness().await;
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(body)).into_response()
}

fn user_key(core: &Core, sub: &str) -> String {
    UserClaims { iss: core.exchange.oidc().issuer().to_string(), sub: sub.to_string(), ..Default::default() }.user_key()
}

fn describe(key: &SessionKey, r: &SessionRecord) -> serde_json::Value {
    json!({
        "session": key.prefix(),
        "sub": r.claims.sub,
        "preferred_username": r.claims.preferred_username,
        "created_at": r.created_at,
        "last_seen": r.last_seen,
        "idle_expires_at": r.idle_expires_at,
        "expires_at": r.absolute_expires_at,
        "client_ip": r.client_ip,
        "user_agent": r.user_agent,
    })
}

fn store_err(e: crate::session::StoreError) -> ApiError {
    ExchangeError::from(e).into()
}

/// `GET /admin/v1/sessions?sub=SUB`
async fn list(State(core): State<Arc<Core>>, Query(q): Query<HashMap<String, String>>) -> Result<Response, ApiError> {
    let sub = q.get("sub").ok_or_else(|| ApiError::bad_request("invalid_request", "give ?sub=<user id>"))?;
    let sessions = core.exchange.store().list_by_user(&user_key(&core, sub)).await.map_err(store_err)?;
    let now = core.exchange.now();
    let items: Vec<_> = sessions.iter().filter(|(_, r)| !r.is_expired(now)).map(|(k, r)| describe(k, r)).collect();
    Ok(Json(json!({"sessions": items})).into_response())
}

/// `DELETE /admin/v1/sessions?sub=SUB` (one user) or `?all=true` (everything).
async fn revoke_many(
    State(core): State<Arc<Core>>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let store = core.exchange.store();
    let removed: Vec<(SessionKey, SessionRecord)> = match (q.get("sub"), q.get("all").map(String::as_str)) {
        (Some(sub), None) => store.delete_by_user(&user_key(&core, sub)).await.map_err(store_err)?,
        (None, Some("true")) => store.delete_all().await.map_err(store_err)?,
        _ => return Err(ApiError::bad_request("invalid_request", "give ?sub=<user id> or ?all=true")),
    };
    finish(&core, removed).await
}

/// `DELETE /admin/v1/sessions/{prefix}`: one session, by at least 8 hex characters of its hash.
async fn revoke_one(State(core): State<Arc<Core>>, Path(prefix): Path<String>) -> Result<Response, ApiError> {
    let prefix = prefix.to_ascii_lowercase();
    if prefix.len() < 8 || prefix.len() > 64 || !prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ApiError::bad_request("invalid_request", "give at least 8 hex characters of the session hash"));
    }
    let store = core.exchange.store();
    let found = store.find_by_prefix(&prefix).await.map_err(store_err)?;
    match found.as_slice() {
        [] => Err(ApiError::NotFound),
        [(key, _)] => {
            let removed = store.delete(key).await.map_err(store_err)?;
            finish(&core, removed.into_iter().map(|r| (*key, r)).collect()).await
        }
        _ => Err(ApiError::bad_request("ambiguous", format!("{} sessions match; give more characters", found.len()))),
    }
}

/// Revoke the removed sessions' refresh tokens at the provider (in the background: the sessions
/// are already gone) and report what was done.
async fn finish(core: &Arc<Core>, removed: Vec<(SessionKey, SessionRecord)>) -> Result<Response, ApiError> {
    let prefixes: Vec<String> = removed.iter().map(|(k, _)| k.prefix()).collect();
    tracing::info!(target: "gatehouse::audit", revoked = removed.len(), "admin revoked sessions");
    let ex = core.exchange.clone();
    tokio::spawn(async move { ex.revoke_tokens(removed).await });
    Ok(Json(json!({"revoked": prefixes.len(), "sessions": prefixes})).into_response())
}
