//! Default values of every key, one function each (serde's `default = "…"` needs a path).

use super::*;

pub fn drain_timeout() -> Duration {
    Duration::from_secs(10)
}
pub fn public_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 8080))
}
pub fn admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9090))
}
pub fn max_body_bytes() -> usize {
    16 * 1024
}
pub fn rate_limit_per_second() -> u32 {
    // Off by default: behind a load balancer whose address is not in `trusted_proxies`, every
    // client shares one IP, and a default limit would turn into an outage.
    0
}
pub fn rate_limit_burst() -> u32 {
    200
}
pub fn scopes() -> Vec<String> {
    vec!["openid".into(), "profile".into(), "email".into()]
}
pub fn refresh_skew() -> Duration {
    Duration::from_secs(30)
}
pub fn http_timeout() -> Duration {
    Duration::from_secs(10)
}
pub fn algorithms() -> Vec<String> {
    vec!["RS256".into(), "PS256".into(), "ES256".into()]
}
pub fn login_per_ip() -> u32 {
    20
}
pub fn login_per_user() -> u32 {
    5
}
pub fn store() -> StoreKind {
    StoreKind::Embedded
}
pub fn store_path() -> PathBuf {
    PathBuf::from("data/sessions.redb")
}
/// 16 MiB: the hot part of a store of 100,000 sessions (the tree's upper levels and the recently
/// used records) fits; docs/benchmarks.md has the measurement.
pub fn cache_bytes() -> usize {
    16 << 20
}
pub fn integrity_check() -> bool {
    true
}
pub fn integrity_check_timeout() -> Duration {
    Duration::from_secs(60)
}
pub fn redis_timeout() -> Duration {
    Duration::from_secs(2)
}
pub fn idle_timeout() -> Duration {
    Duration::from_secs(30 * 60)
}
pub fn absolute_timeout() -> Duration {
    Duration::from_secs(12 * 3600)
}
pub fn cookie_name() -> String {
    "__Host-Http-gatehouse".into()
}
pub fn same_site() -> SameSite {
    SameSite::Lax
}
pub fn sweep_interval() -> Duration {
    Duration::from_secs(60)
}
pub fn internal_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 8443))
}
pub fn check_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8444))
}
pub fn internal_mode() -> InternalMode {
    InternalMode::Mtls
}
pub fn reload_interval() -> Duration {
    Duration::from_secs(5)
}
pub fn handshake_timeout() -> Duration {
    Duration::from_secs(5)
}
pub fn internal_rate() -> u32 {
    1000
}
pub fn log_format() -> LogFormat {
    LogFormat::Text
}
pub fn tracing_sample_ratio() -> f64 {
    1.0
}
pub fn tracing_propagation() -> TracePropagation {
    TracePropagation::TrustedProxies
}
pub fn tracing_service_name() -> String {
    "gatehouse".into()
}
pub fn tracing_export_timeout() -> Duration {
    Duration::from_secs(10)
}
pub fn log_level() -> String {
    "info".into()
}
pub fn route_timeout() -> Duration {
    Duration::from_secs(60)
}
pub fn route_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
pub fn route_max_body_bytes() -> usize {
    10 * 1024 * 1024
}
pub fn route_max_in_flight() -> usize {
    1024
}
pub fn route_session_recheck() -> Duration {
    Duration::from_secs(30)
}
