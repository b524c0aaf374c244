//! Who is calling, from the client certificate rustls has already verified: the SPIFFE ID (the
//! one URI SAN) or else the first DNS SAN (SECURITY 20). Anything ambiguous is no identity at all.

use std::fmt;

use x509_parser::extensions::GeneralName;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum CallerIdentity {
    Spiffe(String),
    Dns(String),
}

impl CallerIdentity {
    pub fn as_str(&self) -> &str {
        match self {
            Self::Spiffe(s) | Self::Dns(s) => s,
        }
    }
}

impl fmt::Display for CallerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The caller of one connection or request: an identity, or why there is none.
#[derive(Clone, Debug)]
pub struct Caller(pub Result<CallerIdentity, &'static str>);

pub fn from_certificate(der: &[u8]) -> Result<CallerIdentity, &'static str> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|_| "unparsable certificate")?;
    if cert.is_ca() {
        return Err("a CA certificate cannot identify a caller");
    }
    let sans = match cert.subject_alternative_name() {
        Ok(Some(ext)) => ext.value.general_names.clone(),
        Ok(None) => Vec::new(),
        Err(_) => return Err("malformed subjectAltName"),
    };
    let uris: Vec<&str> =
        sans.iter().filter_map(|n| if let GeneralName::URI(u) = n { Some(*u) } else { None }).collect();
    match uris.as_slice() {
        [] => {}
        [one] => return parse_spiffe_id(one).map(CallerIdentity::Spiffe),
        _ => return Err("more than one URI SAN"),
    }
    sans.iter()
        .find_map(|n| if let GeneralName::DNSName(d) = n { Some(d.to_ascii_lowercase()) } else { None })
        .map(CallerIdentity::Dns)
        .ok_or("certificate has neither a SPIFFE ID nor a DNS name")
}

/// Validate a SPIFFE ID per the SPIFFE ID standard: lower-case `spiffe` scheme, a trust domain of
/// `[a-z0-9.-_]`, no port, user info, query or fragment, and path segments of `[A-Za-z0-9.-_]`
/// that are neither empty nor `.`/`..`. Returned unchanged, so allow-list matching stays exact.
/// A lower-case DNS name as certificates carry it: labels of `a-z`, `0-9`, `-` (not at either end),
/// 1–63 characters each, 253 in all. The one rule for `internal.allow`, `pki issue --dns` and
/// `pki init --san`.
pub fn parse_dns_name(name: &str) -> Result<String, &'static str> {
    if name.is_empty() || name.len() > 253 {
        return Err("a DNS name has 1 to 253 characters");
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err("a DNS name's labels have 1 to 63 characters (no empty label, no trailing dot)");
        }
        if !label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
            return Err("a DNS name has only lower-case letters, digits, `-` and `.` (no `_`, no upper case)");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("a DNS label cannot start or end with `-`");
        }
    }
    Ok(name.to_string())
}

/// An `internal.allow` entry: a SPIFFE ID or a DNS name, each under its one strict rule.
pub fn parse_allow_entry(entry: &str) -> Result<CallerIdentity, &'static str> {
    if entry.contains("://") {
        parse_spiffe_id(entry).map(CallerIdentity::Spiffe)
    } else {
        parse_dns_name(entry).map(CallerIdentity::Dns)
    }
}

/// How `check-config` says an allow-list entry will be matched.
pub fn describe_allow_entry(entry: &str) -> String {
    match parse_allow_entry(entry) {
        Ok(CallerIdentity::Spiffe(id)) => format!("{id} (the certificate's one URI SAN must equal this SPIFFE ID)"),
        Ok(CallerIdentity::Dns(d)) if !d.contains('.') => format!(
            "{d} (a certificate DNS SAN must equal `{d}` exactly: a single-label name, not `{d}.<namespace>.svc…`; \
             prefer the SPIFFE ID or the full Service name)"
        ),
        Ok(CallerIdentity::Dns(d)) => format!("{d} (a certificate without a URI SAN whose first DNS SAN equals this)"),
        Err(e) => format!("{entry} (invalid: {e})"),
    }
}

pub fn parse_spiffe_id(id: &str) -> Result<String, &'static str> {
    let rest = id.strip_prefix("spiffe://").ok_or("URI SAN is not a SPIFFE ID (scheme must be lower-case spiffe)")?;
    if id.len() > 2048 {
        return Err("SPIFFE ID too long");
    }
    let (domain, path) = rest.split_once('/').map_or((rest, ""), |(d, p)| (d, p));
    if domain.is_empty() || !domain.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
    {
        return Err("invalid SPIFFE trust domain");
    }
    if !path.is_empty() || rest.contains('/') {
        for seg in path.split('/') {
            if seg.is_empty()
                || seg == "."
                || seg == ".."
                || !seg.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
            {
                return Err("invalid SPIFFE path");
            }
        }
    }
    Ok(id.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_are_strict() {
        assert!(parse_spiffe_id("spiffe://cluster.local/ns/data/sa/pocketbase").is_ok());
        assert!(parse_spiffe_id("spiffe://cluster.local").is_ok());
        for bad in [
            "SPIFFE://cluster.local/ns/data",
            "Spiffe://cluster.local/x",
            "spiffe://Cluster.local/x",
            "spiffe://cluster.local:443/x",
            "spiffe://user@cluster.local/x",
            "spiffe://cluster.local/x?y",
            "spiffe://cluster.local/x#y",
            "spiffe://cluster.local/",
            "spiffe://cluster.local//x",
            "spiffe://cluster.local/./x",
            "spiffe://cluster.local/../x",
            "spiffe:///x",
            "https://cluster.local/x",
            "spiffe://cluster.local/x%2Fy",
        ] {
            assert!(parse_spiffe_id(bad).is_err(), "{bad}");
        }
    }
}
