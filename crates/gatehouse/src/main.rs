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

/// `println!` that ends the process quietly when stdout has been closed
/// (`gatehouse check-config | head -1`): the reader has what it wanted, so a broken pipe is no
/// reason for a panic and exit 101.
macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        if writeln!(std::io::stdout(), $($t)*).is_err() {
            std::process::exit(0);
        }
    }};
}

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
        /// The configuration file (TOML); `GATEHOUSE_…` environment variables override it.
        #[arg(long, short, env = "GATEHOUSE_CONFIG", default_value = "gatehouse.toml")]
        config: PathBuf,
    },
    /// Validate a configuration file (and its secrets) and explain what it sets up.
    CheckConfig {
        /// The configuration file (TOML); `GATEHOUSE_…` environment variables override it.
        #[arg(long, short, env = "GATEHOUSE_CONFIG", default_value = "gatehouse.toml")]
        config: PathBuf,
    },
    /// List or revoke sessions through the admin listener; check or reset the embedded store's file.
    Sessions {
        /// Base URL of the admin listener.
        #[arg(long, global = true, env = "GATEHOUSE_ADMIN_URL", default_value = "http://127.0.0.1:9090")]
        admin: String,
        /// File holding the admin API bearer token (the server's `admin.token_file`). Without it,
        /// the token is taken from the environment variable GATEHOUSE_ADMIN_TOKEN, if set (never
        /// from the command line, where other users could read it in the process list).
        #[arg(long, global = true, env = "GATEHOUSE_ADMIN_TOKEN_FILE")]
        token_file: Option<PathBuf>,
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
    /// List live sessions (hash prefixes, user, times, client): one user's, or all of them.
    #[command(group(clap::ArgGroup::new("who").required(true).args(["user", "username", "email", "all"])))]
    List {
        /// By Keycloak subject id (`sub`).
        #[arg(long)]
        user: Option<String>,
        /// By username (`preferred_username`, exact, case-insensitive).
        #[arg(long)]
        username: Option<String>,
        /// By e-mail address (exact, case-insensitive).
        #[arg(long)]
        email: Option<String>,
        /// Every live session, a page at a time (`--limit`, `--after`).
        #[arg(long)]
        all: bool,
        /// Sessions per page with `--all` (1 to 500).
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// With `--all`: continue after this session hash (the `next` of the previous page).
        #[arg(long)]
        after: Option<String>,
        /// `table` for people, `json` for scripts.
        #[arg(long, short = 'o', value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Revoke sessions (and their refresh tokens at Keycloak).
    #[command(group(clap::ArgGroup::new("which").required(true).args(["user", "session", "all"])))]
    Revoke {
        /// Every session of this user (Keycloak subject id).
        #[arg(long)]
        user: Option<String>,
        /// One session, by at least 8 hex characters of its hash.
        #[arg(long)]
        session: Option<String>,
        /// Every session of every user (asks for confirmation unless `--yes`).
        #[arg(long)]
        all: bool,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
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

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum PkiCommand {
    /// Create a CA (`ca.crt`, `ca.key`) and Gatehouse's server certificate (`gatehouse.crt`, `gatehouse.key`).
    Init {
        /// Directory to write the files into (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Another DNS name or IP address for the server certificate (repeatable), e.g. the
        /// in-cluster Service name `gatehouse-internal.auth.svc.cluster.local`.
        #[arg(long = "san", value_name = "NAME")]
        sans: Vec<String>,
    },
    /// Issue a client certificate `NAME.crt`/`NAME.key` signed by the CA in `--ca`.
    Issue {
        /// Directory holding `ca.crt` and `ca.key` (from `pki init`).
        #[arg(long)]
        ca: PathBuf,
        /// File name for the certificate and key (`NAME.crt`, `NAME.key`).
        #[arg(long)]
        name: String,
        /// The caller's SPIFFE ID, e.g. spiffe://cluster.local/ns/data/sa/pocketbase
        #[arg(long, conflicts_with = "dns", required_unless_present = "dns")]
        spiffe: Option<String>,
        /// A DNS name, for callers without SPIFFE IDs.
        #[arg(long)]
        dns: Option<String>,
        /// Directory to write the files into.
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
        Command::Sessions { admin, token_file, command } => sessions(&admin, token_file.as_deref(), command),
    }
}

/// `sessions check`: the report on stdout; damage on stderr (one line) and exit 1.
fn sessions_check(store: &Path) -> ExitCode {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
    match gatehouse::session::embedded::check_file(store, now) {
        Ok(r) => {
            say!("{}: the integrity check passed", store.display());
            if r.rolled_back {
                say!("  note: the newest commit was damaged; the previous commit is in use");
            }
            say!("  file size           {} bytes", r.file_bytes);
            say!("  sessions            {} ({} expired, not yet swept)", r.sessions, r.expired);
            say!("  unreadable records  {}", r.unreadable);
            say!("  user index entries  {}", r.user_index_entries);
            say!("  sid index entries   {}", r.sid_index_entries);
            say!("  expiry index        {}", r.expiry_index_entries);
            say!("  marks               {}", r.marks);
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
            say!("moved {} to {}; the next start begins with an empty store", store.display(), to.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("gatehouse sessions reset: cannot move {} aside: {e}", store.display());
            ExitCode::FAILURE
        }
    }
}

/// The admin token for `gatehouse sessions`: `--token-file` first, then `GATEHOUSE_ADMIN_TOKEN`.
fn admin_token(token_file: Option<&Path>) -> Result<Option<String>, String> {
    use secrecy::ExposeSecret;
    if let Some(path) = token_file {
        return gatehouse::config::read_secret_file("--token-file", path)
            .map(|t| Some(t.expose_secret().to_string()))
            .map_err(|e| e.to_string());
    }
    match std::env::var("GATEHOUSE_ADMIN_TOKEN") {
        Ok(t) if !t.trim().is_empty() => Ok(Some(t.trim().to_string())),
        _ => Ok(None),
    }
}

fn sessions(admin: &str, token_file: Option<&Path>, command: SessionsCommand) -> ExitCode {
    let token = match admin_token(token_file) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("sessions: {e}");
            return ExitCode::from(2);
        }
    };
    let base = admin.trim_end_matches('/');
    let enc = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let mut output = Output::Json;
    let mut lookup = String::new();
    let (method, url) = match &command {
        SessionsCommand::List { user, username, email, all, limit, after, output: o } => {
            output = *o;
            let query = match (user, username, email) {
                (Some(u), _, _) => {
                    lookup = format!("user id `{u}`");
                    format!("sub={}", enc(u))
                }
                (_, Some(n), _) => {
                    lookup = format!("username `{n}`");
                    format!("username={}", enc(n))
                }
                (_, _, Some(e)) => {
                    lookup = format!("e-mail `{e}`");
                    format!("email={}", enc(e))
                }
                _ if *all => {
                    let after = after.as_deref().map(|a| format!("&after={}", enc(a))).unwrap_or_default();
                    format!("all=true&limit={limit}{after}")
                }
                _ => unreachable_args(),
            };
            (reqwest::Method::GET, format!("{base}/admin/v1/sessions?{query}"))
        }
        SessionsCommand::Revoke { user: Some(u), .. } => {
            (reqwest::Method::DELETE, format!("{base}/admin/v1/sessions?sub={}", enc(u)))
        }
        SessionsCommand::Revoke { session: Some(p), .. } => {
            (reqwest::Method::DELETE, format!("{base}/admin/v1/sessions/{}", enc(p)))
        }
        SessionsCommand::Revoke { all: true, yes, .. } => {
            if !yes && !confirm("Revoke EVERY session of every user? Everyone signs in again.") {
                eprintln!("sessions revoke: not confirmed; nothing revoked");
                return ExitCode::FAILURE;
            }
            (reqwest::Method::DELETE, format!("{base}/admin/v1/sessions?all=true"))
        }
        SessionsCommand::Revoke { .. } => unreachable_args(),
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
        let mut req = client.request(method, &url).timeout(std::time::Duration::from_secs(30));
        if let Some(t) = &token {
            req = req.bearer_auth(t);
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("sessions: cannot reach the admin listener at {base}: {}", e.without_url());
                return ExitCode::FAILURE;
            }
        };
        let ok = resp.status().is_success();
        if resp.status() == reqwest::StatusCode::UNAUTHORIZED {
            eprintln!("sessions: the admin API wants its token: give --token-file FILE or set GATEHOUSE_ADMIN_TOKEN");
        }
        let body: serde_json::Value = resp.json().await.unwrap_or(serde_json::Value::Null);
        if ok && output == Output::Table {
            print_sessions(&body, &lookup);
        } else {
            say!("{}", serde_json::to_string_pretty(&body).unwrap_or_default());
        }
        if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE }
    })
}

/// clap's argument groups make every other combination impossible; exit as clap would.
fn unreachable_args() -> ! {
    eprintln!("gatehouse: invalid arguments (see --help)");
    std::process::exit(2)
}

/// Ask on the terminal; only `yes` goes on.
fn confirm(question: &str) -> bool {
    use std::io::{BufRead, Write};
    print!("{question} Type `yes` to go on: ");
    let _ = std::io::stdout().flush();
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer).is_ok() && answer.trim() == "yes"
}

/// `2026-11-30 06:12:03Z (3m ago)` / `(in 25m)`.
fn human_time(t: i64, now: i64) -> String {
    let at = time::OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|d| d.format(&time::format_description::well_known::Rfc3339).ok())
        .map(|s| s.replacen('T', " ", 1))
        .unwrap_or_else(|| t.to_string());
    let d = (t - now).abs();
    let span = match d {
        0..60 => format!("{d}s"),
        60..3600 => format!("{}m", d / 60),
        3600..86400 => format!("{}h{:02}m", d / 3600, d % 3600 / 60),
        _ => format!("{}d", d / 86400),
    };
    if t <= now { format!("{at} ({span} ago)") } else { format!("{at} (in {span})") }
}

/// The admin listing as a table for people.
fn print_sessions(body: &serde_json::Value, lookup: &str) {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
    let empty = Vec::new();
    let items = body.get("sessions").and_then(|s| s.as_array()).unwrap_or(&empty);
    if items.is_empty() {
        if lookup.is_empty() {
            say!("no live sessions");
        } else {
            say!(
                "no live sessions for {lookup} (matched exactly, case-insensitively, among live sessions; \
                 a user who has not signed in since the last restart of an embedded store, or whose sessions \
                 expired, has none)"
            );
        }
        return;
    }
    let s = |v: &serde_json::Value, k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("-").to_string();
    let t = |v: &serde_json::Value, k: &str| v.get(k).and_then(|x| x.as_i64()).map(|x| human_time(x, now));
    say!("{:<10} {:<20} {:<36} {:<36} {:<36} CLIENT", "SESSION", "USER", "CREATED", "LAST SEEN", "ENDS");
    for v in items {
        let user =
            v.get("preferred_username").and_then(|x| x.as_str()).map(str::to_string).unwrap_or_else(|| s(v, "sub"));
        let ends =
            match (v.get("idle_expires_at").and_then(|x| x.as_i64()), v.get("expires_at").and_then(|x| x.as_i64())) {
                (Some(a), Some(b)) => Some(human_time(a.min(b), now)),
                _ => None,
            };
        say!(
            "{:<10} {:<20} {:<36} {:<36} {:<36} {}",
            s(v, "session"),
            user,
            t(v, "created_at").unwrap_or_default(),
            t(v, "last_seen").unwrap_or_default(),
            ends.unwrap_or_default(),
            s(v, "client_ip")
        );
    }
    if let Some(next) = body.get("next").and_then(|n| n.as_str()) {
        say!("more: --after {next}");
    }
}

fn pki(command: PkiCommand) -> ExitCode {
    use gatehouse::pki;
    let result = match command {
        PkiCommand::Init { out, sans } => pki::init_with_sans(&out, &sans),
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
                say!("wrote {}", f.display());
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
    let secrets = match gatehouse::load_secrets(&config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{}: invalid configuration: {e}", path.display());
            return ExitCode::from(2);
        }
    };
    // Route TLS files (CA, client certificate) are loaded the way `serve` loads them.
    if let Err(e) = gatehouse::public::proxy::Proxy::new(&config) {
        eprintln!("{}: invalid configuration: {e}", path.display());
        return ExitCode::from(2);
    }
    say!("{}: configuration is valid", path.display());
    say!("  public listener   {} (external URL {})", config.public.listen, config.public_origin());
    say!("  redirect URI      {}", config.redirect_uri());
    say!("  session cookie    {}", config.cookie().name);
    say!("  identity provider {} (client `{}`)", config.oidc.issuer, config.oidc.client_id);
    say!("  session store     {}", store_summary(&config));
    say!(
        "  admin listener    {} (session API {})",
        config.admin.listen,
        if config.admin.token_file.is_some() { "requires the bearer token" } else { "open to loopback callers" }
    );
    say!("  session keys      {}", key_roles(&config, &secrets.keyring.key_ids()));
    for r in &config.routes {
        say!("  route             {} -> {} (relay = \"{}\")", r.prefix, r.upstream, r.relay.name());
    }
    if let Some(i) = &config.internal {
        say!("  internal listener {} (mode = \"{}\"), {} allowed caller(s)", i.listen, i.mode.name(), i.allow.len());
        for id in &i.allow {
            say!("  allowed caller    {}", gatehouse::tls::identity::describe_allow_entry(id));
        }
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
    if let Some(c) = &config.check {
        let how = match (c.mtls(), c.key_file.is_some()) {
            (true, _) => format!("mutual TLS, {} allowed gateway(s)", c.allow.len()),
            (false, true) => "shared key (X-Gatehouse-Check-Key)".to_string(),
            (false, false) => "loopback only, no caller credential".to_string(),
        };
        say!("  check listener    {} ({how})", c.listen);
        if c.mtls() {
            let paths = gatehouse::tls::TlsPaths {
                cert: c.cert.clone().unwrap_or_default(),
                key: c.key.clone().unwrap_or_default(),
                client_ca: c.client_ca.clone().unwrap_or_default(),
            };
            if let Err(e) = gatehouse::tls::load(&paths) {
                eprintln!("{}: invalid configuration: check TLS: {e}", path.display());
                return ExitCode::from(2);
            }
        }
    }
    for w in config.warnings() {
        say!("  warning: {w}");
    }
    ExitCode::SUCCESS
}

/// The store and only the settings that apply to it; never a password from a Redis URL.
fn store_summary(config: &Config) -> String {
    let s = &config.session;
    let redacted = |u: &str| gatehouse::config::redacted_str(u);
    use gatehouse::config::StoreMode;
    // Only the upgrade setting is shown: the default format needs no mention.
    let format = match s.record_format {
        gatehouse::session::RecordFormat::Json => "; writes format-1 (JSON) records",
        gatehouse::session::RecordFormat::Binary => "",
    };
    let store = match s.mode() {
        StoreMode::Embedded { path } => format!("embedded file {}", path.display()),
        StoreMode::Sentinel { sentinels, master, .. } => format!(
            "redis through Sentinel {} (master `{master}`)",
            sentinels.iter().map(|u| redacted(u)).collect::<Vec<_>>().join(", ")
        ),
        StoreMode::Cluster { nodes } => {
            format!("redis cluster {}", nodes.iter().map(|u| redacted(u)).collect::<Vec<_>>().join(", "))
        }
        StoreMode::Redis { url } => format!("redis {}", redacted(url)),
    };
    format!("{store}{format}")
}

/// "seals ab12cd34; also opens next …, previous …": ids in the keyring's order (sealing, next,
/// previous), which is how `load_secrets` builds it.
fn key_roles(config: &Config, ids: &[String]) -> String {
    let short = |id: &String| id.chars().take(8).collect::<String>();
    let mut out = format!("seals {}", ids.first().map(short).unwrap_or_default());
    let mut rest = ids.iter().skip(1);
    let mut also = Vec::new();
    if config.session.next_encryption_key_file.is_some()
        && let Some(id) = rest.next()
    {
        also.push(format!("next {}", short(id)));
    }
    also.extend(rest.map(|id| format!("previous {}", short(id))));
    if !also.is_empty() {
        out += &format!("; also opens {}", also.join(", "));
    }
    out
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
