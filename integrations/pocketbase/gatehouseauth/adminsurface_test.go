package gatehouseauth_test

import (
	"net/http"
	"strings"
	"testing"

	"github.com/pocketbase/pocketbase/core"
)

// superusersID is the fixed id of PocketBase's superusers collection: "pbc_" + CRC-32 of
// "auth_superusers" (core.Collection's default id), the same in every PocketBase database.
const superusersID = "pbc_3142635823"

// superuserSpellings are names PocketBase resolves to the superusers collection: by name without
// regard to case, escaped, or by id.
var superuserSpellings = []string{
	"_superusers", "_SUPERUSERS", "_SuperUsers", "_superuserS", "%5Fsuperusers", "_superuser%73", superusersID,
}

// superuserEndpoints are every route PocketBase offers under /api/collections/{collection} for an
// auth collection, plus its files route ({c} is replaced by the collection spelling).
var superuserEndpoints = []struct{ method, path string }{
	{"GET", "/api/collections/{c}/auth-methods"},
	{"POST", "/api/collections/{c}/auth-with-password"},
	{"POST", "/api/collections/{c}/auth-refresh"},
	{"POST", "/api/collections/{c}/auth-with-oauth2"},
	{"POST", "/api/collections/{c}/request-otp"},
	{"POST", "/api/collections/{c}/auth-with-otp"},
	{"POST", "/api/collections/{c}/request-password-reset"},
	{"POST", "/api/collections/{c}/confirm-password-reset"},
	{"POST", "/api/collections/{c}/request-verification"},
	{"POST", "/api/collections/{c}/confirm-verification"},
	{"POST", "/api/collections/{c}/request-email-change"},
	{"POST", "/api/collections/{c}/confirm-email-change"},
	{"POST", "/api/collections/{c}/impersonate/abc"},
	{"GET", "/api/collections/{c}/records"},
	{"GET", "/api/collections/{c}/records/abc"},
	{"POST", "/api/collections/{c}/records"},
	{"PATCH", "/api/collections/{c}/records/abc"},
	{"DELETE", "/api/collections/{c}/records/abc"},
	{"GET", "/api/files/{c}/abc/x.png"},
}

func TestTheSuperusersCollectionIdIsTheFixedOne(t *testing.T) {
	e := newEnv(t)
	c, err := e.app.FindCollectionByNameOrId(core.CollectionNameSuperusers)
	if err != nil {
		t.Fatal(err)
	}
	if c.Id != superusersID {
		t.Fatalf("superusers collection id %q, the tests assume %q", c.Id, superusersID)
	}
}

// Every spelling of the superusers collection, on every endpoint: a relayed request gets 404
// without PocketBase acting on it. Without the session header (an operator talking to PocketBase
// directly) the same request does reach PocketBase, which proves the spelling is one PocketBase
// resolves, i.e. that the refusal is ours.
func TestRelayedRequestsNeverReachTheSuperusersCollection(t *testing.T) {
	e := newEnv(t)
	sid := e.login(alice)
	body := map[string]any{"identity": "root@example.com", "password": "guess-guess", "email": "root@example.com", "otpId": "x", "token": "x"}
	for _, spelling := range superuserSpellings {
		for _, ep := range superuserEndpoints {
			path := strings.ReplaceAll(ep.path, "{c}", spelling)
			if r := e.do(ep.method, path, sid, body); r.status != http.StatusNotFound {
				t.Errorf("%s %s with a session: %d, want 404: %s", ep.method, path, r.status, r.body)
			}
			if strings.HasPrefix(ep.path, "/api/files/") {
				continue // PocketBase's own answer is 404 here too (no such record)
			}
			if r := e.do(ep.method, path, "", body); r.status == http.StatusNotFound {
				t.Errorf("%s %s directly: 404, so PocketBase does not resolve this spelling and the test proves nothing", ep.method, path)
			}
		}
	}
	// The online guessing of the issue: a wrong password never reaches PocketBase's login
	// through Gatehouse, and a right one would not either.
	superuserToken(t, e) // creates root@example.com / root-password-123
	for _, spelling := range superuserSpellings {
		r := e.do("POST", "/api/collections/"+spelling+"/auth-with-password", sid,
			map[string]any{"identity": "root@example.com", "password": "root-password-123"})
		if r.status != http.StatusNotFound || strings.Contains(string(r.body), "token") {
			t.Errorf("superuser login as %q with a session: %d %s", spelling, r.status, r.body)
		}
	}
	r := e.do("POST", "/api/collections/"+superusersID+"/auth-with-password", "",
		map[string]any{"identity": "root@example.com", "password": "root-password-123"})
	if r.status != http.StatusOK {
		t.Errorf("direct superuser login by collection id: %d, want 200 (operators keep their access): %s", r.status, r.body)
	}
}

// The other system collections (MFA, OTP, auth origins, external auths) are not for browsers
// either, by name or id.
func TestRelayedRequestsNeverReachSystemCollections(t *testing.T) {
	e := newEnv(t)
	sid := e.login(alice)
	cols, err := e.app.FindAllCollections()
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, c := range cols {
		if !c.System {
			continue
		}
		n++
		for _, name := range []string{c.Name, strings.ToUpper(c.Name), c.Id} {
			if r := e.do("GET", "/api/collections/"+name+"/records", sid, nil); r.status != http.StatusNotFound {
				t.Errorf("list %s with a session: %d, want 404", name, r.status)
			}
		}
	}
	if n < 5 {
		t.Fatalf("only %d system collections found", n)
	}
	// The users' own collections stay reachable.
	if r := e.do("GET", "/api/collections/NOTES/records", sid, nil); r.status != http.StatusOK {
		t.Errorf("notes (as NOTES) with a session: %d, want 200: %s", r.status, r.body)
	}
}

// Every admin-only surface answers 404 to a relayed request, including under spellings the router
// maps to the same route.
func TestRelayedRequestsNeverReachTheAdminSurface(t *testing.T) {
	e := newEnv(t)
	sid := e.login(alice)
	for _, c := range []struct{ method, path string }{
		{"GET", "/_/"},
		{"GET", "/_/images/logo.svg"},
		{"GET", "/_/%69ndex.html"},
		{"GET", "/api/settings"},
		{"PATCH", "/api/settings"},
		{"POST", "/api/settings/test/email"},
		{"GET", "/api/logs"},
		{"GET", "/api/logs/stats"},
		{"GET", "/api/logs/abc"},
		{"DELETE", "/api/logs"},
		{"GET", "/api/backups"},
		{"POST", "/api/backups"},
		{"POST", "/api/backups/upload"},
		{"GET", "/api/backups/x.zip"},
		{"DELETE", "/api/backups/x.zip"},
		{"POST", "/api/backups/x.zip/restore"},
		{"GET", "/api/crons"},
		{"POST", "/api/crons/__pbLogsCleanup__"},
		{"POST", "/api/sql"},
		{"GET", "/api/collections"},
		{"POST", "/api/collections"},
		{"GET", "/api/collections/notes"},
		{"GET", "/api/collections/NOTES"},
		{"PATCH", "/api/collections/notes"},
		{"DELETE", "/api/collections/notes"},
		{"DELETE", "/api/collections/notes/truncate"},
		{"PUT", "/api/collections/import"},
		{"GET", "/api/collections/meta/scaffolds"},
		{"GET", "/api/collections/meta/oauth2-providers"},
		{"POST", "/api/collections/meta/dry-run-view"},
		{"POST", "/api/collections/users/impersonate/abc"},
		{"GET", "/api/%73ettings"},
	} {
		r := e.do(c.method, c.path, sid, map[string]any{"identity": "admin@example.com", "password": "guess"})
		if r.status != http.StatusNotFound {
			t.Errorf("%s %s with a session: status %d, want 404: %s", c.method, c.path, r.status, r.body)
		}
	}
	// Paths the router would first redirect to the clean form never reach a handler: the
	// redirect comes back through Gatehouse and is refused above.
	noRedirect := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	for _, p := range []string{"/api//settings", "/api/./settings", "/api/logs/../settings", "/_"} {
		req, _ := http.NewRequest("GET", e.pb.URL+p, nil)
		req.Header.Set("X-Gatehouse-Session", sid)
		res, err := noRedirect.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		res.Body.Close()
		if res.StatusCode != http.StatusNotFound && (res.StatusCode < 300 || res.StatusCode > 399) {
			t.Errorf("GET %s with a session: %d, want 404 or a redirect to the clean path", p, res.StatusCode)
		}
	}
	// Without a session header the superuser login is PocketBase's own, as before (operators
	// reach PocketBase directly): a wrong password is its 400, not our 404.
	r := e.do("POST", "/api/collections/_superusers/auth-with-password", "", map[string]any{"identity": "admin@example.com", "password": "guess"})
	if r.status != 400 {
		t.Errorf("direct superuser login: status %d, want PocketBase's 400: %s", r.status, r.body)
	}
}

// A batch is routed inside PocketBase, past the router: its sub-requests are checked on their own.
func TestRelayedBatchCannotTouchTheSuperusersCollection(t *testing.T) {
	e := newEnv(t)
	s := e.app.Settings()
	s.Batch.Enabled = true
	s.Batch.MaxRequests = 10
	if err := e.app.Save(s); err != nil {
		t.Fatal(err)
	}
	u, sid := e.ensureUser(alice)
	for _, name := range superuserSpellings {
		r := e.do("POST", "/api/batch", sid, map[string]any{"requests": []map[string]any{
			{"method": "POST", "url": "/api/collections/notes/records", "body": map[string]any{"owner": u.Id, "text": "ok"}},
			{"method": "POST", "url": "/api/collections/" + name + "/records", "body": map[string]any{
				"email": "evil@example.com", "password": "evil-password-1", "passwordConfirm": "evil-password-1"}},
		}})
		if r.status != http.StatusNotFound {
			t.Errorf("batch with %s: %d, want 404: %s", name, r.status, r.body)
		}
	}
	// A batch of the user's own records still works.
	r := e.do("POST", "/api/batch", sid, map[string]any{"requests": []map[string]any{
		{"method": "POST", "url": "/api/collections/notes/records", "body": map[string]any{"owner": u.Id, "text": "ok"}},
	}})
	if r.status != http.StatusOK {
		t.Errorf("batch of own notes: %d, want 200: %s", r.status, r.body)
	}
}

func TestRealtimeCannotSubscribeToTheSuperusersCollection(t *testing.T) {
	e := newEnv(t)
	sid := e.login(alice)
	conn, clientID := e.openSSE(sid)
	defer conn.cancel()
	for _, name := range superuserSpellings[:4] {
		if r := subscribe(t, e, sid, clientID, name+"/*"); r.status != http.StatusForbidden {
			t.Errorf("subscribe %s/*: %d, want 403: %s", name, r.status, r.body)
		}
	}
	if r := subscribe(t, e, sid, clientID, "notes/*"); r.status != http.StatusNoContent {
		t.Errorf("subscribe notes/*: %d, want 204: %s", r.status, r.body)
	}
}
