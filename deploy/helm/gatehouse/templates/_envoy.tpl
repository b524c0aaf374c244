{{/*
The Envoy sidecar's bootstrap: deploy/envoy/internal-sidecar.yaml with the chart's certificate
paths and the callers of internal.callers as the RBAC principals (the same list as Gatehouse's
internal.allow). scripts/deploy-test.sh validates the rendered file with go-control-plane.
*/}}
{{- define "gatehouse.envoyBootstrap" -}}
{{- $ca := .Values.internal.tls.clientCa -}}
node:
  id: {{ include "gatehouse.fullname" . }}-internal-sidecar
  cluster: {{ include "gatehouse.fullname" . }}
admin:
  address:
    socket_address: {address: 127.0.0.1, port_value: 9901}
static_resources:
  secrets:
    - name: gatehouse-server-cert
      tls_certificate:
        certificate_chain: {filename: /etc/envoy/tls/tls.crt}
        private_key: {filename: /etc/envoy/tls/tls.key}
        watched_directory: {path: /etc/envoy/tls}
    - name: east-west-client-ca
      validation_context:
        {{- if or $ca.secretName $ca.configMapName }}
        trusted_ca: {filename: /etc/envoy/client-ca/{{ $ca.key }}}
        watched_directory: {path: /etc/envoy/client-ca}
        {{- else }}
        trusted_ca: {filename: /etc/envoy/tls/ca.crt}
        watched_directory: {path: /etc/envoy/tls}
        {{- end }}
  listeners:
    - name: internal_mtls
      address:
        socket_address: {address: 0.0.0.0, port_value: 8443}
      per_connection_buffer_limit_bytes: 32768
      filter_chains:
        - transport_socket:
            name: envoy.transport_sockets.tls
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
              require_client_certificate: true
              common_tls_context:
                tls_params:
                  tls_minimum_protocol_version: TLSv1_2
                alpn_protocols: [h2, http/1.1]
                tls_certificate_sds_secret_configs:
                  - name: gatehouse-server-cert
                validation_context_sds_secret_config:
                  name: east-west-client-ca
          filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: gatehouse_internal
                codec_type: AUTO
                forward_client_cert_details: SANITIZE_SET
                set_current_client_cert_details:
                  uri: true
                use_remote_address: true
                normalize_path: true
                merge_slashes: true
                path_with_escaped_slashes_action: REJECT_REQUEST
                request_headers_timeout: 10s
                stream_idle_timeout: 60s
                common_http_protocol_options:
                  idle_timeout: 300s
                  headers_with_underscores_action: REJECT_REQUEST
                route_config:
                  name: gatehouse_internal
                  virtual_hosts:
                    - name: gatehouse
                      domains: ["*"]
                      routes:
                        - match: {prefix: /internal/v1/}
                          route:
                            cluster: gatehouse_internal
                            timeout: 15s
                        - match: {prefix: /}
                          direct_response: {status: 404}
                http_filters:
                  - name: envoy.filters.http.rbac
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC
                      rules:
                        action: ALLOW
                        {{- if .Values.internal.callers }}
                        policies:
                          east-west-callers:
                            permissions:
                              - url_path:
                                  path: {prefix: /internal/v1/}
                            principals:
                              {{- range .Values.internal.callers }}
                              - authenticated:
                                  principal_name: {exact: {{ .id | toJson }}}
                              {{- end }}
                        {{- else }}
                        # No callers: an ALLOW policy set with no policies denies every request.
                        policies: {}
                        {{- end }}
                  - name: envoy.filters.http.router
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
    - name: gatehouse_internal
      type: STATIC
      connect_timeout: 2s
      load_assignment:
        cluster_name: gatehouse_internal
        endpoints:
          - lb_endpoints:
              - endpoint:
                  address:
                    socket_address: {address: 127.0.0.1, port_value: 8444}
{{- end -}}
