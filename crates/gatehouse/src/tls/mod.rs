//! TLS for the East-West listener: a rustls server config that requires and verifies client
//! certificates against the configured CA bundle (TLS 1.2+, aws-lc-rs only), hot-reloaded when
//! the PEM files change. The caller identity comes from `identity`; the accept loop is `listener`.

pub mod identity;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::watch;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {problem}")]
    File { path: PathBuf, problem: String },
    #[error("TLS configuration rejected: {0}")]
    Config(String),
}

#[derive(Clone, Debug)]
pub struct TlsPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

fn file_err(path: &Path, problem: impl ToString) -> TlsError {
    TlsError::File { path: path.to_path_buf(), problem: problem.to_string() }
}

/// The one crypto provider for every TLS config we build (STACK: never the process default).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Build a server config from PEM files. Fails (and changes nothing) on any problem: unreadable
/// files, no certificate, a key that does not match the certificate, an empty CA bundle.
pub fn load(paths: &TlsPaths) -> Result<Arc<ServerConfig>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&paths.cert)
        .map_err(|e| file_err(&paths.cert, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(&paths.cert, e))?;
    if certs.is_empty() {
        return Err(file_err(&paths.cert, "no certificate in file"));
    }
    let key = PrivateKeyDer::from_pem_file(&paths.key)
        .map_err(|e| file_err(&paths.key, format!("no usable private key: {e}")))?;
    let mut roots = rustls::RootCertStore::empty();
    let ca_certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&paths.client_ca)
        .map_err(|e| file_err(&paths.client_ca, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(&paths.client_ca, e))?;
    let (added, _) = roots.add_parsable_certificates(ca_certs);
    if added == 0 {
        return Err(file_err(&paths.client_ca, "no usable CA certificate"));
    }
    let provider = provider();
    // Client certificates are mandatory: no certificate, no handshake (SECURITY 19).
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key) // checks that the key matches the certificate
        .map_err(|e| TlsError::Config(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The live server config, swapped whole when the files change. A whole new config (not just a
/// new verifier inside the old one) so resumed sessions cannot skip the new CA bundle.
pub struct ReloadingConfig {
    paths: TlsPaths,
    current: ArcSwap<ServerConfig>,
    fingerprint: Mutex<[u8; 32]>,
}

impl ReloadingConfig {
    pub fn new(paths: TlsPaths) -> Result<Arc<Self>, TlsError> {
        let fingerprint = fingerprint(&paths).ok_or_else(|| file_err(&paths.cert, "cannot read TLS files"))?;
        let config = load(&paths)?;
        Ok(Arc::new(Self { paths, current: ArcSwap::new(config), fingerprint: Mutex::new(fingerprint) }))
    }

    pub fn current(&self) -> Arc<ServerConfig> {
        self.current.load_full()
    }

    /// Re-read the files if their content changed. Returns whether a new config was published.
    pub fn reload_if_changed(&self) -> bool {
        let Some(now) = fingerprint(&self.paths) else {
            tracing::warn!("TLS files unreadable; keeping the current certificate");
            return false;
        };
        let mut last = self.fingerprint.lock().unwrap_or_else(|p| p.into_inner());
        if *last == now {
            return false;
        }
        *last = now; // a broken file is reported once, not every poll
        match load(&self.paths) {
            Ok(config) => {
                self.current.store(config);
                tracing::info!(cert = %self.paths.cert.display(), "internal TLS certificate reloaded");
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "new TLS files refused; keeping the current certificate");
                false
            }
        }
    }

    /// Poll the files' contents. Content hashes, not inotify: Kubernetes swaps a `..data` symlink
    /// under secret mounts and file watchers miss it.
    pub async fn watch(self: Arc<Self>, every: Duration, mut stop: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            self.reload_if_changed();
        }
    }
}

fn fingerprint(paths: &TlsPaths) -> Option<[u8; 32]> {
    let mut all = Vec::new();
    for p in [&paths.cert, &paths.key, &paths.client_ca] {
        all.extend_from_slice(&crate::crypto::sha256(&std::fs::read(p).ok()?));
    }
    Some(crate::crypto::sha256(&all))
}
