package gatehouseauth

import (
	"context"
	"crypto/rsa"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"golang.org/x/sync/singleflight"
)

// maxJWKSResponse bounds the key set we read; Keycloak's is a few KiB.
const maxJWKSResponse = 1 << 20

// errUnknownKey: the token names a key id that the (fresh enough) key set does not have.
var errUnknownKey = errors.New("token signed with an unknown key")

// jwksCache holds Keycloak's RS256 signing keys by key id.
//
// The set is refetched when it is older than maxAge (so a key removed in Keycloak stops being
// accepted) and when a token names an unknown kid (key rotation), the latter at most once per
// minRefresh so that tokens with random kids cannot make us hammer Keycloak. While refetching
// fails, a cached key keeps working for at most maxStale past maxAge.
type jwksCache struct {
	url        string
	client     *http.Client
	minRefresh time.Duration
	maxAge     time.Duration
	maxStale   time.Duration
	now        func() time.Time

	mu        sync.Mutex
	keys      map[string]*rsa.PublicKey
	fetchedAt time.Time // last successful fetch
	triedAt   time.Time // last attempt, successful or not
	lastErr   error     // outcome of the last attempt

	flight singleflight.Group
}

func newJWKSCache(url string, timeout, minRefresh, maxAge, maxStale time.Duration, now func() time.Time) *jwksCache {
	transport := http.DefaultTransport.(*http.Transport).Clone()
	// Never through an HTTP(S)_PROXY from the environment: whoever runs that proxy could hand us
	// keys of their own (plain http) or see which Keycloak we trust. The key set is fetched
	// directly, like the exchange.
	transport.Proxy = nil
	return &jwksCache{
		url: url,
		client: &http.Client{Transport: transport, Timeout: timeout,
			// Never follow a redirect: a 307 would re-send the session id (or fetch keys) elsewhere.
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }},
		minRefresh: minRefresh,
		maxAge:     maxAge,
		maxStale:   maxStale,
		now:        now,
	}
}

// failedFetchRetry spaces out fetch attempts while there is no usable key set (Keycloak down),
// so that a burst of requests does not become a burst of fetches.
const failedFetchRetry = time.Second

// key returns the public key for kid. Errors wrap ErrUnavailable when no key set could be
// fetched (Keycloak down: 503), or are errUnknownKey (the token is bad: 401).
func (j *jwksCache) key(ctx context.Context, kid string) (*rsa.PublicKey, error) {
	j.mu.Lock()
	k := j.keys[kid]
	age := j.now().Sub(j.fetchedAt)
	fresh := j.keys != nil && age < j.maxAge
	j.mu.Unlock()
	if k != nil && fresh {
		return k, nil
	}

	// Coalesce concurrent refreshes into one fetch.
	_, err, _ := j.flight.Do("refresh", func() (any, error) { return nil, j.refresh(ctx) })
	if err != nil {
		// A stale set that still has the key is used when the refresh fails: the key was
		// valid minutes ago, and refusing every user because Keycloak blipped helps nobody.
		// But only for maxStale: a key Keycloak has since removed (rotated out after a leak)
		// must not keep verifying tokens for as long as Keycloak stays unreachable.
		if k != nil && age < j.maxAge+j.maxStale {
			return k, nil
		}
		return nil, err
	}

	j.mu.Lock()
	k = j.keys[kid]
	j.mu.Unlock()
	if k == nil {
		return nil, errUnknownKey
	}
	return k, nil
}

// refresh fetches the key set unless an attempt was made very recently, in which case that
// attempt's outcome stands. With a fresh set the gap is minRefresh (the unknown-kid rate limit);
// without one it is failedFetchRetry.
func (j *jwksCache) refresh(ctx context.Context) error {
	j.mu.Lock()
	now := j.now()
	fresh := j.keys != nil && now.Sub(j.fetchedAt) < j.maxAge
	gap := j.minRefresh
	if !fresh {
		gap = failedFetchRetry
	}
	if !j.triedAt.IsZero() && now.Sub(j.triedAt) < gap {
		err := j.lastErr
		j.mu.Unlock()
		return err
	}
	j.triedAt = now
	j.mu.Unlock()

	keys, err := j.fetch(ctx)

	j.mu.Lock()
	defer j.mu.Unlock()
	if err != nil {
		j.lastErr = fmt.Errorf("%w: fetch JWKS from %s: %v", ErrUnavailable, j.url, err)
		return j.lastErr
	}
	j.keys = keys
	j.fetchedAt = j.now()
	j.lastErr = nil
	return nil
}

type jwk struct {
	Kty string `json:"kty"`
	Kid string `json:"kid"`
	Use string `json:"use"`
	Alg string `json:"alg"`
	N   string `json:"n"`
	E   string `json:"e"`
}

func (j *jwksCache) fetch(ctx context.Context) (map[string]*rsa.PublicKey, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, j.url, nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Accept", "application/json")
	res, err := j.client.Do(req)
	if err != nil {
		return nil, err
	}
	defer res.Body.Close()
	if res.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("status %d", res.StatusCode)
	}
	raw, err := io.ReadAll(io.LimitReader(res.Body, maxJWKSResponse))
	if err != nil {
		return nil, err
	}
	var set struct {
		Keys []jwk `json:"keys"`
	}
	if err := json.Unmarshal(raw, &set); err != nil {
		return nil, fmt.Errorf("decode: %v", err)
	}
	keys := make(map[string]*rsa.PublicKey)
	for _, k := range set.Keys {
		// Keycloak publishes an RSA-OAEP encryption key next to the signing key; it must never
		// verify a signature. Only RS256 (or unspecified alg) RSA signing keys are kept.
		if k.Kty != "RSA" || k.Kid == "" || (k.Use != "" && k.Use != "sig") || (k.Alg != "" && k.Alg != "RS256") {
			continue
		}
		pub, err := rsaKey(k.N, k.E)
		if err != nil {
			continue
		}
		keys[k.Kid] = pub
	}
	if len(keys) == 0 {
		return nil, errors.New("no usable RS256 signing key in the key set")
	}
	return keys, nil
}

func rsaKey(n64, e64 string) (*rsa.PublicKey, error) {
	nb, err := base64.RawURLEncoding.DecodeString(strings.TrimRight(n64, "="))
	if err != nil {
		return nil, err
	}
	eb, err := base64.RawURLEncoding.DecodeString(strings.TrimRight(e64, "="))
	if err != nil {
		return nil, err
	}
	if len(eb) == 0 || len(eb) > 4 {
		return nil, errors.New("bad exponent")
	}
	e := 0
	for _, b := range eb {
		e = e<<8 | int(b)
	}
	n := new(big.Int).SetBytes(nb)
	// Short RSA keys are forgeable; Keycloak's are 2048 bits or more.
	if n.BitLen() < 2048 || e < 3 || e%2 == 0 {
		return nil, errors.New("weak or malformed RSA key")
	}
	return &rsa.PublicKey{N: n, E: e}, nil
}

// accessClaims are the parts of Keycloak's access token we check and the identity we take from
// it. The identity claims are kept raw and decoded leniently (identityClaims): a claim of an
// unexpected type counts as absent rather than failing every login.
type accessClaims struct {
	jwt.RegisteredClaims
	Typ               string          `json:"typ"`
	Email             json.RawMessage `json:"email"`
	EmailVerified     json.RawMessage `json:"email_verified"`
	Name              json.RawMessage `json:"name"`
	PreferredUsername json.RawMessage `json:"preferred_username"`
	RealmAccess       json.RawMessage `json:"realm_access"`
	ResourceAccess    json.RawMessage `json:"resource_access"`
	Groups            json.RawMessage `json:"groups"`
}

// identityClaims turns the signed claims into the exchange's claim shape, so that the identity
// stored on the user comes from what Keycloak signed, not from the exchange answer's unsigned
// copy: Keycloak's `realm_access.roles` become realm roles, `resource_access.<client>.roles`
// client roles.
func (c *accessClaims) identityClaims() *exchangeClaims {
	out := &exchangeClaims{Iss: c.Issuer, Sub: c.Subject}
	var s string
	if json.Unmarshal(c.Email, &s) == nil && s != "" {
		out.Email = &s
	}
	var b bool
	if json.Unmarshal(c.EmailVerified, &b) == nil {
		out.EmailVerified = &b
	}
	var name, username string
	if json.Unmarshal(c.Name, &name) == nil && name != "" {
		out.Name = &name
	}
	if json.Unmarshal(c.PreferredUsername, &username) == nil && username != "" {
		out.PreferredUsername = &username
	}
	var realm struct {
		Roles []string `json:"roles"`
	}
	if json.Unmarshal(c.RealmAccess, &realm) == nil {
		out.RealmRoles = realm.Roles
	}
	var resource map[string]struct {
		Roles []string `json:"roles"`
	}
	if json.Unmarshal(c.ResourceAccess, &resource) == nil && len(resource) > 0 {
		out.ClientRoles = make(map[string][]string, len(resource))
		for client, r := range resource {
			out.ClientRoles[client] = r.Roles
		}
	}
	var groups []string
	if json.Unmarshal(c.Groups, &groups) == nil {
		out.Groups = groups
	}
	return out
}

// tokenVerifier checks the access token Gatehouse hands us, as defence in depth: even a
// compromised or misconfigured Gatehouse cannot make us accept a token Keycloak did not sign for
// our realm.
type tokenVerifier struct {
	issuer string
	jwks   *jwksCache
	parser *jwt.Parser
}

func newTokenVerifier(issuer string, jwks *jwksCache, leeway time.Duration, now func() time.Time) *tokenVerifier {
	return &tokenVerifier{
		issuer: issuer,
		jwks:   jwks,
		parser: jwt.NewParser(
			// Only RS256: this rules out alg "none" and the HS* key-confusion attack.
			jwt.WithValidMethods([]string{jwt.SigningMethodRS256.Alg()}),
			jwt.WithIssuer(issuer),
			jwt.WithExpirationRequired(),
			jwt.WithLeeway(leeway),
			jwt.WithTimeFunc(now),
		),
	}
}

// verify checks signature, issuer, expiry and that the token's subject is the one Gatehouse
// reported. It returns the token's expiry and its identity claims.
func (v *tokenVerifier) verify(ctx context.Context, token, wantSub string) (time.Time, *exchangeClaims, error) {
	var claims accessClaims
	_, err := v.parser.ParseWithClaims(token, &claims, func(t *jwt.Token) (any, error) {
		kid, _ := t.Header["kid"].(string)
		if kid == "" {
			return nil, errors.New("token has no kid")
		}
		return v.jwks.key(ctx, kid)
	})
	if err != nil {
		if errors.Is(err, ErrUnavailable) {
			return time.Time{}, nil, err
		}
		// golang-jwt's messages name the failed check, never the token itself.
		return time.Time{}, nil, fmt.Errorf("%w: %v", ErrInvalidToken, err)
	}
	if claims.Subject == "" || claims.Subject != wantSub {
		return time.Time{}, nil, fmt.Errorf("%w: token sub does not match the session's sub", ErrInvalidToken)
	}
	// Keycloak marks access tokens typ "Bearer"; an ID or refresh token must not pass as one.
	if claims.Typ != "" && !strings.EqualFold(claims.Typ, "Bearer") {
		return time.Time{}, nil, fmt.Errorf("%w: token typ %.20q is not Bearer", ErrInvalidToken, claims.Typ)
	}
	return claims.ExpiresAt.Time, claims.identityClaims(), nil
}
