//! `[admin]` (metrics, health, the session API and its token) and `[shutdown]` (the drain on
//! SIGTERM).

use super::*;

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

impl AdminConfig {
    /// Never on the public port, and never open to the network without a token.
    pub(super) fn validate(&self, all: &Config) -> Result<(), ConfigError> {
        if same_port(all.public.listen, self.listen) {
            return Err(invalid("admin.listen", "must differ from public.listen: listeners are never mixed"));
        }
        if !self.listen.ip().is_loopback() && self.token_file.is_none() {
            return Err(invalid(
                "admin.token_file",
                format!(
                    "required when admin.listen ({}) is not loopback: the session admin API must not be open to the network",
                    self.listen
                ),
            ));
        }
        Ok(())
    }
}

impl ShutdownConfig {
    /// A drain long enough to finish a request, short enough for Kubernetes' grace period.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.drain_timeout.is_zero() || self.drain_timeout > Duration::from_secs(300) {
            return Err(invalid("shutdown.drain_timeout", "must be between 1ms and 5m"));
        }
        Ok(())
    }
}
