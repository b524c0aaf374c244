package gatehouseauth

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"net/url"
	"os"
	"strings"
	"time"
)

// Environment variable names read by [ConfigFromEnv].
const (
	EnvExchangeURL  = "GATEHOUSE_EXCHANGE_URL"
	EnvClientCert   = "GATEHOUSE_CLIENT_CERT"
	EnvClientKey    = "GATEHOUSE_CLIENT_KEY"
	EnvCA           = "GATEHOUSE_CA"
	EnvServerName   = "GATEHOUSE_SERVER_NAME"
	EnvIssuer       = "GATEHOUSE_ISSUER"
	EnvJWKSURL      = "GATEHOUSE_JWKS_URL"
	EnvTimeout      = "GATEHOUSE_TIMEOUT"
	EnvCacheMaxAge  = "GATEHOUSE_CACHE_MAX_AGE"
	EnvTrustedPeers = "GATEHOUSE_TRUSTED_PEERS"
	EnvJWKSMaxStale = "GATEHOUSE_JWKS_MAX_STALE"
)

// Defaults.
const (
	DefaultExchangeURL     = "https://127.0.0.1:8443/internal/v1/session/exchange"
	DefaultTimeout         = 5 * time.Second
	DefaultCacheMaxAge     = 60 * time.Second
	DefaultCacheMaxEntries = 10000
	DefaultJWKSMinRefresh  = 30 * time.Second
	DefaultJWKSMaxAge      = 10 * time.Minute
	DefaultLeeway          = 10 * time.Second
	DefaultJWKSMaxStale    = 30 * time.Minute

	// MaxCacheMaxAge bounds how long a logout at Gatehouse can go unnoticed here.
	MaxCacheMaxAge = 60 * time.Second
)

// Config configures the integration. Zero durations and sizes take the defaults above.
type Config struct {
	// ExchangeURL is Gatehouse's internal session exchange endpoint (https only).
	ExchangeURL string
	// ClientCertFile and ClientKeyFile are this service's mTLS identity (PEM).
	ClientCertFile string
	ClientKeyFile  string
	// CAFile is the CA bundle that Gatehouse's server certificate must chain to (PEM). It is the
	// only trust anchor for the exchange: the system roots are not used.
	CAFile string
	// ServerName overrides the name checked in Gatehouse's certificate (default: URL host).
	ServerName string

	// Issuer is the Keycloak issuer every access token must carry in `iss`.
	Issuer string
	// JWKSURL defaults to Issuer + "/protocol/openid-connect/certs".
	JWKSURL string

	// Timeout bounds one call to Gatehouse or to the JWKS endpoint.
	Timeout time.Duration
	// CacheMaxAge is the longest an exchange result is reused (at most [MaxCacheMaxAge]).
	CacheMaxAge time.Duration
	// CacheMaxEntries bounds the memory the cache can take.
	CacheMaxEntries int
	// JWKSMinRefresh rate-limits refetching the key set when a token names an unknown key id.
	JWKSMinRefresh time.Duration
	// JWKSMaxAge is how long a fetched key set is used before it is refetched (so that a key
	// removed in Keycloak stops being accepted).
	JWKSMaxAge time.Duration
	// JWKSMaxStale is how long past JWKSMaxAge a cached key is still used while refetching the
	// key set keeps failing (Keycloak down). After that, tokens are refused with 503: a key
	// Keycloak may have revoked (rotated out after a compromise) must not verify tokens forever.
	JWKSMaxStale time.Duration
	// Leeway is the clock skew tolerated when checking the token's exp/nbf/iat.
	Leeway time.Duration

	// UsersCollection is the auth collection that holds Gatehouse users (default "users").
	UsersCollection string

	// TrustedPeers are the addresses Gatehouse's proxy connects from. A session header from any
	// other peer is refused before it costs an exchange: only Gatehouse relays sessions, and a
	// stranger spraying guesses would otherwise spend Gatehouse's rate limit for this service.
	// Default: loopback only.
	TrustedPeers []netip.Prefix
}

// ConfigFromEnv reads the configuration from the GATEHOUSE_* environment variables.
func ConfigFromEnv() (Config, error) {
	c := Config{
		ExchangeURL:    strings.TrimSpace(os.Getenv(EnvExchangeURL)),
		ClientCertFile: strings.TrimSpace(os.Getenv(EnvClientCert)),
		ClientKeyFile:  strings.TrimSpace(os.Getenv(EnvClientKey)),
		CAFile:         strings.TrimSpace(os.Getenv(EnvCA)),
		ServerName:     strings.TrimSpace(os.Getenv(EnvServerName)),
		Issuer:         strings.TrimSpace(os.Getenv(EnvIssuer)),
		JWKSURL:        strings.TrimSpace(os.Getenv(EnvJWKSURL)),
	}
	var errs []error
	for _, raw := range strings.Split(os.Getenv(EnvTrustedPeers), ",") {
		raw = strings.TrimSpace(raw)
		if raw == "" {
			continue
		}
		prefix, err := netip.ParsePrefix(raw)
		if err != nil {
			addr, aerr := netip.ParseAddr(raw)
			if aerr != nil {
				errs = append(errs, fmt.Errorf("%s: %q is neither an IP address nor a CIDR block", EnvTrustedPeers, raw))
				continue
			}
			prefix = netip.PrefixFrom(addr, addr.BitLen())
		}
		c.TrustedPeers = append(c.TrustedPeers, prefix.Masked())
	}
	for _, d := range []struct {
		env string
		dst *time.Duration
	}{{EnvTimeout, &c.Timeout}, {EnvCacheMaxAge, &c.CacheMaxAge}, {EnvJWKSMaxStale, &c.JWKSMaxStale}} {
		raw := strings.TrimSpace(os.Getenv(d.env))
		if raw == "" {
			continue
		}
		v, err := time.ParseDuration(raw)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %q is not a duration like 5s", d.env, raw))
			continue
		}
		*d.dst = v
	}
	if len(errs) > 0 {
		return c, errors.Join(errs...)
	}
	return c, nil
}

// withDefaults fills unset fields and checks everything that can be checked without I/O. All
// problems are reported at once so an operator can fix the configuration in one go.
func (c Config) withDefaults() (Config, error) {
	if c.ExchangeURL == "" {
		c.ExchangeURL = DefaultExchangeURL
	}
	if c.Timeout == 0 {
		c.Timeout = DefaultTimeout
	}
	if c.CacheMaxAge == 0 {
		c.CacheMaxAge = DefaultCacheMaxAge
	}
	if c.CacheMaxEntries == 0 {
		c.CacheMaxEntries = DefaultCacheMaxEntries
	}
	if c.JWKSMinRefresh == 0 {
		c.JWKSMinRefresh = DefaultJWKSMinRefresh
	}
	if c.JWKSMaxAge == 0 {
		c.JWKSMaxAge = DefaultJWKSMaxAge
	}
	if c.Leeway == 0 {
		c.Leeway = DefaultLeeway
	}
	if c.JWKSMaxStale == 0 {
		c.JWKSMaxStale = DefaultJWKSMaxStale
	}
	if c.UsersCollection == "" {
		c.UsersCollection = "users"
	}
	if len(c.TrustedPeers) == 0 {
		c.TrustedPeers = []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8"), netip.MustParsePrefix("::1/128")}
	}
	c.Issuer = strings.TrimRight(c.Issuer, "/")
	if c.JWKSURL == "" && c.Issuer != "" {
		c.JWKSURL = c.Issuer + "/protocol/openid-connect/certs"
	}

	var errs []error
	if u, err := url.Parse(c.ExchangeURL); err != nil || u.Scheme != "https" || u.Host == "" {
		// Plain http would send session ids and tokens in the clear and skip mTLS entirely.
		errs = append(errs, fmt.Errorf("%s must be an https:// URL, got %q", EnvExchangeURL, c.ExchangeURL))
	}
	if c.ClientCertFile == "" {
		errs = append(errs, fmt.Errorf("%s is required (client certificate for mTLS, PEM)", EnvClientCert))
	}
	if c.ClientKeyFile == "" {
		errs = append(errs, fmt.Errorf("%s is required (client certificate key, PEM)", EnvClientKey))
	}
	if c.CAFile == "" {
		errs = append(errs, fmt.Errorf("%s is required (CA that signed Gatehouse's certificate, PEM)", EnvCA))
	}
	if c.Issuer == "" {
		errs = append(errs, fmt.Errorf("%s is required (Keycloak issuer, e.g. http://localhost:18180/realms/gatehouse)", EnvIssuer))
	} else if err := checkKeycloakURL(c.Issuer); err != nil {
		errs = append(errs, fmt.Errorf("%s %w, got %q", EnvIssuer, err, c.Issuer))
	}
	if c.JWKSURL != "" {
		if err := checkKeycloakURL(c.JWKSURL); err != nil {
			errs = append(errs, fmt.Errorf("%s %w, got %q", EnvJWKSURL, err, c.JWKSURL))
		}
	}
	if c.JWKSMaxStale < 0 || c.JWKSMaxStale > 24*time.Hour {
		errs = append(errs, fmt.Errorf("%s must be between 0 and 24h, got %s", EnvJWKSMaxStale, c.JWKSMaxStale))
	}
	if c.Timeout < 0 || c.Timeout > time.Minute {
		errs = append(errs, fmt.Errorf("%s must be between 0 and 1m, got %s", EnvTimeout, c.Timeout))
	}
	if c.CacheMaxAge < 0 || c.CacheMaxAge > MaxCacheMaxAge {
		errs = append(errs, fmt.Errorf("%s must be between 0 and %s (logouts must reach PocketBase within a minute), got %s",
			EnvCacheMaxAge, MaxCacheMaxAge, c.CacheMaxAge))
	}
	if c.CacheMaxEntries < 0 {
		errs = append(errs, errors.New("CacheMaxEntries must not be negative"))
	}
	return c, errors.Join(errs...)
}

// checkKeycloakURL accepts https://, and plain http:// only on a loopback host (as Gatehouse does
// for its issuer): over plain http a network attacker could swap the key set and sign tokens of
// their own. The error completes "<VARIABLE> ...".
func checkKeycloakURL(raw string) error {
	u, err := url.Parse(raw)
	switch {
	case err != nil || u.Host == "" || (u.Scheme != "https" && u.Scheme != "http"):
		return errors.New("must be an http(s):// URL")
	case u.Scheme == "http" && !loopbackHost(u.Hostname()):
		return errors.New("must be https:// (plain http only on a loopback host such as localhost or 127.0.0.1)")
	}
	return nil
}

// loopbackHost: "localhost" or a loopback IP literal. Other names are not trusted to resolve to
// loopback.
func loopbackHost(host string) bool {
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// loadTLS builds the client TLS configuration for the exchange. Errors name the file and the
// environment variable so a start-up failure says exactly what to fix.
func (c Config) loadTLS() (*tls.Config, error) {
	cert, err := tls.LoadX509KeyPair(c.ClientCertFile, c.ClientKeyFile)
	if err != nil {
		return nil, fmt.Errorf("cannot load the client certificate (%s=%q, %s=%q): %w",
			EnvClientCert, c.ClientCertFile, EnvClientKey, c.ClientKeyFile, err)
	}
	caPEM, err := os.ReadFile(c.CAFile)
	if err != nil {
		return nil, fmt.Errorf("cannot read the CA bundle (%s=%q): %w", EnvCA, c.CAFile, err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("the CA bundle (%s=%q) holds no PEM certificate", EnvCA, c.CAFile)
	}
	return &tls.Config{
		MinVersion: tls.VersionTLS12,
		// Always present our certificate: with tls.Config.Certificates Go silently sends none
		// when the server's list of acceptable CAs does not match, which would turn a CA
		// mix-up into a confusing handshake failure instead of a clear refusal by Gatehouse.
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return &cert, nil
		},
		RootCAs:    pool,
		ServerName: c.ServerName, // empty: Go checks the URL host
	}, nil
}
