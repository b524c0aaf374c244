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

# Caddy for the gateway tests (tests/it/gateway.rs; nginx comes from scripts/setup.sh): built once, cached.
scripts/caddy.sh >/dev/null
# Build first so build time never counts against test time-outs.
cargo test --locked --workspace --no-run
# Integration binaries run one after another; the outage suite stops and restarts Keycloak.
cargo test --locked --workspace

# PocketBase's Gatehouse middleware (Go), the Kubernetes deployment (Helm chart and Envoy
# bootstraps, validated without a cluster), then the whole platform in headless Chromium.
scripts/pocketbase.sh test
scripts/deploy-test.sh
scripts/e2e.sh
