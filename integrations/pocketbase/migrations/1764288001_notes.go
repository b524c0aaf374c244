package migrations

import (
	"github.com/pocketbase/pocketbase/core"
	m "github.com/pocketbase/pocketbase/migrations"
	"github.com/pocketbase/pocketbase/tools/types"
)

// Rules of the notes collection. PocketBase applies ListRule/ViewRule to realtime events as
// well, so a subscriber only receives their own notes.
const (
	NotesOwnerRule  = "owner = @request.auth.id"
	NotesCreateRule = `@request.auth.id != "" && @request.body.owner = @request.auth.id`
	// The owner may not be changed to somebody else (moving a note into another user's list).
	NotesUpdateRule = `owner = @request.auth.id && (@request.body.owner:isset = false || @request.body.owner = @request.auth.id)`
)

func init() {
	m.Register(func(app core.App) error {
		users, err := app.FindCollectionByNameOrId("users")
		if err != nil {
			return err
		}

		notes := core.NewBaseCollection("notes")
		notes.ListRule = types.Pointer(NotesOwnerRule)
		notes.ViewRule = types.Pointer(NotesOwnerRule)
		notes.CreateRule = types.Pointer(NotesCreateRule)
		notes.UpdateRule = types.Pointer(NotesUpdateRule)
		notes.DeleteRule = types.Pointer(NotesOwnerRule)

		notes.Fields.Add(
			&core.RelationField{
				Name:          "owner",
				CollectionId:  users.Id,
				Required:      true,
				MaxSelect:     1,
				CascadeDelete: true,
			},
			&core.TextField{Name: "text", Required: true, Max: 2000},
			&core.AutodateField{Name: "created", OnCreate: true},
			&core.AutodateField{Name: "updated", OnCreate: true, OnUpdate: true},
		)
		// Every list query filters by owner.
		notes.AddIndex("idx_notes_owner", false, "`owner`", "")

		return app.Save(notes)
	}, func(app core.App) error {
		notes, err := app.FindCollectionByNameOrId("notes")
		if err != nil {
			return err
		}
		return app.Delete(notes)
	})
}
