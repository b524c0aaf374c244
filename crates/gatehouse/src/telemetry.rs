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

use axum::extract::{ConnectInfo, Request};
use axum::http::HeaderMap;
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
// Without the `otel` feature nothing is read or continued.
#[cfg_attr(not(feature = "otel"), allow(dead_code))]
pub struct Propagation {
    /// False when tracing is off: nothing is read, injected or replaced.
    enabled: bool,
    policy: TracePropagation,
    trusted_proxies: Vec<IpNet>,
    /// `[tracing] sample_ratio`: the share of new traces that are recorded.
    ratio: f64,
}

impl Propagation {
    pub fn new(config: &Config) -> Self {
        Self {
            enabled: cfg!(feature = "otel") && config.tracing.endpoint.is_some(),
            policy: config.tracing.propagation,
            trusted_proxies: config.public.trusted_proxies.clone(),
            ratio: config.tracing.sample_ratio,
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    #[cfg_attr(not(feature = "otel"), allow(dead_code))]
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

/// The label of a request no route matched (static files, 404s): never the raw path, which
/// would let clients mint label values.
static OTHER_ROUTE: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| Arc::from("other"));

/// The server span of one request and its RED metrics. The first step of every face's pipeline
/// (refusals by later steps — rate limits, header limits, CSRF — are counted too).
///
/// Sampling is decided here, before any span exists (parent-based: a continued trace keeps its
/// caller's decision, a new one is sampled at `sample_ratio`): an unsampled request gets no span
/// at all — no server span, no store or provider client spans under it. Building the spans and
/// letting the SDK drop them at the end cost 44 % of `/auth/me` at 1 % sampling
/// (docs/benchmarks.md, "Tracing cost").
///
/// `route` is the request's route template (`None`: no route matched, labelled "other").
pub async fn observe<F>(
    o: &Observe,
    route: Option<&Arc<str>>,
    req: Request,
    next: impl FnOnce(Request) -> F,
) -> Response
where
    F: std::future::Future<Output = Response>,
{
    let started = Instant::now();
    // Cheap to keep (for the standard methods, an enum): no allocation.
    let method = req.method().clone();
    let peer = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip());
    let route = route.unwrap_or(&OTHER_ROUTE);
    #[cfg(feature = "otel")]
    let decision = o.propagation.enabled().then(|| {
        let remote = o.propagation.accepts(o.face, peer).then(|| req.headers());
        otel::decide(o.propagation.ratio, remote)
    });
    #[cfg(not(feature = "otel"))]
    let _ = peer;
    #[cfg(feature = "otel")]
    let span = match &decision {
        Some(otel::Decision::Sampled(parent)) => {
            let span = server_span(o.face, method.as_str(), route, req.uri().path());
            if let Some(cx) = parent {
                otel::set_parent(&span, cx.clone());
            }
            span
        }
        // Tracing off, or this request is not sampled: no span is made at all.
        _ => tracing::Span::none(),
    };
    #[cfg(not(feature = "otel"))]
    let span = tracing::Span::none();
    let run = next(req).instrument(span.clone());
    #[cfg(feature = "otel")]
    let resp = match decision {
        Some(otel::Decision::Sampled(_)) => otel::REQUEST_TRACE.scope(otel::RequestTrace::Sampled, run).await,
        Some(otel::Decision::Unsampled(u)) => otel::REQUEST_TRACE.scope(otel::RequestTrace::Unsampled(u), run).await,
        None => run.await,
    };
    #[cfg(not(feature = "otel"))]
    let resp = run.await;
    let status = resp.status().as_u16();
    let label = match resp.extensions().get::<RouteLabel>() {
        Some(RouteLabel(l)) => l,
        None => route,
    };
    let elapsed = started.elapsed();
    o.metrics.observe_http(o.face, label, method.as_str(), status, elapsed);
    if !span.is_none() {
        span.record("http.response.status_code", status);
        span.record("gatehouse.route", &**label);
        // OpenTelemetry HTTP conventions: a server span is an error on 5xx only.
        if status >= 500 {
            span.record("otel.status_code", "ERROR");
        }
    }
    // For debug logs, with or without a span (a disabled callsite costs a branch; never exported).
    tracing::debug!(parent: &span, status, latency_us = elapsed.as_micros() as u64, "answered");
    resp
}

#[cfg(feature = "otel")]
fn server_span(face: Face, method: &str, route: &str, path: &str) -> tracing::Span {
    tracing::info_span!(
        "http_request",
        otel.name = format!("{method} {route}"),
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        http.request.method = method,
        http.route = route,
        // The path only: a query string may carry an authorization code.
        url.path = path,
        http.response.status_code = tracing::field::Empty,
        gatehouse.face = face.as_str(),
        gatehouse.route = tracing::field::Empty,
        gatehouse.outcome = tracing::field::Empty,
        gatehouse.session = tracing::field::Empty,
        gatehouse.caller = tracing::field::Empty,
        enduser.id = tracing::field::Empty,
    )
}

/// Whether a client span (a provider call, a store operation, an upstream request) should be
/// made: only while serving a request `observe` decided to sample. Calls outside a request (the
/// sweeper, key refresh) and calls of unsampled requests make none, so they neither cost a span
/// nor start orphan traces (the SDK keeps every span it is given). Asked of the request's own
/// decision, not of "is some span current": a dependency's span must not make ours roots.
pub fn tracing_request() -> bool {
    #[cfg(feature = "otel")]
    {
        otel::REQUEST_TRACE.try_with(|t| matches!(t, otel::RequestTrace::Sampled)).unwrap_or(false)
    }
    #[cfg(not(feature = "otel"))]
    false
}

/// Record what a handler learned on the request's server span (no-ops for fields it lacks).
pub fn record_session(session: &crate::session::SessionKey, sub: &str) {
    let span = tracing::Span::current();
    if span.is_none() {
        // Not sampled (or tracing off): not even the prefix is formatted.
        return;
    }
    span.record("gatehouse.session", session.prefix().as_str());
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
    if span.is_none() {
        // Not sampled: pass that decision on, so the upstream's parent-based sampler drops the
        // trace too instead of starting one of its own.
        otel::inject_unsampled(headers);
    } else {
        otel::inject(span, headers);
    }
    #[cfg(not(feature = "otel"))]
    let _ = span;
}

#[cfg(feature = "otel")]
mod otel {
    //! Everything that names an OpenTelemetry type.

    use std::time::Duration;

    use axum::http::{HeaderMap, HeaderValue};
    use opentelemetry::propagation::TextMapPropagator;
    use opentelemetry::trace::{SpanId, SpanKind, TraceContextExt, TraceId, TracerProvider as _};
    use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
    use opentelemetry_sdk::propagation::TraceContextPropagator;
    use opentelemetry_sdk::trace::{
        IdGenerator, RandomIdGenerator, Sampler, SamplingDecision, SdkTracerProvider, ShouldSample,
    };
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
            // `observe` decides (parent-based, `sample_ratio` for new traces) before it makes a
            // span, and only sampled requests make spans: every span that reaches the SDK is kept.
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOn)))
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("gatehouse");
        // Only Gatehouse's spans and events: a dependency's span (hyper, h2, redis) could carry
        // a header or a command argument. Spans down to debug (the store's client spans), events
        // from info up: a debug line (`answered`) as a span event on every sampled request would
        // be exported for nothing the span's own attributes do not already say.
        let filter = tracing_subscriber::filter::filter_fn(|m| {
            (m.target() == "gatehouse" || m.target().starts_with("gatehouse::"))
                && if m.is_span() { *m.level() <= tracing::Level::DEBUG } else { *m.level() <= tracing::Level::INFO }
        })
        .with_max_level_hint(tracing::Level::DEBUG);
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

    /// One request's sampling decision.
    pub enum Decision {
        /// Recorded: a server span, the child of the caller's context when there is one.
        Sampled(Option<opentelemetry::Context>),
        /// Not recorded: no span, but the decision travels on to upstream services.
        Unsampled(Unsampled),
    }

    /// The trace context an unsampled request passes on, sampled flag clear: the caller's trace
    /// and parent id (Gatehouse takes no part in an unsampled trace), or a fresh trace id. Kept
    /// parsed and written out anew, never the caller's header bytes.
    pub struct Unsampled {
        trace_id: TraceId,
        span_id: SpanId,
        /// The caller's `tracestate` as the propagator parsed it (empty for a new trace).
        state: String,
    }

    /// What `observe` decided for the request this task serves.
    pub enum RequestTrace {
        Sampled,
        Unsampled(Unsampled),
    }

    tokio::task_local! {
        pub static REQUEST_TRACE: RequestTrace;
    }

    /// Parent-based sampling: a valid incoming context keeps its caller's decision; a new trace
    /// is recorded with probability `ratio` (the SDK's trace-id ratio rule, on a fresh trace id).
    pub fn decide(ratio: f64, remote: Option<&HeaderMap>) -> Decision {
        if let Some(headers) = remote {
            let cx = propagator().extract(&opentelemetry_http::HeaderExtractor(headers));
            let sc = cx.span().span_context().clone();
            if sc.is_valid() {
                if sc.is_sampled() {
                    return Decision::Sampled(Some(cx));
                }
                return Decision::Unsampled(Unsampled {
                    trace_id: sc.trace_id(),
                    span_id: sc.span_id(),
                    state: sc.trace_state().header(),
                });
            }
        }
        if ratio >= 1.0 {
            return Decision::Sampled(None);
        }
        let ids = RandomIdGenerator::default();
        let trace_id = ids.new_trace_id();
        let sampled = ratio > 0.0
            && Sampler::TraceIdRatioBased(ratio)
                .should_sample(None, trace_id, "", &SpanKind::Server, &[], &[])
                .decision
                == SamplingDecision::RecordAndSample;
        if sampled {
            Decision::Sampled(None)
        } else {
            Decision::Unsampled(Unsampled { trace_id, span_id: ids.new_span_id(), state: String::new() })
        }
    }

    pub fn set_parent(span: &tracing::Span, cx: opentelemetry::Context) {
        let _ = span.set_parent(cx);
    }

    /// Write the current request's unsampled context, if it has one.
    pub fn inject_unsampled(headers: &mut HeaderMap) {
        let _ = REQUEST_TRACE.try_with(|t| {
            let RequestTrace::Unsampled(u) = t else { return };
            if let Ok(v) = HeaderValue::try_from(format!("00-{}-{}-00", u.trace_id, u.span_id)) {
                headers.insert("traceparent", v);
            }
            if !u.state.is_empty()
                && let Ok(v) = HeaderValue::try_from(u.state.as_str())
            {
                headers.insert("tracestate", v);
            }
        });
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
        Propagation { enabled, policy, trusted_proxies: vec!["10.0.0.0/8".parse().unwrap()], ratio: 1.0 }
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

#[cfg(test)]
#[cfg(feature = "otel")]
mod sampling_tests {
    use super::otel::{Decision, REQUEST_TRACE, RequestTrace, decide};
    use super::*;

    fn headers(traceparent: &str, tracestate: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("traceparent", traceparent.parse().unwrap());
        h.insert("tracestate", tracestate.parse().unwrap());
        h
    }

    const ON: Propagation =
        Propagation { enabled: true, policy: TracePropagation::Any, trusted_proxies: Vec::new(), ratio: 0.0 };

    /// What an upstream request carries when sent while serving a request decided as `decision`.
    async fn sent_upstream(decision: Decision) -> HeaderMap {
        let trace = match decision {
            Decision::Sampled(_) => RequestTrace::Sampled,
            Decision::Unsampled(u) => RequestTrace::Unsampled(u),
        };
        let mut h = headers("00-11111111111111111111111111111111-2222222222222222-01", "browser=1");
        REQUEST_TRACE.scope(trace, async { inject(&ON, &tracing::Span::none(), &mut h) }).await;
        h
    }

    #[test]
    fn a_continued_trace_keeps_its_callers_decision() {
        let sampled = headers("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "vendor=x");
        // Even at ratio 0: the caller decided.
        assert!(matches!(decide(0.0, Some(&sampled)), Decision::Sampled(Some(_))));
        let unsampled = headers("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00", "vendor=x");
        assert!(matches!(decide(1.0, Some(&unsampled)), Decision::Unsampled(_)), "an unsampled caller is not recorded");
        // A malformed header is no context: a new trace, decided by the ratio.
        let bad = headers("00-zz-00f067aa0ba902b7-01", "vendor=x");
        assert!(matches!(decide(1.0, Some(&bad)), Decision::Sampled(None)));
        assert!(matches!(decide(0.0, Some(&headers("garbage", "x=1"))), Decision::Unsampled(_)));
    }

    #[test]
    fn new_traces_are_sampled_at_the_ratio() {
        assert!(matches!(decide(1.0, None), Decision::Sampled(None)));
        assert!((0..1000).all(|_| matches!(decide(0.0, None), Decision::Unsampled(_))));
        let sampled = (0..20_000).filter(|_| matches!(decide(0.25, None), Decision::Sampled(_))).count();
        assert!((4_500..5_500).contains(&sampled), "0.25 of 20,000 new traces, got {sampled}");
    }

    #[tokio::test]
    async fn an_unsampled_request_tells_the_upstream_not_to_sample() {
        // A new trace: a fresh id, flag clear, the browser's headers gone.
        let h = sent_upstream(decide(0.0, None)).await;
        let tp = h["traceparent"].to_str().unwrap().to_owned();
        assert!(tp.starts_with("00-") && tp.ends_with("-00") && tp.len() == 55, "{tp}");
        assert!(!tp.contains("1111111111"), "the browser's own header is replaced");
        assert!(h.get("tracestate").is_none());
        // A caller's unsampled trace continues, rebuilt from the parsed context, not copied: a
        // padded header and a tracestate with an invalid member do not pass through as sent.
        let caller = headers(" 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00 ", "vendor=x");
        let h = sent_upstream(decide(1.0, Some(&caller))).await;
        assert_eq!(h["traceparent"], "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00");
        assert_eq!(h["tracestate"], "vendor=x");
        let odd = headers("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00", "vendor=x,BAD KEY=\"1\"");
        let h = sent_upstream(decide(1.0, Some(&odd))).await;
        assert!(h.get("tracestate").is_none_or(|v| !v.to_str().unwrap().contains("BAD")), "{h:?}");
    }

    #[tokio::test]
    async fn only_a_sampled_request_makes_client_spans() {
        assert!(!tracing_request(), "outside any request (sweeper, key refresh)");
        assert!(REQUEST_TRACE.scope(RequestTrace::Sampled, async { tracing_request() }).await);
        let Decision::Unsampled(u) = decide(0.0, None) else { panic!("ratio 0 samples nothing") };
        assert!(!REQUEST_TRACE.scope(RequestTrace::Unsampled(u), async { tracing_request() }).await);
        // Some other span being current (a dependency's) does not make a request sampled.
        let _guard = tracing::subscriber::set_default(tracing_subscriber::registry());
        let span = tracing::info_span!("dependency");
        let _entered = span.enter();
        assert!(!tracing::Span::current().is_none());
        assert!(!tracing_request());
    }
}
