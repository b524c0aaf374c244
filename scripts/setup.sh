#!/usr/bin/env bash
# Install what the project needs on a fresh machine, idempotently: Debian packages for the test
# and benchmark tooling. Rust, Java (Temurin 25 for Keycloak) and Maven come with the machine.
set -euo pipefail

need=()
command -v jq >/dev/null || need+=(jq)
command -v curl >/dev/null || need+=(curl)
command -v unzip >/dev/null || need+=(unzip)
command -v mvn >/dev/null || need+=(maven)
command -v wrk >/dev/null || need+=(wrk)
command -v redis-server >/dev/null || need+=(redis-server)
command -v redis-sentinel >/dev/null || need+=(redis-sentinel)
# nginx (auth_request) fronts Gatehouse's check listener in the gateway tests; run unprivileged per test.
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx)
# Python venvs hold the offline Kubernetes schema validator (scripts/deploy-test.sh installs it from PyPI).
python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
# promtool (Debian `prometheus`) checks /metrics, the alerting rules and their unit tests.
command -v promtool >/dev/null || need+=(prometheus)
# Headless Chromium for the browser tests (playwright-core drives it; it cannot download browsers here).
[ -x /usr/bin/chromium ] || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  # Packages with daemons (prometheus, redis) must not start them: the tests start their own on
  # free ports. policy-rc.d says "no" to service starts during this install only.
  added_policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod 755 /usr/sbin/policy-rc.d
    added_policy=1
  fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
  if [ -n "$added_policy" ]; then $SUDO rm -f /usr/sbin/policy-rc.d; fi
fi
command -v cargo >/dev/null || { echo "setup: cargo (Rust) is required: https://rustup.rs" >&2; exit 1; }
# Go builds PocketBase (integrations/pocketbase); Node.js runs the browser tests. Both come with the machine.
command -v go >/dev/null || [ -x /usr/local/go/bin/go ] || { echo "setup: Go is required for integrations/pocketbase" >&2; exit 1; }
command -v node >/dev/null && command -v npm >/dev/null || { echo "setup: Node.js and npm are required for the browser tests" >&2; exit 1; }
