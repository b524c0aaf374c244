#!/usr/bin/env python3
"""Assertions on the Helm chart's rendered manifests (run by scripts/deploy-test.sh).

usage: chart_assert.py VALUES RENDERED OUTDIR GATEHOUSE_BIN [--expect-fail]

Checks what a schema validator cannot: the internal Service is unreachable through the Ingress,
the NetworkPolicy's internal-port rule names exactly the configured callers, no secret value
appears in a ConfigMap, env value or annotation, the pods run non-root on a read-only root
filesystem without capabilities, and the rendered gatehouse.toml passes `gatehouse check-config`
(with its file paths pointed at test files). With an Envoy sidecar, its bootstrap is written to
OUTDIR/envoy.yaml and the expected RBAC principals to OUTDIR/envoy-allow.txt for the Go test.
--expect-fail inverts the exit status (the script's own self-test on doctored manifests).
"""

import base64
import os
import re
import shutil
import subprocess
import sys

import yaml

errors = []


def fail(msg):
    errors.append(msg)


def docs_of(text):
    return [d for d in yaml.safe_load_all(text) if d]


def containers(pod_spec):
    return pod_spec.get("containers", []) + pod_spec.get("initContainers", [])


def peer_of(caller):
    """The NetworkPolicy peer the chart must write for one internal.callers entry."""
    p = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": caller["namespace"]}}}
    if caller.get("podLabels"):
        p["podSelector"] = {"matchLabels": caller["podLabels"]}
    return p


def canon(x):
    return yaml.safe_dump(x, sort_keys=True)


def main():
    values_path, rendered_path, outdir, gatehouse = sys.argv[1:5]
    values = yaml.safe_load(open(values_path)) or {}
    objs = docs_of(open(rendered_path).read())
    by_kind = {}
    for o in objs:
        by_kind.setdefault(o["kind"], []).append(o)

    deployments = by_kind.get("Deployment", [])
    if len(deployments) != 1:
        fail(f"expected one Deployment, got {len(deployments)}")
        return
    dep = deployments[0]
    fullname = dep["metadata"]["name"]
    pod = dep["spec"]["template"]["spec"]
    services = {s["metadata"]["name"]: s for s in by_kind.get("Service", [])}
    public, internal = f"{fullname}-public", f"{fullname}-internal"
    internal_enabled = values.get("internal", {}).get("enabled", True)
    envoy = values.get("envoy", {}).get("enabled", False)

    # --- Layer 1: two Services; the Ingress reaches only the public one. ---
    if public not in services:
        fail(f"no Service {public}")
    elif any(p["port"] == 8443 or p.get("targetPort") == "internal" for p in services[public]["spec"]["ports"]):
        fail(f"the public Service {public} exposes the internal port")
    if internal_enabled:
        svc = services.get(internal)
        if not svc:
            fail(f"no Service {internal}")
        else:
            if svc["spec"].get("type", "ClusterIP") != "ClusterIP":
                fail(f"{internal} must be ClusterIP, is {svc['spec'].get('type')}")
            if [(p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] != [(8443, "internal")]:
                fail(f"{internal} must expose only 8443 -> internal: {svc['spec']['ports']}")
    for ing in by_kind.get("Ingress", []):
        spec = ing["spec"]
        if "defaultBackend" in spec:
            fail("the Ingress has a defaultBackend")
        for rule in spec.get("rules", []):
            for path in rule.get("http", {}).get("paths", []):
                s = path["backend"].get("service", {})
                if s.get("name") != public or s.get("port", {}).get("name") != "http":
                    fail(f"Ingress path {path['path']} goes to {s}, not {public}:http")
    if values.get("ingress", {}).get("enabled") and not by_kind.get("Ingress"):
        fail("ingress.enabled but no Ingress rendered")

    # --- Layer 2: the NetworkPolicy. ---
    np_on = values.get("networkPolicy", {}).get("enabled", True)
    nps = by_kind.get("NetworkPolicy", [])
    if np_on and len(nps) != 1:
        fail(f"networkPolicy.enabled but {len(nps)} NetworkPolicies")
    for np in nps:
        spec = np["spec"]
        if sorted(spec.get("policyTypes", [])) != ["Egress", "Ingress"]:
            fail(f"NetworkPolicy policyTypes {spec.get('policyTypes')}: both Ingress and Egress must be restricted")
        internal_rules = []
        for rule in spec.get("ingress", []):
            if not rule.get("from"):
                fail(f"an ingress rule without `from` admits everyone: {rule}")
            if not rule.get("ports"):
                fail(f"an ingress rule without `ports` opens every port: {rule}")
            if any(p.get("port") in (8443, "internal") for p in rule.get("ports", [])):
                internal_rules.append(rule)
        callers = values.get("internal", {}).get("callers", []) if internal_enabled else []
        if callers:
            want = sorted(canon(peer_of(c)) for c in callers)
            if len(internal_rules) != 1:
                fail(f"want exactly one ingress rule for the internal port, got {len(internal_rules)}")
            else:
                got = sorted(canon(p) for p in internal_rules[0]["from"])
                if got != want:
                    fail(f"internal-port peers {got} != configured callers {want}")
                if [p["port"] for p in internal_rules[0]["ports"]] != [8443]:
                    fail(f"the callers' rule opens more than 8443: {internal_rules[0]['ports']}")
        elif internal_rules:
            fail("no callers configured, yet an ingress rule admits the internal port")
        for rule in spec.get("egress", []):
            if not rule.get("to") or not rule.get("ports"):
                fail(f"an egress rule without `to` or `ports` allows everything: {rule}")

    # --- No secret value in a ConfigMap, an env value or an annotation. ---
    secret_values = set()
    sv = values.get("secrets", {})
    for k in ("clientSecret", "encryptionKey", "adminToken", "redisPassword", "redisUrl"):
        if sv.get(k):
            secret_values.add(sv[k])
    for sec in by_kind.get("Secret", []):
        for v in (sec.get("data") or {}).values():
            secret_values.add(base64.b64decode(v).decode())
        for v in (sec.get("stringData") or {}).values():
            secret_values.add(v)
    if sv.get("existingSecret") and by_kind.get("Secret"):
        fail("secrets.existingSecret is set, yet the chart rendered a Secret")
    # Parts of URLs count too (the password inside redis://:pw@host).
    for v in list(secret_values):
        m = re.match(r"rediss?://(?:[^:@/]*):([^@/]+)@", v)
        if m:
            secret_values.add(m.group(1))
    exposed = []
    for o in objs:
        if o["kind"] == "Secret":
            continue
        if o["kind"] == "ConfigMap":
            exposed += [(f"ConfigMap {o['metadata']['name']} key {k}", v) for k, v in (o.get("data") or {}).items()]
        exposed += [(f"{o['kind']} annotation {k}", str(v)) for k, v in (o["metadata"].get("annotations") or {}).items()]
    tmpl = dep["spec"]["template"]
    exposed += [(f"pod annotation {k}", str(v)) for k, v in (tmpl["metadata"].get("annotations") or {}).items()]
    for c in containers(pod):
        for e in c.get("env", []):
            if "value" in e:
                exposed.append((f"container {c['name']} env {e['name']}", str(e["value"])))
            elif "secretKeyRef" not in e.get("valueFrom", {}):
                fail(f"env {e['name']} is neither a literal nor a Secret reference: {e}")
        exposed += [(f"container {c['name']} args", " ".join(c.get("args", []) + c.get("command", [])))]
    for where, text in exposed:
        for s in secret_values:
            if s and s in text:
                fail(f"a secret value appears in {where}")
    if not secret_values and not sv.get("existingSecret"):
        fail("no secret values found to look for (the check would be vacuous)")

    # --- Pod hardening. ---
    psc = pod.get("securityContext", {})
    if psc.get("runAsNonRoot") is not True or psc.get("runAsUser", 0) == 0:
        fail(f"pod securityContext must run as non-root: {psc}")
    if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        fail("pod seccompProfile must be RuntimeDefault")
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            fail(f"pod sets {key}")
    if pod.get("automountServiceAccountToken") is not False:
        fail("the service account token must not be mounted")
    for c in containers(pod):
        sc = c.get("securityContext", {})
        if sc.get("readOnlyRootFilesystem") is not True:
            fail(f"container {c['name']}: readOnlyRootFilesystem must be true")
        if sc.get("allowPrivilegeEscalation") is not False or sc.get("privileged"):
            fail(f"container {c['name']}: privilege escalation must be off")
        if sc.get("capabilities", {}).get("drop") != ["ALL"] or sc.get("capabilities", {}).get("add"):
            fail(f"container {c['name']}: capabilities must drop ALL and add none")
        if sc.get("runAsNonRoot") is not True or sc.get("runAsUser", psc.get("runAsUser", 0)) == 0:
            fail(f"container {c['name']}: must run as non-root")
        if "resources" not in c or "limits" not in c["resources"]:
            fail(f"container {c['name']}: resources with limits required")
    gh = next((c for c in pod["containers"] if c["name"] == "gatehouse"), None)
    if gh is None:
        fail("no gatehouse container")
        return
    probes = {k: gh.get(k, {}).get("httpGet", {}) for k in ("startupProbe", "livenessProbe", "readinessProbe")}
    want_probes = {"startupProbe": "/healthz", "livenessProbe": "/healthz", "readinessProbe": "/readyz"}
    for k, path in want_probes.items():
        if probes[k].get("path") != path or probes[k].get("port") != "admin":
            fail(f"{k} must GET {path} on the admin port: {probes[k]}")
    stop = gh.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    if pod.get("terminationGracePeriodSeconds", 30) < stop + 10 + 5:
        fail("terminationGracePeriodSeconds must cover the preStop sleep plus Gatehouse's 10 s drain")
    embedded = values.get("store", {}).get("mode", "embedded") == "embedded"
    if embedded and (dep["spec"].get("replicas", 1) > 1 or by_kind.get("HorizontalPodAutoscaler")):
        fail("more than one replica with the embedded store")
    if not embedded and values.get("replicaCount", 2) > 1:
        aff = pod.get("affinity", {}).get("podAntiAffinity")
        if not aff:
            fail("several replicas without pod anti-affinity")
    gh_ports = {p["containerPort"] for p in gh.get("ports", [])}
    if envoy and 8443 in gh_ports:
        fail("with the Envoy sidecar, Gatehouse itself must not expose 8443")

    # --- cert-manager and monitoring objects (CRDs: no schema in kubernetes-validate). ---
    for cert in by_kind.get("Certificate", []):
        if f"{internal}.{dep['metadata'].get('namespace', 'gatehouse')}.svc.cluster.local" not in cert["spec"]["dnsNames"] and not any(
            n.startswith(f"{internal}.") and n.endswith(".svc.cluster.local") for n in cert["spec"]["dnsNames"]
        ):
            fail(f"the Certificate does not name the internal Service: {cert['spec']['dnsNames']}")
        vols = {v["name"]: v for v in pod.get("volumes", [])}
        if vols.get("internal-tls", {}).get("secret", {}).get("secretName") != cert["spec"]["secretName"]:
            fail("the internal-tls volume does not mount the Certificate's Secret")
        if cert["spec"]["issuerRef"].get("name") in (None, ""):
            fail("the Certificate has no issuer")
    for sm in by_kind.get("ServiceMonitor", []):
        sel = sm["spec"]["selector"]["matchLabels"]
        targets = [s for s in services.values() if all(s["metadata"]["labels"].get(k) == v for k, v in sel.items())]
        if [s["metadata"]["name"] for s in targets] != [f"{fullname}-metrics"]:
            fail(f"the ServiceMonitor selects {[s['metadata']['name'] for s in targets]}, want only {fullname}-metrics")
        if [e["port"] for e in sm["spec"]["endpoints"]] != ["admin"] or sm["spec"]["endpoints"][0]["path"] != "/metrics":
            fail("the ServiceMonitor must scrape /metrics on the admin port")

    # The PrometheusRule carries exactly the repository's alerting rules (promtool-tested there).
    want_rule = bool(values.get("metrics", {}).get("prometheusRule", {}).get("enabled"))
    rules = by_kind.get("PrometheusRule", [])
    if want_rule != bool(rules):
        fail(f"prometheusRule.enabled is {want_rule} but {len(rules)} PrometheusRule objects were rendered")
    if rules:
        repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        with open(os.path.join(repo, "deploy", "prometheus", "gatehouse-alerts.yml")) as f:
            source = yaml.safe_load(f)
        if rules[0]["spec"]["groups"] != source["groups"]:
            fail("the PrometheusRule's groups differ from deploy/prometheus/gatehouse-alerts.yml")
        if rules[0]["metadata"]["labels"].get("release") != values["metrics"]["prometheusRule"].get("labels", {}).get("release"):
            fail("the PrometheusRule does not carry the configured labels")

    # --- gatehouse.toml through `gatehouse check-config`, with test files at the mounted paths. ---
    cm = next((o for o in by_kind.get("ConfigMap", []) if "gatehouse.toml" in (o.get("data") or {})), None)
    if cm is None:
        fail("no ConfigMap with gatehouse.toml")
        return
    toml = cm["data"]["gatehouse.toml"]
    root = os.path.join(outdir, "root")
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    pki = os.path.join(outdir, "pki")
    if not os.path.exists(os.path.join(pki, "ca.crt")):
        subprocess.run([gatehouse, "pki", "init", "--out", pki], check=True, capture_output=True)
    for path in sorted(set(re.findall(r'"(/etc/gatehouse/[^"]+)"', toml))):
        dest = root + path
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        name = os.path.basename(path)
        if "/secrets/" in path:
            if "encryption-key" in name or name == sv.get("keys", {}).get("encryptionKey"):
                content = base64.b64encode(os.urandom(32)).decode()
            else:
                content = base64.urlsafe_b64encode(os.urandom(33)).decode()
            open(dest, "w").write(content + "\n")
        elif name.endswith(".key"):
            shutil.copy(os.path.join(pki, "gatehouse.key"), dest)
        elif name == "ca.crt" or "ca" in os.path.basename(os.path.dirname(path)):
            shutil.copy(os.path.join(pki, "ca.crt"), dest)
        else:
            shutil.copy(os.path.join(pki, "gatehouse.crt"), dest)
    local = toml.replace('"/etc/gatehouse/', f'"{root}/etc/gatehouse/')
    conf = os.path.join(outdir, "gatehouse.toml")
    open(conf, "w").write(local)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEHOUSE_")}
    # The Redis URL comes from the Secret: a stand-in of the same kind (TLS when the chart mounts a
    # Redis CA), since Gatehouse refuses TLS files next to a plain redis:// URL.
    scheme = "rediss" if "redis_ca_file" in toml or "redis_client_cert_file" in toml else "redis"
    for e in gh.get("env", []):
        env[e["name"]] = f"{scheme}://:test-password@redis.test:6379" if "REDIS_URL" in e["name"] else "x"
    r = subprocess.run([gatehouse, "check-config", "--config", conf], capture_output=True, text=True, env=env)
    if r.returncode != 0 or "configuration is valid" not in r.stdout:
        fail(f"gatehouse check-config refused the rendered gatehouse.toml: {r.stderr.strip()}")
    for s in secret_values:
        if s and (s in r.stdout or s in r.stderr):
            fail("check-config printed a secret value")
    if internal_enabled:
        mode = 'mode = "envoy"' if envoy else 'mode = "mtls"'
        if mode not in r.stdout:
            fail(f"check-config does not report the internal listener in {mode} mode: {r.stdout}")
    if envoy:
        if 'listen = "127.0.0.1:8444"' not in toml:
            fail("with the Envoy sidecar, Gatehouse's internal listener must be on 127.0.0.1:8444")
        open(os.path.join(outdir, "envoy.yaml"), "w").write(cm["data"]["envoy.yaml"])
        ids = [c["id"] for c in values.get("internal", {}).get("callers", [])]
        open(os.path.join(outdir, "envoy-allow.txt"), "w").write(",".join(ids))


if __name__ == "__main__":
    expect_fail = "--expect-fail" in sys.argv
    sys.argv = [a for a in sys.argv if a != "--expect-fail"]
    # A crash is never a pass, not even with --expect-fail: a doctored manifest must be caught by an assertion.
    main()
    if expect_fail:
        if not errors:
            print(f"chart_assert: {sys.argv[2]}: doctored manifest was NOT caught", file=sys.stderr)
            sys.exit(1)
        print(f"chart_assert: doctored manifest caught: {errors[0]}")
        sys.exit(0)
    for e in errors:
        print(f"chart_assert: {sys.argv[2]}: {e}", file=sys.stderr)
    sys.exit(1 if errors else 0)
