#!/usr/bin/env bash
# PocketBase with Gatehouse session authentication (integrations/pocketbase).
#
#   scripts/pocketbase.sh build   build the binary; prints its path (the only line on stdout)
#   scripts/pocketbase.sh test    go vet + go test ./... of the integration
#
# The binary lands in ${GATEHOUSE_CACHE:-$HOME/.cache/gatehouse}/pocketbase/, outside the repo,
# next to the other build outputs. Callers (demo.sh, e2e.sh) capture stdout, so everything else
# goes to stderr.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SRC="$REPO_ROOT/integrations/pocketbase"
CACHE="${GATEHOUSE_CACHE:-$HOME/.cache/gatehouse}"
OUT_DIR="$CACHE/pocketbase"
BIN="$OUT_DIR/gatehouse-pocketbase"

log() { echo "pocketbase.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }
usage() { sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }

# Non-login shells (CI, cron) often lack /usr/local/go/bin on PATH although Go is installed there.
if ! command -v go >/dev/null 2>&1; then
    [[ -x /usr/local/go/bin/go ]] || die "Go not found on PATH nor at /usr/local/go/bin/go"
    PATH="/usr/local/go/bin:$PATH"
fi
# PocketBase v0.40 needs Go 1.27; the machine has 1.26. The go command fetches the approved 1.27
# toolchain from the Go module proxy (once, ~76 MB, cached in the module cache). A machine ignores
# go.mod's version line unless GOTOOLCHAIN says so, hence the export (override it if you must).
export GOTOOLCHAIN="${GOTOOLCHAIN_OVERRIDE:-go1.27.3}"
# go.mod pins the module versions; go.sum is committed, so a build must not rewrite either.
export GOFLAGS="${GOFLAGS:+$GOFLAGS }-mod=readonly"

cmd="${1:-}"
case "$cmd" in
build)
    mkdir -p "$OUT_DIR"
    cd "$SRC"
    # go build is incremental (its cache lives outside the repo), so an unchanged tree relinks in a
    # second or two; the first build compiles PocketBase and pure-Go SQLite and takes minutes.
    # Build to a temporary name and rename: a running demo keeps its binary intact, and a failed
    # build never leaves a half-written one behind.
    # A unique temporary name, so two scripts building at once (demo and e2e) do not collide.
    tmp="$(mktemp "$OUT_DIR/.gatehouse-pocketbase.XXXXXX")"
    trap 'rm -f "$tmp"' EXIT
    log "building $BIN (the first build takes a few minutes) ..."
    go build -o "$tmp" .
    chmod 755 "$tmp"
    mv -f "$tmp" "$BIN"
    echo "$BIN"
    ;;
test)
    cd "$SRC"
    go vet ./...
    # -count=1: the tests start servers and depend on the clock; a cached pass proves nothing.
    go test -count=1 ./...
    ;;
*)
    usage
    ;;
esac
