{{/* Names, labels, and the checks values.schema.json cannot express. */}}

{{- define "gatehouse.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "gatehouse.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 54 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 54 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 54 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "gatehouse.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gatehouse.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "gatehouse.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "gatehouse.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "gatehouse.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "gatehouse.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "gatehouse.secretName" -}}
{{- default (printf "%s-secrets" (include "gatehouse.fullname" .)) .Values.secrets.existingSecret -}}
{{- end -}}

{{- define "gatehouse.image" -}}
{{- $img := index . 0 -}}{{- $default := index . 1 -}}
{{- if $img.digest -}}
{{- printf "%s@%s" $img.repository $img.digest -}}
{{- else -}}
{{- printf "%s:%s" $img.repository (default $default $img.tag) -}}
{{- end -}}
{{- end -}}

{{/* The internal Service's DNS names (Gatehouse's server certificate and the callers' SNI). */}}
{{- define "gatehouse.internalHost" -}}
{{- printf "%s-internal.%s.svc.cluster.local" (include "gatehouse.fullname" .) .Release.Namespace -}}
{{- end -}}

{{/* Where the internal server certificate is mounted, and the client CA. */}}
{{- define "gatehouse.internalTlsDir" -}}/etc/gatehouse/internal-tls{{- end -}}
{{- define "gatehouse.clientCaFile" -}}
{{- $ca := .Values.internal.tls.clientCa -}}
{{- if or $ca.secretName $ca.configMapName -}}
/etc/gatehouse/client-ca/{{ $ca.key }}
{{- else -}}
/etc/gatehouse/internal-tls/ca.crt
{{- end -}}
{{- end -}}

{{/* Gatehouse's internal listener: its own port in mtls mode, loopback behind Envoy. */}}
{{- define "gatehouse.internalListen" -}}
{{- if .Values.envoy.enabled -}}127.0.0.1:8444{{- else -}}0.0.0.0:8443{{- end -}}
{{- end -}}

{{/*
Checks across values, each failing with a message naming the value. Included by every template
that depends on them, so `helm template` fails before anything is rendered.
*/}}
{{- define "gatehouse.validate" -}}
{{- $v := .Values -}}
{{- if not $v.config.public.externalUrl -}}
{{- fail "config.public.externalUrl is required (the URL browsers use, e.g. https://app.example.com)" -}}
{{- end -}}
{{- if not $v.config.oidc.issuer -}}
{{- fail "config.oidc.issuer is required (the Keycloak realm URL, e.g. https://keycloak.example.com/realms/gatehouse)" -}}
{{- end -}}
{{- $replicas := int $v.replicaCount -}}
{{- if and (eq $v.store.mode "embedded") (or (gt $replicas 1) $v.autoscaling.enabled) -}}
{{- fail (printf "replicaCount is %d (autoscaling.enabled %v) but store.mode is \"embedded\": the embedded store is a file in one pod, so replicas would not share sessions. Use store.mode redis, sentinel or cluster, or replicaCount: 1" $replicas $v.autoscaling.enabled) -}}
{{- end -}}
{{- $s := $v.secrets -}}
{{- if $s.existingSecret -}}
{{- range $k := list "clientSecret" "encryptionKey" "adminToken" "redisPassword" "redisUrl" -}}
{{- if index $s $k -}}
{{- fail (printf "secrets.%s must be empty with secrets.existingSecret (%s): the value would be ignored" $k $s.existingSecret) -}}
{{- end -}}
{{- end -}}
{{- else -}}
{{- if not $s.clientSecret -}}{{- fail "secrets.clientSecret is required (or give secrets.existingSecret)" -}}{{- end -}}
{{- if not $s.encryptionKey -}}{{- fail "secrets.encryptionKey is required: 32 random bytes, base64 (head -c 32 /dev/urandom | base64), or give secrets.existingSecret" -}}{{- end -}}
{{- if lt (len $s.adminToken) 32 -}}{{- fail "secrets.adminToken is required, at least 32 characters (the admin port is reachable on the pod IP, so its session API needs a token), or give secrets.existingSecret" -}}{{- end -}}
{{- if and (eq $v.store.mode "sentinel") $v.store.redis.password (not $s.redisPassword) -}}{{- fail "secrets.redisPassword is required with store.redis.password: true" -}}{{- end -}}
{{- if and (eq $v.store.mode "redis") $v.store.redis.urlFromSecret (not $s.redisUrl) -}}{{- fail "secrets.redisUrl is required with store.redis.urlFromSecret: true" -}}{{- end -}}
{{- if and $s.previousEncryptionKeys (not $s.existingSecret) -}}{{- fail "secrets.previousEncryptionKeys name keys of secrets.existingSecret: rotate keys with an existing Secret" -}}{{- end -}}
{{- end -}}
{{- $r := $v.store.redis -}}
{{- if eq $v.store.mode "redis" -}}
{{- if and (not $r.url) (not $r.urlFromSecret) -}}{{- fail "store.redis.url is required with store.mode redis (or store.redis.urlFromSecret: true)" -}}{{- end -}}
{{- if and $r.url $r.urlFromSecret -}}{{- fail "store.redis.url and store.redis.urlFromSecret exclude each other" -}}{{- end -}}
{{- else if eq $v.store.mode "sentinel" -}}
{{- if or (not $r.sentinels) (not $r.masterName) -}}{{- fail "store.redis.sentinels and store.redis.masterName are required with store.mode sentinel" -}}{{- end -}}
{{- if or $r.tls.caSecret $r.tls.caConfigMap $r.tls.clientCertSecret -}}{{- fail "store.redis.tls is not supported with store.mode sentinel (Gatehouse does not speak TLS through Sentinel yet)" -}}{{- end -}}
{{- else if eq $v.store.mode "cluster" -}}
{{- if not $r.clusterNodes -}}{{- fail "store.redis.clusterNodes is required with store.mode cluster" -}}{{- end -}}
{{- end -}}
{{- if and $r.tls.caSecret $r.tls.caConfigMap -}}{{- fail "store.redis.tls.caSecret and store.redis.tls.caConfigMap exclude each other" -}}{{- end -}}
{{- if $v.internal.enabled -}}
{{- $t := $v.internal.tls -}}
{{- if and (eq $t.source "cert-manager") (not $t.certManager.issuerRef.name) -}}
{{- fail "internal.tls.certManager.issuerRef.name is required with internal.tls.source cert-manager" -}}
{{- end -}}
{{- if and (eq $t.source "secret") (not $t.secretName) -}}
{{- fail "internal.tls.secretName is required with internal.tls.source secret" -}}
{{- end -}}
{{- if and $t.clientCa.secretName $t.clientCa.configMapName -}}
{{- fail "internal.tls.clientCa.secretName and internal.tls.clientCa.configMapName exclude each other" -}}
{{- end -}}
{{- range $c := $v.internal.callers -}}
{{- if and $v.envoy.enabled (not (hasPrefix "spiffe://" $c.id)) -}}
{{- fail (printf "internal.callers: %q is not a SPIFFE ID; behind Envoy (envoy.enabled) callers are identified by their SPIFFE ID only" $c.id) -}}
{{- end -}}
{{- end -}}
{{- else if $v.envoy.enabled -}}
{{- fail "envoy.enabled needs internal.enabled: the sidecar fronts the internal listener" -}}
{{- end -}}
{{- if $v.networkPolicy.enabled -}}
{{- if not $v.networkPolicy.egress.keycloak -}}
{{- fail "networkPolicy.egress.keycloak is empty: with networkPolicy.enabled, Gatehouse could not reach Keycloak. List its pods or address ({to: [...], ports: [...]})" -}}
{{- end -}}
{{- if and (ne $v.store.mode "embedded") (not $v.networkPolicy.egress.redis) -}}
{{- fail (printf "networkPolicy.egress.redis is empty but store.mode is %s: Gatehouse could not reach Redis" $v.store.mode) -}}
{{- end -}}
{{- if and $v.config.routes (not $v.networkPolicy.egress.upstreams) -}}
{{- fail "networkPolicy.egress.upstreams is empty but config.routes is set: Gatehouse could not reach the upstreams" -}}
{{- end -}}
{{- end -}}
{{- if and $v.ingress.enabled (not $v.ingress.hosts) -}}
{{- fail "ingress.hosts is required with ingress.enabled" -}}
{{- end -}}
{{- end -}}

{{/* A NetworkPolicy peer for {namespace, podLabels}. */}}
{{- define "gatehouse.peer" -}}
- namespaceSelector:
    matchLabels:
      kubernetes.io/metadata.name: {{ .namespace | quote }}
  {{- if .podLabels }}
  podSelector:
    matchLabels:
      {{- toYaml .podLabels | nindent 6 }}
  {{- end }}
{{- end -}}
