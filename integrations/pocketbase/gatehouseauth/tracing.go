package gatehouseauth

// OpenTelemetry tracing: PocketBase joins the trace Gatehouse started. The server span of each
// request continues the W3C `traceparent` Gatehouse's proxy sends; the exchange call back into
// Gatehouse is a client span whose context goes out in `traceparent`, so one trace shows browser
// → Gatehouse proxy → PocketBase → Gatehouse exchange.
//
// Configured by the standard OpenTelemetry environment variables: tracing is on only when
// OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT is set (OTLP/HTTP);
// OTEL_SERVICE_NAME (default "pocketbase"), OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG
// (default parent-based, always on). No span attribute ever holds the session id, a token or a
// cookie: spans name the session by its hash prefix.

import (
	"context"
	"net/http"
	"os"

	"github.com/pocketbase/pocketbase/core"
	"github.com/pocketbase/pocketbase/tools/hook"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracehttp"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"
)

const (
	// TracingMiddlewareID runs first, so the session middleware's exchange is inside its span.
	TracingMiddlewareID       = "gatehouseTracing"
	TracingMiddlewarePriority = MiddlewarePriority - 100

	tracerName = "gatehouse.local/integrations/pocketbase/gatehouseauth"
)

// TracingEnabled reports whether the environment names an OTLP endpoint.
func TracingEnabled() bool {
	return os.Getenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") != "" || os.Getenv("OTEL_EXPORTER_OTLP_ENDPOINT") != ""
}

// SetupTracing installs the global tracer provider (OTLP/HTTP exporter, batch processor) and the
// W3C trace-context propagator. Without an endpoint in the environment it installs only the
// propagator and returns a no-op shutdown. Call the returned function on exit to flush spans.
func SetupTracing(ctx context.Context) (func(context.Context) error, error) {
	otel.SetTextMapPropagator(propagation.NewCompositeTextMapPropagator(propagation.TraceContext{}))
	if !TracingEnabled() {
		return func(context.Context) error { return nil }, nil
	}
	exporter, err := otlptracehttp.New(ctx) // endpoint, headers, timeout from OTEL_EXPORTER_OTLP_*
	if err != nil {
		return nil, err
	}
	if os.Getenv("OTEL_SERVICE_NAME") == "" {
		_ = os.Setenv("OTEL_SERVICE_NAME", "pocketbase")
	}
	res, err := resource.New(ctx, resource.WithFromEnv(), resource.WithTelemetrySDK())
	if err != nil {
		return nil, err
	}
	// The sampler comes from OTEL_TRACES_SAMPLER(_ARG); unset, it is parent-based always-on:
	// a request Gatehouse sampled is recorded here too, one it did not is not.
	tp := sdktrace.NewTracerProvider(sdktrace.WithBatcher(exporter), sdktrace.WithResource(res))
	otel.SetTracerProvider(tp)
	return tp.Shutdown, nil
}

// TracingMiddleware opens the server span of each request, continuing the incoming trace context.
func TracingMiddleware() *hook.Handler[*core.RequestEvent] {
	return &hook.Handler[*core.RequestEvent]{
		Id:       TracingMiddlewareID,
		Priority: TracingMiddlewarePriority,
		Func: func(e *core.RequestEvent) error {
			ctx := otel.GetTextMapPropagator().Extract(e.Request.Context(), propagation.HeaderCarrier(e.Request.Header))
			route := e.Request.Pattern // the router's pattern, never a raw path with ids
			if route == "" {
				route = e.Request.Method
			}
			ctx, span := otel.Tracer(tracerName).Start(ctx, route,
				trace.WithSpanKind(trace.SpanKindServer),
				trace.WithAttributes(
					attribute.String("http.request.method", e.Request.Method),
					attribute.String("url.path", e.Request.URL.Path), // the path only: no query
				),
			)
			defer span.End()
			e.Request = e.Request.WithContext(ctx)
			err := e.Next()
			status := e.Status()
			if status == 0 && err == nil {
				status = http.StatusOK
			}
			if status != 0 {
				span.SetAttributes(attribute.Int("http.response.status_code", status))
			}
			if status >= 500 || (err != nil && status == 0) {
				span.SetStatus(codes.Error, http.StatusText(status))
			}
			return err
		},
	}
}

// startExchangeSpan opens the client span of one exchange call and writes its context into the
// request's headers.
func startExchangeSpan(ctx context.Context, req *http.Request, sessionPrefix string) trace.Span {
	ctx, span := otel.Tracer(tracerName).Start(ctx, "POST /internal/v1/session/exchange",
		trace.WithSpanKind(trace.SpanKindClient),
		trace.WithAttributes(
			attribute.String("http.request.method", http.MethodPost),
			attribute.String("server.address", req.URL.Hostname()),
			attribute.String("gatehouse.session", sessionPrefix),
		),
	)
	otel.GetTextMapPropagator().Inject(ctx, propagation.HeaderCarrier(req.Header))
	return span
}
