#!/usr/bin/env bash
# Validate the Kubernetes deployment without a cluster (run by scripts/test.sh):
#   1. helm lint + helm template of deploy/helm/gatehouse with every deploy/helm/gatehouse/ci/*.yaml
#      (Helm 3; Helm 4 must lint too and render the same objects);
#   2. every rendered object against the Kubernetes 1.37 OpenAPI schemas (kubernetes-validate --strict);
#   3. assertions on the manifests (scripts/lib/chart_assert.py), including `gatehouse check-config`
#      of the rendered gatehouse.toml; self-tests prove the assertions catch doctored manifests;
#   4. values.schema.json and the chart's checks refuse bad values with a message naming the value;
#   5. deploy/envoy: the Envoy bootstraps and the chart's sidecar through go-control-plane (Go test).
# Tools, installed once and cached under ${GATEHOUSE_CACHE:-~/.cache/gatehouse}: helm 3 and helm 4
# (go install from the Go module proxy, ~3-5 min each the first time), kubernetes-validate (PyPI, in a venv).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${GATEHOUSE_CACHE:-$HOME/.cache/gatehouse}"
HELM_VERSION="v3.22.0"
HELM4_VERSION="v4.3.2"
KV_VERSION="1.37.0"
KUBE_VERSION="1.37.0"
CHART="$REPO_ROOT/deploy/helm/gatehouse"

log() { echo "deploy-test: $*" >&2; }
die() { log "FAIL: $*"; exit 1; }

if ! command -v go >/dev/null 2>&1; then
    [[ -x /usr/local/go/bin/go ]] || die "Go not found on PATH nor at /usr/local/go/bin/go"
    PATH="/usr/local/go/bin:$PATH"
fi

# --- tools ---
HELM="$CACHE/bin/helm"
if ! "$HELM" version 2>/dev/null | grep -q "${HELM_VERSION%.0}"; then
    log "installing helm $HELM_VERSION (go install, cached in $CACHE/bin)"
    mkdir -p "$CACHE/bin"
    GOBIN="$CACHE/bin" go install "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
fi
# Helm 4 too (the chart must render with both); its own directory, since both binaries are `helm`.
HELM4="$CACHE/helm4/bin/helm"
if ! "$HELM4" version 2>/dev/null | grep -q "${HELM4_VERSION%.*}"; then
    log "installing helm $HELM4_VERSION (go install, cached in $CACHE/helm4/bin)"
    mkdir -p "$CACHE/helm4/bin"
    GOBIN="$CACHE/helm4/bin" go install "helm.sh/helm/v4/cmd/helm@$HELM4_VERSION"
fi
VENV="$CACHE/kubernetes-validate"
KV="$VENV/bin/kubernetes-validate"
if ! "$KV" --version 2>/dev/null | grep -q "$KV_VERSION"; then
    log "installing kubernetes-validate $KV_VERSION (PyPI, venv in $VENV)"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet "kubernetes-validate==$KV_VERSION"
fi
PY="$VENV/bin/python" # has PyYAML (a kubernetes-validate dependency)

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CACHE/target}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# Copy the binary right after building it: the target directory may be shared.
(cd "$REPO_ROOT" && cargo build --locked -q -p gatehouse --bin gatehouse)
cp "$CARGO_TARGET_DIR/debug/gatehouse" "$work/gatehouse"
GATEHOUSE="$work/gatehouse"

render() { "$HELM" template gh "$CHART" --namespace gatehouse --kube-version "$KUBE_VERSION" "$@"; }

# The chart ships the alerting rules as a PrometheusRule from its own copy (Helm reads files
# inside the chart only): the copy must be the promtool-tested original.
cmp -s "$REPO_ROOT/deploy/prometheus/gatehouse-alerts.yml" "$CHART/files/gatehouse-alerts.yml" ||
    die "deploy/helm/gatehouse/files/gatehouse-alerts.yml differs from deploy/prometheus/gatehouse-alerts.yml (copy it)"

# --- 1-3: lint, render, validate, assert ---
envoy_renders=()
for values in "$CHART"/ci/*.yaml; do
    name="$(basename "$values" .yaml)"
    out="$work/$name"
    mkdir -p "$out"
    "$HELM" lint "$CHART" --strict --quiet --kube-version "$KUBE_VERSION" -f "$values" >"$out/lint.txt" 2>&1 ||
        { cat "$out/lint.txt" >&2; die "helm lint $name"; }
    render -f "$values" >"$out/rendered.yaml" || die "helm template $name"
    "$KV" --strict --quiet "$out/rendered.yaml" >"$out/validate.txt" 2>&1 || { cat "$out/validate.txt" >&2; die "kubernetes-validate $name"; }
    # Only the CRD kinds (no schema in kubernetes-validate) may be skipped; chart_assert checks them.
    if grep -v -E "Couldn't find schema for kind (Certificate|ServiceMonitor|PrometheusRule) " "$out/validate.txt" | grep -q .; then
        cat "$out/validate.txt" >&2
        die "kubernetes-validate $name: unexpected output"
    fi
    "$PY" "$REPO_ROOT/scripts/lib/chart_assert.py" "$values" "$out/rendered.yaml" "$out" "$GATEHOUSE" || die "assertions on $name"
    [[ -f "$out/envoy.yaml" ]] && envoy_renders+=("$out")
    # Helm 4: lints, and renders the same objects (it differs only in blank lines), so every check above holds for it.
    "$HELM4" lint "$CHART" --strict --quiet --kube-version "$KUBE_VERSION" -f "$values" >"$out/lint4.txt" 2>&1 ||
        { cat "$out/lint4.txt" >&2; die "helm 4 lint $name"; }
    "$HELM4" template gh "$CHART" --namespace gatehouse --kube-version "$KUBE_VERSION" -f "$values" >"$out/rendered4.yaml" ||
        die "helm 4 template $name"
    diff <(grep -v '^[[:space:]]*$' "$out/rendered.yaml") <(grep -v '^[[:space:]]*$' "$out/rendered4.yaml") >&2 ||
        die "helm 4 renders $name differently from helm 3"
    log "ok   $name: lint, $(grep -c '^kind:' "$out/rendered.yaml") objects valid (Kubernetes $KUBE_VERSION, strict), assertions, check-config; Helm 4 identical"
done
((${#envoy_renders[@]} > 0)) || die "no values file enables the Envoy sidecar"

# Self-tests: each doctored manifest must be caught by chart_assert.py.
base="$work/everything-values"
everything="$CHART/ci/everything-values.yaml"
expect_caught() {
    local what="$1" values="$2" manifest="$3"
    "$PY" "$REPO_ROOT/scripts/lib/chart_assert.py" "$values" "$manifest" "$work/selftest" "$GATEHOUSE" --expect-fail >/dev/null ||
        die "self-test: $what was not caught"
    log "ok   self-test: $what is caught"
}
mkdir -p "$work/selftest"
sed '/kind: Ingress/,/^---/ s/name: gh-gatehouse-public/name: gh-gatehouse-internal/' "$base/rendered.yaml" >"$work/selftest/ingress.yaml"
expect_caught "an Ingress path to the internal Service" "$everything" "$work/selftest/ingress.yaml"
# One caller fewer in the values than in the rendered NetworkPolicy: the policy admits an unlisted peer.
"$PY" -c 'import sys, yaml; v = yaml.safe_load(open(sys.argv[1])); v["internal"]["callers"].append({"id": "spiffe://cluster.local/ns/x/sa/y", "namespace": "x"}); yaml.safe_dump(v, open(sys.argv[2], "w"))' \
    "$everything" "$work/selftest/more-callers.yaml"
render -f "$work/selftest/more-callers.yaml" >"$work/selftest/more-callers-rendered.yaml"
expect_caught "a NetworkPolicy peer that is not a configured caller" "$everything" "$work/selftest/more-callers-rendered.yaml"
sed 's/^    \[admin\]$/    # ci-client-secret-value-1b2c3d\n    [admin]/' "$base/rendered.yaml" >"$work/selftest/leak.yaml"
grep -q '# ci-client-secret-value-1b2c3d' "$work/selftest/leak.yaml" || die "self-test: leak not inserted"
expect_caught "a secret value in the ConfigMap" "$everything" "$work/selftest/leak.yaml"
sed '0,/readOnlyRootFilesystem: true/ s//readOnlyRootFilesystem: false/' "$base/rendered.yaml" >"$work/selftest/rw.yaml"
expect_caught "a writable root filesystem" "$everything" "$work/selftest/rw.yaml"
sed 's/^    mode = "envoy"$/    mode = "envoy"\n    bogus = 1/' "$base/rendered.yaml" >"$work/selftest/badtoml.yaml"
expect_caught "a gatehouse.toml that check-config refuses" "$everything" "$work/selftest/badtoml.yaml"
sed '/kind: PrometheusRule/,$ s/for: 5m$/for: 50m/' "$base/rendered.yaml" >"$work/selftest/rule.yaml"
expect_caught "a PrometheusRule that is not the tested rules" "$everything" "$work/selftest/rule.yaml"

# --- 4: bad values are refused, naming the value ---
minimal="$CHART/ci/minimal-values.yaml"
refused() {
    local want="$1" base="$minimal"
    shift
    if [[ "$1" == --base ]]; then base="$2"; shift 2; fi
    local err
    if err="$(render -f "$base" "$@" 2>&1 >/dev/null)"; then die "helm template accepted $*"; fi
    grep -qF -- "$want" <<<"$err" || die "helm template $* failed without naming '$want': $err"
    log "ok   refused ($want): $*"
}
refused "/config/public/externalUrl': got number" --set config.public.externalUrl=42
refused "'externalURL' not allowed" --set config.public.externalURL=https://x.example
refused "/replicaCount" --set replicaCount=two
refused "/config/public/externalUrl" --set config.public.externalUrl=
refused "/config/oidc/issuer" --set config.oidc.issuer=http://keycloak.example.com/realms/x
refused "replicaCount is 3" --set replicaCount=3
refused "/podAntiAffinity" --set podAntiAffinity=maybe
refused "/store/mode" --set store.mode=memcached
refused "/internal/callers/0/id" --set 'internal.callers[0].id=spiffe://Cluster.local/x' --set 'internal.callers[0].namespace=data'
refused "secrets.adminToken" --set secrets.adminToken=
refused "networkPolicy.egress.keycloak" --set networkPolicy.egress.keycloak=null
refused "internal.tls.certManager.issuerRef.name" --set internal.tls.certManager.issuerRef.name=
refused "store.redis.tls" --base "$CHART/ci/redis-sentinel-values.yaml" --set store.redis.tls.caSecret=x
refused "not a SPIFFE ID" --set envoy.enabled=true --set 'internal.callers[0].id=pocketbase.data.svc' --set 'internal.callers[0].namespace=data'

# --- 5: Envoy bootstraps (go-control-plane) ---
cd "$REPO_ROOT/deploy/envoy"
export GOFLAGS="${GOFLAGS:+$GOFLAGS }-mod=readonly"
go vet ./... || die "go vet deploy/envoy"
go test -count=1 ./... || die "Envoy bootstraps"
for out in "${envoy_renders[@]}"; do
    GATEHOUSE_ENVOY_RENDERED="$out/envoy.yaml" GATEHOUSE_ENVOY_RENDERED_ALLOW="$(cat "$out/envoy-allow.txt")" \
        go test -count=1 -run TestRenderedSidecar ./... >/dev/null || die "the chart's Envoy sidecar ($(basename "$out"))"
    # ... and the principal check can fail: with one caller fewer than rendered, it must.
    if GATEHOUSE_ENVOY_RENDERED="$out/envoy.yaml" GATEHOUSE_ENVOY_RENDERED_ALLOW="$(cut -d, -f1 "$out/envoy-allow.txt"),spiffe://cluster.local/ns/x/sa/other" \
        go test -count=1 -run TestRenderedSidecar ./... >/dev/null 2>&1; then
        die "self-test: the Go test accepted RBAC principals that differ from the callers ($(basename "$out"))"
    fi
    log "ok   Envoy sidecar rendered by the chart ($(basename "$out")): parsed, validated, RBAC = callers"
done
log "all deployment checks passed"
