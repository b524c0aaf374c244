#!/usr/bin/env bash
# Caddy for the gateway tests (`forward_auth` in front of Gatehouse's check listener): built once
# with `go install` from the Go module proxy (~3-5 min on 2 cores) and cached; prints its path.
set -euo pipefail
VERSION="v2.11.9"
CACHE="${GATEHOUSE_CACHE:-$HOME/.cache/gatehouse}"
DIR="$CACHE/caddy-$VERSION/bin"
# `caddy version` says "unknown" for a go-installed build, so a stamp file records the version.
if [[ ! -x "$DIR/caddy" || "$(cat "$DIR/.version" 2>/dev/null)" != "$VERSION" ]]; then
    if ! command -v go >/dev/null 2>&1; then
        [[ -x /usr/local/go/bin/go ]] || { echo "caddy.sh: Go not found" >&2; exit 1; }
        PATH="/usr/local/go/bin:$PATH"
    fi
    echo "caddy.sh: installing caddy $VERSION (go install, cached in $DIR)" >&2
    mkdir -p "$DIR"
    GOBIN="$DIR" go install "github.com/caddyserver/caddy/v2/cmd/caddy@$VERSION"
    echo "$VERSION" > "$DIR/.version"
fi
echo "$DIR/caddy"
