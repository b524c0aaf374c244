//! A client for Gatehouse's East-West session exchange, for internal services written in Rust.
//!
//! It calls `POST /internal/v1/session/exchange` over mutual TLS (your service's certificate,
//! Gatehouse's CA), reuses connections, and caches each answer until shortly before the access
//! token expires — and at most [`ClientConfig::max_age`], so a logout reaches your service within
//! that bound. Errors are typed: an invalid session is not an outage.
//!
//! ```no_run
//! # async fn demo() -> Result<(), gatehouse_client::Error> {
//! use gatehouse_client::{Client, ClientConfig};
//!
//! let client = Client::new(ClientConfig::from_files(
//!     "https://gatehouse.auth.svc:8443",
//!     "pki/ca.crt",
//!     "pki/pocketbase.crt",
//!     "pki/pocketbase.key",
//! )?)?;
//! // `session_id` arrives from the BFF in the `X-Gatehouse-Session` header.
//! match client.exchange("session-id-from-header").await {
//!     Ok(user) => println!("{} has roles {:?}", user.claims.sub, user.claims.realm_roles),
//!     Err(gatehouse_client::Error::InvalidSession) => println!("answer 401"),
//!     Err(e) if e.is_retryable() => println!("answer 503: {e}"),
//!     Err(e) => println!("answer 500: {e}"),
//! }
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Unknown, expired or revoked session: the user must log in again (answer 401).
    #[error("invalid session")]
    InvalidSession,
    /// This service is not on Gatehouse's allow-list (a deployment problem).
    #[error("this service is not allowed to exchange sessions")]
    Forbidden,
    /// Too many exchanges from this service; retry later.
    #[error("rate limited by Gatehouse")]
    RateLimited,
    /// Gatehouse, its session store or the identity provider is unavailable; retry later (503).
    #[error("Gatehouse unavailable: {0}")]
    Unavailable(String),
    /// Certificates or URL unusable.
    #[error("client configuration: {0}")]
    Config(String),
    /// Gatehouse answered something this client does not understand.
    #[error("unexpected answer from Gatehouse: {0}")]
    Protocol(String),
}

impl Error {
    /// Worth retrying later (as opposed to a decision or a misconfiguration).
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Unavailable(_) | Self::RateLimited)
    }
}

/// The user's identity as Gatehouse normalizes it.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct Claims {
    pub sub: String,
    pub email: Option<String>,
    pub email_verified: Option<bool>,
    pub preferred_username: Option<String>,
    pub name: Option<String>,
    #[serde(default)]
    pub realm_roles: Vec<String>,
    #[serde(default)]
    pub client_roles: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    pub groups: Vec<String>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct SessionTimes {
    pub expires_at: i64,
    pub idle_expires_at: i64,
}

/// One exchange's answer. `Debug` hides the token.
#[derive(Clone, Deserialize)]
pub struct Exchanged {
    pub access_token: String,
    pub token_type: String,
    /// Unix seconds when the access token expires.
    pub expires_at: i64,
    pub claims: Claims,
    pub session: SessionTimes,
}

impl std::fmt::Debug for Exchanged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exchanged")
            .field("access_token", &"<redacted>")
            .field("expires_at", &self.expires_at)
            .field("claims", &self.claims)
            .finish()
    }
}

pub struct ClientConfig {
    /// Base URL of Gatehouse's internal listener, e.g. `https://gatehouse:8443`.
    pub base_url: String,
    /// CA that signed Gatehouse's server certificate (PEM).
    pub ca_pem: Vec<u8>,
    /// This service's certificate chain and key (PEM).
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Stop serving a cached answer this long before the access token expires.
    pub expiry_margin: Duration,
    /// Serve a cached answer at most this long (bounds how late a logout is noticed).
    pub max_age: Duration,
    /// Most sessions kept in the cache.
    pub max_entries: usize,
}

impl ClientConfig {
    pub fn new(base_url: &str, ca_pem: Vec<u8>, cert_pem: Vec<u8>, key_pem: Vec<u8>) -> Self {
        Self {
            base_url: base_url.trim_end_matches('/').to_string(),
            ca_pem,
            cert_pem,
            key_pem,
            timeout: Duration::from_secs(5),
            expiry_margin: Duration::from_secs(30),
            max_age: Duration::from_secs(60),
            max_entries: 10_000,
        }
    }

    pub fn from_files(
        base_url: &str,
        ca: impl AsRef<Path>,
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> Result<Self, Error> {
        let read = |p: &Path| std::fs::read(p).map_err(|e| Error::Config(format!("{}: {e}", p.display())));
        Ok(Self::new(base_url, read(ca.as_ref())?, read(cert.as_ref())?, read(key.as_ref())?))
    }
}

struct Entry {
    value: Arc<Exchanged>,
    valid_until: i64,
}

pub struct Client {
    http: reqwest::Client,
    url: String,
    expiry_margin: i64,
    max_age: i64,
    max_entries: usize,
    /// Keyed by SHA-256 of the session id: the raw id is not kept in memory longer than a call.
    cache: Mutex<HashMap<[u8; 32], Entry>>,
}

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

impl Client {
    pub fn new(config: ClientConfig) -> Result<Self, Error> {
        let bad = |e: &dyn std::fmt::Display| Error::Config(e.to_string());
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(&config.ca_pem) {
            roots.add(c.map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
        }
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(&config.cert_pem).collect::<Result<_, _>>().map_err(|e| bad(&e))?;
        let key = PrivateKeyDer::from_pem_slice(&config.key_pem).map_err(|e| bad(&e))?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| bad(&e))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| bad(&e))?;
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .timeout(config.timeout)
            .connect_timeout(config.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .pool_idle_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| bad(&e))?;
        Ok(Self {
            http,
            url: format!("{}/internal/v1/session/exchange", config.base_url),
            expiry_margin: config.expiry_margin.as_secs() as i64,
            max_age: config.max_age.as_secs() as i64,
            max_entries: config.max_entries,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// Exchange a session id for the user's access token and claims (cached).
    pub async fn exchange(&self, session_id: &str) -> Result<Arc<Exchanged>, Error> {
        let key: [u8; 32] = {
            let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, session_id.as_bytes());
            d.as_ref().try_into().map_err(|_| Error::Protocol("digest".into()))?
        };
        let t = now();
        if let Some(hit) = self.lock().get(&key).filter(|e| e.valid_until > t).map(|e| e.value.clone()) {
            return Ok(hit);
        }
        let value = Arc::new(self.fetch(session_id).await?);
        let valid_until = (value.expires_at - self.expiry_margin).min(t + self.max_age);
        let mut cache = self.lock();
        if cache.len() >= self.max_entries {
            cache.retain(|_, e| e.valid_until > t);
            if cache.len() >= self.max_entries {
                cache.clear();
            }
        }
        if valid_until > t {
            cache.insert(key, Entry { value: value.clone(), valid_until });
        }
        Ok(value)
    }

    /// Forget a cached session (call it when your service learns of a logout).
    pub fn forget(&self, session_id: &str) {
        let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, session_id.as_bytes());
        if let Ok(key) = <[u8; 32]>::try_from(d.as_ref()) {
            self.lock().remove(&key);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Entry>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn fetch(&self, session_id: &str) -> Result<Exchanged, Error> {
        let resp = self
            .http
            .post(&self.url)
            .json(&serde_json::json!({ "session_id": session_id }))
            .send()
            .await
            .map_err(|e| Error::Unavailable(e.without_url().to_string()))?;
        match resp.status().as_u16() {
            200 => resp.json::<Exchanged>().await.map_err(|e| Error::Protocol(e.without_url().to_string())),
            401 => Err(Error::InvalidSession),
            403 => Err(Error::Forbidden),
            429 => Err(Error::RateLimited),
            s @ (502..=504) => Err(Error::Unavailable(format!("status {s}"))),
            s => Err(Error::Protocol(format!("status {s}"))),
        }
    }
}
