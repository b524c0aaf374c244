// Package envoy validates Gatehouse's Envoy bootstraps without an Envoy binary: each file is
// parsed into envoy.config.bootstrap.v3.Bootstrap with go-control-plane (protojson, unknown
// fields refused), validated with ValidateAll, and every typed_config (Any) is unpacked into its
// message and validated too (ValidateAll does not descend into Any). Then the security-relevant
// settings are asserted: the RBAC principals are exactly the allowed callers, XFCC is
// SANITIZE_SET with the URI, client certificates are required, upstreams are where they must be;
// for the edge (edge-ext-authz.yaml), that ext_authz fails closed and talks gRPC over mutual TLS.
//
// Besides the files in this directory, a sidecar rendered by the Helm chart is checked when
// GATEHOUSE_ENVOY_RENDERED names it; GATEHOUSE_ENVOY_RENDERED_ALLOW then lists (comma-separated)
// the SPIFFE IDs its RBAC must admit, exactly.
package envoy

import (
	"errors"
	"fmt"
	"net"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	extauthzv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_authz/v3"
	rbacfilter "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	routerfilter "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	upstreamhttpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/anypb"
	"sigs.k8s.io/yaml"
)

// The extension types the files use must be registered for Any resolution; naming one value of
// each package keeps the imports (and documents which extensions are allowed).
var _ = []proto.Message{&rbacfilter.RBAC{}, &routerfilter.Router{}, &hcmv3.HttpConnectionManager{}, &tlsv3.DownstreamTlsContext{},
	&extauthzv3.ExtAuthz{}, &upstreamhttpv3.HttpProtocolOptions{}}

type validator interface{ ValidateAll() error }

// parse reads, parses and validates a bootstrap file, including every nested Any.
func parse(path string) (*bootstrapv3.Bootstrap, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	js, err := yaml.YAMLToJSON(raw)
	if err != nil {
		return nil, fmt.Errorf("not YAML: %w", err)
	}
	var b bootstrapv3.Bootstrap
	// DiscardUnknown false (the default): a misspelt field fails here instead of being ignored.
	if err := (protojson.UnmarshalOptions{DiscardUnknown: false}).Unmarshal(js, &b); err != nil {
		return nil, fmt.Errorf("not an envoy.config.bootstrap.v3.Bootstrap: %w", err)
	}
	if err := b.ValidateAll(); err != nil {
		return nil, fmt.Errorf("Bootstrap.ValidateAll: %w", err)
	}
	n, err := validateAnys(b.ProtoReflect())
	if err != nil {
		return nil, err
	}
	if n == 0 {
		return nil, errors.New("no typed_config found: the walk is broken")
	}
	return &b, nil
}

func load(t *testing.T, path string) *bootstrapv3.Bootstrap {
	t.Helper()
	b, err := parse(path)
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	return b
}

// validateAnys unpacks every Any below m, validates it and descends into it; returns how many.
func validateAnys(m protoreflect.Message) (int, error) {
	count := 0
	var failure error
	var visit func(child protoreflect.Message)
	visit = func(child protoreflect.Message) {
		if failure != nil {
			return
		}
		if a, ok := child.Interface().(*anypb.Any); ok {
			inner, err := a.UnmarshalNew()
			if err != nil {
				failure = fmt.Errorf("typed_config %s: %w", a.GetTypeUrl(), err)
				return
			}
			val, ok := inner.(validator)
			if !ok {
				failure = fmt.Errorf("%s has no validation rules", a.GetTypeUrl())
				return
			}
			if err := val.ValidateAll(); err != nil {
				failure = fmt.Errorf("%s: %w", a.GetTypeUrl(), err)
				return
			}
			count++
			n, err := validateAnys(inner.ProtoReflect())
			count += n
			failure = err
			return
		}
		n, err := validateAnys(child)
		count += n
		failure = err
	}
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		switch {
		case fd.IsMap():
			if fd.MapValue().Kind() == protoreflect.MessageKind {
				v.Map().Range(func(_ protoreflect.MapKey, mv protoreflect.Value) bool {
					visit(mv.Message())
					return failure == nil
				})
			}
		case fd.Kind() != protoreflect.MessageKind && fd.Kind() != protoreflect.GroupKind:
		case fd.IsList():
			l := v.List()
			for i := 0; i < l.Len(); i++ {
				visit(l.Get(i).Message())
			}
		default:
			visit(v.Message())
		}
		return failure == nil
	})
	return count, failure
}

func unpack[T proto.Message](t *testing.T, a *anypb.Any, into T) T {
	t.Helper()
	if err := a.UnmarshalTo(into); err != nil {
		t.Fatalf("typed_config %s is not %T: %v", a.GetTypeUrl(), into, err)
	}
	return into
}

func loopback(t *testing.T, what string, a *corev3.Address) {
	t.Helper()
	ip := net.ParseIP(a.GetSocketAddress().GetAddress())
	if ip == nil || !ip.IsLoopback() {
		t.Errorf("%s must be on loopback, is %q", what, a.GetSocketAddress().GetAddress())
	}
}

func hcmOf(t *testing.T, l *listenerv3.Listener) *hcmv3.HttpConnectionManager {
	t.Helper()
	if len(l.GetFilterChains()) != 1 || len(l.GetFilterChains()[0].GetFilters()) != 1 {
		t.Fatalf("listener %s: want one filter chain with one filter (the HTTP connection manager)", l.GetName())
	}
	return unpack(t, l.GetFilterChains()[0].GetFilters()[0].GetTypedConfig(), &hcmv3.HttpConnectionManager{})
}

func clusterNamed(t *testing.T, b *bootstrapv3.Bootstrap, name string) *clusterv3.Cluster {
	t.Helper()
	for _, c := range b.GetStaticResources().GetClusters() {
		if c.GetName() == name {
			return c
		}
	}
	t.Fatalf("no cluster %q", name)
	return nil
}

// checkInternal asserts the internal sidecar's security properties.
func checkInternal(t *testing.T, path string, allow []string) {
	b := load(t, path)
	loopback(t, "Envoy's admin listener", b.GetAdmin().GetAddress())
	ls := b.GetStaticResources().GetListeners()
	if len(ls) != 1 {
		t.Fatalf("want exactly one listener (the mTLS one), got %d", len(ls))
	}
	l := ls[0]
	fc := l.GetFilterChains()[0]
	if fc.GetTransportSocket() == nil {
		t.Fatal("the internal listener has no TLS transport socket")
	}
	dtc := unpack(t, fc.GetTransportSocket().GetTypedConfig(), &tlsv3.DownstreamTlsContext{})
	if !dtc.GetRequireClientCertificate().GetValue() {
		t.Error("require_client_certificate must be true")
	}
	ctx := dtc.GetCommonTlsContext()
	if ctx.GetValidationContextSdsSecretConfig() == nil && ctx.GetValidationContext() == nil {
		t.Error("no validation context: client certificates would not be verified against the CA")
	}
	if len(ctx.GetTlsCertificateSdsSecretConfigs()) == 0 && len(ctx.GetTlsCertificates()) == 0 {
		t.Error("no server certificate")
	}

	h := hcmOf(t, l)
	if h.GetForwardClientCertDetails() != hcmv3.HttpConnectionManager_SANITIZE_SET {
		t.Errorf("forward_client_cert_details = %v, want SANITIZE_SET", h.GetForwardClientCertDetails())
	}
	if !h.GetSetCurrentClientCertDetails().GetUri() {
		t.Error("set_current_client_cert_details.uri must be true (Gatehouse reads URI=)")
	}

	filters := h.GetHttpFilters()
	if len(filters) < 2 || filters[len(filters)-1].GetName() != "envoy.filters.http.router" {
		t.Fatal("the router must be the last HTTP filter")
	}
	var principals []string
	rbacSeen := false
	for _, f := range filters[:len(filters)-1] {
		r, ok := func() (*rbacfilter.RBAC, bool) {
			var r rbacfilter.RBAC
			return &r, f.GetTypedConfig().UnmarshalTo(&r) == nil
		}()
		if !ok {
			continue
		}
		rbacSeen = true
		rules := r.GetRules()
		if rules.GetAction() != rbacv3.RBAC_ALLOW {
			t.Errorf("RBAC action = %v, want ALLOW", rules.GetAction())
		}
		for name, p := range rules.GetPolicies() {
			for _, perm := range p.GetPermissions() {
				if perm.GetUrlPath().GetPath().GetPrefix() != "/internal/v1/" {
					t.Errorf("policy %s grants more than /internal/v1/: %v", name, perm)
				}
			}
			for _, pr := range p.GetPrincipals() {
				id := pr.GetAuthenticated().GetPrincipalName().GetExact()
				if id == "" {
					t.Errorf("policy %s: every principal must be an authenticated exact SPIFFE ID, got %v", name, pr)
					continue
				}
				principals = append(principals, id)
			}
		}
	}
	if !rbacSeen {
		t.Fatal("no RBAC filter before the router")
	}
	slices.Sort(principals)
	want := slices.Clone(allow)
	slices.Sort(want)
	if !slices.Equal(principals, want) {
		t.Errorf("RBAC principals = %v, want exactly %v", principals, want)
	}

	// Only /internal/v1/ reaches Gatehouse, and Gatehouse is on loopback.
	for _, vh := range h.GetRouteConfig().GetVirtualHosts() {
		for _, r := range vh.GetRoutes() {
			if c := r.GetRoute().GetCluster(); c != "" && r.GetMatch().GetPrefix() != "/internal/v1/" {
				t.Errorf("route %v forwards more than /internal/v1/ to %s", r.GetMatch(), c)
			}
		}
	}
	c := clusterNamed(t, b, "gatehouse_internal")
	for _, e := range c.GetLoadAssignment().GetEndpoints() {
		for _, lb := range e.GetLbEndpoints() {
			loopback(t, "Gatehouse's envoy-mode listener", lb.GetEndpoint().GetAddress())
		}
	}
}

func TestInternalSidecar(t *testing.T) {
	checkInternal(t, "internal-sidecar.yaml", []string{"spiffe://cluster.local/ns/data/sa/pocketbase"})
}

func TestConsumerSidecar(t *testing.T) {
	b := load(t, "consumer-sidecar.yaml")
	loopback(t, "Envoy's admin listener", b.GetAdmin().GetAddress())
	for _, l := range b.GetStaticResources().GetListeners() {
		loopback(t, "the app-facing listener "+l.GetName(), l.GetAddress())
		if h := hcmOf(t, l); h.GetForwardClientCertDetails() == hcmv3.HttpConnectionManager_FORWARD_ONLY ||
			h.GetForwardClientCertDetails() == hcmv3.HttpConnectionManager_ALWAYS_FORWARD_ONLY {
			t.Error("the consumer must never forward a client-supplied XFCC")
		}
	}
	c := clusterNamed(t, b, "gatehouse_internal")
	ep := c.GetLoadAssignment().GetEndpoints()[0].GetLbEndpoints()[0].GetEndpoint().GetAddress().GetSocketAddress()
	if !strings.Contains(ep.GetAddress(), "-internal.") || ep.GetPortValue() != 8443 {
		t.Errorf("upstream = %s:%d, want the <release>-internal Service on 8443", ep.GetAddress(), ep.GetPortValue())
	}
	if c.GetTransportSocket() == nil {
		t.Fatal("the upstream to Gatehouse must be TLS")
	}
	utc := unpack(t, c.GetTransportSocket().GetTypedConfig(), &tlsv3.UpstreamTlsContext{})
	if utc.GetSni() != ep.GetAddress() {
		t.Errorf("sni %q should be the Service name %q", utc.GetSni(), ep.GetAddress())
	}
	ctx := utc.GetCommonTlsContext()
	if len(ctx.GetTlsCertificateSdsSecretConfigs()) == 0 && len(ctx.GetTlsCertificates()) == 0 {
		t.Error("no client certificate: Gatehouse requires the service's SVID")
	}
	vc := ctx.GetValidationContext()
	if vc.GetTrustedCa() == nil {
		t.Error("Gatehouse's certificate is not verified against a CA")
	}
	if len(vc.GetMatchTypedSubjectAltNames()) == 0 {
		t.Error("Gatehouse's certificate name is not checked (match_typed_subject_alt_names)")
	}
}

// TestBrokenFilesAreRefused proves the checks can fail: a misspelt field, a wrong type in an Any,
// and a value out of range each make load fail.
func TestBrokenFilesAreRefused(t *testing.T) {
	good, err := os.ReadFile("internal-sidecar.yaml")
	if err != nil {
		t.Fatal(err)
	}
	for name, broken := range map[string]string{
		"unknown field":     strings.Replace(string(good), "require_client_certificate: true", "require_client_certificates: true", 1),
		"unknown in an Any": strings.Replace(string(good), "stat_prefix: gatehouse_internal", "stat_prefix: gatehouse_internal\n                stat_prefx: x", 1),
		"invalid value":     strings.Replace(string(good), "stat_prefix: gatehouse_internal", "stat_prefix: \"\"", 1),
		"bad enum":          strings.Replace(string(good), "forward_client_cert_details: SANITIZE_SET", "forward_client_cert_details: SANITISE_SET", 1),
	} {
		if broken == string(good) {
			t.Fatalf("%s: the replacement did not apply", name)
		}
		path := t.TempDir() + "/broken.yaml"
		if err := os.WriteFile(path, []byte(broken), 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := parse(path); err == nil {
			t.Errorf("%s: accepted", name)
		} else {
			t.Logf("%s: refused: %v", name, err)
		}
	}
}

func TestRenderedSidecar(t *testing.T) {
	path := os.Getenv("GATEHOUSE_ENVOY_RENDERED")
	if path == "" {
		t.Skip("GATEHOUSE_ENVOY_RENDERED not set (scripts/deploy-test.sh sets it to the chart's sidecar)")
	}
	allow := strings.Split(os.Getenv("GATEHOUSE_ENVOY_RENDERED_ALLOW"), ",")
	checkInternal(t, path, allow)
}

// edgeProblems lists what is wrong with an edge bootstrap that puts Gatehouse's gRPC ext_authz in
// front of the application (empty: nothing). A list, not t.Errorf, so the self-test can show each
// check fires on a doctored file.
func edgeProblems(b *bootstrapv3.Bootstrap) []string {
	var p []string
	bad := func(format string, a ...any) { p = append(p, fmt.Sprintf(format, a...)) }
	if ip := net.ParseIP(b.GetAdmin().GetAddress().GetSocketAddress().GetAddress()); ip == nil || !ip.IsLoopback() {
		bad("Envoy's admin listener must be on loopback")
	}
	ls := b.GetStaticResources().GetListeners()
	if len(ls) != 1 || len(ls[0].GetFilterChains()) != 1 || len(ls[0].GetFilterChains()[0].GetFilters()) != 1 {
		return append(p, "want one listener with one filter chain holding the HTTP connection manager")
	}
	var h hcmv3.HttpConnectionManager
	if err := ls[0].GetFilterChains()[0].GetFilters()[0].GetTypedConfig().UnmarshalTo(&h); err != nil {
		return append(p, "the listener's filter is not the HTTP connection manager")
	}
	if h.GetForwardClientCertDetails() == hcmv3.HttpConnectionManager_FORWARD_ONLY ||
		h.GetForwardClientCertDetails() == hcmv3.HttpConnectionManager_ALWAYS_FORWARD_ONLY {
		bad("a client-supplied XFCC must never be forwarded")
	}
	filters := h.GetHttpFilters()
	if len(filters) < 2 || filters[len(filters)-1].GetName() != "envoy.filters.http.router" {
		return append(p, "the router must be the last HTTP filter")
	}
	var az *extauthzv3.ExtAuthz
	for _, f := range filters[:len(filters)-1] {
		var x extauthzv3.ExtAuthz
		if f.GetTypedConfig().UnmarshalTo(&x) == nil {
			az = &x
		}
	}
	if az == nil {
		return append(p, "no ext_authz filter before the router")
	}
	if az.GetFailureModeAllow() {
		bad("failure_mode_allow must be false: an unreachable Gatehouse must deny")
	}
	if az.GetStatusOnError().GetCode() != 503 {
		bad("status_on_error = %v, want 503", az.GetStatusOnError().GetCode())
	}
	if az.GetIncludePeerCertificate() {
		bad("include_peer_certificate must be off")
	}
	if az.GetWithRequestBody() != nil {
		bad("with_request_body must be off: Gatehouse decides on headers only")
	}
	if az.GetTransportApiVersion() != corev3.ApiVersion_V3 {
		bad("transport_api_version = %v, want V3", az.GetTransportApiVersion())
	}
	gs := az.GetGrpcService()
	if gs == nil || gs.GetEnvoyGrpc().GetClusterName() == "" {
		return append(p, "ext_authz must use grpc_service with envoy_grpc (Gatehouse's gRPC face)")
	}
	if t := gs.GetTimeout().AsDuration(); gs.GetTimeout() == nil || t <= 0 || t > 5*time.Second {
		bad("grpc_service.timeout = %v, want set and at most 5s", t)
	}
	// Gatehouse needs the cookie and the CSRF inputs, and must see forged x-gatehouse-* to remove them.
	if m := az.GetAllowedHeaders(); m != nil {
		seen := map[string]bool{}
		for _, pat := range m.GetPatterns() {
			seen[pat.GetExact()+"|"+pat.GetPrefix()] = true
		}
		for _, want := range []string{"cookie|", "origin|", "x-csrf|", "sec-fetch-mode|", "sec-fetch-site|", "accept|", "|x-gatehouse-"} {
			if !seen[want] {
				bad("allowed_headers lacks %q", want)
			}
		}
	}
	// The check cluster: HTTP/2, mutual TLS with a client certificate, Gatehouse's name verified.
	var cluster *clusterv3.Cluster
	for _, c := range b.GetStaticResources().GetClusters() {
		if c.GetName() == gs.GetEnvoyGrpc().GetClusterName() {
			cluster = c
		}
	}
	if cluster == nil {
		return append(p, "no cluster "+gs.GetEnvoyGrpc().GetClusterName())
	}
	var po upstreamhttpv3.HttpProtocolOptions
	if a := cluster.GetTypedExtensionProtocolOptions()["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]; a == nil || a.UnmarshalTo(&po) != nil ||
		po.GetExplicitHttpConfig().GetHttp2ProtocolOptions() == nil {
		bad("the check cluster must speak HTTP/2 (gRPC)")
	}
	var utc tlsv3.UpstreamTlsContext
	if ts := cluster.GetTransportSocket(); ts == nil || ts.GetTypedConfig().UnmarshalTo(&utc) != nil {
		bad("the check cluster must use TLS")
	} else {
		ctx := utc.GetCommonTlsContext()
		if len(ctx.GetTlsCertificateSdsSecretConfigs()) == 0 && len(ctx.GetTlsCertificates()) == 0 {
			bad("no client certificate: the check listener authenticates Envoy by it")
		}
		if ctx.GetValidationContext().GetTrustedCa() == nil || len(ctx.GetValidationContext().GetMatchTypedSubjectAltNames()) == 0 {
			bad("Gatehouse's certificate must be verified (trusted_ca and match_typed_subject_alt_names)")
		}
		if !slices.Contains(ctx.GetAlpnProtocols(), "h2") {
			bad("alpn_protocols must offer h2")
		}
	}
	// Only /auth/ (Gatehouse's own routes, to its public listener) skips the check.
	for _, vh := range h.GetRouteConfig().GetVirtualHosts() {
		for _, r := range vh.GetRoutes() {
			off := false
			if a := r.GetTypedPerFilterConfig()["envoy.filters.http.ext_authz"]; a != nil {
				var pr extauthzv3.ExtAuthzPerRoute
				off = a.UnmarshalTo(&pr) == nil && pr.GetDisabled()
			}
			if off && (r.GetMatch().GetPrefix() != "/auth/" || r.GetRoute().GetCluster() != "gatehouse_public") {
				bad("route %v skips the check but is not Gatehouse's /auth/", r.GetMatch())
			}
			if r.GetRoute().GetCluster() == gs.GetEnvoyGrpc().GetClusterName() {
				bad("route %v exposes the check listener to browsers", r.GetMatch())
			}
		}
	}
	return p
}

func TestEdgeExtAuthz(t *testing.T) {
	for _, problem := range edgeProblems(load(t, "edge-ext-authz.yaml")) {
		t.Error(problem)
	}
}

// TestEdgeChecksFire proves each edge check can fail: doctored copies of the file must be refused.
func TestEdgeChecksFire(t *testing.T) {
	good, err := os.ReadFile("edge-ext-authz.yaml")
	if err != nil {
		t.Fatal(err)
	}
	for name, c := range map[string][2]string{
		"fails open":          {"failure_mode_allow: false", "failure_mode_allow: true"},
		"error status":        {"status_on_error: {code: 503}", "status_on_error: {code: 403}"},
		"peer certificate":    {"include_peer_certificate: false", "include_peer_certificate: true"},
		"request body":        {"include_peer_certificate: false", "include_peer_certificate: false\n                      with_request_body: {max_request_bytes: 1024}"},
		"no timeout":          {"timeout: 2s\n", "\n"},
		"HTTP/1 to the check": {"http2_protocol_options: {}", "http_protocol_options: {}"},
		"no client cert":      {"            tls_certificate_sds_secret_configs:\n              - name: envoy-svid\n", ""},
		"check skipped":       {"                        - match: {prefix: /}\n                          route:\n                            cluster: app\n", "                        - match: {prefix: /}\n                          typed_per_filter_config:\n                            envoy.filters.http.ext_authz:\n                              \"@type\": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute\n                              disabled: true\n                          route:\n                            cluster: app\n"},
		"no x-gatehouse-":     {"                          - {prefix: x-gatehouse-}\n", ""},
	} {
		broken := strings.Replace(string(good), c[0], c[1], 1)
		if broken == string(good) {
			t.Fatalf("%s: the replacement did not apply", name)
		}
		path := t.TempDir() + "/edge.yaml"
		if err := os.WriteFile(path, []byte(broken), 0o600); err != nil {
			t.Fatal(err)
		}
		b, err := parse(path)
		if err != nil {
			t.Logf("%s: refused by validation: %v", name, err)
			continue
		}
		if p := edgeProblems(b); len(p) == 0 {
			t.Errorf("%s: accepted", name)
		} else {
			t.Logf("%s: refused: %v", name, p)
		}
	}
}
