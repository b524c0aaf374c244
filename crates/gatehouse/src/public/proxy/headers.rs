//! What crosses the proxy in each direction. Towards the upstream: nothing the browser could use
//! to claim an identity (cookies, `Authorization`, identity and forwarding headers, method
//! overrides) — Gatehouse adds its own. Towards the browser: nothing that could set cookies on our
//! origin, open the API to other origins, or act on the whole origin; user data is never cached.

use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Request headers never forwarded, by exact name (lower-case), in either policy.
const STRIPPED_REQUEST: &[&str] = &[
    "cookie",
    "authorization",
    "proxy-authorization",
    "forwarded",
    "x-real-ip",
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
    // Client-address headers set by CDNs and other proxies.
    "true-client-ip",
    "cf-connecting-ip",
    "x-client-ip",
    "x-cluster-client-ip",
    // API keys: a browser-supplied one could pass for a service's credential upstream.
    "x-api-key",
    "api-key",
    "apikey",
    // W3C baggage is browser-controlled key=value data that upstream SDKs read (`enduser.id=…`).
    "baggage",
];

/// Request header prefixes never forwarded, in either policy.
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
    "x-goog-authenticated-",
    "x-apigateway-",
    "cf-access-",
    // Client-certificate and client-identity headers of other proxies (x-client-dn, -cert-chain…).
    "x-client-",
];

/// Words that make a header name identity-looking wherever they stand between `-`s:
/// `X-User-Id`, `X-Auth-Roles`, `Remote-Groups`, `X-Tenant`, `X-Consumer-Username`, `X-Email` …
/// Matching families rather than a fixed list of names is the point: upstreams trust whatever
/// spelling their framework documents, and a browser can send any of them.
const IDENTITY_WORDS: &[&str] = &[
    "user",
    "users",
    "username",
    "userid",
    "uid",
    "userinfo",
    "email",
    "mail",
    "role",
    "roles",
    "group",
    "groups",
    "tenant",
    "tenants",
    "tenantid",
    "principal",
    "identity",
    "subject",
    "sub",
    "auth",
    "authn",
    "authz",
    "authenticated",
    "authorization",
    "authorized",
    "claim",
    "claims",
    "scope",
    "scopes",
    "permission",
    "permissions",
    "impersonate",
    "impersonation",
    "remote",
    "account",
    "accountid",
    "org",
    "organization",
    "consumer",
    "credential",
    "credentials",
    "token",
    "jwt",
    "idtoken",
    "oidc",
    "saml",
    "login",
    "admin",
    "session",
    "webauth",
    // Joined spellings and client-certificate identities.
    "remoteuser",
    "authuser",
    "useremail",
    "clientcert",
    "cert",
    "certificate",
    "dn",
];

/// Standard request headers (lower-case) that are never identity headers: kept in both policies,
/// and the only ones besides a route's `request_headers` in allow-list mode.
const STANDARD_REQUEST: &[&str] = &[
    "accept",
    "accept-charset",
    "accept-encoding",
    "accept-language",
    "cache-control",
    "content-encoding",
    "content-language",
    "content-length",
    "content-type",
    "date",
    "dnt",
    "expect",
    "if-match",
    "if-modified-since",
    "if-none-match",
    "if-range",
    "if-unmodified-since",
    "last-event-id",
    "origin",
    "pragma",
    "priority",
    "range",
    "referer",
    "sec-gpc",
    "sec-websocket-extensions",
    "sec-websocket-key",
    "sec-websocket-protocol",
    "sec-websocket-version",
    "traceparent",
    "tracestate",
    "upgrade-insecure-requests",
    "user-agent",
    "x-request-id",
    "x-requested-with",
];

/// Framework anti-CSRF headers forwarded by the default policy although `token` is an identity word.
const CSRF_TOKEN_HEADERS: &[&str] = &["x-csrf-token", "x-xsrf-token"];

/// Standard prefixes kept in both policies (client hints and fetch metadata).
const STANDARD_REQUEST_PREFIXES: &[&str] = &["sec-ch-", "sec-fetch-"];

/// Which request headers a route forwards (`routes.request_headers`).
#[derive(Debug, Clone, Default)]
pub enum RequestHeaderPolicy {
    /// Everything except the stripped names and the identity-looking families.
    #[default]
    DenyIdentity,
    /// Only the standard headers plus these (lower-case) names.
    AllowOnly(Vec<String>),
}

fn is_standard(name: &str) -> bool {
    STANDARD_REQUEST.contains(&name) || STANDARD_REQUEST_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// Never forwarded, whatever a route's policy says (`check-config` refuses such names in a list).
pub fn is_always_stripped(name: &str) -> bool {
    // CGI-style servers (WSGI, Rack, PHP) read `X_Forwarded_User` as `X-Forwarded-User`: names
    // with `_` are dropped outright (nginx does the same by default).
    name.contains('_')
        || STRIPPED_REQUEST.contains(&name)
        || STRIPPED_REQUEST_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// Whether a non-standard header name belongs to an identity-looking family.
pub fn is_identity_looking(name: &str) -> bool {
    name.split('-').any(|word| IDENTITY_WORDS.contains(&word))
}

fn forwarded(name: &str, policy: &RequestHeaderPolicy) -> bool {
    if is_always_stripped(name) {
        return false;
    }
    if is_standard(name) {
        return true;
    }
    match policy {
        // Anti-CSRF token headers of common frameworks carry no identity, only a per-page nonce.
        RequestHeaderPolicy::DenyIdentity => !is_identity_looking(name) || CSRF_TOKEN_HEADERS.contains(&name),
        RequestHeaderPolicy::AllowOnly(listed) => listed.iter().any(|l| l == name),
    }
}

/// Response headers that act on the whole origin, not on one API answer.
const STRIPPED_RESPONSE: &[&str] =
    &["set-cookie", "clear-site-data", "service-worker-allowed", "refresh", "alt-svc", "strict-transport-security"];

/// Hop-by-hop headers (RFC 9110 §7.6.1): they describe one connection, never the next.
const HOP_BY_HOP: &[&str] =
    &["connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "host"];

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
pub fn for_upstream(incoming: &HeaderMap, upgrade: bool, policy: &RequestHeaderPolicy) -> HeaderMap {
    let listed = connection_listed(incoming);
    let mut out = HeaderMap::with_capacity(incoming.len() + 6);
    for (name, value) in incoming {
        let n = name.as_str();
        if HOP_BY_HOP.contains(&n) || !forwarded(n, policy) || listed.iter().any(|l| l == n) {
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
        let out = for_upstream(&h, false, &RequestHeaderPolicy::DenyIdentity);
        let names: Vec<&str> = out.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["accept", "content-type", "x-request-id"]);
    }

    /// Every spelling an upstream framework might trust for identity, generated from the families
    /// (prefixes × identity words × suffixes, in several cases), is dropped; ordinary application
    /// headers pass.
    #[test]
    fn generated_identity_headers_never_reach_the_upstream() {
        let prefixes = ["x-", "x-auth-", "x-authenticated-", "x-remote-", "remote-", "x-forwarded-", "x-consumer-", ""];
        let words = [
            "user",
            "user-id",
            "userid",
            "email",
            "roles",
            "role",
            "groups",
            "tenant",
            "principal",
            "sub",
            "subject",
            "username",
            "scopes",
            "claims",
            "org",
            "account-id",
            "jwt",
            "token",
            "identity",
            "admin",
        ];
        let suffixes = ["", "-id", "-name", "-list"];
        let mut generated = Vec::new();
        for p in prefixes {
            for w in words {
                for s in suffixes {
                    generated.push(format!("{p}{w}{s}"));
                }
            }
        }
        let mut h = HeaderMap::new();
        for (i, name) in generated.iter().enumerate() {
            let spelled = if i % 2 == 0 { name.to_ascii_uppercase() } else { name.clone() };
            h.append(HeaderName::from_bytes(spelled.as_bytes()).unwrap(), HeaderValue::from_static("admin"));
            h.append(
                HeaderName::from_bytes(spelled.replace('-', "_").as_bytes()).unwrap(),
                HeaderValue::from_static("admin"),
            );
        }
        for extra in [
            "x-client-dn",
            "x-tls-client-cert",
            "x-arr-clientcert",
            "x-remoteuser",
            "x-authuser",
            "x-api-key",
            "apikey",
            "baggage",
        ] {
            h.append(HeaderName::from_static(extra), HeaderValue::from_static("admin"));
        }
        for ok in [
            "accept",
            "x-request-id",
            "x-feature-flag",
            "x-page-size",
            "if-none-match",
            "sec-fetch-site",
            "x-xsrf-token",
        ] {
            h.append(HeaderName::from_static(ok), HeaderValue::from_static("1"));
        }
        let out = for_upstream(&h, false, &RequestHeaderPolicy::DenyIdentity);
        let mut names: Vec<&str> = out.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "accept",
                "if-none-match",
                "sec-fetch-site",
                "x-feature-flag",
                "x-page-size",
                "x-request-id",
                "x-xsrf-token"
            ]
        );
        assert!(generated.len() > 500, "{} names generated", generated.len());
    }

    #[test]
    fn allow_list_forwards_only_standard_headers_and_the_listed_ones() {
        let h = map(&[
            ("accept", "application/json"),
            ("x-feature-flag", "on"),
            ("x-tenant-hint", "blue"),
            ("x-user-id", "admin"),
            ("cookie", "a=b"),
            ("x-gatehouse-session", "forged"),
        ]);
        let policy = RequestHeaderPolicy::AllowOnly(vec!["x-tenant-hint".into()]);
        let out = for_upstream(&h, false, &policy);
        let mut names: Vec<&str> = out.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["accept", "x-tenant-hint"]);
    }

    #[test]
    fn websocket_upgrade_keeps_only_its_own_hop_headers() {
        let h = map(&[("connection", "Upgrade"), ("upgrade", "websocket"), ("sec-websocket-key", "k")]);
        assert!(wants_websocket(&h));
        assert!(!wants_websocket(&map(&[("connection", "Upgrade"), ("upgrade", "h2c")])), "h2c is never tunnelled");
        let out = for_upstream(&h, true, &RequestHeaderPolicy::DenyIdentity);
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
