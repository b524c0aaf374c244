#!/usr/bin/env bash
# What tracing costs: GET /auth/me throughput (valid session, embedded store, keep-alive) of one
# Gatehouse with tracing off, at 100 %, 10 % and 1 % sampling, each exporting to a live Jaeger
# (OTLP/HTTP). Gatehouse runs one Tokio worker pinned to core 0 (its exporter thread too); wrk
# and Jaeger run on core 1. The four configurations are measured in turns, ROUNDS
# times, and the median of each is reported, so slow drift of the machine hits all three alike.
# Run it on a quiet machine: another build or test run on these two cores makes the figures noise.
#
#   scripts/bench-tracing.sh [GATEHOUSE_BINARY]      (default: the release build)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${1:-${CARGO_TARGET_DIR:-target}/release/gatehouse}"
CACHE="${GATEHOUSE_CACHE:-$HOME/.cache/gatehouse}"
KC_PORT="${KEYCLOAK_TEST_PORT:-18180}"
PORT="${BENCH_PORT:-18037}"     # a redirect-URI port registered in the test realm
DURATION="${BENCH_DURATION:-10}"
ROUNDS="${BENCH_ROUNDS:-3}"
CONNS="${BENCH_CONNECTIONS:-32}"

command -v wrk >/dev/null || { echo "bench-tracing: wrk missing: run scripts/setup.sh" >&2; exit 1; }
curl -fs "http://localhost:$KC_PORT/realms/gatehouse/.well-known/openid-configuration" >/dev/null \
  || { echo "bench-tracing: Keycloak is not running on $KC_PORT (scripts/keycloak.sh start test $KC_PORT)" >&2; exit 1; }
JAEGER="$(scripts/jaeger.sh build)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gatehouse-bench-tracing.XXXXXX")"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
OTLP=$(free_port); QUERY=$(free_port); QGRPC=$(free_port)
cat > "$WORK/jaeger.yaml" <<YAML
service:
  extensions: [jaeger_storage, jaeger_query]
  pipelines:
    traces: {receivers: [otlp], processors: [batch], exporters: [jaeger_storage_exporter]}
  telemetry: {metrics: {level: none}, logs: {level: warn}}
extensions:
  jaeger_query: {storage: {traces: mem}, http: {endpoint: "127.0.0.1:$QUERY"}, grpc: {endpoint: "127.0.0.1:$QGRPC"}}
  jaeger_storage: {backends: {mem: {memory: {max_traces: 20000}}}}
receivers:
  otlp: {protocols: {http: {endpoint: "127.0.0.1:$OTLP"}}}
processors:
  batch: {}
exporters:
  jaeger_storage_exporter: {trace_storage: mem}
YAML
taskset -c 1 "$JAEGER" --config "$WORK/jaeger.yaml" >"$WORK/jaeger.log" 2>&1 & pids+=($!)
JAEGER_PID=$!
for _ in $(seq 1 100); do curl -fs "http://127.0.0.1:$QUERY/api/services" >/dev/null && break; sleep 0.1; done

head -c 32 /dev/urandom | base64 > "$WORK/key" && chmod 600 "$WORK/key"
# config RATIO: the Gatehouse configuration; RATIO "off" leaves [tracing] out.
config() {
  cat <<TOML
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
TOML
  if [ "$1" != off ]; then
    printf '[tracing]\nendpoint = "http://127.0.0.1:%s/v1/traces"\nsample_ratio = %s\n' "$OTLP" "$1"
  fi
}

# measure RATIO: start Gatehouse with that configuration, sign in, warm up, print requests/s.
measure() {
  config "$1" > "$WORK/gatehouse.toml"
  TOKIO_WORKER_THREADS=1 taskset -c 0 "$BIN" serve --config "$WORK/gatehouse.toml" >"$WORK/gatehouse-$1.log" 2>&1 &
  local pid=$!
  for _ in $(seq 1 100); do curl -fs "http://localhost:$PORT/readyz" >/dev/null && break; sleep 0.1; done
  local cookie
  cookie=$(curl -fs -i -X POST "http://localhost:$PORT/auth/login" -H 'X-CSRF: 1' -H "Origin: http://localhost:$PORT" \
    -H 'content-type: application/json' -d '{"username":"alice","password":"alice-password"}' \
    | tr -d '\r' | sed -n 's/^set-cookie: \(__Host-Http-gatehouse=[^;]*\).*/\1/Ip')
  [ -n "$cookie" ] || { echo "bench-tracing: login failed" >&2; kill "$pid"; exit 1; }
  taskset -c 1 wrk -t1 -c"$CONNS" -d2s -H "Cookie: $cookie" "http://127.0.0.1:$PORT/auth/me" >/dev/null
  local out before after
  # Server CPU time (user + system, all threads: the exporter's too) around the timed run: per
  # request it is steadier than requests/s on a VM whose neighbours steal time.
  before=$(cpu_ticks "$pid")
  out=$(taskset -c 1 wrk -t1 -c"$CONNS" -d"${DURATION}s" -H "Cookie: $cookie" "http://127.0.0.1:$PORT/auth/me")
  after=$(cpu_ticks "$pid")
  kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
  if grep -q "Non-2xx" <<<"$out"; then echo "bench-tracing: non-2xx answers: $out" >&2; exit 1; fi
  awk -v ticks=$((after - before)) -v hz="$(getconf CLK_TCK)" \
    '/ requests in / {n=$1} /^Requests\/sec:/ {rps=$2} END {printf "%s %.1f\n", rps, ticks / hz * 1e6 / n}' <<<"$out"
}
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# Jaeger shares core 1 with wrk: after a 100 % run it ingests its backlog for a while, which
# would slow the next run's load generator (and so make the server less busy, not cheaper).
# Wait until it uses under a tenth of a core (at most 30 s).
settle() {
  local hz; hz=$(getconf CLK_TCK)
  for _ in $(seq 1 30); do
    local a b; a=$(cpu_ticks "$JAEGER_PID"); sleep 1; b=$(cpu_ticks "$JAEGER_PID")
    [ $((b - a)) -le $((hz / 10)) ] && return 0
  done
}

declare -A results cpu
for r in $(seq 1 "$ROUNDS"); do
  for mode in off 1.0 0.1 0.01; do
    settle
    read -r rps us < <(measure "$mode")
    results[$mode]+="$rps "
    cpu[$mode]+="$us "
    echo "round $r: tracing $mode: $rps req/s, $us µs CPU per request" >&2
  done
done
spans=$(curl -fs "http://127.0.0.1:$QUERY/api/traces?service=gatehouse&limit=1" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["data"]))')
python3 - "${results[off]}" "${results[1.0]}" "${results[0.1]}" "${results[0.01]}" \
  "${cpu[off]}" "${cpu[1.0]}" "${cpu[0.1]}" "${cpu[0.01]}" "$spans" <<'PY'
import statistics, sys
rps = [sorted(float(x) for x in a.split()) for a in sys.argv[1:5]]
cpu = [sorted(float(x) for x in a.split()) for a in sys.argv[5:9]]
m = statistics.median
print("               req/s (median)   CPU µs/request (median)   cost: throughput / CPU per request")
for i, name in enumerate(["tracing off", "100% sampling", "10% sampling", "1% sampling"]):
    cost = "" if i == 0 else f"{(1 - m(rps[i]) / m(rps[0])) * 100:+6.1f}% / {(m(cpu[i]) / m(cpu[0]) - 1) * 100:+6.1f}%"
    print(f"{name:14s} {m(rps[i]):10.0f}        {m(cpu[i]):10.1f}                 {cost}")
    print(f"{'':14s} runs: {', '.join(f'{x:.0f}' for x in rps[i])} req/s; {', '.join(f'{x:.1f}' for x in cpu[i])} µs")
print(f"Jaeger received traces: {'yes' if int(sys.argv[9]) > 0 else 'NO'}")
PY
