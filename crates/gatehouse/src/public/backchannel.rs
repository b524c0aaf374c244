//! `POST /auth/backchannel-logout`: Keycloak tells us a user's session ended (OpenID Connect
//! Back-Channel Logout 1.0). A server-to-server call with no browser state, so the one CSRF
//! exemption; it is authenticated by its signed logout token instead (SECURITY 17).

use std::sync::Arc;

use axum::extract::rejection::FormRejection;
use axum::extract::{Form, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::PublicState;
use crate::exchange::LogoutTokenError;

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

/// A body the pipeline could not read (too large, broken, or not sent in time), in this
/// endpoint's own format: 400, or 408 when it never arrived.
pub fn body_refused(refused: super::BodyRefused) -> Response {
    match refused {
        super::BodyRefused::TooLarge => answer(StatusCode::BAD_REQUEST, Some("request body too large")),
        super::BodyRefused::Unreadable => answer(StatusCode::BAD_REQUEST, Some("logout_token required")),
        super::BodyRefused::Late => answer(StatusCode::REQUEST_TIMEOUT, Some("request body not received in time")),
    }
}

pub async fn backchannel_logout(
    State(st): State<Arc<PublicState>>,
    form: Result<Form<LogoutRequest>, FormRejection>,
) -> Response {
    let Some(token) = form.ok().and_then(|Form(f)| f.logout_token) else {
        return answer(StatusCode::BAD_REQUEST, Some("logout_token required"));
    };
    match st.core.exchange.accept_logout_token(&token, TOMBSTONE_SECONDS).await {
        Ok(_) => answer(StatusCode::OK, None),
        Err(LogoutTokenError::Invalid) => answer(StatusCode::BAD_REQUEST, Some("invalid logout token")),
        Err(LogoutTokenError::Replayed) => answer(StatusCode::BAD_REQUEST, Some("logout token already used")),
        Err(LogoutTokenError::Unavailable) => {
            answer(StatusCode::SERVICE_UNAVAILABLE, Some("session store unavailable"))
        }
    }
}
