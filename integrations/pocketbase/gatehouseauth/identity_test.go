package gatehouseauth_test

import (
	"slices"
	"testing"
)

// The exchange answer's claims are not signed. Where they disagree with the verified access
// token, the token's values are stored: a Gatehouse that hands out extra roles, another group or
// someone else's e-mail changes nothing.
func TestIdentityComesFromTheSignedTokenNotTheExchangeClaims(t *testing.T) {
	e := newEnv(t)
	forged := alice
	forged.name = "Mallory"
	forged.username = "mallory"
	forged.email = "root@example.com"
	forged.verified = true
	forged.realmRoles = []string{"admin", "user"}
	forged.clientRoles = map[string][]string{"notes-app": {"owner"}}
	forged.groups = []string{"/admins"}
	// The token is alice's own; the exchange answer around it claims the forged identity.
	sid := e.loginWithToken(forged, e.idp.userToken(t, alice))
	if r := e.do("GET", "/api/collections/notes/records", sid, nil); r.status != 200 {
		t.Fatalf("status %d: %s", r.status, r.body)
	}
	rec := e.userBySub(alice.sub)
	if rec.GetString("name") != alice.name {
		t.Errorf("name = %q, want the token's %q", rec.GetString("name"), alice.name)
	}
	if rec.Email() != alice.email || !rec.Verified() {
		t.Errorf("email = %q verified = %v, want the token's %q", rec.Email(), rec.Verified(), alice.email)
	}
	if got, want := jsonStrings(t, rec, "roles"), []string{"notes-app:editor", "offline_access", "user"}; !slices.Equal(got, want) {
		t.Errorf("roles = %v, want the token's %v", got, want)
	}
	if got := jsonStrings(t, rec, "groups"); !slices.Equal(got, alice.groups) {
		t.Errorf("groups = %v, want the token's %v", got, alice.groups)
	}

	// A token without roles, groups or e-mail gives a user without them, whatever the exchange says.
	bare := e.idp.accessToken(t, "bare-sub")
	bareUser := forged
	bareUser.sub = "bare-sub"
	sid = e.loginWithToken(bareUser, bare)
	if r := e.do("GET", "/api/collections/notes/records", sid, nil); r.status != 200 {
		t.Fatalf("status %d: %s", r.status, r.body)
	}
	rec = e.userBySub("bare-sub")
	if rec.Email() != "" || rec.GetString("name") != "" || len(jsonStrings(t, rec, "roles")) != 0 || len(jsonStrings(t, rec, "groups")) != 0 {
		t.Errorf("bare token stored email %q name %q roles %s groups %s",
			rec.Email(), rec.GetString("name"), rec.GetString("roles"), rec.GetString("groups"))
	}
}

// An unverified e-mail is not stored, so it cannot block or take over the address of the user
// who owns it; once Keycloak verifies it, it is stored.
func TestUnverifiedEmailIsNotStoredAndCannotTakeOverAnAddress(t *testing.T) {
	e := newEnv(t)
	// Mallory registers in Keycloak with alice's address, unverified, and arrives first.
	mallory := user{sub: "mallory-sub", username: "mallory", email: alice.email, verified: false}
	m, _ := e.ensureUser(mallory)
	if m.Email() != "" || m.Verified() {
		t.Errorf("mallory's unverified address stored: email %q verified %v", m.Email(), m.Verified())
	}
	// Alice, whose address it really is, gets it.
	a, _ := e.ensureUser(alice)
	if a.Email() != alice.email || !a.Verified() {
		t.Errorf("alice: email %q verified %v, want %q true", a.Email(), a.Verified(), alice.email)
	}
	// Mallory again: still no address, and alice keeps hers.
	m, _ = e.ensureUser(mallory)
	a = e.userBySub(alice.sub)
	if m.Email() != "" || a.Email() != alice.email {
		t.Errorf("after mallory's return: mallory %q, alice %q", m.Email(), a.Email())
	}

	// A verified address stored earlier is removed when Keycloak reports it unverified again
	// (e.g. the user changed it).
	unverified := alice
	unverified.verified = false
	a, _ = e.ensureUser(unverified)
	if a.Email() != "" || a.Verified() {
		t.Errorf("address kept after it became unverified: %q %v", a.Email(), a.Verified())
	}
	// An exchange answer claiming "verified" does not help: only the token counts.
	sid := e.loginWithToken(alice, e.idp.userToken(t, unverified))
	e.do("GET", "/api/collections/notes/records", sid, nil)
	if a = e.userBySub(alice.sub); a.Email() != "" {
		t.Errorf("unsigned email_verified was believed: %q", a.Email())
	}
}
