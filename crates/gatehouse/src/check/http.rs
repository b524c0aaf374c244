//! The HTTP check (`/check`) for forward-auth gateways and Envoy's `http_service`. Reads the
//! original request from the gateway's conventions — nginx `auth_request` / ingress-nginx
//! `auth-url` (`X-Original-Method`, `X-Original-URL`), Traefik ForwardAuth and Caddy
//! `forward_auth` (`X-Forwarded-Method`, `X-Forwarded-Uri`), Envoy `http_service` (the check
//! request's own method, and its path after `/check`) — and answers 200 with
//! `Authorization: Bearer <access token>` for the gateway to copy upstream, or 401/403/503.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::CheckState;
use super::decide::{CheckRequest, Decision, Denied, decide};

/// The original request's cookies minus Gatehouse's, for the gateway to forward as `Cookie`.
pub const COOKIE_OUT: &str = "x-gatehouse-cookie";
/// For a navigation without a session: the sign-in URL (nginx cannot pass a 302 through
/// `auth_request`, so it reads this with `auth_request_set` and redirects itself).
pub const LOGIN_OUT: &str = "x-gatehouse-login";

/// The original method: the gateway's header, else this request's own (nginx keeps it).
fn original_method(req: &Request) -> Result<Method, ()> {
    let h = req.headers();
    match h.get("x-original-method").or_else(|| h.get("x-forwarded-method")) {
        Some(v) => Method::from_bytes(v.as_bytes()).map_err(|_| ()),
        None => Ok(req.method().clone()),
    }
}

/// Path and query of the original request.
fn original_path(req: &Request) -> String {
    let h = req.headers();
    if let Some(u) = h.get("x-original-url").and_then(|v| v.to_str().ok()) {
        // ingress-nginx sends an absolute URL; plain nginx setups often just `$request_uri`.
        return match url::Url::parse(u) {
            Ok(url) => match url.query() {
                Some(q) => format!("{}?{q}", url.path()),
                None => url.path().to_string(),
            },
            Err(_) => u.to_string(),
        };
    }
    if let Some(u) = h.get("x-forwarded-uri").and_then(|v| v.to_str().ok()) {
        return u.to_string();
    }
    // Envoy `http_service`: `/check` + the original path and query.
    match req.uri().path_and_query().map(|p| p.as_str()).and_then(|p| p.strip_prefix(super::PATH)) {
        Some(rest) if rest.starts_with('/') => rest.to_string(),
        _ => "/".into(),
    }
}

pub async fn check(State(st): State<Arc<CheckState>>, req: Request) -> Response {
    let Ok(method) = original_method(&req) else {
        return crate::error::ApiError::bad_request("bad_request", "unreadable original method").into_response();
    };
    // `?redirect=1` only on the bare `/check` (under Envoy the query is the original request's).
    let redirect =
        req.uri().path() == super::PATH && req.uri().query().is_some_and(|q| q.split('&').any(|p| p == "redirect=1"));
    let creq = CheckRequest { method, path_and_query: original_path(&req), headers: req.headers() };
    let mut resp = match decide(&st, &creq).await {
        Decision::Allow { access_token, claim_headers, other_cookies } => {
            let mut resp = StatusCode::OK.into_response();
            let h = resp.headers_mut();
            match HeaderValue::from_str(&format!("Bearer {access_token}")) {
                Ok(mut v) => {
                    v.set_sensitive(true);
                    h.insert(header::AUTHORIZATION, v);
                }
                Err(_) => return crate::error::ApiError::Internal.into_response(),
            }
            for (name, value) in claim_headers {
                h.insert(name, value);
            }
            if let Ok(v) = HeaderValue::from_str(&other_cookies) {
                h.insert(COOKIE_OUT, v);
            }
            resp
        }
        Decision::Deny(Denied { error, login: Some(login) }) if redirect => {
            let _ = error;
            let mut resp = StatusCode::FOUND.into_response();
            if let Ok(v) = HeaderValue::from_str(&login) {
                resp.headers_mut().insert(header::LOCATION, v);
            }
            resp
        }
        Decision::Deny(Denied { error, login }) => {
            let mut resp = error.into_response();
            if let Some(v) = login.and_then(|l| HeaderValue::from_str(&l).ok()) {
                resp.headers_mut().insert(LOGIN_OUT, v);
            }
            resp
        }
    };
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}
