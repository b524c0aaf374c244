#!/usr/bin/env bash
# The browser tests (web/tests/) against the whole platform on this machine: the Keycloak test
# instance, Gatehouse (dev PKI, embedded store) and PocketBase trusting it, driven by headless
# Chromium through playwright-core. Screenshots land in $ARTIFACTS_DIR.
#
#   scripts/e2e.sh [PATH-TO-GATEHOUSE-BINARY]
#
# The binary defaults to the debug build `cargo test` leaves in $CARGO_TARGET_DIR. Keycloak's
# `test` instance is started if it is not running (scripts/test.sh has usually started it).
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
# shellcheck source=scripts/lib/platform.sh
source scripts/lib/platform.sh

log() { echo "e2e.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

CACHE="${GATEHOUSE_CACHE:-$HOME/.cache/gatehouse}"
BIN="${1:-${GATEHOUSE_BIN:-${CARGO_TARGET_DIR:-$CACHE/target}/debug/gatehouse}}"
[[ -x "$BIN" ]] || die "Gatehouse binary '$BIN' not found; run 'cargo build' first"
KC_PORT="${KEYCLOAK_TEST_PORT:-18180}"
export KEYCLOAK_URL="http://localhost:$KC_PORT"
ISSUER="$KEYCLOAK_URL/realms/gatehouse"
# Ports inside the range the test realm's redirect URIs allow (localhost:18000-18039).
PUBLIC_PORT=18030 CROSS_ORIGIN_PORT=18031 ADMIN_PORT=18032 INTERNAL_PORT=18033 PB_PORT=18090
export ARTIFACTS_DIR="${ARTIFACTS_DIR:-$REPO_ROOT/test-artifacts/e2e}"
export GATEHOUSE_URL="http://localhost:$PUBLIC_PORT" CROSS_ORIGIN_PORT POCKETBASE_URL="http://127.0.0.1:$PB_PORT"

command -v node >/dev/null || die "node not found (Node.js 20 is expected on this machine)"
[[ -x /usr/bin/chromium ]] || die "/usr/bin/chromium missing; scripts/setup.sh installs it"

# playwright-core from the lock file; reinstalled only when the lock file changes.
(
    cd web/tests
    stamp="node_modules/.lock-$(sha256sum package-lock.json | cut -c1-16)"
    if [[ ! -e "$stamp" ]]; then
        npm ci --no-audit --no-fund --loglevel=error >&2
        touch "$stamp"
    fi
)
PB_BIN="$(scripts/pocketbase.sh build)"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/gatehouse-e2e.XXXXXX")"
GH_PID="" PB_PID=""
cleanup() {
    stop_pid "$PB_PID" PocketBase
    stop_pid "$GH_PID" Gatehouse
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

scripts/keycloak.sh start test "$KC_PORT"

PKI_DIR="$WORK/pki" SECRET_FILE="$WORK/oidc-client-secret" KEY_FILE="$WORK/session-key"
STORE_PATH="$WORK/sessions.redb" STATIC_DIR="$REPO_ROOT/web"
mkdir -p "$PKI_DIR" "$ARTIFACTS_DIR"
rm -f "$ARTIFACTS_DIR"/*.png
(umask 077; head -c 32 /dev/urandom | base64 >"$KEY_FILE"; echo "gatehouse-dev-secret" >"$SECRET_FILE")
platform_pki "$BIN" "$PKI_DIR"
platform_config "$WORK/gatehouse.toml"

log "starting Gatehouse on $GATEHOUSE_URL"
env RUST_LOG="${E2E_LOG:-warn}" "$BIN" serve --config "$WORK/gatehouse.toml" &
GH_PID=$!
wait_http "$GATEHOUSE_URL/readyz" "$GH_PID" 60 Gatehouse

log "starting PocketBase on 127.0.0.1:$PB_PORT"
platform_pocketbase_env
"${PB_ENV[@]}" "$PB_BIN" serve --http "127.0.0.1:$PB_PORT" --dir "$WORK/pb_data" >"$WORK/pocketbase.log" 2>&1 &
PB_PID=$!
wait_http "http://127.0.0.1:$PB_PORT/api/health" "$PB_PID" 60 PocketBase || { cat "$WORK/pocketbase.log" >&2; exit 1; }

log "running the browser tests (screenshots: $ARTIFACTS_DIR)"
status=0
node --test --test-concurrency=1 web/tests/ || status=$?
if ((status != 0)); then
    log "PocketBase log:"; tail -n 50 "$WORK/pocketbase.log" >&2 || true
fi
exit "$status"
