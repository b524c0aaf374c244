//! Demo hygiene (issue 18): what the demo ships must say it is a demo, must not make online
//! password guessing free, and must not put a password on a command line. These run the demo's
//! own generators (`scripts/lib/platform.sh`) and read its scripts; no Keycloak is needed. The
//! brute-force settings take effect when the demo's Keycloak imports its realm (checked by hand
//! against a real Keycloak: 10 wrong passwords, then the right one is refused).

use std::path::PathBuf;

use serde_json::Value;

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..").join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Runs a function of `scripts/lib/platform.sh` with bash.
fn platform(call: &str) {
    let status = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!("set -eu; source '{}'; {call}", repo("scripts/lib/platform.sh").display()))
        .status()
        .unwrap();
    assert!(status.success(), "{call}");
}

#[test]
fn the_demo_realm_locks_out_password_guessing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("gatehouse-realm.json");
    platform(&format!("platform_demo_realm '{}'", out.display()));
    let realm: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(realm["bruteForceProtected"], true, "brute-force protection is on");
    // Temporary lockouts only: a permanent one would let anyone disable the demo users.
    assert_eq!(realm["permanentLockout"], false);
    let failures = realm["failureFactor"].as_u64().expect("failureFactor set");
    assert!((3..=30).contains(&failures), "failureFactor {failures}: a handful of guesses, not thousands");
    let wait = realm["waitIncrementSeconds"].as_u64().expect("waitIncrementSeconds set");
    assert!(wait >= 30, "a lockout lasts long enough to matter: {wait}s");
    // Everything else is the test realm's: the demo behaves as the tests prove.
    let mut base: Value = serde_json::from_str(&read("deploy/keycloak/gatehouse-realm.json")).unwrap();
    let (demo, base) = (realm.as_object().unwrap(), base.as_object_mut().unwrap());
    for (k, v) in base.iter() {
        if k != "bruteForceProtected" {
            assert_eq!(demo.get(k), Some(v), "{k} differs from the test realm");
        }
    }
    // And the demo really uses it.
    assert!(
        read("scripts/demo.sh")
            .contains("GATEHOUSE_REALM_FILE=\"$DEMO_DIR/gatehouse-realm.json\" scripts/keycloak.sh start")
    );
}

#[test]
fn no_password_goes_on_a_command_line() {
    for script in ["scripts/demo.sh", "scripts/e2e.sh", "scripts/lib/platform.sh"] {
        for (n, line) in read(script).lines().enumerate() {
            let code = line.split('#').next().unwrap_or("");
            assert!(
                !(code.contains("superuser upsert ") || code.contains("superuser create ")),
                "{script}:{}: a PocketBase superuser password as an argument (use `superuser upsert-stdin`): {line}",
                n + 1
            );
        }
    }
    assert!(read("scripts/demo.sh").contains("superuser upsert-stdin"), "the demo still creates its superuser");
}

#[test]
fn the_generated_config_says_it_is_for_the_demo_only() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("gatehouse.toml");
    platform(&format!(
        "PUBLIC_PORT=1 INTERNAL_PORT=2 ADMIN_PORT=3 PB_PORT=4 ISSUER=http://localhost:5/realms/gatehouse \
         SECRET_FILE=s KEY_FILE=k STORE_PATH=p PKI_DIR=d STATIC_DIR=w platform_config '{}'",
        out.display()
    ));
    let text = std::fs::read_to_string(&out).unwrap();
    let header: String = text.lines().take_while(|l| l.starts_with('#') || l.is_empty()).collect::<Vec<_>>().join("\n");
    for needle in ["DEMO", "NOT A PRODUCTION CONFIGURATION", "password_login", "plain http", "admin/admin"] {
        assert!(header.contains(needle), "the header names `{needle}`:\n{header}");
    }
    assert!(text.contains("password_login = true"), "the demo config is what the header describes");
}
