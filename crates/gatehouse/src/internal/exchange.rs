//! The two faces of the exchange: DESIGN's JSON endpoint and the same thing in RFC 8693 form.
//! Both are thin: parse, call `Exchange::resolve`, audit, shape the answer.

use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::extract::rejection::{FormRejection, JsonRejection};
use axum::extract::{Extension, Form, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::InternalState;
use crate::error::ApiError;
use crate::exchange::{ExchangeError, Resolved};
use crate::session::SessionId;
use crate::tls::identity::CallerIdentity;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExchangeRequest {
    session_id: String,
}

/// Resolve and write the audit line (caller, `sub`, session-hash prefix, outcome, latency).
async fn resolve(
    st: &InternalState,
    caller: &CallerIdentity,
    raw_id: &str,
    endpoint: &'static str,
) -> Result<Resolved, ExchangeError> {
    let started = Instant::now();
    // A malformed id is answered exactly like an unknown one.
    let id = SessionId::parse(raw_id);
    let result = match &id {
        Some(id) => st.core.exchange.resolve(id, true).await,
        None => Err(ExchangeError::InvalidSession),
    };
    use crate::metrics::ExchangeOutcome as O;
    let (label, sub) = match &result {
        Ok(r) => (O::Ok, r.record.claims.sub.as_str()),
        Err(ExchangeError::InvalidSession) => (O::InvalidSession, "-"),
        Err(ExchangeError::StoreUnavailable) => (O::StoreUnavailable, "-"),
        Err(ExchangeError::ProviderUnavailable) => (O::IdpUnavailable, "-"),
        Err(ExchangeError::Internal | ExchangeError::LoginEnded) => (O::InternalError, "-"),
    };
    let outcome = label.as_str();
    let span = tracing::Span::current();
    span.record("gatehouse.caller", caller.as_str());
    span.record("gatehouse.outcome", outcome);
    // The session's hash prefix is formatted only for a line that is written.
    if tracing::enabled!(target: "gatehouse::audit", tracing::Level::INFO) {
        let prefix = id.as_ref().map_or_else(|| "-".to_string(), |i| i.key().prefix());
        tracing::info!(
            target: "gatehouse::audit",
            caller = %caller,
            sub,
            session = %prefix,
            outcome,
            endpoint,
            latency_us = started.elapsed().as_micros() as u64,
            "session exchange"
        );
    }
    st.core
        .metrics
        .exchanges
        .get_or_create(&crate::metrics::ExchangeLabels { outcome: label, caller: caller.to_string() })
        .inc();
    result
}

fn no_store(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    resp
}

fn map_err(e: ExchangeError) -> ApiError {
    match e {
        ExchangeError::InvalidSession => ApiError::InvalidSession,
        other => other.into(),
    }
}

/// The exchange's answer (DESIGN), serialised from the resolved session as it is: borrowed, not
/// copied into a `serde_json::Value` first.
#[derive(Serialize)]
struct ExchangeAnswer<'a> {
    access_token: Option<&'a str>,
    token_type: &'static str,
    expires_at: crate::clock::UnixTime,
    claims: ExchangedClaims<'a>,
    session: crate::session::SessionTimes,
}

#[derive(Serialize)]
struct ExchangedClaims<'a> {
    #[serde(flatten)]
    shown: crate::oidc::ShownClaims<'a>,
    email_verified: Option<bool>,
}

/// `POST /internal/v1/session/exchange` `{"session_id": "..."}`.
pub async fn exchange_json(
    State(st): State<Arc<InternalState>>,
    Extension(caller): Extension<CallerIdentity>,
    body: Result<Json<ExchangeRequest>, JsonRejection>,
) -> Response {
    let Json(body) = match body {
        Ok(b) => b,
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => return ApiError::PayloadTooLarge.into_response(),
        Err(e) => {
            return ApiError::bad_request(
                "invalid_request",
                format!("expected {{\"session_id\": \"...\"}}: {}", e.body_text()),
            )
            .into_response();
        }
    };
    match resolve(&st, &caller, &body.session_id, "exchange").await {
        Ok(r) => {
            let c = &r.record.claims;
            no_store(
                Json(ExchangeAnswer {
                    access_token: r.access_token.as_deref(),
                    token_type: "Bearer",
                    expires_at: r.record.access_expires_at,
                    claims: ExchangedClaims { shown: c.shown(), email_verified: c.email_verified },
                    session: r.record.times(),
                })
                .into_response(),
            )
        }
        Err(e) => map_err(e).into_response(),
    }
}

pub const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
pub const SESSION_TOKEN_TYPE: &str = "urn:gatehouse:params:oauth:token-type:session";
pub const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";

#[derive(Deserialize)]
pub struct TokenExchangeRequest {
    grant_type: Option<String>,
    subject_token: Option<String>,
    subject_token_type: Option<String>,
    requested_token_type: Option<String>,
}

/// RFC 6749 §5.2 error: `{"error", "error_description"}`.
fn oauth_error(status: StatusCode, error: &'static str, description: &str) -> Response {
    no_store((status, Json(json!({"error": error, "error_description": description}))).into_response())
}

/// `POST /internal/v1/token`: the exchange as RFC 8693 token exchange.
pub async fn token_exchange(
    State(st): State<Arc<InternalState>>,
    Extension(caller): Extension<CallerIdentity>,
    form: Result<Form<TokenExchangeRequest>, FormRejection>,
) -> Response {
    let Ok(Form(req)) = form else {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "expected an application/x-www-form-urlencoded body",
        );
    };
    if req.grant_type.as_deref() != Some(GRANT_TYPE) {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "grant_type must be urn:ietf:params:oauth:grant-type:token-exchange",
        );
    }
    if req.subject_token_type.as_deref() != Some(SESSION_TOKEN_TYPE) {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "subject_token_type must be urn:gatehouse:params:oauth:token-type:session",
        );
    }
    if req.requested_token_type.as_deref().is_some_and(|t| t != ACCESS_TOKEN_TYPE) {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", "only access tokens can be issued");
    }
    let Some(subject) = req.subject_token else {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", "subject_token is required");
    };
    match resolve(&st, &caller, &subject, "token").await {
        Ok(r) => {
            let expires_in = (r.record.access_expires_at - st.core.exchange.now()).max(0);
            no_store(
                Json(json!({
                    "access_token": r.access_token,
                    "issued_token_type": ACCESS_TOKEN_TYPE,
                    "token_type": "Bearer",
                    "expires_in": expires_in,
                }))
                .into_response(),
            )
        }
        // RFC 8693 §2.2.2: an invalid subject_token is invalid_request. One answer for all.
        Err(ExchangeError::InvalidSession) => {
            oauth_error(StatusCode::BAD_REQUEST, "invalid_request", "unknown, expired or revoked session")
        }
        Err(e) => map_err(e).into_response(),
    }
}
