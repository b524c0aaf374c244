//! `return_to` sanitising (SECURITY 7): only a same-origin absolute path survives, checked after
//! percent-decoding; anything that a browser could read as another origin falls back to `/`.

const MAX_LEN: usize = 2048;

/// A safe local path to send the browser to after login.
pub fn sanitize(raw: Option<&str>) -> String {
    raw.and_then(check).unwrap_or_else(|| "/".to_string())
}

fn check(raw: &str) -> Option<String> {
    if raw.is_empty() || raw.len() > MAX_LEN {
        return None;
    }
    // Decode repeatedly so `%252F` tricks are seen for what they become downstream.
    let mut decoded = raw.to_string();
    for _ in 0..3 {
        let next = percent_encoding::percent_decode_str(&decoded).decode_utf8().ok()?.into_owned();
        if next == decoded {
            break;
        }
        decoded = next;
    }
    for s in [raw, decoded.as_str()] {
        let mut chars = s.chars();
        if chars.next() != Some('/') {
            return None; // not a path: `https:evil`, `evil.com`, ``
        }
        // `//host` and `/\host` are protocol-relative to browsers; control characters (tab,
        // newline) are stripped by URL parsers and would re-open those holes.
        if matches!(chars.next(), Some('/') | Some('\\')) {
            return None;
        }
        if s.chars().any(|c| c.is_control() || c == '\\') {
            return None;
        }
    }
    // Re-serialise through the URL parser against a dummy origin: what comes out is exactly a path
    // (and query) on our own origin.
    let base = url::Url::parse("http://gatehouse.invalid/").ok()?;
    let joined = base.join(raw).ok()?;
    if joined.origin() != base.origin() {
        return None;
    }
    let mut out = joined.path().to_string();
    if let Some(q) = joined.query() {
        out.push('?');
        out.push_str(q);
    }
    if out.starts_with("//") { None } else { Some(out) }
}

#[cfg(test)]
mod tests {
    use super::sanitize;

    #[test]
    fn open_redirect_attempts_fall_back_to_root() {
        for evil in [
            "//evil.com",
            "/\\evil.com",
            "/%2F%2Fevil.com",
            "/%2f/evil.com",
            "https:evil.com",
            "https://evil.com",
            "\t//evil.com",
            "/\t/evil.com",
            "/%09/evil.com",
            "/%5Cevil.com",
            "%2F%2Fevil.com",
            "/%252F%252Fevil.com",
            "javascript:alert(1)",
            "evil.com",
            "",
            "/\n/evil.com",
            "\\\\evil.com",
            "/%E0%A4%A",
            "///evil.com",
        ] {
            assert_eq!(sanitize(Some(evil)), "/", "{evil:?} must not survive");
        }
        assert_eq!(sanitize(None), "/");
        assert_eq!(sanitize(Some(&format!("/{}", "a".repeat(5000)))), "/");
    }

    #[test]
    fn local_paths_survive() {
        assert_eq!(sanitize(Some("/notes")), "/notes");
        assert_eq!(sanitize(Some("/notes?tab=mine")), "/notes?tab=mine");
        assert_eq!(sanitize(Some("/a/../b")), "/b");
        assert_eq!(sanitize(Some("/")), "/");
    }
}
