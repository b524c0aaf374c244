//! The one core every face uses: start a session from a login, resolve a session id into a live
//! session (look up, check expiry, slide the idle timeout, refresh the access token once), and
//! end it. `/auth/me`, the proxy, the internal exchange and Envoy's ext_authz are adapters over it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use crate::clock::{Clock, UnixTime};
use crate::crypto::Keyring;
use crate::metrics::Metrics;
use crate::oidc::{LoginResult, OidcClient, OidcError};
use crate::session::{SessionId, SessionKey, SessionRecord, SessionStore, StoreError, TokenSet};

#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    /// Unknown, expired, revoked or ended: one answer for all (no oracle).
    #[error("invalid session")]
    InvalidSession,
    #[error("session store unavailable")]
    StoreUnavailable,
    #[error("identity provider unavailable")]
    ProviderUnavailable,
    #[error("internal error")]
    Internal,
}

impl From<StoreError> for ExchangeError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(why) => {
                tracing::error!(error = %why, "session store unavailable");
                Self::StoreUnavailable
            }
            // Fail closed: a record we cannot read authenticates nobody.
            StoreError::Corrupt(why) => {
                tracing::error!(error = %why, "session record corrupt");
                Self::InvalidSession
            }
        }
    }
}

pub struct ExchangeSettings {
    pub idle_timeout: i64,
    pub absolute_timeout: i64,
    pub refresh_skew: i64,
}

/// Where a login came from, kept for the admin listing.
#[derive(Default)]
pub struct ClientInfo {
    pub ip: Option<String>,
    pub user_agent: Option<String>,
}

/// A live session after `resolve`.
pub struct Resolved {
    pub key: SessionKey,
    pub record: SessionRecord,
    /// Present when the caller asked for it.
    pub access_token: Option<String>,
}

pub struct Exchange {
    store: Arc<dyn SessionStore>,
    oidc: Arc<OidcClient>,
    keyring: Arc<Keyring>,
    clock: Arc<dyn Clock>,
    settings: ExchangeSettings,
    metrics: Arc<Metrics>,
    /// One refresh per session at a time in this process; waiters re-read the record afterwards.
    refresh_locks: Mutex<HashMap<SessionKey, Weak<tokio::sync::Mutex<()>>>>,
}

const TOKENS_AAD: &[u8] = b"gatehouse-session-tokens-v1:";
/// Store mark kind for Keycloak sessions ended by back-channel logout.
const TOMBSTONE: &str = "sid-ended";

impl Exchange {
    pub fn new(
        store: Arc<dyn SessionStore>,
        oidc: Arc<OidcClient>,
        keyring: Arc<Keyring>,
        clock: Arc<dyn Clock>,
        settings: ExchangeSettings,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self { store, oidc, keyring, clock, settings, metrics, refresh_locks: Mutex::new(HashMap::new()) }
    }

    pub fn store(&self) -> &Arc<dyn SessionStore> {
        &self.store
    }

    pub fn oidc(&self) -> &Arc<OidcClient> {
        &self.oidc
    }

    pub fn now(&self) -> UnixTime {
        self.clock.now()
    }

    /// A new session with a fresh random id for a validated login (no fixation: ids are never reused).
    pub async fn start(
        &self,
        login: LoginResult,
        client: ClientInfo,
    ) -> Result<(SessionId, SessionRecord), ExchangeError> {
        let now = self.clock.now();
        let id = SessionId::generate().map_err(|_| ExchangeError::Internal)?;
        let key = id.key();
        let access_expires_at = self.oidc.access_expiry(&login.tokens);
        let refresh_expires_at = refresh_expiry(now, login.tokens.refresh_expires_in);
        let tokens = TokenSet {
            access_token: login.tokens.access_token.clone(),
            refresh_token: login.tokens.refresh_token.clone(),
            id_token: login.tokens.id_token.clone(),
        };
        let absolute_expires_at = now + self.settings.absolute_timeout;
        let record = SessionRecord {
            version: 1,
            claims: login.claims,
            provider_sid: login.provider_sid,
            created_at: now,
            last_seen: now,
            idle_expires_at: self.idle_expiry(now, absolute_expires_at, refresh_expires_at),
            absolute_expires_at,
            access_expires_at,
            refresh_expires_at,
            sealed_tokens: Vec::new(),
            client_ip: client.ip,
            user_agent: client.user_agent.map(|ua| ua.chars().take(256).collect()),
        };
        let mut record = record;
        record.sealed_tokens = self.seal(&key, &record, &tokens)?;
        self.store.insert(&key, &record).await?;
        self.metrics.sessions_created.inc();
        Ok((id, record))
    }

    /// Resolve a session id: the one path for every face. Refreshes the access token when it
    /// expires within the skew; `with_token` also decrypts and returns it.
    pub async fn resolve(&self, id: &SessionId, with_token: bool) -> Result<Resolved, ExchangeError> {
        let key = id.key();
        let now = self.clock.now();
        let mut record = self.live_record(&key, now).await?;
        if record.access_expires_at - self.settings.refresh_skew <= now {
            record = self.refresh(&key, now).await?;
        }
        let record = self.touch(&key, record, now).await;
        // Always check the envelope, even for /auth/me: its AAD authenticates the claims we answer
        // with. Parsing the token set is only paid for when the caller needs the token.
        let access_token = if with_token {
            Some(self.open(&key, &record)?.access_token.clone())
        } else {
            self.authenticate(&key, &record)?;
            None
        };
        Ok(Resolved { key, record, access_token })
    }

    /// End a session; returns its tokens so the caller can revoke them and build the logout URL.
    pub async fn end(&self, id: &SessionId) -> Result<Option<TokenSet>, ExchangeError> {
        let key = id.key();
        let Some(record) = self.store.delete(&key).await? else {
            return Ok(None);
        };
        Ok(self.open(&key, &record).ok())
    }

    /// End every session of a provider session (`sid`) or, failing that, of a user (`sub`): the
    /// back-channel logout path. A tombstone for the `sid` stops a login callback that races the
    /// logout from creating a new session for it afterwards.
    pub async fn end_provider_session(
        &self,
        sid: Option<&str>,
        sub: Option<&str>,
        tombstone_for: i64,
    ) -> Result<usize, ExchangeError> {
        let now = self.clock.now();
        let ended = match (sid, sub) {
            (Some(sid), _) => {
                self.store.mark(TOMBSTONE, sid, now + tombstone_for).await?;
                self.store.delete_by_provider_sid(sid).await?
            }
            (None, Some(sub)) => {
                let user = crate::oidc::UserClaims {
                    iss: self.oidc.issuer().to_string(),
                    sub: sub.to_string(),
                    ..Default::default()
                };
                self.store.delete_by_user(&user.user_key()).await?
            }
            (None, None) => Vec::new(),
        };
        Ok(ended.len())
    }

    /// Whether the provider already logged this Keycloak session out (back-channel).
    pub async fn provider_session_ended(&self, sid: &str) -> Result<bool, ExchangeError> {
        Ok(self.store.is_marked(TOMBSTONE, sid, self.clock.now()).await?)
    }

    /// Revoke the refresh tokens of removed records at the provider (admin revocation).
    pub async fn revoke_tokens(&self, removed: Vec<(SessionKey, SessionRecord)>) {
        for (key, record) in removed {
            if let Ok(tokens) = self.open(&key, &record)
                && let Some(rt) = tokens.refresh_token.as_deref()
                && let Err(e) = self.oidc.revoke(rt).await
            {
                tracing::warn!(session = %key, error = %e, "refresh token revocation failed");
            }
        }
    }

    /// The stored record if it exists and has not expired (expired ones are removed on sight).
    async fn live_record(&self, key: &SessionKey, now: UnixTime) -> Result<SessionRecord, ExchangeError> {
        let record = self.store.get(key).await?.ok_or(ExchangeError::InvalidSession)?;
        if record.is_expired(now) {
            // Best effort: the sweeper removes it otherwise. Either way the answer is the same.
            let _ = self.store.delete(key).await;
            return Err(ExchangeError::InvalidSession);
        }
        Ok(record)
    }

    /// Single-flight refresh: take the session's lock, re-read, and only then call the provider.
    async fn refresh(&self, key: &SessionKey, now: UnixTime) -> Result<SessionRecord, ExchangeError> {
        let lock = self.refresh_lock(key);
        let _guard = lock.lock().await;
        // Then across replicas (a no-op for the single-node embedded store). Re-read only after both.
        let _remote = self.store.lock_refresh(key).await?;
        let record = self.live_record(key, now).await?;
        if record.access_expires_at - self.settings.refresh_skew > now {
            return Ok(record); // another request refreshed while we waited
        }
        let tokens = self.open(key, &record)?;
        let still_valid = record.access_expires_at > now;
        let Some(refresh_token) = tokens.refresh_token.as_deref() else {
            return if still_valid { Ok(record) } else { self.kill(key, "no refresh token").await };
        };
        match self.oidc.refresh(refresh_token, &record.claims.sub).await {
            Ok(login) => {
                self.metrics.refreshes.get_or_create(&crate::metrics::Outcome::new("ok")).inc();
                self.persist_refresh(key, record, &tokens, login, now).await
            }
            Err(OidcError::InvalidGrant) => {
                self.metrics.refreshes.get_or_create(&crate::metrics::Outcome::new("invalid_grant")).inc();
                self.kill(key, "refresh token rejected (invalid_grant)").await
            }
            Err(e) => {
                self.metrics.refreshes.get_or_create(&crate::metrics::Outcome::new("unavailable")).inc();
                tracing::warn!(session = %key, error = %e, "token refresh failed; session kept");
                // Timeouts and 5xx never end a session; an access token that is still valid keeps serving.
                if still_valid { Ok(record) } else { Err(ExchangeError::ProviderUnavailable) }
            }
        }
    }

    async fn persist_refresh(
        &self,
        key: &SessionKey,
        record: SessionRecord,
        old: &TokenSet,
        login: LoginResult,
        now: UnixTime,
    ) -> Result<SessionRecord, ExchangeError> {
        let tokens = TokenSet {
            access_token: login.tokens.access_token.clone(),
            // Keycloak rotates refresh tokens; keep the old one only if no new one came.
            refresh_token: login.tokens.refresh_token.clone().or_else(|| old.refresh_token.clone()),
            id_token: login.tokens.id_token.clone().or_else(|| old.id_token.clone()),
        };
        let access_expires_at = self.oidc.access_expiry(&login.tokens);
        let refresh_expires_at = refresh_expiry(now, login.tokens.refresh_expires_in).or(record.refresh_expires_at);
        let mut current = record;
        // Compare-and-set; a concurrent touch may have bumped the version, so merge onto the latest.
        for _ in 0..5 {
            let mut next = current.clone();
            next.version += 1;
            next.claims = login.claims.clone();
            next.access_expires_at = access_expires_at;
            next.refresh_expires_at = refresh_expires_at;
            next.idle_expires_at = self.idle_expiry(next.last_seen, next.absolute_expires_at, refresh_expires_at);
            next.sealed_tokens = self.seal(key, &next, &tokens)?;
            if self.store.compare_and_swap(key, current.version, &next).await? {
                return Ok(next);
            }
            current = self.live_record(key, now).await?;
        }
        tracing::error!(session = %key, "could not persist refreshed tokens after retries");
        Err(ExchangeError::StoreUnavailable)
    }

    async fn kill(&self, key: &SessionKey, why: &str) -> Result<SessionRecord, ExchangeError> {
        tracing::info!(session = %key, reason = why, "session ended");
        self.store.delete(key).await?;
        Err(ExchangeError::InvalidSession)
    }

    /// Slide the idle expiry. Written at most once per touch interval, so the hot path stays read-only.
    async fn touch(&self, key: &SessionKey, record: SessionRecord, now: UnixTime) -> SessionRecord {
        let interval = (self.settings.idle_timeout / 10).clamp(1, 60);
        if now - record.last_seen < interval {
            return record;
        }
        let mut next = record.clone();
        next.version += 1;
        next.last_seen = now;
        next.idle_expires_at = self.idle_expiry(now, record.absolute_expires_at, record.refresh_expires_at);
        match self.store.compare_and_swap(key, record.version, &next).await {
            Ok(true) => next,
            // Someone else wrote first (a refresh or another touch); their write slid it too.
            _ => record,
        }
    }

    fn idle_expiry(&self, now: UnixTime, absolute: UnixTime, refresh_expires_at: Option<UnixTime>) -> UnixTime {
        let idle = (now + self.settings.idle_timeout).min(absolute);
        refresh_expires_at.map_or(idle, |r| idle.min(r))
    }

    fn refresh_lock(&self, key: &SessionKey) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = self.refresh_locks.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(lock) = map.get(key).and_then(Weak::upgrade) {
            return lock;
        }
        if map.len() > 1024 {
            map.retain(|_, w| w.strong_count() > 0);
        }
        let lock = Arc::new(tokio::sync::Mutex::new(()));
        map.insert(*key, Arc::downgrade(&lock));
        lock
    }

    /// The envelope's AAD binds it to its session key and to the record fields someone with write
    /// access to the store must not change unnoticed: the identity we hand out and the lifetimes
    /// that are fixed between refreshes. Fields a touch rewrites (last seen, idle expiry, version)
    /// are not bound; the idle expiry can never pass the bound absolute expiry anyway.
    fn aad(key: &SessionKey, record: &SessionRecord) -> Result<Vec<u8>, ExchangeError> {
        #[derive(serde::Serialize)]
        struct Bound<'a> {
            claims: &'a crate::oidc::UserClaims,
            provider_sid: &'a Option<String>,
            created_at: UnixTime,
            absolute_expires_at: UnixTime,
            access_expires_at: UnixTime,
            refresh_expires_at: Option<UnixTime>,
        }
        let bound = serde_json::to_vec(&Bound {
            claims: &record.claims,
            provider_sid: &record.provider_sid,
            created_at: record.created_at,
            absolute_expires_at: record.absolute_expires_at,
            access_expires_at: record.access_expires_at,
            refresh_expires_at: record.refresh_expires_at,
        })
        .map_err(|_| ExchangeError::Internal)?;
        Ok([TOKENS_AAD, &key.0, &crate::crypto::sha256(&bound)].concat())
    }

    fn seal(&self, key: &SessionKey, record: &SessionRecord, tokens: &TokenSet) -> Result<Vec<u8>, ExchangeError> {
        let plain = zeroize::Zeroizing::new(serde_json::to_vec(tokens).map_err(|_| ExchangeError::Internal)?);
        self.keyring.seal(&plain, &Self::aad(key, record)?).map_err(|_| ExchangeError::Internal)
    }

    /// Check the envelope (and so the bound record fields) without parsing the tokens.
    fn authenticate(&self, key: &SessionKey, record: &SessionRecord) -> Result<(), ExchangeError> {
        self.keyring.open(&record.sealed_tokens, &Self::aad(key, record)?).map(drop).map_err(|_| {
            tracing::error!(session = %key, "session record fails authentication (key rotated away or record tampered)");
            ExchangeError::InvalidSession
        })
    }

    /// Decrypt the token set. A record we cannot open (key removed, tampering) authenticates nobody.
    pub fn open(&self, key: &SessionKey, record: &SessionRecord) -> Result<TokenSet, ExchangeError> {
        let plain = self.keyring.open(&record.sealed_tokens, &Self::aad(key, record)?).map_err(|_| {
            tracing::error!(session = %key, "cannot decrypt session tokens (key rotated away or record tampered)");
            ExchangeError::InvalidSession
        })?;
        serde_json::from_slice(&plain).map_err(|_| ExchangeError::InvalidSession)
    }
}

fn refresh_expiry(now: UnixTime, refresh_expires_in: Option<i64>) -> Option<UnixTime> {
    // Keycloak sends 0 for offline tokens: no expiry of their own.
    refresh_expires_in.filter(|s| *s > 0).map(|s| now + s)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use secrecy::SecretString;

    use super::*;
    use crate::clock::SystemClock;
    use crate::oidc::{OidcSettings, TokenResponse, UserClaims};
    use crate::session::embedded::EmbeddedStore;

    struct Fixture {
        ex: Exchange,
        clock: Arc<SystemClock>,
        _dir: tempfile::TempDir,
    }

    /// An exchange whose provider is unreachable (port 9 on loopback): anything that would need
    /// Keycloak fails like an outage.
    fn fixture(idle: i64, absolute: i64) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(SystemClock::default());
        let oidc = OidcClient::new(
            OidcSettings {
                issuer: "http://127.0.0.1:9/realms/none".into(),
                client_id: "gatehouse".into(),
                client_secret: SecretString::from("x".to_string()),
                scopes: vec!["openid".into()],
                algorithms: vec![jsonwebtoken::Algorithm::RS256],
                trusted_audiences: vec![],
                redirect_uri: "http://localhost/auth/callback".into(),
                http_timeout: Duration::from_secs(1),
            },
            clock.clone(),
        )
        .unwrap();
        let key = SecretString::from("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".to_string());
        let ex = Exchange::new(
            Arc::new(EmbeddedStore::open(&dir.path().join("s.redb")).unwrap()),
            Arc::new(oidc),
            Arc::new(Keyring::new(&key, &[]).unwrap()),
            clock.clone(),
            ExchangeSettings { idle_timeout: idle, absolute_timeout: absolute, refresh_skew: 30 },
            Arc::new(Metrics::default()),
        );
        Fixture { ex, clock, _dir: dir }
    }

    fn login(access_lifetime: i64) -> LoginResult {
        LoginResult {
            tokens: TokenResponse {
                access_token: "access-1".into(),
                token_type: "Bearer".into(),
                expires_in: Some(access_lifetime),
                refresh_token: Some("refresh-1".into()),
                refresh_expires_in: Some(0),
                id_token: Some("id-1".into()),
            },
            claims: UserClaims { iss: "i".into(), sub: "alice".into(), ..Default::default() },
            provider_sid: Some("kc-sid".into()),
        }
    }

    #[tokio::test]
    async fn activity_slides_idle_expiry_but_never_the_absolute_lifetime() {
        let f = fixture(1800, 3600);
        let (id, rec) = f.ex.start(login(100_000), ClientInfo::default()).await.unwrap();
        for _ in 0..2 {
            f.clock.advance(25 * 60);
            let r = f.ex.resolve(&id, false).await.unwrap();
            assert!(r.record.idle_expires_at > rec.idle_expires_at, "touch slid the idle expiry");
            assert_eq!(r.record.absolute_expires_at, rec.absolute_expires_at);
        }
        f.clock.advance(15 * 60); // 65 minutes after login: past the 1 h absolute lifetime
        assert!(matches!(f.ex.resolve(&id, false).await, Err(ExchangeError::InvalidSession)));
        assert!(f.ex.store().get(&id.key()).await.unwrap().is_none(), "expired record removed");
    }

    #[tokio::test]
    async fn idle_timeout_ends_an_unused_session() {
        let f = fixture(1800, 43200);
        let (id, _) = f.ex.start(login(100_000), ClientInfo::default()).await.unwrap();
        f.clock.advance(1799);
        assert!(f.ex.resolve(&id, false).await.is_ok());
        f.clock.advance(1800);
        assert!(matches!(f.ex.resolve(&id, false).await, Err(ExchangeError::InvalidSession)));
    }

    #[tokio::test]
    async fn provider_outage_during_refresh_keeps_the_session() {
        let f = fixture(1800, 43200);
        // The access token is inside the refresh skew but still valid: served as is.
        let (id, _) = f.ex.start(login(20), ClientInfo::default()).await.unwrap();
        let r = f.ex.resolve(&id, true).await.unwrap();
        assert_eq!(r.access_token.as_deref(), Some("access-1"));
        // Expired and the provider is down: 503, and the session is still there for later.
        f.clock.advance(60);
        assert!(matches!(f.ex.resolve(&id, true).await, Err(ExchangeError::ProviderUnavailable)));
        assert!(f.ex.store().get(&id.key()).await.unwrap().is_some(), "a timeout or 5xx never ends a session");
    }

    #[tokio::test]
    async fn a_record_sealed_under_another_key_authenticates_nobody() {
        let f = fixture(1800, 43200);
        let (id, mut rec) = f.ex.start(login(100_000), ClientInfo::default()).await.unwrap();
        let other =
            Keyring::new(&SecretString::from("AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=".to_string()), &[]).unwrap();
        rec.sealed_tokens = other.seal(b"{}", b"x").unwrap();
        rec.version += 1;
        assert!(f.ex.store().compare_and_swap(&id.key(), 1, &rec).await.unwrap());
        assert!(matches!(f.ex.resolve(&id, true).await, Err(ExchangeError::InvalidSession)));
    }

    #[tokio::test]
    async fn claims_edited_in_the_store_are_detected() {
        let f = fixture(1800, 43200);
        let (id, rec) = f.ex.start(login(100_000), ClientInfo::default()).await.unwrap();
        assert!(f.ex.resolve(&id, false).await.is_ok());
        for tamper in [
            |r: &mut SessionRecord| r.claims.realm_roles.push("admin".into()),
            |r: &mut SessionRecord| r.claims.sub = "someone-else".into(),
            |r: &mut SessionRecord| r.absolute_expires_at += 86_400,
        ] {
            let mut forged = f.ex.store().get(&id.key()).await.unwrap().unwrap();
            let version = forged.version;
            tamper(&mut forged);
            forged.version += 1;
            assert!(f.ex.store().compare_and_swap(&id.key(), version, &forged).await.unwrap());
            assert!(matches!(f.ex.resolve(&id, false).await, Err(ExchangeError::InvalidSession)), "/auth/me path");
            assert!(matches!(f.ex.resolve(&id, true).await, Err(ExchangeError::InvalidSession)), "exchange path");
            let mut restored = rec.clone();
            restored.version = forged.version + 1;
            assert!(f.ex.store().compare_and_swap(&id.key(), forged.version, &restored).await.unwrap());
            assert!(f.ex.resolve(&id, false).await.is_ok(), "the genuine record still works");
        }
    }
}
