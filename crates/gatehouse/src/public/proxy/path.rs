//! Which request paths the proxy accepts. Gatehouse and the upstream must agree on what a path
//! means, or `/api/pb/..%2Fadmin` routes one way here and another way there. So only paths whose
//! raw and decoded forms have the same segments are let through: no encoded `/`, `\`, `%` or
//! unreserved characters, no dot segments, no empty segments, no control characters.
//!
//! Hand-written because it is a policy, not a parser: the `url` and `percent-encoding` crates
//! decode faithfully but do not refuse ambiguous forms.

/// `Ok(())` when `raw` (the path without query) is canonical; else why not.
pub fn check(raw: &str) -> Result<(), &'static str> {
    let bytes = raw.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err("path must start with /");
    }
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let (Some(hi), Some(lo)) = (bytes.get(i + 1).and_then(hex), bytes.get(i + 2).and_then(hex)) else {
                    return Err("malformed percent-encoding");
                };
                let decoded = hi << 4 | lo;
                if decoded.is_ascii_alphanumeric() || b"-._~".contains(&decoded) {
                    // Servers differ on whether they decode these before routing.
                    return Err("percent-encoded unreserved character");
                }
                if matches!(decoded, b'/' | b'\\' | b'%' | b';') || decoded < 0x20 || decoded == 0x7f {
                    return Err("percent-encoded separator or control character");
                }
                i += 3;
            }
            // `\` is a separator to some servers; `;` starts path parameters (`..;/`) to others.
            b'\\' | b';' => return Err("backslash or semicolon in path"),
            b if b < 0x20 || b == 0x7f => return Err("control character in path"),
            _ => i += 1,
        }
    }
    // Skip the leading `/`; a trailing `/` leaves one empty last segment, which is fine.
    let segments: Vec<&str> = raw[1..].split('/').collect();
    let last = segments.len().saturating_sub(1);
    for (n, seg) in segments.iter().enumerate() {
        if *seg == "." || *seg == ".." {
            return Err("dot segment in path");
        }
        if seg.is_empty() && n != last {
            return Err("empty segment (//) in path");
        }
    }
    Ok(())
}

fn hex(b: &u8) -> Option<u8> {
    (*b as char).to_digit(16).map(|d| d as u8)
}

#[cfg(test)]
mod tests {
    use super::check;

    #[test]
    fn canonical_paths_pass() {
        for p in [
            "/api/pb/",
            "/api/pb/api/collections/notes/records",
            "/api/pb/api/collections/notes/records/",
            "/api/pb/a%20b",
            "/api/pb/caf%C3%A9",
            "/api/pb/x.y/..z/...",
        ] {
            assert_eq!(check(p), Ok(()), "{p}");
        }
    }

    #[test]
    fn ambiguous_paths_are_refused() {
        for p in [
            "/api/pb/../admin",
            "/api/pb/./x",
            "/api/pb/..",
            "/api/pb/%2e%2e/admin",
            "/api/pb/%2E%2E/admin",
            "/api/pb/..%2Fadmin",
            "/api/pb/..%2fadmin",
            "/api/pb/%5c..%5cadmin",
            "/api/pb/..\\admin",
            "/api/pb/..;/admin",
            "/api/pb//admin",
            "/api//pb/x",
            "/api/%70b/x",
            "/api/pb/%2541",
            "/api/pb/%00",
            "/api/pb/%0d%0aX-Injected:%201",
            "/api/pb/%",
            "/api/pb/%4",
            "/api/pb/%zz",
            "api/pb/x",
            "",
        ] {
            assert!(check(p).is_err(), "{p} must be refused");
        }
    }

    /// Randomised: for any path `check` accepts, the decoded path has the same segments as the raw
    /// one (so a prefix match on either agrees), no dot segments, and no decoded separators. The
    /// alphabet is biased towards the characters that make paths ambiguous.
    #[test]
    fn accepted_paths_mean_the_same_raw_and_decoded() {
        const PIECES: &[&str] = &[
            "/", "/", "a", "b", "api", "pb", ".", "..", "%2e", "%2E", "%2f", "%2F", "%5c", "%25", "%41", "%20",
            "%C3%A9", ";", "\\", "%", "%0", "x%y", "~", "-", "_", "%7e", "//", "%00", "%3B", "?",
        ];
        // xorshift: deterministic, no extra dependency.
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut accepted = 0;
        for _ in 0..200_000 {
            let len = 1 + (next() % 8) as usize;
            let mut path = String::from("/api/pb/");
            for _ in 0..len {
                path.push_str(PIECES[(next() % PIECES.len() as u64) as usize]);
            }
            if check(&path).is_err() {
                continue;
            }
            accepted += 1;
            let decoded: Vec<u8> = percent_encoding::percent_decode_str(&path).collect();
            let decoded = String::from_utf8_lossy(&decoded).to_string();
            let raw_segments: Vec<&str> = path.split('/').collect();
            let decoded_segments: Vec<&str> = decoded.split('/').collect();
            assert_eq!(raw_segments.len(), decoded_segments.len(), "{path} → {decoded}");
            assert!(decoded.starts_with("/api/pb/"), "{path} → {decoded}");
            assert!(!decoded_segments.iter().any(|s| *s == "." || *s == ".."), "{path} → {decoded}");
            assert!(!decoded.contains('\\') && !decoded.contains(';') && !decoded.contains('\0'), "{path} → {decoded}");
        }
        assert!(accepted > 1_000, "the generator must also produce accepted paths ({accepted})");
    }
}
