//! A small in-process OpenID provider for unit tests of what a real Keycloak will not do on
//! demand: omit the ID token from a refresh response, answer with another subject, lose its JWKS
//! endpoint right after issuing tokens signed with a key it just rotated in. It rotates refresh
//! tokens like Keycloak with "Revoke Refresh Token" on (a spent one answers `invalid_grant`). The
//! real-Keycloak suites cover the ordinary paths.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use axum::extract::{Form, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use crate::clock::Clock;

pub struct TestKey {
    pub kid: String,
    pub enc: EncodingKey,
    pub jwk: Value,
}

/// A fresh P-256 signing key and its public JWK.
pub fn key(kid: &str) -> TestKey {
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new()).unwrap();
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref()).unwrap();
    let point = pair.public_key().as_ref().to_vec(); // 0x04 ‖ x ‖ y
    let jwk = json!({
        "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": kid,
        "x": URL_SAFE_NO_PAD.encode(&point[1..33]), "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
    });
    TestKey { kid: kid.into(), enc: EncodingKey::from_ec_der(pkcs8.as_ref()), jwk }
}

pub fn sign(k: &TestKey, claims: &Value) -> String {
    let mut h = Header::new(Algorithm::ES256);
    h.kid = Some(k.kid.clone());
    jsonwebtoken::encode(&h, claims, &k.enc).unwrap()
}

pub const CLIENT: &str = "gatehouse";

pub struct Provider {
    pub issuer: String,
    clock: Arc<dyn Clock>,
    /// Published keys; the last one signs.
    keys: Mutex<Vec<TestKey>>,
    /// Refresh tokens the provider still accepts (rotation: each is good once).
    live_refresh: Mutex<HashMap<String, ()>>,
    serial: AtomicUsize,
    /// Knobs.
    pub jwks_up: AtomicBool,
    pub id_token_on_refresh: AtomicBool,
    pub sub: Mutex<String>,
    pub roles: Mutex<Vec<String>>,
    pub access_lifetime: AtomicUsize,
    pub access_azp: Mutex<String>,
    /// The token endpoint answers 503 (an outage) while set.
    pub token_down: AtomicBool,
    /// Discovery names this issuer instead of the real one while set (a misconfigured or
    /// impersonating provider).
    pub discovery_issuer: Mutex<Option<String>>,
    /// Discovery announces RFC 9207 `iss` in authorization responses.
    pub announces_response_iss: AtomicBool,
    /// Counters.
    pub token_calls: AtomicUsize,
    pub refreshes: AtomicUsize,
    pub revocations: AtomicUsize,
    pub jwks_hits: AtomicUsize,
}

impl Provider {
    /// Serve on a loopback port.
    pub async fn start(clock: Arc<dyn Clock>) -> Arc<Self> {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let issuer = format!("http://{}/realms/stub", l.local_addr().unwrap());
        let p = Arc::new(Self {
            issuer,
            clock,
            keys: Mutex::new(vec![key("k1")]),
            live_refresh: Mutex::new(HashMap::new()),
            serial: AtomicUsize::new(0),
            jwks_up: AtomicBool::new(true),
            id_token_on_refresh: AtomicBool::new(true),
            sub: Mutex::new("user-1".into()),
            roles: Mutex::new(vec!["reader".into()]),
            access_lifetime: AtomicUsize::new(300),
            access_azp: Mutex::new(CLIENT.into()),
            token_down: AtomicBool::new(false),
            discovery_issuer: Mutex::new(None),
            announces_response_iss: AtomicBool::new(false),
            token_calls: AtomicUsize::new(0),
            refreshes: AtomicUsize::new(0),
            revocations: AtomicUsize::new(0),
            jwks_hits: AtomicUsize::new(0),
        });
        let app = axum::Router::new()
            .route("/realms/stub/.well-known/openid-configuration", get(discovery))
            .route("/realms/stub/jwks", get(jwks))
            .route("/realms/stub/token", post(token))
            .route("/realms/stub/revoke", post(revoke))
            .with_state(p.clone());
        tokio::spawn(async move { axum::serve(l, app).await });
        p
    }

    /// The provider starts signing with a new key (published in the JWKS, if it is up).
    pub fn rotate_key(&self, kid: &str) {
        self.keys.lock().unwrap().push(key(kid));
    }

    /// A back-channel logout token for the stub session, signed with the current key.
    pub fn logout_token(&self, jti: &str) -> String {
        let now = self.clock.now();
        let keys = self.keys.lock().unwrap();
        let k = keys.last().unwrap();
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some(k.kid.clone());
        h.typ = Some("logout+jwt".into());
        let claims = json!({"iss": self.issuer, "aud": CLIENT, "iat": now, "exp": now + 120, "jti": jti,
            "sid": "stub-sid", "sub": *self.sub.lock().unwrap(),
            "events": {"http://schemas.openid.net/event/backchannel-logout": {}}});
        jsonwebtoken::encode(&h, &claims, &k.enc).unwrap()
    }

    /// Tokens as a login would return them (the refresh token is live).
    pub fn login_tokens(&self) -> crate::oidc::TokenResponse {
        self.issue(true)
    }

    fn issue(&self, with_id_token: bool) -> crate::oidc::TokenResponse {
        let now = self.clock.now();
        let n = self.serial.fetch_add(1, Ordering::SeqCst);
        let sub = self.sub.lock().unwrap().clone();
        let lifetime = self.access_lifetime.load(Ordering::SeqCst) as i64;
        let keys = self.keys.lock().unwrap();
        let k = keys.last().unwrap();
        let access = sign(
            k,
            &json!({"iss": self.issuer, "aud": "account", "azp": *self.access_azp.lock().unwrap(), "sub": sub, "typ": "Bearer",
                "iat": now, "exp": now + lifetime, "jti": format!("at-{n}"),
                "realm_access": {"roles": *self.roles.lock().unwrap()}}),
        );
        let id = sign(
            k,
            &json!({"iss": self.issuer, "aud": CLIENT, "azp": CLIENT, "sub": sub, "typ": "ID",
                "iat": now, "exp": now + lifetime, "sid": "stub-sid", "email": "user@example.com"}),
        );
        let refresh = format!("rt-{n}");
        self.live_refresh.lock().unwrap().insert(refresh.clone(), ());
        crate::oidc::TokenResponse {
            access_token: access,
            token_type: "Bearer".into(),
            expires_in: Some(lifetime),
            refresh_token: Some(refresh),
            refresh_expires_in: Some(1800),
            id_token: with_id_token.then_some(id),
        }
    }
}

async fn discovery(State(p): State<Arc<Provider>>) -> Response {
    let base = &p.issuer;
    let issuer = p.discovery_issuer.lock().unwrap().clone().unwrap_or_else(|| base.clone());
    axum::Json(json!({
        "issuer": issuer,
        "authorization_endpoint": format!("{base}/auth"),
        "token_endpoint": format!("{base}/token"),
        "jwks_uri": format!("{base}/jwks"),
        "revocation_endpoint": format!("{base}/revoke"),
        "authorization_response_iss_parameter_supported": p.announces_response_iss.load(Ordering::SeqCst),
    }))
    .into_response()
}

async fn jwks(State(p): State<Arc<Provider>>) -> Response {
    p.jwks_hits.fetch_add(1, Ordering::SeqCst);
    if !p.jwks_up.load(Ordering::SeqCst) {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let keys: Vec<Value> = p.keys.lock().unwrap().iter().map(|k| k.jwk.clone()).collect();
    axum::Json(json!({ "keys": keys })).into_response()
}

async fn token(State(p): State<Arc<Provider>>, Form(form): Form<HashMap<String, String>>) -> Response {
    p.token_calls.fetch_add(1, Ordering::SeqCst);
    if p.token_down.load(Ordering::SeqCst) {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let presented = form.get("refresh_token").cloned().unwrap_or_default();
    if form.get("grant_type").map(String::as_str) != Some("refresh_token")
        || p.live_refresh.lock().unwrap().remove(&presented).is_none()
    {
        return (StatusCode::BAD_REQUEST, axum::Json(json!({"error": "invalid_grant"}))).into_response();
    }
    p.refreshes.fetch_add(1, Ordering::SeqCst);
    let t = p.issue(p.id_token_on_refresh.load(Ordering::SeqCst));
    let mut body = json!({
        "access_token": t.access_token, "token_type": "Bearer", "expires_in": t.expires_in,
        "refresh_token": t.refresh_token, "refresh_expires_in": t.refresh_expires_in,
    });
    if let Some(id) = t.id_token {
        body["id_token"] = Value::String(id);
    }
    axum::Json(body).into_response()
}

async fn revoke(State(p): State<Arc<Provider>>, Form(form): Form<HashMap<String, String>>) -> StatusCode {
    if let Some(t) = form.get("token") {
        p.live_refresh.lock().unwrap().remove(t);
    }
    p.revocations.fetch_add(1, Ordering::SeqCst);
    StatusCode::OK
}
