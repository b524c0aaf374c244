//! SECURITY 8 and 25: secrets never reach the logs. Every log line (TRACE level, all crates) of a
//! full session — code-flow login, password login, `/auth/me`, refresh, logout — is captured and
//! searched for the session id, tokens, authorization code, client secret and password.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may fail loudly

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gatehouse_testkit::*;
use serde_json::json;

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn no_secret_appears_in_any_log_line() {
    let cap = Capture::default();
    let writer = cap.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .init();

    // An upstream for the proxy: both relays carry a secret (the session id, the access token) in
    // a header, and hyper's client logs at TRACE.
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up_port = upstream.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(upstream, axum::Router::new().fallback(|| async { "ok" })).await });
    // And one whose upstream is down: a back-end failure, logged as one.
    let down_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let routes = format!(
        "[[routes]]\nprefix = \"/api/s/\"\nupstream = \"http://127.0.0.1:{up_port}/\"\nrelay = \"session\"\n\
         [[routes]]\nprefix = \"/api/b/\"\nupstream = \"http://127.0.0.1:{up_port}/\"\nrelay = \"bearer\"\n\
         [[routes]]\nprefix = \"/api/down/\"\nupstream = \"http://127.0.0.1:{down_port}/\"\nrelay = \"bearer\"\n"
    );
    let work = Workdir::new();
    let gate = Gate::start(
        &work,
        &Options {
            internal_allow: Some(vec![POCKETBASE.into()]),
            internal_rate: 5,
            extra: routes,
            ..Options::short_tokens()
        },
    )
    .await;
    let mut b = Browser::default();
    b.login(&gate.base, "alice").await;
    let code = url::Url::parse(b.last_callback.as_ref().unwrap())
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "code")
        .unwrap()
        .1
        .to_string();
    let id = b.cookie(&gate.base, COOKIE).unwrap();
    let (_, before) = session_tokens(&gate, &id).await;
    tokio::time::sleep(Duration::from_secs(9)).await;
    assert_eq!(b.get(&format!("{}/auth/me", gate.base)).await.status, 200); // refreshes
    let (_, after) = session_tokens(&gate, &id).await;
    // One East-West exchange: its audit line names the caller, the user and a hash prefix only.
    let ca = work.ca();
    let client = mtls_client(&ca.cert_pem, Some(&client_cert(&ca, vec![gatehouse::pki::San::Uri(POCKETBASE.into())])));
    let x = client
        .post(format!("{}/internal/v1/session/exchange", gate.internal()))
        .json(&json!({"session_id": id}))
        .send()
        .await
        .unwrap();
    assert_eq!(x.status(), 200);
    let exchanged: serde_json::Value = x.json().await.unwrap();
    // Refused and failed exchanges are audited too: an unknown session, a caller not on the
    // allow-list, and a caller over its rate limit (5 per second).
    let unknown = "A".repeat(43);
    let exchange = |c: &reqwest::Client, sid: &str| {
        c.post(format!("{}/internal/v1/session/exchange", gate.internal())).json(&json!({"session_id": sid})).send()
    };
    assert_eq!(exchange(&client, &unknown).await.unwrap().status(), 401);
    let mallory = "spiffe://gatehouse.local/ns/evil/sa/mallory";
    let stranger = mtls_client(&ca.cert_pem, Some(&client_cert(&ca, vec![gatehouse::pki::San::Uri(mallory.into())])));
    assert_eq!(exchange(&stranger, &id).await.unwrap().status(), 403);
    let mut limited = false;
    for _ in 0..20 {
        if exchange(&client, &unknown).await.unwrap().status() == 429 {
            limited = true;
            break;
        }
    }
    assert!(limited, "the caller hits its rate limit");
    // A login start: its state and nonce travel in URLs, its sealed login cookie in headers.
    let start = http().get(format!("{}/auth/login", gate.base)).header("sec-fetch-mode", "cors").send().await.unwrap();
    let login_cookie = start
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|c| c.strip_prefix(&format!("{COOKIE}-login=")).map(|v| v.split(';').next().unwrap().to_string()))
        .expect("login cookie");
    let login_url: serde_json::Value = start.json().await.unwrap();
    let login_query: std::collections::HashMap<String, String> =
        url::Url::parse(login_url["login_url"].as_str().unwrap()).unwrap().query_pairs().into_owned().collect();
    // Proxied requests with each relay.
    assert_eq!(b.get(&format!("{}/api/s/notes", gate.base)).await.status, 200);
    assert_eq!(b.get(&format!("{}/api/b/notes", gate.base)).await.status, 200);
    assert_eq!(b.get(&format!("{}/api/down/notes", gate.base)).await.status, 502);
    let mut p = Browser::default();
    assert_eq!(
        p.post_json(&gate.base, "/auth/login", &json!({"username": "bob", "password": "bob-password"})).await.status,
        200
    );
    assert_eq!(
        p.post_json(&gate.base, "/auth/login", &json!({"username": "bob", "password": "wrong-password-123"}))
            .await
            .status,
        401
    );
    // A password typed into the user-name field is refused by Keycloak and never logged.
    let typed = "Hunter2-typed-into-the-wrong-field";
    assert_eq!(
        Browser::default()
            .post_json(&gate.base, "/auth/login", &json!({"username": typed, "password": "x"}))
            .await
            .status,
        401
    );
    let pid = p.cookie(&gate.base, COOKIE).unwrap();
    // The admin API: list and revoke bob's sessions.
    let bob_sub = p.get(&format!("{}/auth/me", gate.base)).await.json()["sub"].as_str().unwrap().to_string();
    let listed = http().get(format!("{}/admin/v1/sessions?sub={bob_sub}", gate.admin)).send().await.unwrap();
    assert_eq!(listed.status(), 200);
    let revoked: serde_json::Value = http()
        .delete(format!("{}/admin/v1/sessions?sub={bob_sub}", gate.admin))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(revoked["revoked"], 1, "{revoked}");
    assert_eq!(b.post(&gate.base, "/auth/logout").await.status, 200);
    gate.stop().await;

    let logs = String::from_utf8_lossy(&cap.0.lock().unwrap()).to_string();
    assert!(!logs.contains(typed), "a typed user name (or misplaced password) is not logged");
    assert!(logs.contains("password login failed") && logs.contains("username_hash"), "failed logins are logged");
    let audit = logs.lines().find(|l| l.contains("session exchange")).expect("exchange audited");
    assert!(audit.contains(POCKETBASE) && audit.contains(&exchanged["claims"]["sub"].as_str().unwrap().to_string()));
    assert!(
        audit.contains(&gatehouse::session::SessionId::parse(&id).unwrap().key().prefix()),
        "session hash prefix in the audit line"
    );
    assert!(audit.contains("outcome=\"ok\"") || audit.contains("outcome=ok"), "{audit}");
    let line = |needle: &str| logs.lines().find(|l| l.contains(needle)).map(str::to_string);
    let failed = logs
        .lines()
        .find(|l| l.contains("session exchange") && l.contains("invalid_session"))
        .expect("a failed exchange is audited");
    assert!(failed.contains(POCKETBASE) && failed.contains("gatehouse::audit"), "{failed}");
    let refused = line("caller not on internal.allow").expect("a refused caller is audited");
    assert!(refused.contains(mallory) && refused.contains("forbidden") && refused.contains("WARN"), "{refused}");
    let throttled = line("internal rate limit hit").expect("a rate-limited caller is audited");
    assert!(throttled.contains(POCKETBASE) && throttled.contains("rate_limited"), "{throttled}");
    let backend = line("upstream unreachable").expect("a back-end failure is logged");
    assert!(backend.contains("WARN") && backend.contains("/api/down/"), "{backend}");
    let failed_request = logs
        .lines()
        .find(|l| l.contains("request failed") && l.contains("bad_gateway"))
        .expect("the failed request is logged with its fault");
    assert!(
        failed_request.contains("fault=\"dependency\"") || failed_request.contains("fault=dependency"),
        "{failed_request}"
    );
    let admin = line("admin revoked sessions").expect("admin revocations are audited");
    assert!(admin.contains("revoked=1") && admin.contains("gatehouse::audit"), "{admin}");
    assert!(logs.contains("login succeeded"), "authentication successes are logged");
    assert!(logs.contains("password login failed"), "authentication failures are logged");
    let mut secrets = vec![
        ("session id", id.clone()),
        ("second session id", pid),
        ("authorization code", code),
        ("client secret", "gatehouse-short-dev-secret".to_string()),
        ("password", "bob-password".to_string()),
        ("wrong password", "wrong-password-123".to_string()),
        ("access token", before.access_token.clone()),
        ("refreshed access token", after.access_token.clone()),
        ("exchanged access token", exchanged["access_token"].as_str().unwrap().to_string()),
        ("encryption key", work.key.clone()),
        ("login state", login_query["state"].clone()),
        ("login nonce", login_query["nonce"].clone()),
        ("sealed login cookie", login_cookie),
    ];
    for (what, t) in [
        ("refresh token", &before.refresh_token),
        ("rotated refresh token", &after.refresh_token),
        ("id token", &before.id_token),
    ] {
        secrets.push((what, t.clone().unwrap()));
    }
    for (what, secret) in secrets {
        // Any 24-character window of the secret is enough to count as a leak.
        let probe = &secret[secret.len().saturating_sub(24)..];
        assert!(!logs.contains(probe), "{what} leaked into the logs");
    }
    assert!(!looks_like_jwt(&logs), "a JWT leaked into the logs");
}
