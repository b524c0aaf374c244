//! The `gatehouse` command: `serve`, `check-config`, `sessions` (admin API, and the embedded
//! store's file: `check`, `reset`), `pki`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

// mimalloc instead of glibc malloc: per-request allocations (decoded claims, JSON answers) were
// ~15 % of server CPU under load with the system allocator (see docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use gatehouse::config::Config;

#[derive(Parser)]
#[command(name = "gatehouse", version, about = "Access-control gateway: OIDC BFF with server-side sessions")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        #[arg(long, short, env = "GATEHOUSE_CONFIG", default_value = "gatehouse.toml")]
        config: PathBuf,
    },
    /// Validate a configuration file (and its secrets) and explain what it sets up.
    CheckConfig {
        #[arg(long, short, env = "GATEHOUSE_CONFIG", default_value = "gatehouse.toml")]
        config: PathBuf,
    },
    /// List or revoke sessions through the admin listener; check or reset the embedded store's file.
    Sessions {
        /// Base URL of the admin listener.
        #[arg(long, global = true, env = "GATEHOUSE_ADMIN_URL", default_value = "http://127.0.0.1:9090")]
        admin: String,
        #[command(subcommand)]
        command: SessionsCommand,
    },
    /// A development PKI for the internal listener (use your real CA in production).
    Pki {
        #[command(subcommand)]
        command: PkiCommand,
    },
}

#[derive(Subcommand)]
enum SessionsCommand {
    /// A user's sessions (hash prefixes, times, client), by Keycloak subject id.
    List {
        #[arg(long)]
        user: String,
    },
    /// Revoke sessions (and their refresh tokens at Keycloak).
    Revoke {
        /// Every session of this user (Keycloak subject id).
        #[arg(long, conflicts_with_all = ["session", "all"], required_unless_present_any = ["session", "all"])]
        user: Option<String>,
        /// One session, by at least 8 hex characters of its hash.
        #[arg(long, conflicts_with = "all")]
        session: Option<String>,
        /// Every session.
        #[arg(long)]
        all: bool,
    },
    /// Check the embedded store's file (Gatehouse stopped): integrity, counts. Exit 1 if damaged.
    Check {
        /// The file (`session.path`).
        #[arg(long)]
        store: PathBuf,
    },
    /// Move the embedded store's file aside (Gatehouse stopped); the next start begins empty and
    /// every user signs in again.
    Reset {
        /// The file (`session.path`).
        #[arg(long)]
        store: PathBuf,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Subcommand)]
enum PkiCommand {
    /// Create a CA (`ca.crt`, `ca.key`) and Gatehouse's server certificate (`gatehouse.crt`, `gatehouse.key`).
    Init {
        #[arg(long)]
        out: PathBuf,
    },
    /// Issue a client certificate `NAME.crt`/`NAME.key` signed by the CA in `--ca`.
    Issue {
        #[arg(long)]
        ca: PathBuf,
        #[arg(long)]
        name: String,
        /// The caller's SPIFFE ID, e.g. spiffe://cluster.local/ns/data/sa/pocketbase
        #[arg(long, conflicts_with = "dns", required_unless_present = "dns")]
        spiffe: Option<String>,
        /// A DNS name, for callers without SPIFFE IDs.
        #[arg(long)]
        dns: Option<String>,
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { config } => check_config(&config),
        Command::Serve { config } => serve(&config),
        Command::Pki { command } => pki(command),
        Command::Sessions { admin, command } => sessions(&admin, command),
    }
}

/// `sessions check`: the report on stdout; damage on stderr (one line) and exit 1.
fn sessions_check(store: &Path) -> ExitCode {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
    match gatehouse::session::embedded::check_file(store, now) {
        Ok(r) => {
            println!("{}: the integrity check passed", store.display());
            if r.rolled_back {
                println!("  note: the newest commit was damaged; the previous commit is in use");
            }
            println!("  file size           {} bytes", r.file_bytes);
            println!("  sessions            {} ({} expired, not yet swept)", r.sessions, r.expired);
            println!("  unreadable records  {}", r.unreadable);
            println!("  user index entries  {}", r.user_index_entries);
            println!("  sid index entries   {}", r.sid_index_entries);
            println!("  expiry index        {}", r.expiry_index_entries);
            println!("  marks               {}", r.marks);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("gatehouse sessions check: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `sessions reset`: rename the file after a confirmation. Refuses while a process holds it.
fn sessions_reset(store: &Path, yes: bool) -> ExitCode {
    if !store.exists() {
        eprintln!("gatehouse sessions reset: {} does not exist", store.display());
        return ExitCode::FAILURE;
    }
    if gatehouse::session::embedded::in_use(store) {
        eprintln!("gatehouse sessions reset: {} is in use by a running Gatehouse; stop it first", store.display());
        return ExitCode::FAILURE;
    }
    if !yes {
        use std::io::{BufRead, Write};
        print!(
            "Move {} aside? Every session ends and every user signs in again. Type `yes` to go on: ",
            store.display()
        );
        let _ = std::io::stdout().flush();
        let mut answer = String::new();
        if std::io::stdin().lock().read_line(&mut answer).is_err() || answer.trim() != "yes" {
            eprintln!("gatehouse sessions reset: not confirmed; nothing changed");
            return ExitCode::FAILURE;
        }
    }
    match gatehouse::session::embedded::move_aside(store) {
        Ok(to) => {
            println!("moved {} to {}; the next start begins with an empty store", store.display(), to.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("gatehouse sessions reset: cannot move {} aside: {e}", store.display());
            ExitCode::FAILURE
        }
    }
}

fn sessions(admin: &str, command: SessionsCommand) -> ExitCode {
    let base = admin.trim_end_matches('/');
    let enc = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let (method, url) = match &command {
        SessionsCommand::List { user } => (reqwest::Method::GET, format!("{base}/admin/v1/sessions?sub={}", enc(user))),
        SessionsCommand::Revoke { user: Some(u), .. } => {
            (reqwest::Method::DELETE, format!("{base}/admin/v1/sessions?sub={}", enc(u)))
        }
        SessionsCommand::Revoke { session: Some(p), .. } => {
            (reqwest::Method::DELETE, format!("{base}/admin/v1/sessions/{}", enc(p)))
        }
        SessionsCommand::Revoke { all: true, .. } => {
            (reqwest::Method::DELETE, format!("{base}/admin/v1/sessions?all=true"))
        }
        SessionsCommand::Revoke { .. } => {
            eprintln!("sessions revoke: give --user, --session or --all");
            return ExitCode::from(2);
        }
        SessionsCommand::Check { store } => return sessions_check(store),
        SessionsCommand::Reset { store, yes } => return sessions_reset(store, *yes),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let client = reqwest::Client::new();
        let resp = match client.request(method, &url).timeout(std::time::Duration::from_secs(30)).send().await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("sessions: cannot reach the admin listener at {base}: {}", e.without_url());
                return ExitCode::FAILURE;
            }
        };
        let ok = resp.status().is_success();
        let body: serde_json::Value = resp.json().await.unwrap_or(serde_json::Value::Null);
        println!("{}", serde_json::to_string_pretty(&body).unwrap_or_default());
        if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE }
    })
}

fn pki(command: PkiCommand) -> ExitCode {
    use gatehouse::pki;
    let result = match command {
        PkiCommand::Init { out } => pki::init(&out),
        PkiCommand::Issue { ca, name, spiffe, dns, out } => {
            let san = match (spiffe, dns) {
                (Some(id), _) => pki::San::Uri(id),
                (None, Some(d)) => pki::San::Dns(d),
                (None, None) => {
                    eprintln!("pki issue: give --spiffe or --dns");
                    return ExitCode::from(2);
                }
            };
            pki::issue_to_dir(&ca, &name, san, &out)
        }
    };
    match result {
        Ok(files) => {
            for f in files {
                println!("wrote {}", f.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("pki: {e}");
            ExitCode::FAILURE
        }
    }
}

fn check_config(path: &Path) -> ExitCode {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{}: invalid configuration: {e}", path.display());
            return ExitCode::from(2);
        }
    };
    // Secrets and keys are checked too, without printing them.
    if let Err(e) = gatehouse::load_secrets(&config) {
        eprintln!("{}: invalid configuration: {e}", path.display());
        return ExitCode::from(2);
    }
    // Route TLS files (CA, client certificate) are loaded the way `serve` loads them.
    if let Err(e) = gatehouse::public::proxy::Proxy::new(&config) {
        eprintln!("{}: invalid configuration: {e}", path.display());
        return ExitCode::from(2);
    }
    println!("{}: configuration is valid", path.display());
    println!("  public listener   {} (external URL {})", config.public.listen, config.public_origin());
    println!("  redirect URI      {}", config.redirect_uri());
    println!("  session cookie    {}", config.cookie().name);
    println!("  identity provider {} (client `{}`)", config.oidc.issuer, config.oidc.client_id);
    println!("  session store     {:?} {}", config.session.store, config.session.path.display());
    println!("  admin listener    {}", config.admin.listen);
    for r in &config.routes {
        println!("  route             {} -> {} (relay {:?})", r.prefix, r.upstream, r.relay);
    }
    if let Some(i) = &config.internal {
        println!("  internal listener {} ({:?}), {} allowed caller(s)", i.listen, i.mode, i.allow.len());
        if i.mode == gatehouse::config::InternalMode::Mtls {
            let paths = gatehouse::tls::TlsPaths {
                cert: i.cert.clone().unwrap_or_default(),
                key: i.key.clone().unwrap_or_default(),
                client_ca: i.client_ca.clone().unwrap_or_default(),
            };
            if let Err(e) = gatehouse::tls::load(&paths) {
                eprintln!("{}: invalid configuration: internal TLS: {e}", path.display());
                return ExitCode::from(2);
            }
        }
    }
    for w in config.warnings() {
        println!("  warning: {w}");
    }
    ExitCode::SUCCESS
}

fn serve(path: &Path) -> ExitCode {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{}: invalid configuration: {e}", path.display());
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Logs and traces (docs/observability.md); the trace exporter runs on the runtime.
    let telemetry = match runtime.block_on(async { gatehouse::telemetry::init(&config) }) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("gatehouse: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        match gatehouse::start(config, gatehouse::system_clock()).await {
            Ok(running) => {
                running.until_signal().await;
                // Flush the spans still buffered (blocking: off the runtime's worker threads).
                let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
                ExitCode::SUCCESS
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot start");
                eprintln!("gatehouse: cannot start: {e}");
                ExitCode::FAILURE
            }
        }
    })
}
