//! The admin listener off loopback, as in a Kubernetes pod: probes and metrics answer anyone who
//! reaches the pod IP, the session API answers only the bearer token from `admin.token_file`.

use std::path::Path;
use std::sync::Arc;

use gatehouse::clock::SystemClock;
use serde_json::Value;

use crate::bin;
use crate::harness::*;

const TOKEN: &str = "k8s-admin-token-0123456789abcdefghijklmnopqrstuv";

/// A Gatehouse whose admin listener binds every interface and requires the token in `token_file`.
async fn pod_gate(work: &Workdir, token_file: &Path) -> Gate {
    let text = work.config_text(&Options::default()).replace(
        "[admin]\nlisten = \"127.0.0.1:0\"",
        &format!("[admin]\nlisten = \"0.0.0.0:0\"\ntoken_file = \"{}\"", token_file.display()),
    );
    assert!(text.contains("0.0.0.0:0"), "admin table rewritten");
    let config = {
        use figment::Figment;
        use figment::providers::{Format, Toml};
        gatehouse::config::Config::from_figment(Figment::new().merge(Toml::string(&text))).expect("valid config")
    };
    let clock = Arc::new(SystemClock::default());
    let running = gatehouse::start(config, clock.clone()).await.expect("gatehouse starts");
    assert!(running.admin_addr.ip().is_unspecified(), "admin bound off loopback");
    let base = format!("http://localhost:{}", running.public_addr.port());
    let admin = format!("http://127.0.0.1:{}", running.admin_addr.port());
    let gate = Gate { running: Some(running), clock, base, admin };
    gate.wait_ready().await;
    gate
}

async fn status(req: reqwest::RequestBuilder) -> u16 {
    req.send().await.unwrap().status().as_u16()
}

async fn session_alive(gate: &Gate, id: &str) -> bool {
    let key = gatehouse::session::SessionId::parse(id).unwrap().key();
    gate.core().exchange.store().get(&key).await.unwrap().is_some()
        && status(http().get(format!("{}/auth/me", gate.base)).header("cookie", format!("{COOKIE}={id}"))).await == 200
}

#[tokio::test]
async fn off_loopback_the_session_api_needs_the_token_and_probes_do_not() {
    let work = Workdir::new();
    let token_file = work.dir.path().join("admin-token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let gate = pod_gate(&work, &token_file).await;
    let id = logged_in(&gate, "alice").await;
    let (rec, _) = session_tokens(&gate, &id).await;
    let sub = rec.claims.sub.clone();
    let list = format!("{}/admin/v1/sessions?sub={sub}", gate.admin);
    let all = format!("{}/admin/v1/sessions?all=true", gate.admin);
    let one = format!(
        "{}/admin/v1/sessions/{}",
        gate.admin,
        gatehouse::session::SessionId::parse(&id).unwrap().key().prefix()
    );

    // Kubelet and Prometheus call the pod IP: no token, a non-loopback Host, and they get answers.
    for path in ["/healthz", "/readyz", "/metrics"] {
        let r = http().get(format!("{}{path}", gate.admin)).header("host", "10.244.1.7:9090").send().await.unwrap();
        assert_eq!(r.status(), 200, "{path} without a token");
    }

    // No token, a wrong token, a prefix of the token, another scheme: 401 and nothing revoked.
    let wrong = [
        None,
        Some("Bearer wrong-token-wrong-token-wrong-token-wrong".to_string()),
        Some(format!("Bearer {}", &TOKEN[..TOKEN.len() - 1])),
        Some(format!("Bearer {TOKEN}x")),
        Some(format!("Basic {TOKEN}")),
        Some(TOKEN.to_string()),
    ];
    for auth in &wrong {
        for req in [http().get(&list), http().delete(&list), http().delete(&all), http().delete(&one)] {
            let req = match auth {
                Some(a) => req.header("authorization", a),
                None => req,
            };
            let r = req.send().await.unwrap();
            assert_eq!(r.status(), 401, "{auth:?}");
            assert!(r.headers().get("www-authenticate").unwrap().to_str().unwrap().starts_with("Bearer"));
            let body = r.text().await.unwrap();
            assert!(!body.contains(TOKEN) && !body.contains(&sub), "{body}");
        }
    }
    assert!(session_alive(&gate, &id).await, "no refused call revoked anything");

    // The CLI: refused without a token; works with --token-file and with GATEHOUSE_ADMIN_TOKEN.
    let cli = |args: &[&str]| {
        let mut c = tokio::process::Command::new(bin());
        c.args(["sessions", "list", "--user", &sub, "--admin", &gate.admin]).args(args);
        c.env_remove("GATEHOUSE_ADMIN_TOKEN").env_remove("GATEHOUSE_ADMIN_TOKEN_FILE");
        c
    };
    let out = cli(&[]).output().await.unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--token-file"));
    let out = cli(&["--token-file", token_file.to_str().unwrap()]).output().await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&rec_prefix(&id)));
    let out = cli(&[]).env("GATEHOUSE_ADMIN_TOKEN", TOKEN).output().await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // The right token lists and revokes.
    let r: Value = http().get(&list).bearer_auth(TOKEN).send().await.unwrap().json().await.unwrap();
    assert_eq!(r["sessions"].as_array().unwrap().len(), 1, "{r}");

    // The file is re-read per call: a rotated token replaces the old one at once.
    let rotated = "rotated-admin-token-ABCDEFGHIJKLMNOPQRSTUVWXYZ012";
    std::fs::write(&token_file, rotated).unwrap();
    assert_eq!(status(http().get(&list).bearer_auth(TOKEN)).await, 401, "old token after rotation");
    assert!(session_alive(&gate, &id).await);
    let r: Value = http().delete(&all).bearer_auth(rotated).send().await.unwrap().json().await.unwrap();
    assert_eq!(r["revoked"], 1, "{r}");
    assert!(!session_alive(&gate, &id).await, "revoked with the right token");

    // An unreadable token file fails closed.
    std::fs::remove_file(&token_file).unwrap();
    assert_eq!(status(http().get(&list).bearer_auth(rotated)).await, 500);
    assert_eq!(status(http().get(format!("{}/healthz", gate.admin))).await, 200, "probes unaffected");
    gate.stop().await;
}

fn rec_prefix(id: &str) -> String {
    gatehouse::session::SessionId::parse(id).unwrap().key().prefix()
}

#[tokio::test]
async fn check_config_refuses_an_open_admin_listener_without_a_good_token() {
    let work = Workdir::new();
    let path = work.write_config(&Options::default());
    let text = std::fs::read_to_string(&path).unwrap();
    let token_file = work.dir.path().join("admin-token");
    let check = |text: String| {
        std::fs::write(&path, text).unwrap();
        let path = path.clone();
        async move {
            tokio::process::Command::new(bin()).args(["check-config", "--config"]).arg(&path).output().await.unwrap()
        }
    };
    let open = text.replace("[admin]\nlisten = \"127.0.0.1:0\"", "[admin]\nlisten = \"0.0.0.0:9090\"");
    let out = check(open.clone()).await;
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("admin.token_file") && err.contains("not loopback"), "{err}");

    let with_token =
        open.replace("0.0.0.0:9090\"", &format!("0.0.0.0:9090\"\ntoken_file = \"{}\"", token_file.display()));
    std::fs::write(&token_file, "short").unwrap();
    let out = check(with_token.clone()).await;
    assert_eq!(out.status.code(), Some(2), "a short token is refused");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("admin.token_file") && !err.contains("short"), "{err}");

    std::fs::write(&token_file, TOKEN).unwrap();
    let out = check(with_token).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("requires the bearer token"), "{stdout}");
    assert!(!stdout.contains(TOKEN));
}
