package gatehouseauth_test

import (
	"strings"
	"testing"
	"time"

	"gatehouse.local/integrations/pocketbase/gatehouseauth"
)

// collect gathers realtime events until `until` returns true for one of them (then for `grace`
// more, to catch anything that should not have come), or until timeout.
func collect(c *sseConn, timeout, grace time.Duration, until func(sseEvent) bool) (events []sseEvent, closed bool) {
	deadline := time.After(timeout)
	var graceC <-chan time.Time
	for {
		select {
		case ev := <-c.events:
			events = append(events, ev)
			if graceC == nil && until(ev) {
				graceC = time.After(grace)
			}
		case <-c.closed:
			// Drain what was read before the close.
			for {
				select {
				case ev := <-c.events:
					events = append(events, ev)
				default:
					return events, true
				}
			}
		case <-graceC:
			return events, false
		case <-deadline:
			return events, false
		}
	}
}

func subscribe(t *testing.T, e *env, sid, clientID string, topics ...string) response {
	t.Helper()
	return e.do("POST", "/api/realtime", sid, map[string]any{"clientId": clientID, "subscriptions": topics})
}

func TestRealtimeDeliversOnlyOwnNotes(t *testing.T) {
	e := newEnv(t)
	a, aSid := e.ensureUser(alice)
	b, _ := e.ensureUser(bob)

	conn, clientID := e.openSSE(aSid)
	if r := subscribe(t, e, aSid, clientID, "notes"); r.status != 204 {
		t.Fatalf("subscribe: %d %s", r.status, r.body)
	}

	bNote := e.createNote(b.Id, "bob's secret")
	aNote := e.createNote(a.Id, "alice's")

	events, closed := collect(conn, 5*time.Second, 500*time.Millisecond, func(ev sseEvent) bool {
		return strings.Contains(ev.data, aNote)
	})
	if closed {
		t.Fatal("the realtime connection closed")
	}
	var gotOwn bool
	for _, ev := range events {
		if strings.Contains(ev.data, bNote) || strings.Contains(ev.data, "bob's secret") {
			t.Errorf("alice received bob's note: %s %s", ev.name, ev.data)
		}
		if ev.name == "notes" && strings.Contains(ev.data, aNote) && strings.Contains(ev.data, `"action":"create"`) {
			gotOwn = true
		}
	}
	if !gotOwn {
		t.Errorf("alice did not receive her own note's create event; got %v", events)
	}
}

func TestRealtimeAnonymousGetsNoNotes(t *testing.T) {
	e := newEnv(t)
	a, _ := e.ensureUser(alice)
	conn, clientID := e.openSSE("")
	if r := subscribe(t, e, "", clientID, "notes"); r.status != 204 {
		t.Fatalf("subscribe: %d %s", r.status, r.body)
	}
	note := e.createNote(a.Id, "alice's")
	events, _ := collect(conn, time.Second, 0, func(sseEvent) bool { return false })
	for _, ev := range events {
		if strings.Contains(ev.data, note) {
			t.Errorf("an anonymous subscriber received alice's note: %s", ev.data)
		}
	}
}

func TestRealtimeStopsAfterLogout(t *testing.T) {
	e := newEnv(t, func(c *gatehouseauth.Config, _ *pkiFiles) { c.CacheMaxAge = 300 * time.Millisecond })
	a, aSid := e.ensureUser(alice)
	conn, clientID := e.openSSE(aSid)
	if r := subscribe(t, e, aSid, clientID, "notes"); r.status != 204 {
		t.Fatalf("subscribe: %d %s", r.status, r.body)
	}

	before := e.createNote(a.Id, "before logout")
	events, closed := collect(conn, 5*time.Second, 0, func(ev sseEvent) bool { return strings.Contains(ev.data, before) })
	if closed || len(events) == 0 || !strings.Contains(events[len(events)-1].data, before) {
		t.Fatalf("note before logout not delivered (closed=%v, events=%v)", closed, events)
	}

	e.gh.revoke(aSid)
	time.Sleep(400 * time.Millisecond) // past the cache lifetime
	after := e.createNote(a.Id, "after logout")
	events, closed = collect(conn, 5*time.Second, 0, func(sseEvent) bool { return false })
	for _, ev := range events {
		if strings.Contains(ev.data, after) {
			t.Errorf("note delivered after logout: %s", ev.data)
		}
	}
	if !closed {
		t.Error("the realtime connection of a logged-out session stayed open")
	}
}

func TestRealtimeSubscriptionMustUseTheConnectionsSession(t *testing.T) {
	e := newEnv(t)
	_, aSid := e.ensureUser(alice)

	// Opened anonymously, then upgraded with a session: refused, because the connection itself
	// could not be re-checked after a logout.
	_, anonID := e.openSSE("")
	if r := subscribe(t, e, aSid, anonID, "notes"); r.status != 403 {
		t.Errorf("anonymous connection + session subscribe: %d, want 403", r.status)
	}

	// Opened with another session of the same user: refused too.
	_, otherID := e.openSSE(e.login(alice))
	if r := subscribe(t, e, aSid, otherID, "notes"); r.status != 403 {
		t.Errorf("connection of another session: %d, want 403", r.status)
	}

	// The same session on both: accepted.
	_, sameID := e.openSSE(aSid)
	if r := subscribe(t, e, aSid, sameID, "notes"); r.status != 204 {
		t.Errorf("same session: %d %s, want 204", r.status, r.body)
	}
}
