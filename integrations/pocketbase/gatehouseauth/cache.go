package gatehouseauth

import (
	"crypto/sha256"
	"encoding/hex"
	"sync"
	"time"
)

// sessionKey is SHA-256 of a session id. The cache, the single-flight group and the logs see only
// this, so a heap dump or a log line cannot be replayed as a session.
type sessionKey [sha256.Size]byte

func keyOf(sessionID string) sessionKey { return sha256.Sum256([]byte(sessionID)) }

// prefix is the correlation id for logs: the first 8 hex characters of the hash, the same form
// Gatehouse's own audit lines use.
func (k sessionKey) prefix() string { return hex.EncodeToString(k[:4]) }

// Identity is a verified user as Gatehouse and Keycloak describe them.
type Identity struct {
	Issuer            string
	Subject           string
	Email             string
	EmailVerified     bool
	Name              string
	PreferredUsername string
	// Roles holds the realm roles as-is and client roles as "client-id:role", sorted.
	Roles []string
	// Groups holds Keycloak group paths, sorted.
	Groups []string
}

type cacheEntry struct {
	identity *Identity
	until    time.Time
}

// identityCache maps session keys to verified identities for a short time. It only ever holds
// successes: a refused or failed lookup is retried on the next request.
type identityCache struct {
	mu         sync.Mutex
	entries    map[sessionKey]cacheEntry
	maxEntries int
}

func newIdentityCache(maxEntries int) *identityCache {
	return &identityCache{entries: make(map[sessionKey]cacheEntry), maxEntries: maxEntries}
}

func (c *identityCache) get(k sessionKey, now time.Time) *Identity {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.entries[k]
	if !ok {
		return nil
	}
	if !now.Before(e.until) {
		delete(c.entries, k)
		return nil
	}
	return e.identity
}

func (c *identityCache) put(k sessionKey, id *Identity, until, now time.Time) {
	if c.maxEntries <= 0 || !now.Before(until) {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, exists := c.entries[k]; !exists && len(c.entries) >= c.maxEntries {
		// Drop expired entries first; if the cache is still full of live ones, drop arbitrary
		// ones (Go's map order is random): a miss only costs one more exchange.
		for key, e := range c.entries {
			if !now.Before(e.until) {
				delete(c.entries, key)
			}
		}
		for key := range c.entries {
			if len(c.entries) < c.maxEntries {
				break
			}
			delete(c.entries, key)
		}
	}
	c.entries[k] = cacheEntry{identity: id, until: until}
}

func (c *identityCache) len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.entries)
}
