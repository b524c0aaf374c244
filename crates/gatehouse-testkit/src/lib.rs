//! Gatehouse's test kit (dev-only, never published): a real Gatehouse (in-process) against the
//! real Keycloak started by `make test` (`scripts/keycloak.sh start test 18180`), real Redis
//! servers it starts and stops by their own process handles, and a tiny browser (manual cookie jar,
//! no redirect following) that walks Keycloak's real login form. Every test binary uses it.

// Test code: a broken environment should fail the test at once, loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, HashMap};
use std::net::TcpListener as StdListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use gatehouse::clock::SystemClock;
use gatehouse::config::Config;
use reqwest::header::{HeaderMap, LOCATION, SET_COOKIE};
use serde_json::Value;

pub const REALM: &str = "gatehouse";

pub fn keycloak_url() -> String {
    std::env::var("KEYCLOAK_URL").unwrap_or_else(|_| "http://localhost:18180".into())
}

pub fn issuer() -> String {
    format!("{}/realms/{REALM}", keycloak_url())
}

/// Keycloak's client registration has exact redirect URIs for ports 18000–18039; hand them out
/// round-robin (there are more tests than ports), skipping any still bound by a running test.
static NEXT_PORT: AtomicU16 = AtomicU16::new(0);

pub fn free_registered_port() -> u16 {
    for _ in 0..400 {
        let p = 18000 + NEXT_PORT.fetch_add(1, Ordering::SeqCst) % 40;
        if StdListener::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
    panic!("no free registered test port in 18000-18039");
}

pub fn test_key() -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(gatehouse::crypto::random_bytes::<32>().unwrap())
}

#[derive(Clone)]
pub struct Options {
    pub client_id: &'static str,
    pub client_secret: &'static str,
    pub password_login: bool,
    pub refresh_skew: &'static str,
    pub same_site: &'static str,
    pub extra: String,
    /// Extra keys for the `[public]` table.
    pub public_extra: String,
    /// Extra keys for the `[oidc]` table.
    pub oidc_extra: String,
    /// Extra keys for the `[session]` table.
    pub session_extra: String,
    /// Start the internal listener (mTLS with the work dir's dev PKI) with this allow-list.
    pub internal_allow: Option<Vec<String>>,
    pub internal_rate: u32,
    /// Use this Redis URL as the session store instead of the embedded file.
    pub redis_url: Option<String>,
    /// Advertise another replica's URL (replicas behind one load balancer share it).
    pub external_port: Option<u16>,
    /// Timeout of each call to Keycloak.
    pub http_timeout: &'static str,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            client_id: "gatehouse",
            client_secret: "gatehouse-dev-secret",
            password_login: true,
            refresh_skew: "30s",
            same_site: "lax",
            extra: String::new(),
            public_extra: String::new(),
            oidc_extra: String::new(),
            session_extra: String::new(),
            internal_allow: None,
            internal_rate: 1000,
            redis_url: None,
            external_port: None,
            http_timeout: "5s",
        }
    }
}

impl Options {
    pub fn with_internal(allow: &[&str]) -> Self {
        Self { internal_allow: Some(allow.iter().map(|s| s.to_string()).collect()), ..Self::default() }
    }

    pub fn short_tokens() -> Self {
        Self {
            client_id: "gatehouse-short",
            client_secret: "gatehouse-short-dev-secret",
            refresh_skew: "2s",
            ..Self::default()
        }
    }
}

/// Files that outlive one Gatehouse instance (so restarts can reuse them).
pub struct Workdir {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub key: String,
}

impl Default for Workdir {
    fn default() -> Self {
        Self::new()
    }
}

impl Workdir {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        gatehouse::pki::init(&dir.path().join("pki")).unwrap();
        Self { dir, port: free_registered_port(), key: test_key() }
    }

    pub fn pki(&self) -> PathBuf {
        self.dir.path().join("pki")
    }

    /// The dev CA, to issue client certificates in tests.
    pub fn ca(&self) -> gatehouse::pki::Issued {
        gatehouse::pki::Issued {
            cert_pem: std::fs::read_to_string(self.pki().join("ca.crt")).unwrap(),
            key_pem: std::fs::read_to_string(self.pki().join("ca.key")).unwrap(),
        }
    }

    pub fn config_text(&self, o: &Options) -> String {
        format!(
            r#"
[public]
listen = "127.0.0.1:{port}"
external_url = "http://localhost:{external_port}"
{public_extra}
[oidc]
issuer = "{issuer}"
client_id = "{client_id}"
client_secret = "{secret}"
password_login = {pw}
refresh_skew = "{skew}"
http_timeout = "{http_timeout}"
{oidc_extra}
[session]
path = "{path}"
{redis}
{session_extra}
encryption_key = "{key}"
same_site = "{same_site}"
[admin]
listen = "127.0.0.1:0"
{internal}
{extra}
"#,
            port = self.port,
            external_port = o.external_port.unwrap_or(self.port),
            http_timeout = o.http_timeout,
            redis = o.redis_url.as_ref().map(|u| format!("store = \"redis\"\nredis_url = \"{u}\"")).unwrap_or_default(),
            issuer = issuer(),
            client_id = o.client_id,
            secret = o.client_secret,
            pw = o.password_login,
            skew = o.refresh_skew,
            path = self.dir.path().join("sessions.redb").display(),
            key = self.key,
            same_site = o.same_site,
            extra = o.extra,
            public_extra = o.public_extra,
            oidc_extra = o.oidc_extra,
            session_extra = o.session_extra,
            internal = match &o.internal_allow {
                None => String::new(),
                Some(allow) => format!(
                    "[internal]\nlisten = \"127.0.0.1:0\"\ncert = \"{pki}/gatehouse.crt\"\nkey = \"{pki}/gatehouse.key\"\nclient_ca = \"{pki}/ca.crt\"\nallow = {allow:?}\nrate_limit_per_second = {rate}\nreload_interval = \"1h\"\n",
                    pki = self.pki().display(),
                    rate = o.internal_rate,
                ),
            },
        )
    }

    pub fn config(&self, o: &Options) -> Config {
        use figment::Figment;
        use figment::providers::{Format, Toml};
        Config::from_figment(Figment::new().merge(Toml::string(&self.config_text(o)))).expect("test config is valid")
    }

    pub fn write_config(&self, o: &Options) -> PathBuf {
        let p = self.dir.path().join("gatehouse.toml");
        std::fs::write(&p, self.config_text(o)).unwrap();
        p
    }
}

/// An in-process Gatehouse.
pub struct Gate {
    pub running: Option<gatehouse::Running>,
    pub clock: Arc<SystemClock>,
    pub base: String,
    pub admin: String,
}

impl Gate {
    pub async fn start(work: &Workdir, o: &Options) -> Self {
        let g = Self::start_unready(work, o).await;
        g.wait_ready().await;
        g
    }

    /// Start with library-face endpoints (`gatehouse::extend`), and wait until ready.
    pub async fn start_with(work: &Workdir, o: &Options, ext: gatehouse::extend::Extensions) -> Self {
        let clock = Arc::new(SystemClock::default());
        let running = gatehouse::start_with(work.config(o), clock.clone(), ext).await.expect("gatehouse starts");
        let base = format!("http://localhost:{}", running.public_addr.port());
        let admin = format!("http://{}", running.admin_addr);
        let g = Self { running: Some(running), clock, base, admin };
        g.wait_ready().await;
        g
    }

    /// Start without waiting for readiness (for dependencies that are down on purpose).
    pub async fn start_unready(work: &Workdir, o: &Options) -> Self {
        let clock = Arc::new(SystemClock::default());
        let running = gatehouse::start(work.config(o), clock.clone()).await.expect("gatehouse starts");
        let base = format!("http://localhost:{}", running.public_addr.port());
        let admin = format!("http://{}", running.admin_addr);
        Self { running: Some(running), clock, base, admin }
    }

    pub async fn wait_ready(&self) {
        let c = http();
        for _ in 0..200 {
            if let Ok(r) = c.get(format!("{}/readyz", self.base)).send().await
                && r.status() == 200
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("gatehouse did not become ready (is Keycloak running at {}?)", keycloak_url());
    }

    /// `https://localhost:PORT` of the internal listener.
    pub fn internal(&self) -> String {
        format!("https://localhost:{}", self.running.as_ref().unwrap().internal_addr.expect("internal listener").port())
    }

    pub fn core(&self) -> &Arc<gatehouse::Core> {
        &self.running.as_ref().unwrap().core
    }

    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }

    pub async fn metric(&self, name: &str) -> f64 {
        let text = http().get(format!("{}/metrics", self.admin)).send().await.unwrap().text().await.unwrap();
        text.lines().filter(|l| l.starts_with(name)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
    }
}

pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// A browser: cookies per host:port, redirects followed by hand so each hop can be inspected.
#[derive(Default, Clone)]
pub struct Browser {
    pub jar: HashMap<String, BTreeMap<String, String>>,
    /// The last callback URL Keycloak sent us to (it carries the authorization code).
    pub last_callback: Option<String>,
}

fn host_of(url: &str) -> String {
    let u = url::Url::parse(url).unwrap();
    format!("{}:{}", u.host_str().unwrap(), u.port_or_known_default().unwrap())
}

pub struct Resp {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: String,
    pub set_cookies: Vec<String>,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
    pub fn location(&self) -> String {
        self.headers.get(LOCATION).expect("Location").to_str().unwrap().to_string()
    }
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.get(name).map(|v| v.to_str().unwrap().to_string())
    }
}

impl Browser {
    pub fn cookie(&self, url: &str, name: &str) -> Option<String> {
        self.jar.get(&host_of(url)).and_then(|m| m.get(name).cloned())
    }

    pub fn set_cookie(&mut self, url: &str, name: &str, value: &str) {
        self.jar.entry(host_of(url)).or_default().insert(name.into(), value.into());
    }

    pub async fn send(&mut self, req: reqwest::RequestBuilder, url: &str) -> Resp {
        let host = host_of(url);
        let mut req = req;
        if let Some(c) = self.jar.get(&host).filter(|m| !m.is_empty()) {
            let header = c.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("; ");
            req = req.header("cookie", header);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let set_cookies: Vec<String> =
            headers.get_all(SET_COOKIE).iter().map(|v| v.to_str().unwrap().to_string()).collect();
        for sc in &set_cookies {
            let first = sc.split(';').next().unwrap();
            let (k, v) = first.split_once('=').unwrap();
            let expired = sc.to_ascii_lowercase().contains("max-age=0");
            let m = self.jar.entry(host.clone()).or_default();
            if expired || v.is_empty() {
                m.remove(k);
            } else {
                m.insert(k.to_string(), v.to_string());
            }
        }
        let body = r.text().await.unwrap();
        Resp { status, headers, body, set_cookies }
    }

    pub async fn get(&mut self, url: &str) -> Resp {
        self.send(http().get(url), url).await
    }

    /// A same-origin fetch with the CSRF header.
    pub async fn post_json(&mut self, base: &str, path: &str, body: &Value) -> Resp {
        let url = format!("{base}{path}");
        self.send(http().post(&url).header("x-csrf", "1").header("origin", base).json(body), &url).await
    }

    pub async fn post(&mut self, base: &str, path: &str) -> Resp {
        let url = format!("{base}{path}");
        self.send(http().post(&url).header("x-csrf", "1").header("origin", base), &url).await
    }

    /// Start at Gatehouse's `/auth/login`, fill Keycloak's real login form, return the callback response.
    pub async fn code_flow(&mut self, base: &str, user: &str, password: &str, return_to: &str) -> Resp {
        let start = format!("{base}/auth/login?return_to={}", urlencode(return_to));
        let r = self.get(&start).await;
        assert_eq!(r.status, 303, "login start redirects: {}", r.body);
        let kc_url = r.location();
        assert!(kc_url.starts_with(&issuer()), "redirects to the pinned issuer: {kc_url}");
        let page = self.get(&kc_url).await;
        // With a live Keycloak SSO session in this browser, Keycloak skips the form.
        let callback = if page.status == 302 {
            page.location()
        } else {
            assert_eq!(page.status, 200, "Keycloak login page");
            let action = form_action(&page.body);
            let posted = self
                .send(
                    http().post(&action).form(&[("username", user), ("password", password), ("credentialId", "")]),
                    &action,
                )
                .await;
            assert_eq!(posted.status, 302, "Keycloak accepts the credentials");
            posted.location()
        };
        assert!(callback.starts_with(&format!("{base}/auth/callback?")), "{callback}");
        self.last_callback = Some(callback.clone());
        self.get(&callback).await
    }

    pub async fn login(&mut self, base: &str, user: &str) -> Resp {
        let r = self.code_flow(base, user, &format!("{user}-password"), "/").await;
        assert_eq!(r.status, 303, "callback redirects home: {}", r.body);
        r
    }
}

pub fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// The `action` of Keycloak's `kc-form-login` form, HTML-unescaped.
pub fn form_action(html: &str) -> String {
    let form = html.find("id=\"kc-form-login\"").expect("login form present");
    let rest = &html[form..];
    let a = rest.find("action=\"").expect("form action") + 8;
    let end = rest[a..].find('"').unwrap();
    rest[a..a + end].replace("&amp;", "&")
}

/// Keycloak's admin REST API (master realm admin, dev credentials of the test instance).
pub struct KcAdmin {
    token: String,
}

impl KcAdmin {
    pub async fn connect() -> Self {
        let r: Value = http()
            .post(format!("{}/realms/master/protocol/openid-connect/token", keycloak_url()))
            .form(&[
                ("grant_type", "password"),
                ("client_id", "admin-cli"),
                ("username", "admin"),
                ("password", "admin"),
            ])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        Self { token: r["access_token"].as_str().expect("admin token").to_string() }
    }

    pub async fn get(&self, path: &str) -> Value {
        http()
            .get(format!("{}/admin/realms/{REALM}{path}", keycloak_url()))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    pub async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        http()
            .post(format!("{}/admin/realms/{REALM}{path}", keycloak_url()))
            .bearer_auth(&self.token)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    pub async fn delete(&self, path: &str) {
        let r = http()
            .delete(format!("{}/admin/realms/{REALM}{path}", keycloak_url()))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "DELETE {path}: {}", r.status());
    }

    /// Point a client's back-channel logout URL at a test replica. Hold
    /// [`backchannel_url_lock`] from before this call until the URL is set back: the realm's
    /// clients are shared by every test of the run.
    pub async fn set_backchannel_url(&self, client_id: &str, url: &str) {
        let clients = self.get(&format!("/clients?clientId={client_id}")).await;
        let mut client = clients[0].clone();
        let id = client["id"].as_str().unwrap().to_string();
        client["attributes"]["backchannel.logout.url"] = Value::String(url.into());
        client["attributes"]["backchannel.logout.session.required"] = Value::String("true".into());
        client["frontchannelLogout"] = Value::Bool(false);
        let r = http()
            .put(format!("{}/admin/realms/{REALM}/clients/{id}", keycloak_url()))
            .bearer_auth(&self.token)
            .json(&client)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "update client: {}", r.status());
    }

    /// Keycloak's own count of refresh-token grants for one of its sessions.
    pub async fn refresh_events(&self, provider_sid: &str) -> usize {
        let events = self.get("/events?type=REFRESH_TOKEN&max=1000").await;
        events.as_array().unwrap().iter().filter(|e| e["sessionId"] == provider_sid).count()
    }

    pub async fn user_sessions(&self, username: &str) -> Vec<Value> {
        let users = self.get(&format!("/users?username={username}&exact=true")).await;
        let id = users[0]["id"].as_str().unwrap().to_string();
        self.get(&format!("/users/{id}/sessions")).await.as_array().unwrap().clone()
    }
}

/// Serialises the tests that point a client's back-channel logout URL at themselves (tests of
/// one binary run in parallel, and the realm's client settings are shared): without it one test's
/// logout tokens go to another test's receiver.
pub async fn backchannel_url_lock() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// Try a refresh token directly at Keycloak: is it still alive?
pub async fn refresh_at_keycloak(client_id: &str, secret: &str, refresh_token: &str) -> (u16, Value) {
    let r = http()
        .post(format!("{}/protocol/openid-connect/token", issuer()))
        .basic_auth(client_id, Some(secret))
        .form(&[("grant_type", "refresh_token"), ("refresh_token", refresh_token)])
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// The session's record and decrypted tokens, read through the running core (tests only).
pub async fn session_tokens(
    gate: &Gate,
    cookie: &str,
) -> (gatehouse::session::SessionRecord, gatehouse::session::TokenSet) {
    let id = gatehouse::session::SessionId::parse(cookie).expect("minted id");
    let key = id.key();
    let ex = &gate.core().exchange;
    let rec = ex.store().get(&key).await.unwrap().expect("session stored");
    let tokens = ex.open(&key, &rec).unwrap();
    (rec, tokens)
}

pub const COOKIE: &str = "__Host-Http-gatehouse";

pub fn looks_like_jwt(s: &str) -> bool {
    let re_start = s.find("eyJ");
    re_start.is_some_and(|i| {
        s[i..]
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.'))
            .next()
            .is_some_and(|t| t.matches('.').count() >= 2)
    })
}

/// An HTTPS client for the internal listener: trusts `server_ca`, presents `client` (if any).
pub fn mtls_client(server_ca_pem: &str, client: Option<&gatehouse::pki::Issued>) -> reqwest::Client {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(server_ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(gatehouse::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match client {
        Some(c) => {
            let chain: Vec<CertificateDer<'static>> =
                CertificateDer::pem_slice_iter(c.cert_pem.as_bytes()).map(|c| c.unwrap()).collect();
            let key = PrivateKeyDer::from_pem_slice(c.key_pem.as_bytes()).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    reqwest::Client::builder().tls_backend_preconfigured(config).timeout(Duration::from_secs(30)).build().unwrap()
}

pub fn client_cert(ca: &gatehouse::pki::Issued, sans: Vec<gatehouse::pki::San>) -> gatehouse::pki::Issued {
    gatehouse::pki::issue(ca, &gatehouse::pki::LeafSpec::client("test-client", sans, 1)).unwrap()
}

pub const POCKETBASE: &str = "spiffe://gatehouse.local/ns/data/sa/pocketbase";

/// A real Redis server (Debian's `redis-server`) on a free loopback port, with AOF persistence in
/// a temporary directory so a restart keeps (and forgets) exactly what was written.
pub struct Redis {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<std::process::Child>,
}

impl Redis {
    pub async fn start() -> Self {
        let port = StdListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut r = Self { port, dir: tempfile::tempdir().unwrap(), child: None };
        r.restart().await;
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Start (again) on the same port and data directory, with AOF on every write.
    pub async fn restart(&mut self) {
        let port = self.port.to_string();
        let args = ["--port", &port, "--appendonly", "yes", "--appendfsync", "always"];
        self.child = Some(redis_server(&args, self.dir.path(), self.port).await);
    }

    /// SIGTERM: Redis flushes its AOF and exits.
    pub async fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = std::process::Command::new("kill").arg(c.id().to_string()).status();
            let _ = c.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The one way tests start Redis: `redis-server` (Debian package) on loopback with `args`, its
/// files and log in `dir`, returned once `port` accepts connections. Fails loudly, with Redis' own
/// log, if the server exits or does not listen within 5 s — no test runs against no Redis. The
/// caller stops it by this handle (never by a process-name match).
pub async fn redis_server(args: &[&str], dir: &std::path::Path, port: u16) -> std::process::Child {
    let log = dir.join(format!("redis-{port}.log"));
    let mut child = std::process::Command::new("redis-server")
        .args(["--bind", "127.0.0.1", "--save", ""])
        .args(args)
        .arg("--dir")
        .arg(dir)
        .arg("--logfile")
        .arg(&log)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("redis-server (Debian package redis-server) must be installed: scripts/setup.sh does it");
    for _ in 0..100 {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("redis-server on port {port} exited ({status}) before listening:\n{}", read_log(&log));
        }
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return child;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("redis-server on port {port} did not listen within 5 s:\n{}", read_log(&log));
}

fn read_log(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| format!("(no log: {e})"))
}

/// Wait until something listens on a loopback port.
pub async fn wait_port(port: u16) {
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("nothing listens on port {port}");
}

/// Log `user` in with the password grant; returns the session id from the cookie.
pub async fn logged_in(gate: &Gate, user: &str) -> String {
    let mut b = Browser::default();
    let r = b
        .post_json(
            &gate.base,
            "/auth/login",
            &serde_json::json!({"username": user, "password": format!("{user}-password")}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    b.cookie(&gate.base, COOKIE).unwrap()
}

/// Two replicas behind one advertised URL, sharing a Redis, the encryption key and the PKI (as one
/// Kubernetes Secret would give them).
pub async fn replica_pair(redis: &Redis, base: Options) -> (Workdir, Gate, Workdir, Gate) {
    let wa = Workdir::new();
    let mut wb = Workdir::new();
    wb.key = wa.key.clone();
    std::fs::remove_dir_all(wb.pki()).unwrap();
    std::fs::create_dir_all(wb.pki()).unwrap();
    for e in std::fs::read_dir(wa.pki()).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), wb.pki().join(e.file_name())).unwrap();
    }
    let oa = Options { redis_url: Some(redis.url()), ..base.clone() };
    let ob = Options { redis_url: Some(redis.url()), external_port: Some(wa.port), ..base };
    let a = Gate::start(&wa, &oa).await;
    let b = Gate::start(&wb, &ob).await;
    (wa, a, wb, b)
}

/// Concurrent session exchanges (one per entry of `internals`, the replicas' internal URLs) for
/// one session whose access token is due: each answer's status, access token and the moment it
/// arrived. Waiters on a refresh finish right after the refresher when they are released by its
/// outcome, and a poll interval later (per waiter, when they queue) when they are not.
pub async fn refresh_burst(
    internals: &[String],
    client: &reqwest::Client,
    session_id: &str,
) -> Vec<(u16, String, std::time::Instant)> {
    // All requests leave together, so all of them arrive while the refresh is in flight.
    let start = Arc::new(tokio::sync::Barrier::new(internals.len()));
    let mut tasks = Vec::new();
    for internal in internals {
        let (url, client, sid, start) =
            (format!("{internal}/internal/v1/session/exchange"), client.clone(), session_id.to_string(), start.clone());
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            let r = client.post(url).json(&serde_json::json!({"session_id": sid})).send().await.unwrap();
            let status = r.status().as_u16();
            let body: Value = r.json().await.unwrap_or(Value::Null);
            (status, body["access_token"].as_str().unwrap_or_default().to_string(), std::time::Instant::now())
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// The time between the first and the last answer of a burst.
pub fn release_spread(answers: &[(u16, String, std::time::Instant)]) -> Duration {
    let first = answers.iter().map(|a| a.2).min().unwrap();
    let last = answers.iter().map(|a| a.2).max().unwrap();
    last - first
}
