#!/usr/bin/env bash
# Real-Keycloak tooling for Gatehouse tests and the demo (no Docker).
#
#   scripts/keycloak.sh fetch              download + unpack Keycloak into the cache (once)
#   scripts/keycloak.sh start NAME PORT    start instance NAME on http://localhost:PORT
#   scripts/keycloak.sh stop NAME          stop instance NAME
#   scripts/keycloak.sh status NAME        show whether instance NAME is running
#
# Conventional instances: `demo` on 8180, `test` on 18180.
# Each instance has its own copy of the distribution (and so its own H2
# database) under $CACHE/keycloak/instances/NAME. The database is wiped on each
# start so the realm in deploy/keycloak/gatehouse-realm.json is always freshly
# imported (set KEYCLOAK_KEEP_DB=1 to keep it).
#
# Environment:
#   GATEHOUSE_CACHE        cache dir (default $HOME/.cache/gatehouse)
#   KEYCLOAK_VERSION       Keycloak version (default 26.7.3)
#   GATEHOUSE_REALM_FILE   realm JSON (default deploy/keycloak/gatehouse-realm.json)
#   KEYCLOAK_START_TIMEOUT seconds to wait for readiness (default 240)
#   KEYCLOAK_KEEP_DB       1 = keep the instance database between starts
#
# Needs: mvn (only for the first fetch), unzip, curl, flock, and a JDK >= 21
# (Temurin 25 at /usr/lib/jvm/temurin-25-jdk-amd64 is preferred).
set -euo pipefail

KEYCLOAK_VERSION="${KEYCLOAK_VERSION:-26.7.3}"
CACHE="${GATEHOUSE_CACHE:-$HOME/.cache/gatehouse}"
KC_CACHE="$CACHE/keycloak"
ZIP="$KC_CACHE/keycloak-quarkus-dist-$KEYCLOAK_VERSION.zip"
DIST="$KC_CACHE/keycloak-$KEYCLOAK_VERSION"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REALM_FILE="${GATEHOUSE_REALM_FILE:-$REPO_ROOT/deploy/keycloak/gatehouse-realm.json}"
REALM="gatehouse"
START_TIMEOUT="${KEYCLOAK_START_TIMEOUT:-240}"
PREFERRED_JDK="/usr/lib/jvm/temurin-25-jdk-amd64"

log() { echo "keycloak.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

usage() {
    sed -n '2,8p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

need() { command -v "$1" >/dev/null 2>&1 || die "'$1' not found on PATH ($2)"; }

# ---------------------------------------------------------------- java

java_major() { # $1 = path to a java binary; prints the major version or nothing
    "$1" -XshowSettings:properties -version 2>&1 |
        sed -n 's/^ *java\.specification\.version = \([0-9]*\).*/\1/p' | head -n1
}

find_java_home() {
    local candidates=("$PREFERRED_JDK") c major java_bin
    [[ -n "${JAVA_HOME:-}" ]] && candidates+=("$JAVA_HOME")
    for c in "${candidates[@]}"; do
        if [[ -x "$c/bin/java" ]]; then
            major="$(java_major "$c/bin/java")"
            if [[ -n "$major" && "$major" -ge 21 ]]; then echo "$c"; return; fi
        fi
    done
    if java_bin="$(command -v java 2>/dev/null)"; then
        java_bin="$(readlink -f "$java_bin")"
        major="$(java_major "$java_bin")"
        if [[ -n "$major" && "$major" -ge 21 ]]; then dirname "$(dirname "$java_bin")"; return; fi
    fi
    die "no JDK >= 21 found (Keycloak $KEYCLOAK_VERSION needs one). Expected Temurin 25 at $PREFERRED_JDK (preinstalled on the project machines); otherwise point JAVA_HOME at a JDK >= 21"
}

# ---------------------------------------------------------------- fetch

cmd_fetch() {
    mkdir -p "$KC_CACHE"
    [[ -x "$DIST/bin/kc.sh" ]] && return 0
    need unzip "install it with: apt-get install -y unzip"
    need flock "util-linux"
    # One fetch at a time (tests may start several instances concurrently).
    exec 8>"$KC_CACHE/.fetch.lock"
    flock 8
    if [[ ! -x "$DIST/bin/kc.sh" ]]; then
        rm -rf "$KC_CACHE"/.unzip.* "$KC_CACHE"/.download.* # leftovers of an interrupted fetch
        if [[ ! -s "$ZIP" ]]; then
            need mvn "Keycloak is downloaded from Maven Central with mvn: apt-get install -y maven"
            log "downloading Keycloak $KEYCLOAK_VERSION from Maven Central ..."
            local dl
            dl="$(mktemp -d "$KC_CACHE/.download.XXXXXX")"
            mvn -B -q org.apache.maven.plugins:maven-dependency-plugin:3.8.1:copy \
                -Dartifact="org.keycloak:keycloak-quarkus-dist:$KEYCLOAK_VERSION:zip" \
                -DoutputDirectory="$dl" >&2 || { rm -rf "$dl"; die "mvn download failed"; }
            mv "$dl/keycloak-quarkus-dist-$KEYCLOAK_VERSION.zip" "$ZIP"
            rm -rf "$dl"
        fi
        log "unpacking $(basename "$ZIP") ..."
        local tmp
        tmp="$(mktemp -d "$KC_CACHE/.unzip.XXXXXX")"
        if ! unzip -q "$ZIP" -d "$tmp"; then
            rm -rf "$tmp"
            rm -f "$ZIP" # most likely a truncated download; fetch again next time
            die "unzip of $ZIP failed (zip removed, run fetch again)"
        fi
        # Rename is atomic: an interrupted unzip never leaves a half tree at $DIST.
        mv "$tmp/keycloak-$KEYCLOAK_VERSION" "$DIST"
        rm -rf "$tmp"
    fi
    flock -u 8
    exec 8>&-
    log "Keycloak $KEYCLOAK_VERSION ready in $DIST"
}

# ---------------------------------------------------------------- instances

check_name() {
    [[ "${1:-}" =~ ^[A-Za-z0-9_-]+$ ]] || die "instance name must match [A-Za-z0-9_-]+ (got '${1:-}')"
}
inst_dir() { echo "$KC_CACHE/instances/$1"; }

# PID of the running instance, or nothing.
running_pid() {
    local pidfile pid
    pidfile="$(inst_dir "$1")/keycloak.pid"
    [[ -f "$pidfile" ]] || return 0
    pid="$(cat "$pidfile")"
    # Guard against PID reuse: the process must belong to this instance.
    if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null &&
        tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF "$(inst_dir "$1")/"; then
        echo "$pid"
    fi
}

discovery_url() { echo "http://localhost:$1/realms/$REALM/.well-known/openid-configuration"; }

healthy() { curl -fsS -o /dev/null --max-time 5 "$(discovery_url "$1")" 2>/dev/null; }

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

cmd_start() {
    local name="${1:-}" port="${2:-}"
    check_name "$name"
    [[ "$port" =~ ^[0-9]+$ ]] || die "usage: start NAME PORT"
    need curl "apt-get install -y curl"
    [[ -f "$REALM_FILE" ]] || die "realm file not found: $REALM_FILE"

    local dir
    dir="$(inst_dir "$name")"
    mkdir -p "$dir"
    # Serialise concurrent starts/stops of the same instance.
    exec 9>"$dir.lock"
    flock 9

    local pid
    pid="$(running_pid "$name")"
    if [[ -n "$pid" ]]; then
        local running_port
        running_port="$(cat "$dir/keycloak.port" 2>/dev/null || true)"
        if [[ "$running_port" == "$port" ]] && healthy "$port"; then
            log "instance '$name' already running (pid $pid) on http://localhost:$port"
            return 0
        fi
        if [[ "$running_port" == "$port" ]]; then
            log "instance '$name' (pid $pid) is not answering on port $port; restarting"
        else
            log "instance '$name' (pid $pid) runs on port ${running_port:-?}; restarting on port $port"
        fi
        stop_locked "$name"
    fi
    if port_in_use "$port"; then
        die "port $port is already in use by another process (not instance '$name')"
    fi

    cmd_fetch
    local java_home
    java_home="$(find_java_home)"

    local home="$dir/keycloak"
    if [[ "$(cat "$dir/version" 2>/dev/null || true)" != "$KEYCLOAK_VERSION" ]]; then
        log "creating instance '$name' from Keycloak $KEYCLOAK_VERSION ..."
        rm -rf "$home" "$home.tmp"
        cp -a "$DIST" "$home.tmp"
        mv "$home.tmp" "$home"
        echo "$KEYCLOAK_VERSION" >"$dir/version"
    fi

    if [[ "${KEYCLOAK_KEEP_DB:-0}" != 1 ]]; then
        rm -rf "$home/data/h2"
    fi
    mkdir -p "$home/data/import"
    cp "$REALM_FILE" "$home/data/import/gatehouse-realm.json"

    log "starting instance '$name' on http://localhost:$port (JAVA_HOME=$java_home) ..."
    local t0=$SECONDS
    # setsid: own process group, so stop can signal kc.sh and java together.
    JAVA_HOME="$java_home" \
        KC_BOOTSTRAP_ADMIN_USERNAME=admin KC_BOOTSTRAP_ADMIN_PASSWORD=admin \
        setsid nohup "$home/bin/kc.sh" start-dev \
        --http-port "$port" \
        --hostname "http://localhost:$port" \
        --hostname-backchannel-dynamic true \
        --import-realm \
        </dev/null >"$dir/keycloak.log" 2>&1 8>&- 9>&- &
    pid=$!
    echo "$pid" >"$dir/keycloak.pid"
    echo "$port" >"$dir/keycloak.port"

    until healthy "$port"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            rm -f "$dir/keycloak.pid"
            tail -n 40 "$dir/keycloak.log" >&2 || true
            die "Keycloak exited during startup; see $dir/keycloak.log"
        fi
        if ((SECONDS - t0 >= START_TIMEOUT)); then
            tail -n 40 "$dir/keycloak.log" >&2 || true
            stop_locked "$name"
            die "Keycloak not ready after ${START_TIMEOUT}s; see $dir/keycloak.log"
        fi
        sleep 1
    done
    log "instance '$name' ready on http://localhost:$port after $((SECONDS - t0))s (pid $pid, log $dir/keycloak.log)"
}

# Stop an instance; caller holds the instance lock.
stop_locked() {
    local name="$1" dir pid
    dir="$(inst_dir "$name")"
    pid="$(running_pid "$name")"
    if [[ -z "$pid" ]]; then
        rm -f "$dir/keycloak.pid"
        log "instance '$name' is not running"
        return 0
    fi
    local t0=$SECONDS
    # The pid is a process-group leader (setsid); signal the whole group.
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    local i
    for ((i = 0; i < 300; i++)); do # 30 s
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "instance '$name' did not stop after 30s; sending KILL"
        kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
        while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
    fi
    rm -f "$dir/keycloak.pid"
    log "instance '$name' stopped after $((SECONDS - t0))s"
}

cmd_stop() {
    local name="${1:-}"
    check_name "$name"
    local dir
    dir="$(inst_dir "$name")"
    [[ -d "$dir" ]] || { log "instance '$name' does not exist"; return 0; }
    exec 9>"$dir.lock"
    flock 9
    stop_locked "$name"
}

# Exit status: 0 running and healthy, 1 running but not answering, 3 stopped.
cmd_status() {
    local name="${1:-}"
    check_name "$name"
    local dir pid port
    dir="$(inst_dir "$name")"
    pid="$(running_pid "$name")"
    port="$(cat "$dir/keycloak.port" 2>/dev/null || true)"
    if [[ -z "$pid" ]]; then
        echo "$name: stopped"
        return 3
    fi
    if [[ -n "$port" ]] && healthy "$port"; then
        echo "$name: running (pid $pid) http://localhost:$port/realms/$REALM"
        return 0
    fi
    echo "$name: running (pid $pid) on port ${port:-?} but not answering (starting?); log $dir/keycloak.log"
    return 1
}

case "${1:-}" in
fetch) shift; cmd_fetch "$@" ;;
start) shift; cmd_start "$@" ;;
stop) shift; cmd_stop "$@" ;;
status) shift; cmd_status "$@" ;;
*) usage ;;
esac
