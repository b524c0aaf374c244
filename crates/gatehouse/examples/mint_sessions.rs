//! Benchmark tool: fill a session store with N live sessions for the footprint measurement
//! (`make bench`, docs/benchmarks.md "Footprint"), through the real code — not a server path.
//!
//! It loads the server's configuration file (same store, same keyring), makes **one** real login
//! at Keycloak (the password grant) so the sealed tokens have the size a Keycloak login produces,
//! and then starts N sessions with `Exchange::start`, the function every login path ends in: a fresh
//! random id each, tokens sealed with the session key as AAD, the store's indexes written. Each
//! session gets its own random `sub` and Keycloak `sid` (of the real ones' length), so the per-user
//! and per-sid indexes grow as they would with N users. The sessions are valid: the server that
//! opens the store afterwards (or shares the Redis) answers `/auth/me` for any of them.
//!
//! Not part of the server: an example binary, never in a release build, and it refuses to touch a
//! store unless it is told the Keycloak user and password of a test account.
//!
//! Usage: `mint_sessions CONFIG COUNT USERNAME PASSWORD [IDS_OUT]` — the password may also come from
//! `MINT_PASSWORD` (then pass `-`). With IDS_OUT, the session ids are written there (mode 0600, one
//! per line) so the bench can check a sample of them through the server. The embedded store's file
//! is locked by a running server: run this while it is stopped.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark tool, not product code

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use gatehouse::exchange::ClientInfo;
use gatehouse::oidc::LoginResult;

fn random_like(template: &str) -> String {
    // Same length and alphabet class as the real value (a UUID from Keycloak), random content.
    let bytes = gatehouse::crypto::random_bytes::<32>().unwrap();
    let hex = gatehouse::crypto::hex(&bytes);
    template.chars().zip(hex.chars().cycle()).map(|(t, h)| if t == '-' { '-' } else { h }).collect()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 5 {
        eprintln!("usage: mint_sessions CONFIG COUNT USERNAME PASSWORD|- [IDS_OUT]");
        std::process::exit(2);
    }
    let config = gatehouse::config::Config::load(&PathBuf::from(&args[1])).unwrap_or_else(|e| {
        eprintln!("mint_sessions: {}: {e}", args[1]);
        std::process::exit(2)
    });
    let count: usize = args[2].parse().expect("COUNT is a number");
    let password =
        if args[4] == "-" { std::env::var("MINT_PASSWORD").expect("MINT_PASSWORD") } else { args[4].clone() };
    let ids_out = args.get(5).map(PathBuf::from);

    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async move {
        let core = gatehouse::Core::build(&config, gatehouse::system_clock()).unwrap_or_else(|e| {
            eprintln!("mint_sessions: cannot open the store or the keyring: {e}");
            std::process::exit(1)
        });
        let exchange = core.exchange.clone();
        exchange.discover().await.expect("Keycloak's metadata");
        let login = exchange.password_grant(&args[3], &password).await.unwrap_or_else(|e| {
            eprintln!("mint_sessions: the login at Keycloak failed: {e}");
            std::process::exit(1)
        });
        let sealed_len = login.tokens.access_token.len()
            + login.tokens.refresh_token.as_ref().map_or(0, String::len)
            + login.tokens.id_token.as_ref().map_or(0, String::len);
        eprintln!(
            "mint_sessions: one real login (tokens {sealed_len} bytes: access {}, refresh {}, id {}); minting {count}",
            login.tokens.access_token.len(),
            login.tokens.refresh_token.as_ref().map_or(0, String::len),
            login.tokens.id_token.as_ref().map_or(0, String::len)
        );
        let login = Arc::new(login);
        let t0 = Instant::now();
        let mut ids = Vec::with_capacity(if ids_out.is_some() { count } else { 0 });
        // A few inserts in flight: the embedded store commits one at a time (each durable), Redis
        // pipelines them over its one connection.
        const IN_FLIGHT: usize = 32;
        let mut done = 0usize;
        while done < count {
            let batch = IN_FLIGHT.min(count - done);
            let mut tasks = Vec::with_capacity(batch);
            for _ in 0..batch {
                let (exchange, login) = (exchange.clone(), login.clone());
                tasks.push(tokio::spawn(async move {
                    let mut claims = login.claims.clone();
                    claims.sub = random_like(&claims.sub);
                    let one = LoginResult {
                        tokens: login.tokens.clone(),
                        claims,
                        provider_sid: login.provider_sid.as_deref().map(random_like),
                    };
                    let client = ClientInfo { ip: Some("127.0.0.1".into()), user_agent: Some("mint_sessions".into()) };
                    exchange.start(one, client).await
                }));
            }
            for t in tasks {
                match t.await.unwrap() {
                    Ok((id, _)) if ids_out.is_some() => ids.push(id.expose().to_string()),
                    Ok(_) => {}
                    Err(e) => {
                        eprintln!("mint_sessions: a session could not be started: {e}");
                        std::process::exit(1)
                    }
                }
            }
            done += batch;
            if done % 10_000 < batch {
                eprintln!("mint_sessions: {done} ({:.0}/s)", done as f64 / t0.elapsed().as_secs_f64());
            }
        }
        exchange.flush_background(std::time::Duration::from_secs(5)).await;
        if let Some(path) = ids_out {
            use std::os::unix::fs::OpenOptionsExt as _;
            let mut f =
                std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&path).unwrap();
            for id in &ids {
                writeln!(f, "{id}").unwrap();
            }
        }
        println!("{{\"sessions\":{count},\"seconds\":{:.1},\"token_bytes\":{sealed_len}}}", t0.elapsed().as_secs_f64());
    });
}
