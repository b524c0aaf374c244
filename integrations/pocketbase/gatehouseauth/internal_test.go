package gatehouseauth

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"math/big"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

func TestValidSessionID(t *testing.T) {
	for s, want := range map[string]bool{
		"Jx3w0d4b3Q5Y3k2m9q8T1uV7wX0yZ2aB4cD6eF8gH0i": true, // Gatehouse's 43-character shape
		"abc":                        true,
		"abc=":                       true,
		"abc==":                      true,
		strings.Repeat("A", 256):     true,
		"":                           false,
		strings.Repeat("A", 257):     false,
		"=":                          false,
		"ab=c":                       false,
		"a+b":                        false,
		"a/b":                        false,
		"a b":                        false,
		"a\x00b":                     false,
		"ä":                          false,
		"eyJhbGciOi.eyJzdWIi.sig-ab": false, // a JWT is not a session id
	} {
		if got := validSessionID(s); got != want {
			t.Errorf("validSessionID(%q) = %v, want %v", s, got, want)
		}
	}
}

func TestCacheExpiryAndBound(t *testing.T) {
	now := time.Unix(1_000_000, 0)
	c := newIdentityCache(3)
	id := &Identity{Subject: "s"}

	c.put(keyOf("a"), id, now.Add(time.Second), now)
	if c.get(keyOf("a"), now) != id {
		t.Fatal("fresh entry not returned")
	}
	if c.get(keyOf("a"), now.Add(time.Second)) != nil {
		t.Error("entry returned at its expiry instant")
	}
	if c.len() != 0 {
		t.Error("expired entry not removed on access")
	}

	// An already-expired result is not stored at all.
	c.put(keyOf("late"), id, now, now)
	if c.len() != 0 {
		t.Error("entry with until <= now was stored")
	}

	for i := 0; i < 10; i++ {
		c.put(keyOf(fmt.Sprint(i)), id, now.Add(time.Minute), now)
		if c.len() > 3 {
			t.Fatalf("cache grew to %d entries, bound is 3", c.len())
		}
	}
	// Expired entries are evicted before live ones.
	c = newIdentityCache(2)
	c.put(keyOf("old"), id, now.Add(time.Second), now)
	c.put(keyOf("live"), id, now.Add(time.Hour), now)
	later := now.Add(time.Minute)
	c.put(keyOf("new"), id, later.Add(time.Hour), later)
	if c.get(keyOf("live"), later) == nil || c.get(keyOf("new"), later) == nil {
		t.Error("a live entry was evicted while an expired one could go")
	}
}

func TestCacheKeysAreHashes(t *testing.T) {
	c := newIdentityCache(10)
	sid := "Jx3w0d4b3Q5Y3k2m9q8T1uV7wX0yZ2aB4cD6eF8gH0i"
	c.put(keyOf(sid), &Identity{}, time.Now().Add(time.Minute), time.Now())
	for k := range c.entries {
		if strings.Contains(string(k[:]), sid) {
			t.Error("the raw session id is part of the cache key")
		}
	}
	if p := keyOf(sid).prefix(); len(p) != 8 || strings.Contains(sid, p) {
		t.Errorf("log prefix %q is not an 8-hex hash prefix", p)
	}
}

func TestIdentityFromClaims(t *testing.T) {
	email, verified, name := "a@example.com", true, "A"
	id := identityFrom("https://kc/realms/r", &exchangeClaims{
		Sub: "s", Email: &email, EmailVerified: &verified, Name: &name,
		RealmRoles:  []string{"user", "admin", "user"},
		ClientRoles: map[string][]string{"app": {"editor"}, "other": {"viewer", ""}},
		Groups:      []string{"/b", "/a"},
	})
	if id.Issuer != "https://kc/realms/r" || id.Subject != "s" || id.Email != email || !id.EmailVerified || id.Name != "A" {
		t.Errorf("identity = %+v", id)
	}
	if want := []string{"admin", "app:editor", "other:viewer", "user"}; !slices.Equal(id.Roles, want) {
		t.Errorf("roles = %v, want %v", id.Roles, want)
	}
	if want := []string{"/a", "/b"}; !slices.Equal(id.Groups, want) {
		t.Errorf("groups = %v, want %v", id.Groups, want)
	}
	// Absent optional claims.
	id = identityFrom("i", &exchangeClaims{Sub: "s"})
	if id.Email != "" || id.EmailVerified || id.Name != "" || len(id.Roles) != 0 || len(id.Groups) != 0 {
		t.Errorf("identity from minimal claims = %+v", id)
	}
}

func TestSameStrings(t *testing.T) {
	for _, tc := range []struct {
		stored any
		want   []string
		same   bool
	}{
		{nil, nil, true},
		{nil, []string{}, true},
		{"[]", nil, true},
		{"null", nil, true},
		{`["a","b"]`, []string{"a", "b"}, true},
		{`["b","a"]`, []string{"a", "b"}, false},
		{`["a"]`, []string{"a", "b"}, false},
		{`{"a":1}`, []string{"a"}, false},
	} {
		if got := sameStrings(tc.stored, tc.want); got != tc.same {
			t.Errorf("sameStrings(%v, %v) = %v", tc.stored, tc.want, got)
		}
	}
}

func TestRSAKeyRejectsWeakKeys(t *testing.T) {
	enc := func(b []byte) string { return base64.RawURLEncoding.EncodeToString(b) }
	e := enc(big.NewInt(65537).Bytes())

	weak, err := rsa.GenerateKey(rand.Reader, 1024)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := rsaKey(enc(weak.N.Bytes()), e); err == nil {
		t.Error("a 1024-bit key was accepted")
	}
	strong, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	k, err := rsaKey(enc(strong.N.Bytes()), e)
	if err != nil || k.N.Cmp(strong.N) != 0 || k.E != 65537 {
		t.Errorf("a 2048-bit key was not parsed: %v", err)
	}
	if _, err := rsaKey(enc(strong.N.Bytes()), enc([]byte{1})); err == nil {
		t.Error("exponent 1 was accepted")
	}
	if _, err := rsaKey("not base64!", e); err == nil {
		t.Error("a malformed modulus was accepted")
	}
}

func TestErrorCodeQuotesOnlyTheCode(t *testing.T) {
	if got := errorCode([]byte(`{"error":"invalid_session","error_description":"secret detail"}`)); got != `"invalid_session"` {
		t.Errorf("errorCode = %s", got)
	}
	if got := errorCode([]byte(`not json with a token eyJ...`)); got != "" {
		t.Errorf("errorCode of a non-JSON body = %q, want empty", got)
	}
}

func TestIdentityClaimsFromTheToken(t *testing.T) {
	c := &accessClaims{
		Email:             json.RawMessage(`"a@example.com"`),
		EmailVerified:     json.RawMessage(`"true"`), // a string, not a boolean: not verified
		Name:              json.RawMessage(`42`),     // wrong type: absent
		PreferredUsername: json.RawMessage(`"a"`),
		RealmAccess:       json.RawMessage(`{"roles":["user","admin"]}`),
		ResourceAccess:    json.RawMessage(`{"app":{"roles":["editor"]},"other":{}}`),
		Groups:            json.RawMessage(`["/g"]`),
	}
	c.Subject = "s"
	id := identityFrom("i", c.identityClaims())
	if id.Email != "a@example.com" || id.EmailVerified || id.Name != "" || id.PreferredUsername != "a" {
		t.Errorf("identity = %+v", id)
	}
	if want := []string{"admin", "app:editor", "user"}; !slices.Equal(id.Roles, want) {
		t.Errorf("roles = %v, want %v", id.Roles, want)
	}
	if !slices.Equal(id.Groups, []string{"/g"}) {
		t.Errorf("groups = %v", id.Groups)
	}
	if id := identityFrom("i", (&accessClaims{}).identityClaims()); id.Email != "" || len(id.Roles) != 0 || id.EmailVerified {
		t.Errorf("empty token identity = %+v", id)
	}
}

// A cached key outlives failed refreshes only for maxStale: then tokens are refused (503) rather
// than verified forever with a key Keycloak may have rotated out.
func TestStaleKeyIsUsedOnlyForMaxStaleWhileRefreshesFail(t *testing.T) {
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	set, _ := json.Marshal(map[string]any{"keys": []map[string]string{{
		"kid": "k1", "kty": "RSA", "use": "sig", "alg": "RS256",
		"n": base64.RawURLEncoding.EncodeToString(key.N.Bytes()),
		"e": base64.RawURLEncoding.EncodeToString(big.NewInt(int64(key.E)).Bytes()),
	}}})
	var down atomic.Bool
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if down.Load() {
			w.WriteHeader(http.StatusServiceUnavailable)
			return
		}
		w.Write(set)
	}))
	defer srv.Close()

	now := time.Unix(1_000_000, 0)
	clock := func() time.Time { return now }
	const maxAge, maxStale = 10 * time.Minute, 30 * time.Minute
	j := newJWKSCache(srv.URL, time.Second, 30*time.Second, maxAge, maxStale, clock)
	ctx := context.Background()
	if _, err := j.key(ctx, "k1"); err != nil {
		t.Fatalf("first fetch: %v", err)
	}
	down.Store(true)
	now = now.Add(maxAge + time.Minute) // stale, refresh fails: the key still works
	if _, err := j.key(ctx, "k1"); err != nil {
		t.Errorf("stale key within maxStale refused: %v", err)
	}
	now = now.Add(maxStale) // maxAge + maxStale + 1m after the last good fetch
	if _, err := j.key(ctx, "k1"); !errors.Is(err, ErrUnavailable) {
		t.Errorf("stale key past maxStale: err %v, want ErrUnavailable", err)
	}
	down.Store(false)
	now = now.Add(time.Minute)
	if _, err := j.key(ctx, "k1"); err != nil {
		t.Errorf("after Keycloak is back: %v", err)
	}
}

// The JWKS and exchange clients never use a proxy from the environment (HTTPS_PROXY etc.).
func TestClientsIgnoreEnvironmentProxies(t *testing.T) {
	j := newJWKSCache("https://kc.example/certs", time.Second, time.Second, time.Minute, time.Minute, time.Now)
	if tr, ok := j.client.Transport.(*http.Transport); !ok || tr.Proxy != nil {
		t.Error("the JWKS client has a proxy function")
	}
	x := newExchangeClient("https://127.0.0.1:1/x", nil, time.Second)
	if tr, ok := x.client.Transport.(*http.Transport); !ok || tr.Proxy != nil {
		t.Error("the exchange client has a proxy function")
	}
}

func TestKeycloakURLsMustBeHTTPSUnlessLoopback(t *testing.T) {
	for raw, ok := range map[string]bool{
		"https://kc.example/realms/r":      true,
		"http://localhost:18180/realms/r":  true,
		"http://127.0.0.1:18180/realms/r":  true,
		"http://[::1]:18180/realms/r":      true,
		"http://kc.example/realms/r":       false,
		"http://10.0.0.5:8080/realms/r":    false,
		"http://localhost.evil.example/r":  false,
		"http://127.0.0.1.nip.io/realms/r": false,
		"ftp://kc.example/realms/r":        false,
		"kc.example/realms/r":              false,
	} {
		if err := checkKeycloakURL(raw); (err == nil) != ok {
			t.Errorf("%s: err %v, want ok=%v", raw, err, ok)
		}
	}
}
