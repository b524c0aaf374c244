package gatehouseauth_test

// Test fixtures: a throw-away PKI, a Gatehouse stand-in that requires client certificates, a
// Keycloak stand-in serving a JWKS, and a PocketBase app (with this module's migrations) served
// over a real HTTP listener with the middleware registered.

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"github.com/pocketbase/pocketbase/apis"
	"github.com/pocketbase/pocketbase/core"
	"github.com/pocketbase/pocketbase/tests"

	"gatehouse.local/integrations/pocketbase/gatehouseauth"
	_ "gatehouse.local/integrations/pocketbase/migrations"
)

const (
	pocketbaseSPIFFE = "spiffe://gatehouse.local/ns/data/sa/pocketbase"
	exchangePath     = "/internal/v1/session/exchange"
	realmPath        = "/realms/gatehouse"
	testKid          = "test-signing-key"
)

// ---------------------------------------------------------------------------------------------
// PKI

type pkiFiles struct {
	caFile     string
	serverCert tls.Certificate
	caPool     *x509.CertPool

	clientCert, clientKey string // CA-signed, pocketbase SPIFFE id
	evilCert, evilKey     string // CA-signed, another SPIFFE id (not allowed by the stub)
	rogueCert, rogueKey   string // pocketbase SPIFFE id, but signed by an unrelated CA
}

func newPKI(t *testing.T) *pkiFiles {
	t.Helper()
	dir := t.TempDir()
	ca, caKey := newCA(t, "test CA")
	rogueCA, rogueKey := newCA(t, "rogue CA")

	p := &pkiFiles{caPool: x509.NewCertPool()}
	p.caPool.AddCert(ca)
	p.caFile = writePEM(t, dir, "ca.crt", "CERTIFICATE", ca.Raw)

	srvDER, srvKey := issue(t, ca, caKey, &x509.Certificate{
		Subject:     pkix.Name{CommonName: "gatehouse"},
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")},
		DNSNames:    []string{"localhost"},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	})
	p.serverCert = tls.Certificate{Certificate: [][]byte{srvDER}, PrivateKey: srvKey}

	client := func(name, spiffe string, signer *x509.Certificate, signerKey *ecdsa.PrivateKey) (string, string) {
		u, _ := url.Parse(spiffe)
		der, key := issue(t, signer, signerKey, &x509.Certificate{
			Subject:     pkix.Name{CommonName: name},
			URIs:        []*url.URL{u},
			ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
		})
		keyDER, err := x509.MarshalECPrivateKey(key)
		if err != nil {
			t.Fatal(err)
		}
		return writePEM(t, dir, name+".crt", "CERTIFICATE", der), writePEM(t, dir, name+".key", "EC PRIVATE KEY", keyDER)
	}
	p.clientCert, p.clientKey = client("pocketbase", pocketbaseSPIFFE, ca, caKey)
	p.evilCert, p.evilKey = client("evil", "spiffe://gatehouse.local/ns/data/sa/pocketbase-evil", ca, caKey)
	p.rogueCert, p.rogueKey = client("rogue", pocketbaseSPIFFE, rogueCA, rogueKey)
	return p
}

var serial atomic.Int64

func newCA(t *testing.T, name string) (*x509.Certificate, *ecdsa.PrivateKey) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(serial.Add(1)),
		Subject:               pkix.Name{CommonName: name},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return cert, key
}

func issue(t *testing.T, ca *x509.Certificate, caKey *ecdsa.PrivateKey, tmpl *x509.Certificate) ([]byte, *ecdsa.PrivateKey) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl.SerialNumber = big.NewInt(serial.Add(1))
	tmpl.NotBefore = time.Now().Add(-time.Hour)
	tmpl.NotAfter = time.Now().Add(time.Hour)
	tmpl.KeyUsage = x509.KeyUsageDigitalSignature
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	return der, key
}

func writePEM(t *testing.T, dir, name, typ string, der []byte) string {
	t.Helper()
	path := filepath.Join(dir, name)
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// ---------------------------------------------------------------------------------------------
// Keycloak stand-in

var (
	keysOnce          sync.Once
	signingKey        *rsa.PrivateKey // published in the JWKS
	otherKey          *rsa.PrivateKey // never published
	encryptionKey     *rsa.PrivateKey // published with "use":"enc"
	keyGenerationFail error
)

func rsaKeys(t *testing.T) {
	t.Helper()
	keysOnce.Do(func() {
		for _, k := range []**rsa.PrivateKey{&signingKey, &otherKey, &encryptionKey} {
			if *k, keyGenerationFail = rsa.GenerateKey(rand.Reader, 2048); keyGenerationFail != nil {
				return
			}
		}
	})
	if keyGenerationFail != nil {
		t.Fatal(keyGenerationFail)
	}
}

type idp struct {
	srv     *httptest.Server
	issuer  string
	fetches atomic.Int64
}

func newIdP(t *testing.T) *idp {
	t.Helper()
	rsaKeys(t)
	p := &idp{}
	jwk := func(kid, use string, k *rsa.PublicKey) map[string]string {
		return map[string]string{
			"kid": kid, "kty": "RSA", "alg": map[string]string{"sig": "RS256", "enc": "RSA-OAEP"}[use], "use": use,
			"n": base64.RawURLEncoding.EncodeToString(k.N.Bytes()),
			"e": base64.RawURLEncoding.EncodeToString(big.NewInt(int64(k.E)).Bytes()),
		}
	}
	set, _ := json.Marshal(map[string]any{"keys": []any{
		// The encryption key comes first and shares nothing with the signing key but its type;
		// a token naming its kid must be refused.
		jwk("enc-key", "enc", &encryptionKey.PublicKey),
		jwk(testKid, "sig", &signingKey.PublicKey),
	}})
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+realmPath+"/protocol/openid-connect/certs", func(w http.ResponseWriter, r *http.Request) {
		p.fetches.Add(1)
		w.Header().Set("Content-Type", "application/json")
		w.Write(set)
	})
	p.srv = httptest.NewServer(mux)
	t.Cleanup(p.srv.Close)
	p.issuer = p.srv.URL + realmPath
	return p
}

// claims returns the claims of a valid Keycloak-like access token for sub.
func (p *idp) claims(sub string) jwt.MapClaims {
	return jwt.MapClaims{
		"iss": p.issuer, "sub": sub, "typ": "Bearer", "azp": "gatehouse", "aud": "account",
		"iat": time.Now().Unix(), "exp": time.Now().Add(5 * time.Minute).Unix(),
	}
}

// accessToken mints a valid RS256 access token for sub.
func (p *idp) accessToken(t *testing.T, sub string) string {
	return sign(t, jwt.SigningMethodRS256, signingKey, testKid, p.claims(sub))
}

// userToken mints a valid access token for u carrying u's identity the way Keycloak puts it into
// an access token (realm_access, resource_access, groups, profile and e-mail claims).
func (p *idp) userToken(t *testing.T, u user) string {
	return sign(t, jwt.SigningMethodRS256, signingKey, testKid, p.userClaims(u))
}

// userClaims are the access-token claims of u.
func (p *idp) userClaims(u user) jwt.MapClaims {
	c := p.claims(u.sub)
	c["email_verified"] = u.verified
	if u.email != "" {
		c["email"] = u.email
	}
	if u.name != "" {
		c["name"] = u.name
	}
	if u.username != "" {
		c["preferred_username"] = u.username
	}
	c["realm_access"] = map[string]any{"roles": orEmpty(u.realmRoles)}
	resource := map[string]any{}
	for client, roles := range u.clientRoles {
		resource[client] = map[string]any{"roles": roles}
	}
	c["resource_access"] = resource
	c["groups"] = orEmpty(u.groups)
	return c
}

// sign signs claims with the given method and key, naming kid in the header ("" for none).
func sign(t *testing.T, method jwt.SigningMethod, key any, kid string, claims jwt.MapClaims) string {
	t.Helper()
	tok := jwt.NewWithClaims(method, claims)
	if kid != "" {
		tok.Header["kid"] = kid
	}
	s, err := tok.SignedString(key)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// ---------------------------------------------------------------------------------------------
// Gatehouse stand-in

type user struct {
	sub, email, name, username string
	verified                   bool
	realmRoles                 []string
	clientRoles                map[string][]string
	groups                     []string
}

type answer struct {
	status   int
	body     []byte
	location string // sent as Location when set (redirect tests)
}

type stubGatehouse struct {
	srv   *httptest.Server
	url   string
	calls atomic.Int64

	mu          sync.Mutex
	sessions    map[string]answer
	forced      *answer // when set, every exchange gets this answer
	traceparent string  // of the last exchange request
}

func newStubGatehouse(t *testing.T, pki *pkiFiles) *stubGatehouse {
	t.Helper()
	g := &stubGatehouse{sessions: map[string]answer{}}
	mux := http.NewServeMux()
	mux.HandleFunc("POST "+exchangePath, g.serve)
	g.srv = httptest.NewUnstartedServer(mux)
	g.srv.TLS = &tls.Config{
		MinVersion:   tls.VersionTLS12,
		Certificates: []tls.Certificate{pki.serverCert},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    pki.caPool,
	}
	g.srv.StartTLS()
	t.Cleanup(g.srv.Close)
	g.url = g.srv.URL + exchangePath
	return g
}

func (g *stubGatehouse) serve(w http.ResponseWriter, r *http.Request) {
	g.calls.Add(1)
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	// Like Gatehouse: the verified certificate's SPIFFE id must be on the allow-list exactly.
	leaf := r.TLS.PeerCertificates[0]
	if len(leaf.URIs) != 1 || leaf.URIs[0].String() != pocketbaseSPIFFE {
		w.WriteHeader(http.StatusForbidden)
		io.WriteString(w, `{"error":"forbidden"}`)
		return
	}
	var req struct {
		SessionID string `json:"session_id"`
	}
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
		w.WriteHeader(http.StatusBadRequest)
		return
	}
	g.mu.Lock()
	g.traceparent = r.Header.Get("traceparent")
	a, ok := g.sessions[req.SessionID]
	if g.forced != nil {
		a, ok = *g.forced, true
	}
	g.mu.Unlock()
	if !ok {
		a = answer{status: http.StatusUnauthorized, body: []byte(`{"error":"invalid_session","error_description":"session not found"}`)}
	}
	if a.location != "" {
		w.Header().Set("Location", a.location)
	}
	w.WriteHeader(a.status)
	w.Write(a.body)
}

func (g *stubGatehouse) set(sessionID string, a answer) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.sessions[sessionID] = a
}

func (g *stubGatehouse) revoke(sessionID string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	delete(g.sessions, sessionID)
}

func (g *stubGatehouse) force(a *answer) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.forced = a
}

// exchangeBody builds Gatehouse's 200 answer for u with the given access token.
func exchangeBody(u user, token string, tokenExp time.Time) []byte {
	claims := map[string]any{
		"sub":            u.sub,
		"email_verified": u.verified,
		"realm_roles":    orEmpty(u.realmRoles),
		"client_roles":   u.clientRoles,
		"groups":         orEmpty(u.groups),
	}
	if u.clientRoles == nil {
		claims["client_roles"] = map[string][]string{}
	}
	// Absent rather than empty, as Gatehouse omits what Keycloak does not have.
	if u.email != "" {
		claims["email"] = u.email
	}
	if u.name != "" {
		claims["name"] = u.name
	}
	if u.username != "" {
		claims["preferred_username"] = u.username
	}
	b, _ := json.Marshal(map[string]any{
		"access_token": token,
		"token_type":   "Bearer",
		"expires_at":   tokenExp.Unix(),
		"claims":       claims,
		"session": map[string]any{
			"expires_at":      time.Now().Add(12 * time.Hour).Unix(),
			"idle_expires_at": time.Now().Add(30 * time.Minute).Unix(),
		},
	})
	return b
}

func orEmpty(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}

// ---------------------------------------------------------------------------------------------
// PocketBase under test

type env struct {
	t    *testing.T
	app  *tests.TestApp
	pb   *httptest.Server
	gh   *stubGatehouse
	idp  *idp
	pki  *pkiFiles
	sess atomic.Int64
}

// newEnv starts the fixtures; opts may adjust the integration's config (p is the fixture PKI).
func newEnv(t *testing.T, opts ...func(c *gatehouseauth.Config, p *pkiFiles)) *env {
	t.Helper()
	e := &env{t: t, pki: newPKI(t)}
	e.gh = newStubGatehouse(t, e.pki)
	e.idp = newIdP(t)

	cfg := gatehouseauth.Config{
		ExchangeURL:    e.gh.url,
		ClientCertFile: e.pki.clientCert,
		ClientKeyFile:  e.pki.clientKey,
		CAFile:         e.pki.caFile,
		Issuer:         e.idp.issuer,
		Timeout:        2 * time.Second,
	}
	for _, o := range opts {
		o(&cfg, e.pki)
	}
	gh, err := gatehouseauth.New(cfg)
	if err != nil {
		t.Fatalf("gatehouseauth.New: %v", err)
	}

	app, err := tests.NewTestApp(t.TempDir())
	if err != nil {
		t.Fatalf("NewTestApp: %v", err)
	}
	t.Cleanup(app.Cleanup)
	e.app = app
	gh.Register(app)

	router, err := apis.NewRouter(app)
	if err != nil {
		t.Fatal(err)
	}
	se := &core.ServeEvent{App: app, Router: router}
	if err := app.OnServe().Trigger(se, func(*core.ServeEvent) error { return nil }); err != nil {
		t.Fatal(err)
	}
	mux, err := router.BuildMux()
	if err != nil {
		t.Fatal(err)
	}
	e.pb = httptest.NewServer(mux)
	t.Cleanup(e.pb.Close)
	return e
}

// newSessionID returns a fresh id shaped like Gatehouse's (43 base64url characters).
func (e *env) newSessionID() string {
	b := make([]byte, 32)
	rand.Read(b)
	return base64.RawURLEncoding.EncodeToString(b)
}

// login registers a valid session for u at the stub and returns its id.
func (e *env) login(u user) string {
	e.t.Helper()
	return e.loginWithToken(u, e.idp.userToken(e.t, u))
}

// loginWithToken registers a session for u whose exchange hands out the given token.
func (e *env) loginWithToken(u user, token string) string {
	e.t.Helper()
	sid := e.newSessionID()
	e.gh.set(sid, answer{status: 200, body: exchangeBody(u, token, time.Now().Add(5*time.Minute))})
	return sid
}

type response struct {
	status int
	body   []byte
}

func (r response) json(t *testing.T) map[string]any {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal(r.body, &m); err != nil {
		t.Fatalf("response is not a JSON object (%d): %s", r.status, r.body)
	}
	return m
}

// do sends a request to PocketBase; sid "" sends no session header.
func (e *env) do(method, path, sid string, body any, headers ...string) response {
	e.t.Helper()
	var rdr io.Reader
	if body != nil {
		b, _ := json.Marshal(body)
		rdr = bytes.NewReader(b)
	}
	req, err := http.NewRequest(method, e.pb.URL+path, rdr)
	if err != nil {
		e.t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	if sid != "" {
		req.Header.Set(gatehouseauth.HeaderSession, sid)
	}
	for i := 0; i+1 < len(headers); i += 2 {
		req.Header.Add(headers[i], headers[i+1])
	}
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		e.t.Fatal(err)
	}
	defer res.Body.Close()
	raw, _ := io.ReadAll(res.Body)
	return response{status: res.StatusCode, body: raw}
}

// userBySub returns the users record for sub, or nil.
func (e *env) userBySub(sub string) *core.Record {
	e.t.Helper()
	recs, err := e.app.FindAllRecords("users")
	if err != nil {
		e.t.Fatal(err)
	}
	var found *core.Record
	for _, r := range recs {
		if r.GetString("sub") == sub {
			if found != nil {
				e.t.Fatalf("two users records for sub %q", sub)
			}
			found = r
		}
	}
	return found
}

func (e *env) countUsers() int {
	e.t.Helper()
	recs, err := e.app.FindAllRecords("users")
	if err != nil {
		e.t.Fatal(err)
	}
	return len(recs)
}

// createNote writes a note directly (bypassing API rules) and returns its id.
func (e *env) createNote(ownerID, text string) string {
	e.t.Helper()
	col, err := e.app.FindCollectionByNameOrId("notes")
	if err != nil {
		e.t.Fatal(err)
	}
	rec := core.NewRecord(col)
	rec.Set("owner", ownerID)
	rec.Set("text", text)
	if err := e.app.Save(rec); err != nil {
		e.t.Fatal(err)
	}
	return rec.Id
}

// ensureUser makes the middleware create u's record (one request) and returns the record.
func (e *env) ensureUser(u user) (*core.Record, string) {
	e.t.Helper()
	sid := e.login(u)
	if r := e.do("GET", "/api/collections/notes/records", sid, nil); r.status != 200 {
		e.t.Fatalf("login of %s: %d %s", u.sub, r.status, r.body)
	}
	rec := e.userBySub(u.sub)
	if rec == nil {
		e.t.Fatalf("no users record for %s", u.sub)
	}
	return rec, sid
}

// listNoteTexts lists the notes visible to sid and returns their texts.
func (e *env) listNoteTexts(sid string, headers ...string) []string {
	e.t.Helper()
	r := e.do("GET", "/api/collections/notes/records?sort=text", sid, nil, headers...)
	if r.status != 200 {
		e.t.Fatalf("list notes: %d %s", r.status, r.body)
	}
	var page struct {
		TotalItems int `json:"totalItems"`
		Items      []struct {
			Text string `json:"text"`
		} `json:"items"`
	}
	if err := json.Unmarshal(r.body, &page); err != nil {
		e.t.Fatal(err)
	}
	texts := []string{}
	for _, it := range page.Items {
		texts = append(texts, it.Text)
	}
	return texts
}

// ---------------------------------------------------------------------------------------------
// Realtime (SSE) client

type sseEvent struct {
	name string
	data string
}

type sseConn struct {
	events chan sseEvent
	closed chan struct{}
	cancel context.CancelFunc
}

// openSSE connects to /api/realtime with the given session and returns once PB_CONNECT arrived,
// along with the realtime client id.
func (e *env) openSSE(sid string) (*sseConn, string) {
	e.t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	req, _ := http.NewRequestWithContext(ctx, "GET", e.pb.URL+"/api/realtime", nil)
	if sid != "" {
		req.Header.Set(gatehouseauth.HeaderSession, sid)
	}
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		cancel()
		e.t.Fatal(err)
	}
	if res.StatusCode != 200 {
		cancel()
		body, _ := io.ReadAll(res.Body)
		e.t.Fatalf("realtime connect: %d %s", res.StatusCode, body)
	}
	c := &sseConn{events: make(chan sseEvent, 64), closed: make(chan struct{}), cancel: cancel}
	e.t.Cleanup(cancel)
	go func() {
		defer close(c.closed)
		defer res.Body.Close()
		sc := bufio.NewScanner(res.Body)
		var ev sseEvent
		for sc.Scan() {
			line := sc.Text()
			switch {
			case strings.HasPrefix(line, "event:"):
				ev.name = strings.TrimSpace(strings.TrimPrefix(line, "event:"))
			case strings.HasPrefix(line, "data:"):
				ev.data += strings.TrimSpace(strings.TrimPrefix(line, "data:"))
			case line == "":
				if ev.name != "" {
					c.events <- ev
				}
				ev = sseEvent{}
			}
		}
	}()
	select {
	case ev := <-c.events:
		var m struct {
			ClientID string `json:"clientId"`
		}
		if ev.name != "PB_CONNECT" || json.Unmarshal([]byte(ev.data), &m) != nil || m.ClientID == "" {
			e.t.Fatalf("unexpected first realtime event %+v", ev)
		}
		return c, m.ClientID
	case <-time.After(5 * time.Second):
		e.t.Fatal("no PB_CONNECT within 5s")
	}
	return nil, ""
}
