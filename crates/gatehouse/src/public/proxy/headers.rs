//! What crosses the proxy in each direction. Towards the upstream: nothing the browser could use
//! to claim an identity (cookies, `Authorization`, identity and forwarding headers, method
//! overrides) — Gatehouse adds its own. Towards the browser: nothing that could set cookies on our
//! origin, open the API to other origins, or act on the whole origin; user data is never cached.

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
    // Client-address and identity headers set by CDNs and other proxies.
    "true-client-ip",
    "cf-connecting-ip",
    "x-client-ip",
    "x-cluster-client-ip",
    "x-authenticated-user",
    "x-webauth-user",
];

/// Request header prefixes never forwarded.
const STRIPPED_REQUEST_PREFIXES: &[&str] = &[
    "x-gatehouse-",
    "x-forwarded-",
    "x-auth-request-",
    "x-remote-",
    "x-ssl-",
    "ssl-client-",
    "x-amzn-oidc-",
    "x-envoy-",
    "x-ms-client-principal",
];

/// Response headers that act on the whole origin, not on one API answer.
const STRIPPED_RESPONSE: &[&str] =
    &["set-cookie", "clear-site-data", "service-worker-allowed", "refresh", "alt-svc", "strict-transport-security"];

/// Hop-by-hop headers (RFC 9110 §7.6.1): they describe one connection, never the next.
const HOP_BY_HOP: &[&str] =
    &["connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "host"];

fn is_stripped_request(name: &str) -> bool {
    // CGI-style servers (WSGI, Rack, PHP) read `X_Forwarded_User` as `X-Forwarded-User`: names
    // with `_` are dropped outright (nginx does the same by default).
    name.contains('_')
        || STRIPPED_REQUEST.contains(&name)
        || STRIPPED_REQUEST_PREFIXES.iter().any(|p| name.starts_with(p))
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

/// Whether the request is a WebSocket handshake. Only WebSocket is tunnelled: an `h2c` upgrade
/// would let the client speak HTTP/2 to the upstream past every check here.
pub fn wants_websocket(headers: &HeaderMap) -> bool {
    headers.get(header::UPGRADE).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"))
        && connection_listed(headers).iter().any(|t| t == "upgrade")
}

/// Clean the upstream's response headers in place. No `Set-Cookie` at all: the upstream never
/// gets the browser's cookies, so its own would only be a way to plant or overflow ours.
pub fn for_browser(headers: &mut HeaderMap, upgraded: bool) {
    let listed = connection_listed(headers);
    let hop: Vec<HeaderName> = headers
        .keys()
        .filter(|name| {
            let n = name.as_str();
            let hop = (HOP_BY_HOP.contains(&n) || listed.iter().any(|l| l == n))
                && !(upgraded && (n == "connection" || n == "upgrade"));
            // CORS is Gatehouse's decision, not the upstream's: the API is same-origin only.
            hop || STRIPPED_RESPONSE.contains(&n) || n.starts_with("access-control-") || n.starts_with("x-gatehouse-")
        })
        .cloned()
        .collect();
    for name in hop {
        headers.remove(name);
    }
    // User data must not outlive the session in a browser or shared cache (SECURITY 8), unless
    // the upstream already said so itself.
    let cacheable = headers
        .get(header::CACHE_CONTROL)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|v| !v.to_ascii_lowercase().contains("no-store"));
    if cacheable && !upgraded {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
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
            ("x_forwarded_user", "admin"),
            ("x_gatehouse_session", "forged"),
            ("cf-connecting-ip", "6.6.6.6"),
            ("x-envoy-original-path", "/admin"),
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
        assert!(wants_websocket(&h));
        assert!(!wants_websocket(&map(&[("connection", "Upgrade"), ("upgrade", "h2c")])), "h2c is never tunnelled");
        let out = for_upstream(&h, true);
        assert_eq!(out.get("connection").unwrap(), "upgrade");
        assert_eq!(out.get("upgrade").unwrap(), "websocket");
        assert_eq!(out.get("sec-websocket-key").unwrap(), "k");
        assert!(!wants_websocket(&map(&[("upgrade", "websocket")])), "Upgrade without Connection: upgrade");
    }

    #[test]
    fn upstream_cannot_set_cookies_open_cors_or_cache_user_data() {
        let mut h = map(&[
            ("set-cookie", "__Host-Http-gatehouse=fixated; Path=/"),
            ("set-cookie", "theme=dark; Path=/"),
            ("access-control-allow-origin", "https://evil.example"),
            ("access-control-allow-credentials", "true"),
            ("x-gatehouse-session", "leak"),
            ("clear-site-data", "\"cookies\""),
            ("service-worker-allowed", "/"),
            ("connection", "close"),
            ("content-type", "text/plain"),
        ]);
        for_browser(&mut h, false);
        let mut names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["cache-control", "content-type"]);
        assert_eq!(h["cache-control"], "no-store", "user data is not cached by default");
        let mut h = map(&[("cache-control", "private, no-store, max-age=0")]);
        for_browser(&mut h, false);
        assert_eq!(h["cache-control"], "private, no-store, max-age=0", "the upstream's own no-store stays");
        let mut h = map(&[("cache-control", "public, max-age=3600")]);
        for_browser(&mut h, false);
        assert_eq!(h["cache-control"], "no-store");
    }
}
