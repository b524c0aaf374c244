//! `[session]`: lifetimes, the cookie, encryption at rest and the store — embedded or Redis
//! (standalone, Sentinel, Cluster), resolved into one `StoreMode` with only its own settings.

use super::*;

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
    /// Embedded store: most bytes of the file redb keeps cached in memory (read cache and write
    /// buffer). redb's own default is 1 GiB, which let the process grow with the file; the OS page
    /// cache still holds the rest of the file, so a small cache costs a system call, not a disk read.
    #[serde(default = "defaults::cache_bytes")]
    pub cache_bytes: usize,
    /// How records are written: `binary` (record format 2, protobuf metadata) or `json` (format 1,
    /// which builds before format 2 read). Both are always read. `json` is for the first phase of
    /// a rolling upgrade from such a build, on a store replicas share (docs/operations.md).
    #[serde(default)]
    pub record_format: crate::session::RecordFormat,
}

/// The smallest `session.cache_bytes`: below it redb evicts the upper tree levels on every lookup.
const MIN_CACHE_BYTES: usize = 1 << 20;

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
            cache_bytes: defaults::cache_bytes(),
            record_format: Default::default(),
        }
    }
}

impl SessionConfig {
    /// Lifetimes and cookie name, and exactly one store mode with only its own keys.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let s = self;
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
        if s.cache_bytes < MIN_CACHE_BYTES {
            return Err(invalid("session.cache_bytes", "must be at least 1048576 (1 MiB)"));
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
        Ok(())
    }
}
