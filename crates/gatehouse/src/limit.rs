//! Rate limits, one implementation for every limit a face applies: requests per client IP, password
//! logins per IP and per username, exchanges per internal caller. With the Redis store the buckets
//! live in Redis (GCRA in one script per bucket, Redis's clock), so N replicas hold one limit, not
//! N; with the embedded store (one replica) they are local `governor` buckets. Both run the same
//! algorithm, so a decision reads the same either way.
//!
//! When Redis cannot answer, `session.rate_limit_on_store_error` decides: by default a login is
//! refused (the limits that stop password guessing must not vanish in an outage an attacker might
//! cause) and a read is let through (the session lookup behind it fails closed on its own, and
//! refusing every page because a counter is unreachable would turn a Redis blip into an outage).
//! Faces know nothing of buckets: they ask `check` and turn a refusal into 429 or 503.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::Clock as _;
use governor::middleware::StateInformationMiddleware;
use governor::{DefaultKeyedRateLimiter, Quota as GovQuota, RateLimiter};
use serde::Deserialize;

use crate::config::Config;
use crate::crypto;
use crate::metrics::Metrics;
use crate::session::redis::{RedisStore, bucket_key};

/// Which limit a request is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Every public request, per client IP (`public.rate_limit_*`).
    Request,
    /// Password logins per client IP (`oidc.password_login_per_ip_per_minute`).
    LoginIp,
    /// Password logins per username, case-insensitive (`oidc.password_login_per_user_per_minute`).
    LoginUser,
    /// Exchanges per internal caller identity (`internal.rate_limit_per_second`).
    InternalCaller,
}

impl Kind {
    const ALL: [Kind; 4] = [Kind::Request, Kind::LoginIp, Kind::LoginUser, Kind::InternalCaller];

    /// The policy name in `RateLimit` / `RateLimit-Policy` headers.
    pub fn policy(self) -> &'static str {
        match self {
            Self::Request => "ip",
            Self::LoginIp => "login-ip",
            Self::LoginUser => "login-user",
            Self::InternalCaller => "caller",
        }
    }

    /// The `limit` label of `gatehouse_rate_limited_requests_total` (unchanged from before the
    /// limits were shared: both login buckets count as `login`).
    pub fn metric_label(self) -> &'static str {
        match self {
            Self::Request => "request",
            Self::LoginIp | Self::LoginUser => "login",
            Self::InternalCaller => "internal_caller",
        }
    }

    /// The tag inside the Redis key.
    fn tag(self) -> &'static str {
        match self {
            Self::Request => "ip",
            Self::LoginIp => "login-ip",
            Self::LoginUser => "login-user",
            Self::InternalCaller => "caller",
        }
    }

    /// What an unreachable store means for this kind unless the caller says otherwise.
    fn class(self) -> Class {
        match self {
            Self::LoginIp | Self::LoginUser => Class::Login,
            Self::Request | Self::InternalCaller => Class::Read,
        }
    }
}

/// What a request does, for the outage policy: a login (refused when the store is down, by
/// default) or a read (let through, by default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Login,
    Read,
}

/// `session.rate_limit_on_store_error`: what a rate limit does when Redis cannot answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnStoreError {
    /// Logins refused (503), reads let through (the default).
    #[default]
    Split,
    /// Every limit lets requests through while Redis is down.
    Open,
    /// Every limited request is refused (503) while Redis is down.
    Closed,
}

impl OnStoreError {
    fn lets_through(self, class: Class) -> bool {
        match self {
            Self::Split => class == Class::Read,
            Self::Open => true,
            Self::Closed => false,
        }
    }
}

/// One limit: `burst` requests at once, refilled one per `emission`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub burst: u32,
    pub emission: Duration,
}

impl Quota {
    pub fn per_second(rate: u32, burst: u32) -> Self {
        let rate = rate.max(1);
        Self { burst: burst.max(rate), emission: Duration::from_secs(1) / rate }
    }

    pub fn per_minute(rate: u32) -> Self {
        let rate = rate.max(1);
        Self { burst: rate, emission: Duration::from_secs(60) / rate }
    }

    /// The `w` of `RateLimit-Policy`: seconds for an empty bucket to fill (at least 1).
    pub fn window_secs(&self) -> u64 {
        ceil_secs(self.emission * self.burst).max(1)
    }
}

/// A limit's answer for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub kind: Kind,
    pub allowed: bool,
    /// How long until this request would be allowed (zero when it was).
    pub retry_after: Duration,
    /// The quota: the burst size (`q` of `RateLimit-Policy`).
    pub limit: u32,
    pub window_secs: u64,
    /// Requests still allowed now (`r` of `RateLimit`).
    pub remaining: u32,
    /// Until the bucket is full again (`t` of `RateLimit`).
    pub reset: Duration,
}

impl Decision {
    fn unlimited(kind: Kind) -> Self {
        Self {
            kind,
            allowed: true,
            retry_after: Duration::ZERO,
            limit: 0,
            window_secs: 0,
            remaining: 0,
            reset: Duration::ZERO,
        }
    }

    /// `Retry-After` in whole seconds, rounded up (a client retrying on time is not refused again).
    pub fn retry_after_secs(&self) -> u64 {
        ceil_secs(self.retry_after).max(1)
    }

    /// `RateLimit-Policy` (draft-ietf-httpapi-ratelimit-headers-11): `"ip";q=20;w=1`.
    pub fn policy_header(&self) -> String {
        format!("\"{}\";q={};w={}", self.kind.policy(), self.limit, self.window_secs)
    }

    /// `RateLimit` (same draft): `"ip";r=0;t=1`.
    pub fn ratelimit_header(&self) -> String {
        format!("\"{}\";r={};t={}", self.kind.policy(), self.remaining, ceil_secs(self.reset))
    }
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// The store that keeps the counters could not answer, and this request's class fails closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the rate-limit store is unavailable")]
pub struct StoreUnavailable;

type Local = DefaultKeyedRateLimiter<String, StateInformationMiddleware>;

enum Backend {
    /// One bucket map per kind, in this process (embedded store: one replica).
    Local(Vec<(Kind, Local)>),
    /// Shared buckets in Redis.
    Redis(Arc<RedisStore>),
}

pub struct Limiter {
    quotas: Vec<(Kind, Quota)>,
    backend: Backend,
    on_error: OnStoreError,
    metrics: Arc<Metrics>,
}

impl Limiter {
    /// The configured limits; buckets in `redis` when given, else in this process.
    pub fn new(config: &Config, redis: Option<Arc<RedisStore>>, metrics: Arc<Metrics>) -> Self {
        let mut quotas = Vec::new();
        if config.public.rate_limit_per_second > 0 {
            quotas.push((
                Kind::Request,
                Quota::per_second(config.public.rate_limit_per_second, config.public.rate_limit_burst),
            ));
        }
        quotas.push((Kind::LoginIp, Quota::per_minute(config.oidc.password_login_per_ip_per_minute)));
        quotas.push((Kind::LoginUser, Quota::per_minute(config.oidc.password_login_per_user_per_minute)));
        if let Some(internal) = &config.internal {
            let rate = internal.rate_limit_per_second;
            quotas.push((Kind::InternalCaller, Quota::per_second(rate, rate)));
        }
        Self::with_quotas(quotas, redis, config.session.rate_limit_on_store_error, metrics)
    }

    pub fn with_quotas(
        quotas: Vec<(Kind, Quota)>,
        redis: Option<Arc<RedisStore>>,
        on_error: OnStoreError,
        metrics: Arc<Metrics>,
    ) -> Self {
        let backend = match redis {
            Some(r) => Backend::Redis(r),
            None => Backend::Local(
                quotas
                    .iter()
                    .filter_map(|(kind, q)| {
                        let burst = NonZeroU32::new(q.burst)?;
                        let quota = GovQuota::with_period(q.emission)?.allow_burst(burst);
                        Some((*kind, RateLimiter::keyed(quota).with_middleware::<StateInformationMiddleware>()))
                    })
                    .collect(),
            ),
        };
        Self { quotas, backend, on_error, metrics }
    }

    /// Whether `kind` is limited at all (the per-IP request limit is off by default).
    pub fn is_on(&self, kind: Kind) -> bool {
        self.quota(kind).is_some()
    }

    fn quota(&self, kind: Kind) -> Option<Quota> {
        self.quotas.iter().find(|(k, _)| *k == kind).map(|(_, q)| *q)
    }

    /// Take one request from `kind`'s bucket for `key`, with the kind's own outage class.
    pub async fn check(&self, kind: Kind, key: &str) -> Result<Decision, StoreUnavailable> {
        self.check_as(kind, key, kind.class()).await
    }

    /// Take one request from `kind`'s bucket for `key`; if the store cannot answer, `class` and
    /// `session.rate_limit_on_store_error` decide between letting it through and
    /// `StoreUnavailable`. A refusal is counted in `gatehouse_rate_limited_requests_total`.
    pub async fn check_as(&self, kind: Kind, key: &str, class: Class) -> Result<Decision, StoreUnavailable> {
        let Some(quota) = self.quota(kind) else { return Ok(Decision::unlimited(kind)) };
        let base = Decision {
            kind,
            allowed: true,
            retry_after: Duration::ZERO,
            limit: quota.burst,
            window_secs: quota.window_secs(),
            remaining: 0,
            reset: Duration::ZERO,
        };
        let decision = match &self.backend {
            Backend::Local(buckets) => {
                let Some((_, bucket)) = buckets.iter().find(|(k, _)| *k == kind) else {
                    return Ok(Decision::unlimited(kind));
                };
                let key = normalise(kind, key);
                match bucket.check_key(&key) {
                    Ok(state) => {
                        let remaining = state.remaining_burst_capacity();
                        Decision {
                            remaining,
                            reset: quota.emission * (quota.burst - remaining.min(quota.burst)),
                            ..base
                        }
                    }
                    Err(not_until) => {
                        let retry_after = not_until.wait_time_from(bucket.clock().now());
                        Decision { allowed: false, retry_after, reset: quota.emission * quota.burst, ..base }
                    }
                }
            }
            // Boxed: the Redis call's future is large, and inline it would make every caller's
            // future (the whole public pipeline's, per request) that much larger to move.
            Backend::Redis(store) => {
                match Box::pin(store.gcra(&redis_key(kind, key), quota.emission, quota.burst)).await {
                    Ok(o) => Decision {
                        allowed: o.allowed,
                        retry_after: o.retry_after,
                        remaining: o.remaining,
                        reset: o.reset,
                        ..base
                    },
                    Err(e) => {
                        let open = self.on_error.lets_through(class);
                        tracing::warn!(
                            limit = kind.policy(),
                            error = %e,
                            action = if open { "allowed" } else { "refused" },
                            "rate-limit store unavailable"
                        );
                        self.metrics.rate_limit_store_error(kind.metric_label(), open);
                        return if open { Ok(Decision::unlimited(kind)) } else { Err(StoreUnavailable) };
                    }
                }
            }
        };
        if !decision.allowed {
            self.metrics.rate_limited(kind.metric_label());
        }
        Ok(decision)
    }

    /// Forget idle local buckets (memory would grow with every IP ever seen); Redis expires its
    /// own keys.
    pub fn retain_recent(&self) {
        if let Backend::Local(buckets) = &self.backend {
            for (_, b) in buckets {
                b.retain_recent();
            }
        }
    }

    /// Whether the buckets are shared through Redis.
    pub fn is_shared(&self) -> bool {
        matches!(self.backend, Backend::Redis(_))
    }

    pub fn kinds() -> [Kind; 4] {
        Kind::ALL
    }
}

/// Usernames compare case-insensitively (Keycloak's do).
fn normalise(kind: Kind, key: &str) -> String {
    match kind {
        Kind::LoginUser => key.to_lowercase(),
        _ => key.to_owned(),
    }
}

/// The Redis key of a bucket. Usernames are user input and personal data: only a hash of one is
/// stored (domain-separated, so it matches no other hash Gatehouse keeps). IPs and caller
/// identities are stored as they are (an IP is what the limit is about; callers come from the
/// allow-list), but an IP goes through `IpAddr` first so only its canonical form is a key.
fn redis_key(kind: Kind, key: &str) -> String {
    let value = match kind {
        Kind::LoginUser => {
            let mut input = b"gatehouse-rate-limit-user\0".to_vec();
            input.extend_from_slice(normalise(kind, key).as_bytes());
            crypto::hex(&crypto::sha256(&input))
        }
        Kind::Request | Kind::LoginIp => match key.parse::<IpAddr>() {
            Ok(ip) => ip.to_string(),
            Err(_) => crypto::hex(&crypto::sha256(key.as_bytes())),
        },
        Kind::InternalCaller => key.replace(['{', '}'], "_"),
    };
    bucket_key(kind.tag(), &value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(quotas: Vec<(Kind, Quota)>) -> Limiter {
        Limiter::with_quotas(quotas, None, OnStoreError::Split, Arc::new(Metrics::default()))
    }

    #[tokio::test]
    async fn local_buckets_per_kind_and_key() {
        let l = local(vec![(Kind::Request, Quota::per_second(1, 3)), (Kind::LoginUser, Quota::per_minute(2))]);
        let mut seen = Vec::new();
        for _ in 0..4 {
            seen.push(l.check(Kind::Request, "10.0.0.1").await.unwrap());
        }
        assert_eq!(seen.iter().map(|d| d.allowed).collect::<Vec<_>>(), [true, true, true, false]);
        assert_eq!(seen.iter().map(|d| d.remaining).collect::<Vec<_>>(), [2, 1, 0, 0]);
        let denied = seen[3];
        assert!(denied.retry_after > Duration::from_millis(900) && denied.retry_after <= Duration::from_secs(1));
        assert_eq!(denied.retry_after_secs(), 1);
        assert_eq!(denied.policy_header(), "\"ip\";q=3;w=3");
        assert_eq!(denied.ratelimit_header(), "\"ip\";r=0;t=3");
        assert!(l.check(Kind::Request, "10.0.0.2").await.unwrap().allowed, "own bucket per IP");
        assert!(l.check(Kind::LoginUser, "alice").await.unwrap().allowed);
        assert!(l.check(Kind::LoginUser, "ALICE").await.unwrap().allowed);
        let d = l.check(Kind::LoginUser, "Alice").await.unwrap();
        assert!(!d.allowed, "usernames are one bucket whatever the case");
        assert!(d.retry_after_secs() > 1 && d.retry_after_secs() <= 30, "{}", d.retry_after_secs());
        assert!(l.check(Kind::InternalCaller, "x").await.unwrap().allowed, "unconfigured kinds are unlimited");
    }

    #[test]
    fn usernames_never_reach_redis_keys_raw() {
        let k = redis_key(Kind::LoginUser, "Alice.Smith@example.com");
        assert!(!k.to_lowercase().contains("alice"), "{k}");
        assert_eq!(k, redis_key(Kind::LoginUser, "alice.smith@EXAMPLE.com"), "case-insensitive");
        assert!(k.starts_with("gatehouse:rl:{login-user:") && k.ends_with('}'));
        assert_eq!(redis_key(Kind::Request, "::ffff:1.2.3.4"), "gatehouse:rl:{ip:::ffff:1.2.3.4}");
        assert_eq!(redis_key(Kind::LoginIp, "1.2.3.4"), "gatehouse:rl:{login-ip:1.2.3.4}");
        assert!(!redis_key(Kind::Request, "not-an-ip}{x").contains("not-an-ip"));
    }

    #[test]
    fn outage_policy() {
        assert!(OnStoreError::Split.lets_through(Class::Read) && !OnStoreError::Split.lets_through(Class::Login));
        assert!(OnStoreError::Open.lets_through(Class::Login) && OnStoreError::Open.lets_through(Class::Read));
        assert!(!OnStoreError::Closed.lets_through(Class::Read));
        assert_eq!(Quota::per_minute(10).window_secs(), 60);
        assert_eq!(Quota::per_second(20, 20).window_secs(), 1);
        assert_eq!(Quota::per_second(20, 50).window_secs(), 3);
    }
}
