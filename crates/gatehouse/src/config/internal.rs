//! `[internal]`: the East-West listener — how callers are identified (mutual TLS or a mesh's
//! XFCC header), who may exchange, and its own limits.

use super::*;

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

impl InternalConfig {
    pub(super) fn validate(&self, all: &Config) -> Result<(), ConfigError> {
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
