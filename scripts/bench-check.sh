#!/usr/bin/env bash
# The check faces beside `/auth/me` (issue 12 part 6), part of `make bench` and runnable alone:
# one Gatehouse with a `[check]` listener on loopback, pinned to core 0 with one Tokio worker;
# `GET /auth/me` (wrk), the HTTP check `GET /check` as nginx's auth_request sends it (wrk) and the
# Envoy ext_authz v3 gRPC Check over h2c (the ext_authz_load example) measured alternately on
# core 1. Targets per server core: HTTP check ≥ 90 %, gRPC check ≥ 70 % of `/auth/me`.
# The measuring itself is scripts/lib/bench_check.py.
#
#   scripts/bench-check.sh [GATEHOUSE-RELEASE-BINARY]
#
# Environment: BENCH_DURATION (s per run, 10), ROUNDS (alternating rounds, 3), BENCH_CONNECTIONS
# (wrk connections and gRPC streams in flight, 32), BENCH_GRPC_CONNECTIONS (h2c connections the
# streams share, 4), BENCH_OUT (markdown file to prepend the result to, default docs/benchmarks.md;
# empty = print only), BENCH_LABEL (added to the result's heading, e.g. "shared, noisy machine").
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET="${CARGO_TARGET_DIR:-target}"
BIN="${1:-$TARGET/release/gatehouse}"
CACHE="${GATEHOUSE_CACHE:-$HOME/.cache/gatehouse}"
KC_PORT="${KEYCLOAK_TEST_PORT:-18180}"
export KEYCLOAK_URL="${KEYCLOAK_URL:-http://localhost:$KC_PORT}"

[ -x "$BIN" ] || { echo "bench-check: $BIN missing (cargo build --locked --release -p gatehouse)" >&2; exit 1; }
for tool in wrk taskset; do
  command -v "$tool" >/dev/null || { echo "bench-check: $tool missing (scripts/setup.sh installs it)" >&2; exit 1; }
done
[ "$(nproc)" -ge 2 ] || { echo "bench-check: needs 2 cores (server on 0, load on 1)" >&2; exit 1; }
python3 -c 'import requests' 2>/dev/null || python3 -m pip install --quiet requests
curl -fs "$KEYCLOAK_URL/realms/gatehouse/.well-known/openid-configuration" >/dev/null \
  || { echo "bench-check: Keycloak's test instance is not running at $KEYCLOAK_URL (scripts/keycloak.sh start test $KC_PORT)" >&2; exit 1; }
cargo build --locked --release -p gatehouse --example ext_authz_load
LOAD="$TARGET/release/examples/ext_authz_load"

WORK="$CACHE/bench-check"
rm -rf "$WORK" && mkdir -p "$WORK"
OUT="${BENCH_OUT-docs/benchmarks.md}"
table="$WORK/table.md"
GATEHOUSE_BIN="$BIN" EXT_AUTHZ_LOAD_BIN="$LOAD" BENCH_WORK="$WORK" BENCH_JSON="$WORK/results.json" \
  python3 scripts/lib/bench_check.py | tee "$table"

if [ -n "$OUT" ]; then
  cpu_model=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
  block="### $(date -u +%Y-%m-%d) — the check faces vs \`/auth/me\`${BENCH_LABEL:+ ($BENCH_LABEL)}

Machine: $(nproc) cores ($cpu_model), $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -r). Command: \`scripts/bench-check.sh\`
(BENCH_DURATION=${BENCH_DURATION:-10} ROUNDS=${ROUNDS:-3} BENCH_CONNECTIONS=${BENCH_CONNECTIONS:-32} BENCH_GRPC_CONNECTIONS=${BENCH_GRPC_CONNECTIONS:-4}).

$(cat "$table")"
  python3 - "$OUT" "$block" <<'PY'
import sys, pathlib
p, block = pathlib.Path(sys.argv[1]), sys.argv[2]
text = p.read_text()
marker = "<!-- check-face results: newest first -->"
if marker not in text:
    text = text.rstrip() + "\n\n" + marker + "\n"
p.write_text(text.replace(marker, marker + "\n\n" + block + "\n", 1))
PY
  echo "bench-check: prepended to $OUT"
fi
