package gatehouseauth_test

import (
	"crypto/sha256"
	"encoding/hex"
	"strings"
	"testing"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/propagation"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"
)

// PocketBase continues the trace Gatehouse's proxy sends, and its exchange call carries its own
// client span's context back to Gatehouse: proxy span → PocketBase server span → exchange client
// span → (Gatehouse's exchange span). No span holds the session id.
func TestTraceContinuesThroughPocketBaseIntoTheExchange(t *testing.T) {
	exp := tracetest.NewInMemoryExporter()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSyncer(exp))
	prevTP, prevProp := otel.GetTracerProvider(), otel.GetTextMapPropagator()
	otel.SetTracerProvider(tp)
	otel.SetTextMapPropagator(propagation.TraceContext{})
	t.Cleanup(func() { otel.SetTracerProvider(prevTP); otel.SetTextMapPropagator(prevProp) })

	e := newEnv(t)
	sid := e.login(alice)
	const traceID, proxySpan = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
	r := e.do("GET", "/api/collections/notes/records", sid, nil, "traceparent", "00-"+traceID+"-"+proxySpan+"-01")
	if r.status != 200 {
		t.Fatalf("list notes: %d %s", r.status, r.body)
	}

	var server, client *tracetest.SpanStub
	spans := exp.GetSpans()
	for i := range spans {
		s := &spans[i]
		if s.SpanContext.TraceID().String() != traceID {
			continue
		}
		switch s.SpanKind {
		case trace.SpanKindServer:
			server = s
		case trace.SpanKindClient:
			client = s
		}
	}
	if server == nil || client == nil {
		t.Fatalf("want a server and a client span in trace %s, got %d spans: %+v", traceID, len(spans), spans)
	}
	if got := server.Parent.SpanID().String(); got != proxySpan {
		t.Errorf("server span's parent = %s, want Gatehouse's proxy span %s", got, proxySpan)
	}
	if !strings.HasPrefix(server.Name, "GET /api/collections/") {
		t.Errorf("server span name = %q, want the route pattern", server.Name)
	}
	if client.Name != "POST /internal/v1/session/exchange" || client.Parent.SpanID() != server.SpanContext.SpanID() {
		t.Errorf("exchange span %q has parent %s, want the server span %s", client.Name, client.Parent.SpanID(), server.SpanContext.SpanID())
	}
	e.gh.mu.Lock()
	sent := e.gh.traceparent
	e.gh.mu.Unlock()
	if want := "00-" + traceID + "-" + client.SpanContext.SpanID().String() + "-01"; sent != want {
		t.Errorf("the exchange request's traceparent = %q, want %q", sent, want)
	}

	sum := sha256.Sum256([]byte(sid))
	prefix := hex.EncodeToString(sum[:4])
	foundPrefix := false
	for _, s := range spans {
		for _, kv := range s.Attributes {
			v := kv.Value.Emit()
			if strings.Contains(v, sid) {
				t.Errorf("span %q attribute %s holds the session id", s.Name, kv.Key)
			}
			if string(kv.Key) == "gatehouse.session" && v == prefix {
				foundPrefix = true
			}
		}
	}
	if !foundPrefix {
		t.Error("the exchange span names the session by its hash prefix")
	}
}
