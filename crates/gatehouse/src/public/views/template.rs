//! Part path templates: `api/notes/{id}/comments?owner={claim.sub}`. Values come from the view's
//! path and the session's claims, and are the one place where request input flows into an
//! upstream URL. So a value must be 1–128 characters of `A–Z a–z 0–9 - _ . ~` (and not `.` or
//! `..`), checked on the raw request bytes — no percent-encoding, no non-ASCII look-alikes — and
//! is percent-encoded again on the way in. It can therefore never add a segment, a query or a
//! fragment; anything else is a 400 before any upstream call.

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

use super::config::MAX_PARAM_LEN;
use crate::public::proxy::path;

/// Everything except the unreserved characters is encoded (a no-op for values that passed
/// `check_value`, kept so a future widening of the safe set cannot open a hole).
const ENCODE: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');

/// Session claims a template may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    Sub,
    PreferredUsername,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Literal(String),
    /// Index into the view's path parameters.
    Param(usize),
    Claim(Claim),
}

#[derive(Debug, Clone)]
pub struct Template {
    pieces: Vec<Piece>,
}

/// Why a value cannot be substituted (the message names no value: it may be anything).
pub fn check_value(v: &str) -> Result<(), &'static str> {
    if v.is_empty() || v.len() > MAX_PARAM_LEN {
        return Err("parameter must be 1 to 128 characters");
    }
    if v == "." || v == ".." {
        return Err("parameter may not be a dot segment");
    }
    if !v.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.~".contains(&b)) {
        return Err("parameter may only hold letters, digits, `-`, `_`, `.` and `~`");
    }
    Ok(())
}

impl Template {
    /// Parse and check a template against the view's parameter names.
    pub fn parse(text: &str, params: &[String]) -> Result<Self, String> {
        if text.starts_with('/') {
            return Err(format!("`{text}` must be relative to the route's upstream path (no leading `/`)"));
        }
        if text.bytes().any(|b| b <= b' ' || b == 0x7f || b == b'#' || !b.is_ascii()) {
            return Err(format!("`{text}`: no spaces, control characters, `#` or non-ASCII"));
        }
        let mut pieces = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                pieces.push(Piece::Literal(rest[..open].to_owned()));
            }
            let after = &rest[open + 1..];
            let close = after.find('}').ok_or_else(|| format!("`{text}`: unclosed `{{`"))?;
            let name = &after[..close];
            let piece = match name {
                "claim.sub" => Piece::Claim(Claim::Sub),
                "claim.preferred_username" => Piece::Claim(Claim::PreferredUsername),
                _ => Piece::Param(params.iter().position(|p| p == name).ok_or_else(|| {
                    format!("`{text}`: `{{{name}}}` is neither a parameter of the view's path nor claim.sub / claim.preferred_username")
                })?),
            };
            pieces.push(piece);
            rest = &after[close + 1..];
        }
        if rest.contains('}') {
            return Err(format!("`{text}`: stray `}}`"));
        }
        if !rest.is_empty() {
            pieces.push(Piece::Literal(rest.to_owned()));
        }
        let t = Self { pieces };
        // With a harmless value in every placeholder the path must already be canonical.
        let sample =
            t.render(&vec!["x".to_owned(); params.len()], "x", "x").map_err(|why| format!("`{text}`: {why}"))?;
        if sample.is_empty() {
            return Err("the path is empty".into());
        }
        Ok(t)
    }

    /// The upstream path and query relative to the route's base, or why not.
    pub fn render(&self, params: &[String], sub: &str, username: &str) -> Result<String, &'static str> {
        let mut out = String::new();
        for piece in &self.pieces {
            let value = match piece {
                Piece::Literal(l) => {
                    out.push_str(l);
                    continue;
                }
                Piece::Param(i) => params.get(*i).map(String::as_str).ok_or("missing parameter")?,
                Piece::Claim(Claim::Sub) => sub,
                Piece::Claim(Claim::PreferredUsername) => username,
            };
            check_value(value)?;
            out.extend(utf8_percent_encode(value, ENCODE));
        }
        let path_part = out.split('?').next().unwrap_or_default();
        path::check(&format!("/{path_part}"))?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn templates_render_params_and_claims() {
        let t = Template::parse("api/notes/{id}/x?owner={claim.sub}", &params(&["id"])).unwrap();
        assert_eq!(t.render(&params(&["n-1_a.b~"]), "u1", "alice").unwrap(), "api/notes/n-1_a.b~/x?owner=u1");
        let t = Template::parse("users/{claim.preferred_username}", &[]).unwrap();
        assert_eq!(t.render(&[], "s", "bob").unwrap(), "users/bob");
    }

    #[test]
    fn bad_templates_are_refused() {
        for bad in ["/abs", "a/{nope}", "a/{id", "a}/b", "a#frag", "a b", "a/../b", "a//b", "a/%2f", "ä"] {
            assert!(Template::parse(bad, &params(&["id"])).is_err(), "{bad}");
        }
    }

    #[test]
    fn injected_values_are_refused() {
        let t = Template::parse("api/{id}", &params(&["id"])).unwrap();
        let long = "a".repeat(129);
        for v in [
            "..",
            ".",
            "a/b",
            "a%2fb",
            "a?x=1",
            "a#b",
            "a b",
            "",
            "\u{2024}\u{2024}",
            "a\u{ff0f}b",
            "é",
            long.as_str(),
            "a;b",
            "a\\b",
            "a\nb",
        ] {
            assert!(t.render(&params(&[v]), "s", "u").is_err(), "{v:?} must be refused");
        }
        assert!(t.render(&params(&[&"a".repeat(128)]), "s", "u").is_ok(), "128 characters pass");
    }
}
