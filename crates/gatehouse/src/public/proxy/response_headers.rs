//! Browser security headers on proxied responses. A proxied answer is served from Gatehouse's
//! origin, so its headers act on that origin: an upstream's permissive (or absent)
//! `Content-Security-Policy` would let an uploaded HTML or SVG file run script next to the
//! session, and framing or sniffing headers left to the upstream would do the same for
//! clickjacking and content sniffing. Gatehouse therefore sets its own, replacing the upstream's,
//! unless the route opts out with `upstream_security_headers = true` (for an upstream that serves
//! an application with a policy of its own).
//!
//! This is the response side only; what crosses towards the upstream and the cookie/CORS rules
//! towards the browser are in `headers.rs`.

use axum::http::header::{HeaderMap, HeaderValue};

/// The policy for proxied answers: they are API data and files, never a page that loads
/// anything. `sandbox` makes a document opened from the API (an uploaded HTML or SVG file) a
/// unique origin without script, so it cannot reach the session's same-origin API.
pub const PROXIED_CSP: &str =
    "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'; sandbox";

/// Marks a response whose upstream keeps its own security headers (the route opted out); the
/// public router's header guard then only fills in what is missing instead of replacing.
#[derive(Debug, Clone, Copy)]
pub struct UpstreamSecurityHeaders;

/// The headers Gatehouse sets on every proxied response, replacing the upstream's.
const PROXIED: &[(&str, &str)] = &[
    ("content-security-policy", PROXIED_CSP),
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "DENY"),
    ("referrer-policy", "no-referrer"),
    // API data is for this origin's pages only; other sites must not embed it (`<img>`,
    // `<script>`), which also keeps it out of their process (Spectre-class leaks).
    ("cross-origin-resource-policy", "same-origin"),
];

/// Headers dropped from an upstream answer unless the route opts out: a report-only policy
/// would send reports (with our URLs) wherever the upstream says.
const DROPPED: &[&str] = &["content-security-policy-report-only", "report-to", "reporting-endpoints"];

/// Set Gatehouse's security headers on a proxied response, or with `keep_upstream` leave the
/// upstream's in place (the public header guard still adds any that are missing).
pub fn apply(headers: &mut HeaderMap, keep_upstream: bool) {
    if keep_upstream {
        return;
    }
    for name in DROPPED {
        headers.remove(*name);
    }
    for (name, value) in PROXIED {
        // `insert` replaces every value of the name: an upstream cannot add a second, weaker one.
        headers.insert(*name, HeaderValue::from_static(value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_security_headers_are_replaced_by_ours() {
        let mut h = HeaderMap::new();
        h.append("content-security-policy", HeaderValue::from_static("default-src * 'unsafe-inline' 'unsafe-eval'"));
        h.append("content-security-policy", HeaderValue::from_static("script-src *"));
        h.insert(
            "content-security-policy-report-only",
            HeaderValue::from_static("default-src 'none'; report-uri https://evil.example/r"),
        );
        h.insert("x-frame-options", HeaderValue::from_static("ALLOWALL"));
        h.insert("x-content-type-options", HeaderValue::from_static("sniff"));
        h.insert("referrer-policy", HeaderValue::from_static("unsafe-url"));
        h.insert("cross-origin-resource-policy", HeaderValue::from_static("cross-origin"));
        h.insert("content-type", HeaderValue::from_static("text/html"));
        apply(&mut h, false);
        let csp: Vec<_> = h.get_all("content-security-policy").iter().collect();
        assert_eq!(csp, [PROXIED_CSP], "one policy, ours");
        assert!(h.get("content-security-policy-report-only").is_none());
        assert_eq!(h["x-frame-options"], "DENY");
        assert_eq!(h["x-content-type-options"], "nosniff");
        assert_eq!(h["referrer-policy"], "no-referrer");
        assert_eq!(h["cross-origin-resource-policy"], "same-origin");
        assert_eq!(h["content-type"], "text/html", "other headers untouched");

        let mut h = HeaderMap::new();
        apply(&mut h, false);
        assert_eq!(h["content-security-policy"], PROXIED_CSP, "set when the upstream sent none");
    }

    #[test]
    fn a_route_that_opts_out_keeps_the_upstreams() {
        let mut h = HeaderMap::new();
        h.insert("content-security-policy", HeaderValue::from_static("default-src 'self'"));
        h.insert("x-frame-options", HeaderValue::from_static("SAMEORIGIN"));
        apply(&mut h, true);
        assert_eq!(h["content-security-policy"], "default-src 'self'");
        assert_eq!(h["x-frame-options"], "SAMEORIGIN");
    }
}
