//! The cross-replica refresh lock holds when Keycloak is slower than the lock's initial lease
//! (its own test binary: it freezes the shared test Keycloak with SIGSTOP, which would disturb
//! tests running beside it). Two replicas share one Redis; the refresh that holds the lock waits
//! 8 s for a frozen Keycloak while the lease (5 s) is renewed; the other requests wait and then
//! use the refreshed token. Keycloak must count exactly one refresh.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may fail loudly

use std::process::Command;
use std::time::Duration;

use gatehouse_testkit::*;

/// The test Keycloak's process id, from the pid file `scripts/keycloak.sh` keeps (never a
/// pattern match over every process on the machine).
fn keycloak_pid() -> String {
    let cache = std::env::var("GATEHOUSE_CACHE")
        .unwrap_or_else(|_| format!("{}/.cache/gatehouse", std::env::var("HOME").unwrap_or_default()));
    let file = format!("{cache}/keycloak/instances/test/keycloak.pid");
    std::fs::read_to_string(&file)
        .unwrap_or_else(|e| panic!("{file}: {e} (is the test Keycloak running?)"))
        .trim()
        .to_string()
}

fn signal_keycloak(sig: &str) {
    // kc.sh execs the JVM in the process group `scripts/keycloak.sh` started (setsid): signal it.
    let ok = Command::new("kill").args([sig, "--", &format!("-{}", keycloak_pid())]).status().unwrap().success();
    assert!(ok, "test Keycloak's JVM signalled");
}

/// Thaws Keycloak even if an assertion fails.
struct Thaw;
impl Drop for Thaw {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-CONT", "--", &format!("-{}", keycloak_pid())]).status();
    }
}

#[tokio::test]
async fn a_keycloak_slower_than_the_lock_lease_still_gets_exactly_one_refresh() {
    let redis = Redis::start().await;
    let base = Options { http_timeout: "30s", ..Options::short_tokens() };
    let (_wa, a, _wb, b) = replica_pair(&redis, base).await;
    let sid = logged_in(&a, "alice").await;
    let (rec, _) = session_tokens(&a, &sid).await;
    let admin = KcAdmin::connect().await;
    tokio::time::sleep(Duration::from_secs(11)).await; // the access token is now expired

    signal_keycloak("-STOP");
    let thaw = Thaw;
    let mut tasks = Vec::new();
    for i in 0..20 {
        let (url, sid) = (format!("{}/auth/me", if i % 2 == 0 { &a.base } else { &b.base }), sid.clone());
        tasks.push(tokio::spawn(async move {
            http().get(url).header("cookie", format!("{COOKIE}={sid}")).send().await.unwrap().status().as_u16()
        }));
    }
    tokio::time::sleep(Duration::from_secs(8)).await; // longer than the 5 s lease
    signal_keycloak("-CONT");
    drop(thaw);
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200, "every request answered once Keycloak is back");
    }
    assert_eq!(admin.refresh_events(rec.provider_sid.as_deref().unwrap()).await, 1, "exactly one refresh at Keycloak");
    a.stop().await;
    b.stop().await;
}
