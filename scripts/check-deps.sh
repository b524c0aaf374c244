#!/usr/bin/env bash
# Supply chain, run by `make lint`: `cargo deny check bans licenses sources` against deny.toml
# (ring and openssl banned, permissive licences only, crates.io only, duplicates reported).
# cargo-deny is built once from crates.io and cached under ${GATEHOUSE_CACHE:-~/.cache/gatehouse}.
# A self-test proves the ban list is enforced on this graph: a policy banning a crate we do use
# must fail.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${GATEHOUSE_CACHE:-$HOME/.cache/gatehouse}"
VERSION="0.20.2"
DENY="$CACHE/cargo-deny/bin/cargo-deny"
if ! "$DENY" --version 2>/dev/null | grep -q "$VERSION"; then
    echo "check-deps: installing cargo-deny $VERSION (cargo install, cached in $CACHE/cargo-deny; a few minutes once)" >&2
    cargo install --locked --quiet "cargo-deny@$VERSION" --root "$CACHE/cargo-deny" \
        --target-dir "$CACHE/cargo-install-target"
fi
"$DENY" --log-level error --config deny.toml check bans licenses sources
probe="$(mktemp)"
trap 'rm -f "$probe"' EXIT
sed 's/^    { crate = "ring" },$/    { crate = "ring" },\n    { crate = "tokio" },/' deny.toml >"$probe"
grep -q 'crate = "tokio"' "$probe" || { echo "check-deps: self-test policy not written" >&2; exit 1; }
if "$DENY" --log-level error --config "$probe" check bans >/dev/null 2>&1; then
    echo "check-deps: self-test failed: a banned crate in the graph was not refused" >&2
    exit 1
fi
echo "check-deps: ok (cargo deny: bans, licenses, sources; ban self-test refused tokio)"
