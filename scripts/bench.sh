#!/usr/bin/env bash
# `make bench`: GET /auth/me with a valid session on the embedded store, keep-alive, measured
# beside a minimal hyper server answering the same request the same way, in the same run.
# Server and load generator are pinned to different cores (the machine has 2), the servers run one
# Tokio worker, so "per core" figures are literal. Results go to docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${1:-${CARGO_TARGET_DIR:-target}/release/gatehouse}"
CACHE="${GATEHOUSE_CACHE:-$HOME/.cache/gatehouse}"
WORK="$CACHE/bench"
KC_PORT="${KEYCLOAK_TEST_PORT:-18180}"
PORT=18039            # a redirect-URI port registered in the test realm
BASE_PORT=18990
DURATION="${BENCH_DURATION:-10s}"
CONNS="${BENCH_CONNECTIONS:-32}"
RATE="${BENCH_RATE:-20000}"
OUT="${BENCH_OUT:-docs/benchmarks.md}"

command -v oha >/dev/null || { echo "bench: installing the load generator oha (cargo install, cached in ~/.cargo/bin)"; cargo install --locked oha >/dev/null; }
cargo build --locked --release -p gatehouse --example baseline --example baseline_mtls --example mint_sessions
BASELINE="${CARGO_TARGET_DIR:-target}/release/examples/baseline"
BASELINE_MTLS="${CARGO_TARGET_DIR:-target}/release/examples/baseline_mtls"
INT_PORT=18443
BASE_MTLS_PORT=18991
XRATE="${BENCH_EXCHANGE_RATE:-10000}"

pids=()
started_kc=0
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  [ "$started_kc" = 1 ] && scripts/keycloak.sh stop test || true
}
trap cleanup EXIT
if ! curl -fs "http://localhost:$KC_PORT/realms/gatehouse/.well-known/openid-configuration" >/dev/null; then
  scripts/keycloak.sh fetch && scripts/keycloak.sh start test "$KC_PORT" && started_kc=1
fi

rm -rf "$WORK" && mkdir -p "$WORK"
head -c 32 /dev/urandom | base64 > "$WORK/key" && chmod 600 "$WORK/key"
"$BIN" pki init --out "$WORK/pki" >/dev/null
"$BIN" pki issue --ca "$WORK/pki" --name bench --spiffe spiffe://gatehouse.local/ns/bench/sa/oha --out "$WORK/pki" >/dev/null
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
[internal]
listen = "127.0.0.1:$INT_PORT"
cert = "$WORK/pki/gatehouse.crt"
key = "$WORK/pki/gatehouse.key"
client_ca = "$WORK/pki/ca.crt"
allow = ["spiffe://gatehouse.local/ns/bench/sa/oha"]
rate_limit_per_second = 10000000
[log]
level = "warn"
# The proxy, in front of the baseline server (the same answer as /auth/me, one hop further).
[[routes]]
prefix = "/api/bl/"
upstream = "http://127.0.0.1:$BASE_PORT/"
relay = "session"
TOML

TOKIO_WORKER_THREADS=1 taskset -c 0 "$BIN" serve --config "$WORK/gatehouse.toml" & pids+=($!); GH_PID=$!
# The same Gatehouse on the Redis store (Debian's redis-server, on the server's core as well).
REDIS_PORT=18992
RPORT=18038
mkdir -p "$WORK/redis"
taskset -c 0 redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly yes --appendfsync everysec --dir "$WORK/redis" >/dev/null & pids+=($!)
sed -e "s/127.0.0.1:$PORT/127.0.0.1:$RPORT/; s/localhost:$PORT/localhost:$RPORT/; s/127.0.0.1:$INT_PORT/127.0.0.1:18444/" \
    -e "s|^path = .*|store = \"redis\"\nredis_url = \"redis://127.0.0.1:$REDIS_PORT\"|" "$WORK/gatehouse.toml" > "$WORK/gatehouse-redis.toml"
TOKIO_WORKER_THREADS=1 taskset -c 0 "$BIN" serve --config "$WORK/gatehouse-redis.toml" & pids+=($!); GR_PID=$!
TOKIO_WORKER_THREADS=1 taskset -c 0 "$BASELINE" "$BASE_PORT" & pids+=($!); BL_PID=$!
TOKIO_WORKER_THREADS=1 taskset -c 0 "$BASELINE_MTLS" "$BASE_MTLS_PORT" "$WORK/pki/gatehouse.crt" "$WORK/pki/gatehouse.key" "$WORK/pki/ca.crt" & pids+=($!); BM_PID=$!
for _ in $(seq 1 100); do curl -fs "http://localhost:$PORT/readyz" >/dev/null && break; sleep 0.2; done
cookie=$(curl -fs -i -X POST "http://localhost:$PORT/auth/login" -H 'X-CSRF: 1' -H "Origin: http://localhost:$PORT" \
  -H 'content-type: application/json' -d '{"username":"alice","password":"alice-password"}' \
  | tr -d '\r' | sed -n 's/^set-cookie: \(__Host-Http-gatehouse=[^;]*\).*/\1/Ip')
[ -n "$cookie" ] || { echo "bench: login failed" >&2; exit 1; }
curl -fs "http://localhost:$PORT/auth/me" -H "Cookie: $cookie" >/dev/null
for _ in $(seq 1 100); do curl -fs "http://localhost:$RPORT/readyz" >/dev/null && break; sleep 0.2; done
rcookie=$(curl -fs -i -X POST "http://localhost:$RPORT/auth/login" -H 'X-CSRF: 1' -H "Origin: http://localhost:$RPORT" \
  -H 'content-type: application/json' -d '{"username":"alice","password":"alice-password"}' \
  | tr -d '\r' | sed -n 's/^set-cookie: \(__Host-Http-gatehouse=[^;]*\).*/\1/Ip')
[ -n "$rcookie" ] || { echo "bench: login on the Redis store failed" >&2; exit 1; }

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)

# run NAME PID URL RATE [oha args...] -> prints "rps p50 p99 cpu_us_per_req fixed_rps fixed_p50 fixed_p99"
run() {
  local pid=$2 url=$3 rate=$4; shift 4
  taskset -c 1 oha -z 2s -c "$CONNS" --no-tui "$@" "$url" >/dev/null
  local t0; t0=$(cpu_ticks "$pid")
  local json; json=$(taskset -c 1 oha -z "$DURATION" -c "$CONNS" --no-tui --output-format json "$@" "$url")
  local t1; t1=$(cpu_ticks "$pid")
  local fixed; fixed=$(taskset -c 1 oha -z "$DURATION" -c "$CONNS" -q "$rate" --latency-correction --no-tui --output-format json "$@" "$url")
  python3 - "$json" "$fixed" "$t0" "$t1" "$hz" <<'PY'
import json, sys
j, f = json.loads(sys.argv[1]), json.loads(sys.argv[2])
t0, t1, hz = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
ok = j["statusCodeDistribution"].get("200", 0)
total = sum(j["statusCodeDistribution"].values())
assert ok == total and ok > 0, f"non-200 answers: {j['statusCodeDistribution']}"
rps = j["summary"]["requestsPerSec"]
cpu_us = (t1 - t0) / hz / total * 1e6
p = lambda d, k: d["latencyPercentiles"][k] * 1000
print(f"{rps:.0f} {p(j,'p50'):.3f} {p(j,'p99'):.3f} {cpu_us:.1f} {f['summary']['requestsPerSec']:.0f} {p(f,'p50'):.3f} {p(f,'p99'):.3f}")
PY
}

read -r b_rps b_p50 b_p99 b_cpu b_frps b_fp50 b_fp99 < <(run baseline "$BL_PID" "http://127.0.0.1:$BASE_PORT/auth/me" "$RATE" -H "Cookie: $cookie")
read -r g_rps g_p50 g_p99 g_cpu g_frps g_fp50 g_fp99 < <(run gatehouse "$GH_PID" "http://127.0.0.1:$PORT/auth/me" "$RATE" -H "Cookie: $cookie")
ratio=$(python3 -c "print(f'{$g_rps/$b_rps*100:.0f}')")
# The /api proxy: Gatehouse (session check + forwarding) in front of the baseline, both on core 0.
PRATE="${BENCH_PROXY_RATE:-5000}"
read -r p_rps p_p50 p_p99 p_cpu p_frps p_fp50 p_fp99 < <(run proxy "$GH_PID" "http://127.0.0.1:$PORT/api/bl/auth/me" "$PRATE" -H "Cookie: $cookie")
pratio=$(python3 -c "print(f'{$p_rps/$b_rps*100:.0f}')")

# East-West: the exchange over mutual TLS (keep-alive), and full handshakes (a new connection each).
sid=${cookie#*=}
tls=(--cacert "$WORK/pki/ca.crt" --cert "$WORK/pki/bench.crt" --key "$WORK/pki/bench.key")
body=(-m POST -H 'content-type: application/json' -d "{\"session_id\":\"$sid\"}")
read -r xb_rps xb_p50 xb_p99 xb_cpu xb_frps xb_fp50 xb_fp99 < <(run baseline_mtls "$BM_PID" "https://localhost:$BASE_MTLS_PORT/internal/v1/session/exchange" "$XRATE" "${tls[@]}" "${body[@]}")
read -r x_rps x_p50 x_p99 x_cpu x_frps x_fp50 x_fp99 < <(run exchange "$GH_PID" "https://localhost:$INT_PORT/internal/v1/session/exchange" "$XRATE" "${tls[@]}" "${body[@]}")
hs() { taskset -c 1 oha -z "$DURATION" -c "$CONNS" --disable-keepalive --no-tui --output-format json "${tls[@]}" "${body[@]}" "$1" \
  | python3 -c 'import json,sys; j=json.load(sys.stdin); d=j["statusCodeDistribution"]; assert d.get("200",0)==sum(d.values())>0, d; print("%.0f" % j["summary"]["requestsPerSec"])'; }
hb=$(hs "https://localhost:$BASE_MTLS_PORT/internal/v1/session/exchange")
hg=$(hs "https://localhost:$INT_PORT/internal/v1/session/exchange")
xratio=$(python3 -c "print(f'{$x_rps/$xb_rps*100:.0f}')")
# Redis store: /auth/me and the exchange (p99 at 10k/s).
read -r r_rps r_p50 r_p99 r_cpu r_frps r_fp50 r_fp99 < <(run redis-me "$GR_PID" "http://127.0.0.1:$RPORT/auth/me" "$XRATE" -H "Cookie: $rcookie")
rsid=${rcookie#*=}
rbody=(-m POST -H 'content-type: application/json' -d "{\"session_id\":\"$rsid\"}")
read -r rx_rps rx_p50 rx_p99 rx_cpu rx_frps rx_fp50 rx_fp99 < <(run redis-exchange "$GR_PID" "https://localhost:18444/internal/v1/session/exchange" "$XRATE" "${tls[@]}" "${rbody[@]}")
rratio=$(python3 -c "print(f'{$r_rps/$g_rps*100:.0f}')")
rxratio=$(python3 -c "print(f'{$rx_rps/$x_rps*100:.0f}')")
hratio=$(python3 -c "print(f'{$hg/$hb*100:.0f}')")

cpu_model=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
result=$(cat <<MD
### $(date -u +%Y-%m-%d) — \`GET /auth/me\`, embedded store

Machine: $(nproc) cores ($cpu_model), $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -r). Command: \`make bench\`
(server pinned to core 0 with one Tokio worker, oha pinned to core 1, $CONNS keep-alive connections, $DURATION per run).

| server | requests/s (1 core) | p50 ms | p99 ms | server CPU µs/request | at $RATE req/s: achieved | p50 ms | p99 ms |
|---|---|---|---|---|---|---|---|
| minimal hyper baseline | $b_rps | $b_p50 | $b_p99 | $b_cpu | $b_frps | $b_fp50 | $b_fp99 |
| Gatehouse | $g_rps | $g_p50 | $g_p99 | $g_cpu | $g_frps | $g_fp50 | $g_fp99 |

Gatehouse reaches **$ratio %** of the baseline's rate.

\`GET /api/bl/auth/me\` through the proxy (\`relay = "session"\`) to the baseline as upstream; Gatehouse and the
upstream share core 0, so the rate is the pair's; CPU is Gatehouse's only:

| path | requests/s | p50 ms | p99 ms | Gatehouse CPU µs/request | at $PRATE req/s: achieved | p50 ms | p99 ms |
|---|---|---|---|---|---|---|---|
| browser → Gatehouse proxy → baseline | $p_rps | $p_p50 | $p_p99 | $p_cpu | $p_frps | $p_fp50 | $p_fp99 |

Proxied rate: **$pratio %** of the baseline answering directly.

\`POST /internal/v1/session/exchange\` over mutual TLS (keep-alive, ECDSA P-256 certificates from \`gatehouse pki\`):

| server | exchanges/s (1 core) | p50 ms | p99 ms | server CPU µs/exchange | at $XRATE/s: achieved | p50 ms | p99 ms |
|---|---|---|---|---|---|---|---|
| rustls + hyper baseline (fixed answer) | $xb_rps | $xb_p50 | $xb_p99 | $xb_cpu | $xb_frps | $xb_fp50 | $xb_fp99 |
| Gatehouse exchange | $x_rps | $x_p50 | $x_p99 | $x_cpu | $x_frps | $x_fp50 | $x_fp99 |

Exchange rate: **$xratio %** of the baseline. Full mutual-TLS handshakes (new connection per request):
rustls baseline **$hb/s**, Gatehouse **$hg/s** (**$hratio %**).

Redis store (Debian redis-server 7, AOF every second, on the server's core; CPU column is Gatehouse only):

| endpoint | requests/s | p50 ms | p99 ms | Gatehouse CPU µs/request | at $XRATE/s: achieved | p50 ms | p99 ms |
|---|---|---|---|---|---|---|---|
| \`GET /auth/me\` | $r_rps | $r_p50 | $r_p99 | $r_cpu | $r_frps | $r_fp50 | $r_fp99 |
| exchange (mTLS) | $rx_rps | $rx_p50 | $rx_p99 | $rx_cpu | $rx_frps | $rx_fp50 | $rx_fp99 |

Redis-backed rate vs embedded: \`/auth/me\` **$rratio %**, exchange **$rxratio %**.
MD
)
echo "$result"
if [ -n "$OUT" ]; then
  python3 - "$OUT" "$result" <<'PY'
import sys, pathlib
p, block = pathlib.Path(sys.argv[1]), sys.argv[2]
text = p.read_text() if p.exists() else "# Benchmarks\n"
marker = "<!-- results: newest first -->"
if marker not in text:
    text = text.rstrip() + "\n\n" + marker + "\n"
text = text.replace(marker, marker + "\n\n" + block + "\n", 1)
p.write_text(text)
PY
  echo "bench: appended to $OUT"
fi
