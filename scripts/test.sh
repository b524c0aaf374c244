#!/usr/bin/env bash
# The full suite: start a real Keycloak (test instance), run the Rust unit and integration tests,
# PocketBase's Go tests, the deployment checks (Helm chart, Envoy configs), and the browser tests
# of the whole platform; stop Keycloak.
set -euo pipefail
cd "$(dirname "$0")/.."
port="${KEYCLOAK_TEST_PORT:-18180}"
export KEYCLOAK_URL="${KEYCLOAK_URL:-http://localhost:$port}"

scripts/keycloak.sh fetch
cleanup() { scripts/keycloak.sh stop test || true; }
trap cleanup EXIT
scripts/keycloak.sh start test "$port"

# Jaeger (trace backend of the tracing test), built once from the Go module proxy and cached.
JAEGER_BIN="$(scripts/jaeger.sh build)"
export JAEGER_BIN
# PocketBase with the Gatehouse integration: the trace test puts it between proxy and exchange.
POCKETBASE_BIN="$(scripts/pocketbase.sh build)"
export POCKETBASE_BIN

# Caddy for the gateway tests (tests/it/gateway.rs; nginx comes from scripts/setup.sh): built once, cached.
scripts/caddy.sh >/dev/null
# Build first so build time never counts against test time-outs.
cargo test --locked --workspace --no-run
# Integration binaries run one after another; the outage suite stops and restarts Keycloak.
# tests/it/observability.rs runs promtool (check metrics on a live /metrics, check and unit-test
# the alert rules in deploy/prometheus/, cross-check rule and dashboard metric names).
cargo test --locked --workspace

# Every parser of outside input under libFuzzer for a short while (make fuzz runs longer).
scripts/fuzz.sh 15

# PocketBase's Gatehouse middleware (Go), the Kubernetes deployment (Helm chart and Envoy
# bootstraps, validated without a cluster), then the whole platform in headless Chromium.
scripts/pocketbase.sh test
scripts/deploy-test.sh
scripts/e2e.sh
