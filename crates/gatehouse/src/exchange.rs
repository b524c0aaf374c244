//! The one core every face uses: start a session from a login, resolve a session id into a live
//! session (look up, check expiry, slide the idle timeout, refresh the access token once), and
//! end it. `/auth/me`, the proxy, the internal exchange and Envoy's ext_authz are adapters over it.

mod pending_logouts;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::clock::{Clock, UnixTime};
use crate::crypto::Keyring;
use crate::metrics::{DeferredLogoutLabels, DeferredLogoutOutcome, Metrics, RefreshOutcome};
use crate::oidc::id_token::TokenKind;
use crate::oidc::jwks::KeySource;
use crate::oidc::{LoginResult, OidcClient, OidcError, TokenResponse, UserClaims};
use crate::session::{SessionId, SessionKey, SessionRecord, SessionStore, StoreError, TokenSet};
use pending_logouts::{EntryId, Mark, PendingLogout, PendingLogouts, Pushed};

#[derive(Debug, Clone, thiserror::Error)]
pub enum ExchangeError {
    /// Unknown, expired, revoked or ended: one answer for all (no oracle).
    #[error("invalid session")]
    InvalidSession,
    #[error("session store unavailable")]
    StoreUnavailable,
    #[error("identity provider unavailable")]
    ProviderUnavailable,
    /// A login for a provider session the provider has already logged out (back-channel).
    #[error("the identity provider already ended this login")]
    LoginEnded,
    #[error("internal error")]
    Internal,
}

/// Which sessions an operator revokes.
pub enum Selector<'a> {
    /// One session, by at least 8 hex characters of its hash.
    Prefix(&'a str),
    /// Every session of a user (`sub` at the pinned issuer).
    User(&'a str),
    All,
}

/// Why a revocation by prefix did not happen.
#[derive(Debug, thiserror::Error)]
pub enum RevokeError {
    #[error("no session matches")]
    NotFound,
    #[error("{0} sessions match; give more characters")]
    Ambiguous(usize),
    #[error(transparent)]
    Exchange(#[from] ExchangeError),
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

/// The core's dependencies as readiness sees them.
#[derive(Debug, Clone, Copy)]
pub struct Health {
    pub store: bool,
    pub identity_provider: bool,
    pub draining: bool,
}

pub struct ExchangeSettings {
    pub idle_timeout: i64,
    pub absolute_timeout: i64,
    pub refresh_skew: i64,
}

/// Why a back-channel logout token was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum LogoutTokenError {
    #[error("invalid logout token")]
    Invalid,
    #[error("logout token already used")]
    Replayed,
    #[error("session store or identity provider unavailable")]
    Unavailable,
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

impl Resolved {
    /// What an open stream's re-check needs to know about its session without the store.
    pub fn live_check(&self) -> LiveCheck {
        LiveCheck::of(&self.record)
    }
}

/// What `resolve` knew about a session, kept by an open stream or WebSocket tunnel: its re-check
/// (`Exchange::still_live`) matches it against pending back-channel logouts before reading the
/// store, so a logout deferred during a store outage closes the stream even while the store is
/// still down.
#[derive(Clone, Debug)]
pub struct LiveCheck {
    provider_sid: Option<String>,
    user_key: String,
    created_at: UnixTime,
}

impl LiveCheck {
    pub fn of(record: &SessionRecord) -> Self {
        Self {
            provider_sid: record.provider_sid.clone(),
            user_key: record.claims.user_key(),
            created_at: record.created_at,
        }
    }
}

pub struct Exchange {
    store: Arc<dyn SessionStore>,
    oidc: Arc<OidcClient>,
    keyring: Arc<Keyring>,
    clock: Arc<dyn Clock>,
    settings: ExchangeSettings,
    metrics: Arc<Metrics>,
    /// The refresh in flight per session in this process. Concurrent requests of that session
    /// wait on its channel and take its outcome the moment the refresher has stored it (no
    /// polling); only the refresher takes the store's cross-replica lock.
    refresh_flights: Mutex<HashMap<SessionKey, Flight>>,
    /// Sessions whose last refresh failed for want of the provider (5xx, timeout): until the
    /// backoff passes, their requests are answered without calling the provider again.
    refresh_backoff: Mutex<HashMap<SessionKey, Backoff>>,
    /// The skew-versus-lifetime warning is logged once per process.
    skew_warned: std::sync::atomic::AtomicBool,
    /// Work that outlives its request (revoking removed sessions' refresh tokens): flushed, or
    /// reported, on shutdown.
    background: tokio_util::task::TaskTracker,
    /// Set on SIGTERM: readiness answers false from then on.
    draining: std::sync::atomic::AtomicBool,
    /// Back-channel logouts validated while the store was unavailable: retried by
    /// `logout_retry_loop` until applied, and meanwhile every session they name is treated as
    /// ended on this replica.
    pending_logouts: PendingLogouts,
}

/// A refresh's outcome as its waiters see it: `None` until the refresher has one.
type Flight = tokio::sync::watch::Receiver<Option<Result<SessionRecord, ExchangeError>>>;

/// Per-session backoff after a provider failure: the first lasts `BACKOFF_FIRST`, each further
/// consecutive failure doubles it, up to `BACKOFF_MAX`.
#[derive(Clone, Copy)]
struct Backoff {
    until: tokio::time::Instant,
    failures: u32,
}
const BACKOFF_FIRST: std::time::Duration = std::time::Duration::from_secs(1);
const BACKOFF_MAX: std::time::Duration = std::time::Duration::from_secs(5);
/// A failure this long after the previous backoff ended starts the schedule again.
const BACKOFF_RESET: std::time::Duration = std::time::Duration::from_secs(30);
/// Retry schedule of deferred back-channel logouts: 1 s after the failure, doubling, at most 5 s.
const LOGOUT_RETRY_FIRST: std::time::Duration = std::time::Duration::from_secs(1);
const LOGOUT_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(5);
/// A deferred logout the store refuses with something other than "unavailable" (a damaged
/// record) is given up after this many attempts (about a minute at the retry schedule).
const LOGOUT_RETRY_ATTEMPTS: u32 = 12;
/// On shutdown, one last pass over the deferred logouts gets at most this long.
const LOGOUT_FINAL_PASS: std::time::Duration = std::time::Duration::from_secs(2);
/// How many `sub`s an ERROR about unapplied logouts names at most.
const LOGGED_SUBS: usize = 50;

/// Removes a refresh flight from the table when the refresher is done or was cancelled (its
/// request went away): waiters then see the outcome, or the closed channel and try again.
struct FlightGuard<'a> {
    flights: &'a Mutex<HashMap<SessionKey, Flight>>,
    key: SessionKey,
    tx: tokio::sync::watch::Sender<Option<Result<SessionRecord, ExchangeError>>>,
}

impl Drop for FlightGuard<'_> {
    fn drop(&mut self) {
        let mut map = self.flights.lock().unwrap_or_else(|p| p.into_inner());
        if map.get(&self.key).is_some_and(|rx| rx.same_channel(&self.tx.subscribe())) {
            map.remove(&self.key);
        }
    }
}

const TOKENS_AAD: &[u8] = b"gatehouse-session-tokens-v1:";
/// Domain of the metadata tag (`Exchange::meta_tag`).
const META_TAG: &[u8] = b"gatehouse-session-meta-v1:";
/// Store mark kind for Keycloak sessions ended by back-channel logout.
const TOMBSTONE: &str = "sid-ended";
/// Store mark kind for logout tokens already used (replay cache).
const LOGOUT_JTI: &str = "logout-jti";

impl Exchange {
    pub fn new(
        store: Arc<dyn SessionStore>,
        oidc: Arc<OidcClient>,
        keyring: Arc<Keyring>,
        clock: Arc<dyn Clock>,
        settings: ExchangeSettings,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            store,
            oidc,
            keyring,
            clock,
            settings,
            metrics,
            refresh_flights: Mutex::new(HashMap::new()),
            refresh_backoff: Mutex::new(HashMap::new()),
            skew_warned: Default::default(),
            background: tokio_util::task::TaskTracker::new(),
            draining: Default::default(),
            pending_logouts: PendingLogouts::new(pending_logouts::CAPACITY),
        }
    }

    /// The store itself, for tests that inspect records. Faces never call it: every session
    /// operation is a method here (`lib.rs` has a test that scans the faces for it).
    #[doc(hidden)]
    pub fn store(&self) -> &Arc<dyn SessionStore> {
        &self.store
    }

    /// The OIDC client itself, for tests. Faces use the login operations below.
    #[doc(hidden)]
    pub fn oidc(&self) -> &Arc<OidcClient> {
        &self.oidc
    }

    /// Where to send a browser to log in (authorization code + PKCE + nonce).
    pub async fn authorization_url(&self, state: &str, nonce: &str, verifier: &str) -> Result<String, OidcError> {
        self.oidc.authorization_url(state, nonce, verifier).await
    }

    /// Redeem a callback's code: the response's `iss` (RFC 9207) first, then the code grant with
    /// the login's verifier and nonce. The result still goes through [`Exchange::start`].
    pub async fn redeem_code(
        &self,
        response_issuer: Option<&str>,
        code: &str,
        verifier: &str,
        nonce: &str,
    ) -> Result<LoginResult, OidcError> {
        self.oidc.check_response_issuer(response_issuer).await?;
        self.oidc.redeem_code(code, verifier, nonce).await
    }

    /// The resource-owner password grant (only when `oidc.password_login` is on).
    pub async fn password_grant(&self, username: &str, password: &str) -> Result<LoginResult, OidcError> {
        self.oidc.password_grant(username, password).await
    }

    /// Load the provider's metadata (start-up retries this until it succeeds once).
    pub async fn discover(&self) -> Result<(), OidcError> {
        self.oidc.discover().await
    }

    /// What readiness needs: the store answers (within 2 s), provider metadata is loaded, and
    /// the process is not draining.
    pub async fn health(&self) -> Health {
        let store = tokio::time::timeout(std::time::Duration::from_secs(2), self.store.ping()).await;
        Health {
            store: matches!(store, Ok(Ok(()))),
            identity_provider: self.oidc.is_ready(),
            draining: self.is_draining(),
        }
    }

    /// Remove expired sessions (the sweeper).
    pub async fn sweep(&self) -> Result<usize, StoreError> {
        self.store.sweep(self.clock.now()).await
    }

    /// How many sessions the store holds, when it can tell cheaply.
    pub async fn count(&self) -> Result<Option<u64>, StoreError> {
        self.store.count().await
    }

    pub fn now(&self) -> UnixTime {
        self.clock.now()
    }

    /// A new session with a fresh random id for a validated login (no fixation: ids are never reused).
    ///
    /// Every login path comes here, so every one gets the back-channel race check: a login for a
    /// provider session already logged out is refused, before the insert and again after it (a
    /// logout that lands in between finds nothing to delete, so the second check removes it).
    pub async fn start(
        &self,
        login: LoginResult,
        client: ClientInfo,
    ) -> Result<(SessionId, SessionRecord), ExchangeError> {
        let provider_sid = login.provider_sid.clone();
        if let Some(sid) = &provider_sid
            && self.provider_session_ended(sid).await?
        {
            tracing::warn!("login for a provider session already logged out; refused");
            return Err(ExchangeError::LoginEnded);
        }
        let (id, record) = self.insert_new(login, client).await?;
        if let Some(sid) = &provider_sid
            && self.provider_session_ended(sid).await?
        {
            tracing::warn!(session = %id.key(), "provider logged this login out while it was stored; removed");
            let _ = self.store.delete(&id.key()).await;
            return Err(ExchangeError::LoginEnded);
        }
        Ok((id, record))
    }

    async fn insert_new(
        &self,
        login: LoginResult,
        client: ClientInfo,
    ) -> Result<(SessionId, SessionRecord), ExchangeError> {
        let now = self.clock.now();
        let id = SessionId::generate().map_err(|_| ExchangeError::Internal)?;
        let key = id.key();
        let access_expires_at = self.oidc.access_expiry(&login.tokens);
        self.warn_if_skew_exceeds_lifetime(access_expires_at - now);
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
            access_issued_at: Some(now),
            sealed_tokens: Vec::new(),
            client_ip: client.ip,
            user_agent: client.user_agent.map(|ua| ua.chars().take(256).collect()),
            meta_tag: None,
        };
        let mut record = record;
        self.seal(&key, &mut record, &tokens)?;
        self.store.insert(&key, &record).await?;
        self.metrics.sessions_created.inc();
        Ok((id, record))
    }

    /// Resolve a session id: the one path for every face. Refreshes the access token when it
    /// expires within the skew; `with_token` also decrypts and returns it.
    pub async fn resolve(&self, id: &SessionId, with_token: bool) -> Result<Resolved, ExchangeError> {
        let key = id.key();
        let now = self.clock.now();
        // The request's span names the session by its hash prefix, never its id.
        crate::telemetry::record_session(&key, "");
        let mut record = self.live_record(&key, now).await?;
        if self.refresh_due(&record) <= now {
            record = if self.backing_off(&key) {
                // The provider just failed this session's refresh: answer now, without calling
                // it again — with the still-valid token, or a 503 as the refresh itself would.
                self.metrics.refresh_backoffs.inc();
                if record.access_expires_at <= now {
                    return Err(ExchangeError::ProviderUnavailable);
                }
                record
            } else {
                // Boxed: the refresh (a provider call) is rare, and inline its future would make
                // every request's future several KiB larger to build and move.
                Box::pin(self.refresh(&key, now)).await?
            };
        }
        let record = self.touch(&key, record, now).await;
        // Always authenticate the record, even for /auth/me: the claims we answer with must be the
        // ones sealed with the tokens. Without a token to hand out, the small metadata tag does it
        // (no decryption, no cost growing with the tokens' size); the exchange opens the envelope,
        // whose AAD binds the same fields.
        let access_token = if with_token {
            Some(self.open_access_token(&key, &record)?)
        } else {
            self.authenticate(&key, &record)?;
            None
        };
        crate::telemetry::record_session(&key, &record.claims.sub);
        Ok(Resolved { key, record, access_token })
    }

    /// Whether a session still exists, unexpired and authentic — without sliding its idle
    /// timeout or refreshing it: an open stream's re-check must not keep an unattended session
    /// alive, only notice when it has ended. `known` is what `resolve` said about the session when
    /// the stream opened: a back-channel logout pending for it ends the stream before the store
    /// is asked, so even while the store is down (when the answer would only be "unavailable").
    pub async fn still_live(&self, id: &SessionId, known: &LiveCheck) -> Result<(), ExchangeError> {
        if self.pending_logouts.ends(known.provider_sid.as_deref(), &known.user_key, known.created_at) {
            return Err(ExchangeError::InvalidSession);
        }
        let key = id.key();
        let record = self.read_checked(&key).await?;
        if record.is_expired(self.clock.now()) {
            return Err(ExchangeError::InvalidSession);
        }
        self.authenticate(&key, &record)
    }

    /// Log out: delete the session, revoke its refresh token at the provider (a failed revocation
    /// is logged; the session is gone either way) and return the provider's end-session URL. No
    /// `id_token_hint`: it would put a JWT into a browser-visible URL (SECURITY 8).
    pub async fn logout(
        &self,
        id: Option<&SessionId>,
        post_logout_redirect_uri: &str,
    ) -> Result<Option<String>, ExchangeError> {
        if let Some(id) = id
            && let Some(tokens) = self.end(id).await?
        {
            tracing::info!(session = %id.key(), "logout: session deleted");
            if let Some(rt) = tokens.refresh_token.as_deref()
                && let Err(e) = self.oidc.revoke(rt).await
            {
                tracing::warn!(error = %e, "refresh token revocation failed");
            }
        }
        Ok(self.oidc.end_session_url(None, post_logout_redirect_uri).await.unwrap_or(None))
    }

    /// Live sessions of a user (admin listing).
    pub async fn sessions_of(&self, sub: &str) -> Result<Vec<(SessionKey, SessionRecord)>, ExchangeError> {
        let now = self.clock.now();
        let all = self.store.list_by_user(&self.user_key(sub)).await?;
        Ok(all.into_iter().filter(|(_, r)| !r.is_expired(now)).collect())
    }

    /// Every live session (admin listing and look-ups; reads the whole store).
    pub async fn all_sessions(&self) -> Result<Vec<(SessionKey, SessionRecord)>, ExchangeError> {
        let now = self.clock.now();
        let all = self.store.find_by_prefix("").await?;
        Ok(all.into_iter().filter(|(_, r)| !r.is_expired(now)).collect())
    }

    /// Revoke sessions (admin API and CLI): delete them, then revoke their refresh tokens at the
    /// provider in the background (the sessions are already gone). Returns the removed keys.
    pub async fn revoke(self: &Arc<Self>, which: Selector<'_>) -> Result<Vec<SessionKey>, RevokeError> {
        let removed = match which {
            Selector::Prefix(prefix) => {
                let found = self.store.find_by_prefix(prefix).await.map_err(ExchangeError::from)?;
                match found.as_slice() {
                    [] => return Err(RevokeError::NotFound),
                    [(key, _)] => {
                        let r = self.store.delete(key).await.map_err(ExchangeError::from)?;
                        r.into_iter().map(|r| (*key, r)).collect()
                    }
                    more => return Err(RevokeError::Ambiguous(more.len())),
                }
            }
            Selector::User(sub) => self.store.delete_by_user(&self.user_key(sub)).await.map_err(ExchangeError::from)?,
            Selector::All => self.store.delete_all().await.map_err(ExchangeError::from)?,
        };
        let keys = removed.iter().map(|(k, _)| *k).collect();
        let ex = self.clone();
        self.background.spawn(async move { ex.revoke_tokens(removed).await });
        Ok(keys)
    }

    /// Shutting down: readiness turns false.
    pub fn start_draining(&self) {
        self.draining.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Wait up to `deadline` for background work; say what did not finish.
    pub async fn flush_background(&self, deadline: std::time::Duration) {
        self.background.close();
        if tokio::time::timeout(deadline, self.background.wait()).await.is_err() {
            tracing::warn!(
                unfinished = self.background.len(),
                "background refresh-token revocations unfinished at shutdown (the sessions are already gone)"
            );
        }
    }

    fn user_key(&self, sub: &str) -> String {
        UserClaims { iss: self.oidc.issuer().to_string(), sub: sub.to_string(), ..Default::default() }.user_key()
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

    /// Accept a back-channel logout token (SECURITY 17): validate it, mark its `jti` used — one
    /// atomic set-if-absent shared by every replica, so two deliveries cannot both pass — then end
    /// the sessions. If the store is unavailable the mark is taken back, so a provider that
    /// delivers again may, and the logout is deferred: kept in this replica's memory, applied by
    /// `logout_retry_loop` once the store is back, and its sessions treated as ended meanwhile.
    /// The answer is still `Unavailable` (503): it has not been applied yet.
    pub async fn accept_logout_token(&self, token: &str, tombstone_for: i64) -> Result<usize, LogoutTokenError> {
        let claims =
            match self.oidc.validate_jwt(token, TokenKind::Logout, None, None, KeySource::Unauthenticated).await {
                Ok(c) => c,
                Err(e) if matches!(e, OidcError::Unavailable(_) | OidcError::NotReady) => {
                    tracing::warn!(error = %e, "back-channel logout token not checked: provider keys unavailable");
                    return Err(LogoutTokenError::Unavailable);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "back-channel logout token rejected");
                    return Err(LogoutTokenError::Invalid);
                }
            };
        let s = |k: &str| claims.get(k).and_then(serde_json::Value::as_str).filter(|v| !v.is_empty());
        let (Some(jti), Some(exp)) = (s("jti"), claims.get("exp").and_then(serde_json::Value::as_i64)) else {
            return Err(LogoutTokenError::Invalid);
        };
        // Kept well past the last moment the token still validates (exp + leeway), so clock
        // differences between replicas and Redis leave no window for a replay.
        let until = exp + crate::oidc::id_token::LEEWAY + 300;
        let now = self.clock.now();
        let deferred = |mark_may_be_ours: bool| {
            let (sid, sub) = (s("sid"), s("sub"));
            PendingLogout {
                sid: sid.map(str::to_owned),
                sub: sub.map(str::to_owned),
                user_key: sub.map(|sub| self.user_key(sub)),
                // A `sub`-only logout ends the sessions the user had when it was issued — never
                // one created afterwards, so even a replay of an old token applied by the retry
                // cannot end newer sessions (`iat` plus the allowed clock skew).
                user_cutoff: sid.is_none().then(|| {
                    let iat = claims.get("iat").and_then(serde_json::Value::as_i64).unwrap_or(now);
                    (iat + crate::oidc::id_token::LEEWAY).min(now)
                }),
                tombstone_for,
                mark: Some(Mark { jti: jti.to_owned(), until, may_be_ours: mark_may_be_ours }),
                deferred_at: now,
                // Every session it could end has reached its absolute lifetime by then, and the
                // token no longer validates (its `jti` needs no mark).
                expires_at: (now + self.settings.absolute_timeout).max(until),
                failures: 0,
            }
        };
        match self.store.mark(LOGOUT_JTI, jti, until).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!("back-channel logout token replayed");
                return Err(LogoutTokenError::Replayed);
            }
            Err(e) => {
                // The `SET NX` may have landed even though its answer did not (a timeout): take the
                // mark back, or the provider's retry of this very token would be refused as a
                // replay and its sessions would live on. On the same connection the delete runs
                // after the set, so it undoes it even when both time out on our side.
                tracing::error!(error = %e, "session store unavailable for back-channel logout; its jti is released for a retry");
                let released = self.store.unmark(LOGOUT_JTI, jti).await;
                if let Err(e) = &released {
                    tracing::warn!(error = %e, "could not release the logout token's jti");
                }
                if matches!(e, StoreError::Unavailable(_)) {
                    // Not released: our `SET NX` may be in the store — the retry cannot tell it
                    // from an earlier delivery's mark.
                    self.defer_logout(deferred(released.is_err()));
                }
                return Err(LogoutTokenError::Unavailable);
            }
        }
        match self.end_provider_session(s("sid"), s("sub"), tombstone_for).await {
            Ok(n) => {
                tracing::info!(sub = s("sub").unwrap_or("-"), sessions = n, "back-channel logout: sessions ended");
                // A redelivery applied it: nothing left for the retry to do.
                if self.pending_logouts.remove_token(jti) {
                    self.metrics.backchannel_logout_pending.set(gauge_value(self.pending_logouts.len()));
                }
                Ok(n)
            }
            Err(e) => {
                tracing::error!(error = %e, "back-channel logout failed; its jti is released for a retry");
                let released = self.store.unmark(LOGOUT_JTI, jti).await;
                if let Err(e) = &released {
                    tracing::warn!(error = %e, "could not release the logout token's jti");
                }
                if matches!(e, ExchangeError::StoreUnavailable) {
                    self.defer_logout(deferred(released.is_err()));
                }
                Err(LogoutTokenError::Unavailable)
            }
        }
    }

    /// Whether the provider already logged this Keycloak session out (back-channel).
    pub async fn provider_session_ended(&self, sid: &str) -> Result<bool, ExchangeError> {
        if self.pending_logouts.ends_provider_session(sid) {
            return Ok(true);
        }
        Ok(self.store.is_marked(TOMBSTONE, sid, self.clock.now()).await?)
    }

    /// Whether a back-channel logout still pending on this replica ends this session: fail closed
    /// until the retry has removed it from the store. One atomic load when none is pending.
    fn ended_by_pending_logout(&self, record: &SessionRecord) -> bool {
        !self.pending_logouts.is_empty()
            && self.pending_logouts.ends(record.provider_sid.as_deref(), &record.claims.user_key(), record.created_at)
    }

    fn count_deferred(&self, outcome: DeferredLogoutOutcome) {
        self.metrics.backchannel_logouts_deferred.get_or_create(&DeferredLogoutLabels { outcome }).inc();
    }

    /// Keep a validated logout the store could not take, for `logout_retry_loop`. The logs name
    /// the `sub`: what an operator revokes by (`gatehouse sessions revoke --user SUB`) should the
    /// logout never be applied.
    fn defer_logout(&self, entry: PendingLogout) {
        let sub = entry.sub.clone();
        let sub = sub.as_deref().unwrap_or("-");
        match self.pending_logouts.push(entry) {
            Pushed::Added => tracing::warn!(
                sub,
                pending = self.pending_logouts.len(),
                "back-channel logout deferred: it is applied when the session store is back"
            ),
            Pushed::AlreadyPending => {}
            Pushed::Collapsed { sub: collapsed, merged } => {
                self.count_deferred(DeferredLogoutOutcome::Collapsed);
                tracing::warn!(
                    sub,
                    collapsed_sub = collapsed.as_deref().unwrap_or("-"),
                    merged,
                    capacity = pending_logouts::CAPACITY,
                    "deferred back-channel logouts queue full: one user's entries became one logout of all that user's sessions"
                );
            }
            Pushed::Refused => {
                self.count_deferred(DeferredLogoutOutcome::Dropped);
                tracing::error!(
                    sub,
                    capacity = pending_logouts::CAPACITY,
                    "deferred back-channel logouts queue full: this logout was not kept; its sessions live until they expire or their refresh fails (revoke them: gatehouse sessions revoke --user SUB)"
                );
            }
        }
        self.metrics.backchannel_logout_pending.set(gauge_value(self.pending_logouts.len()));
    }

    /// How many validated back-channel logouts this replica has not applied yet.
    pub fn pending_logouts(&self) -> usize {
        self.pending_logouts.len()
    }

    /// Apply the deferred back-channel logouts, oldest first. Stops at the first "store
    /// unavailable"; returns whether none is left to retry. An expired entry is dropped (nothing
    /// it could end is alive any more); one the store refuses otherwise is retried at most
    /// `LOGOUT_RETRY_ATTEMPTS` times.
    pub async fn retry_pending_logouts(&self) -> bool {
        let mut all = true;
        for (id, p) in self.pending_logouts.snapshot() {
            let sub = p.sub.as_deref().unwrap_or("-");
            if p.expires_at <= self.clock.now() {
                if self.pending_logouts.remove(id).is_some() {
                    self.count_deferred(DeferredLogoutOutcome::Expired);
                    tracing::warn!(
                        sub,
                        "deferred back-channel logout dropped unapplied: every session it could end has reached its absolute lifetime"
                    );
                }
                continue;
            }
            match self.apply_deferred(id, &p).await {
                Ok(Some(n)) => {
                    if self.pending_logouts.remove(id).is_some() {
                        self.count_deferred(DeferredLogoutOutcome::Applied);
                    }
                    tracing::info!(sub, sessions = n, "deferred back-channel logout applied: sessions ended");
                }
                Ok(None) => {
                    if self.pending_logouts.remove(id).is_some() {
                        self.count_deferred(DeferredLogoutOutcome::AlreadyApplied);
                    }
                    tracing::warn!(
                        sub,
                        "deferred back-channel logout dropped: its token was already used (applied elsewhere, or this was a replay)"
                    );
                }
                Err(ExchangeError::StoreUnavailable) => {
                    // Still down: the rest would fail the same way.
                    all = false;
                    break;
                }
                Err(e) => {
                    // One entry the store refuses (a damaged record) must not hold up the others,
                    // nor be retried forever.
                    let failures = self.pending_logouts.failed(id);
                    if failures >= LOGOUT_RETRY_ATTEMPTS {
                        if self.pending_logouts.remove(id).is_some() {
                            self.count_deferred(DeferredLogoutOutcome::Failed);
                        }
                        tracing::error!(
                            error = %e,
                            sub,
                            failures,
                            "deferred back-channel logout given up: its sessions live until they expire or their refresh fails (revoke them: gatehouse sessions revoke --user SUB)"
                        );
                    } else {
                        tracing::warn!(error = %e, sub, failures, "deferred back-channel logout not applied; retrying");
                        all = false;
                    }
                }
            }
        }
        self.metrics.backchannel_logout_pending.set(gauge_value(self.pending_logouts.len()));
        all
    }

    /// Apply one deferred logout. The token's `jti` is marked first: a mark already there that
    /// cannot be this replica's own means the token was used before — applied by another replica's
    /// delivery, or this is a replay of a captured token — and `None` says the entry is dropped
    /// unapplied. Then the `sid` is tombstoned and its sessions deleted, or for a user-wide entry
    /// the user's sessions created at or before its cutoff.
    async fn apply_deferred(&self, id: EntryId, p: &PendingLogout) -> Result<Option<usize>, ExchangeError> {
        if let Some(m) = &p.mark {
            match self.store.mark(LOGOUT_JTI, &m.jti, m.until).await {
                // Ours now: should a later step fail, the next attempt must not mistake it.
                Ok(true) => self.pending_logouts.mark_may_be_ours(id),
                Ok(false) if !m.may_be_ours => return Ok(None),
                Ok(false) => {}
                Err(e) => {
                    self.pending_logouts.mark_may_be_ours(id);
                    return Err(e.into());
                }
            }
        }
        let n = match (&p.sid, &p.user_key, p.user_cutoff) {
            (Some(sid), _, _) => self.end_provider_session(Some(sid), None, p.tombstone_for).await?,
            (None, Some(user), Some(cutoff)) => {
                let mut n = 0;
                for (key, record) in self.store.list_by_user(user).await? {
                    if record.created_at <= cutoff && self.store.delete(&key).await?.is_some() {
                        n += 1;
                    }
                }
                n
            }
            _ => 0,
        };
        Ok(Some(n))
    }

    /// The background task that applies deferred back-channel logouts: idle until one is
    /// deferred, then retried 1 s after the failure, doubling to 5 s, until the store takes them.
    /// Started with the other background loops; when `stop` turns true it makes one last pass
    /// (at most `LOGOUT_FINAL_PASS`, and never longer than `drain`) and names the `sub`s of what
    /// is left.
    pub async fn logout_retry_loop(&self, mut stop: tokio::sync::watch::Receiver<bool>, drain: std::time::Duration) {
        let mut delay = LOGOUT_RETRY_FIRST;
        loop {
            if self.pending_logouts.is_empty() {
                delay = LOGOUT_RETRY_FIRST;
                tokio::select! {
                    _ = self.pending_logouts.added() => {}
                    _ = stop.wait_for(|s| *s) => break,
                }
                continue;
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.wait_for(|s| *s) => break,
            }
            delay =
                if self.retry_pending_logouts().await { LOGOUT_RETRY_FIRST } else { (delay * 2).min(LOGOUT_RETRY_MAX) };
        }
        if !self.pending_logouts.is_empty() {
            let _ = tokio::time::timeout(LOGOUT_FINAL_PASS.min(drain), self.retry_pending_logouts()).await;
        }
        let left = self.pending_logouts.snapshot();
        if !left.is_empty() {
            let mut subs: Vec<&str> = left.iter().filter_map(|(_, p)| p.sub.as_deref()).collect();
            subs.sort_unstable();
            subs.dedup();
            let users = subs.len();
            subs.truncate(LOGGED_SUBS);
            tracing::error!(
                pending = left.len(),
                users,
                subs = %subs.join(","),
                "shutting down with deferred back-channel logouts not applied: their sessions live until they expire or their refresh fails (revoke them: gatehouse sessions revoke --user SUB, for each sub listed)"
            );
        }
    }

    /// Revoke the refresh tokens of removed records at the provider (admin revocation).
    async fn revoke_tokens(&self, removed: Vec<(SessionKey, SessionRecord)>) {
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
        let record = self.read_checked(key).await?;
        if record.is_expired(now) {
            // Best effort: the sweeper removes it otherwise. Either way the answer is the same.
            let _ = self.store.delete(key).await;
            return Err(ExchangeError::InvalidSession);
        }
        Ok(record)
    }

    /// The stored record, unless a back-channel logout pending on this replica ends it (the
    /// provider logged it out while the store was down; the retry deletes it). The retry deletes
    /// the record and then removes the entry: had it done both between our read and our check,
    /// the check would find no entry for a record already gone — so when an entry matching this
    /// session was removed meanwhile (one atomic load each when none was), the record is read
    /// again.
    async fn read_checked(&self, key: &SessionKey) -> Result<SessionRecord, ExchangeError> {
        for _ in 0..3 {
            let removals = self.pending_logouts.removals();
            let record = self.store.get(key).await?.ok_or(ExchangeError::InvalidSession)?;
            if self.ended_by_pending_logout(&record) {
                return Err(ExchangeError::InvalidSession);
            }
            if self.pending_logouts.removals() == removals {
                return Ok(record);
            }
            let (sid, user) = (record.provider_sid.as_deref(), record.claims.user_key());
            if self.pending_logouts.removed_since(removals, sid, &user, record.created_at) == Some(false) {
                return Ok(record);
            }
        }
        // The queue is draining fast; answer as for a store that is not settled yet.
        Err(ExchangeError::StoreUnavailable)
    }

    /// When the access token should be refreshed: `refresh_skew` before it expires, but never
    /// earlier than half its lifetime. A provider issuing 15 s tokens with a 30 s skew would
    /// otherwise make every fresh token look expired and every request a provider round trip.
    fn refresh_due(&self, record: &SessionRecord) -> UnixTime {
        let lifetime = record.access_issued_at.map(|issued| record.access_expires_at - issued);
        record.access_expires_at - effective_skew(self.settings.refresh_skew, lifetime)
    }

    fn warn_if_skew_exceeds_lifetime(&self, lifetime: i64) {
        use std::sync::atomic::Ordering;
        if lifetime > 0 && self.settings.refresh_skew * 2 > lifetime && !self.skew_warned.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(
                refresh_skew = self.settings.refresh_skew,
                access_token_lifetime = lifetime,
                effective_skew = effective_skew(self.settings.refresh_skew, Some(lifetime)),
                "oidc.refresh_skew is more than half the provider's access-token lifetime; \
                 tokens are refreshed at half-life instead (lower refresh_skew to silence this)"
            );
        }
    }

    /// Single-flight refresh in this process: the first request of a session becomes its
    /// refresher; the others wait on its channel and are released with its outcome the moment it
    /// is stored. If the refresher's request goes away mid-way, a waiter takes over.
    async fn refresh(&self, key: &SessionKey, now: UnixTime) -> Result<SessionRecord, ExchangeError> {
        loop {
            let joined = {
                let mut map = self.refresh_flights.lock().unwrap_or_else(|p| p.into_inner());
                match map.get(key) {
                    Some(rx) => Err(rx.clone()),
                    None => {
                        let (tx, rx) = tokio::sync::watch::channel(None);
                        map.insert(*key, rx);
                        Ok(FlightGuard { flights: &self.refresh_flights, key: *key, tx })
                    }
                }
            };
            match joined {
                Ok(flight) => {
                    let outcome = self.refresh_single(key, now).await;
                    flight.tx.send_replace(Some(outcome.clone()));
                    return outcome;
                }
                Err(mut rx) => {
                    self.metrics.refresh_lock_waits.inc();
                    if let Ok(done) = rx.wait_for(Option::is_some).await
                        && let Some(outcome) = done.as_ref()
                    {
                        return outcome.clone();
                    }
                    // The refresher was cancelled before it had an outcome: try again.
                }
            }
        }
    }

    /// Whether the session's refresh is backing off after a provider failure.
    fn backing_off(&self, key: &SessionKey) -> bool {
        let map = self.refresh_backoff.lock().unwrap_or_else(|p| p.into_inner());
        map.get(key).is_some_and(|b| tokio::time::Instant::now() < b.until)
    }

    /// Remember a provider failure for the session: its requests back off, growing per failure.
    fn back_off(&self, key: &SessionKey) {
        let now = tokio::time::Instant::now();
        let mut map = self.refresh_backoff.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() > 4096 {
            map.retain(|_, b| b.until + BACKOFF_RESET > now);
        }
        let failures = match map.get(key) {
            Some(b) if b.until + BACKOFF_RESET > now => b.failures.saturating_add(1),
            _ => 1,
        };
        let wait = BACKOFF_FIRST.saturating_mul(1 << failures.saturating_sub(1).min(8)).min(BACKOFF_MAX);
        map.insert(*key, Backoff { until: now + wait, failures });
    }

    /// The refresh proper, run by one request per session and process: take the cross-replica
    /// lock, re-read, and only then call the provider.
    async fn refresh_single(&self, key: &SessionKey, now: UnixTime) -> Result<SessionRecord, ExchangeError> {
        // A request that read the record just before the previous refresher stored its own finds
        // the new tokens here, without a lock round (two Redis commands and a renewer) for nothing.
        let record = self.live_record(key, now).await?;
        if self.refresh_due(&record) > now {
            return Ok(record);
        }
        // Across replicas (a no-op for the single-node embedded store). Re-read only after it.
        let _remote = self.store.lock_refresh(key).await?;
        let record = self.live_record(key, now).await?;
        if self.refresh_due(&record) > now {
            return Ok(record); // another request refreshed while we waited
        }
        let old = self.open(key, &record)?;
        let still_valid = record.access_expires_at > now;
        let Some(refresh_token) = old.refresh_token.as_deref() else {
            return if still_valid { Ok(record) } else { self.kill(key, "no refresh token").await };
        };
        let tokens = match self.oidc.refresh_grant(refresh_token).await {
            Ok(tokens) => tokens,
            Err(OidcError::InvalidGrant) => {
                self.count_refresh(RefreshOutcome::InvalidGrant);
                return self.kill(key, "refresh token rejected (invalid_grant)").await;
            }
            Err(e) => {
                // Nothing was issued, so the stored refresh token is still good: a timeout or 5xx
                // never ends a session, and a still-valid access token keeps serving.
                self.count_refresh(RefreshOutcome::Unavailable);
                self.back_off(key);
                return if still_valid {
                    tracing::warn!(session = %key, error = %e, "token refresh failed; session kept, access token still valid");
                    Ok(record)
                } else {
                    tracing::warn!(session = %key, error = %e, "token refresh failed; session kept, answering 503 until the provider is back");
                    Err(ExchangeError::ProviderUnavailable)
                };
            }
        };
        // From here the provider has issued new tokens and may have spent the old refresh token
        // (rotation). The outcome is decided explicitly: store them, or end the session.
        match self.validate_refreshed(&tokens, &record.claims).await {
            Ok(claims) => {
                self.count_refresh(RefreshOutcome::Ok);
                self.refresh_backoff.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
                let access_expires_at = self.oidc.access_expiry(&tokens);
                self.warn_if_skew_exceeds_lifetime(access_expires_at - now);
                let next = TokenSet {
                    access_token: tokens.access_token.clone(),
                    // Keycloak rotates refresh tokens; keep the old one only if no new one came.
                    refresh_token: tokens.refresh_token.clone().or_else(|| old.refresh_token.clone()),
                    id_token: tokens.id_token.clone().or_else(|| old.id_token.clone()),
                };
                let refresh_expires_at = refresh_expiry(now, tokens.refresh_expires_in).or(record.refresh_expires_at);
                self.persist(key, record, &next, now, |r| {
                    r.claims = claims.clone();
                    r.access_expires_at = access_expires_at;
                    r.access_issued_at = Some(now);
                    r.refresh_expires_at = refresh_expires_at;
                })
                .await
            }
            Err(e) if e.is_transient() => {
                // We cannot vouch for the new tokens yet, but the new refresh token is what the
                // provider will accept next: keep it (and the old, validated access token and
                // identity), so the next request refreshes again instead of replaying a spent token.
                self.count_refresh(RefreshOutcome::Unvalidated);
                tracing::warn!(session = %key, error = %e, "refreshed tokens could not be validated yet; rotated refresh token stored, old access token kept");
                let Some(rotated) = tokens.refresh_token.clone() else {
                    return if still_valid { Ok(record) } else { Err(ExchangeError::ProviderUnavailable) };
                };
                let next = TokenSet {
                    access_token: old.access_token.clone(),
                    refresh_token: Some(rotated),
                    id_token: old.id_token.clone(),
                };
                let refresh_expires_at = refresh_expiry(now, tokens.refresh_expires_in).or(record.refresh_expires_at);
                let kept = self.persist(key, record, &next, now, |r| r.refresh_expires_at = refresh_expires_at).await?;
                if still_valid { Ok(kept) } else { Err(ExchangeError::ProviderUnavailable) }
            }
            Err(e) => {
                // A verdict, not an outage: the provider answered with tokens that fail validation
                // (another subject, a bad signature). Nothing from them is trusted; end the
                // session and give the new refresh token back.
                self.count_refresh(RefreshOutcome::Rejected);
                tracing::error!(session = %key, error = %e, "refreshed tokens failed validation; session ended");
                if let Some(rt) = tokens.refresh_token.as_deref()
                    && let Err(e) = self.oidc.revoke(rt).await
                {
                    tracing::warn!(session = %key, error = %e, "could not revoke the rejected refresh token");
                }
                self.kill(key, "refreshed tokens failed validation").await
            }
        }
    }

    /// Validate a refresh response; a transient failure (keys unreachable mid-rotation) is tried
    /// once more after a short pause before the caller falls back.
    async fn validate_refreshed(&self, tokens: &TokenResponse, current: &UserClaims) -> Result<UserClaims, OidcError> {
        match self.oidc.validate_refreshed(tokens, current).await {
            Err(e) if e.is_transient() => {
                tracing::info!(error = %e, "validating refreshed tokens failed; trying once more");
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
                self.oidc.validate_refreshed(tokens, current).await
            }
            other => other,
        }
    }

    fn count_refresh(&self, outcome: RefreshOutcome) {
        self.metrics.refreshes.get_or_create(&crate::metrics::RefreshLabels { outcome }).inc();
    }

    /// Write new tokens with compare-and-set; a concurrent touch may have bumped the version, so
    /// `update` is applied onto the latest record.
    async fn persist(
        &self,
        key: &SessionKey,
        record: SessionRecord,
        tokens: &TokenSet,
        now: UnixTime,
        update: impl Fn(&mut SessionRecord),
    ) -> Result<SessionRecord, ExchangeError> {
        let mut current = record;
        for _ in 0..5 {
            let mut next = current.clone();
            next.version += 1;
            update(&mut next);
            next.idle_expires_at = self.idle_expiry(next.last_seen, next.absolute_expires_at, next.refresh_expires_at);
            self.seal(key, &mut next, tokens)?;
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
        // Boxed for the same reason as the refresh: most requests do not write.
        Box::pin(self.slide(key, record, now)).await
    }

    async fn slide(&self, key: &SessionKey, record: SessionRecord, now: UnixTime) -> SessionRecord {
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

    /// The record fields someone with write access to the store must not change unnoticed: the
    /// identity we hand out and the lifetimes that are fixed between refreshes. Fields a touch
    /// rewrites (last seen, idle expiry, version) are not bound; the idle expiry can never pass the
    /// bound absolute expiry anyway. Both the envelope's AAD and the metadata tag cover them.
    fn bound(record: &SessionRecord) -> Result<Vec<u8>, ExchangeError> {
        #[derive(serde::Serialize)]
        struct Bound<'a> {
            claims: &'a crate::oidc::UserClaims,
            provider_sid: &'a Option<String>,
            created_at: UnixTime,
            absolute_expires_at: UnixTime,
            access_expires_at: UnixTime,
            refresh_expires_at: Option<UnixTime>,
        }
        serde_json::to_vec(&Bound {
            claims: &record.claims,
            provider_sid: &record.provider_sid,
            created_at: record.created_at,
            absolute_expires_at: record.absolute_expires_at,
            access_expires_at: record.access_expires_at,
            refresh_expires_at: record.refresh_expires_at,
        })
        .map_err(|_| ExchangeError::Internal)
    }

    /// The envelope's AAD binds it to its session key and to the bound record fields.
    fn aad(key: &SessionKey, bound: &[u8]) -> Vec<u8> {
        [TOKENS_AAD, &key.0, &crate::crypto::sha256(bound)].concat()
    }

    /// What the metadata tag covers besides the bound fields: the envelope's header (version, key
    /// id, random nonce) and its GCM tag, which identify this one envelope in constant size —
    /// another record's envelope put in its place fails the tag without being decrypted. `None`
    /// for an envelope too short to be one.
    fn envelope_id(sealed: &[u8]) -> Option<(&[u8], &[u8])> {
        const HEADER: usize = 1 + 8 + 12;
        (sealed.len() >= HEADER + 16).then(|| (&sealed[..HEADER], &sealed[sealed.len() - 16..]))
    }

    fn meta_tag(
        &self,
        key: &SessionKey,
        bound: &[u8],
        sealed: &[u8],
    ) -> Result<[u8; crate::crypto::TAG_LEN], ExchangeError> {
        let (header, gcm_tag) = Self::envelope_id(sealed).ok_or(ExchangeError::Internal)?;
        self.keyring.tag(&[META_TAG, &key.0, header, gcm_tag, bound]).map_err(|_| ExchangeError::Internal)
    }

    /// Seal the token set into the record, and tag its metadata.
    fn seal(&self, key: &SessionKey, record: &mut SessionRecord, tokens: &TokenSet) -> Result<(), ExchangeError> {
        use base64::Engine;
        let plain = zeroize::Zeroizing::new(serde_json::to_vec(tokens).map_err(|_| ExchangeError::Internal)?);
        let bound = Self::bound(record)?;
        let sealed = self.keyring.seal(&plain, &Self::aad(key, &bound)).map_err(|_| ExchangeError::Internal)?;
        let tag = self.meta_tag(key, &bound, &sealed)?;
        record.sealed_tokens = sealed;
        record.meta_tag = Some(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(tag));
        Ok(())
    }

    /// Authenticate the record without parsing the tokens: by its metadata tag (no decryption),
    /// or, for a record written before tags existed, by opening the envelope. A record whose tag
    /// is missing goes the slow way, never a weaker one.
    fn authenticate(&self, key: &SessionKey, record: &SessionRecord) -> Result<(), ExchangeError> {
        let fail = || {
            tracing::error!(session = %key, "session record fails authentication (key rotated away or record tampered)");
            ExchangeError::InvalidSession
        };
        let bound = Self::bound(record)?;
        match &record.meta_tag {
            Some(tag) => {
                use base64::Engine;
                let mut raw = [0u8; crate::crypto::TAG_LEN];
                let n = base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode_slice(tag.as_bytes(), &mut raw)
                    .map_err(|_| fail())?;
                let (header, gcm_tag) = Self::envelope_id(&record.sealed_tokens).ok_or_else(fail)?;
                self.keyring.verify_tag(&raw[..n], &[META_TAG, &key.0, header, gcm_tag, &bound]).map_err(|_| fail())
            }
            None => self.keyring.open(&record.sealed_tokens, &Self::aad(key, &bound)).map(drop).map_err(|_| fail()),
        }
    }

    /// Decrypt the token set. A record we cannot open (key removed, tampering) authenticates nobody.
    pub fn open(&self, key: &SessionKey, record: &SessionRecord) -> Result<TokenSet, ExchangeError> {
        serde_json::from_slice(&self.decrypt(key, record)?).map_err(|_| ExchangeError::InvalidSession)
    }

    /// Decrypt the token set and keep only the access token: what the exchange and the proxy's
    /// bearer relay hand on (the refresh and ID tokens are skipped, never copied out).
    fn open_access_token(&self, key: &SessionKey, record: &SessionRecord) -> Result<String, ExchangeError> {
        #[derive(serde::Deserialize)]
        struct AccessToken {
            access_token: String,
        }
        let plain = self.decrypt(key, record)?;
        let t: AccessToken = serde_json::from_slice(&plain).map_err(|_| ExchangeError::InvalidSession)?;
        Ok(t.access_token)
    }

    fn decrypt(&self, key: &SessionKey, record: &SessionRecord) -> Result<zeroize::Zeroizing<Vec<u8>>, ExchangeError> {
        self.keyring.open(&record.sealed_tokens, &Self::aad(key, &Self::bound(record)?)).map_err(|_| {
            tracing::error!(session = %key, "cannot decrypt session tokens (key rotated away or record tampered)");
            ExchangeError::InvalidSession
        })
    }
}

fn gauge_value(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The skew actually applied: the configured one, but at most half the token's lifetime.
fn effective_skew(configured: i64, lifetime: Option<i64>) -> i64 {
    match lifetime {
        Some(l) if l > 0 => configured.min(l / 2),
        _ => configured,
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

    /// Every request builds `resolve`'s future and moves it (into the handler's box, with the
    /// handler's): the rare steps (refresh, the idle-expiry write) are boxed so it stays small.
    /// Inline, the refresh alone made it 4.6 KiB (docs/benchmarks.md, "A leaner request pipeline").
    #[test]
    fn the_per_request_future_stays_small() {
        fn future_size<F: FnOnce() -> Fut, Fut>(_: F) -> usize {
            std::mem::size_of::<Fut>()
        }
        // Never called: only the future's type is needed.
        let exchange: Option<Exchange> = None;
        let id = SessionId::parse("");
        let size = future_size(|| async { exchange.as_ref().unwrap().resolve(id.as_ref().unwrap(), false).await });
        assert!(size <= 2048, "resolve's future is {size} bytes");
    }

    /// An exchange whose provider is unreachable (port 9 on loopback): anything that would need
    /// Keycloak fails like an outage.
    fn fixture(idle: i64, absolute: i64) -> Fixture {
        fixture_writing(idle, absolute, crate::session::RecordFormat::default())
    }

    fn fixture_writing(idle: i64, absolute: i64, format: crate::session::RecordFormat) -> Fixture {
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
            Arc::new(EmbeddedStore::open(&dir.path().join("s.redb")).unwrap().writing(format)),
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
        // A margin below the 1800 s idle timeout: the clock is real time plus the advance, and a
        // loaded machine can let a second pass between the login and this check.
        f.clock.advance(1790);
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

    /// The tag and the envelope's AAD cover the bound fields in one form whatever the record's
    /// format: a tagged record written in one format and rewritten in the other (a replica of
    /// the other upgrade phase touching it) still passes the check and opens.
    #[tokio::test]
    async fn a_record_rewritten_in_the_other_format_still_authenticates_and_opens() {
        use crate::session::RecordFormat::{Binary, Json};
        for (first, then) in [(Json, Binary), (Binary, Json)] {
            let a = fixture_writing(1800, 43200, first);
            let mut l = login(100_000);
            l.claims.realm_roles = vec!["user".into(), "admin".into()];
            l.claims.client_roles.insert("pb".into(), vec!["reader".into()]);
            l.claims.groups = vec!["/staff".into()];
            l.claims.email = Some("alice@example.com".into());
            let (id, _) = a.ex.start(l, ClientInfo::default()).await.unwrap();
            let stored = a.ex.store().get(&id.key()).await.unwrap().unwrap();
            assert!(stored.meta_tag.is_some());
            let b = fixture_writing(1800, 43200, then);
            b.ex.store().insert(&id.key(), &stored).await.unwrap();
            let checked = b.ex.resolve(&id, false).await.unwrap();
            assert_eq!(checked.record.claims, stored.claims, "{first:?} → {then:?}");
            let opened = b.ex.resolve(&id, true).await.unwrap();
            assert_eq!(opened.access_token.as_deref(), Some("access-1"), "{first:?} → {then:?}");
            // An edit still fails in the new format: the check is not weakened by the switch.
            let mut edited = stored.clone();
            edited.claims.realm_roles.push("superuser".into());
            edited.version = opened.record.version + 1;
            assert!(b.ex.store().compare_and_swap(&id.key(), opened.record.version, &edited).await.unwrap());
            assert!(matches!(b.ex.resolve(&id, false).await, Err(ExchangeError::InvalidSession)));
        }
    }

    /// `/auth/me` authenticates the record by its metadata tag, without decrypting the token
    /// envelope (so its cost does not grow with the tokens), yet a record edited in the store
    /// still authenticates nobody: another session's tag or envelope put in, or the tag removed
    /// from an edited record (the fallback opens the envelope), all fail.
    #[tokio::test]
    async fn the_session_check_uses_the_metadata_tag_and_edits_still_fail() {
        let f = fixture(1800, 43200);
        let (id, rec) = f.ex.start(login(100_000), ClientInfo::default()).await.unwrap();
        let (other_id, other) = f.ex.start(login(100_000), ClientInfo::default()).await.unwrap();
        assert!(rec.meta_tag.is_some(), "new records are tagged");
        let store = f.ex.store().clone();
        let put = |edit: &dyn Fn(&mut SessionRecord)| {
            let store = store.clone();
            let mut r = rec.clone();
            edit(&mut r);
            let key = id.key();
            async move {
                let current = store.get(&key).await.unwrap().unwrap();
                r.version = current.version + 1;
                assert!(store.compare_and_swap(&key, current.version, &r).await.unwrap());
            }
        };
        // The ciphertext's middle damaged: the check does not decrypt it; the exchange does.
        put(&|r| {
            let mid = r.sealed_tokens.len() / 2;
            r.sealed_tokens[mid] ^= 1;
        })
        .await;
        assert!(f.ex.resolve(&id, false).await.is_ok(), "no decryption on the check");
        assert!(matches!(f.ex.resolve(&id, true).await, Err(ExchangeError::InvalidSession)), "the exchange opens it");
        type Edit<'a> = &'a dyn Fn(&mut SessionRecord);
        let cases: [(&str, Edit); 5] = [
            ("another session's tag", &|r: &mut SessionRecord| r.meta_tag = other.meta_tag.clone()),
            ("another session's envelope", &|r: &mut SessionRecord| r.sealed_tokens = other.sealed_tokens.clone()),
            ("a garbled tag", &|r: &mut SessionRecord| r.meta_tag = Some("AAAA".into())),
            ("claims edited", &|r: &mut SessionRecord| r.claims.realm_roles.push("admin".into())),
            ("claims edited, tag removed", &|r: &mut SessionRecord| {
                r.claims.realm_roles.push("admin".into());
                r.meta_tag = None;
            }),
        ];
        for (why, edit) in cases {
            put(edit).await;
            assert!(matches!(f.ex.resolve(&id, false).await, Err(ExchangeError::InvalidSession)), "{why}");
            let known = LiveCheck::of(&rec);
            assert!(
                matches!(f.ex.still_live(&id, &known).await, Err(ExchangeError::InvalidSession)),
                "{why}: stream re-check"
            );
        }
        // A record without a tag (written before tags existed) is checked by its envelope.
        put(&|r| r.meta_tag = None).await;
        assert!(f.ex.resolve(&id, false).await.is_ok(), "untagged genuine record");
        assert!(f.ex.resolve(&other_id, false).await.is_ok());
    }

    /// A core for one replica, against the stub provider, over a shared store.
    fn stub_core(
        p: &crate::oidc::stub::Provider,
        clock: Arc<SystemClock>,
        store: Arc<dyn SessionStore>,
        skew: i64,
    ) -> Exchange {
        let oidc = OidcClient::new(
            OidcSettings {
                issuer: p.issuer.clone(),
                client_id: crate::oidc::stub::CLIENT.into(),
                client_secret: SecretString::from("x".to_string()),
                scopes: vec!["openid".into()],
                algorithms: vec![jsonwebtoken::Algorithm::ES256],
                trusted_audiences: vec![],
                redirect_uri: "http://localhost/auth/callback".into(),
                http_timeout: Duration::from_secs(2),
            },
            clock.clone(),
        )
        .unwrap();
        let key = SecretString::from("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".to_string());
        Exchange::new(
            store,
            Arc::new(oidc),
            Arc::new(Keyring::new(&key, &[]).unwrap()),
            clock,
            ExchangeSettings { idle_timeout: 1800, absolute_timeout: 43200, refresh_skew: skew },
            Arc::new(Metrics::default()),
        )
    }

    fn stub_login(p: &crate::oidc::stub::Provider) -> LoginResult {
        LoginResult {
            tokens: p.login_tokens(),
            claims: UserClaims {
                iss: p.issuer.clone(),
                sub: "user-1".into(),
                email: Some("user@example.com".into()),
                realm_roles: vec!["reader".into()],
                ..Default::default()
            },
            provider_sid: Some("stub-sid".into()),
        }
    }

    fn embedded(dir: &tempfile::TempDir) -> Arc<dyn SessionStore> {
        Arc::new(EmbeddedStore::open(&dir.path().join("s.redb")).unwrap())
    }

    #[test]
    fn the_skew_never_exceeds_half_the_token_lifetime() {
        assert_eq!(effective_skew(30, Some(300)), 30);
        assert_eq!(effective_skew(30, Some(15)), 7);
        assert_eq!(effective_skew(30, Some(10)), 5);
        assert_eq!(effective_skew(30, None), 30, "records from before the lifetime was kept");
        assert_eq!(effective_skew(30, Some(0)), 30);
    }

    /// A provider whose access tokens live 10 s, with the default 30 s skew: no refresh right
    /// after login, exactly one once the token is past half its life, however many requests.
    #[tokio::test]
    async fn short_lived_tokens_are_not_refreshed_on_every_request() {
        let clock = Arc::new(SystemClock::default());
        let p = crate::oidc::stub::Provider::start(clock.clone()).await;
        p.access_lifetime.store(10, std::sync::atomic::Ordering::SeqCst);
        let dir = tempfile::tempdir().unwrap();
        let ex = Arc::new(stub_core(&p, clock.clone(), embedded(&dir), 30));
        let (id, _) = ex.start(stub_login(&p), ClientInfo::default()).await.unwrap();
        let id = Arc::new(id);
        let burst = |ex: Arc<Exchange>, id: Arc<SessionId>| async move {
            let mut tasks = Vec::new();
            for _ in 0..20 {
                let (ex, id) = (ex.clone(), id.clone());
                tasks.push(tokio::spawn(async move { ex.resolve(&id, true).await.is_ok() }));
            }
            for t in tasks {
                assert!(t.await.unwrap());
            }
        };
        burst(ex.clone(), id.clone()).await;
        assert_eq!(p.refreshes.load(std::sync::atomic::Ordering::SeqCst), 0, "none right after login");
        clock.advance(6); // past half-life (5 s), before expiry
        burst(ex.clone(), id.clone()).await;
        burst(ex.clone(), id.clone()).await;
        assert_eq!(p.refreshes.load(std::sync::atomic::Ordering::SeqCst), 1, "exactly one per token lifetime");
    }

    /// OpenID Connect Core §12.2: the refresh response may lack an ID token. The session goes on
    /// with its identity; roles come fresh from the verified access token.
    #[tokio::test]
    async fn a_refresh_without_an_id_token_keeps_the_session_and_takes_fresh_roles() {
        let clock = Arc::new(SystemClock::default());
        let p = crate::oidc::stub::Provider::start(clock.clone()).await;
        p.id_token_on_refresh.store(false, std::sync::atomic::Ordering::SeqCst);
        let dir = tempfile::tempdir().unwrap();
        let ex = stub_core(&p, clock.clone(), embedded(&dir), 30);
        let (id, first) = ex.start(stub_login(&p), ClientInfo::default()).await.unwrap();
        let before = ex.resolve(&id, true).await.unwrap().access_token.unwrap();
        *p.roles.lock().unwrap() = vec!["reader".into(), "writer".into()];
        clock.advance(400); // the access token expired
        let r = ex.resolve(&id, true).await.unwrap();
        assert_eq!(p.refreshes.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_ne!(r.access_token.unwrap(), before, "new access token in use");
        assert_eq!(r.record.claims.realm_roles, ["reader", "writer"], "roles from the new access token");
        assert_eq!(r.record.claims.email, first.claims.email, "identity kept");
        assert_eq!(r.record.claims.sub, "user-1");
        let tokens = ex.open(&id.key(), &r.record).unwrap();
        assert!(tokens.id_token.is_some(), "the login's ID token is kept for the logout hint");
    }

    /// Refresh-token rotation and a JWKS outage right after the token endpoint answered (the
    /// provider rotated its signing key too): the rotated refresh token is stored, so the other
    /// replica's next refresh uses it instead of replaying the spent one and logging the user out.
    #[tokio::test]
    async fn a_rotated_refresh_token_survives_a_failed_validation_step_across_replicas() {
        let clock = Arc::new(SystemClock::default());
        let p = crate::oidc::stub::Provider::start(clock.clone()).await;
        let dir = tempfile::tempdir().unwrap();
        let store = embedded(&dir);
        let a = stub_core(&p, clock.clone(), store.clone(), 30);
        let b = stub_core(&p, clock.clone(), store.clone(), 30);
        for ex in [&a, &b] {
            ex.oidc().discover().await.unwrap(); // as at start-up
        }
        let (id, _) = a.start(stub_login(&p), ClientInfo::default()).await.unwrap();
        let first = a.resolve(&id, true).await.unwrap().access_token.unwrap();
        assert!(b.resolve(&id, true).await.is_ok(), "replica b knows the session");

        p.rotate_key("k2");
        p.jwks_up.store(false, std::sync::atomic::Ordering::SeqCst);
        clock.advance(400); // expired: a refresh is needed
        assert!(matches!(a.resolve(&id, true).await, Err(ExchangeError::ProviderUnavailable)));
        assert_eq!(p.refreshes.load(std::sync::atomic::Ordering::SeqCst), 1, "the provider issued new tokens");
        assert!(store.get(&id.key()).await.unwrap().is_some(), "session kept");

        p.jwks_up.store(true, std::sync::atomic::Ordering::SeqCst);
        let r = b.resolve(&id, true).await.expect("replica b refreshes with the rotated refresh token");
        assert_eq!(p.refreshes.load(std::sync::atomic::Ordering::SeqCst), 2);
        assert_ne!(r.access_token.unwrap(), first);
        assert!(a.resolve(&id, true).await.is_ok(), "and replica a serves the refreshed session");
    }

    /// A verdict is not an outage: a refreshed ID token for another subject ends the session
    /// deliberately, and the refresh token it came with is revoked.
    #[tokio::test]
    async fn a_refresh_naming_another_subject_ends_the_session() {
        let clock = Arc::new(SystemClock::default());
        let p = crate::oidc::stub::Provider::start(clock.clone()).await;
        let dir = tempfile::tempdir().unwrap();
        let ex = stub_core(&p, clock.clone(), embedded(&dir), 30);
        let (id, _) = ex.start(stub_login(&p), ClientInfo::default()).await.unwrap();
        *p.sub.lock().unwrap() = "someone-else".into();
        clock.advance(400);
        assert!(matches!(ex.resolve(&id, true).await, Err(ExchangeError::InvalidSession)));
        assert!(ex.store().get(&id.key()).await.unwrap().is_none(), "session ended");
        assert_eq!(p.revocations.load(std::sync::atomic::Ordering::SeqCst), 1, "new refresh token revoked");
    }

    /// Every login path goes through `start`, so a password login for a provider session the
    /// provider has already logged out (back-channel) is refused like a code-flow login.
    #[tokio::test]
    async fn a_login_for_a_provider_session_already_logged_out_is_refused() {
        let clock = Arc::new(SystemClock::default());
        let p = crate::oidc::stub::Provider::start(clock.clone()).await;
        let dir = tempfile::tempdir().unwrap();
        let ex = stub_core(&p, clock.clone(), embedded(&dir), 30);
        assert_eq!(ex.end_provider_session(Some("stub-sid"), None, 3600).await.unwrap(), 0);
        assert!(matches!(ex.start(stub_login(&p), ClientInfo::default()).await, Err(ExchangeError::LoginEnded)));
        assert!(ex.all_sessions().await.unwrap().is_empty(), "nothing stored");
        // Another provider session is not affected.
        let mut other = stub_login(&p);
        other.provider_sid = Some("another-sid".into());
        assert!(ex.start(other, ClientInfo::default()).await.is_ok());
    }

    /// Without an ID token, the refreshed access token is the only proof: roles the provider
    /// removed are removed here, and an access token that does not verify ends the session.
    #[tokio::test]
    async fn a_refresh_without_an_id_token_drops_removed_roles_and_refuses_a_bad_access_token() {
        let clock = Arc::new(SystemClock::default());
        let p = crate::oidc::stub::Provider::start(clock.clone()).await;
        p.id_token_on_refresh.store(false, std::sync::atomic::Ordering::SeqCst);
        let dir = tempfile::tempdir().unwrap();
        let ex = stub_core(&p, clock.clone(), embedded(&dir), 30);
        let (id, _) = ex.start(stub_login(&p), ClientInfo::default()).await.unwrap();
        p.roles.lock().unwrap().clear();
        clock.advance(400);
        let r = ex.resolve(&id, true).await.unwrap();
        assert!(r.record.claims.realm_roles.is_empty(), "a role removed at the provider is gone");

        *p.access_azp.lock().unwrap() = "another-client".into();
        clock.advance(400);
        assert!(matches!(ex.resolve(&id, true).await, Err(ExchangeError::InvalidSession)));
        assert!(ex.store().get(&id.key()).await.unwrap().is_none(), "session ended");
        assert_eq!(p.revocations.load(std::sync::atomic::Ordering::SeqCst), 1, "new refresh token revoked");
    }

    /// Concurrent requests of one session in one process: one refresh at the provider, and every
    /// waiter takes the refresher's outcome (the same new token) without a lock round of its own.
    #[tokio::test]
    async fn concurrent_requests_share_one_refresh_and_its_token() {
        use std::sync::atomic::Ordering;
        let clock = Arc::new(SystemClock::default());
        let p = crate::oidc::stub::Provider::start(clock.clone()).await;
        let dir = tempfile::tempdir().unwrap();
        let ex = Arc::new(stub_core(&p, clock.clone(), embedded(&dir), 30));
        let (id, _) = ex.start(stub_login(&p), ClientInfo::default()).await.unwrap();
        clock.advance(400);
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..20 {
            let (ex, id) = (ex.clone(), SessionId::parse(id.expose()).unwrap());
            set.spawn(async move { ex.resolve(&id, true).await.map(|r| r.access_token) });
        }
        let tokens: Vec<_> = set.join_all().await.into_iter().map(|r| r.unwrap().unwrap()).collect();
        assert_eq!(p.refreshes.load(Ordering::SeqCst), 1, "exactly one refresh");
        assert!(tokens.iter().all(|t| *t == tokens[0]), "every waiter has the new token");
        let stored = ex.open(&id.key(), &ex.store().get(&id.key()).await.unwrap().unwrap()).unwrap();
        assert_eq!(stored.access_token, tokens[0]);
        assert!(ex.refresh_flights.lock().unwrap().is_empty(), "no flight left behind");
    }

    /// SECURITY: while the provider fails a session's refresh (5xx), that session's requests get
    /// the 503 at once for a short, growing backoff instead of each calling the provider again —
    /// and the first request after the backoff does call it, so the session recovers by itself.
    #[tokio::test]
    async fn a_failing_provider_is_not_hammered_per_request() {
        use std::sync::atomic::Ordering;
        let clock = Arc::new(SystemClock::default());
        let p = crate::oidc::stub::Provider::start(clock.clone()).await;
        let dir = tempfile::tempdir().unwrap();
        let ex = Arc::new(stub_core(&p, clock.clone(), embedded(&dir), 30));
        let (id, _) = ex.start(stub_login(&p), ClientInfo::default()).await.unwrap();
        clock.advance(400);
        p.token_down.store(true, Ordering::SeqCst);
        let unavailable = |r: Result<Resolved, ExchangeError>| matches!(r, Err(ExchangeError::ProviderUnavailable));
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..10 {
            let (ex, id) = (ex.clone(), SessionId::parse(id.expose()).unwrap());
            set.spawn(async move { unavailable(ex.resolve(&id, true).await) });
        }
        assert!(set.join_all().await.into_iter().all(|u| u), "a burst: 503 for all");
        assert_eq!(p.token_calls.load(Ordering::SeqCst), 1, "a burst makes one provider call");
        for _ in 0..5 {
            assert!(unavailable(ex.resolve(&id, true).await));
        }
        assert_eq!(p.token_calls.load(Ordering::SeqCst), 1, "backing off: no call");
        assert_eq!(ex.metrics.refresh_backoffs.get(), 5);
        tokio::time::sleep(Duration::from_millis(1100)).await; // the first backoff (1 s) is over
        assert!(unavailable(ex.resolve(&id, true).await));
        assert_eq!(p.token_calls.load(Ordering::SeqCst), 2, "tried again after the backoff");
        tokio::time::sleep(Duration::from_millis(1100)).await; // the second one is 2 s
        assert!(unavailable(ex.resolve(&id, true).await));
        assert_eq!(p.token_calls.load(Ordering::SeqCst), 2, "the backoff grows");
        p.token_down.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert!(ex.resolve(&id, true).await.is_ok(), "recovers once the provider is back");
        assert_eq!(p.refreshes.load(Ordering::SeqCst), 1);
        assert!(ex.resolve(&id, true).await.is_ok());
        assert!(!ex.backing_off(&id.key()), "a success clears the backoff");
        assert!(ex.store().get(&id.key()).await.unwrap().is_some(), "an outage never ends a session");
    }

    /// A real `redis-server` on a free loopback port, killed on drop, and a store on it whose
    /// calls give up after 300 ms.
    struct TestRedis {
        child: std::process::Child,
        _dir: tempfile::TempDir,
    }
    impl Drop for TestRedis {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    async fn test_redis() -> (TestRedis, String, Arc<dyn SessionStore>) {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let rdir = tempfile::tempdir().unwrap();
        let child = std::process::Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--save", "", "--port", &port.to_string()])
            .arg("--dir")
            .arg(rdir.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server must be installed (scripts/setup.sh)");
        let redis = TestRedis { child, _dir: rdir };
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let url = format!("redis://127.0.0.1:{port}");
        let store = crate::session::redis::RedisStore::open(
            &url,
            &crate::session::redis::RedisTls::default(),
            Duration::from_millis(300),
        )
        .unwrap();
        (redis, url, Arc::new(store))
    }

    /// SECURITY: Keycloak does not deliver a back-channel logout again after a 503. One that
    /// arrives while the store cannot write is kept; once the store is back — with the session's
    /// record still in it — this replica treats the session as ended until the retry loop has
    /// applied the logout, which it then does by itself.
    #[tokio::test]
    async fn a_logout_the_store_could_not_take_is_applied_later_and_fails_closed_meanwhile() {
        let (_redis, url, store) = test_redis().await;
        let clock = Arc::new(SystemClock::default());
        let p = crate::oidc::stub::Provider::start(clock.clone()).await;
        let ex = Arc::new(stub_core(&p, clock.clone(), store, 30));
        let (id, rec) = ex.start(stub_login(&p), ClientInfo::default()).await.unwrap();
        let mut other = stub_login(&p);
        other.provider_sid = Some("another-sid".into());
        let (bystander, _) = ex.start(other, ClientInfo::default()).await.unwrap();

        let mut admin = redis::Client::open(url.as_str()).unwrap().get_multiplexed_async_connection().await.unwrap();
        let _: () = redis::cmd("CLIENT").arg("PAUSE").arg(1000).arg("WRITE").query_async(&mut admin).await.unwrap();
        let token = p.logout_token("jti-1");
        assert!(matches!(ex.accept_logout_token(&token, 60).await, Err(LogoutTokenError::Unavailable)), "503");
        assert_eq!(ex.pending_logouts(), 1);
        assert_eq!(ex.metrics.backchannel_logout_pending.get(), 1);
        tokio::time::sleep(Duration::from_millis(1200)).await; // the store is back

        assert!(ex.store().get(&id.key()).await.unwrap().is_some(), "the store still has the record");
        assert!(matches!(ex.resolve(&id, false).await, Err(ExchangeError::InvalidSession)), "but it is ended here");
        assert!(matches!(ex.resolve(&id, true).await, Err(ExchangeError::InvalidSession)), "for the exchange too");
        assert!(
            matches!(ex.still_live(&id, &LiveCheck::of(&rec)).await, Err(ExchangeError::InvalidSession)),
            "and an open stream"
        );
        assert!(
            matches!(ex.start(stub_login(&p), ClientInfo::default()).await, Err(ExchangeError::LoginEnded)),
            "a login for the logged-out provider session is refused"
        );
        assert!(ex.resolve(&bystander, false).await.is_ok(), "another provider session is not affected");

        let (stop, stopped) = tokio::sync::watch::channel(false);
        let retry = tokio::spawn({
            let ex = ex.clone();
            async move { ex.logout_retry_loop(stopped, Duration::from_secs(5)).await }
        });
        let mut applied = false;
        for _ in 0..100 {
            if ex.pending_logouts() == 0 {
                applied = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(applied, "the retry applied it once the store took writes again");
        assert!(ex.store().get(&id.key()).await.unwrap().is_none(), "the record is gone from the store");
        assert!(ex.provider_session_ended("stub-sid").await.unwrap(), "tombstoned");
        assert!(matches!(ex.resolve(&id, false).await, Err(ExchangeError::InvalidSession)));
        assert!(ex.resolve(&bystander, false).await.is_ok());
        assert!(
            matches!(ex.accept_logout_token(&token, 60).await, Err(LogoutTokenError::Replayed)),
            "its jti is marked: a late redelivery is a replay"
        );
        let applied_total = ex
            .metrics
            .backchannel_logouts_deferred
            .get_or_create(&crate::metrics::DeferredLogoutLabels { outcome: DeferredLogoutOutcome::Applied })
            .get();
        assert_eq!(applied_total, 1);
        assert_eq!(ex.metrics.backchannel_logout_pending.get(), 0);
        stop.send(true).unwrap();
        retry.await.unwrap();
    }

    /// SECURITY: a back-channel logout whose replay mark (`SET NX`) timed out after Redis had
    /// taken it must not leave the mark behind: the provider's retry of the same token would be
    /// refused as a replay and the sessions would live on. Redis is paused for writes so the
    /// mark lands only after the store has given up on it.
    #[tokio::test]
    async fn a_logout_whose_replay_mark_timed_out_can_be_delivered_again() {
        let (_redis, url, store) = test_redis().await;
        let clock = Arc::new(SystemClock::default());
        let p = crate::oidc::stub::Provider::start(clock.clone()).await;
        let ex = stub_core(&p, clock.clone(), store, 30);
        let (id, _) = ex.start(stub_login(&p), ClientInfo::default()).await.unwrap();
        let token = p.logout_token("jti-1");
        let mut admin = redis::Client::open(url.as_str()).unwrap().get_multiplexed_async_connection().await.unwrap();
        let _: () = redis::cmd("CLIENT").arg("PAUSE").arg(1000).arg("WRITE").query_async(&mut admin).await.unwrap();
        assert!(matches!(ex.accept_logout_token(&token, 60).await, Err(LogoutTokenError::Unavailable)));
        tokio::time::sleep(Duration::from_millis(1200)).await; // the pause is over; the SET NX ran
        assert_eq!(ex.accept_logout_token(&token, 60).await.unwrap(), 1, "the retry is accepted");
        assert!(ex.store().get(&id.key()).await.unwrap().is_none(), "and the session is gone");
        assert_eq!(ex.pending_logouts(), 0, "the redelivery took the deferred logout's place");
        assert!(
            matches!(ex.accept_logout_token(&token, 60).await, Err(LogoutTokenError::Replayed)),
            "a third delivery is a replay"
        );
    }

    /// SECURITY: an open stream or WebSocket must close when its session has a back-channel
    /// logout queued here, even while the store is still down — its re-check used to read the
    /// store first and keep the stream open on "unavailable".
    #[tokio::test]
    async fn an_open_stream_of_a_deferred_logout_closes_while_the_store_is_down() {
        let (_redis, url, store) = test_redis().await;
        let clock = Arc::new(SystemClock::default());
        let p = crate::oidc::stub::Provider::start(clock.clone()).await;
        let ex = stub_core(&p, clock.clone(), store, 30);
        let (id, rec) = ex.start(stub_login(&p), ClientInfo::default()).await.unwrap();
        let mut other = stub_login(&p);
        other.provider_sid = Some("another-sid".into());
        let (bystander, brec) = ex.start(other, ClientInfo::default()).await.unwrap();

        let mut admin = redis::Client::open(url.as_str()).unwrap().get_multiplexed_async_connection().await.unwrap();
        let _: () = redis::cmd("CLIENT").arg("PAUSE").arg(3000).arg("ALL").query_async(&mut admin).await.unwrap();
        assert!(matches!(
            ex.accept_logout_token(&p.logout_token("jti-1"), 60).await,
            Err(LogoutTokenError::Unavailable)
        ));
        assert_eq!(ex.pending_logouts(), 1);
        assert!(matches!(ex.still_live(&bystander, &LiveCheck::of(&brec)).await, Err(ExchangeError::StoreUnavailable)));
        assert!(
            matches!(ex.still_live(&id, &LiveCheck::of(&rec)).await, Err(ExchangeError::InvalidSession)),
            "the logged-out session's stream ends although the store cannot be read"
        );
    }

    /// A deferred entry as `accept_logout_token` makes it, for the tests below.
    fn pending(
        ex: &Exchange,
        jti: &str,
        sid: Option<&str>,
        cutoff: Option<UnixTime>,
        may_be_ours: bool,
    ) -> PendingLogout {
        let now = ex.now();
        PendingLogout {
            sid: sid.map(Into::into),
            sub: Some("user-1".into()),
            user_key: Some(ex.user_key("user-1")),
            user_cutoff: cutoff,
            tombstone_for: 60,
            mark: Some(Mark { jti: jti.into(), until: now + 600, may_be_ours }),
            deferred_at: now,
            expires_at: now + 43200,
            failures: 0,
        }
    }

    fn deferred_total(ex: &Exchange, outcome: DeferredLogoutOutcome) -> i64 {
        ex.metrics.backchannel_logouts_deferred.get_or_create(&crate::metrics::DeferredLogoutLabels { outcome }).get()
            as i64
    }

    /// SECURITY: a captured logout token replayed while the store is down is deferred like any
    /// other. The retry marks its `jti` first: marked already, and not by this replica, means it
    /// was applied before — the entry is dropped and the user's sessions created since survive.
    /// A `sub`-only logout applied by the retry ends only sessions created up to its cutoff.
    #[tokio::test]
    async fn the_retry_drops_an_already_used_token_and_ends_no_newer_session() {
        let (_redis, _url, store) = test_redis().await;
        let clock = Arc::new(SystemClock::default());
        let p = crate::oidc::stub::Provider::start(clock.clone()).await;
        let ex = stub_core(&p, clock.clone(), store, 30);
        let (id, rec) = ex.start(stub_login(&p), ClientInfo::default()).await.unwrap();
        let (now, created) = (ex.now(), rec.created_at);
        assert!(ex.store().mark(LOGOUT_JTI, "used", now + 600).await.unwrap(), "the token was applied once");

        ex.defer_logout(pending(&ex, "used", None, Some(created), false));
        assert!(ex.retry_pending_logouts().await);
        assert_eq!(ex.pending_logouts(), 0);
        assert_eq!(deferred_total(&ex, DeferredLogoutOutcome::AlreadyApplied), 1);
        assert!(ex.resolve(&id, false).await.is_ok(), "the replay ended nothing");

        // A mark this replica may have set itself is not taken for a replay; still, a logout
        // issued before the session was created does not end it.
        assert!(ex.store().mark(LOGOUT_JTI, "ours", now + 600).await.unwrap());
        ex.defer_logout(pending(&ex, "ours", None, Some(created - 1), true));
        assert!(!ex.pending_logouts.ends(None, &ex.user_key("user-1"), created), "no newer session matches");
        assert!(ex.resolve(&id, false).await.is_ok(), "nor is served as ended");
        assert!(ex.retry_pending_logouts().await);
        assert_eq!(deferred_total(&ex, DeferredLogoutOutcome::Applied), 1);
        assert!(ex.store().get(&id.key()).await.unwrap().is_some(), "the newer session is not deleted");

        ex.defer_logout(pending(&ex, "fresh", None, Some(created), false));
        assert!(matches!(ex.resolve(&id, false).await, Err(ExchangeError::InvalidSession)), "ended meanwhile");
        assert!(ex.retry_pending_logouts().await);
        assert!(ex.store().get(&id.key()).await.unwrap().is_none(), "a session up to the cutoff is deleted");
        assert!(ex.store().is_marked(LOGOUT_JTI, "fresh", now).await.unwrap(), "and the jti marked");
    }

    /// An entry whose expiry has passed is dropped unapplied (every session it could end has
    /// reached its absolute lifetime), and stops matching.
    #[tokio::test]
    async fn an_expired_deferred_logout_is_dropped() {
        let (_redis, _url, store) = test_redis().await;
        let clock = Arc::new(SystemClock::default());
        let p = crate::oidc::stub::Provider::start(clock.clone()).await;
        let ex = stub_core(&p, clock.clone(), store, 30);
        let (id, _) = ex.start(stub_login(&p), ClientInfo::default()).await.unwrap();
        let mut e = pending(&ex, "old", Some("stub-sid"), None, false);
        e.expires_at = ex.now();
        ex.defer_logout(e);
        assert!(ex.retry_pending_logouts().await);
        assert_eq!(ex.pending_logouts(), 0);
        assert_eq!(deferred_total(&ex, DeferredLogoutOutcome::Expired), 1);
        assert!(ex.store().get(&id.key()).await.unwrap().is_some());
    }

    /// On shutdown the retry loop makes one last pass: a logout deferred during an outage that
    /// has just ended is applied even though the next scheduled retry never comes.
    #[tokio::test]
    async fn shutdown_makes_one_last_pass_over_deferred_logouts() {
        let (_redis, url, store) = test_redis().await;
        let clock = Arc::new(SystemClock::default());
        let p = crate::oidc::stub::Provider::start(clock.clone()).await;
        let ex = Arc::new(stub_core(&p, clock.clone(), store, 30));
        let (id, _) = ex.start(stub_login(&p), ClientInfo::default()).await.unwrap();
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let retry = tokio::spawn({
            let ex = ex.clone();
            async move { ex.logout_retry_loop(stopped, Duration::from_secs(5)).await }
        });
        let mut admin = redis::Client::open(url.as_str()).unwrap().get_multiplexed_async_connection().await.unwrap();
        let _: () = redis::cmd("CLIENT").arg("PAUSE").arg(700).arg("WRITE").query_async(&mut admin).await.unwrap();
        assert!(matches!(
            ex.accept_logout_token(&p.logout_token("jti-1"), 60).await,
            Err(LogoutTokenError::Unavailable)
        ));
        assert_eq!(ex.pending_logouts(), 1);
        tokio::time::sleep(Duration::from_millis(200)).await; // the pause is over; the first retry is not due yet
        stop.send(true).unwrap();
        retry.await.unwrap();
        assert_eq!(ex.pending_logouts(), 0, "applied on the way out");
        assert!(ex.store().get(&id.key()).await.unwrap().is_none());
    }
}
