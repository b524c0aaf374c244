#!/usr/bin/env bash
# Gatehouse beside oauth2-proxy v7.15.6 (issue 14 part 1, issue 12 part 6), part of `make bench` and
# runnable alone. Same Keycloak realm, same redis-server, same upstream; each server pinned to core 0
# with one worker (TOKIO_WORKER_THREADS=1 / GOMAXPROCS=1), wrk and vegeta pinned to core 1, pairs
# measured alternately. The measuring itself is scripts/lib/bench_oauth2_proxy.py; this script
# builds or finds what it needs (cached under ~/.cache/gatehouse) and checks the Keycloak.
#
#   scripts/bench-oauth2-proxy.sh [GATEHOUSE-RELEASE-BINARY]
#
# Environment: BENCH_DURATION (s per run, 10), ROUNDS (alternating rounds, 3), BENCH_CONNECTIONS (32),
# BENCH_FIXED_RATE (req/s for the fixed-rate p99, 2000), FOOTPRINT_CONNECTIONS (10000),
# FOOTPRINT_SESSIONS (oauth2-proxy logins for its per-session Redis footprint, 1000),
# FOOTPRINT_LIVE_SESSIONS (Gatehouse sessions minted by examples/mint_sessions.rs for the measured
# footprint, embedded and Redis, 100000; 0 skips), MINT_BIN (that example), STORM_REQUESTS (100),
# STORM_DELAY_MS (300), BENCH_OUT (markdown file to prepend the result to, default docs/benchmarks.md;
# empty = print only), BENCH_LABEL (added to the result's heading, e.g. "shared, noisy machine").
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${1:-${CARGO_TARGET_DIR:-target}/release/gatehouse}"
CACHE="${GATEHOUSE_CACHE:-$HOME/.cache/gatehouse}"
KC_PORT="${KEYCLOAK_TEST_PORT:-18180}"
export KEYCLOAK_URL="${KEYCLOAK_URL:-http://localhost:$KC_PORT}"
O2P_VERSION=v7.15.6
VEGETA_VERSION=v12.13.0

[ -x "$BIN" ] || { echo "bench-oauth2-proxy: $BIN missing (cargo build --locked --release -p gatehouse)" >&2; exit 1; }
MINT="${MINT_BIN:-$(dirname "$BIN")/examples/mint_sessions}"
if [ ! -x "$MINT" ] && [ "${FOOTPRINT_LIVE_SESSIONS:-100000}" != 0 ]; then
  echo "bench-oauth2-proxy: building examples/mint_sessions (the live-session footprint)" >&2
  cargo build --locked --release -p gatehouse --example mint_sessions
  MINT="${CARGO_TARGET_DIR:-target}/release/examples/mint_sessions"
fi
for tool in wrk nginx redis-server redis-cli taskset ss go; do
  command -v "$tool" >/dev/null || { echo "bench-oauth2-proxy: $tool missing (scripts/setup.sh installs it)" >&2; exit 1; }
done
[ "$(nproc)" -ge 2 ] || { echo "bench-oauth2-proxy: needs 2 cores (server on 0, load on 1)" >&2; exit 1; }
python3 -c 'import requests' 2>/dev/null || python3 -m pip install --quiet requests
curl -fs "$KEYCLOAK_URL/realms/gatehouse/.well-known/openid-configuration" >/dev/null \
  || { echo "bench-oauth2-proxy: Keycloak's test instance is not running at $KEYCLOAK_URL (scripts/keycloak.sh start test $KC_PORT)" >&2; exit 1; }

# oauth2-proxy and vegeta from the Go module proxy, each in a versioned directory (idempotent).
O2P="$CACHE/bin/oauth2-proxy-$O2P_VERSION/oauth2-proxy"
if [ ! -x "$O2P" ]; then
  echo "bench-oauth2-proxy: building oauth2-proxy $O2P_VERSION (go install, once)" >&2
  GOBIN="$(dirname "$O2P")" GOFLAGS=-buildvcs=false go install "github.com/oauth2-proxy/oauth2-proxy/v7@$O2P_VERSION"
fi
VEGETA="$CACHE/bin/vegeta-$VEGETA_VERSION/vegeta"
if [ ! -x "$VEGETA" ]; then
  echo "bench-oauth2-proxy: building vegeta $VEGETA_VERSION (fixed-rate load, go install, once)" >&2
  GOBIN="$(dirname "$VEGETA")" GOFLAGS=-buildvcs=false go install "github.com/tsenart/vegeta/v12@$VEGETA_VERSION" \
    || { echo "bench-oauth2-proxy: vegeta unavailable; fixed-rate columns left empty" >&2; VEGETA=""; }
fi

WORK="$CACHE/bench-oauth2-proxy"
rm -rf "$WORK" && mkdir -p "$WORK"
OUT="${BENCH_OUT-docs/benchmarks.md}"
table="$WORK/table.md"
GATEHOUSE_BIN="$BIN" MINT_BIN="$MINT" OAUTH2_PROXY_BIN="$O2P" VEGETA_BIN="$VEGETA" BENCH_WORK="$WORK" BENCH_JSON="$WORK/results.json" \
  python3 scripts/lib/bench_oauth2_proxy.py | tee "$table"

if [ -n "$OUT" ]; then
  cpu_model=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
  block="### $(date -u +%Y-%m-%d) — Gatehouse vs oauth2-proxy $O2P_VERSION${BENCH_LABEL:+ ($BENCH_LABEL)}

Machine: $(nproc) cores ($cpu_model), $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -r). Command: \`scripts/bench-oauth2-proxy.sh\`
(BENCH_DURATION=${BENCH_DURATION:-10} ROUNDS=${ROUNDS:-3} FOOTPRINT_SESSIONS=${FOOTPRINT_SESSIONS:-1000} FOOTPRINT_LIVE_SESSIONS=${FOOTPRINT_LIVE_SESSIONS:-100000}).

$(cat "$table")"
  python3 - "$OUT" "$block" <<'PY'
import sys, pathlib
p, block = pathlib.Path(sys.argv[1]), sys.argv[2]
text = p.read_text()
marker = "<!-- oauth2-proxy results: newest first -->"
if marker not in text:
    text = text.rstrip() + "\n\n" + marker + "\n"
p.write_text(text.replace(marker, marker + "\n\n" + block + "\n", 1))
PY
  echo "bench-oauth2-proxy: prepended to $OUT"
fi
