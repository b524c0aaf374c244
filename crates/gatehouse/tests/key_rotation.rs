//! A signing-key rotation at the real Keycloak cannot be blocked by unauthenticated input: a
//! forged back-channel logout token with a random `kid` spends only the unauthenticated JWKS
//! refetch allowance, and the first login after the rotation still verifies. Its own test binary:
//! rotating the realm's key would disturb tests running beside it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may fail loudly

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use gatehouse_testkit::*;
use serde_json::{Value, json};

fn kid_of(jwt: &str) -> String {
    let header = URL_SAFE_NO_PAD.decode(jwt.split('.').next().unwrap()).unwrap();
    serde_json::from_slice::<Value>(&header).unwrap()["kid"].as_str().unwrap().to_string()
}

/// Removes the test's key provider again, even if an assertion fails.
struct RotatedKey(Option<String>);
impl Drop for RotatedKey {
    fn drop(&mut self) {
        if let Some(id) = self.0.take() {
            let _ = std::thread::spawn(move || {
                tokio::runtime::Runtime::new().unwrap().block_on(async {
                    KcAdmin::connect().await.delete(&format!("/components/{id}")).await;
                })
            })
            .join();
        }
    }
}

#[tokio::test]
async fn a_forged_logout_token_cannot_block_a_key_rotation() {
    let work = Workdir::new();
    let gate = Gate::start(&work, &Options::default()).await;
    let before = logged_in(&gate, "alice").await;
    let old_kid = kid_of(session_tokens(&gate, &before).await.1.id_token.as_deref().unwrap());

    // Anyone can post a logout token; this one names a key nobody has.
    let part = |v: Value| URL_SAFE_NO_PAD.encode(v.to_string());
    let forged = format!(
        "{}.{}.{}",
        part(json!({"alg": "RS256", "typ": "logout+jwt", "kid": "forged-random-kid"})),
        part(json!({"iss": issuer(), "aud": "gatehouse", "iat": 1, "exp": 4_000_000_000u64, "jti": "x", "sid": "s",
            "events": {"http://schemas.openid.net/event/backchannel-logout": {}}})),
        URL_SAFE_NO_PAD.encode(b"not a signature"),
    );
    let r = http()
        .post(format!("{}/auth/backchannel-logout", gate.base))
        .form(&[("logout_token", forged.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "forged logout token refused");

    // Keycloak rotates: a new RSA key with the highest priority signs from now on.
    let admin = KcAdmin::connect().await;
    let realm_id = admin.get("").await["id"].as_str().unwrap().to_string();
    let r = admin
        .post(
            "/components",
            &json!({"name": "rotation-test", "providerId": "rsa-generated", "providerType": "org.keycloak.keys.KeyProvider",
                "parentId": realm_id, "config": {"priority": ["1000"], "keySize": ["2048"], "active": ["true"],
                "enabled": ["true"], "algorithm": ["RS256"]}}),
        )
        .await;
    assert_eq!(r.status(), 201, "key provider created");
    let location = r.headers()["location"].to_str().unwrap().to_string();
    let _cleanup = RotatedKey(Some(location.rsplit('/').next().unwrap().to_string()));

    // Within the unauthenticated floor (10 s): the login's tokens carry the new kid and verify.
    let after = logged_in(&gate, "bob").await;
    let new_kid = kid_of(session_tokens(&gate, &after).await.1.id_token.as_deref().unwrap());
    assert_ne!(new_kid, old_kid, "Keycloak signs with the rotated-in key");
    gate.stop().await;
}
