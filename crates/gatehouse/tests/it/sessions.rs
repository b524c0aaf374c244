//! Session lifecycle against the real Keycloak: logout, restarts, `kill -9`, expiry, refresh.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::bin;
use gatehouse::pki::San;

use crate::harness::*;

#[tokio::test]
async fn logout_deletes_session_revokes_refresh_token_and_clears_cookie() {
    let work = Workdir::new();
    let gate = Gate::start(&work, &Options::default()).await;
    let mut b = Browser::default();
    b.login(&gate.base, "alice").await;
    let old = b.cookie(&gate.base, COOKIE).unwrap();
    let (_, tokens) = session_tokens(&gate, &old).await;
    let refresh = tokens.refresh_token.clone().unwrap();

    // Logout without CSRF proof is refused and changes nothing.
    let r = http()
        .post(format!("{}/auth/logout", gate.base))
        .header("cookie", format!("{COOKIE}={old}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(b.get(&format!("{}/auth/me", gate.base)).await.status, 200);

    let r = b.post(&gate.base, "/auth/logout").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("clear-site-data").as_deref(), Some("\"cookies\""));
    assert_eq!(r.header("cache-control").as_deref(), Some("no-store"));
    assert!(r.set_cookies.iter().any(|c| c.starts_with(&format!("{COOKIE}=;")) && c.contains("Max-Age=0")));
    let url = r.json()["logout_url"].as_str().unwrap().to_string();
    assert!(url.starts_with(&format!("{}/protocol/openid-connect/logout?", issuer())), "{url}");
    assert!(url.contains("post_logout_redirect_uri="));
    assert!(!looks_like_jwt(&r.body), "no token in the logout answer");

    // Replaying the old cookie: 401, same as an unknown id.
    let replay =
        http().get(format!("{}/auth/me", gate.base)).header("cookie", format!("{COOKIE}={old}")).send().await.unwrap();
    assert_eq!(replay.status(), 401);
    assert!(
        gate.core()
            .exchange
            .store()
            .get(&gatehouse::session::SessionId::parse(&old).unwrap().key())
            .await
            .unwrap()
            .is_none()
    );
    // The refresh token is dead at Keycloak.
    let (status, body) = refresh_at_keycloak("gatehouse", "gatehouse-dev-secret", &refresh).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"], "invalid_grant");
    gate.stop().await;
}

#[tokio::test]
async fn tokens_are_encrypted_at_rest_and_the_store_never_sees_the_id() {
    let work = Workdir::new();
    let gate = Gate::start(&work, &Options::default()).await;
    let mut b = Browser::default();
    b.login(&gate.base, "bob").await;
    let id = b.cookie(&gate.base, COOKIE).unwrap();
    let (_, tokens) = session_tokens(&gate, &id).await;
    gate.stop().await;
    let raw = std::fs::read(work.dir.path().join("sessions.redb")).unwrap();
    let has = |needle: &str| raw.windows(needle.len()).any(|w| w == needle.as_bytes());
    assert!(!has(&id), "raw session id in the store file");
    assert!(!has(&tokens.access_token[..40]), "access token in clear in the store file");
    assert!(!has(&tokens.refresh_token.as_ref().unwrap()[..40]), "refresh token in clear");
    assert!(has("bob@example.com"), "claims are stored (sanity check that we read the right file)");
}

#[tokio::test]
async fn sessions_survive_a_restart() {
    let work = Workdir::new();
    let gate = Gate::start(&work, &Options::default()).await;
    let mut b = Browser::default();
    b.login(&gate.base, "bob").await;
    gate.stop().await;
    let gate = Gate::start(&work, &Options::default()).await;
    let me = b.get(&format!("{}/auth/me", gate.base)).await;
    assert_eq!(me.status, 200);
    assert_eq!(me.json()["preferred_username"], "bob");
    gate.stop().await;
}

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn spawn(config: &std::path::Path, base: &str) -> Proc {
    let child = Command::new(bin())
        .args(["serve", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let p = Proc(child);
    for _ in 0..300 {
        if let Ok(r) = http().get(format!("{base}/readyz")).send().await
            && r.status() == 200
        {
            return p;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("gatehouse process did not become ready");
}

#[tokio::test]
async fn sessions_survive_kill_9() {
    let work = Workdir::new();
    let config = work.write_config(&Options::default());
    let base = format!("http://localhost:{}", work.port);
    let mut p = spawn(&config, &base).await;
    let mut b = Browser::default();
    b.login(&base, "alice").await;
    // SIGKILL: no graceful shutdown, no flush.
    p.0.kill().unwrap();
    p.0.wait().unwrap();
    let _p = spawn(&config, &base).await;
    let me = b.get(&format!("{base}/auth/me")).await;
    assert_eq!(me.status, 200, "session lost after kill -9");
    assert_eq!(me.json()["preferred_username"], "alice");
}

#[tokio::test]
async fn idle_expiry_is_enforced_server_side_and_removes_the_record() {
    let work = Workdir::new();
    let gate = Gate::start(&work, &Options::default()).await;
    let me = format!("{}/auth/me", gate.base);
    let mut b = Browser::default();
    b.login(&gate.base, "bob").await;
    gate.clock.advance(31 * 60);
    assert_eq!(b.get(&me).await.status, 401, "idle timeout (30m)");
    gate.clock.advance(-31 * 60);
    assert_eq!(b.get(&me).await.status, 401, "an expired session is gone, not merely hidden");
    gate.stop().await;
}

#[tokio::test]
async fn an_expired_access_token_is_refreshed_exactly_once_under_20_concurrent_requests() {
    let work = Workdir::new();
    let o = Options::short_tokens(); // 10 s access tokens, 2 s skew
    let gate = Gate::start(&work, &o).await;
    let mut b = Browser::default();
    b.login(&gate.base, "alice").await;
    let id = b.cookie(&gate.base, COOKIE).unwrap();
    let (before, old_tokens) = session_tokens(&gate, &id).await;
    let sid = before.provider_sid.clone().expect("Keycloak sid recorded");
    let admin = KcAdmin::connect().await;
    assert_eq!(admin.refresh_events(&sid).await, 0);

    tokio::time::sleep(Duration::from_secs(11)).await; // the access token is now really expired
    let mut handles = Vec::new();
    for _ in 0..20 {
        let (url, cookie) = (format!("{}/auth/me", gate.base), format!("{COOKIE}={id}"));
        handles.push(tokio::spawn(async move {
            http().get(url).header("cookie", cookie).send().await.unwrap().status().as_u16()
        }));
    }
    for h in handles {
        assert_eq!(h.await.unwrap(), 200, "no request fails during the refresh");
    }
    assert_eq!(admin.refresh_events(&sid).await, 1, "exactly one refresh at Keycloak");
    assert_eq!(gate.metric("gatehouse_token_refreshes_total{outcome=\"ok\"}").await, 1.0);
    let (after, new_tokens) = session_tokens(&gate, &id).await;
    assert_ne!(new_tokens.access_token, old_tokens.access_token);
    assert_ne!(new_tokens.refresh_token, old_tokens.refresh_token, "rotated refresh token persisted");
    assert!(after.access_expires_at > before.access_expires_at);
    assert_eq!(after.absolute_expires_at, before.absolute_expires_at, "refresh never extends the absolute lifetime");
    // The old refresh token was rotated away (revokeRefreshToken): only the stored one works.
    let (status, _) = refresh_at_keycloak(
        "gatehouse-short",
        "gatehouse-short-dev-secret",
        old_tokens.refresh_token.as_ref().unwrap(),
    )
    .await;
    assert_eq!(status, 400);
    gate.stop().await;
}

/// 20 concurrent `/auth/me` calls, each answered 200.
async fn burst_of_me(gate: &Gate, id: &str) {
    let mut handles = Vec::new();
    for _ in 0..20 {
        let (url, cookie) = (format!("{}/auth/me", gate.base), format!("{COOKIE}={id}"));
        handles.push(tokio::spawn(async move {
            http().get(url).header("cookie", cookie).send().await.unwrap().status().as_u16()
        }));
    }
    for h in handles {
        assert_eq!(h.await.unwrap(), 200);
    }
}

/// A Keycloak client whose access tokens live 10 s, with the default 30 s refresh skew: the skew
/// is bounded by half the token's lifetime, so a fresh token is not "about to expire" and there
/// is exactly one refresh per token lifetime, not one per request.
#[tokio::test]
async fn access_tokens_shorter_than_the_skew_are_refreshed_once_per_lifetime() {
    let work = Workdir::new();
    let gate = Gate::start(&work, &Options { refresh_skew: "30s", ..Options::short_tokens() }).await;
    let mut b = Browser::default();
    b.login(&gate.base, "alice").await;
    let id = b.cookie(&gate.base, COOKIE).unwrap();
    let sid = session_tokens(&gate, &id).await.0.provider_sid.expect("Keycloak sid recorded");
    let admin = KcAdmin::connect().await;
    burst_of_me(&gate, &id).await;
    assert_eq!(admin.refresh_events(&sid).await, 0, "no refresh right after login");
    tokio::time::sleep(Duration::from_secs(6)).await; // past half of the 10 s lifetime
    burst_of_me(&gate, &id).await;
    burst_of_me(&gate, &id).await;
    assert_eq!(admin.refresh_events(&sid).await, 1, "exactly one refresh for the token's lifetime");
    gate.stop().await;
}

#[tokio::test]
async fn refresh_invalid_grant_ends_the_session() {
    let work = Workdir::new();
    let gate = Gate::start(&work, &Options::short_tokens()).await;
    let mut b = Browser::default();
    b.login(&gate.base, "bob").await;
    let id = b.cookie(&gate.base, COOKIE).unwrap();
    let (_, tokens) = session_tokens(&gate, &id).await;
    // Kill the Keycloak session behind Gatehouse's back: the next refresh gets invalid_grant.
    let r = http()
        .post(format!("{}/protocol/openid-connect/revoke", issuer()))
        .basic_auth("gatehouse-short", Some("gatehouse-short-dev-secret"))
        .form(&[("token", tokens.refresh_token.as_deref().unwrap()), ("token_type_hint", "refresh_token")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    tokio::time::sleep(Duration::from_secs(9)).await;
    assert_eq!(b.get(&format!("{}/auth/me", gate.base)).await.status, 401);
    assert!(
        gate.core()
            .exchange
            .store()
            .get(&gatehouse::session::SessionId::parse(&id).unwrap().key())
            .await
            .unwrap()
            .is_none(),
        "record gone"
    );
    gate.stop().await;
}

#[tokio::test]
async fn check_config_accepts_a_good_file_and_names_the_key_of_a_bad_one() {
    let work = Workdir::new();
    let good = work.write_config(&Options::default());
    let out = tokio::process::Command::new(bin()).args(["check-config", "--config"]).arg(&good).output().await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("configuration is valid"));
    let text = std::fs::read_to_string(&good).unwrap();
    for (broken, key) in [
        (text.replace("[session]\n", "[session]\nidle_timeout = \"soon\"\n"), "idle_timeout"),
        (text.replace("[session]\n", "[session]\nstore = \"redis\"\n"), "session.redis_url"),
        (text.replace("[admin]\n", "[admin]\nlisen = 1\n"), "lisen"),
        (text.replace("http://localhost:", "http://example.com:"), "public.external_url"),
    ] {
        std::fs::write(&good, broken).unwrap();
        let out =
            tokio::process::Command::new(bin()).args(["check-config", "--config"]).arg(&good).output().await.unwrap();
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key), "expected `{key}` in: {err}");
        assert!(!err.contains("gatehouse-dev-secret") && !err.contains(&work.key), "no secret in the error");
    }
}

/// Issue 14 (the refresh stall): 20 concurrent exchanges of a session whose access token is due,
/// in one process. Exactly one refresh at Keycloak, every waiter answers with the new token, and
/// the waiters are released the moment the refresher has stored it: the last answer comes within
/// 100 ms of the first. (Before, each waiter queued for the session's lock and took the Redis
/// refresh lock in turn, polling it every 25 ms: the spread was hundreds of milliseconds.)
async fn waiters_are_released_with_the_refreshed_token(redis: Option<&Redis>) {
    let work = Workdir::new();
    let o = Options {
        internal_allow: Some(vec![POCKETBASE.into()]),
        redis_url: redis.map(Redis::url),
        ..Options::short_tokens()
    };
    let gate = Gate::start(&work, &o).await;
    let id = logged_in(&gate, "alice").await;
    let (before, old) = session_tokens(&gate, &id).await;
    let admin = KcAdmin::connect().await;
    let ca = work.ca();
    let client = mtls_client(&ca.cert_pem, Some(&client_cert(&ca, vec![San::Uri(POCKETBASE.into())])));
    // Warm the client's connection pool, so the measured burst is not spread by TLS handshakes.
    refresh_burst(&vec![gate.internal(); 20], &client, &id).await;
    gate.clock.advance(9); // the 10 s access token is inside the 2 s skew: due for a refresh
    const LOCK_ROUNDS: &str = "gatehouse_session_store_operation_duration_seconds_count{operation=\"lock_refresh\"";
    let before_rounds = gate.metric(LOCK_ROUNDS).await;
    let answers = refresh_burst(&vec![gate.internal(); 20], &client, &id).await;
    let rounds = gate.metric(LOCK_ROUNDS).await - before_rounds;
    assert_eq!(rounds, 1.0, "only the refresher takes the store's refresh lock");
    let (_, new) = session_tokens(&gate, &id).await;
    assert_ne!(new.access_token, old.access_token, "refreshed");
    for (status, token, _) in &answers {
        assert_eq!(*status, 200);
        assert_eq!(*token, new.access_token, "every waiter answers with the stored new token");
    }
    assert_eq!(admin.refresh_events(before.provider_sid.as_deref().unwrap()).await, 1, "exactly one refresh");
    let spread = release_spread(&answers);
    eprintln!("refresh release spread: {spread:?}");
    assert!(spread < Duration::from_millis(100), "waiters released {spread:?} after the first answer");
    assert!(gate.metric("gatehouse_token_refresh_lock_waits_total").await >= 1.0, "there were waiters");
    gate.stop().await;
}

#[tokio::test]
async fn refresh_waiters_are_released_at_once_on_the_embedded_store() {
    waiters_are_released_with_the_refreshed_token(None).await;
}

#[tokio::test]
async fn refresh_waiters_are_released_at_once_on_redis() {
    let redis = Redis::start().await;
    waiters_are_released_with_the_refreshed_token(Some(&redis)).await;
}
