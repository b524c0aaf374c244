//! `[oidc]`: the provider (Keycloak), this client's registration, the algorithms accepted, the
//! refresh skew and password login with its limits.

use super::*;

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

impl OidcConfig {
    /// The provider is reached over TLS, the client is confidential, algorithms are asymmetric.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let iss = &self.issuer;
        if iss.scheme() != "https" && !(iss.scheme() == "http" && is_loopback_host(iss)) {
            return Err(invalid("oidc.issuer", "must be https (plain http only for a provider on loopback)"));
        }
        if self.client_id.trim().is_empty() {
            return Err(invalid("oidc.client_id", "must not be empty"));
        }
        if self.client_secret.is_some() && self.client_secret_file.is_some() {
            return Err(invalid("oidc.client_secret", "set either client_secret or client_secret_file, not both"));
        }
        if self.client_secret.is_none() && self.client_secret_file.is_none() {
            return Err(invalid("oidc.client_secret_file", "a confidential client needs a secret"));
        }
        if !self.scopes.iter().any(|s| s == "openid") {
            return Err(invalid("oidc.scopes", "must include `openid`"));
        }
        if self.algorithms.is_empty() {
            return Err(invalid("oidc.algorithms", "must list at least one algorithm"));
        }
        for alg in &self.algorithms {
            crate::oidc::parse_allowed_algorithm(alg).map_err(|p| invalid("oidc.algorithms", p))?;
        }
        if self.refresh_skew > Duration::from_secs(3600) {
            return Err(invalid("oidc.refresh_skew", "must be at most 1h"));
        }
        if self.password_login_per_ip_per_minute == 0 {
            return Err(invalid("oidc.password_login_per_ip_per_minute", "must be at least 1"));
        }
        if self.password_login_per_user_per_minute == 0 {
            return Err(invalid("oidc.password_login_per_user_per_minute", "must be at least 1"));
        }
        Ok(())
    }
}
