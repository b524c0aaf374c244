#!/usr/bin/env bash
# `make soak` (issue 14 part 6, not part of `make test`): SOAK_MINUTES (default 30) of mixed traffic
# on two Gatehouse replicas (release build) sharing one redis-server, with Redis and Keycloak
# restarted during the run. Checks zero lost and zero resurrected sessions, the replicas' RSS slope
# after warm-up, no error but the expected 503s in the outage windows, and the logs (no panic, no
# session id or token). Prints a summary table; exits non-zero on any failure.
#
#   scripts/soak.sh [GATEHOUSE-RELEASE-BINARY]
#
# It runs its OWN Keycloak instance (`scripts/keycloak.sh start soak $SOAK_KEYCLOAK_PORT`, default
# 18280; replicas, Redis and the upstream on the next six ports) and stops it at exit, also after a
# failure or Ctrl-C: the shared `test` instance on 18180 is never touched.
#
# Environment: SOAK_MINUTES (30), SOAK_WARMUP_MINUTES (min(5, SOAK_MINUTES/3)), SOAK_WORKERS (6),
# SOAK_USERS_PER_WORKER (3), SOAK_LIVE_PER_WORKER (40), SOAK_PAUSE (0.02 s between a worker's
# operations), SOAK_RSS_INTERVAL (10 s), SOAK_RSS_SLOPE_MAX (64 KiB/min), SOAK_REDIS_DOWN_SECONDS
# (20: how long Redis and Keycloak each stay down), SOAK_OUTAGE_GRACE_SECONDS (5), SOAK_KEYCLOAK_PORT.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${1:-${CARGO_TARGET_DIR:-target}/release/gatehouse}"
CACHE="${GATEHOUSE_CACHE:-$HOME/.cache/gatehouse}"
WORK="$CACHE/soak"

[ -x "$BIN" ] || { echo "soak: $BIN missing (cargo build --locked --release -p gatehouse)" >&2; exit 1; }
for tool in redis-server redis-cli curl; do
  command -v "$tool" >/dev/null || { echo "soak: $tool missing (scripts/setup.sh installs it)" >&2; exit 1; }
done
python3 -c 'import requests' 2>/dev/null || python3 -m pip install --quiet requests
scripts/keycloak.sh fetch

rm -rf "$WORK" && mkdir -p "$WORK"
# A private copy: the shared target directory may be rebuilt by someone else during the run.
cp "$BIN" "$WORK/gatehouse"
GATEHOUSE_BIN="$WORK/gatehouse" SOAK_WORK="$WORK" exec python3 scripts/lib/soak.py
