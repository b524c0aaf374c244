//! Every error a face can answer, mapped to HTTP in this one place. Each knows who is at fault
//! (`Fault`: the caller → 4xx, a dependency → 502/503/504, Gatehouse → 500) and whether a retry can
//! help; status, `Retry-After` and log level follow from that here. Bodies are
//! `{"error","message"}` and never carry a token, a session id or upstream detail.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::exchange::ExchangeError;
use crate::oidc::OidcError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("authentication required")]
    Unauthenticated,
    /// The exchange's one answer for unknown, expired and revoked sessions (no oracle).
    #[error("unknown, expired or revoked session")]
    InvalidSession,
    #[error("{1}")]
    BadRequest(&'static str, String),
    #[error("{1}")]
    Forbidden(&'static str, String),
    #[error("not found")]
    NotFound,
    #[error("method not allowed on this path")]
    MethodNotAllowed,
    #[error("request body too large")]
    PayloadTooLarge,
    #[error("the request body did not arrive in time")]
    RequestTimeout,
    /// A rate limit refused the request; the decision gives `Retry-After` and the `RateLimit` fields.
    #[error("too many requests; retry later")]
    TooManyRequests(crate::limit::Decision),
    #[error("invalid username or password")]
    InvalidCredentials,
    #[error("the identity provider is unavailable; retry shortly")]
    ProviderUnavailable,
    #[error("the session store is unavailable; retry shortly")]
    StoreUnavailable,
    #[error("the identity provider answered something unusable")]
    ProviderError,
    #[error("the upstream service is unreachable or failed")]
    BadGateway,
    #[error("the upstream service did not answer in time")]
    UpstreamTimeout,
    #[error("too many requests in flight to the upstream service; retry shortly")]
    UpstreamBusy,
    #[error("internal error")]
    Internal,
}

impl ApiError {
    pub fn code(&self) -> &'static str {
        match self {
            Self::Unauthenticated => "unauthenticated",
            Self::InvalidSession => "invalid_session",
            Self::BadRequest(code, _) | Self::Forbidden(code, _) => code,
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::PayloadTooLarge => "payload_too_large",
            Self::RequestTimeout => "request_timeout",
            Self::TooManyRequests(_) => "rate_limited",
            Self::InvalidCredentials => "invalid_credentials",
            Self::ProviderUnavailable => "idp_unavailable",
            Self::StoreUnavailable => "store_unavailable",
            Self::ProviderError => "idp_error",
            Self::BadGateway => "bad_gateway",
            Self::UpstreamTimeout => "upstream_timeout",
            Self::UpstreamBusy => "upstream_busy",
            Self::Internal => "internal_error",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::Unauthenticated | Self::InvalidSession | Self::InvalidCredentials => StatusCode::UNAUTHORIZED,
            Self::BadRequest(..) => StatusCode::BAD_REQUEST,
            Self::Forbidden(..) => StatusCode::FORBIDDEN,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::ProviderUnavailable | Self::StoreUnavailable | Self::UpstreamBusy => StatusCode::SERVICE_UNAVAILABLE,
            Self::ProviderError | Self::BadGateway => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::BadRequest(code, message.into())
    }
}

/// Who is at fault for an error (Pingora's classification): it decides the status class, whether
/// a retry can help, and how loudly it is logged — in one place, not per face.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The request was wrong or not allowed: 4xx, logged at debug (the face logs the security
    /// events it cares about itself).
    Caller,
    /// Keycloak, the session store or an upstream failed: 5xx, logged as a warning.
    Dependency,
    /// Gatehouse itself: 500, logged as an error.
    Gatehouse,
}

impl Fault {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Caller => "caller",
            Self::Dependency => "dependency",
            Self::Gatehouse => "gatehouse",
        }
    }
}

impl ApiError {
    pub fn fault(&self) -> Fault {
        match self {
            Self::ProviderUnavailable
            | Self::StoreUnavailable
            | Self::ProviderError
            | Self::BadGateway
            | Self::UpstreamTimeout
            | Self::UpstreamBusy => Fault::Dependency,
            Self::Internal => Fault::Gatehouse,
            _ => Fault::Caller,
        }
    }

    /// Whether the same request may succeed later: then the answer carries `Retry-After`.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            Self::ProviderUnavailable | Self::StoreUnavailable | Self::TooManyRequests(_) | Self::UpstreamBusy
        )
    }
}

#[derive(serde::Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    message: &'a str,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        match self.fault() {
            Fault::Caller => tracing::debug!(error = self.code(), status = status.as_u16(), "request refused"),
            Fault::Dependency => {
                tracing::warn!(error = self.code(), status = status.as_u16(), fault = "dependency", "request failed")
            }
            Fault::Gatehouse => {
                tracing::error!(error = self.code(), status = status.as_u16(), fault = "gatehouse", "request failed")
            }
        }
        // A borrowed struct, not a `json!` value: the same bytes ("error" then "message") without
        // building a map per refusal (the 401 path is the cheapest answer Gatehouse gives).
        let message = self.to_string();
        let mut resp = (status, Json(ErrorBody { error: self.code(), message: &message })).into_response();
        let h = resp.headers_mut();
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Self::TooManyRequests(d) = &self {
            // The limit's own numbers: Retry-After rounded up, and the IETF draft's fields
            // (draft-ietf-httpapi-ratelimit-headers-11; see docs/configuration.md).
            let fields = [
                (header::RETRY_AFTER, d.retry_after_secs().to_string()),
                (header::HeaderName::from_static("ratelimit-policy"), d.policy_header()),
                (header::HeaderName::from_static("ratelimit"), d.ratelimit_header()),
            ];
            for (name, value) in fields {
                if let Ok(v) = HeaderValue::from_str(&value) {
                    h.insert(name, v);
                }
            }
        } else if self.retryable() {
            h.insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        }
        resp
    }
}

impl From<ExchangeError> for ApiError {
    fn from(e: ExchangeError) -> Self {
        match e {
            ExchangeError::InvalidSession => Self::Unauthenticated,
            ExchangeError::StoreUnavailable => Self::StoreUnavailable,
            ExchangeError::ProviderUnavailable => Self::ProviderUnavailable,
            ExchangeError::LoginEnded => {
                Self::bad_request("login_failed", "this login was ended by the identity provider; sign in again")
            }
            ExchangeError::Internal => Self::Internal,
        }
    }
}

impl From<OidcError> for ApiError {
    fn from(e: OidcError) -> Self {
        match e {
            OidcError::Unavailable(why) => {
                tracing::warn!(error = %why, "identity provider unavailable");
                Self::ProviderUnavailable
            }
            OidcError::NotReady => Self::ProviderUnavailable,
            OidcError::InvalidCredentials => Self::InvalidCredentials,
            OidcError::InvalidGrant => {
                Self::bad_request("login_failed", "the authorization code was rejected; start the login again")
            }
            OidcError::UnknownKey => {
                tracing::warn!("token signed with a key the provider's JWKS does not hold");
                Self::bad_request(
                    "login_failed",
                    "the identity provider's response failed validation; start the login again",
                )
            }
            OidcError::InvalidToken(why) => {
                tracing::warn!(reason = why, "token validation failed");
                Self::bad_request(
                    "login_failed",
                    "the identity provider's response failed validation; start the login again",
                )
            }
            OidcError::Provider(why) => {
                tracing::error!(error = %why, "identity provider error");
                Self::ProviderError
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The status class follows who is at fault, and only retryable answers say when to retry.
    #[test]
    fn status_and_retry_follow_the_fault() {
        let all = [
            ApiError::Unauthenticated,
            ApiError::InvalidSession,
            ApiError::bad_request("x", "y"),
            ApiError::Forbidden("x", "y".into()),
            ApiError::NotFound,
            ApiError::MethodNotAllowed,
            ApiError::PayloadTooLarge,
            ApiError::RequestTimeout,
            ApiError::TooManyRequests(crate::limit::Decision {
                kind: crate::limit::Kind::Request,
                allowed: false,
                retry_after: std::time::Duration::from_millis(1500),
                limit: 20,
                window_secs: 1,
                remaining: 0,
                reset: std::time::Duration::from_millis(1200),
            }),
            ApiError::InvalidCredentials,
            ApiError::ProviderUnavailable,
            ApiError::StoreUnavailable,
            ApiError::ProviderError,
            ApiError::BadGateway,
            ApiError::UpstreamTimeout,
            ApiError::UpstreamBusy,
            ApiError::Internal,
        ];
        for e in all {
            let (fault, status, retry, code) = (e.fault(), e.status(), e.retryable(), e.code());
            match fault {
                Fault::Caller => assert!(status.is_client_error(), "{code}"),
                Fault::Dependency => {
                    assert!(status.is_server_error() && status != StatusCode::INTERNAL_SERVER_ERROR, "{code}")
                }
                Fault::Gatehouse => assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{code}"),
            }
            let limited = matches!(e, ApiError::TooManyRequests(_));
            let resp = e.into_response();
            if limited {
                assert_eq!(resp.headers()[header::RETRY_AFTER], "2", "seconds, rounded up");
                assert_eq!(resp.headers()["ratelimit-policy"], "\"ip\";q=20;w=1");
                assert_eq!(resp.headers()["ratelimit"], "\"ip\";r=0;t=2");
            }
            assert_eq!(resp.headers().contains_key(header::RETRY_AFTER), retry, "{code}");
            assert_eq!(resp.headers()[header::CACHE_CONTROL], "no-store", "{code}");
        }
    }
}
