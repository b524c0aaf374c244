#!/usr/bin/env bash
# One crypto backend (aws-lc-rs). If `ring` is compiled into the tree, rustls' provider lookup
# can panic at runtime, so fail the build instead. (`ring` may sit in Cargo.lock for an optional
# feature nobody enables; only what `cargo tree` would build counts.)
set -euo pipefail
tree=$(cargo tree --locked --workspace --target all -e normal,build,dev -i ring 2>/dev/null || true)
if [ -n "$tree" ]; then
  echo "check-deps: the crate \`ring\` is in the dependency tree; use aws-lc-rs only:" >&2
  echo "$tree" >&2
  exit 1
fi
echo "check-deps: ok (ring is not built)"
