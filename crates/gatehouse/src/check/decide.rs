//! The check's one decision, independent of how the gateway asked (HTTP forward-auth in `http`,
//! Envoy ext_authz gRPC in `grpc`; both build the same `CheckRequest`): session cookie →
//! `Exchange::resolve` with the token (which refreshes at most once per session) → the CSRF and
//! fetch-metadata rules of the public face → allow with the token and claim headers, or deny with
//! the status a gateway shows.

use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, header};

use super::CheckState;
use crate::error::ApiError;
use crate::exchange::ExchangeError;
use crate::oidc::UserClaims;
use crate::public::{cookies, csrf};
use crate::session::SessionId;

/// The original request, as the gateway reported it.
pub struct CheckRequest<'a> {
    pub method: Method,
    /// Path and query of the original request (for the login hint's `return_to`).
    pub path_and_query: String,
    /// The original request's headers (cookie, Origin, X-CSRF, Sec-Fetch-*, Accept).
    pub headers: &'a HeaderMap,
}

pub enum Decision {
    Allow {
        access_token: String,
        /// `x-gatehouse-<claim>` headers configured in `check.claim_headers`.
        claim_headers: Vec<(HeaderName, HeaderValue)>,
        /// The original cookies without Gatehouse's own (for the gateway to forward upstream).
        other_cookies: String,
    },
    Deny(Denied),
}

pub struct Denied {
    pub error: ApiError,
    /// For a browser navigation without a session: where to send it to sign in.
    pub login: Option<String>,
}

impl CheckRequest<'_> {
    /// A top-level page load (gets a login redirect) rather than fetch/XHR (gets JSON 401).
    pub fn is_navigation(&self) -> bool {
        if !csrf::is_safe(&self.method) {
            return false;
        }
        match self.headers.get("sec-fetch-mode") {
            Some(m) => m.as_bytes() == b"navigate",
            None => {
                self.headers.get(header::ACCEPT).and_then(|a| a.to_str().ok()).is_some_and(|a| a.contains("text/html"))
            }
        }
    }
}

pub async fn decide(st: &CheckState, req: &CheckRequest<'_>) -> Decision {
    let deny = |error| Decision::Deny(Denied { error, login: None });
    // CSRF first, as on the public listener: an unsafe method needs `X-CSRF: 1` and our Origin.
    // No path is exempt here ("" matches no exemption).
    if let Some(why) = csrf::violation(&req.method, "", req.headers, &st.origin) {
        tracing::info!(target: "gatehouse::audit", method = %req.method, reason = why, outcome = "csrf", "check refused");
        return deny(ApiError::Forbidden("csrf", format!("request refused: {why}")));
    }
    if !req.is_navigation()
        && let Some(refused) = csrf::cross_origin_read(req.headers)
    {
        return deny(refused);
    }
    let Some(id) = cookies::read(req.headers, &st.cookie.name).as_deref().and_then(SessionId::parse) else {
        return unauthenticated(st, req);
    };
    match st.core.exchange.resolve(&id, true).await {
        Ok(r) => match r.access_token {
            Some(access_token) => Decision::Allow {
                access_token,
                claim_headers: claim_headers(&st.claim_headers, &r.record.claims),
                other_cookies: other_cookies(req.headers, &st.cookie.name, &st.cookie.login_name),
            },
            None => deny(ApiError::Internal),
        },
        Err(ExchangeError::InvalidSession | ExchangeError::LoginEnded) => unauthenticated(st, req),
        // Store or provider down when a refresh was due: 503, never "allow".
        Err(e) => deny(e.into()),
    }
}

fn unauthenticated(st: &CheckState, req: &CheckRequest<'_>) -> Decision {
    let login = req.is_navigation().then(|| {
        let back: String = url::form_urlencoded::byte_serialize(req.path_and_query.as_bytes()).collect();
        format!("{}/auth/login?return_to={back}", st.origin)
    });
    Decision::Deny(Denied { error: ApiError::Unauthenticated, login })
}

fn claim_headers(wanted: &[String], c: &UserClaims) -> Vec<(HeaderName, HeaderValue)> {
    let mut out = Vec::new();
    for name in wanted {
        let value = match name.as_str() {
            "sub" => Some(c.sub.clone()),
            "preferred_username" => c.preferred_username.clone(),
            "email" => c.email.clone(),
            "name" => c.name.clone(),
            "realm_roles" => Some(c.realm_roles.join(",")),
            "groups" => Some(c.groups.join(",")),
            _ => None,
        };
        let header = HeaderName::from_bytes(format!("x-gatehouse-{}", name.replace('_', "-")).as_bytes());
        // A claim that is not a valid header value (control characters) is left out, not mangled.
        if let (Some(v), Ok(h)) = (value, header)
            && let Ok(v) = HeaderValue::from_str(&v)
        {
            out.push((h, v));
        }
    }
    out
}

/// Every cookie of the original request except Gatehouse's session and login cookies, joined
/// (several `Cookie` headers, as HTTP/2 gateways send them, become one).
pub fn other_cookies(headers: &HeaderMap, session: &str, login: &str) -> String {
    let mut kept = Vec::new();
    for value in headers.get_all(header::COOKIE) {
        let Ok(text) = value.to_str() else { continue };
        for part in text.split(';') {
            let part = part.trim();
            let name = part.split('=').next().unwrap_or_default().trim();
            if !part.is_empty() && name != session && name != login {
                kept.push(part);
            }
        }
    }
    kept.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_cookies_drops_only_ours_across_several_headers() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("a=1; gh=secret"));
        h.append(header::COOKIE, HeaderValue::from_static("gh-login=x;b=2"));
        assert_eq!(other_cookies(&h, "gh", "gh-login"), "a=1; b=2");
        let mut only = HeaderMap::new();
        only.insert(header::COOKIE, HeaderValue::from_static("gh=secret"));
        assert_eq!(other_cookies(&only, "gh", "gh-login"), "");
    }

    #[test]
    fn navigation_is_a_safe_page_load() {
        let mut h = HeaderMap::new();
        let req = |m: Method, h: &HeaderMap| {
            CheckRequest { method: m, path_and_query: "/".into(), headers: h }.is_navigation()
        };
        assert!(!req(Method::GET, &h), "no hints: fetch");
        h.insert(header::ACCEPT, HeaderValue::from_static("text/html,application/xhtml+xml"));
        assert!(req(Method::GET, &h));
        assert!(!req(Method::POST, &h), "unsafe methods never redirect");
        h.insert("sec-fetch-mode", HeaderValue::from_static("cors"));
        assert!(!req(Method::GET, &h), "Sec-Fetch-Mode wins over Accept");
        h.insert("sec-fetch-mode", HeaderValue::from_static("navigate"));
        assert!(req(Method::GET, &h));
    }
}
