{{/* Names and labels. */}}
{{- define "expertmesh.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}{{ .Release.Name | trunc 50 | trimSuffix "-" }}{{- else -}}{{ printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" }}{{- end -}}
{{- end -}}

{{- define "expertmesh.labels" -}}
app.kubernetes.io/name: expertmesh
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Selector labels of one component: pass (list $ "router"). */}}
{{- define "expertmesh.selector" -}}
app.kubernetes.io/name: expertmesh
app.kubernetes.io/instance: {{ (index . 0).Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "expertmesh.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{ .Values.image.repository }}:{{ $tag }}
{{- end -}}

{{/* etcd client endpoints, comma-separated. */}}
{{- define "expertmesh.etcdEndpoints" -}}
{{- if .Values.etcd.external.endpoints -}}
{{ join "," .Values.etcd.external.endpoints }}
{{- else -}}
{{- $svc := printf "%s-etcd" (include "expertmesh.fullname" .) -}}
{{- $eps := list -}}
{{- range $i := until (int .Values.etcd.replicas) -}}
{{- $eps = append $eps (printf "http://%s-%d.%s:2379" $svc $i $svc) -}}
{{- end -}}
{{ join "," $eps }}
{{- end -}}
{{- end -}}

{{/* How to reach the cluster in etcd, as space-separated flags: the same
for every service and for `expertmesh drain` in the preStop hook. */}}
{{- define "expertmesh.etcdFlags" -}}
{{- $c := .Values.etcd.client -}}
{{- $f := list (printf "--etcd=%s" (include "expertmesh.etcdEndpoints" .)) (printf "--cluster=%s" .Values.clusterName) -}}
{{- if $c.caFile }}{{ $f = append $f (printf "--etcd-ca=%s" $c.caFile) }}{{ end -}}
{{- if $c.certFile }}{{ $f = append $f (printf "--etcd-cert=%s" $c.certFile) }}{{ end -}}
{{- if $c.keyFile }}{{ $f = append $f (printf "--etcd-key=%s" $c.keyFile) }}{{ end -}}
{{- if $c.user }}{{ $f = append $f (printf "--etcd-user=%s" $c.user) }}{{ end -}}
{{ join " " $f }}
{{- end -}}

{{/* Flags every ExpertMesh service takes. */}}
{{- define "expertmesh.commonArgs" -}}
- --model={{ .Values.model.path }}
{{- range splitList " " (include "expertmesh.etcdFlags" .) }}
- {{ . }}
{{- end }}
- --log-format={{ .Values.logFormat }}
{{- if .Values.internalTls.enabled }}
- --internal-ca=/etc/expertmesh/tls/ca.crt
- --internal-cert=/etc/expertmesh/tls/tls.crt
- --internal-key=/etc/expertmesh/tls/tls.key
{{- end }}
{{- end -}}

{{- define "expertmesh.podEnv" -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
{{- with .Values.etcd.client.passwordSecret.name }}
- name: EXPERTMESH_ETCD_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.etcd.client.passwordSecret.key }}
{{- end }}
{{- end -}}

{{- define "expertmesh.tlsSecret" -}}
{{- default (printf "%s-internal-tls" (include "expertmesh.fullname" .)) .Values.internalTls.existingSecret -}}
{{- end -}}

{{/* The model volume, and the internal TLS secret when enabled. */}}
{{- define "expertmesh.volumes" -}}
- name: model
{{- if .Values.model.pvc.claimName }}
  persistentVolumeClaim:
    claimName: {{ .Values.model.pvc.claimName }}
    readOnly: true
{{- else }}
  hostPath:
    path: {{ required "model.pvc.claimName or model.hostPath is required" .Values.model.hostPath }}
    type: Directory
{{- end }}
{{- if .Values.internalTls.enabled }}
- name: internal-tls
  secret:
    secretName: {{ include "expertmesh.tlsSecret" . }}
{{- end }}
{{- end -}}

{{- define "expertmesh.volumeMounts" -}}
- name: model
  mountPath: {{ dir .Values.model.path }}
  readOnly: true
{{- if .Values.internalTls.enabled }}
- name: internal-tls
  mountPath: /etc/expertmesh/tls
  readOnly: true
{{- end }}
{{- end -}}

{{- define "expertmesh.podSecurity" -}}
securityContext:
  runAsNonRoot: true
  runAsUser: 10001
  runAsGroup: 10001
  fsGroup: 10001
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "expertmesh.containerSecurity" -}}
securityContext:
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities:
    drop: [ALL]
{{- end -}}

{{/* gRPC health probes; under internal mTLS the kubelet cannot present a
client certificate, so the port is probed with TCP instead. */}}
{{- define "expertmesh.grpcProbe" -}}
{{- $root := index . 0 -}}{{- $port := index . 1 -}}
{{- if $root.Values.internalTls.enabled -}}
tcpSocket:
  port: {{ $port }}
{{- else -}}
grpc:
  port: {{ $port }}
{{- end -}}
{{- end -}}
