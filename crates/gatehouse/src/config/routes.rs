//! `[[routes]]`: the API proxy's table, `/api/<name>/...` to an internal service, and how each
//! route carries the user (token relay or session id) — validated so a credential never goes
//! to the wrong place.

use super::*;

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

impl RouteConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
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
