//! What crosses the proxy in each direction. Towards the upstream: nothing the browser could use
//! to claim an identity (cookies, `Authorization`, identity and forwarding headers, method
//! overrides) — Gatehouse adds its own. Towards the browser: nothing that could plant our cookies
//! or open the API to other origins.

use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Request headers never forwarded, by exact name (lower-case).
const STRIPPED_REQUEST: &[&str] = &[
    "cookie",
    "authorization",
    "proxy-authorization",
    "forwarded",
    "x-real-ip",
    "x-remote-user",
    "remote-user",
    "x-user",
    "x-email",
    "x-userinfo",
    "x-id-token",
    "x-access-token",
    "x-client-cert",
    "x-client-verify",
    "x-forwarded-client-cert",
    // Method overrides would turn a CSRF-exempt GET into a DELETE behind our back.
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    // Path overrides honoured by some frameworks bypass prefix routing.
    "x-original-url",
    "x-original-uri",
    "x-rewrite-url",
    "x-csrf",
];

/// Request header prefixes never forwarded.
const STRIPPED_REQUEST_PREFIXES: &[&str] =
    &["x-gatehouse-", "x-forwarded-", "x-auth-request-", "x-remote-", "x-ssl-", "ssl-client-", "x-amzn-oidc-"];

/// Hop-by-hop headers (RFC 9110 §7.6.1): they describe one connection, never the next.
const HOP_BY_HOP: &[&str] =
    &["connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "host"];

fn is_stripped_request(name: &str) -> bool {
    STRIPPED_REQUEST.contains(&name) || STRIPPED_REQUEST_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// Names listed in `Connection` are hop-by-hop too.
fn connection_listed(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

/// The request headers to forward. `upgrade` keeps `Connection: upgrade` + `Upgrade` for WebSockets.
pub fn for_upstream(incoming: &HeaderMap, upgrade: bool) -> HeaderMap {
    let listed = connection_listed(incoming);
    let mut out = HeaderMap::with_capacity(incoming.len() + 6);
    for (name, value) in incoming {
        let n = name.as_str();
        if HOP_BY_HOP.contains(&n) || is_stripped_request(n) || listed.iter().any(|l| l == n) {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    if upgrade && let Some(proto) = incoming.get(header::UPGRADE) {
        out.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        out.insert(header::UPGRADE, proto.clone());
    }
    out
}

/// Whether the request asks for a protocol upgrade (WebSocket).
pub fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE) && connection_listed(headers).iter().any(|t| t == "upgrade")
}

/// Clean the upstream's response headers in place. `our_cookies` are the session and login
/// cookie names: an upstream must not set, replace or clear them (session fixation).
pub fn for_browser(headers: &mut HeaderMap, upgraded: bool, our_cookies: &[&str]) {
    let listed = connection_listed(headers);
    let hop: Vec<HeaderName> = headers
        .keys()
        .filter(|name| {
            let n = name.as_str();
            let hop = (HOP_BY_HOP.contains(&n) || listed.iter().any(|l| l == n))
                && !(upgraded && (n == "connection" || n == "upgrade"));
            // CORS is Gatehouse's decision, not the upstream's: the API is same-origin only.
            hop || n.starts_with("access-control-") || n.starts_with("x-gatehouse-")
        })
        .cloned()
        .collect();
    for name in hop {
        headers.remove(name);
    }
    let cookies: Vec<HeaderValue> = headers.get_all(header::SET_COOKIE).iter().cloned().collect();
    if cookies.is_empty() {
        return;
    }
    headers.remove(header::SET_COOKIE);
    for value in cookies {
        let name = value.to_str().ok().and_then(|v| v.split('=').next()).map(str::trim).unwrap_or("");
        // Case-insensitive: some browsers treat `__host-` like `__Host-`.
        if !name.is_empty() && !our_cookies.iter().any(|c| c.eq_ignore_ascii_case(name)) {
            headers.append(header::SET_COOKIE, value);
        } else {
            tracing::warn!(cookie = name, "upstream tried to set a Gatehouse cookie; dropped");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn identity_and_hop_by_hop_headers_never_reach_the_upstream() {
        let h = map(&[
            ("cookie", "__Host-Http-gatehouse=secret"),
            ("Authorization", "Bearer forged"),
            ("X-Gatehouse-Session", "forged"),
            ("x-gatehouse-anything", "x"),
            ("X-Forwarded-User", "admin"),
            ("x-forwarded-for", "6.6.6.6"),
            ("x-auth-request-email", "admin@example.com"),
            ("remote-user", "admin"),
            ("x-http-method-override", "DELETE"),
            ("x-original-url", "/admin"),
            ("forwarded", "for=6.6.6.6"),
            ("connection", "keep-alive, x-custom-hop"),
            ("x-custom-hop", "1"),
            ("transfer-encoding", "chunked"),
            ("te", "trailers"),
            ("host", "evil.example"),
            ("upgrade", "websocket"),
            ("accept", "application/json"),
            ("content-type", "application/json"),
            ("x-request-id", "abc"),
        ]);
        let out = for_upstream(&h, false);
        let names: Vec<&str> = out.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["accept", "content-type", "x-request-id"]);
    }

    #[test]
    fn websocket_upgrade_keeps_only_its_own_hop_headers() {
        let h = map(&[("connection", "Upgrade"), ("upgrade", "websocket"), ("sec-websocket-key", "k")]);
        assert!(wants_upgrade(&h));
        let out = for_upstream(&h, true);
        assert_eq!(out.get("connection").unwrap(), "upgrade");
        assert_eq!(out.get("upgrade").unwrap(), "websocket");
        assert_eq!(out.get("sec-websocket-key").unwrap(), "k");
        assert!(!wants_upgrade(&map(&[("upgrade", "websocket")])), "Upgrade without Connection: upgrade");
    }

    #[test]
    fn upstream_cannot_plant_our_cookies_or_cors() {
        let mut h = map(&[
            ("set-cookie", "__Host-Http-gatehouse=fixated; Path=/"),
            ("set-cookie", "__host-http-gatehouse=fixated; Path=/"),
            ("set-cookie", "__Host-Http-gatehouse-login=x"),
            ("set-cookie", "theme=dark; Path=/"),
            ("access-control-allow-origin", "https://evil.example"),
            ("access-control-allow-credentials", "true"),
            ("x-gatehouse-session", "leak"),
            ("connection", "close"),
            ("content-type", "text/plain"),
        ]);
        for_browser(&mut h, false, &["__Host-Http-gatehouse", "__Host-Http-gatehouse-login"]);
        let cookies: Vec<&str> = h.get_all("set-cookie").iter().map(|v| v.to_str().unwrap()).collect();
        assert_eq!(cookies, ["theme=dark; Path=/"]);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["set-cookie", "content-type"]);
    }
}
