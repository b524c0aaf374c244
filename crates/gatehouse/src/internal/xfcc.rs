//! Envoy's `x-forwarded-client-cert` header (behind-Envoy mode only): the caller is the `URI=` of
//! the last element, the hop Envoy itself verified. Written by hand: no maintained crate parses
//! XFCC, and the grammar is small (elements split by `,`, pairs by `;`, values optionally quoted).

use axum::http::HeaderMap;

use crate::tls::identity::{CallerIdentity, parse_spiffe_id};

const MAX_LEN: usize = 16 * 1024;

pub fn caller(headers: &HeaderMap) -> Result<CallerIdentity, &'static str> {
    let mut values = headers.get_all("x-forwarded-client-cert").iter();
    let value = values.next().ok_or("no x-forwarded-client-cert header")?;
    if values.next().is_some() {
        return Err("more than one x-forwarded-client-cert header");
    }
    let text = value.to_str().map_err(|_| "x-forwarded-client-cert is not ASCII")?;
    if text.len() > MAX_LEN {
        return Err("x-forwarded-client-cert too long");
    }
    // An unbalanced quote could swallow the element Envoy appended and let the client's own
    // forged element stand as the last one: refuse it outright.
    let elements = split_unquoted(text, ',').ok_or("unbalanced quotes in x-forwarded-client-cert")?;
    let last = elements.last().ok_or("empty x-forwarded-client-cert")?;
    let mut uri = None;
    for pair in split_unquoted(last, ';').ok_or("unbalanced quotes in x-forwarded-client-cert")? {
        let (k, v) = pair.split_once('=').ok_or("malformed x-forwarded-client-cert")?;
        if k.trim().eq_ignore_ascii_case("uri") {
            if uri.is_some() {
                return Err("more than one URI in x-forwarded-client-cert");
            }
            uri = Some(unquote(v.trim())?);
        }
    }
    parse_spiffe_id(&uri.ok_or("no URI in x-forwarded-client-cert")?).map(CallerIdentity::Spiffe)
}

fn split_unquoted(s: &str, sep: char) -> Option<Vec<&str>> {
    let (mut out, mut start, mut quoted, mut escaped) = (Vec::new(), 0, false, false);
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            c if c == sep && !quoted => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    (!quoted).then_some(out)
}

fn unquote(v: &str) -> Result<String, &'static str> {
    match v.strip_prefix('"') {
        Some(rest) => rest.strip_suffix('"').map(|s| s.replace("\\\"", "\"")).ok_or("unterminated quote"),
        None => Ok(v.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn h(v: &str) -> HeaderMap {
        let mut m = HeaderMap::new();
        m.insert("x-forwarded-client-cert", HeaderValue::from_str(v).unwrap());
        m
    }

    #[test]
    fn last_element_uri_wins() {
        let v = r#"By=spiffe://c/gw;Hash=abc;URI=spiffe://c/ns/x/sa/evil,By=spiffe://c/gh;Hash=def;Subject="CN=a,O=b";URI=spiffe://c/ns/data/sa/pocketbase"#;
        assert_eq!(caller(&h(v)).unwrap().as_str(), "spiffe://c/ns/data/sa/pocketbase");
    }

    #[test]
    fn malformed_or_missing_is_no_identity() {
        for v in [
            "",
            "Hash=abc",
            "URI=https://x/y",
            "URI=spiffe://c/a;URI=spiffe://c/b",
            "URI=\"spiffe://c/a",
            "URI=SPIFFE://c/a",
        ] {
            assert!(caller(&h(v)).is_err(), "{v}");
        }
        assert!(caller(&HeaderMap::new()).is_err());
        let mut two = HeaderMap::new();
        two.append("x-forwarded-client-cert", HeaderValue::from_static("URI=spiffe://c/a"));
        two.append("x-forwarded-client-cert", HeaderValue::from_static("URI=spiffe://c/b"));
        assert!(caller(&two).is_err(), "several header lines are ambiguous");
    }
}
