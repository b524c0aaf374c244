#!/usr/bin/env bash
# The refresh stall (issue 14): `GET /auth/me` latency over a window that contains a token refresh,
# beside an equal window on the same server without one, on the embedded store, on Redis, and on
# two replicas sharing Redis (load on both at once, so one replica waits for the other's refresh).
# Sessions use the test realm's `gatehouse-short` client (10 s access tokens, 2 s skew): a refresh
# is due 8 s after login. Window A: 0.5–6.5 s after login (no refresh). Window B: 5–11 s after a
# fresh login (the refresh at 8 s). Server on core 0 with one Tokio worker, wrk on core 1.
#
#   scripts/bench-refresh.sh [GATEHOUSE_BINARY]      (default: the release build)
#   BENCH_CONNECTIONS=32 BENCH_ROUNDS=3
#
# Prints one line per window: p50, p99, max (ms), requests, non-2xx, refreshes during the window.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${1:-${CARGO_TARGET_DIR:-target}/release/gatehouse}"
CACHE="${GATEHOUSE_CACHE:-$HOME/.cache/gatehouse}"
WORK="$CACHE/bench-refresh"
KC_PORT="${KEYCLOAK_TEST_PORT:-18180}"
CONNS="${BENCH_CONNECTIONS:-32}"
ROUNDS="${BENCH_ROUNDS:-3}"
REDIS_PORT=18993
command -v wrk >/dev/null || { echo "bench-refresh: needs wrk (Debian package wrk; scripts/setup.sh installs it)" >&2; exit 1; }
curl -fs "http://localhost:$KC_PORT/realms/gatehouse/.well-known/openid-configuration" >/dev/null \
  || { echo "bench-refresh: Keycloak is not running on $KC_PORT (scripts/keycloak.sh start test $KC_PORT)" >&2; exit 1; }

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
rm -rf "$WORK" && mkdir -p "$WORK/redis"
head -c 32 /dev/urandom | base64 > "$WORK/key" && chmod 600 "$WORK/key"
taskset -c 0 redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly yes --appendfsync everysec \
  --dir "$WORK/redis" >/dev/null & pids+=($!)

# config NAME PUBLIC_PORT ADMIN_PORT STORE_LINES
config() {
  cat > "$WORK/$1.toml" <<TOML
[public]
listen = "127.0.0.1:$2"
external_url = "http://localhost:18930"
[oidc]
issuer = "http://localhost:$KC_PORT/realms/gatehouse"
client_id = "gatehouse-short"
client_secret = "gatehouse-short-dev-secret"
password_login = true
refresh_skew = "2s"
[session]
$4
encryption_key_file = "$WORK/key"
[admin]
listen = "127.0.0.1:$3"
[log]
level = "warn"
TOML
}
config embedded 18931 19031 "path = \"$WORK/sessions.redb\""
config redis 18932 19032 "store = \"redis\"
redis_url = \"redis://127.0.0.1:$REDIS_PORT\""
config replica 18933 19033 "store = \"redis\"
redis_url = \"redis://127.0.0.1:$REDIS_PORT\""
for name in embedded redis replica; do
  TOKIO_WORKER_THREADS=1 taskset -c 0 "$BIN" serve --config "$WORK/$name.toml" & pids+=($!)
done
for port in 18931 18932 18933; do
  for _ in $(seq 1 150); do curl -fs "http://localhost:$port/readyz" >/dev/null && break; sleep 0.2; done
done

login() {
  curl -fs -i -X POST "http://localhost:$1/auth/login" -H 'X-CSRF: 1' -H 'Origin: http://localhost:18930' \
    -H 'content-type: application/json' -d '{"username":"alice","password":"alice-password"}' \
    | tr -d '\r' | sed -n 's/^set-cookie: \(__Host-Http-gatehouse=[^;]*\).*/\1/Ip'
}
refreshes() { curl -fs "http://127.0.0.1:$1/metrics" | awk '/^gatehouse_token_refreshes_total\{outcome="ok"\}/ {s+=$2} END {print s+0}'; }
# wrk's --latency output -> "p50 p99 max requests non2xx" in ms
parse() {
  awk '
    function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0; if (v ~ /s$/) return v * 1000; return v }
    /^ +Latency / { max = ms($4) }
    /^ +50%/ { p50 = ms($2) } /^ +99%/ { p99 = ms($2) }
    /requests in/ { req = $1 } /Non-2xx/ { bad = $NF }
    END { printf "%.2f %.2f %.2f %d %d\n", p50, p99, max, req, bad + 0 }'
}
# window LABEL DELAY PORT... : log in on the first port, wait DELAY s, load every port for 6 s
window() {
  local label=$1 delay=$2; shift 2
  local cookie; cookie=$(login "$1")
  [ -n "$cookie" ] || { echo "bench-refresh: login failed" >&2; exit 1; }
  local before=0 p; for p in "$@"; do before=$((before + $(refreshes $((p + 100))))); done
  sleep "$delay"
  local outs=()
  for p in "$@"; do
    taskset -c 1 wrk -t1 -c "$CONNS" -d6s --latency -H "Cookie: $cookie" "http://127.0.0.1:$p/auth/me" > "$WORK/wrk-$p.txt" &
    outs+=($!)
  done
  wait "${outs[@]}"
  local after=0; for p in "$@"; do after=$((after + $(refreshes $((p + 100))))); done
  for p in "$@"; do
    read -r p50 p99 max req bad < <(parse < "$WORK/wrk-$p.txt")
    printf "%-28s port %s  p50 %7.2f ms  p99 %7.2f ms  max %7.2f ms  %7d req  %d non-2xx  refreshes %d\n" \
      "$label" "$p" "$p50" "$p99" "$max" "$req" "$bad" $((after - before))
  done
}
echo "bench-refresh: $("$BIN" --version 2>/dev/null || echo "$BIN"), $CONNS connections per server, $(nproc) cores, load: $(cut -d' ' -f1-3 /proc/loadavg)"
for round in $(seq 1 "$ROUNDS"); do
  window "embedded  no refresh"   0.5 18931
  window "embedded  with refresh" 5   18931
  window "redis     no refresh"   0.5 18932
  window "redis     with refresh" 5   18932
  window "2 replicas no refresh"   0.5 18932 18933
  window "2 replicas with refresh" 5   18932 18933
done
