//! The East-West exchange over mutual TLS: who may call, what they get, and what they never get.

use std::time::Duration;

use gatehouse::pki::{LeafSpec, San};
use serde_json::{Value, json};

use crate::harness::*;

async fn exchange(
    client: &reqwest::Client,
    gate: &Gate,
    session_id: &str,
) -> Result<reqwest::Response, reqwest::Error> {
    client
        .post(format!("{}/internal/v1/session/exchange", gate.internal()))
        .json(&json!({"session_id": session_id}))
        .send()
        .await
}

#[tokio::test]
async fn an_allowed_caller_gets_a_keycloak_token_and_matching_claims_but_never_the_refresh_token() {
    let work = Workdir::new();
    let gate = Gate::start(&work, &Options::with_internal(&[POCKETBASE])).await;
    let ca = work.ca();
    let client = mtls_client(&ca.cert_pem, Some(&client_cert(&ca, vec![San::Uri(POCKETBASE.into())])));
    let sid = logged_in(&gate, "alice").await;
    let r = exchange(&client, &gate, &sid).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["cache-control"], "no-store");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["token_type"], "Bearer");
    let token = body["access_token"].as_str().unwrap();
    let (_, stored) = session_tokens(&gate, &sid).await;
    assert!(
        !body.to_string().contains(stored.refresh_token.as_deref().unwrap()),
        "refresh token never leaves Gatehouse"
    );
    assert!(body.get("refresh_token").is_none() && body.get("id_token").is_none());
    // The token verifies against Keycloak's JWKS (signature, issuer, audience) and matches the claims.
    let verified = gate
        .core()
        .exchange
        .oidc()
        .validate_jwt(
            token,
            gatehouse::oidc::id_token::TokenKind::Access,
            None,
            None,
            gatehouse::oidc::jwks::KeySource::TokenEndpoint,
        )
        .await
        .unwrap();
    assert_eq!(verified["sub"], body["claims"]["sub"]);
    assert_eq!(
        verified["exp"].as_i64().unwrap(),
        body["expires_at"].as_i64().unwrap(),
        "expires_at is the token's own exp"
    );
    assert_eq!(body["claims"]["email"], "alice@example.com");
    assert_eq!(body["claims"]["preferred_username"], "alice");
    assert_eq!(body["claims"]["groups"], json!(["/staff/engineering"]));
    assert!(body["claims"]["realm_roles"].as_array().unwrap().contains(&json!("admin")));
    assert!(body["claims"]["client_roles"]["gatehouse"].as_array().unwrap().contains(&json!("notes-writer")));
    assert!(body["session"]["expires_at"].as_i64().unwrap() > 0);

    // The same exchange in RFC 8693 form.
    let r = client
        .post(format!("{}/internal/v1/token", gate.internal()))
        .form(&[
            ("grant_type", "urn:ietf:params:oauth:grant-type:token-exchange"),
            ("subject_token", sid.as_str()),
            ("subject_token_type", "urn:gatehouse:params:oauth:token-type:session"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let t: Value = r.json().await.unwrap();
    assert_eq!(t["issued_token_type"], "urn:ietf:params:oauth:token-type:access_token");
    assert_eq!(t["token_type"], "Bearer");
    assert!(t["expires_in"].as_i64().unwrap() > 0);
    assert_eq!(t["access_token"], body["access_token"]);
    for (form, err) in [
        (vec![("grant_type", "password")], "unsupported_grant_type"),
        (
            vec![
                ("grant_type", "urn:ietf:params:oauth:grant-type:token-exchange"),
                ("subject_token", "x"),
                ("subject_token_type", "urn:ietf:params:oauth:token-type:access_token"),
            ],
            "invalid_request",
        ),
        (
            vec![
                ("grant_type", "urn:ietf:params:oauth:grant-type:token-exchange"),
                ("subject_token", "unknown"),
                ("subject_token_type", "urn:gatehouse:params:oauth:token-type:session"),
            ],
            "invalid_request",
        ),
    ] {
        let r = client.post(format!("{}/internal/v1/token", gate.internal())).form(&form).send().await.unwrap();
        assert_eq!(r.status(), 400);
        assert_eq!(r.json::<Value>().await.unwrap()["error"], err);
    }
    gate.stop().await;
}

#[tokio::test]
async fn no_certificate_other_ca_and_expired_certificates_never_complete_a_request() {
    let work = Workdir::new();
    let gate = Gate::start(&work, &Options::with_internal(&[POCKETBASE])).await;
    let ca = work.ca();
    let sid = logged_in(&gate, "bob").await;
    let none = mtls_client(&ca.cert_pem, None);
    assert!(exchange(&none, &gate, &sid).await.is_err(), "no client certificate, no handshake");

    let other_ca = gatehouse::pki::new_ca("Another CA", 1).unwrap();
    let foreign = mtls_client(&ca.cert_pem, Some(&client_cert(&other_ca, vec![San::Uri(POCKETBASE.into())])));
    assert!(exchange(&foreign, &gate, &sid).await.is_err(), "certificate from another CA");

    let now = time::OffsetDateTime::now_utc();
    let mut spec = LeafSpec::client("expired", vec![San::Uri(POCKETBASE.into())], 1);
    spec.not_before = now - time::Duration::days(10);
    spec.not_after = now - time::Duration::days(1);
    let expired = mtls_client(&ca.cert_pem, Some(&gatehouse::pki::issue(&ca, &spec).unwrap()));
    assert!(exchange(&expired, &gate, &sid).await.is_err(), "expired certificate");

    let mut spec = LeafSpec::client("ca-flagged", vec![San::Uri(POCKETBASE.into())], 1);
    spec.is_ca = true;
    let ca_leaf = mtls_client(&ca.cert_pem, Some(&gatehouse::pki::issue(&ca, &spec).unwrap()));
    match exchange(&ca_leaf, &gate, &sid).await {
        Err(_) => {}
        Ok(r) => assert_eq!(r.status(), 403, "a CA certificate never identifies a caller"),
    }
    // Plain HTTP to the TLS port: no fallback.
    let plain = http()
        .post(format!(
            "http://127.0.0.1:{}/internal/v1/session/exchange",
            gate.running.as_ref().unwrap().internal_addr.unwrap().port()
        ))
        .json(&json!({"session_id": sid}))
        .send()
        .await;
    assert!(plain.is_err() || plain.unwrap().status() != 200);
    gate.stop().await;
}

#[tokio::test]
async fn unlisted_and_lookalike_identities_get_403() {
    let work = Workdir::new();
    let gate = Gate::start(&work, &Options::with_internal(&[POCKETBASE, "notes.data.svc"])).await;
    let ca = work.ca();
    let sid = logged_in(&gate, "bob").await;
    let cases: Vec<(&str, Vec<San>)> = vec![
        ("unlisted", vec![San::Uri("spiffe://gatehouse.local/ns/data/sa/other".into())]),
        ("suffix", vec![San::Uri(format!("{POCKETBASE}-evil"))]),
        ("extra segment", vec![San::Uri(format!("{POCKETBASE}/extra"))]),
        ("prefix only", vec![San::Uri("spiffe://gatehouse.local/ns/data/sa".into())]),
        ("two URI SANs", vec![San::Uri(POCKETBASE.into()), San::Uri("spiffe://gatehouse.local/ns/x/sa/y".into())]),
        ("upper-case scheme", vec![San::Uri(POCKETBASE.replace("spiffe", "SPIFFE"))]),
        ("other trust domain", vec![San::Uri(POCKETBASE.replace("gatehouse.local", "evil.local"))]),
        (
            "URI wins over a listed DNS name",
            vec![San::Uri("spiffe://gatehouse.local/ns/x/sa/y".into()), San::Dns("notes.data.svc".into())],
        ),
        ("unlisted DNS", vec![San::Dns("notes.data.svc.evil".into())]),
        ("no SAN", vec![]),
    ];
    for (what, sans) in cases {
        let client = mtls_client(&ca.cert_pem, Some(&client_cert(&ca, sans)));
        let r = exchange(&client, &gate, &sid).await.unwrap();
        assert_eq!(r.status(), 403, "{what}");
        assert_eq!(r.json::<Value>().await.unwrap()["error"], "forbidden", "{what}");
    }
    // A listed DNS identity works.
    let dns = mtls_client(&ca.cert_pem, Some(&client_cert(&ca, vec![San::Dns("notes.data.svc".into())])));
    assert_eq!(exchange(&dns, &gate, &sid).await.unwrap().status(), 200);
    // A forged x-forwarded-client-cert changes nothing in mtls mode.
    let unlisted =
        mtls_client(&ca.cert_pem, Some(&client_cert(&ca, vec![San::Uri("spiffe://gatehouse.local/ns/x/sa/y".into())])));
    let r = unlisted
        .post(format!("{}/internal/v1/session/exchange", gate.internal()))
        .header("x-forwarded-client-cert", format!("By=spiffe://x;URI={POCKETBASE}"))
        .json(&json!({"session_id": sid}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    gate.stop().await;
}

#[tokio::test]
async fn the_exchange_never_answers_on_the_public_listener() {
    let work = Workdir::new();
    let gate = Gate::start(&work, &Options::with_internal(&[POCKETBASE])).await;
    let sid = logged_in(&gate, "bob").await;
    for path in [
        "/internal/v1/session/exchange",
        "/internal/v1/token",
        "/internal/v1/session/exchange/",
        "/INTERNAL/v1/session/exchange",
    ] {
        let r = http()
            .post(format!("{}{path}", gate.base))
            .header("x-csrf", "1")
            .header("origin", &gate.base)
            .header("x-forwarded-client-cert", format!("URI={POCKETBASE}"))
            .json(&json!({"session_id": sid}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{path}");
        assert!(!looks_like_jwt(&r.text().await.unwrap()));
    }
    gate.stop().await;
}

#[tokio::test]
async fn unknown_expired_revoked_and_malformed_sessions_get_byte_identical_401s() {
    let work = Workdir::new();
    let gate = Gate::start(&work, &Options::with_internal(&[POCKETBASE])).await;
    let ca = work.ca();
    let client = mtls_client(&ca.cert_pem, Some(&client_cert(&ca, vec![San::Uri(POCKETBASE.into())])));
    let body_of = |r: reqwest::Response| async move {
        assert_eq!(r.status(), 401);
        assert_eq!(r.headers()["cache-control"], "no-store");
        r.bytes().await.unwrap()
    };
    let unknown = body_of(exchange(&client, &gate, &"A".repeat(43)).await.unwrap()).await;
    let malformed = body_of(exchange(&client, &gate, "not-a-session").await.unwrap()).await;
    // Revoked: logged out.
    let mut b = Browser::default();
    b.post_json(&gate.base, "/auth/login", &json!({"username": "bob", "password": "bob-password"})).await;
    let revoked_id = b.cookie(&gate.base, COOKIE).unwrap();
    assert_eq!(exchange(&client, &gate, &revoked_id).await.unwrap().status(), 200);
    assert_eq!(b.post(&gate.base, "/auth/logout").await.status, 200);
    let revoked = body_of(exchange(&client, &gate, &revoked_id).await.unwrap()).await;
    // Expired: idle for longer than the idle timeout.
    let expired_id = logged_in(&gate, "alice").await;
    gate.clock.advance(31 * 60);
    let expired = body_of(exchange(&client, &gate, &expired_id).await.unwrap()).await;
    gate.clock.advance(-31 * 60);
    assert_eq!(unknown, revoked);
    assert_eq!(unknown, expired);
    assert_eq!(unknown, malformed);
    assert_eq!(serde_json::from_slice::<Value>(&unknown).unwrap()["error"], "invalid_session");
    // Malformed JSON is a clear 400, not a 500.
    let r = client
        .post(format!("{}/internal/v1/session/exchange", gate.internal()))
        .header("content-type", "application/json")
        .body("{")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    gate.stop().await;
}

#[tokio::test]
async fn callers_are_rate_limited_one_by_one() {
    let work = Workdir::new();
    let o = Options { internal_rate: 5, ..Options::with_internal(&[POCKETBASE, "notes.data.svc"]) };
    let gate = Gate::start(&work, &o).await;
    let ca = work.ca();
    let pb = mtls_client(&ca.cert_pem, Some(&client_cert(&ca, vec![San::Uri(POCKETBASE.into())])));
    let mut statuses = Vec::new();
    for _ in 0..12 {
        statuses.push(exchange(&pb, &gate, &"A".repeat(43)).await.unwrap().status().as_u16());
    }
    assert!(statuses.contains(&429), "{statuses:?}");
    assert_eq!(
        statuses.iter().filter(|s| **s == 401).count(),
        statuses.len() - statuses.iter().filter(|s| **s == 429).count()
    );
    let notes = mtls_client(&ca.cert_pem, Some(&client_cert(&ca, vec![San::Dns("notes.data.svc".into())])));
    assert_eq!(
        exchange(&notes, &gate, &"A".repeat(43)).await.unwrap().status(),
        401,
        "another caller has its own bucket"
    );
    gate.stop().await;
}

#[tokio::test]
async fn certificate_rotation_applies_to_new_connections_without_a_restart() {
    let work = Workdir::new();
    let gate = Gate::start(&work, &Options::with_internal(&[POCKETBASE])).await;
    let sid = logged_in(&gate, "bob").await;
    let old_ca = work.ca();
    let old_client = mtls_client(&old_ca.cert_pem, Some(&client_cert(&old_ca, vec![San::Uri(POCKETBASE.into())])));
    assert_eq!(exchange(&old_client, &gate, &sid).await.unwrap().status(), 200);

    // Rotate everything to a new CA, the way a secret mount changes (write new files, then rename over).
    let new_dir = work.dir.path().join("pki-new");
    gatehouse::pki::init(&new_dir).unwrap();
    for f in ["gatehouse.crt", "gatehouse.key", "ca.crt"] {
        std::fs::rename(new_dir.join(f), work.pki().join(f)).unwrap();
    }
    let tls = gate.running.as_ref().unwrap().internal_tls.clone().unwrap();
    assert!(tls.reload_if_changed(), "new files picked up");
    assert!(!tls.reload_if_changed(), "unchanged files are not reloaded again");

    // The connected client keeps its connection; new connections need the new CA.
    assert_eq!(exchange(&old_client, &gate, &sid).await.unwrap().status(), 200, "live connection survives rotation");
    let new_ca = gatehouse::pki::Issued {
        cert_pem: std::fs::read_to_string(work.pki().join("ca.crt")).unwrap(),
        key_pem: std::fs::read_to_string(new_dir.join("ca.key")).unwrap(),
    };
    let fresh_old = mtls_client(&old_ca.cert_pem, Some(&client_cert(&old_ca, vec![San::Uri(POCKETBASE.into())])));
    assert!(exchange(&fresh_old, &gate, &sid).await.is_err(), "old CA refused on new connections");
    let fresh_new = mtls_client(&new_ca.cert_pem, Some(&client_cert(&new_ca, vec![San::Uri(POCKETBASE.into())])));
    assert_eq!(exchange(&fresh_new, &gate, &sid).await.unwrap().status(), 200);

    // A broken file is refused; the current config stays.
    std::fs::write(
        work.pki().join("gatehouse.crt"),
        "-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    assert!(!tls.reload_if_changed());
    let again = mtls_client(&new_ca.cert_pem, Some(&client_cert(&new_ca, vec![San::Uri(POCKETBASE.into())])));
    assert_eq!(exchange(&again, &gate, &sid).await.unwrap().status(), 200, "old config kept after a bad file");
    // A key that does not match the certificate is refused too.
    gatehouse::pki::init(&work.dir.path().join("pki-3")).unwrap();
    std::fs::copy(new_dir.join("ca.key"), work.pki().join("gatehouse.key")).unwrap();
    assert!(!tls.reload_if_changed());
    gate.stop().await;
}

#[tokio::test]
async fn fifty_concurrent_exchanges_on_an_expired_token_refresh_once() {
    let work = Workdir::new();
    let o = Options { internal_allow: Some(vec![POCKETBASE.into()]), ..Options::short_tokens() };
    let gate = Gate::start(&work, &o).await;
    let ca = work.ca();
    let client = mtls_client(&ca.cert_pem, Some(&client_cert(&ca, vec![San::Uri(POCKETBASE.into())])));
    let sid = logged_in(&gate, "bob").await;
    let (rec, _) = session_tokens(&gate, &sid).await;
    let admin = KcAdmin::connect().await;
    tokio::time::sleep(Duration::from_secs(11)).await;
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let (c, url, sid) = (client.clone(), format!("{}/internal/v1/session/exchange", gate.internal()), sid.clone());
        tasks.push(tokio::spawn(async move {
            let r = c.post(url).json(&json!({"session_id": sid})).send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap()["access_token"].as_str().map(str::to_owned))
        }));
    }
    let mut tokens = std::collections::HashSet::new();
    for t in tasks {
        let (status, token) = t.await.unwrap();
        assert_eq!(status, 200);
        tokens.insert(token.unwrap());
    }
    assert_eq!(tokens.len(), 1, "everyone got the one refreshed token");
    assert_eq!(admin.refresh_events(rec.provider_sid.as_deref().unwrap()).await, 1, "exactly one refresh at Keycloak");
    gate.stop().await;
}

#[tokio::test]
async fn the_rust_client_exchanges_caches_and_types_its_errors() {
    let work = Workdir::new();
    let gate = Gate::start(&work, &Options::with_internal(&[POCKETBASE])).await;
    let ca = work.ca();
    let pb = client_cert(&ca, vec![San::Uri(POCKETBASE.into())]);
    let cfg = gatehouse_client::ClientConfig::new(
        &gate.internal(),
        ca.cert_pem.clone().into_bytes(),
        pb.cert_pem.into_bytes(),
        pb.key_pem.into_bytes(),
    );
    let client = gatehouse_client::Client::new(cfg).unwrap();
    let sid = logged_in(&gate, "alice").await;
    let first = client.exchange(&sid).await.unwrap();
    assert_eq!(first.claims.preferred_username.as_deref(), Some("alice"));
    assert!(!format!("{first:?}").contains(&first.access_token), "Debug hides the token");
    let ok_series = format!("gatehouse_exchanges_total{{outcome=\"ok\",caller=\"{POCKETBASE}\"}}");
    let before = gate.metric(&ok_series).await;
    let second = client.exchange(&sid).await.unwrap();
    assert_eq!(second.access_token, first.access_token);
    assert_eq!(gate.metric(&ok_series).await, before, "served from the cache");
    client.forget(&sid);
    client.exchange(&sid).await.unwrap();
    assert_eq!(gate.metric(&ok_series).await, before + 1.0);
    assert!(matches!(client.exchange(&"A".repeat(43)).await, Err(gatehouse_client::Error::InvalidSession)));
    let other = client_cert(&ca, vec![San::Uri("spiffe://gatehouse.local/ns/x/sa/y".into())]);
    let unlisted = gatehouse_client::Client::new(gatehouse_client::ClientConfig::new(
        &gate.internal(),
        ca.cert_pem.into_bytes(),
        other.cert_pem.into_bytes(),
        other.key_pem.into_bytes(),
    ))
    .unwrap();
    assert!(matches!(unlisted.exchange(&sid).await, Err(gatehouse_client::Error::Forbidden)));
    gate.stop().await;
}

#[tokio::test]
async fn envoy_mode_refuses_a_non_loopback_bind_and_trusts_xfcc_only_there() {
    let work = Workdir::new();
    let bad = Options {
        extra: "[internal]\nmode = \"envoy\"\nlisten = \"0.0.0.0:0\"\nallow = []\n".into(),
        ..Options::default()
    };
    let text = work.config_text(&bad);
    let err = gatehouse::config::Config::from_figment(
        figment::Figment::new().merge(<figment::providers::Toml as figment::providers::Format>::string(&text)),
    )
    .unwrap_err();
    assert!(err.to_string().contains("internal.listen"), "{err}");

    let o = Options {
        extra: format!("[internal]\nmode = \"envoy\"\nlisten = \"127.0.0.1:0\"\nallow = [\"{POCKETBASE}\"]\n"),
        ..Options::default()
    };
    let gate = Gate::start(&work, &o).await;
    let sid = logged_in(&gate, "bob").await;
    let url = format!(
        "http://127.0.0.1:{}/internal/v1/session/exchange",
        gate.running.as_ref().unwrap().internal_addr.unwrap().port()
    );
    let send = |xfcc: Option<String>| {
        let (url, sid) = (url.clone(), sid.clone());
        async move {
            let mut r = http().post(url).json(&json!({"session_id": sid}));
            if let Some(x) = xfcc {
                r = r.header("x-forwarded-client-cert", x);
            }
            r.send().await.unwrap().status().as_u16()
        }
    };
    assert_eq!(send(Some(format!("By=spiffe://gatehouse.local/gatehouse;URI={POCKETBASE}"))).await, 200);
    assert_eq!(send(None).await, 403);
    assert_eq!(
        send(Some(format!("URI={POCKETBASE},URI=spiffe://gatehouse.local/ns/x/sa/y"))).await,
        403,
        "the last element counts"
    );
    gate.stop().await;
}

/// The faces' own limits, applied by their pipelines before any handler reads a body: the
/// public `max_body_bytes` and the exchange's 8 KiB. One byte under is read (and refused for
/// what it says), one byte over is 413 — and every public answer, refusals and unknown paths
/// included, carries the browser-hardening headers.
#[tokio::test]
async fn bodies_over_each_faces_limit_get_413_and_every_public_answer_is_hardened() {
    let work = Workdir::new();
    let o = Options {
        password_login: true,
        public_extra: "max_body_bytes = 2048".into(),
        ..Options::with_internal(&[POCKETBASE])
    };
    let gate = Gate::start(&work, &o).await;
    let login = |size: usize| {
        // The JSON framing is 30 bytes: the username fills the rest.
        let body = json!({"username": "u".repeat(size - 30), "password": "x"}).to_string();
        assert_eq!(body.len(), size);
        http()
            .post(format!("{}/auth/login", gate.base))
            .header("x-csrf", "1")
            .header("origin", &gate.base)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let under = login(2048).await.unwrap();
    // Read and parsed: the handler itself refuses a 2 KB username.
    assert_eq!(under.status(), 400);
    assert!(under.text().await.unwrap().contains("username or password empty or too long"));
    let over = login(2049).await.unwrap();
    assert_eq!(over.status(), 413);

    let ca = work.ca();
    let client = mtls_client(&ca.cert_pem, Some(&client_cert(&ca, vec![San::Uri(POCKETBASE.into())])));
    let exchange = |size: usize| {
        let body = json!({"session_id": "s".repeat(size - 17)}).to_string();
        assert_eq!(body.len(), size);
        client
            .post(format!("{}/internal/v1/session/exchange", gate.internal()))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let under = exchange(8 * 1024).await.unwrap();
    assert_eq!(under.status(), 401, "read, and an unknown session: {}", under.text().await.unwrap());
    let over = exchange(8 * 1024 + 1).await.unwrap();
    assert_eq!(over.status(), 413);

    // Refusals of every kind and unknown paths get the same hardening headers as answers.
    let oversized_headers =
        http().get(format!("{}/auth/me", gate.base)).header("x-padding", "p".repeat(17 * 1024)).send().await.unwrap();
    let answers = [
        (404, http().get(format!("{}/no/such/page", gate.base)).send().await.unwrap()),
        (
            405,
            http()
                .put(format!("{}/auth/me", gate.base))
                .header("x-csrf", "1")
                .header("origin", &gate.base)
                .send()
                .await
                .unwrap(),
        ),
        (403, http().post(format!("{}/auth/logout", gate.base)).send().await.unwrap()),
        (413, login(4096).await.unwrap()),
        (431, oversized_headers),
    ];
    for (status, r) in answers {
        assert_eq!(r.status(), status);
        let h = r.headers();
        assert_eq!(h["x-content-type-options"], "nosniff", "{status}");
        assert_eq!(h["x-frame-options"], "DENY", "{status}");
        assert_eq!(h["referrer-policy"], "no-referrer", "{status}");
        assert!(h["content-security-policy"].to_str().unwrap().contains("frame-ancestors 'none'"), "{status}");
    }
    gate.stop().await;
}
