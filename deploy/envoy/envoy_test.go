// Package envoy validates Gatehouse's Envoy bootstraps without an Envoy binary: each file is
// parsed into envoy.config.bootstrap.v3.Bootstrap with go-control-plane (protojson, unknown
// fields refused), validated with ValidateAll, and every typed_config (Any) is unpacked into its
// message and validated too (ValidateAll does not descend into Any). Then the security-relevant
// settings are asserted: the RBAC principals are exactly the allowed callers, XFCC is
// SANITIZE_SET with the URI, client certificates are required, upstreams are where they must be.
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

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	rbacfilter "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	routerfilter "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/anypb"
	"sigs.k8s.io/yaml"
)

// The extension types the files use must be registered for Any resolution; naming one value of
// each package keeps the imports (and documents which extensions are allowed).
var _ = []proto.Message{&rbacfilter.RBAC{}, &routerfilter.Router{}, &hcmv3.HttpConnectionManager{}, &tlsv3.DownstreamTlsContext{}}

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
