//! Logging in through Keycloak's real login form, `/auth/me`, cookies, redirects, CSRF.

use serde_json::json;

use crate::harness::*;

#[tokio::test]
async fn code_flow_login_sets_only_an_opaque_httponly_cookie_and_me_shows_claims() {
    let work = Workdir::new();
    let gate = Gate::start(&work, &Options::default()).await;
    let mut b = Browser::default();
    let r = b.code_flow(&gate.base, "alice", "alice-password", "/notes?tab=mine").await;
    assert_eq!(r.status, 303, "{}", r.body);
    assert_eq!(r.location(), "/notes?tab=mine", "lands on return_to");

    // Cookie attributes exactly as DESIGN §3 / SECURITY 3.
    let sc = r.set_cookies.iter().find(|c| c.starts_with(&format!("{COOKIE}="))).expect("session cookie set");
    let attrs: Vec<&str> = sc.split(';').map(str::trim).collect();
    for want in ["HttpOnly", "Secure", "Path=/", "SameSite=Lax"] {
        assert!(attrs.contains(&want), "{sc} lacks {want}");
    }
    assert!(!sc.to_ascii_lowercase().contains("domain="), "no Domain: {sc}");
    assert!(sc.len() < 4096);
    let id = b.cookie(&gate.base, COOKIE).unwrap();
    assert_eq!(id.len(), 43, "256-bit base64url id");
    assert!(!looks_like_jwt(&id));
    assert!(r.set_cookies.iter().any(|c| c.contains("-login=") && c.contains("Max-Age=0")), "login cookie cleared");

    let me = b.get(&format!("{}/auth/me", gate.base)).await;
    assert_eq!(me.status, 200);
    assert_eq!(me.header("cache-control").as_deref(), Some("no-store"));
    assert!(!looks_like_jwt(&me.body), "no token in /auth/me");
    let j = me.json();
    assert!(!j["sub"].as_str().unwrap().is_empty());
    assert_eq!(j["email"], "alice@example.com");
    assert_eq!(j["preferred_username"], "alice");
    assert_eq!(j["name"], "Alice Liddell");
    let realm: Vec<&str> = j["realm_roles"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert!(realm.contains(&"admin") && realm.contains(&"user"), "{realm:?}");
    let client: Vec<&str> =
        j["client_roles"]["gatehouse"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert!(client.contains(&"notes-writer"), "{client:?}");
    assert_eq!(j["groups"], json!(["/staff/engineering"]));
    assert!(j["session"]["expires_at"].as_i64().unwrap() > j["session"]["idle_expires_at"].as_i64().unwrap() - 1);
    for k in ["access_token", "refresh_token", "id_token"] {
        assert!(j.get(k).is_none());
    }
    gate.stop().await;
}

#[tokio::test]
async fn every_login_mints_a_new_id_and_a_planted_cookie_never_authenticates() {
    let work = Workdir::new();
    let gate = Gate::start(&work, &Options::default()).await;
    let mut b = Browser::default();
    let planted = "A".repeat(43);
    b.set_cookie(&gate.base, COOKIE, &planted);
    b.login(&gate.base, "bob").await;
    let first = b.cookie(&gate.base, COOKIE).unwrap();
    assert_ne!(first, planted, "fixation: the planted id was replaced");
    let mut attacker = Browser::default();
    attacker.set_cookie(&gate.base, COOKIE, &planted);
    assert_eq!(attacker.get(&format!("{}/auth/me", gate.base)).await.status, 401);
    b.login(&gate.base, "bob").await;
    assert_ne!(b.cookie(&gate.base, COOKIE).unwrap(), first, "second login, new id");
    gate.stop().await;
}

#[tokio::test]
async fn password_login_and_its_failures() {
    let work = Workdir::new();
    let gate = Gate::start(&work, &Options::default()).await;
    let mut b = Browser::default();
    let r = b.post_json(&gate.base, "/auth/login", &json!({"username": "bob", "password": "bob-password"})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(!looks_like_jwt(&r.body));
    assert_eq!(r.json()["preferred_username"], "bob");
    assert_eq!(b.get(&format!("{}/auth/me", gate.base)).await.json()["email"], "bob@example.com");

    let mut c = Browser::default();
    let bad = c.post_json(&gate.base, "/auth/login", &json!({"username": "bob", "password": "wrong"})).await;
    assert_eq!(bad.status, 401);
    assert_eq!(bad.json()["error"], "invalid_credentials");
    assert!(c.cookie(&gate.base, COOKIE).is_none());

    let malformed = c
        .send(
            http()
                .post(format!("{}/auth/login", gate.base))
                .header("x-csrf", "1")
                .header("origin", &gate.base)
                .header("content-type", "application/json")
                .body("{\"username\": "),
            &gate.base,
        )
        .await;
    assert_eq!(malformed.status, 400);
    assert_eq!(malformed.json()["error"], "invalid_request");

    let no_csrf = c
        .send(
            http().post(format!("{}/auth/login", gate.base)).json(&json!({"username":"bob","password":"bob-password"})),
            &gate.base,
        )
        .await;
    assert_eq!(no_csrf.status, 403);
    gate.stop().await;
}

#[tokio::test]
async fn password_login_is_off_by_default_and_rate_limited_per_user() {
    let work = Workdir::new();
    let off = Gate::start(&work, &Options { password_login: false, ..Options::default() }).await;
    let mut b = Browser::default();
    let r = b.post_json(&off.base, "/auth/login", &json!({"username": "bob", "password": "bob-password"})).await;
    assert_eq!(r.status, 404);
    off.stop().await;

    let work = Workdir::new();
    let o = Options { extra: String::new(), ..Options::default() };
    let gate = Gate::start(&work, &o).await;
    // Default: 5 per username per minute. The 6th attempt is refused before Keycloak sees it.
    let mut statuses = Vec::new();
    for _ in 0..6 {
        statuses.push(
            b.post_json(&gate.base, "/auth/login", &json!({"username": "nobody-here", "password": "x"})).await.status,
        );
    }
    assert_eq!(&statuses[..5], &[401; 5], "{statuses:?}");
    assert_eq!(statuses[5], 429);
    gate.stop().await;
}

#[tokio::test]
async fn open_redirects_land_on_root_through_the_real_flow() {
    let work = Workdir::new();
    let gate = Gate::start(&work, &Options::default()).await;
    for evil in
        ["//evil.example", "/\\evil.example", "/%2F%2Fevil.example", "https:evil.example", "https://evil.example/x"]
    {
        let mut b = Browser::default();
        let r = b.code_flow(&gate.base, "bob", "bob-password", evil).await;
        assert_eq!(r.status, 303);
        assert_eq!(r.location(), "/", "{evil} must fall back to /");
    }
    gate.stop().await;
}

#[tokio::test]
async fn callback_rejects_missing_wrong_or_replayed_state() {
    let work = Workdir::new();
    let gate = Gate::start(&work, &Options::default()).await;
    // No login cookie at all.
    let mut b = Browser::default();
    let r = b.get(&format!("{}/auth/callback?code=x&state=y", gate.base)).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"], "login_state_missing");

    // A login started in one browser cannot be finished in another (state bound to the browser).
    let mut victim = Browser::default();
    let callback = callback_url(&mut victim, &gate.base, "bob").await;
    let mut attacker = Browser::default();
    attacker.get(&format!("{}/auth/login", gate.base)).await; // attacker's own login cookie
    let stolen = attacker.get(&callback).await;
    assert_eq!(stolen.status, 400, "another browser's state is refused");
    assert!(attacker.cookie(&gate.base, COOKIE).is_none());

    // The rightful browser completes once; replaying the callback fails (login cookie is single-use).
    let ok = victim.get(&callback).await;
    assert_eq!(ok.status, 303);
    let mut replay = Browser { jar: victim.jar.clone(), ..Browser::default() };
    replay.jar.get_mut(&callback_host(&gate.base)).unwrap().remove(COOKIE);
    let again = replay.get(&callback).await;
    assert_eq!(again.status, 400);
    assert!(replay.cookie(&gate.base, COOKIE).is_none());
    gate.stop().await;
}

/// The same callback delivered twice at once (a double click, or an attacker racing a stolen
/// callback URL in the same browser): the login cookie is single-use only once its clearing
/// arrives, so both requests pass the state check — Keycloak's single-use code must let only one
/// of them create a session.
#[tokio::test]
async fn a_callback_raced_twice_creates_one_session() {
    let work = Workdir::new();
    let gate = Gate::start(&work, &Options::default()).await;
    let mut b = Browser::default();
    let callback = callback_url(&mut b, &gate.base, "bob").await;
    let (mut one, mut two) =
        (Browser { jar: b.jar.clone(), ..Browser::default() }, Browser { jar: b.jar.clone(), ..Browser::default() });
    let (r1, r2) = tokio::join!(one.get(&callback), two.get(&callback));
    let mut statuses = [r1.status, r2.status];
    statuses.sort();
    assert_eq!(statuses, [303, 400], "exactly one callback succeeds: {} / {}", r1.body, r2.body);
    let sessions = [one.cookie(&gate.base, COOKIE), two.cookie(&gate.base, COOKIE)];
    assert_eq!(sessions.iter().flatten().count(), 1, "one session cookie set");
    gate.stop().await;
}

fn callback_host(base: &str) -> String {
    let u = url::Url::parse(base).unwrap();
    format!("{}:{}", u.host_str().unwrap(), u.port().unwrap())
}

#[tokio::test]
async fn forged_unknown_oversized_and_malformed_cookies_get_401_json() {
    let work = Workdir::new();
    let gate = Gate::start(&work, &Options::default()).await;
    let me = format!("{}/auth/me", gate.base);
    let values = [
        "A".repeat(43),
        "short".to_string(),
        "x".repeat(5000),
        "%00%ff".to_string(),
        "\"quoted\"".to_string(),
        // An unsigned `alg: none` JWT, built here so no token-shaped string sits in the repository.
        {
            use base64::Engine;
            let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
            format!("{}.{}.", b64(r#"{"alg":"none"}"#), b64(r#"{"sub":"admin"}"#))
        },
        "=;=;=".to_string(),
    ];
    for v in values {
        let r = http().get(&me).header("cookie", format!("{COOKIE}={v}")).send().await.unwrap();
        assert_eq!(r.status(), 401, "cookie {v:.20}");
        let j: serde_json::Value = r.json().await.unwrap();
        assert_eq!(j["error"], "unauthenticated");
    }
    let r = http().get(&me).header("cookie", "garbage without equals; ;;;").send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = http()
        .get(&me)
        .header("cookie", vec![b'a'; 20_000].iter().map(|b| *b as char).collect::<String>())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 431, "headers over 16 KiB in total");
    assert_eq!(r.json::<serde_json::Value>().await.unwrap()["error"], "headers_too_large");
    // A session cookie over the 8 KiB cookie limit (but within the header limit) is ignored.
    let r = http().get(&me).header("cookie", format!("{COOKIE}={}", "A".repeat(9000))).send().await.unwrap();
    assert_eq!(r.status(), 401, "oversized cookie");
    let r = http().get(&me).send().await.unwrap();
    assert_eq!(r.status(), 401, "no cookie");
    // A request head over the listener's 64 KiB read buffer never reaches a handler: hyper
    // answers 431 and closes (raw TCP: a client library would refuse to send it).
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let port = gate.running.as_ref().unwrap().public_addr.port();
        let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let head = format!("GET /auth/me HTTP/1.1\r\nHost: localhost\r\nX-Big: {}\r\n\r\n", "b".repeat(70 * 1024));
        // The server may close before reading it all: a failed write is part of the outcome.
        let _ = tcp.write_all(head.as_bytes()).await;
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(10), tcp.read_to_end(&mut buf)).await;
        let answer = String::from_utf8_lossy(&buf);
        assert!(answer.starts_with("HTTP/1.1 431"), "70 KiB head: {:.80}", answer);
    }
    gate.stop().await;
}

/// The part of a code flow up to the provider's redirect back: the callback URL, not yet visited.
async fn callback_url(b: &mut Browser, base: &str, user: &str) -> String {
    let start = b.get(&format!("{base}/auth/login")).await;
    let kc = start.location();
    let page = b.get(&kc).await;
    if page.status == 302 {
        return page.location();
    }
    let posted = b
        .send(
            http().post(form_action(&page.body)).form(&[
                ("username", user),
                ("password", &format!("{user}-password")),
                ("credentialId", ""),
            ]),
            &kc,
        )
        .await;
    posted.location()
}

/// SECURITY 11: every login start draws a fresh state, nonce and PKCE verifier (S256), and binds
/// them to the browser in a `__Host-` cookie that lives 600 s; a huge `return_to` cannot push that
/// cookie past what browsers keep — it falls back to `/`.
#[tokio::test]
async fn every_login_start_is_fresh_s256_and_its_cookie_is_host_bound_and_short_lived() {
    let work = Workdir::new();
    let gate = Gate::start(&work, &Options::default()).await;
    let mut seen: Vec<std::collections::HashMap<String, String>> = Vec::new();
    for _ in 0..3 {
        let r = http().get(format!("{}/auth/login", gate.base)).header("sec-fetch-mode", "cors").send().await.unwrap();
        assert_eq!(r.status(), 200);
        let sc: Vec<String> =
            r.headers().get_all("set-cookie").iter().map(|v| v.to_str().unwrap().to_string()).collect();
        let login = sc.iter().find(|c| c.starts_with(&format!("{COOKIE}-login="))).expect("login cookie");
        let attrs: Vec<&str> = login.split(';').map(str::trim).collect();
        for want in ["HttpOnly", "Secure", "Path=/", "SameSite=Lax", "Max-Age=600"] {
            assert!(attrs.contains(&want), "{login} lacks {want}");
        }
        assert!(!login.to_ascii_lowercase().contains("domain="), "no Domain: {login}");
        let j: serde_json::Value = r.json().await.unwrap();
        let url = url::Url::parse(j["login_url"].as_str().unwrap()).unwrap();
        let q: std::collections::HashMap<String, String> = url.query_pairs().into_owned().collect();
        assert_eq!(q["code_challenge_method"], "S256");
        assert_eq!(q["code_challenge"].len(), 43, "base64url SHA-256");
        for k in ["state", "nonce"] {
            assert!(q[k].len() >= 43, "{k} carries 256 bits");
        }
        seen.push(q);
    }
    for k in ["state", "nonce", "code_challenge"] {
        let mut values: Vec<&String> = seen.iter().map(|q| &q[k]).collect();
        values.sort();
        values.dedup();
        assert_eq!(values.len(), 3, "{k} is fresh on every login start");
    }

    // 1,000 `é` are 2,001 bytes (under return_to's 2 KiB) but 6,001 once percent-encoded.
    let huge = format!("/{}", "é".repeat(1000));
    let mut b = Browser::default();
    let start = b.get(&format!("{}/auth/login?return_to={}", gate.base, urlencode(&huge))).await;
    let login = start.set_cookies.iter().find(|c| c.starts_with(&format!("{COOKIE}-login="))).unwrap();
    assert!(login.len() < 4096, "login cookie stays under 4 KiB: {}", login.len());
    let r = b.code_flow(&gate.base, "bob", "bob-password", &huge).await;
    assert_eq!(r.status, 303);
    assert_eq!(r.location(), "/", "an oversized return_to falls back to /");
    gate.stop().await;
}

/// SECURITY 12 (RFC 9207) through the real flow: Keycloak announces `iss` in its authorization
/// responses, so a callback whose `iss` is another issuer's, or missing, creates no session.
#[tokio::test]
async fn a_callback_with_a_wrong_or_missing_issuer_creates_no_session() {
    let work = Workdir::new();
    let gate = Gate::start(&work, &Options::default()).await;
    // Each case replaces the callback's `iss` (`None`: drops it). The first is the control: the
    // same re-encoding with Keycloak's own `iss` logs in, so the others fail on `iss` alone.
    let cases = [
        ("control: the real issuer", Some(issuer())),
        ("another issuer", Some("https://evil.example/realms/gatehouse".to_string())),
        ("no iss", None),
        ("issuer with a trailing slash", Some(format!("{}/", issuer()))),
    ];
    for (what, replacement) in cases {
        let mut b = Browser::default();
        let callback = callback_url(&mut b, &gate.base, "bob").await;
        let mut u = url::Url::parse(&callback).unwrap();
        let pairs: Vec<(String, String)> = u.query_pairs().into_owned().collect();
        let iss = pairs.iter().find(|(k, _)| k == "iss").map(|(_, v)| v.clone()).expect("Keycloak sends iss");
        assert_eq!(iss, issuer());
        let mut query: Vec<String> =
            pairs.iter().filter(|(k, _)| k != "iss").map(|(k, v)| format!("{k}={}", urlencode(v))).collect();
        if let Some(other) = replacement {
            query.push(format!("iss={}", urlencode(&other)));
        }
        u.set_query(Some(&query.join("&")));
        let r = b.get(u.as_str()).await;
        if what.starts_with("control") {
            assert_eq!(r.status, 303, "{what}: {}", r.body);
            assert!(b.cookie(&gate.base, COOKIE).is_some(), "{what}: a session");
            continue;
        }
        assert_eq!(r.status, 400, "{what}: {}", r.body);
        assert_eq!(r.json()["error"], "login_failed", "{what}");
        assert!(b.cookie(&gate.base, COOKIE).is_none(), "{what}: no session cookie");
    }
    gate.stop().await;
}

#[tokio::test]
async fn csrf_is_enforced_on_every_unsafe_method_of_every_route() {
    let work = Workdir::new();
    let gate = Gate::start(&work, &Options::default()).await;
    let mut paths: Vec<&str> = gatehouse::public::ROUTES.iter().map(|(_, p)| *p).collect();
    paths.extend(["/api/anything", "/not-a-route", "/"]);
    for path in paths {
        for method in ["POST", "PUT", "PATCH", "DELETE"] {
            let url = format!("{}{path}", gate.base);
            let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
            let cases: Vec<(&str, Vec<(&str, String)>)> = vec![
                ("no header", vec![("origin", gate.base.clone())]),
                ("wrong value", vec![("x-csrf", "0".into()), ("origin", gate.base.clone())]),
                ("cross origin", vec![("x-csrf", "1".into()), ("origin", "http://evil.example".into())]),
                (
                    "cross site",
                    vec![
                        ("x-csrf", "1".into()),
                        ("origin", gate.base.clone()),
                        ("sec-fetch-site", "cross-site".into()),
                    ],
                ),
                ("no origin", vec![("x-csrf", "1".into())]),
            ];
            for (what, headers) in cases {
                let mut req = http().request(m.clone(), &url);
                for (k, v) in headers {
                    req = req.header(k, v);
                }
                let r = req.send().await.unwrap();
                if method == "POST" && gatehouse::public::csrf::EXEMPT.contains(&path) {
                    // The one exemption: authenticated by a signed logout token instead, so a
                    // request without one is refused all the same.
                    assert_eq!(r.status(), 400, "{method} {path} ({what})");
                    continue;
                }
                assert_eq!(r.status(), 403, "{method} {path} ({what})");
                let j: serde_json::Value = r.json().await.unwrap();
                assert_eq!(j["error"], "csrf");
            }
        }
    }
    // And the table matches the router: every listed route exists.
    for (method, path) in gatehouse::public::ROUTES {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let r = http()
            .request(m, format!("{}{path}", gate.base))
            .header("x-csrf", "1")
            .header("origin", &gate.base)
            .send()
            .await
            .unwrap();
        assert_ne!(r.status(), 404, "{method} {path} is routed");
        assert_ne!(r.status(), 405, "{method} {path} is routed");
    }
    // And the other way: every method the router answers on a fixed path is in the table (the
    // CSRF walk above covers only what the table lists).
    let fixed = gatehouse::public::route_paths();
    for path in fixed.iter().filter(|p| !p.contains('{')) {
        for method in ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"] {
            let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
            let r = http()
                .request(m, format!("{}{path}", gate.base))
                .header("x-csrf", "1")
                .header("origin", &gate.base)
                .send()
                .await
                .unwrap();
            if r.status() != 405 {
                assert!(
                    gatehouse::public::ROUTES.contains(&(method, path)),
                    "{method} {path} answers {} but is not in public::ROUTES",
                    r.status()
                );
            }
        }
    }
    assert!(fixed.contains(&"/api/{*rest}"), "the proxy's catch-all, covered by /api/anything above");
    assert_eq!(
        fixed.len(),
        gatehouse::public::ROUTES.iter().map(|(_, p)| p).collect::<std::collections::HashSet<_>>().len() + 1
    );
    gate.stop().await;
}

#[tokio::test]
async fn fetch_gets_json_not_a_redirect_and_strict_same_site_lands_via_a_page() {
    let work = Workdir::new();
    let gate = Gate::start(&work, &Options { same_site: "strict", ..Options::default() }).await;
    let r = http().get(format!("{}/auth/login", gate.base)).header("sec-fetch-mode", "cors").send().await.unwrap();
    assert_eq!(r.status(), 200);
    let j: serde_json::Value = r.json().await.unwrap();
    assert!(j["login_url"].as_str().unwrap().starts_with(&issuer()));

    let mut b = Browser::default();
    let r = b.code_flow(&gate.base, "bob", "bob-password", "/after").await;
    assert_eq!(r.status, 200, "Strict: a same-site landing page, not a cross-site redirect");
    assert!(r.body.contains("url=/after"));
    let sc = r.set_cookies.iter().find(|c| c.starts_with(COOKIE)).unwrap();
    assert!(sc.contains("SameSite=Strict"));
    assert_eq!(b.get(&format!("{}/auth/me", gate.base)).await.status, 200);
    gate.stop().await;
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let work = Workdir::new();
    let gate = Gate::start(&work, &Options::default()).await;
    let port = gate.running.as_ref().unwrap().public_addr.port();
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    tcp.write_all(b"GET /auth/me HTTP/1.1\r\nHost: localhost\r\nX-Slow: ").await.unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 512];
    let n = tokio::time::timeout(std::time::Duration::from_secs(20), tcp.read(&mut buf))
        .await
        .expect("server closes the connection");
    let n = n.unwrap_or(0);
    assert!(
        n == 0 || String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 408"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    assert!(started.elapsed() >= std::time::Duration::from_secs(5), "not cut off before the header timeout");
    gate.stop().await;
}

#[tokio::test]
async fn public_requests_are_rate_limited_per_client_ip_when_configured() {
    let work = Workdir::new();
    let o = Options {
        public_extra: "rate_limit_per_second = 2\nrate_limit_burst = 5\ntrusted_proxies = [\"127.0.0.1\"]".into(),
        ..Options::default()
    };
    let gate = Gate::start(&work, &o).await;
    let me = format!("{}/auth/me", gate.base);
    let mut statuses = Vec::new();
    for _ in 0..12 {
        statuses.push(http().get(&me).send().await.unwrap().status().as_u16());
    }
    assert!(statuses.iter().filter(|s| **s == 401).count() <= 6, "the burst and a little refill pass: {statuses:?}");
    assert!(statuses.contains(&429), "then 429: {statuses:?}");
    let r = http().get(&me).send().await.unwrap();
    assert_eq!(r.status(), 429);
    // One request per 500 ms: retry within a second (rounded up); the IETF draft's fields.
    assert_eq!(r.headers()["retry-after"], "1");
    assert_eq!(r.headers()["ratelimit-policy"], "\"ip\";q=5;w=3");
    assert!(r.headers()["ratelimit"].to_str().unwrap().starts_with("\"ip\";r=0;t="));
    assert_eq!(r.json::<serde_json::Value>().await.unwrap()["error"], "rate_limited");
    // Probes are never limited; another client (behind the trusted proxy) has its own bucket.
    assert_eq!(http().get(format!("{}/healthz", gate.base)).send().await.unwrap().status(), 200);
    let other = http().get(&me).header("x-forwarded-for", "203.0.113.9").send().await.unwrap();
    assert_eq!(other.status(), 401, "another client IP is not limited by the first one's use");
    gate.stop().await;
}

/// An HTTP/2 client is told the 256-stream limit in the server's SETTINGS (so one connection
/// cannot open unbounded concurrent requests), and is served within it.
#[tokio::test]
async fn http2_clients_are_held_to_256_concurrent_streams() {
    let work = Workdir::new();
    let gate = Gate::start(&work, &Options::default()).await;
    let port = gate.running.as_ref().unwrap().public_addr.port();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let req = http::Request::get(format!("http://localhost:{port}/healthz")).body(()).unwrap();
    let (answer, _) = client.send_request(req, true).unwrap();
    assert_eq!(answer.await.unwrap().status(), 200);
    // The server's SETTINGS came before its first answer.
    assert_eq!(client.current_max_send_streams(), 256);
    gate.stop().await;
}

/// A body Gatehouse reads itself (password login, back-channel logout) must arrive within 10 s:
/// a client trickling it is answered 408 and loses its connection, instead of holding it for hours.
#[tokio::test]
async fn a_body_that_never_finishes_gets_408() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let work = Workdir::new();
    let gate = Gate::start(&work, &Options { password_login: true, ..Options::default() }).await;
    let port = gate.running.as_ref().unwrap().public_addr.port();
    let stall = |path: &'static str, content_type: &'static str, start: &'static str| {
        let origin = gate.base.clone();
        async move {
            let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            let head = format!(
                "POST {path} HTTP/1.1\r\nHost: localhost\r\nX-CSRF: 1\r\nOrigin: {origin}\r\n\
                 Content-Type: {content_type}\r\nContent-Length: 200\r\n\r\n{start}"
            );
            tcp.write_all(head.as_bytes()).await.unwrap();
            let started = std::time::Instant::now();
            let mut answer = Vec::new();
            let closed = tokio::time::timeout(std::time::Duration::from_secs(20), tcp.read_to_end(&mut answer)).await;
            assert!(matches!(closed, Ok(Ok(_))), "{path}: the server closes the connection: {closed:?}");
            (String::from_utf8_lossy(&answer).to_string(), started.elapsed())
        }
    };
    let (login, logout) = tokio::join!(
        stall("/auth/login", "application/json", r#"{"username":"alice","#),
        stall("/auth/backchannel-logout", "application/x-www-form-urlencoded", "logout_token=eyJ")
    );
    for (what, (answer, after), says) in [
        ("password login", login, "request_timeout"),
        // The provider's call keeps its own error format.
        ("back-channel logout", logout, "not received in time"),
    ] {
        assert!(answer.starts_with("HTTP/1.1 408"), "{what}: {answer:.200}");
        assert!(answer.contains(says), "{what}: {answer:.400}");
        assert!(after >= std::time::Duration::from_secs(5), "{what}: not before the deadline ({after:?})");
        assert!(after < std::time::Duration::from_secs(15), "{what}: answered and closed, not left open ({after:?})");
    }
    // A body that arrives in time is read as before.
    let mut b = Browser::default();
    let r = b.post_json(&gate.base, "/auth/login", &json!({"username": "alice", "password": "alice-password"})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    gate.stop().await;
}

/// A connection that never sends a byte (hyper's header timeout starts only with the first one)
/// must not hold one of the listener's 10,000 slots forever; nor may an idle keep-alive one.
#[tokio::test]
async fn silent_and_idle_connections_are_closed_after_the_header_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let work = Workdir::new();
    let gate = Gate::start(&work, &Options::default()).await;
    let port = gate.running.as_ref().unwrap().public_addr.port();
    let closed_within = |mut tcp: tokio::net::TcpStream| async move {
        let started = std::time::Instant::now();
        let mut buf = [0u8; 512];
        let read = tokio::time::timeout(std::time::Duration::from_secs(20), tcp.read(&mut buf)).await;
        assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "closed without an answer, within 20 s: {read:?}");
        started.elapsed()
    };
    let silent = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    // The start of the HTTP/2 preface, then nothing: hyper-util waits for the rest to choose.
    let mut half_preface = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    half_preface.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    let mut idle = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 512];
    let n = idle.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let (silent, half_preface, idle) =
        tokio::join!(closed_within(silent), closed_within(half_preface), closed_within(idle));
    for (what, after) in [("silent", silent), ("half an HTTP/2 preface", half_preface), ("idle keep-alive", idle)] {
        assert!(after >= std::time::Duration::from_secs(5), "{what}: not before the timeout ({after:?})");
    }
    // Clients that send promptly are served as before, over HTTP/1.1 and HTTP/2 alike.
    assert_eq!(http().get(format!("{}/healthz", gate.base)).send().await.unwrap().status(), 200);
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get(format!("http://localhost:{port}/healthz"))
        .body(http_body_util::Empty::<axum::body::Bytes>::new())
        .unwrap();
    let r = h2.send_request(req).await.unwrap();
    assert_eq!((r.status().as_u16(), r.version()), (200, http::Version::HTTP_2));
    gate.stop().await;
}
