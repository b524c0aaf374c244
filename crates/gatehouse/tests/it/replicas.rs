//! Several replicas sharing one real Redis: shared logins, one refresh across replicas,
//! back-channel logout from the real Keycloak, admin revocation, and Redis faults.

use std::time::Duration;

use gatehouse::pki::San;
use serde_json::{Value, json};

use crate::bin;
use crate::harness::*;

#[tokio::test]
async fn a_login_started_on_one_replica_finishes_on_another_and_the_session_is_shared() {
    let redis = Redis::start().await;
    let (_wa, a, _wb, b) = replica_pair(&redis, Options::default()).await;
    let mut browser = Browser::default();
    let start = browser.get(&format!("{}/auth/login?return_to=/x", a.base)).await;
    let page = browser.get(&start.location()).await;
    let posted = browser
        .send(
            http().post(form_action(&page.body)).form(&[
                ("username", "bob"),
                ("password", "bob-password"),
                ("credentialId", ""),
            ]),
            &start.location(),
        )
        .await;
    let callback = posted.location(); // points at replica A's advertised URL
    let on_b = callback.replacen(&a.base, &b.base, 1);
    let a_cookies = browser.jar.get(a.base.trim_start_matches("http://")).cloned().unwrap();
    browser.jar.insert(b.base.trim_start_matches("http://").to_string(), a_cookies);
    let r = browser.get(&on_b).await;
    assert_eq!(r.status, 303, "replica B finishes replica A's login: {}", r.body);
    let sid = browser.cookie(&b.base, COOKIE).unwrap();
    for gate in [&a, &b] {
        let me = http()
            .get(format!("{}/auth/me", gate.base))
            .header("cookie", format!("{COOKIE}={sid}"))
            .send()
            .await
            .unwrap();
        assert_eq!(me.status(), 200);
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn fifty_requests_over_two_replicas_refresh_once_and_lose_nothing() {
    let redis = Redis::start().await;
    let base = Options { internal_allow: Some(vec![POCKETBASE.into()]), ..Options::short_tokens() };
    let (wa, a, _wb, b) = replica_pair(&redis, base).await;
    let sid = logged_in(&a, "alice").await;
    let (rec, _) = session_tokens(&a, &sid).await;
    let admin = KcAdmin::connect().await;
    let ca = wa.ca();
    let client = mtls_client(&ca.cert_pem, Some(&client_cert(&ca, vec![San::Uri(POCKETBASE.into())])));
    tokio::time::sleep(Duration::from_secs(11)).await;
    let mut tasks = Vec::new();
    for i in 0..50 {
        let gate = if i % 2 == 0 { &a } else { &b };
        let (public, internal, sid, client) = (gate.base.clone(), gate.internal(), sid.clone(), client.clone());
        tasks.push(tokio::spawn(async move {
            if i % 4 < 2 {
                http()
                    .get(format!("{public}/auth/me"))
                    .header("cookie", format!("{COOKIE}={sid}"))
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16()
            } else {
                client
                    .post(format!("{internal}/internal/v1/session/exchange"))
                    .json(&json!({"session_id": sid}))
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16()
            }
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200, "no request fails, no session lost");
    }
    assert_eq!(
        admin.refresh_events(rec.provider_sid.as_deref().unwrap()).await,
        1,
        "exactly one refresh at Keycloak across replicas"
    );
    a.stop().await;
    b.stop().await;
}

/// Issue 14 (the refresh stall) across replicas: a burst split over two replicas on one Redis.
/// One replica refreshes; on the other, one request waits on the Redis refresh lock and is woken
/// by its release message, and that replica's other requests wait on it in process: exactly one
/// refresh, every answer has the new token, the last answer comes within 100 ms of the first, and
/// the Redis lock is taken once per replica — not once per request (each with its 25 ms polls),
/// as before.
#[tokio::test]
async fn a_refresh_on_one_replica_releases_the_other_replicas_waiters_at_once() {
    let redis = Redis::start().await;
    let base = Options { internal_allow: Some(vec![POCKETBASE.into()]), ..Options::short_tokens() };
    let (wa, a, _wb, b) = replica_pair(&redis, base).await;
    let sid = logged_in(&a, "alice").await;
    let (rec, old) = session_tokens(&a, &sid).await;
    let admin = KcAdmin::connect().await;
    let ca = wa.ca();
    let client = mtls_client(&ca.cert_pem, Some(&client_cert(&ca, vec![San::Uri(POCKETBASE.into())])));
    let internals: Vec<String> = (0..30).map(|i| if i % 2 == 0 { a.internal() } else { b.internal() }).collect();
    // Warm the client's connection pool, so the measured burst is not spread by TLS handshakes.
    refresh_burst(&internals, &client, &sid).await;
    a.clock.advance(9);
    b.clock.advance(9);
    const LOCK_ROUNDS: &str = "gatehouse_session_store_operation_duration_seconds_count{operation=\"lock_refresh\"";
    let before = a.metric(LOCK_ROUNDS).await + b.metric(LOCK_ROUNDS).await;
    let answers = refresh_burst(&internals, &client, &sid).await;
    let rounds = a.metric(LOCK_ROUNDS).await + b.metric(LOCK_ROUNDS).await - before;
    // One per replica at most: the refresher's, and the other replica's one waiter's.
    eprintln!("Redis refresh-lock rounds: {rounds}");
    assert!((1.0..=2.0).contains(&rounds), "{rounds} lock rounds: requests took the Redis refresh lock one by one");
    let (_, new) = session_tokens(&a, &sid).await;
    assert_ne!(new.access_token, old.access_token, "refreshed");
    for (status, token, _) in &answers {
        assert_eq!(*status, 200);
        assert_eq!(*token, new.access_token, "every answer, on either replica, has the stored new token");
    }
    assert_eq!(admin.refresh_events(rec.provider_sid.as_deref().unwrap()).await, 1, "one refresh across replicas");
    let spread = release_spread(&answers);
    eprintln!("refresh release spread: {spread:?}");
    assert!(spread < Duration::from_millis(100), "waiters released {spread:?} after the first answer");
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn keycloak_back_channel_logout_ends_the_session_on_every_replica() {
    let redis = Redis::start().await;
    let base = Options { internal_allow: Some(vec![POCKETBASE.into()]), ..Options::short_tokens() };
    let (wa, a, _wb, b) = replica_pair(&redis, base).await;
    let _client_settings = backchannel_url_lock().await;
    let admin = KcAdmin::connect().await;
    admin.set_backchannel_url("gatehouse-short", &format!("{}/auth/backchannel-logout", a.base)).await;
    let mut browser = Browser::default();
    browser.login(&a.base, "bob").await;
    let sid = browser.cookie(&a.base, COOKIE).unwrap();
    let (rec, _) = session_tokens(&a, &sid).await;
    let ca = wa.ca();
    let client = mtls_client(&ca.cert_pem, Some(&client_cert(&ca, vec![San::Uri(POCKETBASE.into())])));
    let exchange = |gate: &Gate| {
        let (url, client, sid) =
            (format!("{}/internal/v1/session/exchange", gate.internal()), client.clone(), sid.clone());
        async move { client.post(url).json(&json!({"session_id": sid})).send().await.unwrap().status().as_u16() }
    };
    assert_eq!(exchange(&b).await, 200);
    // End the user's Keycloak session the way an administrator would; Keycloak calls Gatehouse.
    admin.delete(&format!("/sessions/{}", rec.provider_sid.as_deref().unwrap())).await;
    let mut gone = false;
    for _ in 0..100 {
        let me =
            http().get(format!("{}/auth/me", b.base)).header("cookie", format!("{COOKIE}={sid}")).send().await.unwrap();
        if me.status() == 401 {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "session ended by Keycloak's back-channel logout");
    for gate in [&a, &b] {
        let me = http()
            .get(format!("{}/auth/me", gate.base))
            .header("cookie", format!("{COOKIE}={sid}"))
            .send()
            .await
            .unwrap();
        assert_eq!(me.status(), 401);
        assert_eq!(exchange(gate).await, 401);
    }
    // A forged or replayed logout token is refused.
    let r = http()
        .post(format!("{}/auth/backchannel-logout", b.base))
        .form(&[("logout_token", "eyJhbGciOiJub25lIn0.e30.")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    a.stop().await;
    b.stop().await;
}

/// Keycloak's logout tokens, received instead of delivered (a stand-in back-channel URL that
/// records and does not forward): the URL to give Keycloak and what arrived there.
async fn logout_token_receiver() -> (String, std::sync::Arc<tokio::sync::Mutex<Vec<String>>>) {
    let captured: std::sync::Arc<tokio::sync::Mutex<Vec<String>>> = Default::default();
    let app = axum::Router::new()
        .route(
            "/capture",
            axum::routing::post(
                |axum::extract::State(c): axum::extract::State<std::sync::Arc<tokio::sync::Mutex<Vec<String>>>>,
                 axum::Form(f): axum::Form<std::collections::HashMap<String, String>>| async move {
                    c.lock().await.extend(f.get("logout_token").cloned());
                    "ok"
                },
            ),
        )
        .with_state(captured.clone());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let capture_url = format!("http://localhost:{}/capture", l.local_addr().unwrap().port());
    tokio::spawn(async move { axum::serve(l, app).await });
    (capture_url, captured)
}

/// The logout token Keycloak sent for its session `kc_sid` (waits up to 10 s for it).
async fn received_logout_token(captured: &tokio::sync::Mutex<Vec<String>>, kc_sid: &str) -> String {
    use base64::Engine;
    for _ in 0..100 {
        let found = captured
            .lock()
            .await
            .iter()
            .find(|t| {
                let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(t.split('.').nth(1).unwrap_or(""))
                    .unwrap_or_default();
                serde_json::from_slice::<Value>(&payload).is_ok_and(|v| v["sid"] == kc_sid)
            })
            .cloned();
        if let Some(token) = found {
            return token;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("Keycloak sent no logout token for the session");
}

/// Keycloak's real logout token, captured on its way (a stand-in back-channel URL that records and
/// does not forward), then delivered to both replicas at once, many times: exactly one delivery
/// is accepted, the replay mark being one set-if-absent step in the shared store.
#[tokio::test]
async fn a_genuine_logout_token_is_accepted_exactly_once_across_replicas() {
    let redis = Redis::start().await;
    let (_wa, a, _wb, b) = replica_pair(&redis, Options::default()).await;
    let _client_settings = backchannel_url_lock().await;
    let (capture_url, captured) = logout_token_receiver().await;
    let admin = KcAdmin::connect().await;
    admin.set_backchannel_url("gatehouse", &capture_url).await;

    let mut browser = Browser::default();
    browser.login(&a.base, "alice").await;
    let sid = browser.cookie(&a.base, COOKIE).unwrap();
    let kc_sid = session_tokens(&a, &sid).await.0.provider_sid.unwrap();
    admin.delete(&format!("/sessions/{kc_sid}")).await;
    let token = received_logout_token(&captured, &kc_sid).await;
    let me =
        |gate: &Gate| http().get(format!("{}/auth/me", gate.base)).header("cookie", format!("{COOKIE}={sid}")).send();
    assert_eq!(me(&b).await.unwrap().status(), 200, "not delivered yet: the session lives");

    let mut deliveries = Vec::new();
    for i in 0..10 {
        let url = format!("{}/auth/backchannel-logout", if i % 2 == 0 { &a.base } else { &b.base });
        let token = token.clone();
        deliveries.push(tokio::spawn(async move {
            http().post(url).form(&[("logout_token", token)]).send().await.unwrap().status().as_u16()
        }));
    }
    let mut statuses = Vec::new();
    for d in deliveries {
        statuses.push(d.await.unwrap());
    }
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 400, 400, 400, 400, 400, 400, 400, 400, 400], "accepted exactly once");
    assert_eq!(me(&a).await.unwrap().status(), 401);
    assert_eq!(me(&b).await.unwrap().status(), 401);
    admin.set_backchannel_url("gatehouse", "http://localhost:8080/auth/backchannel-logout").await;
    a.stop().await;
    b.stop().await;
}

/// Keycloak does not deliver a back-channel logout again after a 503 (found by `make soak`).
/// Its real logout token arrives while Redis is down: 503, and Redis comes back with the
/// session's record — the replica must not serve the session again ("resurrected"): it answers
/// 401 and removes the record by itself once Redis takes writes.
#[tokio::test]
async fn a_back_channel_logout_during_a_redis_outage_is_applied_when_redis_is_back() {
    let mut redis = Redis::start().await;
    let w = Workdir::new();
    let gate = Gate::start(&w, &Options { redis_url: Some(redis.url()), ..Options::default() }).await;
    let _client_settings = backchannel_url_lock().await;
    let (capture_url, captured) = logout_token_receiver().await;
    let admin = KcAdmin::connect().await;
    admin.set_backchannel_url("gatehouse", &capture_url).await;

    let mut browser = Browser::default();
    browser.login(&gate.base, "alice").await;
    let sid = browser.cookie(&gate.base, COOKIE).unwrap();
    let key = gatehouse::session::SessionId::parse(&sid).unwrap().key();
    let kc_sid = session_tokens(&gate, &sid).await.0.provider_sid.unwrap();
    admin.delete(&format!("/sessions/{kc_sid}")).await;
    let token = received_logout_token(&captured, &kc_sid).await;
    admin.set_backchannel_url("gatehouse", "http://localhost:8080/auth/backchannel-logout").await;
    let me = || http().get(format!("{}/auth/me", gate.base)).header("cookie", format!("{COOKIE}={sid}")).send();
    assert_eq!(me().await.unwrap().status(), 200, "not delivered yet: the session lives");

    redis.stop().await;
    let r = http()
        .post(format!("{}/auth/backchannel-logout", gate.base))
        .form(&[("logout_token", token.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503, "not applied yet, and said so");
    let metrics = scrape_metrics(&gate).await;
    assert_eq!(metric(&metrics, "gatehouse_backchannel_logout_pending"), Some(1.0), "{metrics}");

    redis.restart().await; // AOF: the session's record is back with it
    let mut ended = false;
    for _ in 0..50 {
        let status = me().await.unwrap().status();
        assert_ne!(status, 200, "the session is never served again");
        if status == 401 {
            ended = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ended, "the session stays ended after the outage");
    let mut removed = false;
    for _ in 0..150 {
        if gate.core().exchange.store().get(&key).await.is_ok_and(|r| r.is_none()) {
            removed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(removed, "the deferred logout removed the record from Redis");
    assert_eq!(me().await.unwrap().status(), 401);
    let metrics = scrape_metrics(&gate).await;
    assert_eq!(metric(&metrics, "gatehouse_backchannel_logout_pending"), Some(0.0), "{metrics}");
    assert_eq!(
        metric(&metrics, "gatehouse_backchannel_logouts_deferred_total{outcome=\"applied\"}"),
        Some(1.0),
        "{metrics}"
    );
    let late = http()
        .post(format!("{}/auth/backchannel-logout", gate.base))
        .form(&[("logout_token", token.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(late.status(), 400, "its jti was marked when it was applied: a late copy is a replay");
    gate.stop().await;
}

async fn scrape_metrics(gate: &Gate) -> String {
    http().get(format!("{}/metrics", gate.admin)).send().await.unwrap().text().await.unwrap()
}

/// A sample's value in the Prometheus text format, by its name with labels as exposed.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

#[tokio::test]
async fn admin_lists_and_revokes_sessions_and_keycloak_forgets_them() {
    let redis = Redis::start().await;
    let w = Workdir::new();
    let gate = Gate::start(&w, &Options { redis_url: Some(redis.url()), ..Options::default() }).await;
    let mut one = Browser::default();
    let mut two = Browser::default();
    for b in [&mut one, &mut two] {
        assert_eq!(
            b.post_json(&gate.base, "/auth/login", &json!({"username": "bob", "password": "bob-password"}))
                .await
                .status,
            200
        );
    }
    let (s1, s2) = (one.cookie(&gate.base, COOKIE).unwrap(), two.cookie(&gate.base, COOKIE).unwrap());
    let (rec, tokens1) = session_tokens(&gate, &s1).await;
    let sub = rec.claims.sub.clone();
    let list: Value =
        http().get(format!("{}/admin/v1/sessions?sub={sub}", gate.admin)).send().await.unwrap().json().await.unwrap();
    let sessions = list["sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), 2);
    assert!(!list.to_string().contains(&s1) && !list.to_string().contains(&s2), "no session ids in listings");
    assert!(!looks_like_jwt(&list.to_string()));
    // The CLI talks to the same API.
    let out = tokio::process::Command::new(bin())
        .args(["sessions", "list", "--user", &sub, "--admin", &gate.admin])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{} {}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let prefix1 = gatehouse::session::SessionId::parse(&s1).unwrap().key().prefix();
    assert!(String::from_utf8_lossy(&out.stdout).contains(&prefix1));
    let out = tokio::process::Command::new(bin())
        .args(["sessions", "revoke", "--session", &prefix1, "--admin", &gate.admin])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(one.get(&format!("{}/auth/me", gate.base)).await.status, 401);
    assert_eq!(two.get(&format!("{}/auth/me", gate.base)).await.status, 200);
    // Revocation reaches Keycloak too (in the background).
    let mut dead = false;
    for _ in 0..50 {
        if refresh_at_keycloak("gatehouse", "gatehouse-dev-secret", tokens1.refresh_token.as_deref().unwrap()).await.0
            == 400
        {
            dead = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(dead, "refresh token revoked at Keycloak");
    let r: Value = http()
        .delete(format!("{}/admin/v1/sessions?sub={sub}", gate.admin))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["revoked"], 1);
    assert_eq!(two.get(&format!("{}/auth/me", gate.base)).await.status, 401);
    assert_eq!(http().delete(format!("{}/admin/v1/sessions/zz", gate.admin)).send().await.unwrap().status(), 400);
    // DNS rebinding: a browser page reaching 127.0.0.1 under its own host name is refused.
    let rebound = http()
        .get(format!("{}/admin/v1/sessions?sub={sub}", gate.admin))
        .header("host", "evil.example:9090")
        .send()
        .await
        .unwrap();
    assert_eq!(rebound.status(), 403);
    for ok in ["127.0.0.1", "localhost:9090", "[::1]", "[::1]:9090"] {
        let r =
            http().get(format!("{}/admin/v1/sessions?sub={sub}", gate.admin)).header("host", ok).send().await.unwrap();
        assert_eq!(r.status(), 200, "Host {ok}");
    }
    gate.stop().await;
}

#[tokio::test]
async fn redis_outage_gives_clean_503s_and_recovers_without_losing_or_resurrecting_sessions() {
    let mut redis = Redis::start().await;
    let w = Workdir::new();
    let o =
        Options { redis_url: Some(redis.url()), internal_allow: Some(vec![POCKETBASE.into()]), ..Options::default() };
    let gate = Gate::start(&w, &o).await;
    let ca = w.ca();
    let client = mtls_client(&ca.cert_pem, Some(&client_cert(&ca, vec![San::Uri(POCKETBASE.into())])));
    let mut kept = Browser::default();
    let mut revoked = Browser::default();
    for b in [&mut kept, &mut revoked] {
        assert_eq!(
            b.post_json(&gate.base, "/auth/login", &json!({"username": "alice", "password": "alice-password"}))
                .await
                .status,
            200
        );
    }
    let revoked_id = revoked.cookie(&gate.base, COOKIE).unwrap();
    assert_eq!(revoked.post(&gate.base, "/auth/logout").await.status, 200);

    redis.stop().await;
    let me = kept.get(&format!("{}/auth/me", gate.base)).await;
    assert_eq!(me.status, 503, "{}", me.body);
    assert_eq!(me.json()["error"], "store_unavailable");
    assert_eq!(me.header("retry-after").as_deref(), Some("5"), "clients are told when to try again");
    assert_eq!(me.header("cache-control").as_deref(), Some("no-store"));
    let x = client
        .post(format!("{}/internal/v1/session/exchange", gate.internal()))
        .json(&json!({"session_id": kept.cookie(&gate.base, COOKIE).unwrap()}))
        .send()
        .await
        .unwrap();
    assert_eq!(x.status(), 503);
    assert_eq!(x.headers().get("retry-after").and_then(|v| v.to_str().ok()), Some("5"), "on the exchange too");
    assert_eq!(http().get(format!("{}/readyz", gate.base)).send().await.unwrap().status(), 503);
    assert_eq!(http().get(format!("{}/healthz", gate.base)).send().await.unwrap().status(), 200);

    // A replica started while Redis is down: alive, not ready.
    let w2 = Workdir::new();
    let cold = Gate::start_unready(&w2, &Options { redis_url: Some(redis.url()), ..Options::default() }).await;
    assert_eq!(http().get(format!("{}/readyz", cold.base)).send().await.unwrap().status(), 503);

    redis.restart().await;
    let mut back = false;
    for _ in 0..100 {
        if kept.get(&format!("{}/auth/me", gate.base)).await.status == 200 {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(back, "recovers by itself, session kept across the Redis restart");
    let replay = http()
        .get(format!("{}/auth/me", gate.base))
        .header("cookie", format!("{COOKIE}={revoked_id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(replay.status(), 401, "a revoked session never comes back");
    cold.wait_ready().await;
    cold.stop().await;
    gate.stop().await;
}

/// A Sentinel setup from Debian's packages: primary, replica, one sentinel.
struct SentinelSetup {
    primary: std::process::Child,
    replica: std::process::Child,
    sentinel: std::process::Child,
    sentinel_port: u16,
    primary_port: u16,
    replica_port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for SentinelSetup {
    fn drop(&mut self) {
        for c in [&mut self.primary, &mut self.replica, &mut self.sentinel] {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn sentinel_setup() -> SentinelSetup {
    let dir = tempfile::tempdir().unwrap();
    let (p, r, s) = (free_port(), free_port(), free_port());
    let redis = |port: u16, extra: Vec<String>| {
        let d = dir.path().join(port.to_string());
        std::fs::create_dir_all(&d).unwrap();
        async move {
            let port_s = port.to_string();
            // Both need the password: the replica may become the master.
            let mut args = vec!["--port", &port_s, "--appendonly", "no", "--requirepass", SENTINEL_PW];
            args.extend(["--masterauth", SENTINEL_PW]);
            args.extend(extra.iter().map(String::as_str));
            redis_server(&args, &d, port).await
        }
    };
    // No diskless-sync delay: Redis 7 otherwise waits 5 s before the replica's first sync.
    let primary = redis(p, vec!["--repl-diskless-sync-delay".into(), "0".into()]).await;
    let replica = redis(r, vec!["--replicaof".into(), "127.0.0.1".into(), p.to_string()]).await;
    let mut linked = false;
    for _ in 0..100 {
        if redis_cli(r, &["info", "replication"]).contains("master_link_status:up") {
            linked = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(linked, "replica synced with the primary");
    let conf = dir.path().join("sentinel.conf");
    std::fs::write(
        &conf,
        format!(
            "port {s}\nbind 127.0.0.1\ndir {d}\nsentinel monitor gatehouse 127.0.0.1 {p} 1\nsentinel down-after-milliseconds gatehouse 1000\nsentinel failover-timeout gatehouse 5000\nsentinel auth-pass gatehouse {SENTINEL_PW}\n",
            d = dir.path().display()
        ),
    )
    .unwrap();
    let sentinel = std::process::Command::new("redis-sentinel")
        .arg(&conf)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("redis-sentinel (Debian package)");
    wait_port(s).await;
    SentinelSetup { primary, replica, sentinel, sentinel_port: s, primary_port: p, replica_port: r, _dir: dir }
}

/// The master's and replica's `requirepass` in the Sentinel test.
const SENTINEL_PW: &str = "sentinel-test-master-password";

fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = std::process::Command::new("redis-cli")
        .arg("-p")
        .arg(port.to_string())
        .args(["--no-auth-warning", "-a", SENTINEL_PW])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Gatehouse finds the master through Sentinel, and keeps serving after the master is killed and
/// Sentinel promotes the replica: the session made before the crash still works (requests during
/// the failover may get a clean 503, never a 401), and new logins land on the new master.
/// A Gatehouse that finds its Redis master through the setup's Sentinel.
async fn sentinel_gate(setup: &SentinelSetup, w: &Workdir) -> Gate {
    let pw_file = w.dir.path().join("redis-password");
    std::fs::write(&pw_file, SENTINEL_PW).unwrap();
    let text = w.config_text(&Options::default()).replace(
        "[session]\n",
        &format!(
            "[session]\nstore = \"redis\"\nredis_sentinels = [\"redis://127.0.0.1:{}\"]\nredis_master_name = \"gatehouse\"\nredis_timeout = \"500ms\"\nredis_master_password_file = \"{}\"\n",
            setup.sentinel_port,
            pw_file.display()
        ),
    );
    let config = gatehouse::config::Config::from_figment(
        figment::Figment::new().merge(<figment::providers::Toml as figment::providers::Format>::string(&text)),
    )
    .unwrap();
    let clock = std::sync::Arc::new(gatehouse::clock::SystemClock::default());
    let running = gatehouse::start(config, clock.clone()).await.unwrap();
    let base = format!("http://localhost:{}", running.public_addr.port());
    let gate = Gate { running: Some(running), clock, base, admin: String::new() };
    gate.wait_ready().await;
    gate
}

/// Two replicas that sat idle while their Redis connections were broken answer the very first
/// request afterwards correctly: 200 for a live session, 401 for a revoked one, never a 503.
async fn first_request_after_broken_connections(a: &Gate, b: &Gate, break_connections: impl AsyncFnOnce()) {
    // Replicas behind one load balancer share one public origin: sign in and out through `a`.
    let (live, revoked) = (logged_in(a, "alice").await, logged_in(a, "bob").await);
    let me = |gate: &Gate, sid: &str| {
        http().get(format!("{}/auth/me", gate.base)).header("cookie", format!("{COOKIE}={sid}")).send()
    };
    assert_eq!(me(a, &live).await.unwrap().status(), 200);
    assert_eq!(me(b, &live).await.unwrap().status(), 200);
    let r = http()
        .post(format!("{}/auth/logout", a.base))
        .header("cookie", format!("{COOKIE}={revoked}"))
        .header("x-csrf", "1")
        .header("origin", &a.base)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(me(a, &revoked).await.unwrap().status(), 401, "revoked before the restart");

    break_connections().await;
    tokio::time::sleep(Duration::from_secs(1)).await; // both replicas idle meanwhile

    assert_eq!(me(a, &live).await.unwrap().status(), 200, "replica a: first request after the restart");
    assert_eq!(me(b, &revoked).await.unwrap().status(), 401, "replica b: first request after the restart");
    assert_eq!(me(b, &live).await.unwrap().status(), 200);
    assert_eq!(me(a, &revoked).await.unwrap().status(), 401);
}

#[tokio::test]
async fn idle_replicas_answer_their_first_request_after_a_redis_restart_correctly() {
    let mut redis = Redis::start().await;
    let (_wa, a, _wb, b) = replica_pair(&redis, Options::default()).await;
    first_request_after_broken_connections(&a, &b, async || {
        redis.stop().await;
        redis.restart().await; // AOF: the sessions (and the revocation) survive
    })
    .await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn idle_replicas_on_sentinel_answer_their_first_request_after_their_connections_drop() {
    let setup = sentinel_setup().await;
    let (wa, mut wb) = (Workdir::new(), Workdir::new());
    wb.key = wa.key.clone(); // one Secret for both replicas
    let a = sentinel_gate(&setup, &wa).await;
    let b = sentinel_gate(&setup, &wb).await;
    // The master drops every client connection (as a restart or a proxy in between would).
    let primary = setup.primary_port;
    first_request_after_broken_connections(&a, &b, async || {
        let killed = redis_cli(primary, &["client", "kill", "type", "normal"]);
        assert!(killed.parse::<u32>().unwrap_or(0) >= 2, "both replicas' connections dropped: {killed}");
    })
    .await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn sentinel_failover_keeps_sessions_and_service() {
    let mut setup = sentinel_setup().await;
    let w = Workdir::new();
    let gate = sentinel_gate(&setup, &w).await;
    let base = gate.base.clone();
    let mut b = Browser::default();
    assert_eq!(
        b.post_json(&base, "/auth/login", &json!({"username": "bob", "password": "bob-password"})).await.status,
        200
    );
    assert_eq!(b.get(&format!("{base}/auth/me")).await.status, 200);
    // The session lives on the master Sentinel named.
    let on_primary = redis_cli(setup.primary_port, &["--scan", "--pattern", "gatehouse:s:*"]);
    assert_eq!(on_primary.lines().count(), 1, "one session on the primary");
    // Replication is asynchronous: wait until the replica has it (a session written in the last
    // instant before a crash can be lost with the primary; docs/operations.md says so).
    let mut replicated = false;
    for _ in 0..50 {
        if redis_cli(setup.replica_port, &["exists", on_primary.trim()]) == "1" {
            replicated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(replicated, "the replica received the session");

    setup.primary.kill().unwrap(); // SIGKILL: a crash, not a shutdown
    let _ = setup.primary.wait();
    let started = std::time::Instant::now();
    let mut statuses = Vec::new();
    loop {
        let s = b.get(&format!("{base}/auth/me")).await.status;
        statuses.push(s);
        if s == 200 && statuses.len() > 1 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(40), "no recovery after failover: {statuses:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(statuses.iter().all(|s| *s == 200 || *s == 503), "only clean 503s during the failover: {statuses:?}");
    let master = redis_cli(setup.sentinel_port, &["sentinel", "get-master-addr-by-name", "gatehouse"]);
    assert!(master.ends_with(&setup.replica_port.to_string()), "Sentinel promoted the replica: {master}");
    // Writes go to the new master.
    let mut b2 = Browser::default();
    assert_eq!(
        b2.post_json(&base, "/auth/login", &json!({"username": "alice", "password": "alice-password"})).await.status,
        200
    );
    assert_eq!(b2.get(&format!("{base}/auth/me")).await.status, 200);
    let on_new = redis_cli(setup.replica_port, &["--scan", "--pattern", "gatehouse:s:*"]);
    assert_eq!(on_new.lines().count(), 2, "both sessions on the promoted replica");
    gate.stop().await;
}

/// A replica whose session keys come from files: `seal` seals, `next` and `previous` only open.
async fn gate_with_keys(w: &Workdir, o: &Options, seal: &str, next: Option<&str>, previous: &[&str]) -> Gate {
    let file = |name: &str, key: &str| {
        let p = w.dir.path().join(name);
        std::fs::write(&p, key).unwrap();
        p.display().to_string()
    };
    let mut keys = format!("encryption_key_file = \"{}\"\n", file("key-seal", seal));
    if let Some(next) = next {
        keys += &format!("next_encryption_key_file = \"{}\"\n", file("key-next", next));
    }
    let previous: Vec<String> = previous.iter().enumerate().map(|(i, k)| file(&format!("key-prev-{i}"), k)).collect();
    keys += &format!("previous_encryption_key_files = {previous:?}\n");
    let text = w.config_text(o).replace(&format!("encryption_key = \"{}\"\n", w.key), &keys);
    assert!(text.contains("encryption_key_file"), "key line replaced");
    let config = gatehouse::config::Config::from_figment(
        figment::Figment::new().merge(<figment::providers::Toml as figment::providers::Format>::string(&text)),
    )
    .unwrap();
    let clock = std::sync::Arc::new(gatehouse::clock::SystemClock::default());
    let running = gatehouse::start(config, clock.clone()).await.unwrap();
    let base = format!("http://localhost:{}", running.public_addr.port());
    let admin = format!("http://{}", running.admin_addr);
    let gate = Gate { running: Some(running), clock, base, admin };
    gate.wait_ready().await;
    gate
}

/// The documented two-phase rotation, one replica at a time, while a client keeps calling
/// `/auth/me` and the exchange on whichever replicas are up: phase 1 teaches every replica the
/// new key (`next_encryption_key_file`), phase 2 makes it the sealing key (the old one moves to
/// `previous_encryption_key_files`). A session re-sealed under the new key by a phase-2 replica is
/// opened by a replica still in phase 1. No live session ever gets a 401.
#[tokio::test]
async fn session_key_rotation_in_a_rolling_update_never_answers_401() {
    use std::sync::Arc;
    use tokio::sync::Mutex;
    let redis = Redis::start().await;
    let base = Options { internal_allow: Some(vec![POCKETBASE.into()]), ..Options::short_tokens() };
    let (wa, a, wb, b) = replica_pair(&redis, base.clone()).await;
    let oa = Options { redis_url: Some(redis.url()), ..base.clone() };
    let ob = Options { redis_url: Some(redis.url()), external_port: Some(wa.port), ..base };
    let (k1, k2) = (wa.key.clone(), test_key());
    let sid = logged_in(&a, "alice").await;

    // The load balancer: the replicas that are up, and what every call answered.
    let up: Arc<Mutex<Vec<(String, String)>>> =
        Arc::new(Mutex::new(vec![(a.base.clone(), a.internal()), (b.base.clone(), b.internal())]));
    let answers: Arc<Mutex<Vec<(String, u16)>>> = Arc::default();
    let stop = Arc::new(tokio::sync::Notify::new());
    let ca = wa.ca();
    let client = mtls_client(&ca.cert_pem, Some(&client_cert(&ca, vec![San::Uri(POCKETBASE.into())])));
    let sessions: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(vec![sid.clone()]));
    let caller = {
        let (up, answers, stop, sessions) = (up.clone(), answers.clone(), stop.clone(), sessions.clone());
        tokio::spawn(async move {
            loop {
                let replicas = up.lock().await.clone();
                for (public, internal) in replicas {
                    for sid in sessions.lock().await.clone() {
                        let me =
                            http().get(format!("{public}/auth/me")).header("cookie", format!("{COOKIE}={sid}")).send();
                        let x = client
                            .post(format!("{internal}/internal/v1/session/exchange"))
                            .json(&json!({"session_id": sid}))
                            .send();
                        let (me, x) = tokio::join!(me, x);
                        // A replica being stopped may refuse the connection: that is the load balancer's job.
                        if let Ok(r) = me {
                            answers.lock().await.push((format!("me {public}"), r.status().as_u16()));
                        }
                        if let Ok(r) = x {
                            answers.lock().await.push((format!("exchange {internal}"), r.status().as_u16()));
                        }
                    }
                }
                tokio::select! {
                    _ = stop.notified() => return,
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
        })
    };
    // Restart one replica: out of the load balancer, stopped, started with its new keys, back in.
    async fn restart(
        up: &Mutex<Vec<(String, String)>>,
        old: Gate,
        new: impl std::future::Future<Output = Gate>,
    ) -> Gate {
        up.lock().await.retain(|(p, _)| *p != old.base);
        old.stop().await;
        let g = new.await;
        up.lock().await.push((g.base.clone(), g.internal()));
        g
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Phase 1: every replica learns k2, still sealing with k1.
    let a = restart(&up, a, gate_with_keys(&wa, &oa, &k1, Some(&k2), &[])).await;
    let b = restart(&up, b, gate_with_keys(&wb, &ob, &k1, Some(&k2), &[])).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Phase 2, first replica: a seals with k2 while b is still in phase 1.
    let a = restart(&up, a, gate_with_keys(&wa, &oa, &k2, None, &[&k1])).await;
    let fresh = logged_in(&a, "bob").await; // sealed with k2 on a
    sessions.lock().await.push(fresh.clone());
    a.clock.advance(30); // alice's token expired on a: refreshed and re-sealed with k2
    let me =
        http().get(format!("{}/auth/me", a.base)).header("cookie", format!("{COOKIE}={sid}")).send().await.unwrap();
    assert_eq!(me.status(), 200);
    let k2_id = a.core().keyring.key_ids()[0].clone();
    for s in [&sid, &fresh] {
        let key = gatehouse::session::SessionId::parse(s).unwrap().key();
        let rec = a.core().exchange.store().get(&key).await.unwrap().unwrap();
        assert_eq!(gatehouse::crypto::hex(&rec.sealed_tokens[1..9]), k2_id, "sealed with the new key");
    }
    tokio::time::sleep(Duration::from_millis(500)).await; // b (phase 1) serves k2-sealed sessions meanwhile
    let b = restart(&up, b, gate_with_keys(&wb, &ob, &k2, None, &[&k1])).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.notify_one();
    caller.await.unwrap();

    let answers = answers.lock().await.clone();
    let bad: Vec<&(String, u16)> = answers.iter().filter(|(_, s)| *s != 200).collect();
    assert!(bad.is_empty(), "every call answered 200 during the rotation; not: {bad:?}");
    assert!(answers.len() > 40, "the client kept calling: {} calls", answers.len());
    a.stop().await;
    b.stop().await;
}
