//! `POST /auth/backchannel-logout`: Keycloak tells us a user's session ended (OpenID Connect
//! Back-Channel Logout 1.0). A server-to-server call with no browser state, so the one CSRF
//! exemption; it is authenticated by its signed logout token instead (SECURITY 17).

use std::sync::Arc;

use axum::extract::rejection::FormRejection;
use axum::extract::{Form, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::Value;

use super::PublicState;
use crate::oidc::id_token::TokenKind;

#[derive(Deserialize)]
pub struct LogoutRequest {
    logout_token: Option<String>,
}

/// How long a logged-out `sid` stays tombstoned: longer than a login in flight can take.
const TOMBSTONE_SECONDS: i64 = 3600;

fn answer(status: StatusCode, error: Option<&'static str>) -> Response {
    let body = match error {
        Some(e) => serde_json::json!({"error": "invalid_request", "error_description": e}),
        None => serde_json::json!({}),
    };
    let mut resp = (status, axum::Json(body)).into_response();
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

pub async fn backchannel_logout(
    State(st): State<Arc<PublicState>>,
    form: Result<Form<LogoutRequest>, FormRejection>,
) -> Response {
    let Some(token) = form.ok().and_then(|Form(f)| f.logout_token) else {
        return answer(StatusCode::BAD_REQUEST, Some("logout_token required"));
    };
    let ex = &st.core.exchange;
    let claims = match ex.oidc().validate_jwt(&token, TokenKind::Logout, None, None).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "back-channel logout token rejected");
            return answer(StatusCode::BAD_REQUEST, Some("invalid logout token"));
        }
    };
    let s = |k: &str| claims.get(k).and_then(Value::as_str).filter(|v| !v.is_empty());
    let (Some(jti), exp) = (s("jti"), claims.get("exp").and_then(Value::as_i64).unwrap_or(0)) else {
        return answer(StatusCode::BAD_REQUEST, Some("jti required"));
    };
    // Replay cache shared through the store: a logout token is accepted once, on any replica. The
    // mark is written only after the sessions are gone, so a failed attempt can be retried.
    match ex.store().is_marked("logout-jti", jti, ex.now()).await {
        Ok(false) => {}
        Ok(true) => {
            tracing::warn!("back-channel logout token replayed");
            return answer(StatusCode::BAD_REQUEST, Some("logout token already used"));
        }
        Err(e) => {
            tracing::error!(error = %e, "session store unavailable for back-channel logout");
            return answer(StatusCode::SERVICE_UNAVAILABLE, Some("session store unavailable"));
        }
    }
    match ex.end_provider_session(s("sid"), s("sub"), TOMBSTONE_SECONDS).await {
        Ok(n) => {
            tracing::info!(sub = s("sub").unwrap_or("-"), sessions = n, "back-channel logout: sessions ended");
            if let Err(e) = ex.store().mark("logout-jti", jti, exp + crate::oidc::id_token::LEEWAY).await {
                tracing::warn!(error = %e, "could not record the logout token's jti");
            }
            answer(StatusCode::OK, None)
        }
        Err(e) => {
            tracing::error!(error = %e, "back-channel logout failed");
            answer(StatusCode::SERVICE_UNAVAILABLE, Some("session store unavailable"))
        }
    }
}
