//! A GET to a route's upstream for a composed view (`public/views/`): the same route, connection
//! pool, TLS, relay header and in-flight limit as a proxied request, but nothing of the browser's
//! request is forwarded and the answer is read whole (bounded) and parsed as JSON.

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use http_body_util::{BodyExt, Limited};

use super::{Proxy, Route, forwarded_for};
use crate::config::Relay;

/// Why a part call produced no JSON. Never carries upstream text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallFailure {
    Timeout,
    TooLarge,
    /// The upstream answered a non-2xx status (mapped, never passed through).
    Status(u16),
    NotJson,
    Unreachable,
    Busy,
}

impl CallFailure {
    /// The reason as the browser sees it.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::TooLarge => "too_large",
            Self::Status(401 | 403) => "upstream_denied",
            Self::Status(404) => "upstream_not_found",
            Self::Status(s) if s < 500 => "upstream_refused",
            Self::Status(_) => "upstream_error",
            Self::NotJson => "not_json",
            Self::Unreachable => "unreachable",
            Self::Busy => "upstream_busy",
        }
    }
}

/// What a view needs to know about a route.
pub struct RouteRef<'a>(&'a Route);

impl RouteRef<'_> {
    pub fn relay(&self) -> Relay {
        self.0.relay
    }
    pub fn timeout(&self) -> Duration {
        self.0.timeout
    }
}

impl Proxy {
    /// The route configured with exactly this prefix.
    pub fn route_by_prefix(&self, prefix: &str) -> Option<RouteRef<'_>> {
        self.routes.iter().find(|r| r.prefix == prefix).map(RouteRef)
    }

    /// GET `rest` (relative to the route's upstream path) as the user, within `timeout` for
    /// headers and body together, reading at most `max_bytes`.
    #[allow(clippy::too_many_arguments)]
    pub async fn get_json(
        &self,
        prefix: &str,
        rest: &str,
        relay: &str,
        peer: SocketAddr,
        browser_headers: &HeaderMap,
        trusted: &[ipnet::IpNet],
        timeout: Duration,
        max_bytes: usize,
    ) -> Result<serde_json::Value, CallFailure> {
        let route = self.routes.iter().find(|r| r.prefix == prefix).ok_or(CallFailure::Unreachable)?;
        let _permit = route.in_flight.clone().try_acquire_owned().map_err(|_| {
            tracing::warn!(route = %route.prefix, "too many requests in flight to this upstream (view part)");
            CallFailure::Busy
        })?;
        let uri: Uri =
            format!("{}{}{rest}", route.origin, route.base_path).parse().map_err(|_| CallFailure::Unreachable)?;
        let mut req = axum::http::Request::builder()
            .method("GET")
            .uri(uri)
            .version(axum::http::Version::HTTP_11)
            .header(header::ACCEPT, "application/json")
            .body(Body::empty())
            .map_err(|_| CallFailure::Unreachable)?;
        let h = req.headers_mut();
        if let Ok(v) = HeaderValue::from_str(&forwarded_for(browser_headers, peer, trusted)) {
            h.insert("x-forwarded-for", v);
        }
        h.insert("x-forwarded-proto", self.forwarded_proto.clone());
        h.insert("x-forwarded-host", self.forwarded_host.clone());
        if let Ok(v) = HeaderValue::from_str(route.prefix.trim_end_matches('/')) {
            h.insert("x-forwarded-prefix", v);
        }
        let mut relay = HeaderValue::from_str(relay).map_err(|_| CallFailure::Unreachable)?;
        relay.set_sensitive(true);
        match route.relay {
            Relay::Bearer => h.insert(header::AUTHORIZATION, relay),
            Relay::Session => h.insert("x-gatehouse-session", relay),
        };
        let call = async {
            let resp = route.client.request(req).await.map_err(|e| {
                tracing::warn!(route = %route.prefix, error = %e, "view part: upstream request failed");
                CallFailure::Unreachable
            })?;
            let status = resp.status();
            if !status.is_success() || status == StatusCode::NO_CONTENT {
                return Err(CallFailure::Status(status.as_u16()));
            }
            let json = resp
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(|v| v.split(';').next().unwrap_or_default().trim().to_ascii_lowercase())
                .is_some_and(|m| m == "application/json" || (m.starts_with("application/") && m.ends_with("+json")));
            if !json {
                return Err(CallFailure::NotJson);
            }
            if let Some(len) =
                resp.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                && len > max_bytes as u64
            {
                return Err(CallFailure::TooLarge);
            }
            let body = Limited::new(resp.into_body(), max_bytes).collect().await.map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    CallFailure::TooLarge
                } else {
                    CallFailure::Unreachable
                }
            })?;
            serde_json::from_slice(&body.to_bytes()).map_err(|_| CallFailure::NotJson)
        };
        tokio::time::timeout(timeout, call).await.unwrap_or(Err(CallFailure::Timeout))
    }
}

/// The browser security headers of a proxied answer, for a view's answer (same origin, same rules).
pub fn security_headers(h: &mut HeaderMap) {
    super::response_headers::apply(h, false);
}
