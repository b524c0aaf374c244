// Package migrations holds the schema changes this integration needs: the Gatehouse identity
// fields on the built-in `users` auth collection and the example `notes` collection.
//
// They are Go migrations (registered on import) so that every start of the binary brings the
// database to the expected shape without a separate migration step.
package migrations

import (
	"github.com/pocketbase/pocketbase/core"
	m "github.com/pocketbase/pocketbase/migrations"
	"github.com/pocketbase/pocketbase/tools/types"
)

// UsersIdentityIndex is the unique index that makes (iss, sub) identify one user record. The
// middleware relies on it to resolve races between concurrent first requests of a user.
const UsersIdentityIndex = "idx_users_gatehouse_iss_sub"

func init() {
	m.Register(func(app core.App) error {
		users, err := app.FindCollectionByNameOrId("users")
		if err != nil {
			return err
		}

		users.Fields.Add(
			// Hidden from API responses: only the integration needs them, and a user has no
			// business seeing (or an attacker mapping) Keycloak's internal ids.
			&core.TextField{Name: "iss", Max: 512, Hidden: true},
			&core.TextField{Name: "sub", Max: 255, Hidden: true},
			// Visible to the user themself (the list/view rules only show one's own record) so a
			// front end can adapt its UI; API rules can use them as @request.auth.roles.
			&core.JSONField{Name: "roles", MaxSize: 64 << 10},
			&core.JSONField{Name: "groups", MaxSize: 64 << 10},
		)
		// Partial: records created by a superuser by hand have no iss/sub and must not collide.
		users.AddIndex(UsersIdentityIndex, true, "`iss`, `sub`", "`iss` != '' AND `sub` != ''")

		// Keycloak may have users without an e-mail, and on an e-mail collision the integration
		// stores the user without one rather than take over another record (see README).
		if email, ok := users.Fields.GetByName(core.FieldNameEmail).(*core.EmailField); ok {
			email.Required = false
		}

		// The only way in as a user is a Gatehouse session: no sign-up, no password, OTP, OAuth2
		// or MFA login, and no PocketBase-issued tokens (AuthRule nil refuses auth-refresh too).
		users.CreateRule = nil
		users.AuthRule = nil
		users.PasswordAuth.Enabled = false
		users.OTP.Enabled = false
		users.MFA.Enabled = false
		users.OAuth2.Enabled = false
		// Identity, e-mail, roles and groups come from Keycloak; a user editing their own record
		// could otherwise rewrite iss/sub and take over another user's future record.
		users.UpdateRule = nil
		users.DeleteRule = nil

		return app.Save(users)
	}, func(app core.App) error {
		users, err := app.FindCollectionByNameOrId("users")
		if err != nil {
			return err
		}

		users.RemoveIndex(UsersIdentityIndex)
		users.Fields.RemoveByName("iss")
		users.Fields.RemoveByName("sub")
		users.Fields.RemoveByName("roles")
		users.Fields.RemoveByName("groups")
		if email, ok := users.Fields.GetByName(core.FieldNameEmail).(*core.EmailField); ok {
			email.Required = true
		}

		// PocketBase's defaults for the users collection.
		ownerRule := "id = @request.auth.id"
		users.CreateRule = types.Pointer("")
		users.AuthRule = types.Pointer("")
		users.UpdateRule = types.Pointer(ownerRule)
		users.DeleteRule = types.Pointer(ownerRule)
		users.PasswordAuth.Enabled = true

		return app.Save(users)
	})
}
