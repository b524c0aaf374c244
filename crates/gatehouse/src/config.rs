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

/// `[log] level`: a tracing filter whose every directive names a real level. A bare word that is
/// not a level (`verbose`) would parse as a target and silently switch every other log line off.
fn check_log_filter(filter: &str) -> Result<(), ConfigError> {
    const LEVELS: &[&str] = &["trace", "debug", "info", "warn", "error", "off"];
    for directive in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let level = directive.rsplit_once('=').map_or(directive, |(_, l)| l).to_ascii_lowercase();
        if !LEVELS.contains(&level.as_str()) {
            let hint = closest(&level, LEVELS)
                .or(match level.as_str() {
                    "verbose" | "all" => Some("debug"),
                    "warning" => Some("warn"),
                    "none" | "quiet" => Some("off"),
                    _ => None,
                })
                .map(|b| format!("; did you mean `{b}`?"))
                .unwrap_or_default();
            return Err(invalid(
                "log.level",
                format!(
                    "`{directive}` does not name a level ({}){hint} — use a level, or `target=level` like `gatehouse=debug,info`",
                    LEVELS.join(", ")
                ),
            ));
        }
    }
    if tracing_subscriber::EnvFilter::try_new(filter).is_err() {
        return Err(invalid(
            "log.level",
            format!("`{filter}` is not a valid filter (e.g. `info` or `gatehouse=debug,info`)"),
        ));
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

/// How a proxied request carries the user to the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Relay {
    /// `Authorization: Bearer <access token>` (token relay).
    Bearer,
    /// `X-Gatehouse-Session: <session_id>`; the service exchanges it on the internal listener.
    Session,
}

impl Relay {
    /// As written in the configuration file.
    pub fn name(self) -> &'static str {
        match self {
            Self::Bearer => "bearer",
            Self::Session => "session",
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Path prefix under `/api/`, ending in `/`, e.g. `/api/pb/`. The longest matching prefix wins.
    pub prefix: String,
    /// Where matching requests go (`http://` or `https://host:port/path/`); the prefix is replaced by this URL's path.
    pub upstream: Url,
    /// With an `https://` upstream: the CA bundle (PEM) its certificate must chain to (required;
    /// the system's roots are not used for internal services).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// With an `https://` upstream: Gatehouse's client certificate (PEM) for upstreams that require one.
    #[serde(default)]
    pub client_cert_file: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,
    /// `bearer` or `session`.
    pub relay: Relay,
    /// Longest wait for the upstream's response headers (bodies, SSE and WebSockets may then stream on).
    #[serde(default = "defaults::route_timeout", deserialize_with = "de_duration")]
    pub timeout: Duration,
    /// Longest wait for a TCP connection to the upstream.
    #[serde(default = "defaults::route_connect_timeout", deserialize_with = "de_duration")]
    pub connect_timeout: Duration,
    /// Largest request body forwarded (streamed, counted on the way).
    #[serde(default = "defaults::route_max_body_bytes")]
    pub max_body_bytes: usize,
    /// Requests, streams (SSE) and WebSocket tunnels open at once to this upstream; over it, 503.
    #[serde(default = "defaults::route_max_in_flight")]
    pub max_in_flight: usize,
    /// How often an open WebSocket tunnel or streaming response (SSE) re-checks its session (a
    /// logout or revocation ends it).
    #[serde(default = "defaults::route_session_recheck", deserialize_with = "de_duration")]
    pub session_recheck: Duration,
    /// Allow-list mode: only standard HTTP headers plus these (case-insensitive) names reach the
    /// upstream. Unset: every header except cookies, credentials, forwarding headers and the
    /// identity-looking families (`x-user-*`, `*-roles`, `remote-*`, …).
    #[serde(default)]
    pub request_headers: Option<Vec<String>>,
    /// Allow a plain `http://` upstream on a host that is not loopback. The relayed session id or
    /// access token is a credential: over plain http anyone on the path can read and replay it.
    /// Off by default; only for a network where that is acceptable (e.g. a mesh that encrypts).
    #[serde(default)]
    pub allow_plaintext_relay: bool,
    /// Keep the upstream's own browser security headers (`Content-Security-Policy`,
    /// `X-Frame-Options`, ...) instead of Gatehouse's. Off by default: Gatehouse sets its own on
    /// every proxied response, so an upstream cannot weaken the policy of Gatehouse's origin.
    #[serde(default)]
    pub upstream_security_headers: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublicConfig {
    /// Address the public listener binds.
    #[serde(default = "defaults::public_listen")]
    pub listen: SocketAddr,
    /// The URL browsers use to reach Gatehouse; base of the redirect URI and of CSRF origin checks.
    pub external_url: Url,
    /// Directory of static front-end files served for paths no route claims.
    #[serde(default)]
    pub static_dir: Option<PathBuf>,
    /// Allow a plain-http `external_url` that is not localhost (the cookie then loses `Secure` and its prefix).
    #[serde(default)]
    pub allow_insecure_http: bool,
    /// Peers (IPs or CIDRs) whose `X-Forwarded-For` is trusted for the client IP (rate limits, audit).
    #[serde(default, deserialize_with = "de_networks")]
    pub trusted_proxies: Vec<IpNet>,
    /// Largest request body accepted on `/auth/*` routes.
    #[serde(default = "defaults::max_body_bytes")]
    pub max_body_bytes: usize,
    /// Requests per second each client IP may make (sustained); 0 (the default) turns the limit off.
    #[serde(default = "defaults::rate_limit_per_second")]
    pub rate_limit_per_second: u32,
    /// Requests a client IP may make in a burst above the sustained rate.
    #[serde(default = "defaults::rate_limit_burst")]
    pub rate_limit_burst: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcConfig {
    /// The issuer, pinned: discovery's `issuer` must equal it exactly.
    pub issuer: Url,
    /// This client's id at the provider.
    pub client_id: String,
    /// The client secret (prefer `client_secret_file` or `GATEHOUSE_OIDC__CLIENT_SECRET`).
    #[serde(default)]
    pub client_secret: Option<SecretString>,
    /// File holding the client secret.
    #[serde(default)]
    pub client_secret_file: Option<PathBuf>,
    /// Scopes requested at login; must include `openid`.
    #[serde(default = "defaults::scopes")]
    pub scopes: Vec<String>,
    /// Enable `POST /auth/login` with username and password (direct access grant).
    #[serde(default)]
    pub password_login: bool,
    /// Refresh the access token when it expires within this margin.
    #[serde(default = "defaults::refresh_skew", deserialize_with = "de_duration")]
    pub refresh_skew: Duration,
    /// Timeout of each call to the provider.
    #[serde(default = "defaults::http_timeout", deserialize_with = "de_duration")]
    pub http_timeout: Duration,
    /// Accepted ID-token signature algorithms.
    #[serde(default = "defaults::algorithms")]
    pub algorithms: Vec<String>,
    /// Audiences besides `client_id` an ID token may carry.
    #[serde(default)]
    pub trusted_audiences: Vec<String>,
    /// Where the provider sends the browser after logout (default: `external_url` + `/`).
    #[serde(default)]
    pub post_logout_redirect_uri: Option<Url>,
    /// Password logins allowed per client IP per minute.
    #[serde(default = "defaults::login_per_ip")]
    pub password_login_per_ip_per_minute: u32,
    /// Password logins allowed per username per minute.
    #[serde(default = "defaults::login_per_user")]
    pub password_login_per_user_per_minute: u32,
}

impl std::fmt::Debug for OidcConfig {
    // Hand-written so the client secret can never be printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OidcConfig")
            .field("issuer", &self.issuer.as_str())
            .field("client_id", &self.client_id)
            .field("scopes", &self.scopes)
            .field("password_login", &self.password_login)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    Embedded,
    Redis,
}

/// The session store, resolved from `[session]` after validation: one mode with only its own
/// settings, so the code that opens a store never guesses from a combination of optional fields.
#[derive(Debug, PartialEq)]
pub enum StoreMode<'a> {
    Embedded { path: &'a Path },
    Redis { url: &'a str },
    Sentinel { sentinels: &'a [String], master: &'a str, password_file: Option<&'a Path> },
    Cluster { nodes: &'a [String] },
}

impl SessionConfig {
    /// The mode this (validated) section describes.
    pub fn mode(&self) -> StoreMode<'_> {
        match self.store {
            StoreKind::Embedded => StoreMode::Embedded { path: &self.path },
            StoreKind::Redis if !self.redis_sentinels.is_empty() => StoreMode::Sentinel {
                sentinels: &self.redis_sentinels,
                master: self.redis_master_name.as_deref().unwrap_or_default(),
                password_file: self.redis_master_password_file.as_deref(),
            },
            StoreKind::Redis if !self.redis_cluster_nodes.is_empty() => {
                StoreMode::Cluster { nodes: &self.redis_cluster_nodes }
            }
            StoreKind::Redis => StoreMode::Redis { url: self.redis_url.as_deref().unwrap_or_default() },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SameSite {
    Lax,
    Strict,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionConfig {
    /// Session store backend.
    #[serde(default = "defaults::store")]
    pub store: StoreKind,
    /// File of the embedded store.
    #[serde(default = "defaults::store_path")]
    pub path: PathBuf,
    /// Redis URL (used when `store = "redis"`), e.g. `redis://127.0.0.1:6379` (no TLS in this build).
    #[serde(default)]
    pub redis_url: Option<String>,
    /// Redis Sentinel nodes (`redis://host:26379`), instead of `redis_url`: Gatehouse follows failovers.
    #[serde(default)]
    pub redis_sentinels: Vec<String>,
    /// The master name Sentinel monitors (with `redis_sentinels`).
    #[serde(default)]
    pub redis_master_name: Option<String>,
    /// Redis Cluster seed nodes (`redis://host:6379`, a few masters), instead of `redis_url`.
    #[serde(default)]
    pub redis_cluster_nodes: Vec<String>,
    /// With `rediss://` URLs: the CA bundle (PEM) the server certificate must chain to, instead
    /// of the system's roots.
    #[serde(default)]
    pub redis_ca_file: Option<PathBuf>,
    /// With `rediss://` URLs: a client certificate (PEM) for servers that require one (`tls-auth-clients`).
    #[serde(default)]
    pub redis_client_cert_file: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[serde(default)]
    pub redis_client_key_file: Option<PathBuf>,
    /// File holding the password the master and replicas require (`requirepass`), with `redis_sentinels`.
    /// (With `redis_url`, put credentials in the URL: `redis://:password@host:6379`.)
    #[serde(default)]
    pub redis_master_password_file: Option<PathBuf>,
    /// Timeout of every Redis call.
    #[serde(default = "defaults::redis_timeout", deserialize_with = "de_duration")]
    pub redis_timeout: Duration,
    /// Rate limits when Redis cannot answer: `split` (logins refused with 503, reads let through),
    /// `open` (everything let through) or `closed` (every limited request refused with 503).
    #[serde(default)]
    pub rate_limit_on_store_error: crate::limit::OnStoreError,
    /// A session ends after this long without a request.
    #[serde(default = "defaults::idle_timeout", deserialize_with = "de_duration")]
    pub idle_timeout: Duration,
    /// A session ends this long after login, whatever happens.
    #[serde(default = "defaults::absolute_timeout", deserialize_with = "de_duration")]
    pub absolute_timeout: Duration,
    /// File holding the 32-byte token-encryption key, base64.
    #[serde(default)]
    pub encryption_key_file: Option<PathBuf>,
    /// The key itself, base64 (prefer the file or `GATEHOUSE_SESSION__ENCRYPTION_KEY`).
    #[serde(default)]
    pub encryption_key: Option<SecretString>,
    /// Phase 1 of a rotation across replicas: a new key every replica learns to *open* with
    /// before any replica seals with it (see docs/operations.md, "Rotating the session key").
    #[serde(default)]
    pub next_encryption_key_file: Option<PathBuf>,
    /// Older keys still accepted for decryption while sessions written with them live on.
    #[serde(default)]
    pub previous_encryption_key_files: Vec<PathBuf>,
    /// Cookie name; keep the `__Host-` prefix.
    #[serde(default = "defaults::cookie_name")]
    pub cookie_name: String,
    /// `SameSite` of the session cookie.
    #[serde(default = "defaults::same_site")]
    pub same_site: SameSite,
    /// How often expired sessions are swept from the store.
    #[serde(default = "defaults::sweep_interval", deserialize_with = "de_duration")]
    pub sweep_interval: Duration,
    /// Embedded store: check every page of the file when opening it (turn off only for a file so
    /// large that the check does not fit `integrity_check_timeout`).
    #[serde(default = "defaults::integrity_check")]
    pub integrity_check: bool,
    /// Embedded store: start-up fails if the integrity check takes longer.
    #[serde(default = "defaults::integrity_check_timeout", deserialize_with = "de_duration")]
    pub integrity_check_timeout: Duration,
    /// Embedded store: what start-up does with a damaged file — `fail` (exit 1 naming the file and
    /// the recovery command) or `move_aside` (rename it with a timestamp, start with an empty store).
    #[serde(default)]
    pub on_corrupt: OnCorrupt,
}

/// What start-up does when the embedded store's file is damaged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnCorrupt {
    /// Refuse to start, with one line naming the file, the damage and the recovery command.
    #[default]
    Fail,
    /// Rename the file to `PATH.damaged-<timestamp>`, log it loudly, and start with an empty store
    /// (every user signs in again).
    MoveAside,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            store: defaults::store(),
            path: defaults::store_path(),
            redis_url: None,
            redis_sentinels: Vec::new(),
            redis_master_name: None,
            redis_master_password_file: None,
            redis_cluster_nodes: Vec::new(),
            redis_ca_file: None,
            redis_client_cert_file: None,
            redis_client_key_file: None,
            redis_timeout: defaults::redis_timeout(),
            rate_limit_on_store_error: Default::default(),
            idle_timeout: defaults::idle_timeout(),
            absolute_timeout: defaults::absolute_timeout(),
            encryption_key_file: None,
            encryption_key: None,
            previous_encryption_key_files: Vec::new(),
            next_encryption_key_file: None,
            cookie_name: defaults::cookie_name(),
            same_site: defaults::same_site(),
            sweep_interval: defaults::sweep_interval(),
            integrity_check: defaults::integrity_check(),
            integrity_check_timeout: defaults::integrity_check_timeout(),
            on_corrupt: OnCorrupt::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InternalMode {
    /// Gatehouse terminates mutual TLS itself.
    Mtls,
    /// An Envoy sidecar terminates mTLS; plain HTTP on loopback, identity from `x-forwarded-client-cert`.
    Envoy,
}

impl InternalMode {
    /// As written in the configuration file.
    pub fn name(self) -> &'static str {
        match self {
            Self::Mtls => "mtls",
            Self::Envoy => "envoy",
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InternalConfig {
    /// Address of the internal listener.
    #[serde(default = "defaults::internal_listen")]
    pub listen: SocketAddr,
    /// `mtls` (default) or `envoy`.
    #[serde(default = "defaults::internal_mode")]
    pub mode: InternalMode,
    /// Server certificate chain (PEM), `mtls` mode.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// Server private key (PEM), `mtls` mode.
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// CA bundle (PEM) that client certificates must chain to, `mtls` mode.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// Callers allowed to exchange: exact SPIFFE IDs or DNS names. No prefixes, no patterns.
    #[serde(default)]
    pub allow: Vec<String>,
    /// How often the TLS files are checked for changes.
    #[serde(default = "defaults::reload_interval", deserialize_with = "de_duration")]
    pub reload_interval: Duration,
    /// Longest time a client may take to complete the TLS handshake.
    #[serde(default = "defaults::handshake_timeout", deserialize_with = "de_duration")]
    pub handshake_timeout: Duration,
    /// Exchanges per second allowed per caller identity (burst of the same size).
    #[serde(default = "defaults::internal_rate")]
    pub rate_limit_per_second: u32,
}

/// The check listener: gateways (nginx `auth_request`, ingress-nginx `auth-url`, Traefik, Caddy,
/// Envoy `http_service`) ask it "who is this browser?". An allowed answer carries the user's access
/// token, so it is never the public listener and it authenticates its caller.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckConfig {
    /// Address of the check listener.
    #[serde(default = "defaults::check_listen")]
    pub listen: SocketAddr,
    /// Server certificate chain (PEM): set it (with `key` and `client_ca`) for mutual TLS.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// Server private key (PEM).
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// CA bundle (PEM) the gateway's client certificate must chain to.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// With mutual TLS: gateway identities allowed to call (exact SPIFFE IDs or DNS names).
    #[serde(default)]
    pub allow: Vec<String>,
    /// A shared key (at least 32 printable characters) the gateway sends in `X-Gatehouse-Check-Key`,
    /// for gateways that cannot present a client certificate. Re-read every `reload_interval`.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Claims copied into response headers for the upstream, e.g. `["sub", "preferred_username"]`
    /// become `x-gatehouse-sub`, `x-gatehouse-preferred-username`. Known: sub, preferred_username,
    /// email, name, realm_roles (comma-separated), groups (comma-separated).
    #[serde(default)]
    pub claim_headers: Vec<String>,
    /// How often the TLS files are checked for changes.
    #[serde(default = "defaults::reload_interval", deserialize_with = "de_duration")]
    pub reload_interval: Duration,
    /// Longest time a client may take to complete the TLS handshake.
    #[serde(default = "defaults::handshake_timeout", deserialize_with = "de_duration")]
    pub handshake_timeout: Duration,
}

/// Claims `check.claim_headers` may name.
pub const CHECK_CLAIMS: &[&str] = &["sub", "preferred_username", "email", "name", "realm_roles", "groups"];

impl CheckConfig {
    /// Mutual TLS when a server certificate is configured.
    pub fn mtls(&self) -> bool {
        self.cert.is_some()
    }

    fn validate(&self, all: &Config) -> Result<(), ConfigError> {
        let others = [Some(all.public.listen), Some(all.admin.listen), all.internal.as_ref().map(|i| i.listen)];
        if others.into_iter().flatten().any(|o| same_port(self.listen, o)) {
            return Err(invalid(
                "check.listen",
                "must differ from public.listen, admin.listen and internal.listen: an allowed check carries the user's token",
            ));
        }
        if self.mtls() || self.key.is_some() || self.client_ca.is_some() {
            for (key, path) in
                [("check.cert", &self.cert), ("check.key", &self.key), ("check.client_ca", &self.client_ca)]
            {
                match path {
                    None => return Err(invalid(key, "cert, key and client_ca go together (mutual TLS)")),
                    Some(p) if !p.is_file() => {
                        return Err(invalid(key, format!("{} is not a readable file", p.display())));
                    }
                    Some(_) => {}
                }
            }
        }
        if let Some(path) = &self.key_file {
            read_check_key(path)?;
        }
        if !self.mtls() && self.key_file.is_none() && !self.listen.ip().is_loopback() {
            return Err(invalid(
                "check.listen",
                format!(
                    "{} is not loopback: the check answers with users' access tokens, so it needs mutual TLS \
                     (cert, key, client_ca, allow) or a shared key (key_file)",
                    self.listen
                ),
            ));
        }
        for id in &self.allow {
            if let Err(why) = crate::tls::identity::parse_allow_entry(id) {
                return Err(invalid("check.allow", format!("`{id}`: {why}")));
            }
        }
        for c in &self.claim_headers {
            if !CHECK_CLAIMS.contains(&c.as_str()) {
                return Err(invalid("check.claim_headers", format!("`{c}`: not one of {CHECK_CLAIMS:?}")));
            }
        }
        if self.reload_interval < Duration::from_secs(1) {
            return Err(invalid("check.reload_interval", "must be at least 1s"));
        }
        if self.handshake_timeout < Duration::from_millis(100) || self.handshake_timeout > Duration::from_secs(60) {
            return Err(invalid("check.handshake_timeout", "must be between 100ms and 60s"));
        }
        Ok(())
    }
}

/// Read and check the check listener's shared key (see `check.key_file`).
pub fn read_check_key(path: &Path) -> Result<SecretString, ConfigError> {
    use secrecy::ExposeSecret;
    let key = read_secret_file("check.key_file", path)?;
    let k = key.expose_secret();
    if k.len() < ADMIN_TOKEN_MIN_LEN || !k.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid(
            "check.key_file",
            format!("{} must hold at least {ADMIN_TOKEN_MIN_LEN} printable characters without spaces", path.display()),
        ));
    }
    Ok(key)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownConfig {
    /// On SIGTERM readiness turns false at once and the listeners stop accepting; requests in
    /// flight (and background revocations) get this long to finish, then the process exits.
    /// Keep Kubernetes' `terminationGracePeriodSeconds` above it plus any `preStop` sleep.
    #[serde(default = "defaults::drain_timeout", deserialize_with = "de_duration")]
    pub drain_timeout: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self { drain_timeout: defaults::drain_timeout() }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the admin listener. `/metrics`, `/healthz` and `/readyz` may be reached from the
    /// network (kubelet probes, Prometheus); the session admin API then needs `token_file`.
    #[serde(default = "defaults::admin_listen")]
    pub listen: SocketAddr,
    /// File holding the bearer token the session admin API (`/admin/v1/*`) requires. Required on a
    /// non-loopback `listen`; re-read on every admin request, so a rotated file takes effect at once.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self { listen: defaults::admin_listen(), token_file: None }
    }
}

/// Shortest admin token accepted: guessing must be hopeless even without a rate limit.
pub const ADMIN_TOKEN_MIN_LEN: usize = 32;

/// Read and check the admin token file (see `admin.token_file`).
pub fn read_admin_token(path: &Path) -> Result<SecretString, ConfigError> {
    use secrecy::ExposeSecret;
    let token = read_secret_file("admin.token_file", path)?;
    let t = token.expose_secret();
    if t.len() < ADMIN_TOKEN_MIN_LEN || !t.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid(
            "admin.token_file",
            format!(
                "{} must hold at least {ADMIN_TOKEN_MIN_LEN} printable characters without spaces (e.g. `head -c 32 /dev/urandom | base64`)",
                path.display()
            ),
        ));
    }
    Ok(token)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `text` for people, `json` for log pipelines.
    #[serde(default = "defaults::log_format")]
    pub format: LogFormat,
    /// A tracing filter, e.g. `info` or `gatehouse=debug,info`; `RUST_LOG` wins when set.
    #[serde(default = "defaults::log_level")]
    pub level: String,
}

/// Whose incoming W3C `traceparent`/`tracestate` headers the public listener continues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TracePropagation {
    /// Any client's (a browser or anyone on the internet can then choose trace ids and sampling).
    Any,
    /// Only a peer in `public.trusted_proxies` (the load balancer, an ingress that traces).
    TrustedProxies,
    /// Nobody's: every request starts a new trace.
    Never,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TracingConfig {
    /// OTLP/HTTP (protobuf) traces endpoint, e.g. `http://otel-collector:4318/v1/traces`. Unset:
    /// no span is exported and no `traceparent` is read or sent.
    #[serde(default)]
    pub endpoint: Option<Url>,
    /// Fraction (0.0–1.0) of new traces recorded. Parent-based: a request whose accepted
    /// `traceparent` says sampled (or not) follows that decision.
    #[serde(default = "defaults::tracing_sample_ratio")]
    pub sample_ratio: f64,
    /// Whose `traceparent` the public listener accepts: `any`, `trusted_proxies` or `never`. The
    /// internal listener accepts its authenticated callers' unless this is `never`.
    #[serde(default = "defaults::tracing_propagation")]
    pub propagation: TracePropagation,
    /// The `service.name` resource attribute.
    #[serde(default = "defaults::tracing_service_name")]
    pub service_name: String,
    /// Longest wait for one export to the collector.
    #[serde(default = "defaults::tracing_export_timeout", deserialize_with = "de_duration")]
    pub export_timeout: Duration,
}

impl Default for TracingConfig {
    fn default() -> Self {
        Self {
            endpoint: None,
            sample_ratio: defaults::tracing_sample_ratio(),
            propagation: defaults::tracing_propagation(),
            service_name: defaults::tracing_service_name(),
            export_timeout: defaults::tracing_export_timeout(),
        }
    }
}

impl TracingConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if !(0.0..=1.0).contains(&self.sample_ratio) || self.sample_ratio.is_nan() {
            return Err(invalid("tracing.sample_ratio", "must be between 0.0 and 1.0"));
        }
        if let Some(e) = &self.endpoint
            && !matches!(e.scheme(), "http" | "https")
        {
            return Err(invalid("tracing.endpoint", "must be an http:// or https:// OTLP/HTTP URL"));
        }
        if self.service_name.trim().is_empty() {
            return Err(invalid("tracing.service_name", "must not be empty"));
        }
        Ok(())
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { format: defaults::log_format(), level: defaults::log_level() }
    }
}

mod defaults {
    use super::*;

    pub fn drain_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn public_listen() -> SocketAddr {
        SocketAddr::from(([0, 0, 0, 0], 8080))
    }
    pub fn admin_listen() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 9090))
    }
    pub fn max_body_bytes() -> usize {
        16 * 1024
    }
    pub fn rate_limit_per_second() -> u32 {
        // Off by default: behind a load balancer whose address is not in `trusted_proxies`, every
        // client shares one IP, and a default limit would turn into an outage.
        0
    }
    pub fn rate_limit_burst() -> u32 {
        200
    }
    pub fn scopes() -> Vec<String> {
        vec!["openid".into(), "profile".into(), "email".into()]
    }
    pub fn refresh_skew() -> Duration {
        Duration::from_secs(30)
    }
    pub fn http_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn algorithms() -> Vec<String> {
        vec!["RS256".into(), "PS256".into(), "ES256".into()]
    }
    pub fn login_per_ip() -> u32 {
        20
    }
    pub fn login_per_user() -> u32 {
        5
    }
    pub fn store() -> StoreKind {
        StoreKind::Embedded
    }
    pub fn store_path() -> PathBuf {
        PathBuf::from("data/sessions.redb")
    }
    pub fn integrity_check() -> bool {
        true
    }
    pub fn integrity_check_timeout() -> Duration {
        Duration::from_secs(60)
    }
    pub fn redis_timeout() -> Duration {
        Duration::from_secs(2)
    }
    pub fn idle_timeout() -> Duration {
        Duration::from_secs(30 * 60)
    }
    pub fn absolute_timeout() -> Duration {
        Duration::from_secs(12 * 3600)
    }
    pub fn cookie_name() -> String {
        "__Host-Http-gatehouse".into()
    }
    pub fn same_site() -> SameSite {
        SameSite::Lax
    }
    pub fn sweep_interval() -> Duration {
        Duration::from_secs(60)
    }
    pub fn internal_listen() -> SocketAddr {
        SocketAddr::from(([0, 0, 0, 0], 8443))
    }
    pub fn check_listen() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 8444))
    }
    pub fn internal_mode() -> InternalMode {
        InternalMode::Mtls
    }
    pub fn reload_interval() -> Duration {
        Duration::from_secs(5)
    }
    pub fn handshake_timeout() -> Duration {
        Duration::from_secs(5)
    }
    pub fn internal_rate() -> u32 {
        1000
    }
    pub fn log_format() -> LogFormat {
        LogFormat::Text
    }
    pub fn tracing_sample_ratio() -> f64 {
        1.0
    }
    pub fn tracing_propagation() -> TracePropagation {
        TracePropagation::TrustedProxies
    }
    pub fn tracing_service_name() -> String {
        "gatehouse".into()
    }
    pub fn tracing_export_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn log_level() -> String {
        "info".into()
    }
    pub fn route_timeout() -> Duration {
        Duration::from_secs(60)
    }
    pub fn route_connect_timeout() -> Duration {
        Duration::from_secs(5)
    }
    pub fn route_max_body_bytes() -> usize {
        10 * 1024 * 1024
    }
    pub fn route_max_in_flight() -> usize {
        1024
    }
    pub fn route_session_recheck() -> Duration {
        Duration::from_secs(30)
    }
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

impl RouteConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let p = &self.prefix;
        let segments_ok = p.len() > "/api/".len()
            && p.starts_with("/api/")
            && p.ends_with('/')
            && p[1..p.len() - 1].split('/').all(|seg| {
                !seg.is_empty()
                    && seg != "."
                    && seg != ".."
                    && seg.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b))
            });
        if !segments_ok {
            return Err(invalid(
                "routes.prefix",
                format!(
                    "`{p}` must look like `/api/name/`: under /api/, ending in `/`, plain segments of letters, digits, `-._~`"
                ),
            ));
        }
        let u = &self.upstream;
        // Shown in messages without user info: a password in the URL must not reach a log.
        let shown = redacted_url(u);
        match u.scheme() {
            "http" if self.ca_file.is_some() || self.client_cert_file.is_some() => {
                return Err(invalid(
                    "routes.ca_file",
                    format!("`{shown}` is plain http: TLS files need an https:// upstream"),
                ));
            }
            // The relay header carries a session id or an access token: in the clear it may only
            // cross loopback, unless the operator says the network protects it.
            "http" if !is_loopback_host(u) && !self.allow_plaintext_relay => {
                return Err(invalid(
                    "routes.upstream",
                    format!(
                        "`{shown}` is plain http to a host that is not loopback: the relayed {} would cross the network \
                         in the clear; use https (with ca_file) or set allow_plaintext_relay = true",
                        match self.relay {
                            Relay::Session => "session id",
                            Relay::Bearer => "access token",
                        }
                    ),
                ));
            }
            "http" => {}
            "https" if self.ca_file.is_none() => {
                return Err(invalid(
                    "routes.ca_file",
                    format!("`{shown}` is https: set ca_file, the CA its certificate chains to"),
                ));
            }
            "https" => {}
            other => {
                return Err(invalid("routes.upstream", format!("`{shown}`: scheme `{other}` is not http or https")));
            }
        }
        if self.client_cert_file.is_some() != self.client_key_file.is_some() {
            return Err(invalid("routes.client_cert_file", "set client_cert_file and client_key_file together"));
        }
        if u.host_str().is_none() || !u.username().is_empty() || u.password().is_some() {
            return Err(invalid("routes.upstream", format!("`{shown}` needs a host and no user info")));
        }
        if u.query().is_some() || u.fragment().is_some() || !u.path().ends_with('/') {
            return Err(invalid(
                "routes.upstream",
                format!("`{shown}`: no query or fragment, and the path must end in `/`"),
            ));
        }
        if self.timeout.is_zero() {
            return Err(invalid("routes.timeout", "must be above zero"));
        }
        if self.connect_timeout.is_zero() {
            return Err(invalid("routes.connect_timeout", "must be above zero"));
        }
        if self.max_body_bytes == 0 {
            return Err(invalid("routes.max_body_bytes", "must be at least 1"));
        }
        if self.session_recheck < Duration::from_secs(1) {
            return Err(invalid("routes.session_recheck", "must be at least 1s"));
        }
        if self.max_in_flight == 0 || self.max_in_flight > 1_000_000 {
            return Err(invalid("routes.max_in_flight", "must be between 1 and 1000000"));
        }
        for name in self.request_headers.iter().flatten() {
            let name = name.to_ascii_lowercase();
            if axum::http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                return Err(invalid("routes.request_headers", format!("`{name}` is not a header name")));
            }
            if crate::public::proxy::headers::is_always_stripped(&name)
                || ["connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade", "host"]
                    .contains(&name.as_str())
            {
                return Err(invalid(
                    "routes.request_headers",
                    format!(
                        "`{name}` is never forwarded (credentials, forwarding, override and hop-by-hop headers, names with `_`)"
                    ),
                ));
            }
        }
        Ok(())
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
        check_log_filter(&self.log.level)?;
        if self.shutdown.drain_timeout.is_zero() || self.shutdown.drain_timeout > Duration::from_secs(300) {
            return Err(invalid("shutdown.drain_timeout", "must be between 1ms and 5m"));
        }
        self.tracing.validate()?;
        let ext = &self.public.external_url;
        match ext.scheme() {
            "https" => {}
            "http" if is_localhost(ext) => {}
            "http" if self.public.allow_insecure_http => {}
            "http" => {
                return Err(invalid(
                    "public.external_url",
                    "plain http is only accepted for localhost; use https or set public.allow_insecure_http = true",
                ));
            }
            other => {
                return Err(invalid("public.external_url", format!("scheme `{other}` is not http or https")));
            }
        }
        if ext.query().is_some() || ext.fragment().is_some() || ext.path() != "/" {
            return Err(invalid(
                "public.external_url",
                "must be an origin only (scheme, host, port), no path or query",
            ));
        }
        let iss = &self.oidc.issuer;
        if iss.scheme() != "https" && !(iss.scheme() == "http" && is_loopback_host(iss)) {
            return Err(invalid("oidc.issuer", "must be https (plain http only for a provider on loopback)"));
        }
        if self.oidc.client_id.trim().is_empty() {
            return Err(invalid("oidc.client_id", "must not be empty"));
        }
        if self.oidc.client_secret.is_some() && self.oidc.client_secret_file.is_some() {
            return Err(invalid("oidc.client_secret", "set either client_secret or client_secret_file, not both"));
        }
        if self.oidc.client_secret.is_none() && self.oidc.client_secret_file.is_none() {
            return Err(invalid("oidc.client_secret_file", "a confidential client needs a secret"));
        }
        if !self.oidc.scopes.iter().any(|s| s == "openid") {
            return Err(invalid("oidc.scopes", "must include `openid`"));
        }
        if self.oidc.algorithms.is_empty() {
            return Err(invalid("oidc.algorithms", "must list at least one algorithm"));
        }
        for alg in &self.oidc.algorithms {
            crate::oidc::parse_allowed_algorithm(alg).map_err(|p| invalid("oidc.algorithms", p))?;
        }
        if self.oidc.refresh_skew > Duration::from_secs(3600) {
            return Err(invalid("oidc.refresh_skew", "must be at most 1h"));
        }
        if self.public.rate_limit_per_second > 0 && self.public.rate_limit_burst < self.public.rate_limit_per_second {
            return Err(invalid("public.rate_limit_burst", "must be at least public.rate_limit_per_second"));
        }
        if self.oidc.password_login_per_ip_per_minute == 0 {
            return Err(invalid("oidc.password_login_per_ip_per_minute", "must be at least 1"));
        }
        if self.oidc.password_login_per_user_per_minute == 0 {
            return Err(invalid("oidc.password_login_per_user_per_minute", "must be at least 1"));
        }
        let s = &self.session;
        if s.idle_timeout < Duration::from_secs(60) {
            return Err(invalid("session.idle_timeout", "must be at least 1m"));
        }
        if s.absolute_timeout < s.idle_timeout {
            return Err(invalid("session.absolute_timeout", "must not be shorter than session.idle_timeout"));
        }
        if s.encryption_key.is_some() && s.encryption_key_file.is_some() {
            return Err(invalid(
                "session.encryption_key",
                "set either encryption_key or encryption_key_file, not both",
            ));
        }
        if s.encryption_key.is_none() && s.encryption_key_file.is_none() {
            return Err(invalid("session.encryption_key_file", "tokens are encrypted at rest: a key is required"));
        }
        if s.integrity_check && s.integrity_check_timeout < Duration::from_secs(1) {
            return Err(invalid(
                "session.integrity_check_timeout",
                "must be at least 1s (set session.integrity_check = false to skip the check)",
            ));
        }
        // Each store mode takes only its own keys: a key of another mode is a mistake to report,
        // not to ignore.
        let set = |present: bool, key: &'static str, only: &str| -> Result<(), ConfigError> {
            if present {
                Err(invalid(key, format!("applies only to {only}; remove it or change session.store")))
            } else {
                Ok(())
            }
        };
        if s.store == StoreKind::Embedded {
            let only = "session.store = \"redis\"";
            set(s.redis_url.is_some(), "session.redis_url", only)?;
            set(!s.redis_sentinels.is_empty(), "session.redis_sentinels", only)?;
            set(!s.redis_cluster_nodes.is_empty(), "session.redis_cluster_nodes", only)?;
            set(s.redis_master_name.is_some(), "session.redis_master_name", only)?;
            set(s.redis_master_password_file.is_some(), "session.redis_master_password_file", only)?;
            set(s.redis_ca_file.is_some(), "session.redis_ca_file", only)?;
            set(s.redis_client_cert_file.is_some(), "session.redis_client_cert_file", only)?;
        } else {
            let sentinel = !s.redis_sentinels.is_empty();
            set(
                !sentinel && s.redis_master_name.is_some(),
                "session.redis_master_name",
                "redis_sentinels (Sentinel mode)",
            )?;
            set(
                !sentinel && s.redis_master_password_file.is_some(),
                "session.redis_master_password_file",
                "redis_sentinels (Sentinel mode; with redis_url put the password in the URL)",
            )?;
            let tls = s.redis_url.as_deref().is_some_and(|u| u.starts_with("rediss://"))
                || s.redis_cluster_nodes.iter().any(|u| u.starts_with("rediss://"));
            set(!tls && s.redis_ca_file.is_some(), "session.redis_ca_file", "rediss:// URLs (TLS to Redis)")?;
            set(
                !tls && s.redis_client_cert_file.is_some(),
                "session.redis_client_cert_file",
                "rediss:// URLs (TLS to Redis)",
            )?;
        }
        if s.store == StoreKind::Redis {
            let url_ok =
                |u: &str| ["redis://", "rediss://", "redis+unix://", "unix://"].iter().any(|p| u.starts_with(p));
            // TLS through Sentinel is not wired: the master's address comes from Sentinel.
            let plain_ok = |u: &str| ["redis://", "redis+unix://", "unix://"].iter().any(|p| u.starts_with(p));
            let modes = [s.redis_url.is_some(), !s.redis_sentinels.is_empty(), !s.redis_cluster_nodes.is_empty()];
            match modes.iter().filter(|m| **m).count() {
                0 => {
                    return Err(invalid(
                        "session.redis_url",
                        "required when session.store = \"redis\" (or redis_sentinels, or redis_cluster_nodes)",
                    ));
                }
                1 => {}
                _ => {
                    return Err(invalid(
                        "session.redis_url",
                        "set exactly one of redis_url, redis_sentinels and redis_cluster_nodes",
                    ));
                }
            }
            if let Some(u) = &s.redis_url
                && !url_ok(u)
            {
                return Err(invalid("session.redis_url", "must be a redis://, rediss:// or unix:// URL"));
            }
            if !s.redis_sentinels.is_empty() && s.redis_master_name.is_none() {
                return Err(invalid("session.redis_master_name", "required with redis_sentinels"));
            }
            if let Some(bad) = s.redis_sentinels.iter().find(|u| !plain_ok(u)) {
                return Err(invalid(
                    "session.redis_sentinels",
                    format!("`{}` is not a redis:// URL (TLS through Sentinel is not supported)", redacted_str(bad)),
                ));
            }
            let tls_nodes = s.redis_cluster_nodes.iter().filter(|u| u.starts_with("rediss://")).count();
            if let Some(bad) =
                s.redis_cluster_nodes.iter().find(|u| !u.starts_with("redis://") && !u.starts_with("rediss://"))
            {
                return Err(invalid(
                    "session.redis_cluster_nodes",
                    format!("`{}` is not a redis:// or rediss:// URL", redacted_str(bad)),
                ));
            }
            if tls_nodes != 0 && tls_nodes != s.redis_cluster_nodes.len() {
                return Err(invalid("session.redis_cluster_nodes", "use rediss:// for all nodes or for none"));
            }
            if s.redis_client_cert_file.is_some() != s.redis_client_key_file.is_some() {
                return Err(invalid(
                    "session.redis_client_cert_file",
                    "set redis_client_cert_file and redis_client_key_file together",
                ));
            }
        }
        if !s.cookie_name.starts_with("__Host-") {
            return Err(invalid(
                "session.cookie_name",
                "must start with `__Host-` (the prefix pins Secure, Path=/ and no Domain)",
            ));
        }
        if s.cookie_name.len() > 64 || !s.cookie_name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b)) {
            return Err(invalid("session.cookie_name", "use at most 64 letters, digits, `-` or `_`"));
        }
        if s.sweep_interval < Duration::from_secs(1) {
            return Err(invalid("session.sweep_interval", "must be at least 1s"));
        }
        if same_port(self.public.listen, self.admin.listen) {
            return Err(invalid("admin.listen", "must differ from public.listen: listeners are never mixed"));
        }
        if !self.admin.listen.ip().is_loopback() && self.admin.token_file.is_none() {
            return Err(invalid(
                "admin.token_file",
                format!(
                    "required when admin.listen ({}) is not loopback: the session admin API must not be open to the network",
                    self.admin.listen
                ),
            ));
        }
        if let Some(dir) = &self.public.static_dir
            && !dir.is_dir()
        {
            return Err(invalid("public.static_dir", format!("{} is not a directory", dir.display())));
        }
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
        tracing_subscriber::EnvFilter::try_new(&self.log.level).map_err(|e| invalid("log.level", e.to_string()))?;
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

impl InternalConfig {
    fn validate(&self, all: &Config) -> Result<(), ConfigError> {
        if same_port(self.listen, all.public.listen) || same_port(self.listen, all.admin.listen) {
            return Err(invalid(
                "internal.listen",
                "must differ from public.listen and admin.listen: listeners are never mixed",
            ));
        }
        match self.mode {
            InternalMode::Mtls => {
                for (key, path) in [
                    ("internal.cert", &self.cert),
                    ("internal.key", &self.key),
                    ("internal.client_ca", &self.client_ca),
                ] {
                    match path {
                        None => return Err(invalid(key, "required in mtls mode")),
                        Some(p) if !p.is_file() => {
                            return Err(invalid(key, format!("{} is not a readable file", p.display())));
                        }
                        Some(_) => {}
                    }
                }
            }
            InternalMode::Envoy => {
                // Plain HTTP trusting a header is only safe when nobody but the local sidecar can connect.
                if !self.listen.ip().is_loopback() {
                    return Err(invalid(
                        "internal.listen",
                        "envoy mode speaks plain HTTP and must bind a loopback address (127.0.0.1 or ::1)",
                    ));
                }
            }
        }
        for id in &self.allow {
            if let Err(why) = crate::tls::identity::parse_allow_entry(id) {
                return Err(invalid(
                    "internal.allow",
                    format!("`{id}`: {why} (entries are SPIFFE IDs or DNS names, matched exactly)"),
                ));
            }
        }
        if self.reload_interval < Duration::from_secs(1) {
            return Err(invalid("internal.reload_interval", "must be at least 1s"));
        }
        if self.handshake_timeout < Duration::from_millis(100) || self.handshake_timeout > Duration::from_secs(60) {
            return Err(invalid("internal.handshake_timeout", "must be between 100ms and 60s"));
        }
        if self.rate_limit_per_second == 0 {
            return Err(invalid("internal.rate_limit_per_second", "must be at least 1"));
        }
        Ok(())
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

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's error type
mod tests {
    use super::*;
    use figment::Jail;

    const MINIMAL: &str = r#"
        [public]
        external_url = "http://localhost:8080"
        [oidc]
        issuer = "http://127.0.0.1:8180/realms/gatehouse"
        client_id = "gatehouse"
        client_secret = "s3cret"
        [session]
        encryption_key = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
    "#;

    fn load(jail: &mut Jail, text: &str) -> Result<Config, ConfigError> {
        jail.create_file("g.toml", text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        Config::load(Path::new("g.toml"))
    }

    /// Messages a person can act on: the key as written in the file (no `default.` prefix), the
    /// closest valid key, an example of the right form, the environment variable behind a clash.
    #[test]
    fn messages_name_the_key_suggest_the_fix_and_show_the_right_form() {
        Jail::expect_with(|jail| {
            fn err(jail: &mut Jail, text: &str) -> String {
                load(jail, text).err().map(|e| e.to_string()).unwrap_or_default()
            }
            let e = err(jail, &MINIMAL.replace("encryption_key = ", "encryption_keyfile = \"k\"\nencryption_key = "));
            assert!(
                e.contains("unknown key `session.encryption_keyfile`; did you mean `session.encryption_key_file`?"),
                "{e}"
            );
            assert!(!e.contains("default."), "no internal prefix: {e}");
            let e = err(jail, &format!("{MINIMAL}\n[admin]\nlisten = 9090"));
            assert!(e.contains("`admin.listen`") && e.contains("for example: listen = \"0.0.0.0:9090\""), "{e}");
            let e = err(jail, &MINIMAL.replace("client_secret = \"s3cret\"", "client_secret = 918273645"));
            assert!(e.contains("`oidc.client_secret`") && !e.contains("918273645"), "no secret echoed: {e}");
            let e = err(
                jail,
                &format!(
                    "{MINIMAL}\n[[routes]]\nprefix = \"/api/a/\"\nupstream = \"https://svc:hunter2pw@api.example/\"\nrelay = \"bearer\"\n"
                ),
            );
            assert!(e.contains("https://api.example/") && !e.contains("hunter2pw"), "no password from a URL: {e}");
            let e = err(jail, &format!("{MINIMAL}\n[log]\nformat = \"jsno\""));
            assert!(e.contains("did you mean `json`?"), "{e}");
            for (level, hint) in
                [("verbose", "`debug`"), ("warning", "`warn`"), ("gatehouse=loud", "does not name a level")]
            {
                let e = err(jail, &format!("{MINIMAL}\n[log]\nlevel = \"{level}\""));
                assert!(e.contains("log.level") && e.contains(hint), "{level}: {e}");
            }
            assert!(load(jail, &format!("{MINIMAL}\n[log]\nlevel = \"gatehouse=debug,tower_http=warn,info\"")).is_ok());
            jail.create_file("key", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")?;
            jail.set_env("GATEHOUSE_SESSION__ENCRYPTION_KEY", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=");
            let e = err(
                jail,
                &MINIMAL.replace(
                    "encryption_key = \"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\"",
                    "encryption_key_file = \"key\"",
                ),
            );
            assert!(
                e.contains("GATEHOUSE_SESSION__ENCRYPTION_KEY") && e.contains("session.encryption_key_file"),
                "{e}"
            );
            Ok(())
        });
    }

    /// The keys a section accepts, asked of the deserializer itself: an unknown key's error lists
    /// every valid one.
    fn accepted_keys(section: Option<&str>) -> Vec<String> {
        // Tables and arrays of tables (`[[routes]]`, `[[views]]` with `[[views.parts]]`) alike.
        let texts = match section {
            None => vec!["__probe = 1\n".to_string()],
            Some("views.parts") => vec!["[[views]]\n[[views.parts]]\n__probe = 1\n".to_string()],
            Some(s) => vec![format!("[{s}]\n__probe = 1\n"), format!("[[{s}]]\n__probe = 1\n")],
        };
        for text in texts {
            let Err(errors) = Figment::new().merge(Toml::string(&text)).extract::<Config>() else { continue };
            for e in errors {
                if let figment::error::Kind::UnknownField(field, expected) = &e.kind
                    && field == "__probe"
                {
                    return expected.iter().map(|k| k.to_string()).collect();
                }
            }
        }
        panic!("no unknown-field error for {section:?}");
    }

    /// docs/configuration.md and the accepted keys agree: no key missing from the docs, none
    /// documented that the configuration does not know.
    #[test]
    fn the_configuration_reference_documents_exactly_the_accepted_keys() {
        // The reference is docs/configuration.md; composed views have theirs in docs/views.md.
        let doc = ["configuration.md", "views.md"]
            .iter()
            .map(|f| std::fs::read_to_string(format!("{}/../../docs/{f}", env!("CARGO_MANIFEST_DIR"))).unwrap())
            .collect::<Vec<_>>()
            .join("\n## (next document)\n");
        let mut documented: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> = Default::default();
        let mut current: Option<String> = None;
        // Only the tables whose first column is `key` list keys (others list headers, answers…).
        let mut key_table = false;
        for line in doc.lines() {
            if let Some(rest) = line.strip_prefix("## `[").or_else(|| line.strip_prefix("### `[")) {
                current = Some(rest.trim_start_matches('[').split(']').next().unwrap_or_default().to_string());
                continue;
            }
            if line.starts_with("## ") || line.starts_with("### ") {
                current = None;
                continue;
            }
            if !line.starts_with('|') {
                key_table = false;
                continue;
            }
            if line.starts_with("| key |") {
                key_table = true;
                continue;
            }
            if !key_table {
                continue;
            }
            if let (Some(section), Some(cell)) = (&current, line.strip_prefix("| `")) {
                let first = cell.split(" |").next().unwrap_or_default();
                for key in first.split('`').step_by(2).map(|k| k.trim_matches(|c: char| c == ',' || c == ' ')) {
                    if !key.is_empty() && !key.starts_with('"') && !key.contains(' ') {
                        documented.entry(section.clone()).or_default().insert(key.to_string());
                    }
                }
            }
        }
        let mut sections = accepted_keys(None);
        if sections.iter().any(|s| s == "views") {
            sections.push("views.parts".into());
        }
        for section in &sections {
            let accepted: std::collections::BTreeSet<String> = accepted_keys(Some(section)).into_iter().collect();
            let in_doc = documented.get(section).cloned().unwrap_or_default();
            let missing: Vec<_> = accepted.difference(&in_doc).collect();
            let unknown: Vec<_> = in_doc.difference(&accepted).collect();
            assert!(missing.is_empty(), "[{section}] keys missing from docs/configuration.md: {missing:?}");
            assert!(unknown.is_empty(), "[{section}] keys documented but not accepted: {unknown:?}");
        }
        let documented_sections: Vec<_> = documented.keys().filter(|s| !sections.contains(s)).collect();
        assert!(
            documented_sections.is_empty(),
            "documented sections the configuration does not have: {documented_sections:?}"
        );
    }

    #[test]
    fn tracing_is_off_by_default_and_its_keys_are_checked() {
        Jail::expect_with(|jail| {
            let c = load(jail, MINIMAL).expect("valid");
            assert!(c.tracing.endpoint.is_none());
            assert_eq!(c.tracing.propagation, TracePropagation::TrustedProxies);
            assert_eq!(c.tracing.sample_ratio, 1.0);
            let on = format!(
                "{MINIMAL}\n[tracing]\nendpoint = \"http://127.0.0.1:4318/v1/traces\"\nsample_ratio = 0.25\npropagation = \"never\"\n"
            );
            let c = load(jail, &on).expect("valid");
            assert_eq!(c.tracing.sample_ratio, 0.25);
            assert_eq!(c.tracing.propagation, TracePropagation::Never);
            jail.set_env("GATEHOUSE_TRACING__PROPAGATION", "any");
            assert_eq!(load(jail, &on).expect("valid").tracing.propagation, TracePropagation::Any);
            for (bad, key) in [
                ("sample_ratio = 1.5", "tracing.sample_ratio"),
                ("endpoint = \"grpc://collector:4317\"", "tracing.endpoint"),
                ("service_name = \" \"", "tracing.service_name"),
            ] {
                let text = format!("{MINIMAL}\n[tracing]\n{bad}\n");
                let err = load(jail, &text).expect_err(bad).to_string();
                assert!(err.contains(key), "{bad}: {err}");
            }
            let unknown = format!("{MINIMAL}\n[tracing]\nendpont = \"http://x\"\n");
            assert!(load(jail, &unknown).is_err(), "unknown keys are refused");
            Ok(())
        });
    }

    #[test]
    fn minimal_config_gets_defaults() {
        Jail::expect_with(|jail| {
            let c = load(jail, MINIMAL).expect("valid");
            assert_eq!(c.session.idle_timeout, Duration::from_secs(1800));
            assert_eq!(c.session.absolute_timeout, Duration::from_secs(43200));
            assert_eq!(c.cookie().name, "__Host-Http-gatehouse");
            assert!(c.cookie().secure);
            assert!(!c.oidc.password_login);
            Ok(())
        });
    }

    #[test]
    fn session_file_damage_keys() {
        Jail::expect_with(|jail| {
            let c = load(jail, MINIMAL).expect("valid");
            assert!(c.session.integrity_check);
            assert_eq!(c.session.integrity_check_timeout, Duration::from_secs(60));
            assert_eq!(c.session.on_corrupt, OnCorrupt::Fail);
            let c = load(
                jail,
                &format!(
                    "{MINIMAL}\non_corrupt = \"move_aside\"\nintegrity_check = false\nintegrity_check_timeout = \"5m\""
                ),
            )
            .expect("valid");
            assert_eq!(c.session.on_corrupt, OnCorrupt::MoveAside);
            assert!(!c.session.integrity_check);
            assert_eq!(c.session.integrity_check_timeout, Duration::from_secs(300));
            let err = load(jail, &format!("{MINIMAL}\non_corrupt = \"ignore\"")).unwrap_err().to_string();
            assert!(err.contains("on_corrupt"), "{err}");
            let err = load(jail, &format!("{MINIMAL}\nintegrity_check_timeout = \"0s\"")).unwrap_err().to_string();
            assert!(err.contains("session.integrity_check_timeout"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn unknown_key_is_named() {
        Jail::expect_with(|jail| {
            let err = load(jail, &format!("{MINIMAL}\n[admin]\nlisten = \"127.0.0.1:9\"\nlisen = 1\n")).unwrap_err();
            assert!(err.to_string().contains("lisen"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn env_overrides_nest_with_double_underscore() {
        Jail::expect_with(|jail| {
            jail.set_env("GATEHOUSE_OIDC__CLIENT_ID", "from-env");
            jail.set_env("GATEHOUSE_SESSION__IDLE_TIMEOUT", "5m");
            let c = load(jail, MINIMAL).expect("valid");
            assert_eq!(c.oidc.client_id, "from-env");
            assert_eq!(c.session.idle_timeout, Duration::from_secs(300));
            Ok(())
        });
    }

    #[test]
    fn bad_values_name_the_key() {
        Jail::expect_with(|jail| {
            let cases = [
                (MINIMAL.replace("http://localhost:8080", "http://example.com"), "public.external_url"),
                (MINIMAL.replace("http://127.0.0.1:8180", "http://idp.example.com"), "oidc.issuer"),
                (format!("{MINIMAL}\nidle_timeout = \"soon\""), "idle_timeout"),
                (MINIMAL.replace("client_secret = \"s3cret\"", ""), "oidc.client_secret_file"),
                (format!("{MINIMAL}\ncookie_name = \"gatehouse\""), "session.cookie_name"),
                (format!("{MINIMAL}\n[admin]\nlisten = \"0.0.0.0:9090\""), "admin.token_file"),
                (format!("{MINIMAL}\n[admin]\nlisten = \"10.0.0.5:9090\""), "admin.token_file"),
                (
                    MINIMAL.replace("client_id = \"gatehouse\"", "client_id = \"gatehouse\"\nalgorithms = [\"HS256\"]"),
                    "oidc.algorithms",
                ),
                (
                    MINIMAL.replace("client_id = \"gatehouse\"", "client_id = \"gatehouse\"\nalgorithms = [\"none\"]"),
                    "oidc.algorithms",
                ),
            ];
            for (text, key) in cases {
                let err = load(jail, &text).unwrap_err().to_string();
                assert!(err.contains(key), "expected `{key}` in: {err}");
            }
            Ok(())
        });
    }

    #[test]
    fn redis_modes_and_tls_files_are_validated() {
        Jail::expect_with(|jail| {
            let redis = |extra: &str| MINIMAL.replace("[session]", &format!("[session]\nstore = \"redis\"\n{extra}"));
            assert!(load(jail, &redis("redis_url = \"rediss://r:6380\"\nredis_ca_file = \"ca.pem\"")).is_ok());
            for (extra, key) in [
                ("", "session.redis_url"),
                ("redis_url = \"http://r\"", "session.redis_url"),
                ("redis_url = \"redis://r\"\nredis_cluster_nodes = [\"redis://a\"]", "exactly one"),
                ("redis_sentinels = [\"rediss://s\"]\nredis_master_name = \"m\"", "session.redis_sentinels"),
                ("redis_sentinels = [\"redis://s\"]", "session.redis_master_name"),
                ("redis_cluster_nodes = [\"rediss://a\", \"redis://b\"]", "all nodes or for none"),
                ("redis_url = \"rediss://r\"\nredis_client_cert_file = \"c.pem\"", "together"),
                ("redis_url = \"redis://r\"\nredis_master_name = \"m\"", "applies only to redis_sentinels"),
                ("redis_url = \"redis://r\"\nredis_ca_file = \"ca.pem\"", "applies only to rediss://"),
            ] {
                let err = load(jail, &redis(extra)).unwrap_err().to_string();
                assert!(err.contains(key), "{extra}: expected `{key}` in: {err}");
            }
            Ok(())
        });
    }

    #[test]
    fn routes_are_validated() {
        Jail::expect_with(|jail| {
            let route = |prefix: &str, upstream: &str| {
                format!(
                    "{MINIMAL}\n[[routes]]\nprefix = \"{prefix}\"\nupstream = \"{upstream}\"\nrelay = \"session\"\n"
                )
            };
            let c = load(jail, &route("/api/pb/", "http://127.0.0.1:8090/")).expect("valid");
            assert_eq!(c.routes[0].relay, Relay::Session);
            assert_eq!(c.routes[0].timeout, Duration::from_secs(60));
            for (prefix, upstream, key) in [
                ("/pb/", "http://127.0.0.1:8090/", "routes.prefix"),
                ("/api/pb", "http://127.0.0.1:8090/", "routes.prefix"),
                ("/api/", "http://127.0.0.1:8090/", "routes.prefix"),
                ("/api/../auth/", "http://127.0.0.1:8090/", "routes.prefix"),
                ("/api//pb/", "http://127.0.0.1:8090/", "routes.prefix"),
                ("/api/p%62/", "http://127.0.0.1:8090/", "routes.prefix"),
                ("/api/pb/", "https://127.0.0.1:8090/", "routes.ca_file"),
                ("/api/pb/", "ftp://127.0.0.1:8090/", "routes.upstream"),
                ("/api/pb/", "http://127.0.0.1:8090/x", "routes.upstream"),
                ("/api/pb/", "http://u:p@127.0.0.1:8090/", "routes.upstream"),
                ("/api/pb/", "http://127.0.0.1:8090/?q=1", "routes.upstream"),
            ] {
                let err = load(jail, &route(prefix, upstream)).unwrap_err().to_string();
                assert!(err.contains(key), "{prefix} {upstream}: expected `{key}` in: {err}");
            }
            let twice = format!(
                "{}{}",
                route("/api/pb/", "http://127.0.0.1:1/"),
                route("/api/pb/", "http://127.0.0.2:1/").replace(MINIMAL, "")
            );
            assert!(load(jail, &twice).unwrap_err().to_string().contains("listed twice"));
            let unknown = route("/api/pb/", "http://a/").replace("relay = \"session\"", "relay = \"cookie\"");
            assert!(load(jail, &unknown).is_err(), "unknown relay");
            Ok(())
        });
    }

    #[test]
    fn plain_http_relay_to_a_remote_host_needs_an_explicit_opt_in() {
        Jail::expect_with(|jail| {
            let route = |upstream: &str, relay: &str, extra: &str| {
                format!(
                    "{MINIMAL}\n[[routes]]\nprefix = \"/api/pb/\"\nupstream = \"{upstream}\"\nrelay = \"{relay}\"\n{extra}"
                )
            };
            for relay in ["session", "bearer"] {
                for upstream in
                    ["http://pocketbase.internal:8090/", "http://10.0.0.8:8090/", "http://127.0.0.1.nip.io/"]
                {
                    let err = load(jail, &route(upstream, relay, "")).unwrap_err().to_string();
                    assert!(
                        err.contains("routes.upstream") && err.contains("allow_plaintext_relay"),
                        "{relay} {upstream}: {err}"
                    );
                    let c = load(jail, &route(upstream, relay, "allow_plaintext_relay = true")).expect("opted in");
                    assert!(c.warnings().iter().any(|w| w.contains("allow_plaintext_relay")), "{relay} {upstream}");
                }
                for upstream in ["http://127.0.0.1:8090/", "http://localhost:8090/", "http://[::1]:8090/"] {
                    let c = load(jail, &route(upstream, relay, "")).expect("loopback is fine");
                    assert!(c.warnings().iter().all(|w| !w.contains("allow_plaintext_relay")), "{upstream}");
                }
            }
            Ok(())
        });
    }

    #[test]
    fn insecure_http_drops_prefix_and_secure() {
        Jail::expect_with(|jail| {
            let text = MINIMAL
                .replace("http://localhost:8080", "http://gatehouse.internal:8080")
                .replace("[oidc]", "allow_insecure_http = true\n[oidc]");
            let c = load(jail, &text).expect("valid");
            let cookie = c.cookie();
            assert!(!cookie.secure);
            assert_eq!(cookie.name, "Http-gatehouse");
            assert!(!c.warnings().is_empty());
            Ok(())
        });
    }

    #[test]
    fn check_listener_needs_a_caller_credential_off_loopback() {
        Jail::expect_with(|jail| {
            fn err(jail: &mut Jail, text: &str) -> String {
                load(jail, text).err().map(|e| e.to_string()).unwrap_or_default()
            }
            let c = load(jail, &format!("{MINIMAL}\n[check]\n")).expect("loopback default");
            assert!(c.check.as_ref().is_some_and(|c| c.listen.ip().is_loopback() && !c.mtls()));
            let e = err(jail, &format!("{MINIMAL}\n[check]\nlisten = \"0.0.0.0:8444\""));
            assert!(e.contains("check.listen") && e.contains("mutual TLS"), "{e}");
            jail.create_file("short.key", "tooshort")?;
            let e = err(jail, &format!("{MINIMAL}\n[check]\nlisten = \"0.0.0.0:8444\"\nkey_file = \"short.key\""));
            assert!(e.contains("check.key_file"), "{e}");
            jail.create_file("check.key", &"k".repeat(40))?;
            let c = load(jail, &format!("{MINIMAL}\n[check]\nlisten = \"0.0.0.0:8444\"\nkey_file = \"check.key\""))
                .expect("a shared key is enough");
            assert!(c.warnings().iter().any(|w| w.contains("check.listen")), "plain HTTP off loopback warns");
            let e = err(jail, &format!("{MINIMAL}\n[check]\ncert = \"check.key\""));
            assert!(e.contains("check.key") && e.contains("go together"), "{e}");
            let e = err(jail, &format!("{MINIMAL}\n[check]\nclaim_headers = [\"password\"]"));
            assert!(e.contains("check.claim_headers"), "{e}");
            let e = err(jail, &format!("{MINIMAL}\n[check]\nlisten = \"127.0.0.1:8080\""));
            assert!(e.contains("must differ"), "{e}");
            Ok(())
        });
    }
}
