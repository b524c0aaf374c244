#!/usr/bin/env bash
# Fuzz every parser of outside input (fuzz/fuzz_targets/*.rs) for SECONDS each:
#   scripts/fuzz.sh [SECONDS]     (default $FUZZ_SECONDS or 60; `make fuzz`; `make test` runs 15)
# Stable toolchain, no sanitizer (`-s none`): a target fails by panicking, which the parsers must
# never do. New inputs go to a scratch corpus; the seeds in fuzz/corpus/ are only read. A crash
# leaves its input in fuzz/artifacts/TARGET/ (git-ignored) and fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
each="${1:-${FUZZ_SECONDS:-60}}"
CACHE="${GATEHOUSE_CACHE:-$HOME/.cache/gatehouse}"
export PATH="$CACHE/bin:$PATH"
if ! command -v cargo-fuzz >/dev/null; then
    echo "fuzz.sh: installing cargo-fuzz 0.13.2 into $CACHE/bin (once)" >&2
    CARGO_TARGET_DIR="$CACHE/cargo-install-target" cargo install cargo-fuzz --locked --version 0.13.2 --root "$CACHE" >&2
fi
work="$(mktemp -d "${TMPDIR:-/tmp}/gatehouse-fuzz.XXXXXX")"
trap 'rm -rf "$work"' EXIT
# JWT seeds are kept as their JSON header and claims (`*.parts`: two lines) and encoded here, so
# the repository holds no token-shaped strings that secret scanners would flag.
mkdir -p "$work/seeds-jwt"
for parts in fuzz/corpus/jwt/*.parts; do
    b64() { base64 -w0 | tr '+/' '-_' | tr -d '='; }
    { sed -n 1p "$parts" | tr -d '\n' | b64; printf '.'; sed -n 2p "$parts" | tr -d '\n' | b64; printf '.c2ln'; } \
        >"$work/seeds-jwt/$(basename "$parts" .parts)"
done
for src in fuzz/fuzz_targets/*.rs; do
    t="$(basename "$src" .rs)"
    mkdir -p "$work/$t"
    seeds="fuzz/corpus/$t"
    [[ "$t" == jwt ]] && seeds="$work/seeds-jwt"
    if ! cargo fuzz run -s none --target-dir "$CACHE/fuzz-target" "$t" "$work/$t" "$seeds" -- \
        -max_total_time="$each" -rss_limit_mb=2048 -print_final_stats=1 >"$work/$t.log" 2>&1; then
        tail -40 "$work/$t.log" >&2
        echo "fuzz.sh: $t FAILED (input in fuzz/artifacts/$t/)" >&2
        exit 1
    fi
    runs="$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$work/$t.log" | grep -o '[0-9]*$' || echo '?')"
    cov="$(grep -o 'cov: [0-9]*' "$work/$t.log" | tail -1 || true)"
    echo "fuzz.sh: ok $t: $runs runs in ${each}s, $cov"
done
