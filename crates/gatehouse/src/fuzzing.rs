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
    use crate::session::{RecordFormat, SessionRecord};
    let Ok(r) = SessionRecord::decode(data) else { return };
    // What decodes re-encodes (the store writes what it read back on a touch), in both formats,
    // and a record written in the binary format reads back the same, every field.
    let _ = r.encode(RecordFormat::Json);
    let Ok(bytes) = r.encode(RecordFormat::Binary) else {
        // Refused only for what the decoder would refuse (or absurd sizes).
        assert!(r.claims.iss.is_empty() || r.claims.sub.is_empty() || data.len() > 1 << 20, "binary encode");
        return;
    };
    let back = SessionRecord::decode(&bytes);
    assert!(back.is_ok(), "a written binary record reads");
    if let Ok(back) = back {
        assert!(back.sealed_tokens == r.sealed_tokens, "binary round trip: tokens");
        assert!(serde_json::to_value(&back).ok() == serde_json::to_value(&r).ok(), "binary round trip: fields");
    }
}

/// A Redis reply as the store decodes it: the RESP parser, then every shape the store reads —
/// a record (`HGET d`), a SCAN page of session hashes, the GCRA script's four integers.
pub fn redis_reply(data: &[u8]) {
    let Ok(v) = redis::parse_redis_value(data) else { return };
    if let Ok(Some(bytes)) = redis::from_redis_value::<Option<Vec<u8>>>(v.clone()) {
        session_record(&bytes);
    }
    if let Ok((_, page)) = redis::from_redis_value::<(u64, Vec<String>)>(v.clone()) {
        for name in page {
            // As `sessions_by_prefix` reads a SCAN page: the hash between the key's braces.
            let hex = name.trim_start_matches("gatehouse:s:{").trim_end_matches('}');
            let _ = crate::session::redis::parse_hex_key(hex);
        }
    }
    if let Ok((a, r, t, n)) = redis::from_redis_value::<(i64, i64, i64, i64)>(v) {
        let o = crate::session::redis::ratelimit::GcraOutcome::from_reply(a, r, t, n);
        assert!(o.remaining == 0 || n > 0, "{o:?}");
    }
}

/// An Envoy ext_authz `CheckRequest` (protobuf, as Envoy sends it): the original request's
/// headers, method and path as the gRPC face reads them, and the allowed answer built from them.
pub fn ext_authz(data: &[u8]) {
    use envoy_types::pb::envoy::service::auth::v3::CheckRequest as EnvoyCheckRequest;
    use prost::Message;
    let Ok(req) = EnvoyCheckRequest::decode(data) else { return };
    let Some(http) = req.attributes.as_ref().and_then(|a| a.request.as_ref()).and_then(|r| r.http.as_ref()) else {
        return;
    };
    let headers = crate::check::grpc::original_headers(http);
    let Ok(method) = axum::http::Method::from_bytes(http.method.as_bytes()) else { return };
    let path_and_query = if http.path.starts_with('/') { http.path.clone() } else { "/".into() };
    let creq = crate::check::decide::CheckRequest { method, path_and_query, headers: &headers };
    let _ = creq.is_navigation();
    let others = crate::check::decide::other_cookies(&headers, "__Host-Http-gatehouse", "__Host-Http-gatehouse-login");
    let names = others.split(';').map(|p| p.split('=').next().unwrap_or_default().trim());
    assert!(!names.clone().any(|n| n == "__Host-Http-gatehouse"), "the session cookie never goes upstream: {others:?}");
    assert!(!names.clone().any(|n| n == "__Host-Http-gatehouse-login"), "nor the login cookie: {others:?}");
    let _ = crate::check::grpc::allowed(&headers, "token", &[], &others);
}
