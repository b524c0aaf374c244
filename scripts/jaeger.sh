#!/usr/bin/env bash
# Jaeger all-in-one, the trace backend of the observability tests.
#
#   scripts/jaeger.sh build   build (once, cached) and print the binary's path (the only stdout line)
#
# `go install …/cmd/jaeger@VERSION` is refused (Jaeger's go.mod has replace directives), so the
# binary is built from a scratch module that requires it as a tool. The first build takes ~8 min
# on 2 cores; later calls find the cached binary and return at once. With no flags the binary runs
# all-in-one with in-memory storage: OTLP on 4317 (gRPC) / 4318 (HTTP), query API on 16686; the
# tests move every port with flags, so parallel runs do not collide.
set -euo pipefail

VERSION="${JAEGER_VERSION:-v1.76.0}"
CACHE="${GATEHOUSE_CACHE:-$HOME/.cache/gatehouse}"
BIN="$CACHE/bin/jaeger-$VERSION"

log() { echo "jaeger.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

if ! command -v go >/dev/null 2>&1; then
    [[ -x /usr/local/go/bin/go ]] || die "Go not found on PATH nor at /usr/local/go/bin/go"
    PATH="/usr/local/go/bin:$PATH"
fi

case "${1:-}" in
build)
    if [[ -x "$BIN" ]]; then echo "$BIN"; exit 0; fi
    mkdir -p "$CACHE/bin" "$CACHE/jaeger-src"
    work="$(mktemp -d "$CACHE/jaeger-src/build.XXXXXX")"
    trap 'rm -rf "$work"' EXIT
    cd "$work"
    log "building Jaeger $VERSION into $BIN (first build ~8 min) ..."
    # GOFLAGS from the caller (e.g. -mod=readonly) would refuse the scratch module's go get.
    export GOFLAGS=""
    go mod init gatehouse.local/jaeger-build >/dev/null 2>&1
    go get -tool "github.com/jaegertracing/jaeger/cmd/jaeger@$VERSION" >&2
    tmp="$(mktemp "$CACHE/bin/.jaeger.XXXXXX")"
    go build -o "$tmp" github.com/jaegertracing/jaeger/cmd/jaeger >&2
    chmod 755 "$tmp"
    mv -f "$tmp" "$BIN"
    echo "$BIN"
    ;;
*)
    sed -n '2,4p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2
    ;;
esac
