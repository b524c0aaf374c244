//! Rate limits that hold across replicas: two Gatehouses on one real Redis share their buckets (and
//! two on embedded stores do not, which is what the shared ones fix); 429 answers carry
//! `Retry-After` and the IETF `RateLimit` fields; usernames never reach Redis raw; and a Redis
//! outage refuses logins but lets reads through by default, the other way round when configured.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::harness::*;

const RATE: u32 = 20;
const BURST: u32 = 20;
const HAMMER: Duration = Duration::from_millis(2500);

fn limited() -> Options {
    Options {
        public_extra: format!("rate_limit_per_second = {RATE}\nrate_limit_burst = {BURST}\n"),
        ..Options::default()
    }
}

/// `GET /auth/me` (no cookie) on the gates in turn from 4 concurrent clients for `HAMMER`; returns
/// (answers that were not 429, one 429 answer's headers and body).
async fn hammer(gates: &[String]) -> (usize, Option<(reqwest::header::HeaderMap, String)>) {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..4 {
        let gates = gates.to_vec();
        tasks.push(tokio::spawn(async move {
            let (client, mut allowed, mut refused, mut i) = (http(), 0usize, None, worker);
            while started.elapsed() < HAMMER {
                let r = client.get(format!("{}/auth/me", gates[i % gates.len()])).send().await.unwrap();
                i += 1;
                match r.status().as_u16() {
                    429 if refused.is_none() => {
                        let headers = r.headers().clone();
                        refused = Some((headers, r.text().await.unwrap()));
                    }
                    429 => {}
                    401 => allowed += 1,
                    other => panic!("unexpected status {other}"),
                }
            }
            (allowed, refused)
        }));
    }
    let mut total = 0;
    let mut sample = None;
    for t in tasks {
        let (allowed, refused) = t.await.unwrap();
        total += allowed;
        sample = sample.or(refused);
    }
    (total, sample)
}

/// What one bucket allows in `HAMMER`: the burst plus the rate over the time.
fn single_bound() -> f64 {
    f64::from(BURST) + f64::from(RATE) * HAMMER.as_secs_f64()
}

#[tokio::test]
async fn the_per_ip_limit_holds_across_two_replicas_on_one_redis() {
    let redis = Redis::start().await;
    let (_wa, a, _wb, b) = replica_pair(&redis, limited()).await;
    let (allowed, refused) = hammer(&[a.base.clone(), b.base.clone()]).await;
    let bound = single_bound();
    eprintln!("shared buckets: {allowed} allowed in {HAMMER:?} over two replicas (one bucket allows {bound})");
    assert!(
        allowed as f64 <= bound + f64::from(BURST),
        "within one burst of one bucket: {allowed} > {bound} + {BURST}"
    );
    assert!((allowed as f64) < 1.5 * bound, "not per replica: {allowed}");
    assert!(allowed as f64 >= f64::from(RATE) * HAMMER.as_secs_f64(), "the rate itself passes: {allowed}");

    // The 429: Retry-After in seconds (rounded up), the draft's fields, the usual JSON error.
    let (headers, body) = refused.expect("some requests were refused");
    let h = |n: &str| headers.get(n).map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
    assert_eq!(h("retry-after"), "1", "one request per 50 ms: retry within a second, rounded up");
    assert_eq!(h("ratelimit-policy"), format!("\"ip\";q={BURST};w=1"));
    assert!(h("ratelimit").starts_with("\"ip\";r=0;t="), "{}", h("ratelimit"));
    assert_eq!(h("cache-control"), "no-store");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"], "rate_limited");
    assert!(a.metric("gatehouse_rate_limited_requests_total{limit=\"request\"}").await > 0.0);

    // The buckets are Redis keys with a TTL (the time until full again), not process memory.
    let keys = redis_keys(&redis, "gatehouse:rl:*");
    assert!(keys.iter().any(|k| k.starts_with("gatehouse:rl:{ip:")), "{keys:?}");
    for k in keys.iter().filter(|k| k.starts_with("gatehouse:rl:{ip:")) {
        let pttl: i64 = redis_cli(&redis, &["PTTL", k]).trim().parse().unwrap();
        assert!(pttl > 0 && pttl <= 1000 * i64::from(BURST / RATE + 1), "{k}: PTTL {pttl}");
    }
    a.stop().await;
    b.stop().await;
}

/// What the shared buckets fix: two replicas with their own (embedded) stores allow about twice.
#[tokio::test]
async fn per_process_buckets_would_allow_about_twice_as_much() {
    let (wa, wb) = (Workdir::new(), Workdir::new());
    let a = Gate::start(&wa, &limited()).await;
    let b = Gate::start(&wb, &limited()).await;
    let (allowed, _) = hammer(&[a.base.clone(), b.base.clone()]).await;
    let bound = single_bound();
    eprintln!("per-process buckets: {allowed} allowed in {HAMMER:?} over two replicas (one bucket allows {bound})");
    assert!(allowed as f64 >= 1.5 * bound, "two independent buckets: {allowed}");
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn the_per_username_login_limit_holds_across_replicas_and_keeps_no_username_in_redis() {
    let redis = Redis::start().await;
    let per_user = 4;
    // A username Keycloak does not know: no lock-out of a real user by its brute-force detection.
    let user = format!("RateLimited-{}", std::process::id());
    let (_wa, a, _wb, b) = replica_pair(&redis, login_limited(per_user)).await;
    let origin = a.base.clone(); // both replicas advertise A's URL (one load balancer)
    let (mut allowed, mut refused) = (0, None);
    let started = Instant::now();
    // Twice the limit plus two, alternating replicas: per-process buckets would let 2 × per_user
    // through; shared ones per_user (one more per 15 s elapsed, the refill at 4 per minute).
    let attempts = 2 * per_user + 2;
    for i in 0..attempts {
        let gate = if i % 2 == 0 { &a } else { &b };
        // Alternate the case: Keycloak's usernames are case-insensitive, so are the buckets.
        let name = if i % 3 == 0 { user.to_uppercase() } else { user.clone() };
        let r = http()
            .post(format!("{}/auth/login", gate.base))
            .header("x-csrf", "1")
            .header("origin", &origin)
            .json(&json!({"username": name, "password": "wrong"}))
            .send()
            .await
            .unwrap();
        match r.status().as_u16() {
            401 => allowed += 1,
            429 => refused = Some(r.headers().clone()),
            other => panic!("unexpected status {other}: {}", r.text().await.unwrap()),
        }
    }
    let refilled = (started.elapsed().as_secs() / 15) as usize;
    eprintln!("password logins for one username over two replicas: {allowed} reached Keycloak in {attempts} attempts");
    assert!(
        allowed >= per_user && allowed <= per_user + refilled,
        "the per-user burst, once for both replicas (per process it would be {}): {allowed}",
        2 * per_user
    );
    let headers = refused.expect("attempts beyond the limit were refused");
    assert_eq!(headers["ratelimit-policy"], format!("\"login-user\";q={per_user};w=60"));
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=15).contains(&retry), "one attempt per 15 s: {retry}");

    // SCAN every key: the username appears nowhere, in any case; its bucket is a hash.
    let keys = redis_keys(&redis, "*");
    assert!(keys.iter().any(|k| k.starts_with("gatehouse:rl:{login-user:")), "{keys:?}");
    let lower = user.to_lowercase();
    assert!(keys.iter().all(|k| !k.to_lowercase().contains(&lower)), "a raw username in Redis: {keys:?}");
    a.stop().await;
    b.stop().await;
}

fn login_limited(per_user: usize) -> Options {
    Options {
        oidc_extra: format!(
            "password_login_per_user_per_minute = {per_user}\npassword_login_per_ip_per_minute = 1000\n"
        ),
        ..Options::default()
    }
}

/// Redis down: by default a login is refused with 503 (the guessing limits must not vanish) and
/// a read goes through; `closed` refuses reads too, `open` lets logins through.
#[tokio::test]
async fn a_redis_outage_refuses_logins_and_lets_reads_through_unless_configured_otherwise() {
    for (setting, login_ok, read_ok) in
        [(None, false, true), (Some("closed"), false, false), (Some("open"), true, true)]
    {
        let mut redis = Redis::start().await;
        let work = Workdir::new();
        // A short Redis timeout: each refused or failed-open check waits for it.
        let session_extra = "redis_timeout = \"500ms\"\n".to_owned()
            + &setting.map(|s| format!("rate_limit_on_store_error = \"{s}\"\n")).unwrap_or_default();
        let o = Options {
            redis_url: Some(redis.url()),
            public_extra: "rate_limit_per_second = 1000\nrate_limit_burst = 1000\n".into(),
            session_extra,
            ..Options::default()
        };
        let gate = Gate::start(&work, &o).await;
        redis.stop().await;
        let label = setting.unwrap_or("default");

        let mut browser = Browser::default();
        let login =
            browser.post_json(&gate.base, "/auth/login", &json!({"username": "nobody-rl", "password": "wrong"})).await;
        let start = browser.get(&format!("{}/auth/login?return_to=/", gate.base)).await;
        let me = browser.get(&format!("{}/auth/me", gate.base)).await;
        if login_ok {
            assert_eq!(login.status, 401, "{label}: the login reached Keycloak: {}", login.body);
            assert!((300..400).contains(&start.status), "{label}: login start redirects: {}", start.status);
        } else {
            assert_eq!(login.status, 503, "{label}: password login refused: {}", login.body);
            assert_eq!(login.json()["error"], "store_unavailable");
            assert!(login.header("retry-after").is_some(), "{label}: 503 says when to retry");
            assert_eq!(start.status, 503, "{label}: login start refused");
        }
        if read_ok {
            assert_eq!(me.status, 401, "{label}: a read passes the limit (no session: 401): {}", me.body);
        } else {
            assert_eq!(me.status, 503, "{label}: a read is refused: {}", me.body);
        }
        let metric =
            |action: &str| format!("gatehouse_rate_limit_store_errors_total{{limit=\"request\",action=\"{action}\"}}");
        assert_eq!(gate.metric(&metric("allowed")).await > 0.0, login_ok || read_ok, "{label}");
        assert_eq!(gate.metric(&metric("refused")).await > 0.0, !(login_ok && read_ok), "{label}");
        gate.stop().await;
    }
}

fn redis_cli(redis: &Redis, args: &[&str]) -> String {
    let out =
        std::process::Command::new("redis-cli").args(["-p", &redis.port.to_string()]).args(args).output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn redis_keys(redis: &Redis, pattern: &str) -> Vec<String> {
    redis_cli(redis, &["--scan", "--pattern", pattern]).lines().map(str::to_owned).collect()
}
