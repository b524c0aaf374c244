//! The provider's signing keys, cached. An unknown `kid` triggers one single-flight refetch, no
//! more often than a floor interval per *source*: tokens we fetched ourselves from the token
//! endpoint and tokens anyone can post (back-channel logout) have separate allowances, so an
//! attacker spraying random `kid`s can neither hammer Keycloak nor use up the refetch that a real
//! key rotation needs. When a fetch fails the keys we had stay in use.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use jsonwebtoken::jwk::{Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};

use super::{Http, OidcError};
use crate::clock::{Clock, UnixTime};

/// One verification key from the JWKS.
pub struct SigningKey {
    pub key: DecodingKey,
    /// The `alg` the JWK pins, if any; a token must then use exactly it.
    pub alg: Option<Algorithm>,
}

#[derive(Default)]
struct KeySet {
    by_kid: HashMap<String, Arc<SigningKey>>,
    /// Keys without a `kid` (rare; only usable when the set holds exactly one key).
    all: Vec<Arc<SigningKey>>,
}

/// Where a token came from, which decides whose refetch allowance an unknown `kid` may spend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySource {
    /// Received from the token endpoint over our own client-authenticated call: only the provider
    /// can make these carry a new `kid`, so a miss means the provider rotated its keys.
    TokenEndpoint,
    /// Posted to us by anyone (back-channel logout tokens): a miss may be an attacker's random `kid`.
    Unauthenticated,
}

/// When each source last started a refetch.
#[derive(Default)]
struct LastFetch {
    token_endpoint: Option<UnixTime>,
    unauthenticated: Option<UnixTime>,
}

pub struct JwksCache {
    uri: String,
    keys: ArcSwap<KeySet>,
    /// Held while fetching: the single flight. Remembers when each source last fetched.
    fetch: tokio::sync::Mutex<LastFetch>,
    /// Floor between refetches for unauthenticated tokens.
    min_refetch: Duration,
    /// Floor for tokens from the token endpoint: short, it only guards against a provider that
    /// keeps signing with a key it does not publish.
    min_refetch_trusted: Duration,
    /// The floors are measured on the injected clock (whole seconds), so tests move time
    /// instead of sleeping through them.
    clock: Arc<dyn Clock>,
}

impl JwksCache {
    pub fn new(uri: String, min_refetch: Duration, min_refetch_trusted: Duration, clock: Arc<dyn Clock>) -> Self {
        Self {
            uri,
            keys: ArcSwap::from_pointee(KeySet::default()),
            fetch: tokio::sync::Mutex::new(LastFetch::default()),
            min_refetch,
            min_refetch_trusted,
            clock,
        }
    }

    /// The key for a token header's `kid`, fetching the JWKS once if it is not known yet and the
    /// token's source still has a refetch allowance.
    pub async fn key(&self, http: &Http, kid: Option<&str>, source: KeySource) -> Result<Arc<SigningKey>, OidcError> {
        if let Some(k) = Self::pick(&self.keys.load(), kid) {
            return Ok(k);
        }
        let seen = self.keys.load_full();
        let mut last = self.fetch.lock().await;
        // Someone else may have refreshed the set while we waited for the lock.
        if !Arc::ptr_eq(&seen, &self.keys.load_full())
            && let Some(k) = Self::pick(&self.keys.load(), kid)
        {
            return Ok(k);
        }
        let (slot, floor) = match source {
            KeySource::TokenEndpoint => (&mut last.token_endpoint, self.min_refetch_trusted),
            KeySource::Unauthenticated => (&mut last.unauthenticated, self.min_refetch),
        };
        let now = self.clock.now();
        if let Some(at) = *slot
            && now.saturating_sub(at) < floor.as_secs() as i64
        {
            return Err(OidcError::UnknownKey);
        }
        *slot = Some(now);
        self.refresh_locked(http).await?;
        Self::pick(&self.keys.load(), kid).ok_or(OidcError::UnknownKey)
    }

    /// Fetch the JWKS now (start-up); failures keep the previous keys. Spends no allowance.
    pub async fn refresh(&self, http: &Http) -> Result<(), OidcError> {
        let _single = self.fetch.lock().await;
        self.refresh_locked(http).await
    }

    async fn refresh_locked(&self, http: &Http) -> Result<(), OidcError> {
        let doc: serde_json::Value = http.get_json("jwks", &self.uri).await?;
        let set = parse_jwks(&doc)?;
        tracing::info!(keys = set.all.len(), "loaded provider signing keys");
        self.keys.store(Arc::new(set));
        Ok(())
    }

    fn pick(set: &KeySet, kid: Option<&str>) -> Option<Arc<SigningKey>> {
        match kid {
            Some(kid) => set.by_kid.get(kid).cloned(),
            // Without a kid the choice must be unambiguous (SECURITY 13).
            None if set.all.len() == 1 => set.all.first().cloned(),
            None => None,
        }
    }
}

fn signature_alg(a: KeyAlgorithm) -> Option<Algorithm> {
    Some(match a {
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        _ => return None,
    })
}

fn parse_jwks(doc: &serde_json::Value) -> Result<KeySet, OidcError> {
    let keys =
        doc.get("keys").and_then(|k| k.as_array()).ok_or(OidcError::Provider("JWKS has no `keys` array".into()))?;
    let mut set = KeySet::default();
    for raw in keys {
        // Parse keys one by one: Keycloak also publishes encryption keys (RSA-OAEP) we must skip,
        // and one odd key must not hide the others.
        let Ok(jwk) = serde_json::from_value::<Jwk>(raw.clone()) else {
            continue;
        };
        if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption) | Some(PublicKeyUse::Other(_))) {
            continue;
        }
        let alg = match jwk.common.key_algorithm {
            Some(a) => match signature_alg(a) {
                Some(a) => Some(a),
                None => continue, // an encryption or symmetric algorithm: never for verification
            },
            None => None,
        };
        let Ok(key) = DecodingKey::from_jwk(&jwk) else {
            continue;
        };
        let key = Arc::new(SigningKey { key, alg });
        if let Some(kid) = &jwk.common.key_id {
            set.by_kid.insert(kid.clone(), key.clone());
        }
        set.all.push(key);
    }
    if set.all.is_empty() {
        return Err(OidcError::Provider("JWKS holds no usable signing key".into()));
    }
    Ok(set)
}

/// Parse a JWKS document and pick a key as `JwksCache` would (unit tests of the stub cases).
#[cfg(test)]
pub(super) fn test_pick(doc: &serde_json::Value, kid: Option<&str>) -> Option<Arc<SigningKey>> {
    JwksCache::pick(&parse_jwks(doc).ok()?, kid)
}
