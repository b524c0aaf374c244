//! Rate limits: every public request per client IP, password logins per IP and per username
//! (SECURITY 18). The IP comes from `X-Forwarded-For` only when the direct peer is a configured
//! trusted proxy. Keyed by IP, not by the session cookie: a client could mint fresh cookie values
//! at will, never fresh addresses.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;

use axum::http::HeaderMap;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use ipnet::IpNet;

pub struct LoginLimits {
    per_ip: DefaultKeyedRateLimiter<IpAddr>,
    per_user: DefaultKeyedRateLimiter<String>,
}

impl LoginLimits {
    pub fn new(per_ip_per_minute: u32, per_user_per_minute: u32) -> Self {
        let q = |n: u32| Quota::per_minute(NonZeroU32::new(n.max(1)).unwrap_or(NonZeroU32::MIN));
        Self { per_ip: RateLimiter::keyed(q(per_ip_per_minute)), per_user: RateLimiter::keyed(q(per_user_per_minute)) }
    }

    /// Both buckets must have room; usernames compare case-insensitively (Keycloak's do).
    pub fn check(&self, ip: IpAddr, username: &str) -> bool {
        self.per_ip.check_key(&ip).is_ok() && self.per_user.check_key(&username.to_lowercase()).is_ok()
    }

    /// Forget idle keys; called periodically or memory grows with every IP ever seen.
    pub fn retain_recent(&self) {
        self.per_ip.retain_recent();
        self.per_user.retain_recent();
    }
}

/// All public requests, per client IP (health checks and Keycloak's back-channel call excepted).
pub struct RequestLimits {
    per_ip: Option<DefaultKeyedRateLimiter<IpAddr>>,
}

impl RequestLimits {
    pub fn new(per_second: u32, burst: u32) -> Self {
        let per_ip = NonZeroU32::new(per_second).map(|rate| {
            let burst = NonZeroU32::new(burst.max(per_second)).unwrap_or(rate);
            RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst))
        });
        Self { per_ip }
    }

    pub fn check(&self, ip: IpAddr) -> bool {
        self.per_ip.as_ref().is_none_or(|l| l.check_key(&ip).is_ok())
    }

    pub fn retain_recent(&self) {
        if let Some(l) = &self.per_ip {
            l.retain_recent();
        }
    }
}

/// Paths the per-IP limit leaves alone: probes, and the server-to-server logout from Keycloak.
pub const UNLIMITED: &[&str] = &["/healthz", "/readyz", "/auth/backchannel-logout"];

pub async fn limit(
    axum::extract::State(st): axum::extract::State<std::sync::Arc<super::PublicState>>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<SocketAddr>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    if st.requests.per_ip.is_some() && !UNLIMITED.contains(&req.uri().path()) {
        let ip = client_ip(peer, req.headers(), &st.settings.trusted_proxies);
        if !st.requests.check(ip) {
            tracing::debug!(%ip, "request rate limit hit");
            st.core.metrics.rate_limited("request");
            return crate::error::ApiError::TooManyRequests.into_response();
        }
    }
    next.run(req).await
}

/// The client's IP: the peer, or the right-most untrusted `X-Forwarded-For` hop behind trusted proxies.
pub fn client_ip(peer: SocketAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    let mut ip = peer.ip();
    if !is_trusted(&ip) {
        return ip;
    }
    let hops: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    // Walk from the right (the hops our proxies appended); stop at the first unparsable entry
    // rather than discarding the chain, so one bad hop cannot pool clients into one bucket.
    for hop in hops.into_iter().rev() {
        let Ok(hop) = hop.parse::<IpAddr>() else { break };
        ip = hop;
        if !is_trusted(&hop) {
            break;
        }
    }
    ip
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn xff_only_from_trusted_proxies() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("6.6.6.6, 1.2.3.4"));
        let peer: SocketAddr = "10.0.0.5:1000".parse().unwrap();
        assert_eq!(client_ip(peer, &h, &[]), peer.ip(), "untrusted peer: header ignored");
        let trusted = vec!["10.0.0.0/8".parse().unwrap()];
        assert_eq!(
            client_ip(peer, &h, &trusted),
            "1.2.3.4".parse::<IpAddr>().unwrap(),
            "right-most hop, not the spoofable left"
        );
    }

    #[test]
    fn request_limit_per_ip_with_burst() {
        let l = RequestLimits::new(1, 3);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        assert!((0..3).all(|_| l.check(a)), "the burst passes");
        assert!(!l.check(a), "then the rate holds");
        assert!(l.check("10.0.0.2".parse().unwrap()), "other clients have their own bucket");
        let off = RequestLimits::new(0, 0);
        assert!((0..10_000).all(|_| off.check(a)), "0 turns it off");
    }

    #[test]
    fn limits_per_ip_and_per_user() {
        let l = LoginLimits::new(3, 2);
        let ip: IpAddr = "1.1.1.1".parse().unwrap();
        assert!(l.check(ip, "alice"));
        assert!(l.check(ip, "ALICE"));
        assert!(!l.check(ip, "alice"), "per-user limit");
        assert!(!l.check("2.2.2.2".parse().unwrap(), "Alice"), "per-user limit holds across IPs");
        let l = LoginLimits::new(2, 100);
        assert!(l.check(ip, "a") && l.check(ip, "b"));
        assert!(!l.check(ip, "c"), "per-IP limit");
    }
}
