#!/usr/bin/env bash
# Composed views against direct proxied calls (docs/benchmarks.md, "Views"): a two-part view whose
# parts each call the baseline server through the /api/bl/ route, beside one proxied call to the
# same upstream. Gatehouse and the upstream share core 0 (one Tokio worker each), oha runs on
# core 1, as in scripts/bench.sh. Prints the figures; the target is "composing costs less than one
# extra proxied call": Gatehouse CPU per view < 2 x per proxied call, and view rate >= half the
# proxied rate (one view replaces two proxied calls). Load generator: wrk (one thread).
#
#   scripts/bench-views.sh [GATEHOUSE-RELEASE-BINARY] [BASELINE-BINARY]
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${1:-${CARGO_TARGET_DIR:-target}/release/gatehouse}"
BASELINE="${2:-${CARGO_TARGET_DIR:-target}/release/examples/baseline}"
CACHE="${GATEHOUSE_CACHE:-$HOME/.cache/gatehouse}"
WORK="$CACHE/bench-views"
KC_PORT="${KEYCLOAK_TEST_PORT:-18180}"
PORT=18037 BASE_PORT=18993
DURATION="${BENCH_DURATION:-10s}"
CONNS="${BENCH_CONNECTIONS:-32}"
command -v wrk >/dev/null || { echo "bench-views: wrk missing (Debian package wrk)" >&2; exit 1; }
curl -fs "http://localhost:$KC_PORT/realms/gatehouse/.well-known/openid-configuration" >/dev/null \
  || { echo "bench-views: Keycloak's test instance is not running on $KC_PORT" >&2; exit 1; }

pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done' EXIT
rm -rf "$WORK" && mkdir -p "$WORK"
head -c 32 /dev/urandom | base64 > "$WORK/key" && chmod 600 "$WORK/key"
cat > "$WORK/gatehouse.toml" <<TOML
[public]
listen = "127.0.0.1:$PORT"
external_url = "http://localhost:$PORT"
[oidc]
issuer = "http://localhost:$KC_PORT/realms/gatehouse"
client_id = "gatehouse"
client_secret = "gatehouse-dev-secret"
password_login = true
[session]
path = "$WORK/sessions.redb"
encryption_key_file = "$WORK/key"
[admin]
listen = "127.0.0.1:0"
[log]
level = "warn"
[[routes]]
prefix = "/api/bl/"
upstream = "http://127.0.0.1:$BASE_PORT/"
relay = "session"
[[views]]
name = "two"
[[views.parts]]
name = "profile"
route = "/api/bl/"
path = "auth/me"
fields = ["sub", "preferred_username", "name"]
[[views.parts]]
name = "roles"
route = "/api/bl/"
path = "auth/me"
fields = ["realm_roles", "client_roles.*"]
TOML
TOKIO_WORKER_THREADS=1 taskset -c 0 "$BIN" serve --config "$WORK/gatehouse.toml" & pids+=($!); GH_PID=$!
TOKIO_WORKER_THREADS=1 taskset -c 0 "$BASELINE" "$BASE_PORT" & pids+=($!)
for _ in $(seq 1 100); do curl -fs "http://localhost:$PORT/readyz" >/dev/null && break; sleep 0.2; done
cookie=$(curl -fs -i -X POST "http://localhost:$PORT/auth/login" -H 'X-CSRF: 1' -H "Origin: http://localhost:$PORT" \
  -H 'content-type: application/json' -d '{"username":"alice","password":"alice-password"}' \
  | tr -d '\r' | sed -n 's/^set-cookie: \(__Host-Http-gatehouse=[^;]*\).*/\1/Ip')
[ -n "$cookie" ] || { echo "bench-views: login failed" >&2; exit 1; }
curl -fs "http://localhost:$PORT/api/views/two" -H "Cookie: $cookie"; echo

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)
# run URL -> "rps p50_ms p99_ms gatehouse_cpu_us_per_request"
run() {
  taskset -c 1 wrk -t1 -c"$CONNS" -d2s -H "Cookie: $cookie" "$1" >/dev/null
  local t0 t1 out
  t0=$(cpu_ticks "$GH_PID")
  out=$(taskset -c 1 wrk -t1 -c"$CONNS" -d"$DURATION" --latency -H "Cookie: $cookie" "$1")
  t1=$(cpu_ticks "$GH_PID")
  python3 - "$out" "$t0" "$t1" "$hz" <<'PY'
import re, sys
out = sys.argv[1]; t0, t1, hz = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
assert "Non-2xx" not in out and "Socket errors" not in out, out
total = int(re.search(r"(\d+) requests in", out).group(1))
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
def ms(k):
    v, unit = re.search(rf"\s{k}%\s+([\d.]+)(us|ms|s)", out).groups()
    return float(v) * {"us": 0.001, "ms": 1, "s": 1000}[unit]
print(f"{rps:.0f} {ms(50):.3f} {ms(99):.3f} {(t1 - t0) / hz / total * 1e6:.1f}")
PY
}
read -r p_rps p_p50 p_p99 p_cpu < <(run "http://127.0.0.1:$PORT/api/bl/auth/me")
read -r v_rps v_p50 v_p99 v_cpu < <(run "http://127.0.0.1:$PORT/api/views/two")
python3 - "$p_rps" "$p_p50" "$p_p99" "$p_cpu" "$v_rps" "$v_p50" "$v_p99" "$v_cpu" <<'PY'
import sys
p_rps, p_p50, p_p99, p_cpu, v_rps, v_p50, v_p99, v_cpu = map(float, sys.argv[1:])
print(f"proxied call  : {p_rps:.0f} req/s, p50 {p_p50:.2f} ms, p99 {p_p99:.2f} ms, Gatehouse CPU {p_cpu:.1f} us/request")
print(f"two-part view : {v_rps:.0f} req/s, p50 {v_p50:.2f} ms, p99 {v_p99:.2f} ms, Gatehouse CPU {v_cpu:.1f} us/request")
print(f"view CPU = {v_cpu / p_cpu:.2f} x one proxied call (target < 2: composing costs less than one extra call)")
print(f"view rate = {v_rps / (p_rps / 2):.2f} x the rate of pairs of proxied calls (target >= 1)")
PY
