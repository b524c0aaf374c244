#!/usr/bin/env bash
# One crypto backend (aws-lc-rs). If `ring` enters the tree, rustls' default provider lookup
# panics at runtime, so fail the build instead.
set -euo pipefail
if cargo tree --locked -i ring >/dev/null 2>&1; then
  echo "check-deps: the crate \`ring\` is in the dependency tree; use aws-lc-rs only:" >&2
  cargo tree --locked -i ring >&2
  exit 1
fi
echo "check-deps: ok (no ring in the tree)"
