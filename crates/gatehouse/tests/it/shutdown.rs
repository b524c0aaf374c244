//! SIGTERM drains: readiness and new connections stop at once, a request in flight finishes, the
//! process exits 0 within `shutdown.drain_timeout`.

use std::time::{Duration, Instant};

use crate::bin;
use crate::harness::*;

#[tokio::test]
async fn sigterm_lets_the_request_in_flight_finish_refuses_new_connections_and_exits_in_time() {
    // An upstream that takes 2 s to answer.
    let app = axum::Router::new().fallback(|| async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        "finished"
    });
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = l.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(l, app).await });

    let work = Workdir::new();
    let extra = format!(
        "[shutdown]\ndrain_timeout = \"5s\"\n[[routes]]\nprefix = \"/api/slow/\"\nupstream = \"http://127.0.0.1:{up}/\"\nrelay = \"bearer\"\n"
    );
    let path = work.write_config(&Options { extra, ..Options::default() });
    let mut child = tokio::process::Command::new(bin())
        .args(["serve", "--config"])
        .arg(&path)
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let base = format!("http://localhost:{}", work.port);
    let mut ready = false;
    for _ in 0..200 {
        if http().get(format!("{base}/readyz")).send().await.is_ok_and(|r| r.status() == 200) {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "gatehouse serve became ready");
    let mut b = Browser::default();
    let r = b
        .post_json(&base, "/auth/login", &serde_json::json!({"username": "alice", "password": "alice-password"}))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let sid = b.cookie(&base, COOKIE).unwrap();

    let in_flight = tokio::spawn({
        let (url, sid) = (format!("{base}/api/slow/work"), sid.clone());
        async move {
            let r = http().get(url).header("cookie", format!("{COOKIE}={sid}")).send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap_or_default())
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await; // the request is at the upstream now
    let sent = Instant::now();
    let pid = child.id().unwrap().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", work.port)).await.is_err(),
        "a new connection after SIGTERM is refused"
    );
    let (status, body) = in_flight.await.unwrap();
    assert_eq!((status, body.as_str()), (200, "finished"), "the request in flight completed");
    let exit = tokio::time::timeout(Duration::from_secs(8), child.wait()).await.expect("exited").unwrap();
    assert_eq!(exit.code(), Some(0));
    assert!(sent.elapsed() < Duration::from_secs(6), "exited within the drain time: {:?}", sent.elapsed());
}

/// Connections that have sent nothing yet (browser preconnects, a load balancer's idle pool) do not
/// hold a shutdown up: they are closed at once, not after the 10 s header timeout.
#[tokio::test]
async fn a_shutdown_does_not_wait_for_connections_that_said_nothing() {
    let work = Workdir::new();
    let gate = Gate::start(&work, &Options::default()).await;
    let port = gate.running.as_ref().unwrap().public_addr.port();
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap());
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await; // accepted
    let started = std::time::Instant::now();
    gate.stop().await;
    assert!(started.elapsed() < std::time::Duration::from_secs(3), "shutdown took {:?}", started.elapsed());
    drop(silent);
}

/// An idle HTTP/1.1 keep-alive connection (served by the hand-written graceful shutdown in
/// `listener::serve_http1`) is closed at once on shutdown, not left for the drain deadline.
#[tokio::test]
async fn a_shutdown_closes_idle_keep_alive_connections_at_once() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let work = Workdir::new();
    let gate = Gate::start(&work, &Options::default()).await;
    let port = gate.running.as_ref().unwrap().public_addr.port();
    let mut idle = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 1024];
    let n = idle.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let started = Instant::now();
    gate.stop().await;
    assert!(started.elapsed() < Duration::from_secs(2), "shutdown took {:?}", started.elapsed());
    let eof = tokio::time::timeout(Duration::from_secs(2), idle.read(&mut buf)).await;
    assert!(matches!(eof, Ok(Ok(0)) | Ok(Err(_))), "the idle connection is closed: {eof:?}");
}
