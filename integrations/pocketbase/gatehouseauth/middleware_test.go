package gatehouseauth_test

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"github.com/pocketbase/pocketbase/core"

	"gatehouse.local/integrations/pocketbase/gatehouseauth"
)

var (
	alice = user{
		sub: "0b6c1e5e-alice", email: "alice@example.com", verified: true, name: "Alice Liddell", username: "alice",
		realmRoles:  []string{"user", "offline_access"},
		clientRoles: map[string][]string{"notes-app": {"editor"}},
		groups:      []string{"/staff", "/staff/wonderland"},
	}
	bob = user{sub: "7f3d9a21-bob", email: "bob@example.com", verified: false, username: "bob"}
)

func jsonStrings(t *testing.T, rec *core.Record, field string) []string {
	t.Helper()
	var out []string
	raw := rec.GetString(field)
	if err := json.Unmarshal([]byte(raw), &out); err != nil {
		t.Fatalf("%s is not a JSON string array: %q", field, raw)
	}
	return out
}

func TestValidSessionCreatesUserAndAuthenticates(t *testing.T) {
	e := newEnv(t)
	sid := e.login(alice)

	r := e.do("GET", "/api/collections/notes/records", sid, nil)
	if r.status != 200 {
		t.Fatalf("list notes: %d %s", r.status, r.body)
	}

	rec := e.userBySub(alice.sub)
	if rec == nil {
		t.Fatal("no users record was created")
	}
	if got := rec.GetString("iss"); got != e.idp.issuer {
		t.Errorf("iss = %q, want %q", got, e.idp.issuer)
	}
	if rec.Email() != alice.email || !rec.Verified() {
		t.Errorf("email = %q verified = %v, want %q true", rec.Email(), rec.Verified(), alice.email)
	}
	if got := rec.GetString("name"); got != alice.name {
		t.Errorf("name = %q, want %q", got, alice.name)
	}
	if got, want := jsonStrings(t, rec, "roles"), []string{"notes-app:editor", "offline_access", "user"}; !slices.Equal(got, want) {
		t.Errorf("roles = %v, want %v", got, want)
	}
	if got, want := jsonStrings(t, rec, "groups"), alice.groups; !slices.Equal(got, want) {
		t.Errorf("groups = %v, want %v", got, want)
	}
	if rec.ValidatePassword("") {
		t.Error("the user record must have a random password, not an empty one")
	}

	// The request is authenticated as that record: a note created through the API as alice
	// (the create rule requires owner = @request.auth.id) appears in alice's list.
	r = e.do("POST", "/api/collections/notes/records", sid, map[string]any{"owner": rec.Id, "text": "first"})
	if r.status != 200 {
		t.Fatalf("create own note: %d %s", r.status, r.body)
	}
	if got := e.listNoteTexts(sid); !slices.Equal(got, []string{"first"}) {
		t.Errorf("alice's notes = %v, want [first]", got)
	}

	// The users collection shows her own record only, i.e. @request.auth.id is her id.
	r = e.do("GET", "/api/collections/users/records", sid, nil)
	if r.status != 200 || !strings.Contains(string(r.body), `"totalItems":1`) || !strings.Contains(string(r.body), rec.Id) {
		t.Errorf("users list as alice: %d %s", r.status, r.body)
	}
}

func TestNameFallsBackToUsernameAndEmailMayBeAbsent(t *testing.T) {
	e := newEnv(t)
	carol := user{sub: "carol-sub", username: "carol"} // no name, no e-mail in Keycloak
	rec, _ := e.ensureUser(carol)
	if rec.GetString("name") != "carol" {
		t.Errorf("name = %q, want the username", rec.GetString("name"))
	}
	if rec.Email() != "" || rec.Verified() {
		t.Errorf("email = %q verified = %v, want empty and false", rec.Email(), rec.Verified())
	}
}

func TestRepeatRequestsAreServedFromCache(t *testing.T) {
	e := newEnv(t)
	sid := e.login(alice)
	for i := 0; i < 5; i++ {
		if r := e.do("GET", "/api/collections/notes/records", sid, nil); r.status != 200 {
			t.Fatalf("request %d: %d %s", i, r.status, r.body)
		}
	}
	if n := e.gh.calls.Load(); n != 1 {
		t.Errorf("Gatehouse was called %d times for 5 requests of one session, want 1", n)
	}
	if n := e.idp.fetches.Load(); n != 1 {
		t.Errorf("JWKS fetched %d times, want 1", n)
	}
}

func TestConcurrentRequestsOfOneSessionShareOneExchange(t *testing.T) {
	e := newEnv(t)
	sid := e.login(alice)
	var wg sync.WaitGroup
	statuses := make([]int, 8)
	for i := range statuses {
		wg.Add(1)
		go func() {
			defer wg.Done()
			statuses[i] = e.do("GET", "/api/collections/notes/records", sid, nil).status
		}()
	}
	wg.Wait()
	for i, s := range statuses {
		if s != 200 {
			t.Errorf("request %d: status %d", i, s)
		}
	}
	if n := e.gh.calls.Load(); n != 1 {
		t.Errorf("Gatehouse was called %d times for 8 concurrent requests, want 1 (single flight)", n)
	}
	if n := e.countUsers(); n != 1 {
		t.Errorf("%d users records, want 1", n)
	}
}

func TestConcurrentFirstRequestsCreateOneUser(t *testing.T) {
	e := newEnv(t)
	// Different sessions of the same user (e.g. two tabs logging in at once): no single flight
	// covers them, only the creation lock and the unique (iss, sub) index.
	sids := make([]string, 8)
	for i := range sids {
		sids[i] = e.login(bob)
	}
	var wg sync.WaitGroup
	statuses := make([]int, len(sids))
	for i, sid := range sids {
		wg.Add(1)
		go func() {
			defer wg.Done()
			statuses[i] = e.do("GET", "/api/collections/notes/records", sid, nil).status
		}()
	}
	wg.Wait()
	for i, s := range statuses {
		if s != 200 {
			t.Errorf("request %d: status %d", i, s)
		}
	}
	if n := e.countUsers(); n != 1 {
		t.Errorf("%d users records after concurrent first requests, want 1", n)
	}
}

func TestClaimsChangeUpdatesUser(t *testing.T) {
	e := newEnv(t)
	before, _ := e.ensureUser(alice)

	// Same claims through a new session: nothing to write.
	e.ensureUser(alice)
	same := e.userBySub(alice.sub)
	if same.GetString("updated") != before.GetString("updated") {
		t.Errorf("record was rewritten although nothing changed (updated %s -> %s)",
			before.GetString("updated"), same.GetString("updated"))
	}

	changed := alice
	changed.name = "Alice Kingsleigh"
	changed.email = "alice.k@example.com"
	changed.verified = false
	changed.realmRoles = []string{"user", "admin"}
	changed.clientRoles = nil
	changed.groups = []string{"/staff"}
	after, _ := e.ensureUser(changed)

	if after.Id != before.Id {
		t.Fatalf("a new record %s was created instead of updating %s", after.Id, before.Id)
	}
	if n := e.countUsers(); n != 1 {
		t.Errorf("%d users records, want 1", n)
	}
	// The new address is not verified: it is not stored (and the old one is gone too).
	if after.GetString("name") != "Alice Kingsleigh" || after.Email() != "" || after.Verified() {
		t.Errorf("profile not synced: name %q email %q verified %v", after.GetString("name"), after.Email(), after.Verified())
	}
	changed.verified = true
	after, _ = e.ensureUser(changed)
	if after.Email() != "alice.k@example.com" || !after.Verified() {
		t.Errorf("verified new address not stored: email %q verified %v", after.Email(), after.Verified())
	}
	if got := jsonStrings(t, after, "roles"); !slices.Equal(got, []string{"admin", "user"}) {
		t.Errorf("roles = %v, want [admin user]", got)
	}
	if got := jsonStrings(t, after, "groups"); !slices.Equal(got, []string{"/staff"}) {
		t.Errorf("groups = %v, want [/staff]", got)
	}
}

func TestEmailCollisionDoesNotTakeOverAnotherRecord(t *testing.T) {
	e := newEnv(t)
	// A record a superuser created by hand, with alice's e-mail but no Keycloak identity.
	col, _ := e.app.FindCollectionByNameOrId("users")
	manual := core.NewRecord(col)
	manual.SetEmail(alice.email)
	manual.SetRandomPassword()
	if err := e.app.Save(manual); err != nil {
		t.Fatal(err)
	}

	rec, sid := e.ensureUser(alice)
	if rec.Id == manual.Id {
		t.Fatal("alice's session was given the manually created record")
	}
	if rec.Email() != "" {
		t.Errorf("alice's record got e-mail %q although another record has it", rec.Email())
	}
	reloaded, _ := e.app.FindRecordById("users", manual.Id)
	if reloaded.GetString("sub") != "" || reloaded.Email() != alice.email {
		t.Errorf("the manual record was modified: sub %q email %q", reloaded.GetString("sub"), reloaded.Email())
	}
	// And she is still served.
	if r := e.do("GET", "/api/collections/notes/records", sid, nil); r.status != 200 {
		t.Errorf("alice refused after collision: %d %s", r.status, r.body)
	}
}

func TestInvalidSessionIs401(t *testing.T) {
	e := newEnv(t)
	r := e.do("GET", "/api/collections/notes/records", e.newSessionID(), nil)
	if r.status != 401 {
		t.Fatalf("status %d, want 401: %s", r.status, r.body)
	}
	// PocketBase's own error shape.
	m := r.json(t)
	if m["status"] != float64(401) || m["message"] == "" {
		t.Errorf("error body not in PocketBase's shape: %s", r.body)
	}
	if e.gh.calls.Load() != 1 {
		t.Errorf("Gatehouse calls = %d, want 1", e.gh.calls.Load())
	}
	if n := e.countUsers(); n != 0 {
		t.Errorf("%d users records created for an invalid session", n)
	}
	// Failures are not cached: a second attempt asks Gatehouse again.
	e.do("GET", "/api/collections/notes/records", "not-cached-either", nil)
	if e.gh.calls.Load() != 2 {
		t.Errorf("Gatehouse calls = %d, want 2", e.gh.calls.Load())
	}
}

func TestLogoutPropagatesAfterCacheLifetime(t *testing.T) {
	e := newEnv(t, func(c *gatehouseauth.Config, p *pkiFiles) { c.CacheMaxAge = 300 * time.Millisecond })
	sid := e.login(alice)
	if r := e.do("GET", "/api/collections/notes/records", sid, nil); r.status != 200 {
		t.Fatalf("first request: %d", r.status)
	}
	e.gh.revoke(sid)
	time.Sleep(400 * time.Millisecond)
	if r := e.do("GET", "/api/collections/notes/records", sid, nil); r.status != 401 {
		t.Errorf("after logout and cache expiry: %d, want 401", r.status)
	}
}

func TestCacheEndsBeforeTokenExpiry(t *testing.T) {
	e := newEnv(t)
	sid := e.newSessionID()
	// The token expires in ~33 s: the entry may live until 30 s before that (~3 s), not for the
	// default 60 s.
	claims := e.idp.claims(alice.sub)
	exp := time.Unix(time.Now().Add(33*time.Second).Unix(), 0) // JWT exp has whole seconds
	claims["exp"] = exp.Unix()
	e.gh.set(sid, answer{status: 200, body: exchangeBody(alice, sign(t, jwt.SigningMethodRS256, signingKey, testKid, claims), exp)})

	e.do("GET", "/api/collections/notes/records", sid, nil)
	e.do("GET", "/api/collections/notes/records", sid, nil)
	if n := e.gh.calls.Load(); n != 1 {
		t.Fatalf("calls = %d, want 1 (cached)", n)
	}
	time.Sleep(time.Until(exp.Add(-30*time.Second + 200*time.Millisecond)))
	if r := e.do("GET", "/api/collections/notes/records", sid, nil); r.status != 200 {
		t.Fatalf("status %d", r.status)
	}
	if n := e.gh.calls.Load(); n != 2 {
		t.Errorf("calls = %d, want 2: the entry must end 30 s before the token expires", n)
	}
}

func TestGatehouseUnreachableIs503(t *testing.T) {
	addr := deadAddr(t)
	e := newEnv(t, func(c *gatehouseauth.Config, p *pkiFiles) {
		c.ExchangeURL = "https://" + addr + "/internal/v1/session/exchange"
	})

	r := e.do("GET", "/api/collections/notes/records", e.login(alice), nil)
	if r.status != 503 {
		t.Fatalf("status %d, want 503: %s", r.status, r.body)
	}
	if m := r.json(t); m["status"] != float64(503) {
		t.Errorf("error body not in PocketBase's shape: %s", r.body)
	}
}

func TestGatehouseErrorsAre503(t *testing.T) {
	e := newEnv(t)
	sid := e.login(alice)
	for _, a := range []answer{
		{status: 503, body: []byte(`{"error":"unavailable"}`)},
		{status: 500, body: []byte(`oops`)},
		{status: 429, body: []byte(`{"error":"rate_limited"}`)},
		{status: 403, body: []byte(`{"error":"forbidden"}`)},
		{status: 200, body: []byte(`{"access_token":`)},                    // truncated
		{status: 200, body: []byte(`{"token_type":"Bearer","claims":{}}`)}, // no token, no sub
	} {
		e.gh.force(&a)
		if r := e.do("GET", "/api/collections/notes/records", sid, nil); r.status != 503 {
			t.Errorf("Gatehouse %d %s: status %d, want 503", a.status, a.body, r.status)
		}
	}
	e.gh.force(nil)
	if r := e.do("GET", "/api/collections/notes/records", sid, nil); r.status != 200 {
		t.Errorf("after Gatehouse recovered: status %d, want 200", r.status)
	}
}

func TestGatehouseTimeoutIs503(t *testing.T) {
	// A TCP listener that accepts and never answers the TLS handshake.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			t.Cleanup(func() { c.Close() })
		}
	}()
	e := newEnv(t, func(c *gatehouseauth.Config, p *pkiFiles) {
		c.ExchangeURL = "https://" + l.Addr().String() + exchangePath
		c.Timeout = 300 * time.Millisecond
	})
	start := time.Now()
	r := e.do("GET", "/api/collections/notes/records", e.login(alice), nil)
	if r.status != 503 {
		t.Fatalf("status %d, want 503", r.status)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("took %s; the timeout did not apply", d)
	}
}

func TestNoHeaderIsAnonymous(t *testing.T) {
	e := newEnv(t)
	rec, _ := e.ensureUser(alice)
	e.createNote(rec.Id, "secret")
	calls := e.gh.calls.Load()

	if got := e.listNoteTexts(""); len(got) != 0 {
		t.Errorf("anonymous list shows %v", got)
	}
	r := e.do("POST", "/api/collections/notes/records", "", map[string]any{"owner": rec.Id, "text": "forged"})
	if r.status == 200 {
		t.Errorf("anonymous create succeeded: %s", r.body)
	}
	// Plain PocketBase endpoints still work anonymously.
	if r := e.do("GET", "/api/health", "", nil); r.status != 200 {
		t.Errorf("health: %d", r.status)
	}
	if e.gh.calls.Load() != calls {
		t.Error("Gatehouse was called for requests without a session header")
	}
	notes, _ := e.app.FindAllRecords("notes")
	if len(notes) != 1 {
		t.Errorf("%d notes, want 1", len(notes))
	}
}

func TestTokenChecks(t *testing.T) {
	e := newEnv(t)
	rsaKeys(t)
	cases := []struct {
		name  string
		token func() string
		sub   string // the exchange's claims.sub (default alice)
	}{
		{"signed by another key, same kid", func() string {
			return sign(t, jwt.SigningMethodRS256, otherKey, testKid, e.idp.claims(alice.sub))
		}, ""},
		{"signed by another key, unknown kid", func() string {
			return sign(t, jwt.SigningMethodRS256, otherKey, "unknown-kid", e.idp.claims(alice.sub))
		}, ""},
		{"signed with the encryption key's kid", func() string {
			return sign(t, jwt.SigningMethodRS256, encryptionKey, "enc-key", e.idp.claims(alice.sub))
		}, ""},
		{"no kid", func() string {
			return sign(t, jwt.SigningMethodRS256, signingKey, "", e.idp.claims(alice.sub))
		}, ""},
		{"wrong issuer", func() string {
			c := e.idp.claims(alice.sub)
			c["iss"] = "http://localhost:18180/realms/other"
			return sign(t, jwt.SigningMethodRS256, signingKey, testKid, c)
		}, ""},
		{"sub differs from the exchange's claims.sub", func() string {
			return e.idp.accessToken(t, bob.sub)
		}, ""},
		{"claims.sub differs from the token's sub", func() string {
			return e.idp.accessToken(t, alice.sub)
		}, bob.sub},
		{"expired", func() string {
			c := e.idp.claims(alice.sub)
			c["exp"] = time.Now().Add(-2 * time.Minute).Unix()
			return sign(t, jwt.SigningMethodRS256, signingKey, testKid, c)
		}, ""},
		{"no exp", func() string {
			c := e.idp.claims(alice.sub)
			delete(c, "exp")
			return sign(t, jwt.SigningMethodRS256, signingKey, testKid, c)
		}, ""},
		{"alg none", func() string {
			return sign(t, jwt.SigningMethodNone, jwt.UnsafeAllowNoneSignatureType, testKid, e.idp.claims(alice.sub))
		}, ""},
		{"HS256", func() string {
			return sign(t, jwt.SigningMethodHS256, []byte("attacker-chosen secret"), testKid, e.idp.claims(alice.sub))
		}, ""},
		{"an ID token (typ ID)", func() string {
			c := e.idp.claims(alice.sub)
			c["typ"] = "ID"
			return sign(t, jwt.SigningMethodRS256, signingKey, testKid, c)
		}, ""},
		{"not a JWT", func() string { return "opaque-token" }, ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			u := alice
			if tc.sub != "" {
				u.sub = tc.sub
			}
			sid := e.loginWithToken(u, tc.token())
			r := e.do("GET", "/api/collections/notes/records", sid, nil)
			if r.status != 401 {
				t.Errorf("status %d, want 401: %s", r.status, r.body)
			}
		})
	}
	if n := e.countUsers(); n != 0 {
		t.Errorf("%d users records created from rejected tokens", n)
	}
	// The control: a good token through the same machinery is accepted.
	if r := e.do("GET", "/api/collections/notes/records", e.login(alice), nil); r.status != 200 {
		t.Errorf("valid token: %d %s", r.status, r.body)
	}
}

func TestUnknownKidRefetchIsRateLimited(t *testing.T) {
	e := newEnv(t, func(c *gatehouseauth.Config, p *pkiFiles) { c.JWKSMinRefresh = time.Hour })
	rsaKeys(t)
	e.ensureUser(alice) // first fetch
	for i := 0; i < 3; i++ {
		tok := sign(t, jwt.SigningMethodRS256, otherKey, fmt.Sprintf("rotated-%d", i), e.idp.claims(alice.sub))
		if r := e.do("GET", "/api/collections/notes/records", e.loginWithToken(alice, tok), nil); r.status != 401 {
			t.Errorf("unknown kid %d: status %d, want 401", i, r.status)
		}
	}
	if n := e.idp.fetches.Load(); n != 1 {
		t.Errorf("JWKS fetched %d times; unknown kids within the refresh interval must not refetch", n)
	}

	// With a short interval an unknown kid does trigger a refetch (key rotation).
	e2 := newEnv(t, func(c *gatehouseauth.Config, p *pkiFiles) { c.JWKSMinRefresh = time.Millisecond })
	e2.ensureUser(alice)
	time.Sleep(5 * time.Millisecond)
	tok := sign(t, jwt.SigningMethodRS256, otherKey, "rotated", e2.idp.claims(alice.sub))
	e2.do("GET", "/api/collections/notes/records", e2.loginWithToken(alice, tok), nil)
	if n := e2.idp.fetches.Load(); n != 2 {
		t.Errorf("JWKS fetched %d times, want 2 (refetch on unknown kid)", n)
	}
}

func TestJWKSUnreachableIs503(t *testing.T) {
	addr := deadAddr(t)
	e := newEnv(t, func(c *gatehouseauth.Config, p *pkiFiles) { c.JWKSURL = "http://" + addr + "/certs" })
	if r := e.do("GET", "/api/collections/notes/records", e.login(alice), nil); r.status != 503 {
		t.Errorf("status %d, want 503 when Keycloak's keys cannot be fetched", r.status)
	}
}

func TestMalformedHeaderIs401WithoutExchange(t *testing.T) {
	e := newEnv(t)
	for name, hdrs := range map[string][]string{
		"empty":         {gatehouseauth.HeaderSession, ""},
		"too long":      {gatehouseauth.HeaderSession, strings.Repeat("a", 257)},
		"space":         {gatehouseauth.HeaderSession, "abc def"},
		"dot":           {gatehouseauth.HeaderSession, "abc.def"},
		"std base64":    {gatehouseauth.HeaderSession, "ab+c/d=="},
		"after padding": {gatehouseauth.HeaderSession, "abc=d"},
		"only padding":  {gatehouseauth.HeaderSession, "=="},
		"non-ascii":     {gatehouseauth.HeaderSession, "séance"},
		"two headers":   {gatehouseauth.HeaderSession, e.login(alice), gatehouseauth.HeaderSession, e.login(bob)},
	} {
		r := e.do("GET", "/api/collections/notes/records", "", nil, hdrs...)
		if r.status != 401 {
			t.Errorf("%s: status %d, want 401", name, r.status)
		}
	}
	if n := e.gh.calls.Load(); n != 0 {
		t.Errorf("Gatehouse was called %d times for malformed headers", n)
	}
	// The longest acceptable value is exchanged normally (and refused by Gatehouse).
	if r := e.do("GET", "/api/collections/notes/records", strings.Repeat("a", 256), nil); r.status != 401 || e.gh.calls.Load() != 1 {
		t.Errorf("256 characters: status %d, calls %d; want 401 after 1 exchange", r.status, e.gh.calls.Load())
	}
}

func TestUsersSeeAndChangeOnlyTheirOwnNotes(t *testing.T) {
	e := newEnv(t)
	a, aSid := e.ensureUser(alice)
	b, bSid := e.ensureUser(bob)
	aNote := e.createNote(a.Id, "alice's")
	bNote := e.createNote(b.Id, "bob's")

	if got := e.listNoteTexts(aSid); !slices.Equal(got, []string{"alice's"}) {
		t.Errorf("alice sees %v", got)
	}
	if got := e.listNoteTexts(bSid); !slices.Equal(got, []string{"bob's"}) {
		t.Errorf("bob sees %v", got)
	}

	path := "/api/collections/notes/records/" + bNote
	if r := e.do("GET", path, aSid, nil); r.status != 404 {
		t.Errorf("alice views bob's note: %d, want 404", r.status)
	}
	if r := e.do("PATCH", path, aSid, map[string]any{"text": "hacked"}); r.status != 404 {
		t.Errorf("alice updates bob's note: %d, want 404", r.status)
	}
	if r := e.do("DELETE", path, aSid, nil); r.status != 404 {
		t.Errorf("alice deletes bob's note: %d, want 404", r.status)
	}
	if r := e.do("POST", "/api/collections/notes/records", aSid, map[string]any{"owner": b.Id, "text": "planted"}); r.status != 400 {
		t.Errorf("alice creates a note owned by bob: %d, want 400", r.status)
	}
	// Nor may she hand her own note over to bob.
	if r := e.do("PATCH", "/api/collections/notes/records/"+aNote, aSid, map[string]any{"owner": b.Id}); r.status != 404 {
		t.Errorf("alice moves her note to bob: %d, want 404", r.status)
	}
	// But she may edit and delete her own.
	if r := e.do("PATCH", "/api/collections/notes/records/"+aNote, aSid, map[string]any{"text": "edited"}); r.status != 200 {
		t.Errorf("alice edits her note: %d %s", r.status, r.body)
	}

	bRec, err := e.app.FindRecordById("notes", bNote)
	if err != nil || bRec.GetString("text") != "bob's" {
		t.Errorf("bob's note changed or vanished: %v %v", bRec, err)
	}
	aRec, _ := e.app.FindRecordById("notes", aNote)
	if aRec.GetString("owner") != a.Id || aRec.GetString("text") != "edited" {
		t.Errorf("alice's note: owner %q text %q", aRec.GetString("owner"), aRec.GetString("text"))
	}
	if notes, _ := e.app.FindAllRecords("notes"); len(notes) != 2 {
		t.Errorf("%d notes, want 2", len(notes))
	}
	if r := e.do("DELETE", "/api/collections/notes/records/"+aNote, aSid, nil); r.status != 204 {
		t.Errorf("alice deletes her note: %d", r.status)
	}
}

func TestNoteTextIsValidated(t *testing.T) {
	e := newEnv(t)
	a, sid := e.ensureUser(alice)
	for _, text := range []string{"", strings.Repeat("x", 2001)} {
		if r := e.do("POST", "/api/collections/notes/records", sid, map[string]any{"owner": a.Id, "text": text}); r.status != 400 {
			t.Errorf("note of %d characters: %d, want 400", len(text), r.status)
		}
	}
}

func TestSessionDecidesOverAuthorizationHeader(t *testing.T) {
	e := newEnv(t)
	a, aSid := e.ensureUser(alice)
	b, _ := e.ensureUser(bob)
	e.createNote(a.Id, "alice's")
	e.createNote(b.Id, "bob's")

	su := superuserToken(t, e)
	// The superuser token alone sees everything.
	if got := e.listNoteTexts("", "Authorization", su); len(got) != 2 {
		t.Fatalf("superuser sees %v, want both notes", got)
	}
	// With alice's session the token is ignored: she sees only her note.
	if got := e.listNoteTexts(aSid, "Authorization", su); !slices.Equal(got, []string{"alice's"}) {
		t.Errorf("session + superuser token sees %v, want only alice's", got)
	}
	// An invalid session is refused, not downgraded to the token's identity.
	if r := e.do("GET", "/api/collections/notes/records", e.newSessionID(), nil, "Authorization", su); r.status != 401 {
		t.Errorf("invalid session + superuser token: %d, want 401", r.status)
	}
}

func superuserToken(t *testing.T, e *env) string {
	t.Helper()
	col, err := e.app.FindCollectionByNameOrId(core.CollectionNameSuperusers)
	if err != nil {
		t.Fatal(err)
	}
	su := core.NewRecord(col)
	su.SetEmail("root@example.com")
	su.SetPassword("root-password-123")
	if err := e.app.Save(su); err != nil {
		t.Fatal(err)
	}
	tok, err := su.NewAuthToken()
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

func TestUsersCannotAuthenticateOrSignUpOutsideGatehouse(t *testing.T) {
	e := newEnv(t)
	a, aSid := e.ensureUser(alice)
	e.createNote(a.Id, "alice's")

	// A PocketBase token for alice's record (as impersonation or an older login would give)
	// does not authenticate her: the request is anonymous.
	tok, err := a.NewAuthToken()
	if err != nil {
		t.Fatal(err)
	}
	if got := e.listNoteTexts("", "Authorization", tok); len(got) != 0 {
		t.Errorf("PocketBase user token sees %v, want nothing", got)
	}
	// No public sign-up.
	r := e.do("POST", "/api/collections/users/records", "", map[string]any{
		"email": "mallory@example.com", "password": "mallory-password", "passwordConfirm": "mallory-password",
	})
	if r.status == 200 {
		t.Errorf("public sign-up succeeded: %s", r.body)
	}
	// No password login, even with the right password.
	a.SetPassword("known-password-1")
	if err := e.app.Save(a); err != nil {
		t.Fatal(err)
	}
	if r := e.do("POST", "/api/collections/users/auth-with-password", "", map[string]any{
		"identity": alice.email, "password": "known-password-1",
	}); r.status == 200 {
		t.Errorf("password login succeeded: %s", r.body)
	}
	// A session cannot be turned into a long-lived PocketBase token.
	if r := e.do("POST", "/api/collections/users/auth-refresh", aSid, nil); r.status == 200 {
		t.Errorf("auth-refresh issued a token: %s", r.body)
	}
	// Nor can a user rewrite their identity fields.
	if r := e.do("PATCH", "/api/collections/users/records/"+a.Id, aSid, map[string]any{"sub": bob.sub}); r.status == 200 {
		t.Errorf("user updated their own record: %s", r.body)
	}
	if got := e.userBySub(alice.sub); got == nil || got.Id != a.Id {
		t.Error("alice's identity changed")
	}
	if n := e.countUsers(); n != 1 {
		t.Errorf("%d users records, want 1", n)
	}
}

func TestExchangeRequiresTheRightClientCertificate(t *testing.T) {
	pki := newPKI(t)
	stub := newStubGatehouse(t, pki)

	// Without any client certificate the stub refuses the handshake.
	pool := x509.NewCertPool()
	caPEM, _ := os.ReadFile(pki.caFile)
	pool.AppendCertsFromPEM(caPEM)
	plain := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	if res, err := plain.Post(stub.url, "application/json", strings.NewReader(`{"session_id":"x"}`)); err == nil {
		res.Body.Close()
		t.Errorf("a client without certificate got %d; the stub must require one", res.StatusCode)
	}

	// The middleware's client, with a certificate from another CA: refused at the handshake,
	// so the handler never runs and the user gets 503.
	e := newEnv(t, func(c *gatehouseauth.Config, p *pkiFiles) {
		c.ClientCertFile, c.ClientKeyFile = p.rogueCert, p.rogueKey
	})
	if r := e.do("GET", "/api/collections/notes/records", e.login(alice), nil); r.status != 503 {
		t.Errorf("rogue client certificate: status %d, want 503", r.status)
	}
	if n := e.gh.calls.Load(); n != 0 {
		t.Errorf("the stub handled %d exchanges from a client with a rogue certificate", n)
	}

	// A certificate from the right CA with an identity not on the allow-list: Gatehouse says
	// 403, the user gets 503.
	e2 := newEnv(t, func(c *gatehouseauth.Config, p *pkiFiles) { c.ClientCertFile, c.ClientKeyFile = p.evilCert, p.evilKey })
	if r := e2.do("GET", "/api/collections/notes/records", e2.login(alice), nil); r.status != 503 {
		t.Errorf("identity not allowed: status %d, want 503", r.status)
	}
	if n := e2.gh.calls.Load(); n != 1 {
		t.Errorf("calls = %d, want 1 (handshake ok, then 403)", n)
	}

	// And a server certificate from another CA is not trusted by the middleware.
	e3 := newEnv(t, func(c *gatehouseauth.Config, p *pkiFiles) { c.CAFile = otherCAFile(t) })
	if r := e3.do("GET", "/api/collections/notes/records", e3.login(alice), nil); r.status != 503 {
		t.Errorf("untrusted server certificate: status %d, want 503", r.status)
	}
	if n := e3.gh.calls.Load(); n != 0 {
		t.Errorf("exchange went through to a server signed by an untrusted CA (%d calls)", n)
	}
}

func otherCAFile(t *testing.T) string {
	ca, _ := newCA(t, "unrelated CA")
	return writePEM(t, t.TempDir(), "other-ca.crt", "CERTIFICATE", ca.Raw)
}

func TestConfigIsValidatedAtStartup(t *testing.T) {
	_, err := gatehouseauth.New(gatehouseauth.Config{})
	if err == nil {
		t.Fatal("empty config accepted")
	}
	for _, want := range []string{"GATEHOUSE_CLIENT_CERT", "GATEHOUSE_CLIENT_KEY", "GATEHOUSE_CA", "GATEHOUSE_ISSUER"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error does not name %s: %v", want, err)
		}
	}

	pki := newPKI(t)
	good := gatehouseauth.Config{
		ClientCertFile: pki.clientCert, ClientKeyFile: pki.clientKey, CAFile: pki.caFile,
		Issuer: "http://localhost:18180/realms/gatehouse",
	}
	gh, err := gatehouseauth.New(good)
	if err != nil {
		t.Fatalf("good config refused: %v", err)
	}
	if got := gh.Config(); got.ExchangeURL != gatehouseauth.DefaultExchangeURL ||
		got.JWKSURL != "http://localhost:18180/realms/gatehouse/protocol/openid-connect/certs" {
		t.Errorf("defaults: exchange %q jwks %q", got.ExchangeURL, got.JWKSURL)
	}

	bad := map[string]func(c *gatehouseauth.Config){
		"plain http exchange": func(c *gatehouseauth.Config) { c.ExchangeURL = "http://127.0.0.1:8443/internal/v1/session/exchange" },
		"cache too long":      func(c *gatehouseauth.Config) { c.CacheMaxAge = 5 * time.Minute },
		"missing cert file":   func(c *gatehouseauth.Config) { c.ClientCertFile = "/nonexistent/pocketbase.crt" },
		"key of another cert": func(c *gatehouseauth.Config) { c.ClientKeyFile = pki.evilKey },
		"CA file is no PEM":   func(c *gatehouseauth.Config) { c.CAFile = pki.clientKey },
		"issuer not a URL":    func(c *gatehouseauth.Config) { c.Issuer = "gatehouse" },
		"plain http issuer":   func(c *gatehouseauth.Config) { c.Issuer = "http://kc.example/realms/gatehouse" },
		"plain http JWKS": func(c *gatehouseauth.Config) {
			c.JWKSURL = "http://10.1.2.3/realms/gatehouse/protocol/openid-connect/certs"
		},
		"stale cap too long": func(c *gatehouseauth.Config) { c.JWKSMaxStale = 48 * time.Hour },
	}
	for name, mutate := range bad {
		c := good
		mutate(&c)
		if _, err := gatehouseauth.New(c); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}

	t.Setenv(gatehouseauth.EnvIssuer, "https://kc.example/realms/x/")
	t.Setenv(gatehouseauth.EnvTimeout, "3s")
	t.Setenv(gatehouseauth.EnvCacheMaxAge, "soon")
	if _, err := gatehouseauth.ConfigFromEnv(); err == nil || !strings.Contains(err.Error(), gatehouseauth.EnvCacheMaxAge) {
		t.Errorf("bad duration not reported: %v", err)
	}
	t.Setenv(gatehouseauth.EnvCacheMaxAge, "20s")
	c, err := gatehouseauth.ConfigFromEnv()
	if err != nil || c.Timeout != 3*time.Second || c.CacheMaxAge != 20*time.Second || c.Issuer != "https://kc.example/realms/x/" {
		t.Errorf("ConfigFromEnv = %+v, %v", c, err)
	}
}

func TestSessionHeaderFromAnUntrustedPeerIsRefusedWithoutExchange(t *testing.T) {
	// The test client connects from loopback; trust only another network.
	e := newEnv(t, func(c *gatehouseauth.Config, _ *pkiFiles) {
		c.TrustedPeers = []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")}
	})
	sid := e.login(alice)
	calls := e.gh.calls.Load()
	if r := e.do("GET", "/api/collections/notes/records", sid, nil); r.status != 403 {
		t.Errorf("status %d, want 403: %s", r.status, r.body)
	}
	if e.gh.calls.Load() != calls {
		t.Error("Gatehouse was called for a session header from an untrusted peer")
	}
	// Without the header the request is plain PocketBase, as before.
	if r := e.do("GET", "/api/health", "", nil); r.status != 200 {
		t.Errorf("health: %d", r.status)
	}
}

func TestTheExchangeClientNeverFollowsRedirects(t *testing.T) {
	e := newEnv(t)
	sid := e.login(alice)
	var followed atomic.Int64
	elsewhere := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { followed.Add(1) }))
	t.Cleanup(elsewhere.Close)
	e.gh.force(&answer{status: 307, body: nil, location: elsewhere.URL + "/steal"})
	if r := e.do("GET", "/api/collections/notes/records", sid, nil); r.status != 503 {
		t.Errorf("status %d, want 503", r.status)
	}
	if followed.Load() != 0 {
		t.Error("the session id was re-sent to the redirect target")
	}
}

// deadAddr is a loopback address that was just free: nothing listens there.
func deadAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	return addr
}
