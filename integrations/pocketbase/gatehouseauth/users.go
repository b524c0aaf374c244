package gatehouseauth

import (
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"unicode/utf8"

	"github.com/pocketbase/dbx"
	"github.com/pocketbase/ozzo-validation/v4/is"
	"github.com/pocketbase/pocketbase/core"
)

// Field names on the users collection (created by the migration in ../migrations).
const (
	FieldIss    = "iss"
	FieldSub    = "sub"
	FieldName   = "name"
	FieldRoles  = "roles"
	FieldGroups = "groups"
)

// nameMax is the users.name field's limit in PocketBase's default schema.
const nameMax = 255

// userSync finds or creates the PocketBase user for a verified identity and keeps its profile in
// step with Keycloak.
type userSync struct {
	collection string
	// createMu serialises record creation inside this process, so concurrent first requests of
	// one user do not race to insert. The unique (iss, sub) index is what guarantees it across
	// processes; see create.
	createMu sync.Mutex
}

// ensure returns the user record for id, creating or updating it as needed. It writes only
// when something changed, so a steady stream of requests costs one indexed read each.
func (s *userSync) ensure(app core.App, id *Identity) (*core.Record, error) {
	rec, err := s.find(app, id)
	if err != nil {
		return nil, err
	}
	if rec == nil {
		return s.create(app, id)
	}
	return rec, s.update(app, rec, id)
}

// find looks the user up by (iss, sub). It returns nil, nil when there is none.
func (s *userSync) find(app core.App, id *Identity) (*core.Record, error) {
	rec := &core.Record{}
	err := app.RecordQuery(s.collection).
		AndWhere(dbx.HashExp{FieldIss: id.Issuer, FieldSub: id.Subject}).
		Limit(1).
		One(rec)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("find user: %w", err)
	}
	return rec, nil
}

func (s *userSync) create(app core.App, id *Identity) (*core.Record, error) {
	s.createMu.Lock()
	defer s.createMu.Unlock()

	// The request we waited for may have created the record already.
	if rec, err := s.find(app, id); err != nil || rec != nil {
		if rec != nil {
			return rec, s.update(app, rec, id)
		}
		return nil, err
	}

	collection, err := app.FindCachedCollectionByNameOrId(s.collection)
	if err != nil {
		return nil, fmt.Errorf("users collection %q: %w", s.collection, err)
	}
	rec := core.NewRecord(collection)
	rec.Set(FieldIss, id.Issuer)
	rec.Set(FieldSub, id.Subject)
	rec.Set(FieldName, displayName(id))
	rec.Set(FieldRoles, nonNil(id.Roles))
	rec.Set(FieldGroups, nonNil(id.Groups))
	email, err := s.usableEmail(app, storedEmail(id), "")
	if err != nil {
		return nil, err
	}
	rec.SetEmail(email)
	rec.SetVerified(email != "")
	// Password login is disabled for users; the random password only fills the required field,
	// nobody ever learns it.
	rec.SetRandomPassword()

	if err := app.Save(rec); err != nil {
		// Another PocketBase process sharing the database may have won the race; the unique
		// (iss, sub) index refused our insert, and its record is the one to use.
		if existing, ferr := s.find(app, id); ferr == nil && existing != nil {
			return existing, s.update(app, existing, id)
		}
		return nil, fmt.Errorf("create user: %w", err)
	}
	return rec, nil
}

// update copies changed profile fields onto rec and saves it if anything changed.
func (s *userSync) update(app core.App, rec *core.Record, id *Identity) error {
	changed := false
	if name := displayName(id); rec.GetString(FieldName) != name {
		rec.Set(FieldName, name)
		changed = true
	}
	if !sameStrings(rec.Get(FieldRoles), id.Roles) {
		rec.Set(FieldRoles, nonNil(id.Roles))
		changed = true
	}
	if !sameStrings(rec.Get(FieldGroups), id.Groups) {
		rec.Set(FieldGroups, nonNil(id.Groups))
		changed = true
	}
	if !strings.EqualFold(rec.Email(), storedEmail(id)) {
		email, err := s.usableEmail(app, storedEmail(id), rec.Id)
		if err != nil {
			return err
		}
		if email != rec.Email() {
			rec.SetEmail(email)
			changed = true
		}
	}
	if verified := rec.Email() != ""; rec.Verified() != verified {
		rec.SetVerified(verified)
		changed = true
	}
	if !changed {
		return nil
	}
	if err := app.Save(rec); err != nil {
		return fmt.Errorf("update user: %w", err)
	}
	return nil
}

// usableEmail returns the e-mail to store for a user, or "" when the claim has none, is not a
// valid address, or is already used by another record (ownID: the user's own record, if any).
//
// A collision is not resolved by taking over the other record: it may be a user of another
// issuer, an account a superuser created by hand, or an e-mail Keycloak let another account
// claim without verification. The user is served without an e-mail instead (and a superuser can
// reconcile the records); see the README.
func (s *userSync) usableEmail(app core.App, claimed, ownID string) (string, error) {
	email := normalizeEmail(claimed)
	if email == "" || len(email) > 255 || is.EmailFormat.Validate(email) != nil {
		return "", nil
	}
	other, err := app.FindAuthRecordByEmail(s.collection, email)
	switch {
	case errors.Is(err, sql.ErrNoRows):
		return email, nil
	case err != nil:
		return "", fmt.Errorf("check e-mail: %w", err)
	case other.Id == ownID:
		return email, nil
	default:
		logf(app, slog.LevelWarn, "gatehouse: e-mail already used by another users record; storing this user without e-mail",
			"user", ownID, "otherRecord", other.Id)
		return "", nil
	}
}

func normalizeEmail(s string) string { return strings.TrimSpace(s) }

// storedEmail is the e-mail a user record may carry: only one Keycloak says is verified. An
// unverified address is whatever the user typed; stored, it would be shown as theirs, could be
// used by PocketBase's mail flows, and would block (or, with a careless merge, take over) the
// record of whoever really owns it.
func storedEmail(id *Identity) string {
	if !id.EmailVerified {
		return ""
	}
	return normalizeEmail(id.Email)
}

// displayName prefers the full name and falls back to the username: name may be absent.
func displayName(id *Identity) string {
	name := strings.TrimSpace(id.Name)
	if name == "" {
		name = strings.TrimSpace(id.PreferredUsername)
	}
	return truncateRunes(name, nameMax)
}

func truncateRunes(s string, max int) string {
	if utf8.RuneCountInString(s) <= max {
		return s
	}
	r := []rune(s)
	return string(r[:max])
}

func nonNil(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}

// sameStrings compares a JSON field's stored value with a wanted list of strings.
func sameStrings(stored any, want []string) bool {
	var raw []byte
	switch v := stored.(type) {
	case nil:
		return len(want) == 0
	case []byte:
		raw = v
	case string:
		raw = []byte(v)
	case fmt.Stringer:
		raw = []byte(v.String())
	default:
		b, err := json.Marshal(v)
		if err != nil {
			return false
		}
		raw = b
	}
	var got []string
	if len(raw) == 0 || string(raw) == "null" {
		return len(want) == 0
	}
	if err := json.Unmarshal(raw, &got); err != nil {
		return false
	}
	return slices.Equal(got, want) || (len(got) == 0 && len(want) == 0)
}
