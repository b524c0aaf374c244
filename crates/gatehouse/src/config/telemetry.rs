//! `[log]` and `[tracing]`: log format and filter, OpenTelemetry export, sampling and whose
//! trace context is continued.

use super::*;

/// `[log] level`: a tracing filter whose every directive names a real level. A bare word that is
/// not a level (`verbose`) would parse as a target and silently switch every other log line off.
pub(super) fn check_log_filter(filter: &str) -> Result<(), ConfigError> {
    const LEVELS: &[&str] = &["trace", "debug", "info", "warn", "error", "off"];
    for directive in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let level = directive.rsplit_once('=').map_or(directive, |(_, l)| l).to_ascii_lowercase();
        if !LEVELS.contains(&level.as_str()) {
            let hint = closest(&level, LEVELS)
                .or(match level.as_str() {
                    "verbose" | "all" => Some("debug"),
                    "warning" => Some("warn"),
                    "none" | "quiet" => Some("off"),
                    _ => None,
                })
                .map(|b| format!("; did you mean `{b}`?"))
                .unwrap_or_default();
            return Err(invalid(
                "log.level",
                format!(
                    "`{directive}` does not name a level ({}){hint} — use a level, or `target=level` like `gatehouse=debug,info`",
                    LEVELS.join(", ")
                ),
            ));
        }
    }
    if tracing_subscriber::EnvFilter::try_new(filter).is_err() {
        return Err(invalid(
            "log.level",
            format!("`{filter}` is not a valid filter (e.g. `info` or `gatehouse=debug,info`)"),
        ));
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `text` for people, `json` for log pipelines.
    #[serde(default = "defaults::log_format")]
    pub format: LogFormat,
    /// A tracing filter, e.g. `info` or `gatehouse=debug,info`; `RUST_LOG` wins when set.
    #[serde(default = "defaults::log_level")]
    pub level: String,
}

/// Whose incoming W3C `traceparent`/`tracestate` headers the public listener continues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TracePropagation {
    /// Any client's (a browser or anyone on the internet can then choose trace ids and sampling).
    Any,
    /// Only a peer in `public.trusted_proxies` (the load balancer, an ingress that traces).
    TrustedProxies,
    /// Nobody's: every request starts a new trace.
    Never,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TracingConfig {
    /// OTLP/HTTP (protobuf) traces endpoint, e.g. `http://otel-collector:4318/v1/traces`. Unset:
    /// no span is exported and no `traceparent` is read or sent.
    #[serde(default)]
    pub endpoint: Option<Url>,
    /// Fraction (0.0–1.0) of new traces recorded. Parent-based: a request whose accepted
    /// `traceparent` says sampled (or not) follows that decision.
    #[serde(default = "defaults::tracing_sample_ratio")]
    pub sample_ratio: f64,
    /// Whose `traceparent` the public listener accepts: `any`, `trusted_proxies` or `never`. The
    /// internal listener accepts its authenticated callers' unless this is `never`.
    #[serde(default = "defaults::tracing_propagation")]
    pub propagation: TracePropagation,
    /// The `service.name` resource attribute.
    #[serde(default = "defaults::tracing_service_name")]
    pub service_name: String,
    /// Longest wait for one export to the collector.
    #[serde(default = "defaults::tracing_export_timeout", deserialize_with = "de_duration")]
    pub export_timeout: Duration,
}

impl Default for TracingConfig {
    fn default() -> Self {
        Self {
            endpoint: None,
            sample_ratio: defaults::tracing_sample_ratio(),
            propagation: defaults::tracing_propagation(),
            service_name: defaults::tracing_service_name(),
            export_timeout: defaults::tracing_export_timeout(),
        }
    }
}

impl TracingConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if !(0.0..=1.0).contains(&self.sample_ratio) || self.sample_ratio.is_nan() {
            return Err(invalid("tracing.sample_ratio", "must be between 0.0 and 1.0"));
        }
        if let Some(e) = &self.endpoint
            && !matches!(e.scheme(), "http" | "https")
        {
            return Err(invalid("tracing.endpoint", "must be an http:// or https:// OTLP/HTTP URL"));
        }
        if self.service_name.trim().is_empty() {
            return Err(invalid("tracing.service_name", "must not be empty"));
        }
        Ok(())
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { format: defaults::log_format(), level: defaults::log_level() }
    }
}

impl LogConfig {
    /// A tracing filter whose every directive names a real level.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        check_log_filter(&self.level)?;
        Ok(())
    }
}
