package gatehouseauth

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
)

// Errors of the identity lookup. The middleware maps ErrInvalidSession and ErrInvalidToken to
// 401 and ErrUnavailable to 503; the wrapped detail is for the log only and never carries a
// session id or token.
var (
	// ErrInvalidSession: Gatehouse says the session is unknown, expired or revoked.
	ErrInvalidSession = errors.New("invalid session")
	// ErrInvalidToken: Gatehouse answered, but the access token failed our own checks.
	ErrInvalidToken = errors.New("invalid access token")
	// ErrUnavailable: Gatehouse or Keycloak's key set could not give a usable answer.
	ErrUnavailable = errors.New("identity service unavailable")
)

// maxExchangeResponse bounds what we read from Gatehouse; a real answer is a few KiB.
const maxExchangeResponse = 256 << 10

// exchangeResponse is the 200 answer of POST /internal/v1/session/exchange.
type exchangeResponse struct {
	AccessToken string         `json:"access_token"`
	TokenType   string         `json:"token_type"`
	ExpiresAt   int64          `json:"expires_at"`
	Claims      exchangeClaims `json:"claims"`
	Session     struct {
		ExpiresAt     int64 `json:"expires_at"`
		IdleExpiresAt int64 `json:"idle_expires_at"`
	} `json:"session"`
}

type exchangeClaims struct {
	Iss               string              `json:"iss"`
	Sub               string              `json:"sub"`
	Email             *string             `json:"email"`
	EmailVerified     *bool               `json:"email_verified"`
	PreferredUsername *string             `json:"preferred_username"`
	Name              *string             `json:"name"`
	RealmRoles        []string            `json:"realm_roles"`
	ClientRoles       map[string][]string `json:"client_roles"`
	Groups            []string            `json:"groups"`
}

// exchangeClient calls Gatehouse's internal exchange endpoint over mutual TLS.
type exchangeClient struct {
	url    string
	client *http.Client
}

func newExchangeClient(url string, tlsConf *tls.Config, timeout time.Duration) *exchangeClient {
	dialer := &net.Dialer{Timeout: timeout, KeepAlive: 30 * time.Second}
	transport := &http.Transport{
		// Never through an HTTP(S)_PROXY from the environment: this is east-west traffic that
		// carries bearer tokens and must go straight to Gatehouse.
		Proxy:               nil,
		DialContext:         dialer.DialContext,
		TLSClientConfig:     tlsConf,
		TLSHandshakeTimeout: timeout,
		// Gatehouse offers h2 by ALPN; one multiplexed connection serves concurrent requests.
		ForceAttemptHTTP2:     true,
		MaxIdleConns:          32,
		MaxIdleConnsPerHost:   32,
		IdleConnTimeout:       90 * time.Second,
		ResponseHeaderTimeout: timeout,
	}
	return &exchangeClient{
		url: url,
		client: &http.Client{Transport: transport, Timeout: timeout,
			// Never follow a redirect: a 307 would re-send the session id (or fetch keys) elsewhere.
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }},
	}
}

// exchange turns a session id into Gatehouse's view of the session. It returns ErrInvalidSession
// for Gatehouse's 401 and ErrUnavailable (wrapped with a secret-free reason) for anything else
// that is not a well-formed 200.
func (c *exchangeClient) exchange(ctx context.Context, sessionID string) (*exchangeResponse, error) {
	body, err := json.Marshal(map[string]string{"session_id": sessionID})
	if err != nil {
		return nil, fmt.Errorf("%w: encode request: %v", ErrUnavailable, err)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.url, bytes.NewReader(body))
	if err != nil {
		return nil, fmt.Errorf("%w: build request: %v", ErrUnavailable, err)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "application/json")
	// The client span of this call; its traceparent makes Gatehouse's exchange span its child.
	span := startExchangeSpan(ctx, req, keyOf(sessionID).prefix())
	defer span.End()

	res, err := c.client.Do(req)
	if res != nil {
		span.SetAttributes(attribute.Int("http.response.status_code", res.StatusCode))
	}
	if err != nil || res.StatusCode >= 500 {
		span.SetStatus(codes.Error, "exchange failed")
	}
	if err != nil {
		// *url.Error names the URL (no secret in it) and the network/TLS cause.
		return nil, fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	defer res.Body.Close()
	raw, err := io.ReadAll(io.LimitReader(res.Body, maxExchangeResponse+1))
	if err != nil {
		return nil, fmt.Errorf("%w: read response: %v", ErrUnavailable, err)
	}

	switch {
	case res.StatusCode == http.StatusOK:
	case res.StatusCode == http.StatusUnauthorized:
		return nil, ErrInvalidSession
	case res.StatusCode == http.StatusForbidden:
		// Our certificate identity is not on Gatehouse's allow-list: a deployment problem, not
		// the user's fault, so the user gets 503 and the operator a clear log line.
		return nil, fmt.Errorf("%w: Gatehouse refused this service's client certificate (403 %s); check internal.allow",
			ErrUnavailable, errorCode(raw))
	default:
		return nil, fmt.Errorf("%w: Gatehouse answered %d %s", ErrUnavailable, res.StatusCode, errorCode(raw))
	}

	if len(raw) > maxExchangeResponse {
		return nil, fmt.Errorf("%w: exchange response larger than %d bytes", ErrUnavailable, maxExchangeResponse)
	}
	var out exchangeResponse
	if err := json.Unmarshal(raw, &out); err != nil {
		// Do not wrap the decoder error: it may quote parts of the body, i.e. the token.
		return nil, fmt.Errorf("%w: exchange response is not valid JSON", ErrUnavailable)
	}
	switch {
	case out.AccessToken == "":
		return nil, fmt.Errorf("%w: exchange response has no access_token", ErrUnavailable)
	case !strings.EqualFold(out.TokenType, "Bearer"):
		return nil, fmt.Errorf("%w: exchange response has token_type %.20q, want Bearer", ErrUnavailable, out.TokenType)
	case out.Claims.Sub == "":
		return nil, fmt.Errorf("%w: exchange response has no claims.sub", ErrUnavailable)
	}
	return &out, nil
}

// errorCode extracts Gatehouse's short `error` code from an error body for logging; the rest of
// the body is not logged.
func errorCode(raw []byte) string {
	var e struct {
		Error string `json:"error"`
	}
	if json.Unmarshal(raw, &e) != nil || e.Error == "" {
		return ""
	}
	if len(e.Error) > 40 {
		e.Error = e.Error[:40]
	}
	return fmt.Sprintf("%q", e.Error)
}
