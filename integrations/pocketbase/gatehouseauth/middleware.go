// Package gatehouseauth makes PocketBase trust Gatehouse sessions.
//
// Gatehouse proxies browser requests to PocketBase with the header X-Gatehouse-Session. The
// middleware exchanges that session id at Gatehouse's internal endpoint (mutual TLS), verifies
// the returned Keycloak access token against Keycloak's JWKS, finds or creates the matching
// `users` record and sets it as the request's auth record, so PocketBase's own API rules decide
// what the user may do. Requests without the header are left to PocketBase as they are.
package gatehouseauth

import (
	"context"
	"errors"
	"log/slog"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/pocketbase/pocketbase/apis"
	"github.com/pocketbase/pocketbase/core"
	"github.com/pocketbase/pocketbase/tools/hook"
	"github.com/pocketbase/pocketbase/tools/router"
	"golang.org/x/sync/singleflight"
)

// HeaderSession carries the browser's opaque Gatehouse session id, set by Gatehouse's proxy.
const HeaderSession = "X-Gatehouse-Session"

// Middleware ids and priorities. The session middleware runs after PocketBase's activity logger
// and panic recovery (so its failures are logged and a panic cannot kill the server) and before
// loadAuthToken (-1020), which then sees e.Auth already set and leaves it alone. The guard runs
// right after loadAuthToken.
const (
	MiddlewareID       = "gatehouseSession"
	MiddlewarePriority = apis.DefaultLoadAuthTokenMiddlewarePriority - 5

	GuardMiddlewareID       = "gatehouseUserTokenGuard"
	GuardMiddlewarePriority = apis.DefaultLoadAuthTokenMiddlewarePriority + 1
)

// maxSessionIDLen: Gatehouse's ids are 43 characters; anything much longer is not one of them
// and is refused before it costs an exchange.
const maxSessionIDLen = 256

// tokenExpirySkew: a cached identity is dropped this long before its access token expires, so
// we never act on a token that expires mid-request.
const tokenExpirySkew = 30 * time.Second

// Request and realtime-client store keys.
const (
	storeKeyViaSession    = "gatehouseViaSession" // bool: e.Auth came from a Gatehouse session
	clientKeySessionKeyed = "gatehouseSessionKey" // sessionKey of the SSE connection's session
)

// Gatehouse is the configured integration. Create it with [New] and attach it with
// [Gatehouse.Register].
type Gatehouse struct {
	cfg      Config
	exchange *exchangeClient
	verifier *tokenVerifier
	cache    *identityCache
	users    *userSync
	flight   singleflight.Group
	now      func() time.Time
	app      core.App // set by Register, for logging outside a request
}

// New validates cfg, loads the certificates and returns the integration. It does no network I/O,
// so PocketBase can start while Gatehouse or Keycloak are still coming up.
func New(cfg Config) (*Gatehouse, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	tlsConf, err := cfg.loadTLS()
	if err != nil {
		return nil, err
	}
	now := time.Now
	jwks := newJWKSCache(cfg.JWKSURL, cfg.Timeout, cfg.JWKSMinRefresh, cfg.JWKSMaxAge, cfg.JWKSMaxStale, now)
	return &Gatehouse{
		cfg:      cfg,
		exchange: newExchangeClient(cfg.ExchangeURL, tlsConf, cfg.Timeout),
		verifier: newTokenVerifier(cfg.Issuer, jwks, cfg.Leeway, now),
		cache:    newIdentityCache(cfg.CacheMaxEntries),
		users:    &userSync{collection: cfg.UsersCollection},
		now:      now,
	}, nil
}

// Config returns the effective configuration (with defaults filled in).
func (g *Gatehouse) Config() Config { return g.cfg }

// Register attaches the middlewares to the app's router and the realtime hooks.
func (g *Gatehouse) Register(app core.App) {
	g.app = app
	app.OnServe().Bind(&hook.Handler[*core.ServeEvent]{
		Id: "gatehouseRegister",
		Func: func(se *core.ServeEvent) error {
			se.Router.Bind(TracingMiddleware(), g.Middleware(), g.UserTokenGuard())
			return se.Next()
		},
	})
	app.OnBatchRequest().Bind(&hook.Handler[*core.BatchRequestEvent]{
		Id:   "gatehouseBatch",
		Func: g.onBatch,
	})
	app.OnRealtimeConnectRequest().Bind(&hook.Handler[*core.RealtimeConnectRequestEvent]{
		Id:   "gatehouseRealtimeConnect",
		Func: g.onRealtimeConnect,
	})
	app.OnRealtimeSubscribeRequest().Bind(&hook.Handler[*core.RealtimeSubscribeRequestEvent]{
		Id:   "gatehouseRealtimeSubscribe",
		Func: g.onRealtimeSubscribe,
	})
	app.OnRealtimeMessageSend().Bind(&hook.Handler[*core.RealtimeMessageEvent]{
		Id:   "gatehouseRealtimeMessage",
		Func: g.onRealtimeMessage,
	})
}

// Middleware returns the router middleware that authenticates X-Gatehouse-Session requests.
func (g *Gatehouse) Middleware() *hook.Handler[*core.RequestEvent] {
	return &hook.Handler[*core.RequestEvent]{
		Id:       MiddlewareID,
		Priority: MiddlewarePriority,
		Func:     g.handle,
	}
}

// UserTokenGuard returns the middleware that refuses PocketBase-issued tokens for the users
// collection: a user is who their Gatehouse session says, and a PocketBase token would outlive a
// logout at Gatehouse. Such a request continues as anonymous, like one with an invalid token in
// plain PocketBase. Superusers (the admin UI) keep using PocketBase tokens.
func (g *Gatehouse) UserTokenGuard() *hook.Handler[*core.RequestEvent] {
	return &hook.Handler[*core.RequestEvent]{
		Id:       GuardMiddlewareID,
		Priority: GuardMiddlewarePriority,
		Func: func(e *core.RequestEvent) error {
			if e.Auth != nil && e.Get(storeKeyViaSession) != true && e.Auth.Collection().Name == g.cfg.UsersCollection {
				logf(e.App, slog.LevelDebug, "gatehouse: ignoring a PocketBase token for the users collection")
				e.Auth = nil
			}
			return e.Next()
		},
	}
}

func (g *Gatehouse) handle(e *core.RequestEvent) error {
	values := e.Request.Header.Values(HeaderSession)
	if len(values) == 0 {
		return e.Next()
	}

	// From here on the session alone decides who this is: PocketBase's own token auth must not
	// add to it or stand in for it when the session is refused.
	e.Request.Header.Del("Authorization")
	e.Auth = nil

	if !g.trustedPeer(e.Request.RemoteAddr) {
		logf(e.App, slog.LevelWarn, "gatehouse: session header from a peer not in GATEHOUSE_TRUSTED_PEERS", "peer", e.Request.RemoteAddr)
		return e.ForbiddenError("Gatehouse sessions are accepted only from Gatehouse.", nil)
	}
	// Requests relayed by Gatehouse come from browsers: PocketBase's superuser login and admin UI
	// are not for them (password guessing from the public origin, a superuser token in page script).
	// The route and collection are resolved the way PocketBase resolves them (see adminsurface.go).
	if adminRequest(e) {
		logf(e.App, slog.LevelInfo, "gatehouse: relayed request to the admin surface refused", "route", e.Request.Pattern)
		return e.NotFoundError("", nil)
	}

	if len(values) != 1 || !validSessionID(values[0]) {
		logf(e.App, slog.LevelInfo, "gatehouse: malformed session header", "count", len(values))
		return e.UnauthorizedError("Invalid Gatehouse session.", nil)
	}
	sessionID := values[0]

	id, key, err := g.identity(e.Request.Context(), sessionID)
	if err != nil {
		return g.refusal(e, key, err)
	}

	rec, err := g.users.ensure(e.App, id)
	if err != nil {
		logf(e.App, slog.LevelError, "gatehouse: cannot find or create the user record", "session", key.prefix(), "error", err.Error())
		return e.InternalServerError("", nil)
	}

	e.Auth = rec
	e.Set(storeKeyViaSession, true)
	return e.Next()
}

// trustedPeer reports whether the TCP peer is one Gatehouse connects from.
func (g *Gatehouse) trustedPeer(remoteAddr string) bool {
	ap, err := netip.ParseAddrPort(remoteAddr)
	if err != nil {
		return false
	}
	addr := ap.Addr().Unmap()
	return slices.ContainsFunc(g.cfg.TrustedPeers, func(p netip.Prefix) bool { return p.Contains(addr) })
}

// refusal logs a failed lookup (without secrets) and returns the PocketBase-shaped API error.
func (g *Gatehouse) refusal(e *core.RequestEvent, key sessionKey, err error) error {
	app := e.App
	switch {
	case errors.Is(err, ErrInvalidSession):
		logf(app, slog.LevelInfo, "gatehouse: session refused by Gatehouse", "session", key.prefix())
		return e.UnauthorizedError("The Gatehouse session is invalid or has expired.", nil)
	case errors.Is(err, ErrInvalidToken):
		// Gatehouse vouched for the session but the token fails our checks: a misconfiguration
		// (wrong issuer) or something worse. Worth a warning either way.
		logf(app, slog.LevelWarn, "gatehouse: access token rejected", "session", key.prefix(), "error", err.Error())
		return e.UnauthorizedError("The Gatehouse session is invalid or has expired.", nil)
	default:
		logf(app, slog.LevelError, "gatehouse: cannot verify the session", "session", key.prefix(), "error", err.Error())
		return router.NewApiError(http.StatusServiceUnavailable,
			"The authentication service is temporarily unavailable. Please try again.", nil)
	}
}

// identity returns the verified identity for a session id, from the cache or by exchange.
func (g *Gatehouse) identity(ctx context.Context, sessionID string) (*Identity, sessionKey, error) {
	key := keyOf(sessionID)
	if id := g.cache.get(key, g.now()); id != nil {
		return id, key, nil
	}
	v, err, _ := g.flight.Do(string(key[:]), func() (any, error) {
		if id := g.cache.get(key, g.now()); id != nil {
			return id, nil
		}
		// Detached from the request: other requests of the same session may be waiting on this
		// flight, and one client hanging up must not fail them all. Exchange plus a possible
		// JWKS fetch each get the configured timeout.
		ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*g.cfg.Timeout)
		defer cancel()
		return g.lookup(ctx, key, sessionID)
	})
	if err != nil {
		return nil, key, err
	}
	return v.(*Identity), key, nil
}

// lookup exchanges the session at Gatehouse, verifies the token and caches the result.
func (g *Gatehouse) lookup(ctx context.Context, key sessionKey, sessionID string) (*Identity, error) {
	res, err := g.exchange.exchange(ctx, sessionID)
	if err != nil {
		return nil, err
	}
	if res.Claims.Iss != "" && res.Claims.Iss != g.cfg.Issuer {
		return nil, errors.Join(ErrInvalidToken, errors.New("the session's issuer is not the configured issuer"))
	}
	tokenExp, signed, err := g.verifier.verify(ctx, res.AccessToken, res.Claims.Sub)
	if err != nil {
		return nil, err
	}
	// The identity comes from the verified token only. The exchange answer's claims are not
	// signed: a Gatehouse bug, a stale copy from login time or a compromised Gatehouse must not
	// be able to add a role or claim someone's e-mail. Where they disagree the token wins, and
	// the disagreement is logged (claim names only, never values).
	id := identityFrom(g.cfg.Issuer, signed)
	if differs := differingClaims(identityFrom(g.cfg.Issuer, &res.Claims), id); len(differs) > 0 {
		logf(g.app, slog.LevelWarn, "gatehouse: the exchange's claims differ from the access token's; using the token's",
			"session", key.prefix(), "claims", strings.Join(differs, ","))
	}

	now := g.now()
	until := now.Add(g.cfg.CacheMaxAge)
	for _, t := range []time.Time{
		unixTime(res.ExpiresAt).Add(-tokenExpirySkew),
		tokenExp.Add(-tokenExpirySkew),
		unixTime(res.Session.ExpiresAt),
		unixTime(res.Session.IdleExpiresAt),
	} {
		if !t.IsZero() && t.Before(until) {
			until = t
		}
	}
	// A token about to expire is still good for this request, just not worth caching.
	g.cache.put(key, id, until, now)
	return id, nil
}

func unixTime(sec int64) time.Time {
	if sec <= 0 {
		return time.Time{}
	}
	return time.Unix(sec, 0)
}

func identityFrom(issuer string, c *exchangeClaims) *Identity {
	id := &Identity{Issuer: issuer, Subject: c.Sub}
	if c.Email != nil {
		id.Email = *c.Email
	}
	if c.EmailVerified != nil {
		id.EmailVerified = *c.EmailVerified
	}
	if c.Name != nil {
		id.Name = *c.Name
	}
	if c.PreferredUsername != nil {
		id.PreferredUsername = *c.PreferredUsername
	}
	roles := slices.Clone(c.RealmRoles)
	for client, rs := range c.ClientRoles {
		for _, r := range rs {
			if client != "" && r != "" {
				roles = append(roles, client+":"+r)
			}
		}
	}
	id.Roles = sortedUnique(roles)
	id.Groups = sortedUnique(slices.Clone(c.Groups))
	return id
}

// differingClaims names the identity fields in which two identities differ.
func differingClaims(a, b *Identity) []string {
	var out []string
	if a.Email != b.Email {
		out = append(out, "email")
	}
	if a.EmailVerified != b.EmailVerified {
		out = append(out, "email_verified")
	}
	if a.Name != b.Name {
		out = append(out, "name")
	}
	if a.PreferredUsername != b.PreferredUsername {
		out = append(out, "preferred_username")
	}
	if !slices.Equal(a.Roles, b.Roles) {
		out = append(out, "roles")
	}
	if !slices.Equal(a.Groups, b.Groups) {
		out = append(out, "groups")
	}
	return out
}

// sortedUnique gives a stable order, so an unchanged role set never looks changed and causes a
// write.
func sortedUnique(s []string) []string {
	s = slices.DeleteFunc(s, func(v string) bool { return v == "" })
	slices.Sort(s)
	return slices.Compact(s)
}

// validSessionID accepts 1..256 base64url characters (optionally '='-padded), the alphabet of
// Gatehouse's ids. Anything else cannot be a session and is refused without an exchange.
func validSessionID(s string) bool {
	if s == "" || len(s) > maxSessionIDLen {
		return false
	}
	padding := false
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == '=':
			padding = true
		case padding:
			return false // data after padding
		case c >= 'A' && c <= 'Z', c >= 'a' && c <= 'z', c >= '0' && c <= '9', c == '-', c == '_':
		default:
			return false
		}
	}
	return s[0] != '='
}

// onRealtimeConnect remembers which session opened an SSE connection (by hash only), so that
// subscriptions can be tied to it and its messages re-checked.
func (g *Gatehouse) onRealtimeConnect(e *core.RealtimeConnectRequestEvent) error {
	if e.RequestEvent.Get(storeKeyViaSession) == true {
		e.Client.Set(clientKeySessionKeyed, keyOf(e.Request.Header.Get(HeaderSession)))
	}
	return e.Next()
}

// onRealtimeSubscribe refuses to attach a session's auth to an SSE connection opened without that
// same session: otherwise the connection would keep receiving the user's records after logout,
// since only a connection carrying the session can be re-checked (onRealtimeMessage).
func (g *Gatehouse) onRealtimeSubscribe(e *core.RealtimeSubscribeRequestEvent) error {
	if e.RequestEvent.Get(storeKeyViaSession) == true {
		connKey, _ := e.Client.Get(clientKeySessionKeyed).(sessionKey)
		if connKey != keyOf(e.Request.Header.Get(HeaderSession)) {
			return e.ForbiddenError("The realtime connection was not opened with this Gatehouse session.", nil)
		}
		// Topics are "collection/*" or "collection/recordId"; PocketBase's rules would refuse a
		// privileged collection's events anyway, this keeps such topics out altogether.
		for _, topic := range e.Subscriptions {
			name, _, _ := strings.Cut(topic, "/")
			if privilegedCollection(e.App, name) {
				return e.ForbiddenError("This subscription is not allowed through Gatehouse.", nil)
			}
		}
	}
	return e.Next()
}

// onBatch refuses a relayed batch that has a sub-request for a privileged collection: PocketBase
// routes batch sub-requests internally, past the router middleware's checks.
func (g *Gatehouse) onBatch(e *core.BatchRequestEvent) error {
	if e.RequestEvent.Get(storeKeyViaSession) == true && adminBatch(e.App, e.Batch) {
		logf(e.App, slog.LevelInfo, "gatehouse: relayed batch touching a privileged collection refused")
		return e.NotFoundError("", nil)
	}
	return e.Next()
}

// onRealtimeMessage re-checks the session of an SSE connection before each message, so a logout
// at Gatehouse stops delivery within the cache lifetime (at most a minute) instead of when the
// connection times out. On any failure the message is not sent and the connection is closed;
// the client reconnects and gets a proper 401 or 503.
func (g *Gatehouse) onRealtimeMessage(e *core.RealtimeMessageEvent) error {
	key, ok := e.Client.Get(clientKeySessionKeyed).(sessionKey)
	if !ok {
		return e.Next()
	}
	sessionID := e.Request.Header.Get(HeaderSession)
	if keyOf(sessionID) != key {
		return errors.New("gatehouse: realtime connection lost its session")
	}
	if _, _, err := g.identity(e.Request.Context(), sessionID); err != nil {
		logf(e.App, slog.LevelInfo, "gatehouse: closing realtime connection, session no longer verifiable",
			"session", key.prefix(), "error", err.Error())
		return err
	}
	return e.Next()
}
