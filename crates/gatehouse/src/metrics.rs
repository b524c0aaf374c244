//! Prometheus metrics, served on the admin listener (`/metrics`, OpenMetrics text).
//!
//! Naming follows the Prometheus conventions: a `gatehouse_` prefix, base units in the name
//! (`_seconds`, `_bytes`), counters end in `_total` (added by the encoder — registering a name that
//! already ends in `_total` panics), timestamps are `_timestamp_seconds`. Every label value comes
//! from a small, fixed set or from configuration (route prefixes and names, allowed callers):
//! never a user, a session, a token or a raw request path, so cardinality stays bounded and the
//! endpoint leaks nothing. `docs/observability.md` lists every metric; the rules in
//! `deploy/prometheus/` and the dashboard in `deploy/grafana/` are checked against a live
//! `/metrics` by `tests/observability.rs`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// A label whose values are fixed by the code: an enum with the exposed text of each value, so
/// no label value is ever built from a string at run time (and a typo does not compile).
macro_rules! label_values {
    ($(#[$meta:meta])* $name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
        pub enum $name { $($variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl EncodeLabelValue for $name {
            fn encode(&self, e: &mut prometheus_client::encoding::LabelValueEncoder<'_>) -> std::fmt::Result {
                use std::fmt::Write;
                e.write_str(self.as_str())
            }
        }
    };
}

label_values!(
    /// `gatehouse_token_refreshes_total{outcome}`.
    RefreshOutcome {
        Ok => "ok",
        InvalidGrant => "invalid_grant",
        Unavailable => "unavailable",
        Unvalidated => "unvalidated",
        Rejected => "rejected",
    }
);

label_values!(
    /// `gatehouse_logins_total{outcome}`.
    LoginOutcome { Ok => "ok", Failed => "failed" }
);

label_values!(
    /// `gatehouse_exchanges_total{outcome}`.
    ExchangeOutcome {
        Ok => "ok",
        InvalidSession => "invalid_session",
        StoreUnavailable => "store_unavailable",
        IdpUnavailable => "idp_unavailable",
        InternalError => "internal_error",
        CallerForbidden => "caller_forbidden",
        RateLimited => "rate_limited",
    }
);

label_values!(
    /// `gatehouse_proxied_requests_total{outcome}`: the upstream answer's class.
    ProxyOutcome { Ok => "ok", ClientError => "4xx", ServerError => "5xx", Upgraded => "upgraded" }
);

label_values!(
    /// `gatehouse_view_requests_total{outcome}`.
    ViewResult {
        Ok => "ok",
        Partial => "partial",
        NotModified => "not_modified",
        PartFailed => "part_failed",
        ClientError => "4xx",
        ServerError => "5xx",
    }
);

label_values!(
    /// `gatehouse_backchannel_logouts_deferred_total{outcome}`: how a back-channel logout that
    /// could not be applied at once (store unavailable) ended.
    DeferredLogoutOutcome {
        Applied => "applied",
        AlreadyApplied => "already_applied",
        Collapsed => "collapsed",
        Expired => "expired",
        Failed => "failed",
        Dropped => "dropped",
    }
);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeferredLogoutLabels {
    pub outcome: DeferredLogoutOutcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefreshLabels {
    pub outcome: RefreshOutcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LoginLabels {
    pub outcome: LoginOutcome,
}

/// A proxied request: the route's prefix (from config, never the request path) and the outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteOutcome {
    pub route: String,
    pub outcome: ProxyOutcome,
}

impl RouteOutcome {
    pub fn new(route: &str, outcome: ProxyOutcome) -> Self {
        Self { route: route.to_owned(), outcome }
    }
}

/// The listener a request arrived on. The admin listener is not counted (scrapes would dominate).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Face {
    public,
    internal,
    /// The gateways' check listener (`[check]`).
    check,
}

impl Face {
    pub fn as_str(self) -> &'static str {
        match self {
            Face::public => "public",
            Face::internal => "internal",
            Face::check => "check",
        }
    }
}

/// `gatehouse_http_requests_total` labels. `route` is the router's path template
/// (`/auth/me`), a proxy route's configured prefix, or `other` (static files, unknown paths).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub face: Face,
    /// Shared with the route table (`Arc<str>`): a request's labels are built without allocating.
    pub route: Arc<str>,
    pub method: &'static str,
    pub status_class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpDurationLabels {
    pub face: Face,
    pub route: Arc<str>,
}

/// `gatehouse_exchanges_total`: `outcome` first, so `…{outcome="ok"` prefixes still match.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExchangeLabels {
    pub outcome: ExchangeOutcome,
    /// The authenticated caller (SPIFFE ID or DNS name); only callers on the allow-list reach
    /// the exchange, so the set is bounded by configuration.
    pub caller: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreOpLabels {
    pub operation: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreErrorLabels {
    pub operation: &'static str,
    /// `unavailable` (backend unreachable or timed out) or `corrupt` (a record failed its checks).
    pub kind: &'static str,
}

/// A call to the identity provider: which endpoint and how it ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderLabels {
    /// `discovery`, `jwks`, `token`, `revocation`.
    pub endpoint: &'static str,
    /// `ok` (2xx), `rejected` (4xx: a verdict, e.g. invalid_grant), `unavailable` (5xx, timeout,
    /// connection failure).
    pub outcome: &'static str,
}

/// What a rate limit did when its store (Redis) could not answer (`session.rate_limit_on_store_error`).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum StoreErrorAction {
    /// The request went through unlimited (fail open).
    allowed,
    /// The request was refused with 503 (fail closed).
    refused,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitStoreErrorLabels {
    /// As in `LimitLabels`.
    pub limit: &'static str,
    pub action: StoreErrorAction,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    /// `request` (per-IP request rate on the public listener), `login` (password login
    /// attempts per IP or user), `internal_caller` (per caller on the internal listener).
    pub limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertLabels {
    /// `internal_server`, `internal_client_ca`, `route_client`, `route_ca`.
    pub certificate: &'static str,
    /// The route prefix for route certificates, `-` otherwise.
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: &'static str,
}

/// Every `SessionStore` operation, as named in `gatehouse_session_store_*{operation}`.
pub const STORE_OPERATIONS: &[&str] = &[
    "insert",
    "get",
    "compare_and_swap",
    "delete",
    "list_by_user",
    "delete_by_user",
    "delete_by_provider_sid",
    "sweep",
    "ping",
    "find_by_prefix",
    "delete_all",
    "mark",
    "unmark",
    "is_marked",
    "lock_refresh",
    "count",
];

fn latency_buckets() -> impl Iterator<Item = f64> {
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0].into_iter()
}

fn histogram() -> Histogram {
    Histogram::new(latency_buckets())
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// A composed view's answer: the view's name (from config) and the outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ViewOutcome {
    pub view: String,
    pub outcome: ViewResult,
}

/// A failed part of a composed view: view and part names (from config) and the reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ViewPartFailure {
    pub view: String,
    pub part: String,
    pub reason: String,
}

pub struct Metrics {
    pub sessions_created: Counter,
    /// Calls to the provider's token endpoint with a refresh token, by outcome (`ok`,
    /// `invalid_grant`, `unavailable`, `unvalidated`, `rejected`).
    pub refreshes: Family<RefreshLabels, Counter>,
    /// Refreshes that waited for another request's (or replica's) refresh of the same session.
    pub refresh_lock_waits: Counter,
    /// Requests answered without a refresh because the session is backing off after the
    /// provider failed its last refresh (5xx, timeout).
    pub refresh_backoffs: Counter,
    /// Logins (code flow and password), by outcome.
    pub logins: Family<LoginLabels, Counter>,
    /// Session exchanges on the internal listener, by outcome and caller.
    pub exchanges: Family<ExchangeLabels, Counter>,
    /// Requests through the API proxy, by route and outcome (`ok`, `4xx`, `5xx`, `upgraded`).
    pub proxied: Family<RouteOutcome, Counter>,
    /// Time to the upstream's response head, per proxy route.
    pub upstream_duration: HistogramFamily<HttpDurationLabels>,
    pub http_requests: Family<HttpLabels, Counter>,
    pub http_duration: HistogramFamily<HttpDurationLabels>,
    pub store_duration: HistogramFamily<StoreOpLabels>,
    pub store_errors: Family<StoreErrorLabels, Counter>,
    pub provider_duration: HistogramFamily<ProviderLabels>,
    pub rate_limited: Family<LimitLabels, Counter>,
    /// Rate-limit checks the shared store could not answer, by limit and what was done.
    pub rate_limit_store_errors: Family<LimitStoreErrorLabels, Counter>,
    /// Sessions created minus sessions ended by this replica since it started (see docs).
    pub sessions_active: Gauge,
    pub cert_expiry: Family<CertLabels, Gauge>,
    /// Composed views answered, by view and outcome (`ok`, `partial`, `not_modified`,
    /// `part_failed`, `4xx`, `5xx`).
    pub views: Family<ViewOutcome, Counter>,
    /// Failed parts of composed views, by view, part and reason.
    pub view_part_failures: Family<ViewPartFailure, Counter>,
    /// Validated back-channel logouts this replica still has to apply (the store was down).
    pub backchannel_logout_pending: Gauge,
    /// Deferred back-channel logouts by how they ended: `applied` by the retry, or `dropped`
    /// because the queue was full.
    pub backchannel_logouts_deferred: Family<DeferredLogoutLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let m = Self {
            sessions_created: Counter::default(),
            refreshes: Family::default(),
            refresh_lock_waits: Counter::default(),
            refresh_backoffs: Counter::default(),
            logins: Family::default(),
            exchanges: Family::default(),
            proxied: Family::default(),
            upstream_duration: Family::new_with_constructor(histogram),
            http_requests: Family::default(),
            http_duration: Family::new_with_constructor(histogram),
            store_duration: Family::new_with_constructor(histogram),
            store_errors: Family::default(),
            provider_duration: Family::new_with_constructor(histogram),
            rate_limited: Family::default(),
            rate_limit_store_errors: Family::default(),
            sessions_active: Gauge::default(),
            cert_expiry: Family::default(),
            views: Family::default(),
            view_part_failures: Family::default(),
            backchannel_logout_pending: Gauge::default(),
            backchannel_logouts_deferred: Family::default(),
        };
        // Series that alerts divide by exist from the start (a ratio over a missing series is
        // "no data", and an alert on it never fires).
        for &outcome in RefreshOutcome::ALL {
            let _ = m.refreshes.get_or_create(&RefreshLabels { outcome });
        }
        for &outcome in DeferredLogoutOutcome::ALL {
            let _ = m.backchannel_logouts_deferred.get_or_create(&DeferredLogoutLabels { outcome });
        }
        m
    }
}

impl Metrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register("gatehouse_sessions_created", "Sessions created", self.sessions_created.clone());
        registry.register(
            "gatehouse_token_refreshes",
            "Refresh-token grants sent to the identity provider, by outcome",
            self.refreshes.clone(),
        );
        registry.register(
            "gatehouse_token_refresh_lock_waits",
            "Refreshes that waited for a concurrent refresh of the same session",
            self.refresh_lock_waits.clone(),
        );
        registry.register(
            "gatehouse_token_refresh_backoffs",
            "Requests not sent to the provider because their session's refresh is backing off after a provider failure",
            self.refresh_backoffs.clone(),
        );
        registry.register("gatehouse_logins", "Login attempts by outcome", self.logins.clone());
        registry.register(
            "gatehouse_exchanges",
            "Internal session exchanges by outcome and caller",
            self.exchanges.clone(),
        );
        registry.register(
            "gatehouse_proxied_requests",
            "API proxy requests by route and outcome",
            self.proxied.clone(),
        );
        registry.register_with_unit(
            "gatehouse_upstream_request_duration",
            "Time from sending a proxied request to the upstream's response head, by route",
            Unit::Seconds,
            self.upstream_duration.clone(),
        );
        registry.register(
            "gatehouse_http_requests",
            "HTTP requests answered, by listener (face), route template, method and status class",
            self.http_requests.clone(),
        );
        registry.register_with_unit(
            "gatehouse_http_request_duration",
            "Time to answer an HTTP request (to the response head), by listener and route template",
            Unit::Seconds,
            self.http_duration.clone(),
        );
        registry.register_with_unit(
            "gatehouse_session_store_operation_duration",
            "Session store operation latency, by operation",
            Unit::Seconds,
            self.store_duration.clone(),
        );
        registry.register(
            "gatehouse_session_store_errors",
            "Session store operations that failed, by operation and kind",
            self.store_errors.clone(),
        );
        registry.register_with_unit(
            "gatehouse_identity_provider_request_duration",
            "Identity provider (Keycloak) HTTP call latency, by endpoint and outcome",
            Unit::Seconds,
            self.provider_duration.clone(),
        );
        registry.register(
            "gatehouse_rate_limited_requests",
            "Requests refused by a rate limit, by limit",
            self.rate_limited.clone(),
        );
        registry.register(
            "gatehouse_rate_limit_store_errors",
            "Rate-limit checks the shared store (Redis) could not answer, by limit and action (allowed = failed open, refused = 503)",
            self.rate_limit_store_errors.clone(),
        );
        registry.register(
            "gatehouse_sessions_active",
            "Sessions created minus sessions ended by this replica since it started (approximate; sum over replicas)",
            self.sessions_active.clone(),
        );
        registry.register(
            "gatehouse_certificate_expiry_timestamp_seconds",
            "Not-after time of each loaded certificate (earliest in a bundle), Unix seconds",
            self.cert_expiry.clone(),
        );
        registry.register("gatehouse_views", "Composed view requests by view and outcome", self.views.clone());
        registry.register(
            "gatehouse_view_part_failures",
            "Failed parts of composed views by view, part and reason",
            self.view_part_failures.clone(),
        );
        registry.register(
            "gatehouse_backchannel_logout_pending",
            "Validated back-channel logouts this replica has not applied yet because the session store was unavailable",
            self.backchannel_logout_pending.clone(),
        );
        registry.register(
            "gatehouse_backchannel_logouts_deferred",
            "Back-channel logouts deferred because the session store was unavailable, by how they ended (applied by the retry, dropped when the queue was full)",
            self.backchannel_logouts_deferred.clone(),
        );
        // A gauge named `…_info` with value 1 (the Prometheus convention) rather than an
        // OpenMetrics `info` type, which promtool and the Prometheus text parser reject.
        let build = Family::<BuildLabels, Gauge>::default();
        build.get_or_create(&BuildLabels { version: env!("CARGO_PKG_VERSION") }).set(1);
        registry.register("gatehouse_build_info", "Build information (value 1)", build);
    }

    /// Create the zero series alerts and dashboards divide by or take rates of, for the label
    /// values known from configuration: an alert over a series that does not exist yet never
    /// fires, and a family without series is not even listed on `/metrics`.
    pub fn preinit(&self, config: &crate::config::Config) {
        for &outcome in LoginOutcome::ALL {
            let _ = self.logins.get_or_create(&LoginLabels { outcome });
        }
        for limit in ["request", "login", "internal_caller"] {
            let _ = self.rate_limited.get_or_create(&LimitLabels { limit });
            if config.session.store == crate::config::StoreKind::Redis {
                for action in [StoreErrorAction::allowed, StoreErrorAction::refused] {
                    let _ = self.rate_limit_store_errors.get_or_create(&LimitStoreErrorLabels { limit, action });
                }
            }
        }
        for operation in STORE_OPERATIONS {
            for kind in ["unavailable", "corrupt"] {
                let _ = self.store_errors.get_or_create(&StoreErrorLabels { operation, kind });
            }
        }
        if let Some(internal) = &config.internal {
            for caller in &internal.allow {
                use ExchangeOutcome as E;
                for outcome in [E::Ok, E::InvalidSession, E::StoreUnavailable, E::IdpUnavailable, E::InternalError] {
                    let _ = self.exchanges.get_or_create(&ExchangeLabels { outcome, caller: caller.clone() });
                }
            }
            for outcome in [ExchangeOutcome::CallerForbidden, ExchangeOutcome::RateLimited] {
                let _ = self.exchanges.get_or_create(&ExchangeLabels { outcome, caller: "-".into() });
            }
        }
        for route in &config.routes {
            for &outcome in ProxyOutcome::ALL {
                let _ = self.proxied.get_or_create(&RouteOutcome::new(&route.prefix, outcome));
            }
            let _ = self
                .upstream_duration
                .get_or_create(&HttpDurationLabels { face: Face::public, route: Arc::from(route.prefix.as_str()) });
        }
    }

    /// Record one HTTP request's outcome (the RED metrics).
    pub fn observe_http(&self, face: Face, route: &Arc<str>, method: &str, status: u16, elapsed: Duration) {
        let status_class = match status {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        // Methods outside the standard set are folded, so a client cannot mint label values.
        let method = match method {
            "GET" => "GET",
            "HEAD" => "HEAD",
            "POST" => "POST",
            "PUT" => "PUT",
            "PATCH" => "PATCH",
            "DELETE" => "DELETE",
            "OPTIONS" => "OPTIONS",
            _ => "other",
        };
        self.http_requests.get_or_create(&HttpLabels { face, route: route.clone(), method, status_class }).inc();
        self.http_duration
            .get_or_create(&HttpDurationLabels { face, route: route.clone() })
            .observe(elapsed.as_secs_f64());
    }

    /// An internal request refused before the exchange ran (`caller_forbidden`, `rate_limited`);
    /// the caller label is `-`, since a refused caller's name is not bounded by configuration.
    pub fn exchange_refused(&self, outcome: ExchangeOutcome) {
        self.exchanges.get_or_create(&ExchangeLabels { outcome, caller: "-".into() }).inc();
    }

    /// A rate-limit check the store could not answer; `allowed` when it failed open.
    pub fn rate_limit_store_error(&self, limit: &'static str, allowed: bool) {
        let action = if allowed { StoreErrorAction::allowed } else { StoreErrorAction::refused };
        self.rate_limit_store_errors.get_or_create(&LimitStoreErrorLabels { limit, action }).inc();
    }

    pub fn rate_limited(&self, limit: &'static str) {
        self.rate_limited.get_or_create(&LimitLabels { limit }).inc();
    }

    /// Set the expiry gauge of the certificate(s) in a PEM file; the earliest not-after wins (a
    /// CA bundle is as good as its first certificate to expire). Unreadable files leave the gauge
    /// as it was: start-up already refused them, and the reload path logs its own errors.
    pub fn record_certificate(&self, certificate: &'static str, route: &str, path: &Path) {
        if let Some(not_after) = earliest_not_after(path) {
            self.cert_expiry.get_or_create(&CertLabels { certificate, route: route.to_owned() }).set(not_after);
        }
    }
}

/// The Prometheus text format (0.0.4) of an OpenMetrics exposition, for scrapers that do not
/// ask for OpenMetrics (and for `promtool check metrics`, which only parses this format):
/// counter families are named with their `_total` suffix, `# UNIT` and `# EOF` are dropped.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut help: Option<&str> = None;
    for line in openmetrics.lines() {
        if line.starts_with("# HELP ") {
            help = Some(line);
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let name = if kind == "counter" { format!("{name}_total") } else { name.to_owned() };
            if let Some(h) = help.take() {
                let text = h.strip_prefix("# HELP ").and_then(|r| r.split_once(' ')).map_or("", |(_, t)| t);
                out.push_str(&format!("# HELP {name} {text}\n"));
            }
            out.push_str(&format!("# TYPE {name} {kind}\n"));
            continue;
        }
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// The earliest not-after (Unix seconds) among the certificates in a PEM file.
pub fn earliest_not_after(path: &Path) -> Option<i64> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let certs = CertificateDer::pem_file_iter(path).ok()?;
    certs
        .filter_map(Result::ok)
        .filter_map(|der| {
            let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
            Some(cert.validity().not_after.timestamp())
        })
        .min()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(m: &Metrics) -> String {
        let mut r = Registry::default();
        m.register(&mut r);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &r).unwrap();
        out
    }

    #[test]
    fn prometheus_text_names_counters_with_total_and_drops_openmetrics_lines() {
        let m = Metrics::default();
        m.logins.get_or_create(&LoginLabels { outcome: LoginOutcome::Ok }).inc();
        m.observe_http(Face::public, &Arc::from("/auth/me"), "GET", 200, Duration::from_millis(1));
        let text = to_prometheus_text(&encode(&m));
        assert!(text.contains(
            "# HELP gatehouse_logins_total Login attempts by outcome.\n# TYPE gatehouse_logins_total counter\n"
        ));
        assert!(text.contains("# TYPE gatehouse_http_request_duration_seconds histogram\n"));
        assert!(!text.contains("# EOF") && !text.contains("# UNIT"));
    }

    #[test]
    fn odd_methods_are_folded_and_statuses_classed() {
        let m = Metrics::default();
        m.observe_http(Face::public, &Arc::from("/auth/me"), "BREW", 418, Duration::from_millis(3));
        m.observe_http(Face::internal, &Arc::from("/internal/v1/token"), "POST", 503, Duration::from_millis(3));
        let text = encode(&m);
        assert!(text.contains(
            r#"gatehouse_http_requests_total{face="public",route="/auth/me",method="other",status_class="4xx"} 1"#
        ));
        assert!(text.contains(r#"method="POST",status_class="5xx"} 1"#));
        assert!(!text.contains("BREW"));
        assert!(text.contains("gatehouse_build_info{version="));
        assert!(text.contains(r#"gatehouse_token_refreshes_total{outcome="invalid_grant"} 0"#));
    }

    #[test]
    fn certificate_expiry_is_the_earliest_in_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let long = crate::pki::new_ca("long", 400).unwrap();
        let short = crate::pki::new_ca("short", 10).unwrap();
        let path = dir.path().join("bundle.pem");
        // The short-lived one second: the earliest wins, not the first.
        std::fs::write(&path, format!("{}{}", long.cert_pem, short.cert_pem)).unwrap();
        let m = Metrics::default();
        m.record_certificate("internal_client_ca", "-", &path);
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let text = encode(&m);
        let line = text.lines().find(|l| l.starts_with("gatehouse_certificate_expiry_timestamp_seconds{")).unwrap();
        assert!(line.contains(r#"certificate="internal_client_ca",route="-""#), "{line}");
        let value: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        let days = (value as i64 - now) / 86400;
        assert!((9..=10).contains(&days), "expiry {days} days away, want the 10-day certificate");
    }
}
