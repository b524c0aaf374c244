//! The `gatehouse` binary as an operator meets it: output into pipes, messages, key roles, the
//! PKI tool's rules.

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};

use crate::bin;
use crate::harness::*;

fn check_config(path: &std::path::Path) -> std::process::Output {
    Command::new(bin()).args(["check-config", "--config"]).arg(path).output().unwrap()
}

/// `gatehouse check-config | head -1`: the reader leaves after one line; the binary ends quietly
/// (no panic, no exit 101).
#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    let work = Workdir::new();
    let routes =
        "[[routes]]\nprefix = \"/api/a/\"\nupstream = \"http://127.0.0.1:9/\"\nrelay = \"session\"\n".to_string();
    let path = work.write_config(&Options { extra: routes, ..Options::default() });
    // The reader is gone before the binary writes its first line (as `head` is after its first).
    let mut child = Command::new(bin())
        .args(["check-config", "--config"])
        .arg(&path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let status = child.wait().unwrap();
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert_ne!(status.code(), Some(101), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// check-config speaks the configuration's own words: `relay = "session"`, the store and only its
/// settings, the session keys' roles by id (never the key).
#[test]
fn check_config_prints_user_facing_names_and_key_roles() {
    let work = Workdir::new();
    let routes = "[[routes]]\nprefix = \"/api/a/\"\nupstream = \"http://127.0.0.1:9/\"\nrelay = \"session\"\n";
    let path = work.write_config(&Options { extra: routes.into(), ..Options::with_internal(&["pocketbase"]) });
    let out = check_config(&path);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("(relay = \"session\")"), "{text}");
    assert!(text.contains("mode = \"mtls\""), "{text}");
    assert!(text.contains("session store     embedded file "), "{text}");
    assert!(text.contains("session keys      seals "), "{text}");
    assert!(text.contains("single-label"), "a bare allow-list word is explained: {text}");
    for debug_form in ["Some(", "Session)", "Mtls", "Embedded", &work.key] {
        assert!(!text.contains(debug_form), "`{debug_form}` in: {text}");
    }

    // A rotation in phase 1: the next key is named by id; a key listed twice is refused.
    let next = test_key();
    std::fs::write(work.dir.path().join("next"), &next).unwrap();
    let cfg = std::fs::read_to_string(&path).unwrap();
    let with_next = cfg.replace(
        "[session]\n",
        &format!("[session]\nnext_encryption_key_file = \"{}\"\n", work.dir.path().join("next").display()),
    );
    std::fs::write(&path, &with_next).unwrap();
    let out = check_config(&path);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("; also opens next "), "{text}");
    assert!(!text.contains(&next), "no key in the output");
    std::fs::write(work.dir.path().join("next"), &work.key).unwrap();
    let out = check_config(&path);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("session.next_encryption_key_file"));
}

/// `pki issue` refuses what the allow-list would refuse (one parser), and `pki init --san` puts the
/// in-cluster names on the server certificate.
#[test]
fn the_pki_tool_applies_the_allow_list_rules_and_takes_extra_server_names() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(bin())
        .args(["pki", "init", "--out"])
        .arg(dir.path())
        .args(["--san", "gatehouse-internal.auth.svc.cluster.local", "--san", "10.0.0.7"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let pem = std::fs::read(dir.path().join("gatehouse.crt")).unwrap();
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
    let cert = pem.parse_x509().unwrap();
    let sans = format!("{:?}", cert.subject_alternative_name().unwrap().unwrap().value.general_names);
    assert!(sans.contains("gatehouse-internal.auth.svc.cluster.local") && sans.contains("localhost"), "{sans}");
    for (flag, value) in [
        ("--spiffe", "spiffe://Cluster.local/ns/data/sa/pb"),
        ("--spiffe", "spiffe://cluster.local:443/ns/data/sa/pb"),
        ("--dns", "Pocketbase.data.svc"),
        ("--dns", "pocket_base.data.svc"),
    ] {
        let out = Command::new(bin())
            .args(["pki", "issue", "--ca"])
            .arg(dir.path())
            .args(["--name", "pb", flag, value, "--out"])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{value} was issued");
        assert!(!dir.path().join("pb.crt").exists());
    }
    let out = Command::new(bin())
        .args(["pki", "init", "--out"])
        .arg(dir.path().join("x"))
        .args(["--san", "Bad_Name"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

/// Text logs written into a pipe or file carry no ANSI colour codes.
#[tokio::test]
async fn logs_into_a_pipe_have_no_colour_codes() {
    let work = Workdir::new();
    let path = work.write_config(&Options::default());
    let mut child = Command::new(bin())
        .args(["serve", "--config"])
        .arg(&path)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let lines = tokio::task::spawn_blocking(move || {
        BufReader::new(stdout).lines().take(2).collect::<Result<Vec<_>, _>>().unwrap_or_default()
    });
    let lines = tokio::time::timeout(std::time::Duration::from_secs(30), lines).await.unwrap().unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(!lines.is_empty(), "the server logged something");
    for l in &lines {
        assert!(!l.contains('\u{1b}'), "ANSI escape in a piped log line: {l:?}");
    }
}

/// `gatehouse sessions`: a table for people, JSON with `-o json`, look-ups by username and e-mail,
/// every session a page at a time, a clear word when nothing matched, and confirmation before
/// revoking everything.
#[tokio::test]
async fn the_sessions_command_serves_people_and_scripts() {
    let work = Workdir::new();
    let gate = Gate::start(&work, &Options::default()).await;
    let (a, b) = (logged_in(&gate, "alice").await, logged_in(&gate, "bob").await);
    let cli = |args: &[&str]| {
        let mut c = tokio::process::Command::new(bin());
        c.arg("sessions").args(args).args(["--admin", &gate.admin]);
        c.env_remove("GATEHOUSE_ADMIN_TOKEN").env_remove("GATEHOUSE_ADMIN_TOKEN_FILE");
        c
    };
    let text = |o: &std::process::Output| String::from_utf8_lossy(&o.stdout).to_string();
    let prefix = |sid: &str| gatehouse::session::SessionId::parse(sid).unwrap().key().prefix();

    let out = cli(&["list", "--username", "ALICE"]).output().await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let table = text(&out);
    assert!(table.starts_with("SESSION") && table.contains(&prefix(&a)) && table.contains("alice"), "{table}");
    assert!(table.contains(" ago)") && !table.contains(&prefix(&b)), "{table}");

    let out = cli(&["list", "--email", "bob@example.com", "-o", "json"]).output().await.unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["sessions"][0]["session"], prefix(&b).as_str(), "{json}");

    let out = cli(&["list", "--username", "nobody"]).output().await.unwrap();
    assert!(out.status.success());
    assert!(text(&out).contains("no live sessions for username `nobody`"), "{}", text(&out));

    // Every session, one per page.
    let out = cli(&["list", "--all", "--limit", "1", "-o", "json"]).output().await.unwrap();
    let page1: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let next = page1["next"].as_str().expect("a next page").to_string();
    let out = cli(&["list", "--all", "--limit", "1", "--after", &next, "-o", "json"]).output().await.unwrap();
    let page2: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut seen = vec![page1["sessions"][0]["session"].clone(), page2["sessions"][0]["session"].clone()];
    seen.sort_by_key(|v| v.to_string());
    let mut expected = vec![serde_json::Value::from(prefix(&a)), serde_json::Value::from(prefix(&b))];
    expected.sort_by_key(|v| v.to_string());
    assert_eq!(seen, expected, "both sessions, one per page");
    assert!(page2["next"].is_null());

    // No selector: the message names the alternatives.
    let out = cli(&["revoke"]).output().await.unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--user") && err.contains("--session") && err.contains("--all"), "{err}");

    // One user's sessions: bob's end, alice's stays (the embedded store; the Redis store's
    // revocations are in `replicas.rs`).
    let a2 = logged_in(&gate, "alice").await;
    let me = |sid: String| {
        let base = gate.base.clone();
        async move {
            http()
                .get(format!("{base}/auth/me"))
                .header("cookie", format!("{COOKIE}={sid}"))
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    let bob_sub = json["sessions"][0]["sub"].as_str().expect("sub in the listing").to_string();
    let out = cli(&["revoke", "--user", &bob_sub]).output().await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(me(b.clone()).await, 401, "bob's session revoked");
    assert_eq!(me(a.clone()).await, 200, "alice's kept");
    assert_eq!(me(a2.clone()).await, 200, "alice's second session kept");
    let out = cli(&["revoke", "--user", &bob_sub]).output().await.unwrap();
    assert!(out.status.success(), "revoking a user with no sessions left is not an error");

    // Revoking everything asks first; anything but `yes` revokes nothing.
    let mut c = cli(&["revoke", "--all"]);
    c.stdin(Stdio::piped()).stdout(Stdio::piped());
    let mut child = c.spawn().unwrap();
    {
        use tokio::io::AsyncWriteExt;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"no\n").await.unwrap();
    }
    let out = child.wait_with_output().await.unwrap();
    assert!(!out.status.success());
    assert_eq!(me(a.clone()).await, 200, "nothing revoked without confirmation");
    let out = cli(&["revoke", "--all", "--yes"]).output().await.unwrap();
    assert!(out.status.success());
    assert_eq!(me(a.clone()).await, 401);
    assert_eq!(me(a2.clone()).await, 401, "every session ends");
    let out = cli(&["list", "--all", "-o", "json"]).output().await.unwrap();
    let left: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(left["sessions"].as_array().map(Vec::len), Some(0), "nothing left: {left}");
    gate.stop().await;
}

/// The curl commands in docs/internal-api.md, run as written (only the paths, port and session id
/// filled in): an operator can paste them.
#[tokio::test]
async fn the_documented_curl_commands_work() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/internal-api.md")).unwrap();
    let commands: Vec<String> = doc
        .split("```sh\n")
        .skip(1)
        .filter_map(|b| b.split("```").next())
        .filter(|b| b.starts_with("curl --cert pki/pocketbase.crt"))
        .map(|b| b.replace("\\\n", " "))
        .collect();
    assert_eq!(commands.len(), 2, "both curl examples found");
    let work = Workdir::new();
    let gate = Gate::start(&work, &Options::with_internal(&["spiffe://cluster.local/ns/data/sa/pocketbase"])).await;
    let sid = logged_in(&gate, "alice").await;
    gatehouse::pki::issue_to_dir(
        &work.pki(),
        "pocketbase",
        gatehouse::pki::San::Uri("spiffe://cluster.local/ns/data/sa/pocketbase".into()),
        &work.pki(),
    )
    .unwrap();
    let port = gate.internal().rsplit(':').next().unwrap().to_string();
    for cmd in commands {
        let cmd = cmd.trim_end().replace("https://localhost:8443", &format!("https://localhost:{port}"));
        // Async: the Gatehouse under test runs on this test's runtime.
        let out = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(format!("{cmd} --silent --show-error --fail-with-body --max-time 20"))
            .current_dir(work.dir.path())
            .env("SID", &sid)
            .output()
            .await
            .unwrap();
        let body = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{cmd}\n{body}{}", String::from_utf8_lossy(&out.stderr));
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert!(looks_like_jwt(json["access_token"].as_str().unwrap()), "{cmd}");
    }
    gate.stop().await;
}
