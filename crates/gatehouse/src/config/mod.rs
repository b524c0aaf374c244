//! Typed configuration: one TOML file plus `GATEHOUSE_…` environment overrides (`__` nests),
//! secrets from `*_file` keys. Everything is validated once at start-up so a bad value fails
//! loudly before the first request, naming the key at fault.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use ipnet::IpNet;
use secrecy::SecretString;
use serde::{Deserialize, Deserializer};
use url::Url;

mod admin;
mod check;
pub(crate) mod defaults;
mod internal;
mod oidc;
mod public;
mod routes;
mod session;
mod telemetry;
#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's error type
mod tests;

pub use admin::*;
pub use check::*;
pub use internal::*;
pub use oidc::*;
pub use public::*;
pub use routes::*;
pub use session::*;
pub use telemetry::*;

/// A configuration problem, naming the key and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Parse(String),
    #[error("`{key}`: {problem}")]
    Invalid { key: &'static str, problem: String },
}

fn invalid(key: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key, problem: problem.into() }
}

/// One configuration error as a person can act on it: the key as written in the file (no
/// figment-internal `default.` profile prefix), the closest valid key for a typo, and an example
/// of the right form for a wrong type.
fn describe(e: &figment::Error) -> String {
    use figment::error::Kind;
    let from_env = e.metadata.as_ref().is_some_and(|m| m.name.contains("environment"));
    let source = if from_env { " (set by a GATEHOUSE_ environment variable)" } else { "" };
    let key = e.path.join(".");
    let text = match &e.kind {
        Kind::UnknownField(field, expected) => {
            let parent = e.path.strip_suffix(std::slice::from_ref(field)).unwrap_or(&e.path).join(".");
            let full = if parent.is_empty() { field.clone() } else { format!("{parent}.{field}") };
            let prefix = if parent.is_empty() { String::new() } else { format!("{parent}.") };
            match closest(field, expected) {
                Some(best) => format!("unknown key `{full}`; did you mean `{prefix}{best}`?"),
                None => format!("unknown key `{full}`; valid keys here: {}", expected.join(", ")),
            }
        }
        Kind::UnknownVariant(value, expected) => {
            let hint = closest(value, expected).map(|b| format!("; did you mean `{b}`?")).unwrap_or_default();
            format!("`{key}`: `{value}` is not one of {}{hint}", quoted(expected))
        }
        // The value of a secret is never echoed back, not even a wrongly typed one.
        Kind::InvalidType(_, expected) | Kind::InvalidValue(_, expected) if secret_key(&key) => {
            format!("`{key}`: expected {expected} (the value given is not shown: it may be a secret)")
        }
        Kind::InvalidType(actual, expected) => {
            format!("`{key}`: expected {expected}, found {actual}{}", example(&key, expected))
        }
        Kind::InvalidValue(actual, expected) => {
            format!("`{key}`: expected {expected}, found {actual}{}", example(&key, expected))
        }
        Kind::MissingField(field) => {
            let full = if key.is_empty() { field.to_string() } else { format!("{key}.{field}") };
            format!("`{full}` is required")
        }
        Kind::Message(m) if !key.is_empty() => format!("`{key}`: {m}{}", example(&key, m)),
        other => {
            if key.is_empty() {
                other.to_string()
            } else {
                format!("`{key}`: {other}")
            }
        }
    };
    format!("{text}{source}")
}

/// A URL as it may be shown: no user info, no query (Redis URLs carry `?pass=` there).
pub fn redacted_url(u: &Url) -> String {
    let mut c = u.clone();
    let _ = c.set_username("");
    let _ = c.set_password(None);
    c.set_query(None);
    c.to_string()
}

/// `redacted_url` for a string that may not even parse (then only its scheme is shown).
pub fn redacted_str(u: &str) -> String {
    match Url::parse(u) {
        Ok(parsed) => redacted_url(&parsed),
        Err(_) => format!("{}://…", u.split("://").next().unwrap_or("?").chars().take(16).collect::<String>()),
    }
}

/// Keys whose values are secrets (or hold one, like a Redis URL with a password).
fn secret_key(key: &str) -> bool {
    let name = key.rsplit('.').next().unwrap_or(key);
    ["secret", "key", "password", "token", "redis_url", "redis_sentinels", "redis_cluster_nodes"]
        .iter()
        .any(|w| name.contains(w))
        && !name.ends_with("_file")
        && !name.ends_with("_files")
}

fn quoted(names: &[&str]) -> String {
    names.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ")
}

/// The valid name closest to a typo, if it is close enough to be what was meant.
fn closest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (strsim::damerau_levenshtein(&word.to_ascii_lowercase(), c), *c))
        .filter(|(d, c)| *d <= (c.len() / 3).max(2))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// ", for example: listen = "0.0.0.0:9090"" — the right form of a value whose type was wrong.
fn example(key: &str, expected: &str) -> String {
    let name = key.rsplit('.').next().unwrap_or(key);
    let shown = if name == "listen" || expected.contains("socket address") {
        "\"0.0.0.0:9090\"".to_string()
    } else if expected.contains("duration")
        || ["timeout", "skew", "interval", "recheck"].iter().any(|w| name.contains(w))
    {
        "\"30s\"".to_string()
    } else if expected.contains("sequence") {
        "[\"a\", \"b\"]".to_string()
    } else if expected.contains("bool") {
        "true".to_string()
    } else if expected.contains("integer") {
        "10".to_string()
    } else if expected.contains("URL") || expected.contains("url") || name.ends_with("url") || name == "issuer" {
        "\"https://example.com/\"".to_string()
    } else if expected.contains("string") {
        "\"…\"".to_string()
    } else {
        return String::new();
    };
    format!("; for example: {name} = {shown}")
}

/// A secret set both inline or in the environment and as a file: say which environment
/// variable, since an operator looking at the file alone cannot see it.
fn secret_sources(figment: &Figment, c: &Config) -> Result<(), ConfigError> {
    let pairs: [(&'static str, bool, &str, bool, &str); 2] = [
        (
            "session.encryption_key",
            c.session.encryption_key.is_some(),
            "session.encryption_key_file",
            c.session.encryption_key_file.is_some(),
            "GATEHOUSE_SESSION__ENCRYPTION_KEY",
        ),
        (
            "oidc.client_secret",
            c.oidc.client_secret.is_some(),
            "oidc.client_secret_file",
            c.oidc.client_secret_file.is_some(),
            "GATEHOUSE_OIDC__CLIENT_SECRET",
        ),
    ];
    for (key, value_set, file_key, file_set, env) in pairs {
        if value_set && file_set {
            let from_env = figment.find_metadata(key).is_some_and(|m| m.name.contains("environment"));
            let problem = if from_env {
                format!("set both by the environment variable {env} and by `{file_key}`: keep one")
            } else {
                format!("set both `{key}` and `{file_key}`: keep one")
            };
            return Err(invalid(key, problem));
        }
    }
    Ok(())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The North-South listener (browser traffic through the load balancer).
    pub public: PublicConfig,
    /// The OpenID Connect provider (Keycloak) and this client's registration there.
    pub oidc: OidcConfig,
    /// Server-side sessions.
    #[serde(default)]
    pub session: SessionConfig,
    /// The East-West listener (session exchange for internal services); absent = not started.
    #[serde(default)]
    pub internal: Option<InternalConfig>,
    /// The check listener (the gateway's auth check: forward-auth / ext_authz); absent = not started.
    #[serde(default)]
    pub check: Option<CheckConfig>,
    /// The admin listener (metrics, health).
    #[serde(default)]
    pub admin: AdminConfig,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// What happens on SIGTERM.
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    /// OpenTelemetry traces (docs/observability.md); off unless `endpoint` is set.
    #[serde(default)]
    pub tracing: TracingConfig,
    /// The API proxy: `/api/<name>/...` forwarded to internal services (DESIGN §3).
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// Composed views: `GET /api/views/<name>` merged from calls to routes' upstreams (docs/views.md).
    #[serde(default)]
    pub views: Vec<crate::public::views::ViewConfig>,
}

fn de_networks<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<IpNet>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|s| {
            s.parse::<IpNet>()
                .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| serde::de::Error::custom(format!("`{s}` is neither an IP address nor a CIDR block")))
        })
        .collect()
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Text(String),
        Seconds(u64),
    }
    match Raw::deserialize(d)? {
        Raw::Seconds(s) => Ok(Duration::from_secs(s)),
        Raw::Text(t) => humantime::parse_duration(t.trim())
            .map_err(|e| serde::de::Error::custom(format!("`{t}` is not a duration like 30s, 15m or 12h: {e}"))),
    }
}

/// The session cookie as it will be sent, derived from config (prefix and `Secure` depend on the scheme).
#[derive(Debug, Clone)]
pub struct CookieSettings {
    pub name: String,
    pub login_name: String,
    pub secure: bool,
    pub same_site: SameSite,
}

impl Config {
    /// Read the file, apply `GATEHOUSE_…` overrides and validate.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        if !path.exists() {
            return Err(ConfigError::Parse(format!("config file {} does not exist", path.display())));
        }
        Self::from_figment(
            Figment::new().merge(Toml::file(path)).merge(
                Env::prefixed("GATEHOUSE_")
                    // Only nested keys (`GATEHOUSE_OIDC__CLIENT_ID`) are configuration: tooling variables
                    // such as GATEHOUSE_CONFIG or GATEHOUSE_CACHE must not be read as unknown keys.
                    .filter(|k| k.as_str().contains("__"))
                    .split("__"),
            ),
        )
    }

    pub fn from_figment(figment: Figment) -> Result<Self, ConfigError> {
        let config: Config = figment
            .extract()
            .map_err(|e| ConfigError::Parse(e.into_iter().map(|e| describe(&e)).collect::<Vec<_>>().join("; ")))?;
        secret_sources(&figment, &config)?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        // Each section checks its own keys; what spans sections (ports, listeners that must not
        // share an address) is checked by the section that would collide, given the whole.
        self.log.validate()?;
        self.tracing.validate()?;
        self.shutdown.validate()?;
        self.public.validate()?;
        self.oidc.validate()?;
        self.session.validate()?;
        self.admin.validate(self)?;
        if let Some(i) = &self.internal {
            i.validate(self)?;
        }
        if let Some(c) = &self.check {
            c.validate(self)?;
        }
        for (n, route) in self.routes.iter().enumerate() {
            route.validate()?;
            if self.routes[..n].iter().any(|r| r.prefix == route.prefix) {
                return Err(invalid("routes.prefix", format!("`{}` is listed twice", route.prefix)));
            }
        }
        crate::public::views::config::validate_all(&self.views, &self.routes)?;
        Ok(())
    }

    /// Public origin, e.g. `http://localhost:8080`, used for CSRF checks and redirects.
    pub fn public_origin(&self) -> String {
        self.public.external_url.origin().ascii_serialization()
    }

    pub fn redirect_uri(&self) -> String {
        format!("{}/auth/callback", self.public_origin())
    }

    pub fn post_logout_redirect_uri(&self) -> String {
        match &self.oidc.post_logout_redirect_uri {
            Some(u) => u.to_string(),
            None => format!("{}/", self.public_origin()),
        }
    }

    /// Whether the cookie can carry `Secure` and the `__Host-` prefix.
    pub fn cookie(&self) -> CookieSettings {
        let ext = &self.public.external_url;
        let secure = ext.scheme() == "https" || is_localhost(ext);
        let base = self.session.cookie_name.trim_start_matches("__Host-");
        let (name, login_name) = if secure {
            (self.session.cookie_name.clone(), format!("__Host-{base}-login"))
        } else {
            (base.to_string(), format!("{base}-login"))
        };
        CookieSettings { name, login_name, secure, same_site: self.session.same_site }
    }

    /// Non-fatal remarks for `check-config` and start-up logs.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        if !self.cookie().secure {
            w.push(
                "public.allow_insecure_http: the session cookie is sent without `Secure` or the `__Host-` prefix"
                    .into(),
            );
        }
        if !self.admin.listen.ip().is_loopback() {
            w.push(format!(
                "admin.listen {} is not loopback: /metrics, /healthz and /readyz answer anyone who reaches it (the session API needs the token)",
                self.admin.listen
            ));
        }
        if self.internal.as_ref().is_some_and(|i| i.allow.is_empty()) {
            w.push("internal.allow is empty: no service can exchange sessions".into());
        }
        for id in self.internal.iter().flat_map(|i| &i.allow) {
            if !id.contains("://") && !id.contains('.') {
                w.push(format!(
                    "internal.allow `{id}`: a single-label DNS name, matched exactly against a certificate DNS SAN `{id}` \
                     (not `{id}.<namespace>.svc…`); prefer a SPIFFE ID or the full Service name"
                ));
            }
        }
        if let Some(c) = &self.check
            && !c.mtls()
            && !c.listen.ip().is_loopback()
        {
            w.push(format!(
                "check.listen {} without mutual TLS: the shared key and users' access tokens cross the network in plain HTTP",
                c.listen
            ));
        }
        if self.oidc.password_login {
            w.push("oidc.password_login is on: Gatehouse sees user passwords (rate-limited)".into());
        }
        for r in &self.routes {
            if r.upstream.scheme() == "http" && !is_loopback_host(&r.upstream) {
                w.push(format!(
                    "routes {}: allow_plaintext_relay: the relayed credential goes to {} over plain http",
                    r.prefix, r.upstream
                ));
            }
            if r.upstream_security_headers {
                w.push(format!(
                    "routes {}: upstream_security_headers: the upstream's CSP and framing headers apply to this origin",
                    r.prefix
                ));
            }
        }
        w
    }
}

/// Two bind addresses collide if they share a port and one is a wildcard or both are the same IP.
fn same_port(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0 && a.port() == b.port() && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

fn is_localhost(url: &Url) -> bool {
    matches!(url.host_str(), Some("localhost")) || is_loopback_host(url)
}

fn is_loopback_host(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d == "localhost",
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
        None => false,
    }
}

/// Read a secret from a file, trimming one trailing newline; the error names the key, never the content.
pub fn read_secret_file(key: &'static str, path: &Path) -> Result<SecretString, ConfigError> {
    let text =
        std::fs::read_to_string(path).map_err(|e| invalid(key, format!("cannot read {}: {e}", path.display())))?;
    let trimmed = text.trim_end_matches(['\n', '\r']);
    if trimmed.is_empty() {
        return Err(invalid(key, format!("{} is empty", path.display())));
    }
    Ok(SecretString::from(trimmed.to_string()))
}
