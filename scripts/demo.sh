#!/usr/bin/env bash
# Run the Gatehouse demo: Keycloak (realm `gatehouse`) on http://localhost:8180, Gatehouse serving
# the web app from web/ on http://localhost:8080, and PocketBase (integrations/pocketbase) on
# 127.0.0.1:8090 behind Gatehouse's /api/pb/ route, exchanging sessions over mutual TLS (:8443).
#
#   scripts/demo.sh [PATH-TO-GATEHOUSE-BINARY]
#
# The binary is $1, else $GATEHOUSE_BIN, else target/release/gatehouse (`make demo` builds it
# and passes it). Everything the demo writes lives in .demo/ (git-ignored): the session
# encryption key (created once), the client secret file, gatehouse.toml, the session store, the
# dev PKI and PocketBase's data. Ctrl-C (or TERM, or any exit) stops PocketBase, Gatehouse and
# the Keycloak `demo` instance.
#
# Needs: curl, Go (PocketBase is built on first use), plus what scripts/keycloak.sh needs (a
# JDK >= 21, unzip, flock; mvn for the first Keycloak download).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/lib/platform.sh
source "$REPO_ROOT/scripts/lib/platform.sh"

log() { echo "demo.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

# A binary given by the caller is relative to the caller's directory; the default is in the repo.
if [[ -n "${1:-${GATEHOUSE_BIN:-}}" ]]; then
    BIN="${1:-$GATEHOUSE_BIN}"
else
    BIN="$REPO_ROOT/target/release/gatehouse"
fi
[[ -x "$BIN" && ! -d "$BIN" ]] || die "Gatehouse binary '$BIN' not found or not executable; build it first (make demo does) or pass its path"
BIN="$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")"

cd "$REPO_ROOT" # every relative path below (and in the generated config) is from the repo root
DEMO_DIR=".demo"
CONFIG="$DEMO_DIR/gatehouse.toml"
KEY_FILE="$DEMO_DIR/session-key"
SECRET_FILE="$DEMO_DIR/oidc-client-secret"
PID_FILE="$DEMO_DIR/gatehouse.pid"
PB_PID_FILE="$DEMO_DIR/pocketbase.pid"
KC_NAME="demo"
KC_PORT=8180
PUBLIC_URL="http://localhost:8080"
ADMIN_ADDR="127.0.0.1:9090"
ISSUER="http://localhost:$KC_PORT/realms/gatehouse"
READY_TIMEOUT="${DEMO_READY_TIMEOUT:-90}"

command -v curl >/dev/null 2>&1 || die "'curl' not found on PATH (apt-get install -y curl)"

# Gatehouse reads only nested GATEHOUSE_SECTION__KEY variables as configuration, so tooling
# variables such as GATEHOUSE_BIN or GATEHOUSE_CACHE pass harmlessly.
# (An array, not a function: `env ... &` must be a simple command so that `$!` is Gatehouse's pid.)
GH_ENV=(env)

# ---------------------------------------------------------------- an earlier demo

mkdir -p "$DEMO_DIR"
chmod 700 "$DEMO_DIR"

SCRIPT_PID_FILE="$DEMO_DIR/demo.pid"
# pid from FILE if that process is alive and its command line contains PATTERN (pids get reused).
live_pid() {
    local pid
    pid="$(cat "$1" 2>/dev/null || true)"
    if [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null &&
        tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$2"; then
        echo "$pid"
    fi
}

# A demo that is still running is left alone (no trap is set yet, so dying here stops nothing).
if old="$(live_pid "$SCRIPT_PID_FILE" demo.sh)" && [[ -n "$old" && "$old" != "$$" ]]; then
    die "the demo is already running (pid $old): open http://localhost:8080, or stop it with Ctrl-C in its terminal (or: kill $old)"
fi
# If an earlier run was killed hard (KILL), its Gatehouse may still hold the ports: stop it.
if old="$(live_pid "$PID_FILE" "serve --config $CONFIG")" && [[ -n "$old" ]]; then
    log "stopping the Gatehouse left over by an earlier demo (pid $old)"
    kill -TERM "$old" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do kill -0 "$old" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$old" 2>/dev/null || true
fi
rm -f "$PID_FILE"

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
port_in_use 8080 && die "port 8080 is in use by another process; the demo needs it (Keycloak only accepts http://localhost:8080/auth/callback)"
if old="$(live_pid "$PB_PID_FILE" "serve --http 127.0.0.1:8090")" && [[ -n "$old" ]]; then
    log "stopping the PocketBase left over by an earlier demo (pid $old)"
    stop_pid "$old" PocketBase
fi
rm -f "$PB_PID_FILE"
port_in_use 9090 && die "port 9090 (Gatehouse admin) is in use by another process"
port_in_use 8443 && die "port 8443 (Gatehouse internal listener) is in use by another process"
port_in_use 8090 && die "port 8090 (PocketBase) is in use by another process"

# ---------------------------------------------------------------- stop everything on the way out

GH_PID=""
PB_PID=""
CLEANED=0
# shellcheck disable=SC2317 # invoked by the EXIT trap
cleanup() {
    ((CLEANED)) && return 0
    CLEANED=1
    trap - INT TERM HUP
    if [[ -n "$PB_PID" ]]; then
        log "stopping PocketBase (pid $PB_PID) ..."
        stop_pid "$PB_PID" PocketBase
    fi
    if [[ -n "$GH_PID" ]] && kill -0 "$GH_PID" 2>/dev/null; then
        log "stopping Gatehouse (pid $GH_PID) ..."
        kill -TERM "$GH_PID" 2>/dev/null || true
        local i
        for ((i = 0; i < 100; i++)); do # 10 s for a graceful shutdown
            kill -0 "$GH_PID" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$GH_PID" 2>/dev/null; then
            log "Gatehouse did not stop after 10s; sending KILL"
            kill -KILL "$GH_PID" 2>/dev/null || true
        fi
        wait "$GH_PID" 2>/dev/null || true
    fi
    rm -f "$PID_FILE" "$PB_PID_FILE" "$SCRIPT_PID_FILE"
    log "stopping Keycloak instance '$KC_NAME' ..."
    scripts/keycloak.sh stop "$KC_NAME" || true
    log "demo stopped"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP
echo "$$" >"$SCRIPT_PID_FILE"

# ---------------------------------------------------------------- secrets and config in .demo/

(
    umask 077
    if [[ ! -s "$KEY_FILE" ]]; then
        # 32 random bytes, base64: the AES-256-GCM key that encrypts tokens at rest. Created once
        # and kept, so the session store written by an earlier run stays readable.
        head -c 32 /dev/urandom | base64 >"$KEY_FILE.tmp"
        mv "$KEY_FILE.tmp" "$KEY_FILE"
        echo "demo.sh: created session encryption key $KEY_FILE" >&2
    fi
    # The dev secret of client `gatehouse` in deploy/keycloak/gatehouse-realm.json.
    printf '%s\n' "gatehouse-dev-secret" >"$SECRET_FILE"
)
chmod 600 "$KEY_FILE" "$SECRET_FILE"

PUBLIC_PORT=8080 ADMIN_PORT=9090 INTERNAL_PORT=8443 PB_PORT=8090
PKI_DIR="$DEMO_DIR/pki" STORE_PATH="$DEMO_DIR/sessions.redb" STATIC_DIR="web"
mkdir -p "$PKI_DIR"
platform_pki "$BIN" "$PKI_DIR"
platform_config "$CONFIG"
# PocketBase is built (incrementally) before anything starts, so a build error stops nothing.
PB_BIN="$(scripts/pocketbase.sh build)"

"${GH_ENV[@]}" "$BIN" check-config --config "$CONFIG" || die "the generated $CONFIG is invalid (see above)"

# ---------------------------------------------------------------- Keycloak

# Idempotent: does nothing if the demo instance already answers on $KC_PORT. Downloads Keycloak
# on first use. Each start re-imports the realm into a fresh database.
# The demo realm is the test realm plus brute-force protection (scripts/lib/platform.sh).
platform_demo_realm "$DEMO_DIR/gatehouse-realm.json" || die "could not write the demo realm"
GATEHOUSE_REALM_FILE="$DEMO_DIR/gatehouse-realm.json" scripts/keycloak.sh start "$KC_NAME" "$KC_PORT"

# ---------------------------------------------------------------- Gatehouse

log "starting Gatehouse: $BIN serve --config $CONFIG"
"${GH_ENV[@]}" "$BIN" serve --config "$CONFIG" &
GH_PID=$! # `env` execs the binary, so this is Gatehouse's own pid
echo "$GH_PID" >"$PID_FILE"

t0=$SECONDS
until curl -fsS -o /dev/null --max-time 2 "$PUBLIC_URL/readyz" 2>/dev/null; do
    kill -0 "$GH_PID" 2>/dev/null || { wait "$GH_PID" 2>/dev/null || true; GH_PID=""; die "Gatehouse exited during start-up (see its log above)"; }
    ((SECONDS - t0 < READY_TIMEOUT)) || die "Gatehouse not ready after ${READY_TIMEOUT}s: $(curl -s --max-time 2 "$PUBLIC_URL/readyz" || true)"
    sleep 0.5
done

# A PocketBase superuser for its admin UI, so PocketBase does not print a one-time installer link
# (a JWT) to the terminal. Its password is made once and kept in .demo/.
PB_ADMIN="admin@gatehouse.local"
PB_ADMIN_PW_FILE="$DEMO_DIR/pocketbase-admin-password"
if [[ ! -s "$PB_ADMIN_PW_FILE" ]]; then
    (umask 077; head -c 18 /dev/urandom | base64 | tr -d '/+=' >"$PB_ADMIN_PW_FILE")
fi
# The password goes in on stdin, never as an argument: other local users can read any process's
# command line (ps, /proc/PID/cmdline).
"$PB_BIN" superuser upsert-stdin "$PB_ADMIN" --dir "$DEMO_DIR/pb_data" <"$PB_ADMIN_PW_FILE" >/dev/null ||
    die "could not create the PocketBase superuser"

log "starting PocketBase: $PB_BIN serve --http 127.0.0.1:$PB_PORT (data in $DEMO_DIR/pb_data)"
platform_pocketbase_env
"${PB_ENV[@]}" "$PB_BIN" serve --http "127.0.0.1:$PB_PORT" --dir "$DEMO_DIR/pb_data" &
PB_PID=$!
echo "$PB_PID" >"$PB_PID_FILE"
wait_http "http://127.0.0.1:$PB_PORT/api/health" "$PB_PID" "$READY_TIMEOUT" PocketBase || { PB_PID=""; exit 1; }

cat >&2 <<EOF

  ================================================================
   Gatehouse demo is running  (a local demo, NOT a production setup:
   password login on, plain http on loopback, dev secrets and the
   Keycloak admin/admin account; see docs/security.md)

   Open             $PUBLIC_URL
   Demo users       alice / alice-password  (realm roles admin, user)
                    bob   / bob-password    (realm role user)
   Keycloak admin   http://localhost:$KC_PORT  (admin / admin)
   Metrics          http://$ADMIN_ADDR/metrics
   PocketBase       127.0.0.1:$PB_PORT, reached by the app through $PUBLIC_URL/api/pb/
                    (it exchanges session ids at https://127.0.0.1:$INTERNAL_PORT over mTLS)
   PocketBase admin http://127.0.0.1:$PB_PORT/_/  ($PB_ADMIN, password in $PB_ADMIN_PW_FILE)

   Password login without a browser:
     curl -i -X POST $PUBLIC_URL/auth/login -H 'X-CSRF: 1' \\
       -H 'Origin: $PUBLIC_URL' -H 'content-type: application/json' \\
       -d '{"username":"alice","password":"alice-password"}'

   Press Ctrl-C to stop PocketBase, Gatehouse and Keycloak.
  ================================================================

EOF

# Wait for either; a signal interrupts the wait and the traps stop everything.
status=0
wait -n "$GH_PID" "$PB_PID" || status=$?
log "Gatehouse or PocketBase exited (status $status); stopping the demo"
exit "$status"
