//! The Envoy ext_authz v3 gRPC face (`envoy.service.auth.v3.Authorization/Check`), served on the
//! check listener beside the HTTP check (HTTP/2: ALPN `h2` with mutual TLS, h2c on a plaintext
//! loopback listener). A thin adapter: the original request Envoy describes in
//! `attributes.request.http` becomes a [`CheckRequest`], the one [`decide`] answers it, and the
//! [`Decision`] becomes Envoy's `CheckResponse`:
//!
//! - allowed → `OkHttpResponse`: `authorization: Bearer <access token>` and the claim headers
//!   with `OVERWRITE_IF_EXISTS_OR_ADD` (Envoy's default action appends, which would keep a
//!   client-supplied `Authorization` beside ours); `cookie` rewritten without Gatehouse's cookies
//!   (removed when nothing is left); client-supplied `x-gatehouse-*` and common identity headers
//!   removed;
//! - denied → `DeniedHttpResponse` with the HTTP face's status and JSON body (401, 403, 503…),
//!   or a 302 to the login for a page load without a session.
//!
//! The caller was already authenticated by the listener's middleware (mutual TLS identity on
//! `check.allow`, or the shared key in gRPC metadata `x-gatehouse-check-key`).

use std::sync::Arc;

use axum::http::{HeaderMap, HeaderName, HeaderValue as HttpHeaderValue, Method, StatusCode, header};
use axum::response::IntoResponse;
use envoy_types::ext_authz::v3::pb::{
    Authorization, AuthorizationServer, CheckRequest as EnvoyCheckRequest, CheckResponse, DeniedHttpResponse,
    HeaderAppendAction, HeaderValue, HeaderValueOption, HttpResponse, HttpStatus, OkHttpResponse,
};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::HttpRequest;
use envoy_types::pb::google::rpc;
use tonic::{Request, Response, Status};

use super::CheckState;
use super::decide::{CheckRequest, Decision, Denied, decide};
use crate::error::ApiError;

/// The route the gRPC service is mounted on (`/<package>.<Service>/<method>`).
pub fn route() -> String {
    format!("/{}/{{*method}}", envoy_types::pb::envoy::service::auth::v3::authorization_server::SERVICE_NAME)
}

/// A `CheckRequest` carries only the original request's headers (the body is not requested:
/// `with_request_body` stays off); Envoy's default header limit is 60 KiB.
const MAX_MESSAGE: usize = 256 * 1024;

/// Identity headers that upstreams commonly trust from an auth proxy (oauth2-proxy, Apache,
/// Pomerium-style): a client must never be able to send them through. `x-gatehouse-*` is removed
/// by prefix, whatever the client sent.
const IDENTITY_HEADERS: &[&str] = &[
    "x-forwarded-user",
    "x-forwarded-email",
    "x-forwarded-preferred-username",
    "x-forwarded-groups",
    "x-forwarded-access-token",
    "x-auth-request-user",
    "x-auth-request-email",
    "x-auth-request-preferred-username",
    "x-auth-request-groups",
    "x-auth-request-access-token",
    "x-remote-user",
    "remote-user",
    "x-id-token",
    "x-userinfo",
];

pub fn service(st: Arc<CheckState>) -> AuthorizationServer<Grpc> {
    AuthorizationServer::new(Grpc { st }).max_decoding_message_size(MAX_MESSAGE)
}

pub struct Grpc {
    st: Arc<CheckState>,
}

#[tonic::async_trait]
impl Authorization for Grpc {
    async fn check(&self, request: Request<EnvoyCheckRequest>) -> Result<Response<CheckResponse>, Status> {
        let Some(http) =
            request.get_ref().attributes.as_ref().and_then(|a| a.request.as_ref()).and_then(|r| r.http.as_ref())
        else {
            // Not what Envoy's HTTP filter sends: an error, which Envoy turns into `status_on_error`.
            return Err(Status::invalid_argument("attributes.request.http is missing"));
        };
        let headers = original_headers(http);
        let Ok(method) = Method::from_bytes(http.method.as_bytes()) else {
            return Ok(Response::new(denied(ApiError::bad_request("bad_request", "unreadable original method")).await));
        };
        let path_and_query = if http.path.starts_with('/') { http.path.clone() } else { "/".into() };
        let creq = CheckRequest { method, path_and_query, headers: &headers };
        let answer = match decide(&self.st, &creq).await {
            Decision::Allow { access_token, claim_headers, other_cookies } => {
                allowed(&headers, &access_token, &claim_headers, &other_cookies)
            }
            Decision::Deny(Denied { login: Some(login), .. }) => redirect(&login),
            Decision::Deny(Denied { error, login: None }) => denied(error).await,
        };
        Ok(Response::new(answer))
    }
}

/// The original request's headers as a `HeaderMap`: from `header_map` (Envoy's
/// `encode_raw_headers: true`: one entry per header line, cookies not joined) when present, else
/// from `headers` (one entry per name; Envoy joins several `cookie` headers with "; ").
/// Pseudo-headers (`:path`, …) and unparseable entries are skipped.
pub(crate) fn original_headers(http: &HttpRequest) -> HeaderMap {
    let mut out = HeaderMap::new();
    let mut add = |k: &str, v: &[u8]| {
        if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(k.as_bytes()), HttpHeaderValue::from_bytes(v)) {
            out.append(name, value);
        }
    };
    match http.header_map.as_ref().filter(|m| !m.headers.is_empty()) {
        Some(map) => {
            for h in &map.headers {
                add(&h.key, if h.raw_value.is_empty() { h.value.as_bytes() } else { &h.raw_value });
            }
        }
        None => {
            for (k, v) in &http.headers {
                add(k, v.as_bytes());
            }
        }
    }
    out
}

/// A header set on the upstream request, replacing whatever the client sent under that name.
fn overwrite(key: &str, value: &str) -> HeaderValueOption {
    #[allow(deprecated)] // `append` is the deprecated spelling of `append_action`; left unset.
    HeaderValueOption {
        header: Some(HeaderValue { key: key.into(), value: value.into(), raw_value: Vec::new() }),
        append: None,
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd.into(),
        keep_empty_value: false,
    }
}

fn status(code: tonic::Code, message: &str) -> Option<rpc::Status> {
    Some(rpc::Status { code: code as i32, message: message.into(), details: Vec::new() })
}

pub(crate) fn allowed(
    original: &HeaderMap,
    access_token: &str,
    claim_headers: &[(HeaderName, HttpHeaderValue)],
    other_cookies: &str,
) -> CheckResponse {
    let mut headers = vec![overwrite(header::AUTHORIZATION.as_str(), &format!("Bearer {access_token}"))];
    for (name, value) in claim_headers {
        if let Ok(v) = value.to_str() {
            headers.push(overwrite(name.as_str(), v));
        }
    }
    let mut remove: Vec<String> = Vec::new();
    if other_cookies.is_empty() {
        if original.contains_key(header::COOKIE) {
            remove.push(header::COOKIE.as_str().into());
        }
    } else {
        headers.push(overwrite(header::COOKIE.as_str(), other_cookies));
    }
    // Never remove a header this answer sets (Envoy applies both lists; a claim header the client
    // forged is already replaced by `overwrite`).
    let set: Vec<&str> = claim_headers.iter().map(|(n, _)| n.as_str()).collect();
    for name in original.keys() {
        let n = name.as_str();
        if n.starts_with("x-gatehouse-") && !set.contains(&n) && !remove.iter().any(|r| r == n) {
            remove.push(n.into());
        }
    }
    remove.extend(IDENTITY_HEADERS.iter().map(|h| h.to_string()));
    CheckResponse {
        status: status(tonic::Code::Ok, ""),
        http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
            headers,
            headers_to_remove: remove,
            ..Default::default()
        })),
        dynamic_metadata: None,
    }
}

fn denial(code: StatusCode, headers: Vec<HeaderValueOption>, body: String) -> CheckResponse {
    let rpc_code = match code {
        StatusCode::UNAUTHORIZED | StatusCode::FOUND => tonic::Code::Unauthenticated,
        StatusCode::FORBIDDEN => tonic::Code::PermissionDenied,
        StatusCode::BAD_REQUEST => tonic::Code::InvalidArgument,
        StatusCode::TOO_MANY_REQUESTS => tonic::Code::ResourceExhausted,
        c if c.is_server_error() && c != StatusCode::INTERNAL_SERVER_ERROR => tonic::Code::Unavailable,
        _ => tonic::Code::Internal,
    };
    CheckResponse {
        status: status(rpc_code, code.canonical_reason().unwrap_or("denied")),
        // Envoy's `type.v3.StatusCode` numbers are the HTTP status codes.
        http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
            status: Some(HttpStatus { code: i32::from(code.as_u16()) }),
            headers,
            body,
        })),
        dynamic_metadata: None,
    }
}

/// A page load without a session goes to the login, back to where it was after.
fn redirect(login: &str) -> CheckResponse {
    let headers = vec![overwrite("location", login), overwrite("cache-control", "no-store")];
    denial(StatusCode::FOUND, headers, String::new())
}

/// The HTTP face's answer for the same error (status, JSON body, `Cache-Control`,
/// `Retry-After`), for Envoy to send to the browser.
async fn denied(error: ApiError) -> CheckResponse {
    let resp = error.into_response();
    let code = resp.status();
    let headers = resp
        .headers()
        .iter()
        .filter(|(n, _)| *n != header::CONTENT_LENGTH)
        .filter_map(|(n, v)| v.to_str().ok().map(|v| overwrite(n.as_str(), v)))
        .collect();
    // The body is a small JSON object made here; an unreadable one just leaves the body empty.
    let body = axum::body::to_bytes(resp.into_body(), 64 * 1024).await.unwrap_or_default();
    denial(code, headers, String::from_utf8_lossy(&body).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::HeaderMap as EnvoyHeaderMap;

    #[test]
    fn headers_come_from_header_map_when_envoy_sends_raw_headers() {
        let mut http = HttpRequest::default();
        http.headers.insert("cookie".into(), "a=1; gh=s".into());
        http.headers.insert(":path".into(), "/x".into());
        assert_eq!(original_headers(&http).get_all("cookie").iter().count(), 1);
        assert!(original_headers(&http).get(":path").is_none(), "pseudo-headers are skipped");
        http.header_map = Some(EnvoyHeaderMap {
            headers: vec![
                HeaderValue { key: "cookie".into(), value: String::new(), raw_value: b"a=1".to_vec() },
                HeaderValue { key: "cookie".into(), value: String::new(), raw_value: b"gh=s".to_vec() },
            ],
        });
        let h = original_headers(&http);
        let all: Vec<_> = h.get_all("cookie").iter().collect();
        assert_eq!(all, ["a=1", "gh=s"], "header_map wins, one entry per line");
    }

    #[test]
    fn allowed_overwrites_and_never_removes_what_it_sets() {
        let mut original = HeaderMap::new();
        original.insert("x-gatehouse-sub", HttpHeaderValue::from_static("admin"));
        original.insert("x-gatehouse-roles", HttpHeaderValue::from_static("admin"));
        original.insert("cookie", HttpHeaderValue::from_static("gh=s"));
        let claims = [(HeaderName::from_static("x-gatehouse-sub"), HttpHeaderValue::from_static("u1"))];
        let r = allowed(&original, "tok", &claims, "");
        let Some(HttpResponse::OkResponse(ok)) = r.http_response else { panic!("not ok") };
        assert!(ok.headers.iter().all(|h| h.append_action == HeaderAppendAction::OverwriteIfExistsOrAdd as i32));
        let set: Vec<_> = ok.headers.iter().filter_map(|h| h.header.as_ref()).map(|h| h.key.as_str()).collect();
        assert_eq!(set, ["authorization", "x-gatehouse-sub"]);
        assert!(ok.headers_to_remove.contains(&"x-gatehouse-roles".to_string()));
        assert!(ok.headers_to_remove.contains(&"cookie".to_string()), "no other cookie: removed");
        assert!(!ok.headers_to_remove.contains(&"x-gatehouse-sub".to_string()));
    }
}
