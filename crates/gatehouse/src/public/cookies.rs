//! Reading and writing our cookies. The session cookie carries only the opaque id; the login
//! cookie carries the sealed `state`/`nonce`/PKCE verifier of a login in flight.

use axum::http::{HeaderMap, HeaderValue, header};
use cookie::{Cookie, SameSite as CookieSameSite};

use crate::config::{CookieSettings, SameSite};

/// Cookie headers longer than this are not parsed at all.
const MAX_COOKIE_HEADER: usize = 8 * 1024;

/// The value of cookie `name`, if present exactly once. Duplicates are refused rather than guessed at.
pub fn read(headers: &HeaderMap, name: &str) -> Option<String> {
    let mut found = None;
    for value in headers.get_all(header::COOKIE) {
        let bytes = value.as_bytes();
        if bytes.len() > MAX_COOKIE_HEADER {
            return None;
        }
        let text = std::str::from_utf8(bytes).ok()?;
        for c in Cookie::split_parse(text).flatten() {
            if c.name() == name {
                if found.is_some() {
                    return None;
                }
                found = Some(c.value().to_owned());
            }
        }
    }
    found
}

fn build(settings: &CookieSettings, name: &str, value: &str, max_age: Option<i64>, same_site: SameSite) -> HeaderValue {
    let mut c =
        Cookie::build((name, value)).http_only(true).secure(settings.secure).path("/").same_site(match same_site {
            SameSite::Lax => CookieSameSite::Lax,
            SameSite::Strict => CookieSameSite::Strict,
        });
    if let Some(age) = max_age {
        c = c.max_age(cookie::time::Duration::seconds(age));
    }
    // Values are base64url we minted; a header value cannot fail to build from them.
    HeaderValue::from_str(&c.build().to_string()).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// The session cookie: a browser-session cookie (no Max-Age): the server decides when it ends.
pub fn session(settings: &CookieSettings, id: &str) -> HeaderValue {
    build(settings, &settings.name, id, None, settings.same_site)
}

pub fn clear_session(settings: &CookieSettings) -> HeaderValue {
    build(settings, &settings.name, "", Some(0), settings.same_site)
}

/// The login cookie must be `Lax`: it has to come back on the top-level redirect from Keycloak.
pub fn login(settings: &CookieSettings, value: &str, max_age: i64) -> HeaderValue {
    build(settings, &settings.login_name, value, Some(max_age), SameSite::Lax)
}

pub fn clear_login(settings: &CookieSettings) -> HeaderValue {
    build(settings, &settings.login_name, "", Some(0), SameSite::Lax)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> CookieSettings {
        CookieSettings {
            name: "__Host-Http-gatehouse".into(),
            login_name: "__Host-Http-gatehouse-login".into(),
            secure: true,
            same_site: SameSite::Lax,
        }
    }

    #[test]
    fn session_cookie_attributes() {
        let v = session(&settings(), "abc").to_str().unwrap().to_string();
        assert!(v.starts_with("__Host-Http-gatehouse=abc"));
        for attr in ["HttpOnly", "Secure", "Path=/", "SameSite=Lax"] {
            assert!(v.contains(attr), "{v} lacks {attr}");
        }
        assert!(!v.to_ascii_lowercase().contains("domain"));
    }

    #[test]
    fn duplicate_or_oversized_cookies_are_refused() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("a=1; __Host-Http-gatehouse=x; b=2"));
        assert_eq!(read(&h, "__Host-Http-gatehouse").as_deref(), Some("x"));
        h.append(header::COOKIE, HeaderValue::from_static("__Host-Http-gatehouse=y"));
        assert_eq!(read(&h, "__Host-Http-gatehouse"), None);
        let mut big = HeaderMap::new();
        big.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("__Host-Http-gatehouse={}", "a".repeat(9000))).unwrap(),
        );
        assert_eq!(read(&big, "__Host-Http-gatehouse"), None);
    }
}
