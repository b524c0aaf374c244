//! The public face's rate limits: every public request per client IP, password logins per IP and
//! per username (SECURITY 18), all through the core's one `Limiter` (shared by every replica with
//! the Redis store). The IP comes from `X-Forwarded-For` only when the direct peer is a configured
//! trusted proxy. Keyed by IP, not by the session cookie: a client could mint fresh cookie values
//! at will, never fresh addresses.

use std::net::{IpAddr, SocketAddr};

use axum::http::HeaderMap;
use axum::response::IntoResponse;
use ipnet::IpNet;

use crate::error::ApiError;
use crate::limit::{Class, Kind, Limiter};

/// Paths the per-IP limit leaves alone: probes, and the server-to-server logout from Keycloak.
pub const UNLIMITED: &[&str] = &["/healthz", "/readyz", "/auth/backchannel-logout"];

/// The public pipeline's per-IP request limit, before routing: the refusal, or `None` to let the
/// request through. A login start counts as a login for the outage policy (refused while Redis
/// is down, by default); everything else as a read.
/// (Takes the request's parts, not the request: its body is not `Sync`, and the check awaits.)
pub async fn refusal(
    st: &super::PublicState,
    path: &str,
    headers: &HeaderMap,
    extensions: &axum::http::Extensions,
) -> Option<axum::response::Response> {
    let limiter = &st.core.limiter;
    if !limiter.is_on(Kind::Request) || UNLIMITED.contains(&path) {
        return None;
    }
    // The listener puts the peer address on every request; without one, fail closed.
    let Some(peer) = extensions.get::<axum::extract::ConnectInfo<SocketAddr>>().map(|c| c.0) else {
        tracing::error!("request without a peer address: refused");
        return Some(ApiError::Internal.into_response());
    };
    let ip = client_ip(peer, headers, &st.settings.trusted_proxies);
    let class = if path == "/auth/login" { Class::Login } else { Class::Read };
    match limiter.check_as(Kind::Request, &ip.to_string(), class).await {
        Ok(d) if d.allowed => None,
        Ok(d) => {
            tracing::debug!(%ip, "request rate limit hit");
            Some(ApiError::TooManyRequests(d).into_response())
        }
        Err(_) => Some(ApiError::StoreUnavailable.into_response()),
    }
}

/// A password login attempt: the client IP's bucket, then the username's (only when the IP's had
/// room, so one IP cannot drain other users' buckets beyond its own limit).
pub async fn login_attempt(limiter: &Limiter, ip: IpAddr, username: &str) -> Result<(), ApiError> {
    for (kind, key) in [(Kind::LoginIp, ip.to_string()), (Kind::LoginUser, username.to_owned())] {
        match limiter.check(kind, &key).await {
            Ok(d) if d.allowed => {}
            Ok(d) => return Err(ApiError::TooManyRequests(d)),
            Err(_) => return Err(ApiError::StoreUnavailable),
        }
    }
    Ok(())
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

    /// Behind several trusted proxies the client is the right-most untrusted hop; what a client
    /// wrote to the left of it (spoofed or garbage) is never read; an unparsable hop our own
    /// proxies wrote stops the walk at the last good one instead of discarding the chain.
    #[test]
    fn xff_walks_trusted_hops_and_stops_at_garbage() {
        let peer: SocketAddr = "10.0.0.5:1000".parse().unwrap();
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap(), "192.168.1.1/32".parse().unwrap()];
        let ip = |values: &[&'static str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append("x-forwarded-for", HeaderValue::from_static(v));
            }
            client_ip(peer, &h, &trusted).to_string()
        };
        assert_eq!(ip(&["6.6.6.6, 1.2.3.4, 192.168.1.1, 10.0.0.7"]), "1.2.3.4", "two trusted hops skipped");
        assert_eq!(ip(&["6.6.6.6, 1.2.3.4", "192.168.1.1"]), "1.2.3.4", "hops over several header lines");
        assert_eq!(ip(&["not-an-ip, 1.2.3.4, 10.0.0.7"]), "1.2.3.4", "garbage left of the client is never read");
        assert_eq!(ip(&["1.2.3.4, 1.2.3.4:5678, 10.0.0.7"]), "10.0.0.7", "an unparsable hop stops the walk");
        assert_eq!(ip(&["1.2.3.4, , 10.0.0.7"]), "10.0.0.7", "an empty hop too");
        assert_eq!(ip(&["10.0.0.9, 10.0.0.8"]), "10.0.0.9", "every hop trusted: the left-most");
        assert_eq!(ip(&["2001:db8::1, 10.0.0.7"]), "2001:db8::1", "IPv6 client");
        assert_eq!(ip(&[]), "10.0.0.5", "no header: the trusted peer itself");
    }

    #[tokio::test]
    async fn login_limits_per_ip_and_per_user() {
        use crate::limit::{OnStoreError, Quota};
        let quotas =
            |ip, user| vec![(Kind::LoginIp, Quota::per_minute(ip)), (Kind::LoginUser, Quota::per_minute(user))];
        let metrics = std::sync::Arc::new(crate::metrics::Metrics::default());
        let l = Limiter::with_quotas(quotas(3, 2), None, OnStoreError::Split, metrics.clone());
        let ip: IpAddr = "1.1.1.1".parse().unwrap();
        assert!(login_attempt(&l, ip, "alice").await.is_ok());
        assert!(login_attempt(&l, ip, "ALICE").await.is_ok());
        let refused = login_attempt(&l, ip, "alice").await;
        assert!(matches!(refused, Err(ApiError::TooManyRequests(d)) if d.kind == Kind::LoginUser), "per-user limit");
        let other = login_attempt(&l, "2.2.2.2".parse().unwrap(), "Alice").await;
        assert!(matches!(other, Err(ApiError::TooManyRequests(_))), "per-user limit holds across IPs");
        let l = Limiter::with_quotas(quotas(2, 100), None, OnStoreError::Split, metrics);
        assert!(login_attempt(&l, ip, "a").await.is_ok() && login_attempt(&l, ip, "b").await.is_ok());
        let refused = login_attempt(&l, ip, "c").await;
        assert!(matches!(refused, Err(ApiError::TooManyRequests(d)) if d.kind == Kind::LoginIp), "per-IP limit");
    }
}
