# Shared by scripts/demo.sh and scripts/e2e.sh (sourced, not run): the dev PKI, the Gatehouse
# configuration of the whole platform, and starting PocketBase against Gatehouse. One place, so
# the demo and the browser tests run the same platform.

# platform_pki BIN DIR: a dev CA, Gatehouse's server certificate and PocketBase's client
# certificate (SPIFFE ID below), created once per DIR.
PB_SPIFFE="spiffe://gatehouse.local/ns/data/sa/pocketbase"
platform_pki() {
    local bin="$1" dir="$2"
    if [[ ! -s "$dir/ca.crt" || ! -s "$dir/gatehouse.crt" ]]; then
        "$bin" pki init --out "$dir" >/dev/null
    fi
    if [[ ! -s "$dir/pocketbase.crt" ]]; then
        "$bin" pki issue --ca "$dir" --name pocketbase --spiffe "$PB_SPIFFE" --out "$dir" >/dev/null
    fi
}

# platform_config FILE: write Gatehouse's config from the variables PUBLIC_PORT, INTERNAL_PORT,
# ADMIN_PORT, PB_PORT, ISSUER, SECRET_FILE, KEY_FILE, STORE_PATH, PKI_DIR, STATIC_DIR.
platform_config() {
    cat >"$1" <<CONF
# Written by scripts/lib/platform.sh; edit the script, not this file. Reference: docs/configuration.md
#
# FOR THE LOCAL DEMO AND THE BROWSER TESTS ONLY. NOT A PRODUCTION CONFIGURATION:
#   - oidc.password_login = true: Gatehouse sees user passwords (production: code flow only);
#   - plain http on loopback: the session cookie has no Secure flag and no __Host- prefix;
#   - the client secret is the realm's published dev secret, Keycloak's admin is admin/admin,
#     and the PKI is a throw-away dev CA;
#   - PocketBase's upstream is plain http, which Gatehouse accepts only on loopback.
# Start a real deployment from docs/configuration.md and docs/security.md.

[public]
listen = "127.0.0.1:$PUBLIC_PORT"
external_url = "http://localhost:$PUBLIC_PORT"
static_dir = "$STATIC_DIR"

[oidc]
issuer = "$ISSUER"
client_id = "gatehouse"
client_secret_file = "$SECRET_FILE"
password_login = true

[session]
path = "$STORE_PATH"
encryption_key_file = "$KEY_FILE"

[internal]
listen = "127.0.0.1:$INTERNAL_PORT"
cert = "$PKI_DIR/gatehouse.crt"
key = "$PKI_DIR/gatehouse.key"
client_ca = "$PKI_DIR/ca.crt"
allow = ["$PB_SPIFFE"]

[admin]
listen = "127.0.0.1:$ADMIN_PORT"

# PocketBase receives X-Gatehouse-Session and exchanges it on the internal listener itself.
[[routes]]
prefix = "/api/pb/"
upstream = "http://127.0.0.1:$PB_PORT/"
relay = "session"

# The web app's main screen in one request: the user from the session and their newest notes.
[[views]]
name = "home"
[[views.parts]]
name = "me"
route = "@session"
fields = ["sub", "email", "preferred_username", "name", "realm_roles", "client_roles.*", "groups", "session.expires_at", "session.idle_expires_at"]
[[views.parts]]
name = "notes"
route = "/api/pb/"
path = "api/collections/notes/records?sort=-created&perPage=200"
fields = ["totalItems", "items.id", "items.text", "items.created"]
policy = "optional"
CONF
    chmod 600 "$1"
}

# platform_demo_realm OUT: the demo's Keycloak realm: deploy/keycloak/gatehouse-realm.json with
# brute-force protection on (10 failed logins in a row lock the user for 60 s, growing to at most
# 15 min; a successful login resets the count; never a permanent lockout, which would let anyone
# disable the demo users). The test instance keeps the file as it is: the suites of several
# engineers share one Keycloak and run wrong-password tests, and a lockout there would fail
# unrelated tests at random.
platform_demo_realm() {
    local src out="$1"
    src="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/deploy/keycloak/gatehouse-realm.json"
    grep -q '^  "bruteForceProtected": false,$' "$src" || {
        echo "platform_demo_realm: $src has no '\"bruteForceProtected\": false,' line to replace" >&2
        return 1
    }
    sed 's/^  "bruteForceProtected": false,$/  "bruteForceProtected": true,\
  "permanentLockout": false,\
  "failureFactor": 10,\
  "waitIncrementSeconds": 60,\
  "maxFailureWaitSeconds": 900,\
  "maxDeltaTimeSeconds": 43200,\
  "quickLoginCheckMilliSeconds": 1000,\
  "minimumQuickLoginWaitSeconds": 60,/' "$src" >"$out"
}

# platform_pocketbase_env: the environment PocketBase's Gatehouse middleware reads.
platform_pocketbase_env() {
    PB_ENV=(env
        "GATEHOUSE_EXCHANGE_URL=https://127.0.0.1:$INTERNAL_PORT/internal/v1/session/exchange"
        "GATEHOUSE_CLIENT_CERT=$PKI_DIR/pocketbase.crt"
        "GATEHOUSE_CLIENT_KEY=$PKI_DIR/pocketbase.key"
        "GATEHOUSE_CA=$PKI_DIR/ca.crt"
        "GATEHOUSE_ISSUER=$ISSUER")
}

# wait_http URL PID SECONDS WHAT: until URL answers 2xx, or PID dies, or time runs out.
wait_http() {
    local url="$1" pid="$2" limit="$3" what="$4" t0=$SECONDS
    until curl -fsS -o /dev/null --max-time 2 "$url" 2>/dev/null; do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "$what exited during start-up (see its log above)" >&2
            return 1
        fi
        if ((SECONDS - t0 >= limit)); then
            echo "$what not ready after ${limit}s ($url)" >&2
            return 1
        fi
        sleep 0.3
    done
}

# stop_pid PID WHAT: TERM, wait up to 10 s, then KILL.
stop_pid() {
    local pid="$1" i
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "$2 did not stop after 10s; sending KILL" >&2
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}
