//! The real `gatehouse serve` binary on a session file damaged the way a disk or a bad copy damages
//! it (issue 17): the header, an interior page, the tail, everything after the header, a
//! truncation, zero-fill. Each start either fails with exit 1 and one stderr line naming the file
//! and the recovery command, or serves — and an old session cookie gets an HTTP answer (200 or
//! 401), never a dropped connection. No output ever mentions a panic. With
//! `session.on_corrupt = "move_aside"` start-up succeeds and the damaged file is kept beside the
//! new one. Also `gatehouse sessions check` and `sessions reset`. (Every page of the file, one at a
//! time, and random damage are swept in-process by `session::embedded::damage`, which is faster.)

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may fail loudly

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use gatehouse_testkit::*;

const PAGE: usize = 4096;

/// The binary under test; `GATEHOUSE_BIN` overrides it (a copy, when the target dir is shared).
fn gatehouse() -> std::path::PathBuf {
    std::env::var_os("GATEHOUSE_BIN").map(Into::into).unwrap_or_else(|| bin().to_path_buf())
}

struct Serve {
    child: Child,
    out: std::path::PathBuf,
    err: std::path::PathBuf,
}

impl Serve {
    fn start(config: &Path, dir: &Path, tag: &str) -> Self {
        let out = dir.join(format!("{tag}.stdout"));
        let err = dir.join(format!("{tag}.stderr"));
        let child = Command::new(gatehouse())
            .args(["serve", "--config"])
            .arg(config)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::from(std::fs::File::create(&out).unwrap()))
            .stderr(Stdio::from(std::fs::File::create(&err).unwrap()))
            .spawn()
            .unwrap();
        Self { child, out, err }
    }

    /// `Ok(())` once the public listener answers, `Err(exit code)` if the process ends first.
    async fn wait(&mut self, base: &str) -> Result<(), i32> {
        for _ in 0..300 {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Err(status.code().unwrap_or(-1));
            }
            if let Ok(r) = http().get(format!("{base}/readyz")).send().await
                && r.status() == 200
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("gatehouse neither became ready nor exited");
    }

    /// SIGTERM, wait, and return (exit code, stdout + stderr).
    fn stop(mut self) -> (i32, String) {
        if self.child.try_wait().unwrap().is_none() {
            Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        }
        let code = self.child.wait().unwrap().code().unwrap_or(-1);
        let text = std::fs::read_to_string(&self.out).unwrap() + &std::fs::read_to_string(&self.err).unwrap();
        (code, text)
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn no_panic(case: &str, text: &str) {
    for word in ["panicked", "RUST_BACKTRACE", "stack backtrace"] {
        assert!(!text.contains(word), "{case}: output mentions `{word}`:\n{text}");
    }
}

fn garbage(bytes: &mut [u8], seed: u64) {
    let mut x = seed | 1;
    for b in bytes {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
}

#[tokio::test]
async fn the_binary_on_a_damaged_session_file_fails_cleanly_or_serves() {
    let work = Workdir::new();
    let config = work.write_config(&Options::default());
    let store = work.dir.path().join("sessions.redb");
    let base = format!("http://localhost:{}", work.port);
    let me = format!("{base}/auth/me");

    // A real session, made by a real login through the binary.
    let mut serve = Serve::start(&config, work.dir.path(), "pristine");
    serve.wait(&base).await.expect("starts on a fresh file");
    let mut b = Browser::default();
    let r = b
        .post_json(&base, "/auth/login", &serde_json::json!({"username": "alice", "password": "alice-password"}))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(b.get(&me).await.status, 200);
    let (code, text) = serve.stop();
    assert_eq!(code, 0, "{text}");
    let pristine = std::fs::read(&store).unwrap();
    let pages = pristine.len().div_ceil(PAGE);
    assert!(pages > 4, "{pages} pages");

    // `sessions check` on the intact file.
    let check = Command::new(gatehouse()).args(["sessions", "check", "--store"]).arg(&store).output().unwrap();
    let report = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success(), "{report}{}", String::from_utf8_lossy(&check.stderr));
    assert!(report.contains("integrity check passed") && report.contains("sessions            1"), "{report}");

    type Damage = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(&str, Damage, bool)> = vec![
        ("header page", Box::new(|b| garbage(&mut b[..PAGE], 1)), true),
        ("interior page", Box::new(move |b| garbage(&mut b[(pages / 2) * PAGE..(pages / 2 + 1) * PAGE], 2)), false),
        ("tail page", Box::new(move |b| garbage(&mut b[(pages - 1) * PAGE..], 3)), false),
        ("every page after the header", Box::new(|b| garbage(&mut b[PAGE..], 4)), true),
        ("truncated to half", Box::new(|b| b.truncate(b.len() / 2)), true),
        ("zero-filled", Box::new(|b| b.fill(0)), true),
    ];
    for (case, damage, must_fail) in &cases {
        let mut bytes = pristine.clone();
        damage(&mut bytes);
        std::fs::write(&store, &bytes).unwrap();
        let mut serve = Serve::start(&config, work.dir.path(), case);
        match serve.wait(&base).await {
            Err(code) => {
                let err = serve.stderr();
                println!("{case}: start-up refused: {}", err.trim());
                assert_eq!(code, 1, "{case}: exit code\n{err}");
                let lines: Vec<_> = err.lines().collect();
                assert_eq!(lines.len(), 1, "{case}: one line on stderr:\n{err}");
                assert!(lines[0].contains(&store.display().to_string()), "{case}: names the file: {err}");
                assert!(
                    lines[0].contains(&format!("gatehouse sessions reset --store {}", store.display())),
                    "{case}: names the recovery command: {err}"
                );
                no_panic(case, &serve.stop().1);
            }
            Ok(()) => {
                assert!(!must_fail, "{case}: a file this damaged must not start");
                // The old cookie gets an answer: its session, or 401 — never a dropped connection.
                let status = b.get(&me).await.status;
                println!("{case}: started; the old session answers {status}");
                assert!(status == 200 || status == 401, "{case}: /auth/me answered {status}");
                let (code, text) = serve.stop();
                assert_eq!(code, 0, "{case}: {text}");
                no_panic(case, &text);
            }
        }
    }

    // Without the start-up check, damage is met at run time: every request still gets an answer
    // (the old cookie 200 or 401, a new login 200 or 503 `store_unavailable`), and nothing panics.
    let unchecked = work.dir.path().join("unchecked.toml");
    std::fs::write(
        &unchecked,
        std::fs::read_to_string(&config).unwrap().replace("[session]\n", "[session]\nintegrity_check = false\n"),
    )
    .unwrap();
    // A flipped byte inside the session record itself (every copy of it in the file): the
    // username `alice` → `Alice` in the binary metadata (field 5 of the claims, 5 bytes), which
    // still decodes — only the record's checksum finds it.
    let record_flip: Damage = Box::new(|b| {
        let needle = b"\x2a\x05alice";
        let at: Vec<usize> =
            b.windows(needle.len()).enumerate().filter(|(_, w)| *w == needle).map(|(i, _)| i).collect();
        assert!(!at.is_empty(), "the record is in the file");
        for i in at {
            b[i + 2] ^= 0x20;
        }
    });
    let mut bytes = pristine.clone();
    record_flip(&mut bytes);
    std::fs::write(&store, &bytes).unwrap();
    let mut serve = Serve::start(&config, work.dir.path(), "record byte");
    assert_eq!(serve.wait(&base).await, Err(1), "the start-up check finds a flipped byte in a record");
    no_panic("record byte", &serve.stop().1);
    let mut unchecked_cases: Vec<(&str, &Damage)> = cases[1..4].iter().map(|(c, d, _)| (*c, d)).collect();
    unchecked_cases.push(("record byte", &record_flip));
    for (case, damage) in unchecked_cases {
        let mut bytes = pristine.clone();
        damage(&mut bytes);
        std::fs::write(&store, &bytes).unwrap();
        let mut serve = Serve::start(&unchecked, work.dir.path(), &format!("unchecked {case}"));
        match serve.wait(&base).await {
            Err(code) => {
                let err = serve.stderr();
                println!("unchecked {case}: start-up refused: {}", err.trim());
                assert_eq!(code, 1, "unchecked {case}: {err}");
                assert!(err.contains(&store.display().to_string()), "unchecked {case}: {err}");
                no_panic(case, &serve.stop().1);
            }
            Ok(()) => {
                let old = b.get(&me).await.status;
                if case == "record byte" {
                    assert_eq!(old, 401, "a record that fails its checksum authenticates nobody");
                }
                let mut fresh = Browser::default();
                let login = fresh
                    .post_json(
                        &base,
                        "/auth/login",
                        &serde_json::json!({"username": "bob", "password": "bob-password"}),
                    )
                    .await;
                println!("unchecked {case}: started; old session {old}, new login {}", login.status);
                assert!(old == 200 || old == 401, "unchecked {case}: /auth/me answered {old}");
                assert!(
                    login.status == 200 || (login.status == 503 && login.body.contains("store_unavailable")),
                    "unchecked {case}: login answered {} {}",
                    login.status,
                    login.body
                );
                let ready = http().get(format!("{base}/readyz")).send().await.unwrap().status().as_u16();
                if login.status == 503 {
                    assert_eq!(ready, 503, "unchecked {case}: readiness reflects an unusable file");
                }
                let (code, text) = serve.stop();
                assert_eq!(code, 0, "unchecked {case}: {text}");
                no_panic(case, &text);
            }
        }
    }

    // `sessions check` on a damaged file: exit 1, one line naming it.
    let mut bytes = pristine.clone();
    garbage(&mut bytes[PAGE..], 5);
    std::fs::write(&store, &bytes).unwrap();
    let check = Command::new(gatehouse()).args(["sessions", "check", "--store"]).arg(&store).output().unwrap();
    let err = String::from_utf8_lossy(&check.stderr);
    assert_eq!(check.status.code(), Some(1), "{err}");
    assert!(err.contains(&store.display().to_string()) && err.contains("damaged"), "{err}");
    no_panic("check", &err);

    // `sessions reset` asks first; a "no" changes nothing.
    let mut reset = Command::new(gatehouse())
        .args(["sessions", "reset", "--store"])
        .arg(&store)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(reset.stdin.as_mut().unwrap(), b"no\n").unwrap();
    let out = reset.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(std::fs::read(&store).unwrap(), bytes, "not confirmed: the file is untouched");

    // move_aside: start-up succeeds on the damaged file, which is kept beside the new one.
    let aside_config = work.dir.path().join("aside.toml");
    std::fs::write(
        &aside_config,
        std::fs::read_to_string(&config).unwrap().replace("[session]\n", "[session]\non_corrupt = \"move_aside\"\n"),
    )
    .unwrap();
    let mut serve = Serve::start(&aside_config, work.dir.path(), "move-aside");
    serve.wait(&base).await.expect("move_aside starts on a damaged file");
    assert_eq!(b.get(&me).await.status, 401, "the old session is gone with the old file");
    let (code, text) = serve.stop();
    assert_eq!(code, 0, "{text}");
    no_panic("move_aside", &text);
    assert!(text.contains("THE SESSION FILE IS DAMAGED"), "logged loudly:\n{text}");
    let aside: Vec<_> = std::fs::read_dir(work.dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("sessions.redb.damaged-"))
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert_eq!(std::fs::read(&aside[0]).unwrap(), bytes, "the damaged file is kept as it was");

    // `sessions reset --yes` moves the (now fresh) file aside without asking.
    let out = Command::new(gatehouse()).args(["sessions", "reset", "--yes", "--store"]).arg(&store).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!store.exists());
}

/// The `gatehouse` binary Cargo built for these tests.
fn bin() -> &'static std::path::Path {
    std::path::Path::new(env!("CARGO_BIN_EXE_gatehouse"))
}
