//! The OpenID Connect client, written for Keycloak but standard: discovery from the pinned issuer,
//! authorization code + PKCE, token validation, refresh, revocation and logout URLs. It knows
//! nothing of listeners or HTTP responses; callers map `OidcError` to what their face needs.

mod claims;
pub mod id_token;
pub mod jwks;
#[cfg(test)]
pub(crate) mod stub;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::Algorithm;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{Map, Value};
use url::Url;

pub use claims::{ShownClaims, UserClaims};
use id_token::{Expectations, TokenKind};
use jwks::{JwksCache, KeySource};

use crate::clock::{Clock, UnixTime};

/// Largest provider response we read (discovery, JWKS, token responses).
const MAX_RESPONSE_BYTES: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    /// The provider could not be reached, timed out or answered 5xx: not the user's fault, retryable.
    #[error("identity provider unavailable: {0}")]
    Unavailable(String),
    /// The provider's metadata has not been loaded yet.
    #[error("identity provider metadata not loaded yet")]
    NotReady,
    /// The grant (code or refresh token) is invalid, expired or revoked.
    #[error("grant rejected by the identity provider")]
    InvalidGrant,
    /// Username or password wrong (password grant).
    #[error("invalid username or password")]
    InvalidCredentials,
    /// A token failed validation.
    #[error("token rejected: {0}")]
    InvalidToken(&'static str),
    /// The token names a signing key the provider's JWKS does not hold (yet): after a key rotation
    /// this clears once the JWKS is refetched, so it is not proof of a forged token.
    #[error("signing key not found in the provider's JWKS")]
    UnknownKey,
    /// The provider answered something we cannot use (misconfiguration or protocol error).
    #[error("identity provider error: {0}")]
    Provider(String),
}

impl OidcError {
    /// Whether trying again later can help: the provider or its keys were unreachable, or a key
    /// the provider just rotated in is not in our JWKS copy yet. Everything else is a verdict.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable(_) | Self::NotReady | Self::UnknownKey)
    }
}

/// Parse one `oidc.algorithms` entry; symmetric and `none` algorithms are never allowed.
pub fn parse_allowed_algorithm(name: &str) -> Result<Algorithm, String> {
    let alg = match name {
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "PS384" => Algorithm::PS384,
        "PS512" => Algorithm::PS512,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        "EdDSA" => Algorithm::EdDSA,
        other => {
            return Err(format!(
                "`{other}` is not an allowed signature algorithm (asymmetric only, never none or HS*)"
            ));
        }
    };
    Ok(alg)
}

/// HTTP to the provider: timeouts always, redirects never, bounded bodies.
pub struct Http {
    client: reqwest::Client,
    /// Latency per endpoint and outcome (`gatehouse_identity_provider_request_duration_seconds`).
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

impl Http {
    pub fn new(timeout: Duration) -> Result<Self, OidcError> {
        let client = reqwest::Client::builder()
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("gatehouse/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| OidcError::Provider(format!("cannot build HTTP client: {e}")))?;
        Ok(Self { client, metrics: None })
    }

    /// Time one provider call, count it by outcome, and wrap it in a client span (the endpoint's
    /// name only: URLs of token endpoints are not secret, but bodies and headers are never recorded).
    async fn observed<T>(
        &self,
        endpoint: &'static str,
        method: &'static str,
        call: impl std::future::Future<Output = Result<T, OidcError>>,
        answered_4xx: impl Fn(&T) -> bool,
    ) -> Result<T, OidcError> {
        use tracing::Instrument;
        // Only under a sampled request's span (telemetry::observe decides).
        let span = if !crate::telemetry::tracing_request() {
            tracing::Span::none()
        } else {
            tracing::info_span!(
            "identity_provider",
            otel.name = format!("{method} {endpoint}"),
            otel.kind = "client",
            http.request.method = method,
            gatehouse.idp.endpoint = endpoint,
            otel.status_code = tracing::field::Empty,
            error.type = tracing::field::Empty,
            )
        };
        let started = std::time::Instant::now();
        let out = call.instrument(span.clone()).await;
        let outcome = match &out {
            Ok(v) if answered_4xx(v) => "rejected",
            Ok(_) => "ok",
            Err(OidcError::Unavailable(_)) => "unavailable",
            Err(_) => "rejected",
        };
        if outcome != "ok" {
            span.record("otel.status_code", "ERROR");
            span.record("error.type", outcome);
        }
        if let Some(m) = &self.metrics {
            m.provider_duration
                .get_or_create(&crate::metrics::ProviderLabels { endpoint, outcome })
                .observe(started.elapsed().as_secs_f64());
        }
        out
    }

    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        endpoint: &'static str,
        url: &str,
    ) -> Result<T, OidcError> {
        self.observed(endpoint, "GET", self.get_json_inner(url), |_| false).await
    }

    async fn get_json_inner<T: serde::de::DeserializeOwned>(&self, url: &str) -> Result<T, OidcError> {
        let resp = self.client.get(url).send().await.map_err(unavailable)?;
        let status = resp.status();
        let body = read_limited(resp).await?;
        if status.is_server_error() {
            return Err(OidcError::Unavailable(format!("{url} answered {status}")));
        }
        if !status.is_success() {
            return Err(OidcError::Provider(format!("{url} answered {status}")));
        }
        serde_json::from_slice(&body).map_err(|e| OidcError::Provider(format!("{url}: malformed JSON: {e}")))
    }

    /// POST a form to a token-style endpoint with client_secret_basic. A 4xx answer is returned
    /// (the caller reads the error), but counted as `rejected`.
    async fn post_form(
        &self,
        endpoint: &'static str,
        url: &str,
        client: &ClientAuth,
        form: &[(&str, &str)],
    ) -> Result<(reqwest::StatusCode, Vec<u8>), OidcError> {
        self.observed(endpoint, "POST", self.post_form_inner(url, client, form), |(status, _)| status.is_client_error())
            .await
    }

    async fn post_form_inner(
        &self,
        url: &str,
        client: &ClientAuth,
        form: &[(&str, &str)],
    ) -> Result<(reqwest::StatusCode, Vec<u8>), OidcError> {
        let resp = self
            .client
            .post(url)
            .basic_auth(form_urlencode(&client.id), Some(form_urlencode(client.secret.expose_secret())))
            .form(form)
            .send()
            .await
            .map_err(unavailable)?;
        let status = resp.status();
        let body = read_limited(resp).await?;
        if status.is_server_error() {
            return Err(OidcError::Unavailable(format!("token endpoint answered {status}")));
        }
        Ok((status, body))
    }
}

fn unavailable(e: reqwest::Error) -> OidcError {
    // reqwest's error text names the URL but never a body or header, so it carries no secret.
    OidcError::Unavailable(if e.is_timeout() { "timed out".into() } else { e.without_url().to_string() })
}

async fn read_limited(mut resp: reqwest::Response) -> Result<Vec<u8>, OidcError> {
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(unavailable)? {
        if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Err(OidcError::Provider("response too large".into()));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// RFC 6749 §2.3.1: client_id and secret are form-urlencoded before Basic encoding.
fn form_urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

struct ClientAuth {
    id: String,
    secret: SecretString,
}

/// The provider's endpoints from discovery.
#[derive(Debug, Deserialize)]
pub struct Metadata {
    pub issuer: String,
    pub authorization_endpoint: String,
    pub token_endpoint: String,
    pub jwks_uri: String,
    #[serde(default)]
    pub end_session_endpoint: Option<String>,
    #[serde(default)]
    pub revocation_endpoint: Option<String>,
    #[serde(default)]
    pub authorization_response_iss_parameter_supported: bool,
}

struct Provider {
    meta: Metadata,
    jwks: JwksCache,
}

/// Tokens as the provider returned them. Deliberately not `Debug`.
#[derive(Deserialize, Clone)]
pub struct TokenResponse {
    pub access_token: String,
    #[serde(default)]
    pub token_type: String,
    #[serde(default)]
    pub expires_in: Option<i64>,
    #[serde(default)]
    pub refresh_token: Option<String>,
    #[serde(default)]
    pub refresh_expires_in: Option<i64>,
    #[serde(default)]
    pub id_token: Option<String>,
}

#[derive(Deserialize)]
struct ErrorResponse {
    error: String,
}

/// A validated login: tokens plus the identity they prove.
pub struct LoginResult {
    pub tokens: TokenResponse,
    pub claims: UserClaims,
    /// Keycloak's session id (`sid`), for back-channel logout.
    pub provider_sid: Option<String>,
}

pub struct OidcSettings {
    pub issuer: String,
    pub client_id: String,
    pub client_secret: SecretString,
    pub scopes: Vec<String>,
    pub algorithms: Vec<Algorithm>,
    pub trusted_audiences: Vec<String>,
    pub redirect_uri: String,
    pub http_timeout: Duration,
}

pub struct OidcClient {
    settings: OidcSettings,
    auth: ClientAuth,
    http: Http,
    provider: ArcSwapOption<Provider>,
    discovery: tokio::sync::Mutex<()>,
    clock: Arc<dyn Clock>,
}

/// Floor between JWKS refetches triggered by unknown `kid`s in tokens anyone can send us.
const JWKS_REFETCH_FLOOR: Duration = Duration::from_secs(10);
/// Floor for tokens from our own token-endpoint calls (their own allowance, see `jwks`).
const JWKS_TRUSTED_REFETCH_FLOOR: Duration = Duration::from_secs(1);

impl OidcClient {
    pub fn new(settings: OidcSettings, clock: Arc<dyn Clock>) -> Result<Self, OidcError> {
        let http = Http::new(settings.http_timeout)?;
        let auth = ClientAuth { id: settings.client_id.clone(), secret: settings.client_secret.clone() };
        Ok(Self {
            settings,
            auth,
            http,
            provider: ArcSwapOption::empty(),
            discovery: tokio::sync::Mutex::new(()),
            clock,
        })
    }

    /// Count and time every call to the provider in these metrics.
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        self.http.metrics = Some(metrics);
        self
    }

    pub fn issuer(&self) -> &str {
        &self.settings.issuer
    }

    pub fn is_ready(&self) -> bool {
        self.provider.load().is_some()
    }

    /// Load discovery metadata and keys. Retried by callers until it succeeds once; after that a
    /// provider outage does not matter to sessions whose access token is still valid.
    pub async fn discover(&self) -> Result<(), OidcError> {
        let _single = self.discovery.lock().await;
        if self.is_ready() {
            return Ok(());
        }
        let url = format!("{}/.well-known/openid-configuration", self.settings.issuer.trim_end_matches('/'));
        let meta: Metadata = self.http.get_json("discovery", &url).await?;
        if meta.issuer != self.settings.issuer {
            return Err(OidcError::Provider(format!(
                "discovery issuer `{}` differs from the configured `{}`",
                meta.issuer, self.settings.issuer
            )));
        }
        for (name, u) in [
            ("authorization_endpoint", &meta.authorization_endpoint),
            ("token_endpoint", &meta.token_endpoint),
            ("jwks_uri", &meta.jwks_uri),
        ] {
            Url::parse(u).map_err(|_| OidcError::Provider(format!("discovery `{name}` is not a URL")))?;
        }
        let jwks =
            JwksCache::new(meta.jwks_uri.clone(), JWKS_REFETCH_FLOOR, JWKS_TRUSTED_REFETCH_FLOOR, self.clock.clone());
        jwks.refresh(&self.http).await?;
        self.provider.store(Some(Arc::new(Provider { meta, jwks })));
        tracing::info!(issuer = %self.settings.issuer, "identity provider metadata loaded");
        Ok(())
    }

    async fn provider(&self) -> Result<Arc<Provider>, OidcError> {
        if let Some(p) = self.provider.load_full() {
            return Ok(p);
        }
        self.discover().await?;
        self.provider.load_full().ok_or(OidcError::NotReady)
    }

    /// The authorization URL for a code flow with PKCE S256.
    pub async fn authorization_url(&self, state: &str, nonce: &str, code_verifier: &str) -> Result<String, OidcError> {
        let p = self.provider().await?;
        let challenge = URL_SAFE_NO_PAD.encode(crate::crypto::sha256(code_verifier.as_bytes()));
        let mut url = Url::parse(&p.meta.authorization_endpoint)
            .map_err(|_| OidcError::Provider("bad authorization endpoint".into()))?;
        url.query_pairs_mut()
            .append_pair("response_type", "code")
            .append_pair("client_id", &self.settings.client_id)
            .append_pair("redirect_uri", &self.settings.redirect_uri)
            .append_pair("scope", &self.settings.scopes.join(" "))
            .append_pair("state", state)
            .append_pair("nonce", nonce)
            .append_pair("code_challenge", &challenge)
            .append_pair("code_challenge_method", "S256");
        Ok(url.into())
    }

    /// RFC 9207: if the provider announces `iss` in authorization responses, it must be there and match.
    pub async fn check_response_issuer(&self, iss: Option<&str>) -> Result<(), OidcError> {
        let p = self.provider().await?;
        match iss {
            Some(iss) if iss != self.settings.issuer => {
                Err(OidcError::InvalidToken("authorization response from another issuer"))
            }
            None if p.meta.authorization_response_iss_parameter_supported => {
                Err(OidcError::InvalidToken("authorization response lacks iss"))
            }
            _ => Ok(()),
        }
    }

    /// Redeem an authorization code and validate the ID token against `nonce`.
    pub async fn redeem_code(&self, code: &str, code_verifier: &str, nonce: &str) -> Result<LoginResult, OidcError> {
        let tokens = self
            .token_request(&[
                ("grant_type", "authorization_code"),
                ("code", code),
                ("redirect_uri", &self.settings.redirect_uri),
                ("code_verifier", code_verifier),
            ])
            .await?;
        self.login_result(tokens, Some(nonce)).await
    }

    /// Direct access grant (username + password).
    pub async fn password_grant(&self, username: &str, password: &str) -> Result<LoginResult, OidcError> {
        let scope = self.settings.scopes.join(" ");
        let tokens = self
            .token_request(&[
                ("grant_type", "password"),
                ("username", username),
                ("password", password),
                ("scope", &scope),
            ])
            .await
            .map_err(|e| match e {
                OidcError::InvalidGrant => OidcError::InvalidCredentials,
                other => other,
            })?;
        self.login_result(tokens, None).await
    }

    /// Use a refresh token: the token-endpoint call only. Once this succeeds the old refresh token
    /// may be spent (rotation), so the caller must store what came back or end the session
    /// deliberately; `validate_refreshed` is the separate, retryable validation step.
    pub async fn refresh_grant(&self, refresh_token: &str) -> Result<TokenResponse, OidcError> {
        self.token_request(&[("grant_type", "refresh_token"), ("refresh_token", refresh_token)]).await
    }

    /// Validate a refresh response against the session's identity (OpenID Connect Core §12.2) and
    /// return the identity to store. The provider may omit the ID token: then the stored identity
    /// stays and only roles and groups are taken from the verified access token. A returned ID
    /// token is validated fully (no nonce) and must keep `iss` and `sub` and be freshly issued.
    pub async fn validate_refreshed(
        &self,
        tokens: &TokenResponse,
        current: &UserClaims,
    ) -> Result<UserClaims, OidcError> {
        let Some(id_token) = tokens.id_token.as_deref() else {
            let mut claims = current.clone();
            // A JWT access token that does not verify is a verdict here, not a reason to keep the
            // old roles: the new token would be stored and relayed.
            if let Some(access) = self.verified_access_claims(&tokens.access_token, true).await? {
                let s = |k: &str| access.get(k).and_then(Value::as_str);
                if s("sub").is_some_and(|sub| sub != current.sub) || s("iss").is_some_and(|iss| iss != current.iss) {
                    return Err(OidcError::InvalidToken("refreshed access token names another subject"));
                }
                claims.refresh_roles(&access);
            }
            return Ok(claims);
        };
        let id_claims = self
            .validate_jwt(id_token, TokenKind::Id, None, Some(&tokens.access_token), KeySource::TokenEndpoint)
            .await?;
        let iat = id_claims.get("iat").and_then(Value::as_i64).unwrap_or(0);
        if iat + id_token::LEEWAY < self.clock.now() {
            return Err(OidcError::InvalidToken("refreshed ID token was not freshly issued"));
        }
        let access_claims = if claims::has_roles(&id_claims) {
            None
        } else {
            self.verified_access_claims(&tokens.access_token, true).await?
        };
        let claims = UserClaims::from_tokens(&id_claims, access_claims.as_ref());
        if claims.iss != current.iss || claims.sub != current.sub {
            return Err(OidcError::InvalidToken("refreshed ID token names another subject"));
        }
        Ok(claims)
    }

    /// The access token's claims if it is a JWT that verifies (Keycloak's are). An opaque access
    /// token has none; a transient failure (JWKS unreachable) is an error the caller may retry.
    /// `strict` (a refresh): a JWT that does not verify is an error too.
    async fn verified_access_claims(
        &self,
        access_token: &str,
        strict: bool,
    ) -> Result<Option<Map<String, Value>>, OidcError> {
        if access_token.split('.').count() != 3 {
            return Ok(None);
        }
        match self.validate_jwt(access_token, TokenKind::Access, None, None, KeySource::TokenEndpoint).await {
            Ok(c) => Ok(Some(c)),
            Err(e) if e.is_transient() || strict => Err(e),
            Err(e) => {
                tracing::warn!(error = %e, "access token claims not used (token does not validate)");
                Ok(None)
            }
        }
    }

    /// RFC 7009 revocation of a refresh token. Best effort: the session is gone either way.
    pub async fn revoke(&self, refresh_token: &str) -> Result<(), OidcError> {
        let p = self.provider().await?;
        let Some(endpoint) = &p.meta.revocation_endpoint else {
            return Ok(());
        };
        let (status, _) = self
            .http
            .post_form(
                "revocation",
                endpoint,
                &self.auth,
                &[("token", refresh_token), ("token_type_hint", "refresh_token")],
            )
            .await?;
        if !status.is_success() {
            return Err(OidcError::Provider(format!("revocation answered {status}")));
        }
        Ok(())
    }

    /// RP-initiated logout URL, if the provider has an end-session endpoint.
    pub async fn end_session_url(
        &self,
        id_token_hint: Option<&str>,
        post_logout_redirect_uri: &str,
    ) -> Result<Option<String>, OidcError> {
        let p = self.provider().await?;
        let Some(endpoint) = &p.meta.end_session_endpoint else {
            return Ok(None);
        };
        let mut url = Url::parse(endpoint).map_err(|_| OidcError::Provider("bad end_session_endpoint".into()))?;
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("client_id", &self.settings.client_id);
            q.append_pair("post_logout_redirect_uri", post_logout_redirect_uri);
            if let Some(hint) = id_token_hint {
                q.append_pair("id_token_hint", hint);
            }
        }
        Ok(Some(url.into()))
    }

    /// Validate a JWT of `kind` issued by our provider for this client. `source` says whether the
    /// token came from our own token-endpoint call or from anyone (see `jwks::KeySource`).
    pub async fn validate_jwt(
        &self,
        token: &str,
        kind: TokenKind,
        nonce: Option<&str>,
        access_token: Option<&str>,
        source: KeySource,
    ) -> Result<Map<String, Value>, OidcError> {
        let exp = Expectations {
            issuer: &self.settings.issuer,
            client_id: &self.settings.client_id,
            trusted_audiences: &self.settings.trusted_audiences,
            algorithms: &self.settings.algorithms,
            kind,
            nonce,
            access_token,
            now: self.clock.now(),
        };
        // Shape and header first: a malformed token never makes us contact the provider.
        let peeked = id_token::peek(token, &exp)?;
        let p = self.provider().await?;
        let key = p.jwks.key(&self.http, peeked.kid.as_deref(), source).await?;
        id_token::verify(token, &peeked, &key, &exp)
    }

    async fn token_request(&self, form: &[(&str, &str)]) -> Result<TokenResponse, OidcError> {
        let p = self.provider().await?;
        let (status, body) = self.http.post_form("token", &p.meta.token_endpoint, &self.auth, form).await?;
        if status.is_success() {
            let tokens: TokenResponse =
                serde_json::from_slice(&body).map_err(|_| OidcError::Provider("malformed token response".into()))?;
            if !tokens.token_type.eq_ignore_ascii_case("bearer") {
                return Err(OidcError::Provider("token response is not a Bearer token".into()));
            }
            return Ok(tokens);
        }
        match serde_json::from_slice::<ErrorResponse>(&body) {
            Ok(e) if e.error == "invalid_grant" => Err(OidcError::InvalidGrant),
            // The provider's error code is safe to log; its description may echo input, so we drop it.
            Ok(e) => Err(OidcError::Provider(format!(
                "token endpoint answered {status} {}",
                e.error.chars().take(64).collect::<String>()
            ))),
            Err(_) => Err(OidcError::Provider(format!("token endpoint answered {status}"))),
        }
    }

    async fn login_result(&self, tokens: TokenResponse, nonce: Option<&str>) -> Result<LoginResult, OidcError> {
        let id_token = tokens
            .id_token
            .as_deref()
            .ok_or(OidcError::Provider("no id_token in the token response (is `openid` in scopes?)".into()))?;
        let id_claims = self
            .validate_jwt(id_token, TokenKind::Id, nonce, Some(&tokens.access_token), KeySource::TokenEndpoint)
            .await?;
        // Roles usually live in the access token; read them from it only after verifying it too.
        let access_claims = if claims::has_roles(&id_claims) {
            None
        } else {
            self.verified_access_claims(&tokens.access_token, false).await?
        };
        let claims = UserClaims::from_tokens(&id_claims, access_claims.as_ref());
        let provider_sid = id_claims.get("sid").and_then(Value::as_str).map(str::to_owned);
        Ok(LoginResult { tokens, claims, provider_sid })
    }

    /// Expiry of an access token: its own `exp` when it is a JWT (Keycloak's are), else `expires_in`
    /// from now. The token came straight from the token endpoint, so reading `exp` unverified is fine
    /// for bookkeeping; it is never used to authorize anything.
    pub fn access_expiry(&self, tokens: &TokenResponse) -> UnixTime {
        let now = self.clock.now();
        jwt_exp(&tokens.access_token).unwrap_or_else(|| match tokens.expires_in {
            Some(s) if s > 0 => now + s,
            _ => now + 60,
        })
    }
}

/// The `exp` of a JWT we already trust (for bookkeeping only, never for authorization).
fn jwt_exp(token: &str) -> Option<i64> {
    let payload = token.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(payload).ok()?;
    serde_json::from_slice::<Map<String, Value>>(&bytes).ok()?.get("exp")?.as_i64()
}
