//! CSRF defence for every unsafe method on every public route (SECURITY 6): the custom header
//! `X-CSRF: 1` (a cross-origin page cannot send it without a CORS preflight we never grant) and a
//! same-origin `Origin` / `Sec-Fetch-Site`. The one exemption is back-channel logout, a
//! server-to-server call authenticated by its signed logout token. Also the fetch-metadata check
//! that keeps reads of user data (`/auth/me`, `/api/*`) to pages of this origin.

use axum::extract::Request;
use axum::http::{HeaderMap, Method};
use axum::response::{IntoResponse, Response};

use super::PublicState;
use crate::error::ApiError;

/// `POST` to these paths is exempt from the check. Only this one, deliberately.
pub const EXEMPT: &[&str] = &["/auth/backchannel-logout"];

pub fn is_safe(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// Why a request fails the check, or `None` if it passes.
pub fn violation(method: &Method, path: &str, headers: &HeaderMap, origin: &str) -> Option<&'static str> {
    if is_safe(method) || (*method == Method::POST && EXEMPT.contains(&path)) {
        return None;
    }
    if headers.get("x-csrf").map(|v| v.as_bytes()) != Some(b"1") {
        return Some("missing X-CSRF: 1 header");
    }
    let site = headers.get("sec-fetch-site").map(|v| v.as_bytes());
    if site.is_some_and(|s| s != b"same-origin") {
        return Some("cross-site request");
    }
    match headers.get("origin").map(|v| v.as_bytes()) {
        Some(o) if o == origin.as_bytes() => None,
        Some(_) => Some("cross-origin request"),
        // Without Origin we need the browser's own word that the request is same-origin.
        None if site == Some(b"same-origin") => None,
        None => Some("missing Origin header"),
    }
}

/// Fetch metadata (resource isolation): a read of user data from a page of another origin is
/// refused, even a same-site one (another port of localhost, a sibling subdomain) that the Lax
/// cookie still reaches. Our own pages send `same-origin`, address-bar navigations `none`, and
/// non-browser clients nothing.
pub fn cross_origin_read(headers: &HeaderMap) -> Option<ApiError> {
    match headers.get("sec-fetch-site").map(|v| v.as_bytes()) {
        None | Some(b"same-origin") | Some(b"none") => None,
        Some(_) => Some(ApiError::Forbidden("cross_origin", "the API answers only pages of this origin".into())),
    }
}

/// The public pipeline's CSRF step: the refusal, or `None` to let the request through.
pub fn refusal(state: &PublicState, req: &Request) -> Option<Response> {
    let why = violation(req.method(), req.uri().path(), req.headers(), &state.origin)?;
    tracing::warn!(path = req.uri().path(), method = %req.method(), reason = why, "CSRF check failed");
    Some(ApiError::Forbidden("csrf", format!("request refused: {why}")).into_response())
}
