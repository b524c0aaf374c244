//! Keycloak outage (its own test binary, so it never overlaps the main suite): sessions with a
//! valid access token keep working, logins answer a clean 503, readiness stays up once metadata
//! was loaded, and everything recovers when Keycloak is back (with new signing keys, since the
//! restarted test instance starts from a fresh database: this exercises JWKS rotation for real).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may fail loudly

use std::process::Command;
use std::time::Duration;

use gatehouse_testkit::*;
use serde_json::json;

fn keycloak(action: &str) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/keycloak.sh");
    let port = std::env::var("KEYCLOAK_TEST_PORT").unwrap_or_else(|_| "18180".into());
    let mut cmd = Command::new(script);
    cmd.arg(action).arg("test");
    if action == "start" {
        cmd.arg(port);
    }
    let status = cmd.status().expect("run scripts/keycloak.sh");
    assert!(status.success(), "keycloak.sh {action} failed");
}

/// Restarts Keycloak even if an assertion fails, so later suites are not left without it.
struct RestartOnDrop(bool);
impl Drop for RestartOnDrop {
    fn drop(&mut self) {
        if !self.0 {
            keycloak("start");
        }
    }
}

#[tokio::test]
async fn keycloak_down_keeps_valid_sessions_answers_503_and_recovers() {
    let work = Workdir::new();
    let gate = Gate::start(&work, &Options::default()).await;
    let mut alice = Browser::default();
    alice.login(&gate.base, "alice").await;

    keycloak("stop");
    let mut guard = RestartOnDrop(false);

    let me = alice.get(&format!("{}/auth/me", gate.base)).await;
    assert_eq!(me.status, 200, "a session with a valid access token needs no Keycloak");
    let mut b = Browser::default();
    let r = b.post_json(&gate.base, "/auth/login", &json!({"username": "bob", "password": "bob-password"})).await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.json()["error"], "idp_unavailable");
    assert!(r.json()["message"].as_str().unwrap().contains("identity provider is unavailable"));
    assert!(r.header("retry-after").is_some());
    assert_eq!(
        http().get(format!("{}/readyz", gate.base)).send().await.unwrap().status(),
        200,
        "metadata was loaded once: stay ready"
    );

    // A replica started during the outage is alive but not ready.
    let work2 = Workdir::new();
    let clock = std::sync::Arc::new(gatehouse::clock::SystemClock::default());
    let cold = gatehouse::start(work2.config(&Options::default()), clock).await.expect("starts without Keycloak");
    let cold_base = format!("http://localhost:{}", cold.public_addr.port());
    assert_eq!(http().get(format!("{cold_base}/healthz")).send().await.unwrap().status(), 200);
    let ready = http().get(format!("{cold_base}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let body: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(body["identity_provider"], "metadata not loaded");

    keycloak("start");
    guard.0 = true;

    // Recovery without restarting Gatehouse: password and code-flow logins work again.
    let r = b.post_json(&gate.base, "/auth/login", &json!({"username": "bob", "password": "bob-password"})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let mut carol = Browser::default();
    carol.login(&gate.base, "alice").await;
    assert_eq!(carol.get(&format!("{}/auth/me", gate.base)).await.status, 200);
    assert_eq!(alice.get(&format!("{}/auth/me", gate.base)).await.status, 200, "the old session survived the outage");
    // The cold replica becomes ready by itself (discovery retries with backoff, at most 30 s apart).
    let mut ok = false;
    for _ in 0..70 {
        if http().get(format!("{cold_base}/readyz")).send().await.unwrap().status() == 200 {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(ok, "replica started during the outage became ready");
    cold.shutdown().await;
    gate.stop().await;
}
