package migrations_test

import (
	"testing"

	"github.com/pocketbase/pocketbase/core"
	"github.com/pocketbase/pocketbase/tests"

	"gatehouse.local/integrations/pocketbase/migrations"
)

func TestMigrationsUpAndDown(t *testing.T) {
	app, err := tests.NewTestApp(t.TempDir()) // runs all migrations up
	if err != nil {
		t.Fatal(err)
	}
	defer app.Cleanup()

	users, err := app.FindCollectionByNameOrId("users")
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"iss", "sub", "roles", "groups"} {
		if users.Fields.GetByName(f) == nil {
			t.Errorf("users has no %q field", f)
		}
	}
	if users.GetIndex(migrations.UsersIdentityIndex) == "" {
		t.Error("users has no unique (iss, sub) index")
	}
	if users.CreateRule != nil || users.UpdateRule != nil || users.AuthRule != nil || users.PasswordAuth.Enabled {
		t.Error("users is not locked down (sign-up, self-update, token issue or password login allowed)")
	}

	notes, err := app.FindCollectionByNameOrId("notes")
	if err != nil {
		t.Fatal(err)
	}
	rule := func(r *string) string {
		if r == nil {
			return "<nil>"
		}
		return *r
	}
	if rule(notes.ListRule) != migrations.NotesOwnerRule || rule(notes.ViewRule) != migrations.NotesOwnerRule ||
		rule(notes.DeleteRule) != migrations.NotesOwnerRule || rule(notes.CreateRule) != migrations.NotesCreateRule ||
		rule(notes.UpdateRule) != migrations.NotesUpdateRule {
		t.Errorf("notes rules: list %q view %q create %q update %q delete %q", rule(notes.ListRule), rule(notes.ViewRule),
			rule(notes.CreateRule), rule(notes.UpdateRule), rule(notes.DeleteRule))
	}
	owner, ok := notes.Fields.GetByName("owner").(*core.RelationField)
	if !ok || !owner.Required || owner.MaxSelect != 1 || !owner.CascadeDelete || owner.CollectionId != users.Id {
		t.Errorf("notes.owner is not a required single cascading relation to users: %+v", owner)
	}

	// The unique index really refuses a second record for the same identity.
	for i := 0; i < 2; i++ {
		rec := core.NewRecord(users)
		rec.Set("iss", "https://kc/realms/r")
		rec.Set("sub", "same")
		rec.SetRandomPassword()
		err := app.Save(rec)
		if i == 0 && err != nil {
			t.Fatalf("first record: %v", err)
		}
		if i == 1 && err == nil {
			t.Error("a second record with the same (iss, sub) was saved")
		}
	}

	if _, err := core.NewMigrationsRunner(app, core.AppMigrations).Down(2); err != nil {
		t.Fatalf("down: %v", err)
	}
	if _, err := app.FindCollectionByNameOrId("notes"); err == nil {
		t.Error("notes still exists after down")
	}
	users, _ = app.FindCollectionByNameOrId("users")
	if users.Fields.GetByName("sub") != nil || users.CreateRule == nil || !users.PasswordAuth.Enabled {
		t.Error("users not restored to PocketBase's defaults after down")
	}
}
