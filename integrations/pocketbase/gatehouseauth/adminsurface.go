package gatehouseauth

// The admin surface that requests relayed by Gatehouse must never reach.
//
// Relayed requests come from browsers on Gatehouse's public origin. PocketBase's superuser login,
// its admin UI and its management APIs are for operators who reach PocketBase directly: from the
// public origin they would allow online guessing of superuser passwords and would put a superuser
// token into page script.
//
// The decision is made on what PocketBase itself will act on, not on the path's text:
//   - the route PocketBase's router matched (`e.Request.Pattern`), so no spelling of a
//     management path gets past (escapes, double slashes and dot segments are resolved by the
//     router before the pattern is chosen);
//   - the collection the route names, resolved the way PocketBase resolves it (by name without
//     regard to case, or by id), so `_SuperUsers` or `pbc_3142635823` are the superusers
//     collection just as `_superusers` is;
//   - the same for each sub-request of a batch, which PocketBase routes internally.

import (
	"database/sql"
	"errors"
	"net/url"
	"regexp"
	"strings"

	"github.com/pocketbase/pocketbase/core"
)

// adminRoutePrefixes are route patterns (without the method) that only superusers use.
var adminRoutePrefixes = []string{
	"/_/", // the admin UI (and UI extensions)
	"/api/settings",
	"/api/logs",
	"/api/backups",
	"/api/crons",
	"/api/sql",
}

// adminRoutes are the collection-management patterns under /api/collections (everything there
// except records, files and the auth actions of one collection).
var adminRoutes = map[string]bool{
	"/api/collections":                               true,
	"/api/collections/{collection}":                  true,
	"/api/collections/{collection}/truncate":         true,
	"/api/collections/import":                        true,
	"/api/collections/{collection}/impersonate/{id}": true,
}

// adminPattern reports whether a matched route pattern ("METHOD /path" or "/path") belongs to the
// admin surface.
func adminPattern(pattern string) bool {
	path := pattern
	if i := strings.IndexByte(pattern, ' '); i >= 0 {
		path = pattern[i+1:]
	}
	if path == "/_" || adminRoutes[path] || strings.HasPrefix(path, "/api/collections/meta/") {
		return true
	}
	for _, p := range adminRoutePrefixes {
		if path == strings.TrimSuffix(p, "/") || strings.HasPrefix(path, strings.TrimSuffix(p, "/")+"/") {
			return true
		}
	}
	return false
}

// privilegedCollection reports whether nameOrID resolves, as PocketBase resolves it, to the
// superusers collection or another system collection (MFA, OTP, auth origins, external auths):
// none of them is for browsers. A name that resolves to nothing is not privileged (PocketBase
// answers 404 by itself).
func privilegedCollection(app core.App, nameOrID string) bool {
	if nameOrID == "" {
		return false
	}
	c, err := app.FindCachedCollectionByNameOrId(nameOrID)
	if err != nil || c == nil {
		// Not found is PocketBase's own 404. Any other error: refuse rather than guess.
		return err != nil && !isNotFound(err)
	}
	return c.Name == core.CollectionNameSuperusers || c.System
}

// adminRequest reports whether a relayed request must be refused: its route is admin-only, or
// the collection it names is privileged.
func adminRequest(e *core.RequestEvent) bool {
	if adminPattern(e.Request.Pattern) {
		return true
	}
	// Every PocketBase route that acts on a collection names it in the {collection} wildcard
	// (records, auth actions, files); the router has already unescaped it.
	if privilegedCollection(e.App, e.Request.PathValue("collection")) {
		return true
	}
	// Belt and braces for the case a route is added that the pattern check does not know yet:
	// the admin UI's path, whatever its case.
	p := strings.ToLower(e.Request.URL.Path)
	return p == "/_" || strings.HasPrefix(p, "/_/")
}

// batchCollection extracts the collection segment from a batch sub-request URL, as PocketBase's
// batch router does (`/api/collections/{collection}/records...`).
var batchCollection = regexp.MustCompile(`^/api/collections/([^/?]+)/`)

// adminBatch reports whether any sub-request of a batch targets a privileged collection or is
// not a records action at all.
func adminBatch(app core.App, batch []*core.InternalRequest) bool {
	for _, ir := range batch {
		if ir == nil {
			continue
		}
		raw := ir.URL
		m := batchCollection.FindStringSubmatch(raw)
		if m == nil {
			// PocketBase only runs records actions in a batch; anything else it refuses itself.
			continue
		}
		name := m[1]
		if privilegedCollection(app, name) {
			return true
		}
		if unescaped, err := url.PathUnescape(name); err == nil && unescaped != name && privilegedCollection(app, unescaped) {
			return true
		}
	}
	return false
}

func isNotFound(err error) bool { return errors.Is(err, sql.ErrNoRows) }
