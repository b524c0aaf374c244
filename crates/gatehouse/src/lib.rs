//! Gatehouse: an access-control gateway. Browsers hold an opaque session id in an HttpOnly
//! cookie; Gatehouse keeps the user's tokens server-side, answers the public (North-South) face,
//! and — for trusted internal services — exchanges a session id for a JWT and claims (East-West).
//!
//! Layout: `oidc` (the provider client) and `session` (records and stores) are the core with
//! `exchange` on top; `public` (North-South), `internal` (East-West) and `admin` are faces that
//! depend on the core, never on each other. `tls` and `pki` serve the internal listener.

mod admin;
mod check;
pub mod clock;
pub mod config;
pub mod crypto;
pub mod error;
pub mod exchange;
pub mod extend;
mod internal;
pub mod limit;
mod listener;
pub mod metrics;
pub mod oidc;
mod pipeline;
pub mod pki;
pub mod public;
pub mod session;
pub mod telemetry;
pub mod tls;

#[cfg(feature = "fuzzing")]
pub mod fuzzing;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use secrecy::{ExposeSecret, SecretString};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::clock::{Clock, SystemClock};
use crate::config::{Config, ConfigError, StoreKind, StoreMode, read_secret_file};
use crate::crypto::Keyring;
use crate::exchange::{Exchange, ExchangeSettings};
use crate::metrics::Metrics;
use crate::oidc::{OidcClient, OidcSettings};
use crate::session::SessionStore;
use crate::session::embedded::EmbeddedStore;
use crate::session::observed::ObservedStore;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("session store: {0}")]
    Store(#[from] session::StoreError),
    /// The embedded store's file: one line naming it (and, if damaged, the recovery command).
    #[error(transparent)]
    SessionFile(#[from] session::embedded::OpenError),
    #[error("identity provider client: {0}")]
    Oidc(#[from] oidc::OidcError),
    #[error("internal TLS: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error(transparent)]
    Route(#[from] public::proxy::RouteError),
}

/// Secrets read from files or config, checked (used by `check-config` too).
pub struct Secrets {
    pub keyring: Keyring,
    pub client_secret: SecretString,
}

pub fn load_secrets(config: &Config) -> Result<Secrets, StartError> {
    let key = match (&config.session.encryption_key, &config.session.encryption_key_file) {
        (Some(k), _) => k.clone(),
        (None, Some(path)) => read_secret_file("session.encryption_key_file", path)?,
        (None, None) => {
            return Err(ConfigError::Invalid { key: "session.encryption_key_file", problem: "missing".into() }.into());
        }
    };
    // Keys that only open: the next key of a rotation in progress (phase 1), then the old ones.
    let mut opening = Vec::new();
    if let Some(path) = &config.session.next_encryption_key_file {
        opening.push(read_secret_file("session.next_encryption_key_file", path)?);
    }
    for p in &config.session.previous_encryption_key_files {
        opening.push(read_secret_file("session.previous_encryption_key_files", p)?);
    }
    let keyring = Keyring::new(&key, &opening).map_err(|e| ConfigError::Invalid {
        key: "session.encryption_key_file",
        problem: format!("{e} (generate one with `head -c 32 /dev/urandom | base64`)"),
    })?;
    if keyring.has_duplicates() {
        return Err(ConfigError::Invalid {
            key: "session.next_encryption_key_file",
            problem: "the same key is listed twice (sealing, next or previous): a rotation needs a new key".into(),
        }
        .into());
    }
    let client_secret: SecretString = match (&config.oidc.client_secret, &config.oidc.client_secret_file) {
        (Some(s), _) => s.clone(),
        (None, Some(path)) => read_secret_file("oidc.client_secret_file", path)?,
        (None, None) => {
            return Err(ConfigError::Invalid { key: "oidc.client_secret_file", problem: "missing".into() }.into());
        }
    };
    if let Some(path) = &config.admin.token_file {
        config::read_admin_token(path)?;
    }
    Ok(Secrets { keyring, client_secret })
}

/// The PEM files for TLS to Redis, read once at start-up (a missing file fails start-up).
fn redis_tls(config: &Config) -> Result<session::redis::RedisTls, StartError> {
    let s = &config.session;
    let read = |key: &'static str, path: &std::path::Path| {
        std::fs::read(path)
            .map_err(|e| StartError::from(ConfigError::Invalid { key, problem: format!("{}: {e}", path.display()) }))
    };
    let ca = s.redis_ca_file.as_deref().map(|p| read("session.redis_ca_file", p)).transpose()?;
    let client_cert_and_key = match (&s.redis_client_cert_file, &s.redis_client_key_file) {
        (Some(c), Some(k)) => {
            Some((read("session.redis_client_cert_file", c)?, read("session.redis_client_key_file", k)?))
        }
        _ => None,
    };
    Ok(session::redis::RedisTls { ca, client_cert_and_key })
}

/// Everything the faces share.
pub struct Core {
    pub exchange: Arc<Exchange>,
    pub keyring: Arc<Keyring>,
    pub metrics: Arc<Metrics>,
    /// Every rate limit of every face (shared through Redis with the Redis store).
    pub limiter: Arc<limit::Limiter>,
    pub registry: Registry,
    /// Whether trace context is read and sent (`[tracing]`).
    pub propagation: telemetry::Propagation,
}

impl Core {
    pub fn build(config: &Config, clock: Arc<dyn Clock>) -> Result<Self, StartError> {
        let Secrets { keyring, client_secret } = load_secrets(config)?;
        let keyring = Arc::new(keyring);
        let algorithms = config
            .oidc
            .algorithms
            .iter()
            .map(|a| {
                oidc::parse_allowed_algorithm(a)
                    .map_err(|p| ConfigError::Invalid { key: "oidc.algorithms", problem: p })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let metrics = Arc::new(Metrics::default());
        let oidc = Arc::new(
            OidcClient::new(
                OidcSettings {
                    issuer: config.oidc.issuer.as_str().trim_end_matches('/').to_string(),
                    client_id: config.oidc.client_id.clone(),
                    client_secret,
                    scopes: config.oidc.scopes.clone(),
                    algorithms,
                    trusted_audiences: config.oidc.trusted_audiences.clone(),
                    redirect_uri: config.redirect_uri(),
                    http_timeout: config.oidc.http_timeout,
                },
                clock.clone(),
            )?
            .with_metrics(metrics.clone()),
        );
        let redis_tls = redis_tls(config)?;
        // The Redis store also keeps the rate-limit buckets (shared by every replica).
        let mut redis: Option<Arc<session::redis::RedisStore>> = None;
        let store: Arc<dyn SessionStore> = match config.session.mode() {
            StoreMode::Embedded { path } => Arc::new(
                EmbeddedStore::open_with(
                    path,
                    &session::embedded::OpenOptions {
                        integrity_check: config.session.integrity_check,
                        integrity_check_timeout: config.session.integrity_check_timeout,
                        on_corrupt: config.session.on_corrupt,
                        cache_bytes: config.session.cache_bytes,
                    },
                )?
                .writing(config.session.record_format),
            ),
            StoreMode::Sentinel { sentinels, master, password_file } => {
                let password = match password_file {
                    Some(path) => Some(read_secret_file("session.redis_master_password_file", path)?),
                    None => None,
                };
                redis
                    .insert(Arc::new(
                        session::redis::RedisStore::open_sentinel(
                            sentinels,
                            master,
                            password.as_ref().map(|p| p.expose_secret()),
                            config.session.redis_timeout,
                        )?
                        .writing(config.session.record_format),
                    ))
                    .clone()
            }
            StoreMode::Cluster { nodes } => redis
                .insert(Arc::new(
                    session::redis::RedisStore::open_cluster(nodes, &redis_tls, config.session.redis_timeout)?
                        .writing(config.session.record_format),
                ))
                .clone(),
            StoreMode::Redis { url } => redis
                .insert(Arc::new(
                    session::redis::RedisStore::open(url, &redis_tls, config.session.redis_timeout)?
                        .writing(config.session.record_format),
                ))
                .clone(),
        };
        let limiter = Arc::new(limit::Limiter::new(config, redis, metrics.clone()));
        // Every store call is timed, counted on failure and traced (session/observed.rs).
        let system = match config.session.store {
            StoreKind::Embedded => "redb",
            StoreKind::Redis => "redis",
        };
        let store: Arc<dyn SessionStore> = Arc::new(ObservedStore::new(store, metrics.clone(), system));
        let mut registry = Registry::default();
        metrics.preinit(config);
        metrics.register(&mut registry);
        let secs = |d: Duration| d.as_secs() as i64;
        let exchange = Arc::new(Exchange::new(
            store,
            oidc,
            keyring.clone(),
            clock,
            ExchangeSettings {
                idle_timeout: secs(config.session.idle_timeout),
                absolute_timeout: secs(config.session.absolute_timeout),
                refresh_skew: secs(config.oidc.refresh_skew),
            },
            metrics.clone(),
        ));
        let propagation = telemetry::Propagation::new(config);
        Ok(Self { exchange, keyring, metrics, limiter, registry, propagation })
    }

    /// The `observe` middleware's state for one listener.
    pub fn observer(&self, face: metrics::Face) -> Arc<telemetry::Observe> {
        Arc::new(telemetry::Observe { face, metrics: self.metrics.clone(), propagation: self.propagation.clone() })
    }

    /// Ready = store reachable and provider metadata loaded once, and not draining.
    pub async fn readiness(&self) -> (bool, serde_json::Value) {
        let h = self.exchange.health().await;
        let ready = h.store && h.identity_provider && !h.draining;
        let body = serde_json::json!({
            "ready": ready,
            "store": if h.store { "ok" } else { "unavailable" },
            "identity_provider": if h.identity_provider { "ok" } else { "metadata not loaded" },
            "shutting_down": h.draining,
        });
        (ready, body)
    }
}

/// A running Gatehouse: its listeners' addresses and a handle to stop it.
pub struct Running {
    pub core: Arc<Core>,
    pub public_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// The East-West listener, when `[internal]` is configured.
    pub internal_addr: Option<SocketAddr>,
    /// The live internal TLS config (tests force a reload instead of waiting for the poll).
    pub internal_tls: Option<Arc<tls::ReloadingConfig>>,
    /// The check listener (gateway auth check), when `[check]` is configured.
    pub check_addr: Option<SocketAddr>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    drain: Duration,
}

impl Running {
    /// Readiness false at once, stop accepting, let in-flight requests and background
    /// revocations finish within `shutdown.drain_timeout`, stop background tasks.
    pub async fn shutdown(self) {
        let drain = self.drain;
        let started = tokio::time::Instant::now();
        self.core.exchange.start_draining();
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        self.core.exchange.flush_background(drain.saturating_sub(started.elapsed())).await;
    }

    /// Run until SIGTERM or Ctrl-C, then shut down gracefully.
    pub async fn until_signal(self) {
        shutdown_signal().await;
        tracing::info!("shutting down");
        self.shutdown().await;
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

/// Build the core and start every listener and background task.
pub async fn start(config: Config, clock: Arc<dyn Clock>) -> Result<Running, StartError> {
    start_with(config, clock, extend::Extensions::default()).await
}

/// [`start`], with endpoints written in Rust added to the public listener (`extend`).
pub async fn start_with(
    config: Config,
    clock: Arc<dyn Clock>,
    extensions: extend::Extensions,
) -> Result<Running, StartError> {
    for w in config.warnings() {
        tracing::warn!("{w}");
    }
    let public_listen = config.public.listen;
    let admin_listen = config.admin.listen;
    let sweep_every = config.session.sweep_interval;
    let core = Arc::new(Core::build(&config, clock.clone())?);
    // Refuse to start with broken certificates rather than fail every handshake later.
    let internal_tls = match &config.internal {
        Some(i) if i.mode == config::InternalMode::Mtls => Some(tls::ReloadingConfig::new(tls::TlsPaths {
            cert: i.cert.clone().unwrap_or_default(),
            key: i.key.clone().unwrap_or_default(),
            client_ca: i.client_ca.clone().unwrap_or_default(),
        })?),
        _ => None,
    };
    let public_router = public::router(core.clone(), &config, extensions)?;
    let (tx, rx) = watch::channel(false);
    let drain = config.shutdown.drain_timeout;
    let bind = |addr| async move { TcpListener::bind(addr).await.map_err(|source| StartError::Bind { addr, source }) };
    let public = bind(public_listen).await?;
    let admin = bind(admin_listen).await?;
    let public_addr = public.local_addr().map_err(|source| StartError::Bind { addr: public_listen, source })?;
    let admin_addr = admin.local_addr().map_err(|source| StartError::Bind { addr: admin_listen, source })?;
    tracing::info!(%public_addr, %admin_addr, "listening");
    if config.session.record_format == session::RecordFormat::Json {
        // Phase 1 of an upgrade: a reminder that phase 2 (removing the setting) is still to come.
        tracing::warn!(
            "session records are written in format 1 (JSON): phase 1 of an upgrade; remove session.record_format once every replica runs this build"
        );
    }

    let mut tasks = vec![
        tokio::spawn(listener::serve(public, public_router, None, rx.clone(), drain)),
        tokio::spawn(listener::serve(admin, admin::router(core.clone(), &config.admin), None, rx.clone(), drain)),
        tokio::spawn(discovery_loop(core.clone(), rx.clone())),
        tokio::spawn(sweep_loop(core.clone(), sweep_every, rx.clone())),
        tokio::spawn(logout_retry_loop(core.clone(), rx.clone(), drain)),
        tokio::spawn(certificate_loop(core.clone(), certificates(&config), rx.clone())),
    ];
    count_sessions(&core).await;
    let mut internal_addr = None;
    if let Some(i) = &config.internal {
        let sock = bind(i.listen).await?;
        internal_addr = Some(sock.local_addr().map_err(|source| StartError::Bind { addr: i.listen, source })?);
        tracing::info!(internal_addr = ?internal_addr, mode = ?i.mode, "internal listener");
        let router = internal::router(core.clone(), i);
        let tls = internal_tls
            .as_ref()
            .map(|t| listener::TlsSettings { config: t.clone(), handshake_timeout: i.handshake_timeout });
        if let Some(t) = &internal_tls {
            tasks.push(tokio::spawn(t.clone().watch(i.reload_interval, rx.clone())));
        }
        tasks.push(tokio::spawn(listener::serve(sock, router, tls, rx.clone(), drain)));
    }
    let mut check_addr = None;
    if let Some(c) = &config.check {
        let sock = bind(c.listen).await?;
        check_addr = Some(sock.local_addr().map_err(|source| StartError::Bind { addr: c.listen, source })?);
        tracing::info!(check_addr = ?check_addr, mtls = c.mtls(), "check listener");
        let tls = match c.mtls() {
            true => {
                let t = tls::ReloadingConfig::new(tls::TlsPaths {
                    cert: c.cert.clone().unwrap_or_default(),
                    key: c.key.clone().unwrap_or_default(),
                    client_ca: c.client_ca.clone().unwrap_or_default(),
                })?;
                tasks.push(tokio::spawn(t.clone().watch(c.reload_interval, rx.clone())));
                Some(listener::TlsSettings { config: t, handshake_timeout: c.handshake_timeout })
            }
            false => None,
        };
        tasks.push(tokio::spawn(listener::serve(
            sock,
            check::router(core.clone(), &config, c),
            tls,
            rx.clone(),
            drain,
        )));
    }
    Ok(Running { core, public_addr, admin_addr, internal_addr, internal_tls, check_addr, shutdown: tx, tasks, drain })
}

/// Load provider metadata at start-up, retrying with backoff until it succeeds once.
async fn discovery_loop(core: Arc<Core>, mut stop: watch::Receiver<bool>) {
    let mut delay = Duration::from_millis(500);
    loop {
        match core.exchange.discover().await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?delay, "identity provider metadata not loaded yet")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}

async fn sweep_loop(core: Arc<Core>, every: Duration, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        match core.exchange.sweep().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(swept = n, "expired sessions removed"),
            Err(e) => tracing::warn!(error = %e, "session sweep failed"),
        }
        count_sessions(&core).await;
    }
}

/// Back-channel logouts that arrived while the store was down, applied once it is back; the last
/// pass on shutdown stays within the drain timeout.
async fn logout_retry_loop(core: Arc<Core>, stop: watch::Receiver<bool>, drain: Duration) {
    core.exchange.logout_retry_loop(stop, drain).await;
}

/// `gatehouse_sessions_active`: counted by the store once per sweep (cheap: redb keeps a table's
/// length; Redis takes one SCAN), never per request.
async fn count_sessions(core: &Core) {
    match core.exchange.count().await {
        Ok(Some(n)) => {
            core.metrics.sessions_active.set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        Ok(None) => {}
        Err(e) => tracing::debug!(error = %e, "counting sessions failed"),
    }
}

/// `gatehouse_certificate_expiry_timestamp_seconds` for every certificate file Gatehouse loads:
/// the internal listener's certificate and client CA, and each proxy route's client certificate
/// and CA. Read again every minute, so a rotated file shows its new expiry (and one that stopped
/// rotating shows its old one running out — that is what the alert watches).
fn certificates(config: &Config) -> Vec<(&'static str, String, std::path::PathBuf)> {
    let mut out = Vec::new();
    if let Some(i) = &config.internal {
        if let Some(p) = &i.cert {
            out.push(("internal_server", "-".to_owned(), p.clone()));
        }
        if let Some(p) = &i.client_ca {
            out.push(("internal_client_ca", "-".to_owned(), p.clone()));
        }
    }
    for r in &config.routes {
        if let Some(p) = &r.client_cert_file {
            out.push(("route_client", r.prefix.clone(), p.clone()));
        }
        if let Some(p) = &r.ca_file {
            out.push(("route_ca", r.prefix.clone(), p.clone()));
        }
    }
    out
}

async fn certificate_loop(
    core: Arc<Core>,
    files: Vec<(&'static str, String, std::path::PathBuf)>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        for (kind, prefix, path) in &files {
            core.metrics.record_certificate(kind, prefix, path);
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(60)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// The default clock for `serve`.
pub fn system_clock() -> Arc<SystemClock> {
    Arc::new(SystemClock::default())
}

#[cfg(test)]
mod layering {
    //! The layering rule, checked on the source: faces reach sessions and the provider only
    //! through the core's operations (`Exchange`), never the store or the OIDC client directly.
    use std::path::Path;

    fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                sources(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }

    #[test]
    fn faces_use_the_core_not_the_store_or_the_oidc_client() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = vec![src.join("extend.rs")];
        for face in ["public", "internal", "check", "admin"] {
            sources(&src.join(face), &mut files);
        }
        assert!(files.len() > 10, "the faces' sources were found: {files:?}");
        let mut offences = Vec::new();
        for f in &files {
            let text = std::fs::read_to_string(f).unwrap();
            for (n, line) in text.lines().enumerate() {
                let code = line.split("//").next().unwrap_or("");
                if ["exchange.store()", "exchange.oidc()", "SessionStore", "OidcClient"]
                    .iter()
                    .any(|p| code.contains(p))
                {
                    offences.push(format!("{}:{}: {}", f.display(), n + 1, line.trim()));
                }
            }
        }
        assert!(offences.is_empty(), "faces reaching past the core:\n{}", offences.join("\n"));
    }
}
