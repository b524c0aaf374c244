//! Token-validation edge cases a real Keycloak cannot produce, against an in-process stub
//! (keys generated here, a tiny JWKS server on loopback). The real-Keycloak suite covers the rest.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use super::Http;
use super::id_token::{self, Expectations, TokenKind};
use super::jwks::{JwksCache, KeySource};
use crate::clock::ManualClock;

const ISS: &str = "https://idp.test/realms/r";
const CLIENT: &str = "gatehouse";
const NOW: i64 = 1_800_000_000;

use super::stub::{TestKey, key, sign};

fn claims() -> Value {
    json!({"iss": ISS, "aud": CLIENT, "azp": CLIENT, "sub": "user-1", "iat": NOW - 5, "exp": NOW + 300, "nonce": "n-1", "typ": "ID"})
}

fn expect(kind: TokenKind) -> Expectations<'static> {
    Expectations {
        issuer: ISS,
        client_id: CLIENT,
        trusted_audiences: &[],
        algorithms: &[Algorithm::ES256, Algorithm::RS256],
        kind,
        nonce: if kind == TokenKind::Id { Some("n-1") } else { None },
        access_token: None,
        now: NOW,
    }
}

/// Validate against a JWKS holding `keys`.
fn check(token: &str, keys: &[&TestKey], exp: &Expectations<'_>) -> Result<(), &'static str> {
    let set = json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()});
    let peeked = id_token::peek(token, exp).map_err(reason)?;
    let key = super::jwks::test_pick(&set, peeked.kid.as_deref()).ok_or("no key")?;
    id_token::verify(token, &peeked, &key, exp).map(|_| ()).map_err(reason)
}

fn reason(e: super::OidcError) -> &'static str {
    match e {
        super::OidcError::InvalidToken(r) => r,
        _ => "other",
    }
}

/// `base` with `patch`'s fields set, and those patched to `null` removed.
fn patched(base: &Value, patch: &Value) -> Value {
    let mut c = base.clone();
    for (name, v) in patch.as_object().unwrap() {
        if v.is_null() {
            c.as_object_mut().unwrap().remove(name);
        } else {
            c[name] = v.clone();
        }
    }
    c
}

#[test]
fn a_good_token_passes() {
    let k = key("k1");
    assert_eq!(check(&sign(&k, &claims()), &[&k], &expect(TokenKind::Id)), Ok(()));
}

#[test]
fn each_claim_rule_rejects() {
    let k = key("k1");
    let e = expect(TokenKind::Id);
    let cases: Vec<(&str, Value)> = vec![
        ("wrong iss", json!({"iss": "https://evil/realms/r"})),
        ("iss with trailing slash", json!({"iss": format!("{ISS}/")})),
        ("wrong aud", json!({"aud": "someone-else"})),
        ("untrusted extra aud", json!({"aud": [CLIENT, "other-api"]})),
        ("azp not us", json!({"azp": "other"})),
        ("expired", json!({"exp": NOW - 61})),
        ("iat in future", json!({"iat": NOW + 61})),
        ("nbf in future", json!({"nbf": NOW + 120})),
        ("no exp", json!({"exp": null})),
        ("no iat", json!({"iat": null})),
        ("wrong nonce", json!({"nonce": "n-2"})),
        ("no nonce", json!({"nonce": null})),
        ("empty sub", json!({"sub": ""})),
        ("access token as id token", json!({"typ": "Bearer"})),
        ("refresh token as id token", json!({"typ": "Refresh"})),
    ];
    for (what, patch) in cases {
        assert!(check(&sign(&k, &patched(&claims(), &patch)), &[&k], &e).is_err(), "{what} must be rejected");
    }
    // Within the 60 s skew is fine.
    let mut c = claims();
    c["exp"] = json!(NOW - 30);
    assert!(check(&sign(&k, &c), &[&k], &e).is_ok());
}

#[test]
fn a_trusted_extra_audience_is_accepted_only_when_configured() {
    let k = key("k1");
    let mut c = claims();
    c["aud"] = json!([CLIENT, "notes-api"]);
    let trusted = vec!["notes-api".to_string()];
    let mut e = expect(TokenKind::Id);
    assert!(check(&sign(&k, &c), &[&k], &e).is_err());
    e.trusted_audiences = &trusted;
    assert!(check(&sign(&k, &c), &[&k], &e).is_ok());
}

#[test]
fn bad_signature_and_foreign_key_are_rejected() {
    let (k, other) = (key("k1"), key("k1"));
    let token = sign(&other, &claims()); // same kid, different key
    assert_eq!(check(&token, &[&k], &expect(TokenKind::Id)), Err("signature does not verify"));
    let mut parts: Vec<String> = sign(&k, &claims()).split('.').map(String::from).collect();
    let mut body: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(&parts[1]).unwrap()).unwrap();
    body["sub"] = json!("admin");
    parts[1] = URL_SAFE_NO_PAD.encode(body.to_string());
    assert_eq!(check(&parts.join("."), &[&k], &expect(TokenKind::Id)), Err("signature does not verify"));
}

/// Logs name the real reason: a token whose parts are not even well-formed is "malformed", not a
/// signature failure that would send an operator hunting for a key problem.
#[test]
fn malformed_tokens_are_reported_as_malformed_not_as_bad_signatures() {
    let k = key("k1");
    let good = sign(&k, &claims());
    let parts: Vec<&str> = good.split('.').collect();
    for bad in [
        format!("{}.{}.{}", parts[0], "!!not-base64!!", parts[2]),
        format!("{}.{}.{}", parts[0], URL_SAFE_NO_PAD.encode(b"not json"), parts[2]),
        format!("{}.{}.{}", parts[0], parts[1], "!!"),
    ] {
        assert_eq!(check(&bad, &[&k], &expect(TokenKind::Id)), Err("malformed token"), "{bad}");
    }
}

#[test]
fn alg_none_and_hmac_with_the_public_key_are_rejected() {
    let k = key("k1");
    let e = expect(TokenKind::Id);
    let none_header = URL_SAFE_NO_PAD.encode(json!({"alg": "none", "kid": "k1"}).to_string());
    let body = URL_SAFE_NO_PAD.encode(claims().to_string());
    assert!(check(&format!("{none_header}.{body}."), &[&k], &e).is_err());
    // The classic confusion: HS256 keyed with the provider's public key material.
    let mut h = Header::new(Algorithm::HS256);
    h.kid = Some("k1".into());
    let hs =
        jsonwebtoken::encode(&h, &claims(), &EncodingKey::from_secret(k.jwk.to_string().as_bytes()).unwrap()).unwrap();
    assert_eq!(check(&hs, &[&k], &e), Err("signature algorithm not allowed"));
}

#[test]
fn header_kinds_and_sizes() {
    let k = key("k1");
    let mut h = Header::new(Algorithm::ES256);
    h.kid = Some("k1".into());
    h.typ = Some("logout+jwt".into());
    let logout_as_id = jsonwebtoken::encode(&h, &claims(), &k.enc).unwrap();
    assert_eq!(check(&logout_as_id, &[&k], &expect(TokenKind::Id)), Err("token of the wrong kind"));
    let mut c = claims();
    c["pad"] = json!("x".repeat(17 * 1024));
    assert_eq!(check(&sign(&k, &c), &[&k], &expect(TokenKind::Id)), Err("token too large"));
    assert_eq!(check("not-a-jwt", &[&k], &expect(TokenKind::Id)), Err("not a signed JWT"));
    assert!(check("a.b.c", &[&k], &expect(TokenKind::Id)).is_err());
    // Deeply nested JSON is bounded by the size cap and serde's recursion limit: no panic.
    let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
    let mut c = claims();
    c["deep"] = serde_json::from_str::<Value>(
        &"[".repeat(100).to_string().chars().chain("]".repeat(100).chars()).collect::<String>(),
    )
    .unwrap();
    assert!(check(&sign(&k, &c), &[&k], &expect(TokenKind::Id)).is_ok());
    let raw = format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"ES256","kid":"k1"}"#),
        URL_SAFE_NO_PAD.encode(deep),
        "sig"
    );
    assert!(check(&raw, &[&k], &expect(TokenKind::Id)).is_err());
}

#[test]
fn at_hash_is_checked_when_present() {
    let k = key("k1");
    let access = "the-access-token";
    let digest = crate::crypto::sha256(access.as_bytes());
    let mut c = claims();
    c["at_hash"] = json!(URL_SAFE_NO_PAD.encode(&digest[..16]));
    let mut e = expect(TokenKind::Id);
    e.access_token = Some(access);
    assert!(check(&sign(&k, &c), &[&k], &e).is_ok());
    e.access_token = Some("another-access-token");
    assert_eq!(check(&sign(&k, &c), &[&k], &e), Err("at_hash mismatch"));
}

#[test]
fn a_token_without_kid_needs_exactly_one_key() {
    let (a, b) = (key("a"), key("b"));
    let token = jsonwebtoken::encode(&Header::new(Algorithm::ES256), &claims(), &a.enc).unwrap();
    assert!(check(&token, &[&a], &expect(TokenKind::Id)).is_ok());
    assert_eq!(check(&token, &[&a, &b], &expect(TokenKind::Id)), Err("no key"));
}

#[test]
fn logout_tokens_follow_back_channel_rules() {
    let k = key("k1");
    let mut h = Header::new(Algorithm::ES256);
    h.kid = Some("k1".into());
    h.typ = Some("logout+jwt".into());
    let base = json!({"iss": ISS, "aud": CLIENT, "iat": NOW, "exp": NOW + 120, "jti": "j-1", "sid": "s-1",
        "events": {"http://schemas.openid.net/event/backchannel-logout": {}}});
    let ok = jsonwebtoken::encode(&h, &base, &k.enc).unwrap();
    assert_eq!(check(&ok, &[&k], &expect(TokenKind::Logout)), Ok(()));
    for (what, patch) in [
        ("nonce", json!({"nonce": "x"})),
        ("no event", json!({"events": {}})),
        ("no sid/sub", json!({"sid": null})),
        ("no jti", json!({"jti": null})),
    ] {
        let t = jsonwebtoken::encode(&h, &patched(&base, &patch), &k.enc).unwrap();
        assert!(check(&t, &[&k], &expect(TokenKind::Logout)).is_err(), "{what}");
    }
    // An ID token is not a logout token.
    assert!(check(&sign(&k, &claims()), &[&k], &expect(TokenKind::Logout)).is_err());
}

/// A JWKS endpoint on loopback that counts fetches and can rotate its keys.
async fn jwks_server(keys: Arc<ArcSwap<Value>>, hits: Arc<AtomicUsize>) -> String {
    let app = axum::Router::new().route(
        "/jwks",
        axum::routing::get(move || {
            let (keys, hits) = (keys.clone(), hits.clone());
            async move {
                hits.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await; // make concurrent callers overlap
                axum::Json((**keys.load()).clone())
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    format!("http://{addr}/jwks")
}

#[tokio::test]
async fn unknown_kid_refetches_once_single_flight_rate_limited_and_survives_failures() {
    let (k1, k2) = (key("k1"), key("k2"));
    let keys = Arc::new(ArcSwap::from_pointee(json!({"keys": [k1.jwk.clone()]})));
    let hits = Arc::new(AtomicUsize::new(0));
    let uri = jwks_server(keys.clone(), hits.clone()).await;
    let http = Arc::new(Http::new(Duration::from_secs(5)).unwrap());
    let clock = Arc::new(ManualClock::at(1_000_000));
    let floor = Duration::from_secs(1);
    let cache = Arc::new(JwksCache::new(uri, floor, floor, clock.clone()));
    cache.refresh(&http).await.unwrap();
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    assert!(cache.key(&http, Some("k1"), KeySource::TokenEndpoint).await.is_ok());

    // Rotation: k2 appears at the provider. 20 concurrent look-ups of the new kid → one fetch.
    clock.advance(1);
    keys.store(Arc::new(json!({"keys": [k1.jwk.clone(), k2.jwk.clone()]})));
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let (c, h) = (cache.clone(), http.clone());
        tasks.push(tokio::spawn(async move { c.key(&h, Some("k2"), KeySource::TokenEndpoint).await.is_ok() }));
    }
    for t in tasks {
        assert!(t.await.unwrap());
    }
    assert_eq!(hits.load(Ordering::SeqCst), 2, "single flight");

    // A spray of random kids cannot make us hammer the provider: at most one fetch per floor.
    for i in 0..50 {
        assert!(cache.key(&http, Some(&format!("bogus-{i}")), KeySource::Unauthenticated).await.is_err());
    }
    assert!(hits.load(Ordering::SeqCst) <= 3, "rate-limited refetch: {}", hits.load(Ordering::SeqCst));

    // Within the floor nothing more is fetched, however many unknown kids arrive...
    let before = hits.load(Ordering::SeqCst);
    assert!(cache.key(&http, Some("k9"), KeySource::TokenEndpoint).await.is_err());
    assert_eq!(hits.load(Ordering::SeqCst), before, "the trusted floor holds until the clock moves");

    // The provider breaks (no usable keys): we keep the keys we had.
    clock.advance(1);
    keys.store(Arc::new(json!({"nope": true})));
    assert!(cache.key(&http, Some("k3"), KeySource::TokenEndpoint).await.is_err());
    assert!(cache.key(&http, Some("k1"), KeySource::TokenEndpoint).await.is_ok(), "old keys survive a failed fetch");
    assert!(cache.key(&http, Some("k2"), KeySource::TokenEndpoint).await.is_ok());
}

#[test]
fn encryption_and_symmetric_keys_in_the_jwks_are_ignored() {
    let k = key("sig");
    let set = json!({"keys": [
        {"kty": "RSA", "use": "enc", "alg": "RSA-OAEP", "kid": "enc", "n": "sXch", "e": "AQAB"},
        {"kty": "oct", "alg": "HS256", "kid": "hmac", "k": "c2VjcmV0"},
        k.jwk,
    ]});
    assert!(super::jwks::test_pick(&set, Some("enc")).is_none());
    assert!(super::jwks::test_pick(&set, Some("hmac")).is_none());
    assert!(super::jwks::test_pick(&set, Some("sig")).is_some());
    assert!(super::jwks::test_pick(&set, None).is_some(), "exactly one signing key: kid-less tokens may use it");
}

/// A forged token with a random `kid` (anyone can post one to the back-channel endpoint) spends
/// only the unauthenticated refetch allowance: a key rotation at the provider right afterwards is
/// still picked up for tokens that came from the token endpoint.
#[tokio::test]
async fn unauthenticated_kid_spray_cannot_block_a_key_rotation() {
    let (k1, k2) = (key("k1"), key("k2"));
    let keys = Arc::new(ArcSwap::from_pointee(json!({"keys": [k1.jwk.clone()]})));
    let hits = Arc::new(AtomicUsize::new(0));
    let uri = jwks_server(keys.clone(), hits.clone()).await;
    let http = Http::new(Duration::from_secs(5)).unwrap();
    // The production floors' order of magnitude: a long one for unauthenticated input.
    let clock = Arc::new(ManualClock::at(1_000_000));
    let cache = JwksCache::new(uri, Duration::from_secs(10), Duration::from_secs(1), clock.clone());
    cache.refresh(&http).await.unwrap();
    clock.advance(1);

    // The forged logout token triggers the one unauthenticated refetch it is allowed...
    assert!(matches!(
        cache.key(&http, Some("forged-kid"), KeySource::Unauthenticated).await,
        Err(super::OidcError::UnknownKey)
    ));
    assert_eq!(hits.load(Ordering::SeqCst), 2);
    // ...and no more.
    assert!(cache.key(&http, Some("forged-kid-2"), KeySource::Unauthenticated).await.is_err());
    assert_eq!(hits.load(Ordering::SeqCst), 2, "unauthenticated refetches are rate-limited");

    // The provider rotates; the first token from the token endpoint with the new kid verifies.
    keys.store(Arc::new(json!({"keys": [k1.jwk.clone(), k2.jwk.clone()]})));
    assert!(cache.key(&http, Some("k2"), KeySource::TokenEndpoint).await.is_ok(), "rotation not blocked");
    assert_eq!(hits.load(Ordering::SeqCst), 3);
}

fn access_claims() -> Value {
    // Keycloak's shape: issued to us (`azp`), for another resource server (`aud`).
    json!({"iss": ISS, "aud": "account", "azp": CLIENT, "sub": "user-1", "iat": NOW - 5, "exp": NOW + 300, "typ": "Bearer"})
}

/// Access tokens (the check face's bearer tokens, refreshed tokens): `azp` must be this client,
/// the `typ` claim and header must say access token, and `aud` is not ours to check.
#[test]
fn access_tokens_must_be_issued_to_this_client_and_be_access_tokens() {
    let k = key("k1");
    let e = expect(TokenKind::Access);
    assert_eq!(check(&sign(&k, &access_claims()), &[&k], &e), Ok(()), "Keycloak's access token");
    let mut no_typ = access_claims();
    no_typ.as_object_mut().unwrap().remove("typ");
    assert_eq!(check(&sign(&k, &no_typ), &[&k], &e), Ok(()), "a provider that sets no typ claim");
    let cases: Vec<(&str, Value, &str)> = vec![
        ("azp of another client", json!({"azp": "other-client"}), "access token not issued to this client"),
        ("no azp", json!({"azp": null}), "access token not issued to this client"),
        ("aud is us but azp is not", json!({"aud": CLIENT, "azp": "other"}), "access token not issued to this client"),
        ("an ID token", json!({"typ": "ID"}), "token of the wrong kind"),
        ("a refresh token", json!({"typ": "Refresh"}), "token of the wrong kind"),
        ("another issuer", json!({"iss": "https://evil/realms/r"}), "issuer mismatch"),
        ("expired", json!({"exp": NOW - 61}), "expired"),
    ];
    for (what, patch, why) in cases {
        assert_eq!(check(&sign(&k, &patched(&access_claims(), &patch)), &[&k], &e), Err(why), "{what}");
    }
    // The JOSE header's `typ`: RFC 9068's `at+jwt` is an access token; a logout token is not.
    for (typ, ok) in [("at+jwt", true), ("JWT", true), ("logout+jwt", false), ("secevent+jwt", false)] {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some("k1".into());
        h.typ = Some(typ.into());
        let t = jsonwebtoken::encode(&h, &access_claims(), &k.enc).unwrap();
        assert_eq!(check(&t, &[&k], &e).is_ok(), ok, "header typ {typ}");
    }
    // An access token is not an ID token: no audience of ours, and `at+jwt` is refused there.
    assert_eq!(
        check(&sign(&k, &access_claims()), &[&k], &expect(TokenKind::Id)),
        Err("audience does not include this client")
    );
}

/// Back-channel logout tokens naming only the user (`sub`, no `sid`) are valid (OpenID
/// Back-Channel Logout §2.4); one without the `logout+jwt` header type is not a logout token.
#[test]
fn logout_tokens_may_name_only_the_user_but_must_say_what_they_are() {
    let k = key("k1");
    let base = json!({"iss": ISS, "aud": CLIENT, "iat": NOW, "exp": NOW + 120, "jti": "j-1", "sub": "user-1",
        "events": {"http://schemas.openid.net/event/backchannel-logout": {}}});
    let mut h = Header::new(Algorithm::ES256);
    h.kid = Some("k1".into());
    h.typ = Some("logout+jwt".into());
    let sub_only = jsonwebtoken::encode(&h, &base, &k.enc).unwrap();
    assert_eq!(check(&sub_only, &[&k], &expect(TokenKind::Logout)), Ok(()));
    let mut empty_sub = base.clone();
    empty_sub["sub"] = json!("");
    let t = jsonwebtoken::encode(&h, &empty_sub, &k.enc).unwrap();
    assert_eq!(check(&t, &[&k], &expect(TokenKind::Logout)), Err("sid or sub required"));
    for typ in [None, Some("JWT"), Some("at+jwt")] {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some("k1".into());
        h.typ = typ.map(Into::into);
        let t = jsonwebtoken::encode(&h, &base, &k.enc).unwrap();
        assert_eq!(check(&t, &[&k], &expect(TokenKind::Logout)), Err("token of the wrong kind"), "header typ {typ:?}");
    }
}

fn stub_client(p: &super::stub::Provider) -> super::OidcClient {
    super::OidcClient::new(
        super::OidcSettings {
            issuer: p.issuer.clone(),
            client_id: super::stub::CLIENT.into(),
            client_secret: secrecy::SecretString::from("x".to_string()),
            scopes: vec!["openid".into()],
            algorithms: vec![Algorithm::ES256],
            trusted_audiences: vec![],
            redirect_uri: "http://localhost/auth/callback".into(),
            http_timeout: Duration::from_secs(2),
        },
        Arc::new(crate::clock::SystemClock::default()),
    )
    .unwrap()
}

/// SECURITY 12: a discovery document naming another issuer (a misconfigured or impersonating
/// provider) is not loaded — the replica stays unready and logs in nobody — until it matches.
#[tokio::test]
async fn discovery_naming_another_issuer_is_refused_until_it_matches() {
    let p = super::stub::Provider::start(Arc::new(crate::clock::SystemClock::default())).await;
    let client = stub_client(&p);
    for other in [format!("{}/", p.issuer), "https://evil.example/realms/stub".to_string()] {
        *p.discovery_issuer.lock().unwrap() = Some(other.clone());
        let err = client.discover().await.expect_err(&other);
        assert!(
            matches!(&err, super::OidcError::Provider(m) if m.contains("differs from the configured")),
            "{other}: {err:?}"
        );
        assert!(!client.is_ready(), "{other}: metadata must not be loaded");
        assert!(client.authorization_url("s", "n", "v").await.is_err(), "{other}: no login starts");
    }
    *p.discovery_issuer.lock().unwrap() = None;
    client.discover().await.expect("the matching issuer loads");
    assert!(client.is_ready());
}

/// SECURITY 12 (RFC 9207): the authorization response's `iss` must be ours when present, and must
/// be present when the provider announces it — a mix-up attack answers with another issuer's code.
#[tokio::test]
async fn the_authorization_response_issuer_is_checked() {
    let p = super::stub::Provider::start(Arc::new(crate::clock::SystemClock::default())).await;
    let quiet = stub_client(&p);
    assert!(quiet.check_response_issuer(Some(&p.issuer)).await.is_ok());
    assert!(quiet.check_response_issuer(None).await.is_ok(), "not announced: may be absent");
    assert!(quiet.check_response_issuer(Some("https://evil.example/realms/stub")).await.is_err());
    assert!(quiet.check_response_issuer(Some(&format!("{}/", p.issuer))).await.is_err(), "exact match only");

    p.announces_response_iss.store(true, Ordering::SeqCst);
    let announced = stub_client(&p);
    assert!(announced.check_response_issuer(Some(&p.issuer)).await.is_ok());
    assert!(announced.check_response_issuer(None).await.is_err(), "announced: a missing iss is refused");
    assert!(announced.check_response_issuer(Some("https://evil.example/realms/stub")).await.is_err());
}
