//! Telemetry plumbing: where log lines go and what they carry, OpenTelemetry trace export, W3C
//! trace context in and out, and the per-request middleware that opens the server span and
//! records the RED metrics.
//!
//! - Logs: `[log] format = "text" | "json"`; JSON lines carry `trace_id`/`span_id` of the active
//!   span when tracing is on.
//! - Traces (cargo feature `otel`, on by default; runtime switch `[tracing] endpoint`): spans go
//!   to an OTLP/HTTP collector through our own reqwest client (rustls + aws-lc-rs), sampled
//!   parent-based with `sample_ratio`. Only Gatehouse's own spans and info-level events are
//!   exported (dependencies' spans are not), and no span field ever holds a session id, token,
//!   code or cookie — spans carry route templates, the session-hash prefix and `sub` only.
//! - Propagation: `traceparent`/`tracestate` are read per `[tracing] propagation` on the public
//!   listener (any / trusted proxies / never), from authenticated callers on the internal one,
//!   and replaced by Gatehouse's own on proxied upstream requests.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::Response;
use ipnet::IpNet;
use tracing::Instrument;

use crate::config::{Config, LogFormat, TracePropagation};
use crate::metrics::{Face, Metrics};

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("tracing: {0}")]
    Tracing(String),
}

/// Keeps the exporter alive; `shutdown` flushes the spans still buffered.
pub struct Telemetry {
    #[cfg(feature = "otel")]
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Telemetry {
    /// Flush buffered spans (bounded by the exporter's timeout) and stop the exporter.
    pub fn shutdown(self) {
        #[cfg(feature = "otel")]
        if let Some(p) = self.provider
            && let Err(e) = p.shutdown()
        {
            eprintln!("gatehouse: flushing traces failed: {e}");
        }
    }
}

/// Install the global subscriber: the log layer (text or JSON) filtered by `[log] level` (or
/// `RUST_LOG`) and, when `[tracing] endpoint` is set, the OpenTelemetry layer. Must run inside the
/// Tokio runtime (the exporter's HTTP client runs on it).
pub fn init(config: &Config) -> Result<Telemetry, TelemetryError> {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;

    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log.level));
    // Colour codes only for a person at a terminal, never into a file, a pipe or a log collector.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let fmt = tracing_subscriber::fmt::layer().with_target(false).with_ansi(ansi);
    let log_layer = match config.log.format {
        LogFormat::Json => fmt.json().event_format(WithTraceIds(fmt_json())).boxed(),
        LogFormat::Text => fmt.boxed(),
    }
    .with_filter(filter);
    let registry = tracing_subscriber::registry().with(log_layer);

    #[cfg(feature = "otel")]
    {
        let (otel_layer, provider) = match &config.tracing.endpoint {
            Some(endpoint) => {
                let (layer, provider) = otel::layer(config, endpoint)?;
                (Some(layer), Some(provider))
            }
            None => (None, None),
        };
        registry.with(otel_layer).try_init().map_err(|e| TelemetryError::Tracing(e.to_string()))?;
        Ok(Telemetry { provider })
    }
    #[cfg(not(feature = "otel"))]
    {
        if config.tracing.endpoint.is_some() {
            tracing::warn!("tracing.endpoint is set but this build has no `otel` feature: no spans are exported");
        }
        registry.try_init().map_err(|e| TelemetryError::Tracing(e.to_string()))?;
        Ok(Telemetry {})
    }
}

fn fmt_json() -> tracing_subscriber::fmt::format::Format<tracing_subscriber::fmt::format::Json> {
    tracing_subscriber::fmt::format().json().with_target(false)
}

/// The JSON event format plus `trace_id` and `span_id` of the span the event happened in (when
/// the OpenTelemetry layer is installed): one field splice into the finished object, so the rest
/// of the line is exactly tracing-subscriber's JSON.
struct WithTraceIds<F>(F);

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for WithTraceIds<F>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let mut line = String::new();
        self.0.format_event(ctx, tracing_subscriber::fmt::format::Writer::new(&mut line), event)?;
        #[cfg(feature = "otel")]
        if let Some(span) = ctx.event_scope().and_then(|mut s| s.next())
            && let Some((trace_id, span_id)) = otel::ids(&span.id())
            && let Some(body) = line.trim_end().strip_suffix('}')
        {
            let line = format!("{body},\"trace_id\":\"{trace_id}\",\"span_id\":\"{span_id}\"}}\n");
            return writer.write_str(&line);
        }
        writer.write_str(&line)
    }
}

/// Whether incoming trace context is continued, and from whom.
#[derive(Clone)]
pub struct Propagation {
    /// False when tracing is off: nothing is read, injected or replaced.
    enabled: bool,
    policy: TracePropagation,
    trusted_proxies: Vec<IpNet>,
}

impl Propagation {
    pub fn new(config: &Config) -> Self {
        Self {
            enabled: cfg!(feature = "otel") && config.tracing.endpoint.is_some(),
            policy: config.tracing.propagation,
            trusted_proxies: config.public.trusted_proxies.clone(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    fn accepts(&self, face: Face, peer: Option<IpAddr>) -> bool {
        if !self.enabled {
            return false;
        }
        match (self.policy, face) {
            (TracePropagation::Never, _) => false,
            // Internal callers are authenticated services (mTLS or the mesh's XFCC); check callers
            // are gateways (mTLS, shared key or loopback) whose own span is the parent to keep.
            (_, Face::internal | Face::check) | (TracePropagation::Any, _) => true,
            (TracePropagation::TrustedProxies, Face::public) => {
                peer.is_some_and(|ip| self.trusted_proxies.iter().any(|n| n.contains(&ip)))
            }
        }
    }
}

/// State of the `observe` middleware: one per listener.
pub struct Observe {
    pub face: Face,
    pub metrics: Arc<Metrics>,
    pub propagation: Propagation,
}

/// A response extension naming the metrics/span route when the router's template is too coarse
/// (the proxy's `/api/{*rest}` becomes the configured route prefix).
#[derive(Clone)]
pub struct RouteLabel(pub Arc<str>);

/// The server span of one request and its RED metrics. Outermost layer of the public and internal
/// routers (rejections by inner layers — rate limits, header limits, CSRF — are counted too).
pub async fn observe(State(o): State<Arc<Observe>>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let template = req.extensions().get::<MatchedPath>().map(|m| m.as_str().to_owned());
    let method = req.method().as_str().to_owned();
    let peer = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip());
    let route = template.as_deref().unwrap_or("other");
    // With tracing off no span is made at all: a per-request span that nobody exports would
    // still cost its allocation and field formatting in the log layer.
    let span = if !o.propagation.enabled() {
        tracing::Span::none()
    } else {
        tracing::info_span!(
        "http_request",
        otel.name = format!("{method} {route}"),
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        http.request.method = %method,
        http.route = route,
        // The path only: a query string may carry an authorization code.
        url.path = req.uri().path(),
        http.response.status_code = tracing::field::Empty,
        gatehouse.face = o.face.as_str(),
        gatehouse.route = tracing::field::Empty,
        gatehouse.outcome = tracing::field::Empty,
        gatehouse.session = tracing::field::Empty,
        gatehouse.caller = tracing::field::Empty,
        enduser.id = tracing::field::Empty,
        )
    };
    #[cfg(feature = "otel")]
    if o.propagation.accepts(o.face, peer) {
        otel::continue_trace(&span, req.headers());
    }
    #[cfg(not(feature = "otel"))]
    let _ = peer;
    let resp = next.run(req).instrument(span.clone()).await;
    let status = resp.status().as_u16();
    let label = match resp.extensions().get::<RouteLabel>() {
        Some(RouteLabel(l)) => l,
        None => route,
    };
    span.record("http.response.status_code", status);
    span.record("gatehouse.route", label);
    // OpenTelemetry HTTP conventions: a server span is an error on 5xx only.
    if status >= 500 {
        span.record("otel.status_code", "ERROR");
    }
    let elapsed = started.elapsed();
    o.metrics.observe_http(o.face, label, &method, status, elapsed);
    tracing::debug!(parent: &span, status, latency_us = elapsed.as_micros() as u64, "answered");
    resp
}

/// Record what a handler learned on the request's server span (no-ops for fields it lacks).
pub fn record_session(prefix: &str, sub: &str) {
    let span = tracing::Span::current();
    span.record("gatehouse.session", prefix);
    if !sub.is_empty() && sub != "-" {
        span.record("enduser.id", sub);
    }
}

/// Replace `traceparent`/`tracestate` in an outgoing request with the context of `span` (the
/// client span of the call). Without tracing, headers are left as they are.
pub fn inject(propagation: &Propagation, span: &tracing::Span, headers: &mut HeaderMap) {
    if !propagation.enabled {
        return;
    }
    headers.remove("traceparent");
    headers.remove("tracestate");
    #[cfg(feature = "otel")]
    otel::inject(span, headers);
    #[cfg(not(feature = "otel"))]
    let _ = span;
}

#[cfg(feature = "otel")]
mod otel {
    //! Everything that names an OpenTelemetry type.

    use std::time::Duration;

    use axum::http::HeaderMap;
    use opentelemetry::propagation::TextMapPropagator;
    use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
    use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
    use opentelemetry_sdk::propagation::TraceContextPropagator;
    use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    use tracing_subscriber::Layer;
    use tracing_subscriber::registry::LookupSpan;

    use super::TelemetryError;
    use crate::config::Config;

    pub type BoxedLayer<S> = Box<dyn Layer<S> + Send + Sync + 'static>;

    pub fn layer<S>(config: &Config, endpoint: &url::Url) -> Result<(BoxedLayer<S>, SdkTracerProvider), TelemetryError>
    where
        S: tracing::Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
    {
        let handle = tokio::runtime::Handle::try_current()
            .map_err(|_| TelemetryError::Tracing("telemetry::init must run inside the Tokio runtime".into()))?;
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(config.tracing.export_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| TelemetryError::Tracing(format!("cannot build the OTLP HTTP client: {e}")))?;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(Exporter { client, handle })
            .with_endpoint(endpoint.as_str())
            .with_timeout(config.tracing.export_timeout)
            .build()
            .map_err(|e| TelemetryError::Tracing(format!("OTLP exporter: {e}")))?;
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name(config.tracing.service_name.clone())
            .with_attribute(opentelemetry::KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .build();
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(config.tracing.sample_ratio))))
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("gatehouse");
        // Only Gatehouse's spans and events: a dependency's span (hyper, h2, redis) could carry
        // a header or a command argument. Info level: the store's spans are debug unless asked for.
        let filter = tracing_subscriber::filter::Targets::new()
            .with_target("gatehouse", tracing::Level::DEBUG)
            .with_default(tracing::level_filters::LevelFilter::OFF);
        let layer = tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_tracked_inactivity(false)
            .with_threads(false)
            .with_location(false)
            .with_filter(filter)
            .boxed();
        Ok((layer, provider))
    }

    /// The OTLP exporter's HTTP client: our reqwest (rustls with aws-lc-rs), run on the Tokio
    /// runtime (the batch processor calls it from its own thread).
    #[derive(Debug)]
    struct Exporter {
        client: reqwest::Client,
        handle: tokio::runtime::Handle,
    }

    #[async_trait::async_trait]
    impl opentelemetry_http::HttpClient for Exporter {
        async fn send_bytes(
            &self,
            request: http::Request<bytes::Bytes>,
        ) -> Result<http::Response<bytes::Bytes>, opentelemetry_http::HttpError> {
            let client = self.client.clone();
            let task = self.handle.spawn(async move {
                let (parts, body) = request.into_parts();
                let mut req = client.request(parts.method, parts.uri.to_string()).body(body);
                for (k, v) in parts.headers.iter() {
                    req = req.header(k, v);
                }
                let resp = req.send().await?;
                let status = resp.status();
                let headers = resp.headers().clone();
                let body = resp.bytes().await?;
                let mut out = http::Response::new(body);
                *out.status_mut() = status;
                *out.headers_mut() = headers;
                Ok::<_, reqwest::Error>(out)
            });
            Ok(task.await??)
        }
    }

    fn propagator() -> TraceContextPropagator {
        TraceContextPropagator::new()
    }

    /// Make the remote context in `headers` (if any, and valid) the span's parent.
    pub fn continue_trace(span: &tracing::Span, headers: &HeaderMap) {
        let cx = propagator().extract(&opentelemetry_http::HeaderExtractor(headers));
        if cx.span().span_context().is_valid() {
            let _ = span.set_parent(cx);
        }
    }

    pub fn inject(span: &tracing::Span, headers: &mut HeaderMap) {
        let cx = span.context();
        propagator().inject_context(&cx, &mut opentelemetry_http::HeaderInjector(headers));
    }

    /// Trace and span id (hex) of a span, when the OpenTelemetry layer knows it.
    pub fn ids(id: &tracing::span::Id) -> Option<(String, String)> {
        tracing::dispatcher::get_default(|d| {
            let cx = tracing_opentelemetry::get_otel_context(id, d)?;
            let sc = cx.span().span_context().clone();
            sc.is_valid().then(|| (sc.trace_id().to_string(), sc.span_id().to_string()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn propagation(policy: TracePropagation, enabled: bool) -> Propagation {
        Propagation { enabled, policy, trusted_proxies: vec!["10.0.0.0/8".parse().unwrap()] }
    }

    #[test]
    fn whose_trace_context_is_continued() {
        let proxy = Some("10.1.2.3".parse().unwrap());
        let stranger = Some("203.0.113.9".parse().unwrap());
        let any = propagation(TracePropagation::Any, true);
        assert!(any.accepts(Face::public, stranger) && any.accepts(Face::internal, None));
        let trusted = propagation(TracePropagation::TrustedProxies, true);
        assert!(trusted.accepts(Face::public, proxy));
        assert!(!trusted.accepts(Face::public, stranger) && !trusted.accepts(Face::public, None));
        assert!(trusted.accepts(Face::internal, stranger), "internal callers are authenticated");
        assert!(trusted.accepts(Face::check, stranger), "check callers are authenticated gateways");
        let never = propagation(TracePropagation::Never, true);
        assert!(!never.accepts(Face::public, proxy) && !never.accepts(Face::internal, proxy));
        let off = propagation(TracePropagation::Any, false);
        assert!(!off.accepts(Face::public, proxy) && !off.accepts(Face::internal, proxy), "tracing off reads nothing");
    }

    #[test]
    fn without_tracing_outgoing_trace_headers_are_left_alone() {
        let mut h = HeaderMap::new();
        h.insert("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".parse().unwrap());
        inject(&propagation(TracePropagation::Any, false), &tracing::Span::none(), &mut h);
        assert_eq!(h["traceparent"], "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        // With tracing on, the client's header is replaced (here by nothing: no span is active).
        inject(&propagation(TracePropagation::Any, true), &tracing::Span::none(), &mut h);
        assert!(h.get("traceparent").is_none());
    }
}
