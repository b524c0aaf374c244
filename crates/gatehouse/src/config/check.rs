//! `[check]`: the gateways' check listener (forward-auth, ext_authz) and how it authenticates
//! its callers (mutual TLS identities or a shared key file).

use super::*;

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

    pub(super) fn validate(&self, all: &Config) -> Result<(), ConfigError> {
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
