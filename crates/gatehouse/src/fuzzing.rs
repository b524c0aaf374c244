//! Entry points for the fuzz targets (`fuzz/`, feature `fuzzing`): every parser of outside input,
//! called the way the server calls it. Each returns nothing: a target fails only by panicking,
//! which is exactly what it must never do.

use axum::http::{HeaderMap, HeaderName, HeaderValue};

use crate::clock::UnixTime;
use crate::oidc::id_token::{self, Expectations, TokenKind};

/// Header lines from fuzz data: `name: value` per line, invalid ones skipped as hyper would refuse them.
fn headers(data: &[u8], default_name: &'static str) -> HeaderMap {
    let mut h = HeaderMap::new();
    for line in data.split(|b| *b == b'\n') {
        let (name, value) = match line.iter().position(|b| *b == b':') {
            Some(i) => (&line[..i], &line[i + 1..]),
            None => (default_name.as_bytes(), line),
        };
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
            h.append(n, v);
        }
    }
    h
}

/// The `Cookie` header(s) and the session id in them.
pub fn cookie_header(data: &[u8]) {
    let h = headers(data, "cookie");
    if let Some(v) = crate::public::cookies::read(&h, "__Host-Http-gatehouse") {
        let _ = crate::session::SessionId::parse(&v);
    }
}

/// A JWT header and claims as every kind (ID, access, logout token): the checks before a key.
pub fn jwt(data: &[u8]) {
    let Ok(token) = std::str::from_utf8(data) else { return };
    for kind in [TokenKind::Id, TokenKind::Access, TokenKind::Logout] {
        let exp = Expectations {
            issuer: "https://idp.example/realms/r",
            client_id: "gatehouse",
            trusted_audiences: &[],
            algorithms: &[jsonwebtoken::Algorithm::RS256, jsonwebtoken::Algorithm::ES256],
            kind,
            nonce: None,
            access_token: None,
            now: 1_800_000_000 as UnixTime,
        };
        let _ = id_token::peek(token, &exp);
    }
}

/// `x-forwarded-client-cert` as Envoy mode reads it.
pub fn xfcc(data: &[u8]) {
    let _ = crate::internal::xfcc::caller(&headers(data, "x-forwarded-client-cert"));
}

/// The proxy's canonical-path check.
pub fn proxy_path(data: &[u8]) {
    if let Ok(p) = std::str::from_utf8(data) {
        let _ = crate::public::proxy::path::check(p);
    }
}

/// `return_to` after login.
pub fn return_to(data: &[u8]) {
    if let Ok(p) = std::str::from_utf8(data) {
        let s = crate::public::return_to::sanitize(Some(p));
        // Whatever came in, what goes out is a same-origin path.
        assert!(s.starts_with('/') && !s.starts_with("//") && !s.starts_with("/\\"), "{s:?}");
    }
}

/// The TOML configuration (parse and validate; no file is read).
pub fn config_toml(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        use figment::providers::{Format, Toml};
        let _ = crate::config::Config::from_figment(figment::Figment::new().merge(Toml::string(text)));
    }
}

/// A stored session record as a store returns it.
pub fn session_record(data: &[u8]) {
    if let Ok(r) = crate::session::SessionRecord::decode(data) {
        // What decodes re-encodes (the store writes what it read back on a touch).
        let _ = r.encode();
    }
}
