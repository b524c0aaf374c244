//! A Gatehouse with one endpoint written in Rust: `GET /api/dashboard` answers the signed-in
//! user's identity and a summary of their PocketBase notes, in one request (docs/extending.md).
//!
//! Run: `cargo run --example dashboard -- gatehouse.toml` with a config that has a
//! `[[routes]]` entry with prefix `/api/pb/` (as `scripts/demo.sh` writes).

use axum::Json;
use axum::routing::get;
use gatehouse::extend::{Extensions, UpstreamError, User};
use serde_json::{Value, json};

/// The endpoints this binary adds to Gatehouse's public listener.
pub fn extensions() -> Extensions {
    Extensions::new().route("/api/dashboard", get(dashboard))
}

/// Identity from the session, notes from PocketBase as this user (session relay through the
/// `/api/pb/` route); only the fields the page shows.
async fn dashboard(user: User) -> Result<Json<Value>, UpstreamError> {
    let notes = user.get_json("/api/pb/", "api/collections/notes/records?perPage=5&sort=-created", 256 * 1024).await?;
    let recent: Vec<Value> = notes["items"]
        .as_array()
        .map(|items| items.iter().map(|n| json!({"id": n["id"], "title": n["title"]})).collect())
        .unwrap_or_default();
    let c = user.claims();
    Ok(Json(json!({
        "user": {"sub": c.sub, "name": c.name, "email": c.email, "username": c.preferred_username},
        "session_expires_at": user.session_expires_at(),
        "notes": {"total": notes["totalItems"], "recent": recent},
    })))
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let path = std::env::args().nth(1).unwrap_or_else(|| "gatehouse.toml".into());
    let config = match gatehouse::config::Config::load(std::path::Path::new(&path)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{path}: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match gatehouse::start_with(config, gatehouse::system_clock(), extensions()).await {
        Ok(running) => {
            running.until_signal().await;
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("gatehouse: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
