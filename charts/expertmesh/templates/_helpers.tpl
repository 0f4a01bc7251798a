{{/* The chart's name. */}}
{{- define "expertmesh.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's full name: release name, with the chart name unless it already contains it. */}}
{{- define "expertmesh.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/* Labels on every resource. */}}
{{- define "expertmesh.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "expertmesh.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: expertmesh
{{- end }}

{{/* Selector labels of one component: call with (dict "ctx" $ "component" "gateway"). */}}
{{- define "expertmesh.selectorLabels" -}}
app.kubernetes.io/name: {{ include "expertmesh.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "expertmesh.componentLabels" -}}
{{ include "expertmesh.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "expertmesh.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "expertmesh.redisUrl" -}}
{{- if .Values.redis.external.url }}
{{- .Values.redis.external.url }}
{{- else }}
{{- printf "redis://%s-redis:6379/0" (include "expertmesh.fullname" .) }}
{{- end }}
{{- end }}

{{- define "expertmesh.poolsService" -}}
{{ include "expertmesh.fullname" . }}-pools
{{- end }}

{{/* The model volume, from a PVC or a hostPath. */}}
{{- define "expertmesh.modelVolume" -}}
- name: models
{{- if eq .Values.model.volume.type "pvc" }}
  persistentVolumeClaim:
    claimName: {{ .Values.model.volume.claimName }}
    readOnly: true
{{- else }}
  hostPath:
    path: {{ .Values.model.volume.hostPath }}
    type: Directory
{{- end }}
- name: tmp
  emptyDir: {}
{{- if .Values.tls.secretName }}
- name: tls
  secret:
    secretName: {{ .Values.tls.secretName }}
    defaultMode: 0440
{{- end }}
{{- end }}

{{- define "expertmesh.modelMounts" -}}
- name: models
  mountPath: {{ .Values.model.volume.mountPath }}
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- if .Values.tls.secretName }}
- name: tls
  mountPath: /etc/expertmesh/tls
  readOnly: true
{{- end }}
{{- end }}

{{/* A gRPC health check: the kubelet's own gRPC probe, or with mutual TLS (which kubelet probes cannot speak)
the project's probe command over the pod's certificate. Takes (dict "ctx" . "port" N "service" NAME). */}}
{{- define "expertmesh.grpcCheck" -}}
{{- if .ctx.Values.tls.secretName }}
exec:
  command: ["python", "-m", "services.rpc.health_probe", "127.0.0.1:{{ .port }}"{{ if .service }}, {{ .service | quote }}{{ end }}]
timeoutSeconds: 5
{{- else }}
grpc:
  port: {{ .port }}
  {{- if .service }}
  service: {{ .service }}
  {{- end }}
{{- end }}
{{- end }}

{{/* Environment every service shares. */}}
{{- define "expertmesh.commonEnv" -}}
- name: EXPERTMESH_REDIS_URL
  value: {{ include "expertmesh.redisUrl" . | quote }}
- name: HOME
  value: /tmp
{{- if .Values.tls.secretName }}
- name: EXPERTMESH_TLS_DIR
  value: /etc/expertmesh/tls
{{- end }}
{{- if .Values.tracing.otlpEndpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ .Values.tracing.otlpEndpoint | quote }}
{{- end }}
{{- end }}

{{- define "expertmesh.gpu" -}}
{{- if gt (int .gpu) 0 }}
nvidia.com/gpu: {{ .gpu }}
{{- end }}
{{- end }}

{{/* Pool pods one voluntary eviction round may take: pools.pdb.maxUnavailable, else replicasPerExpert - 1. */}}
{{- define "expertmesh.poolsMaxUnavailable" -}}
{{- if kindIs "invalid" .Values.pools.pdb.maxUnavailable }}
{{- sub (int .Values.pools.replicasPerExpert) 1 }}
{{- else }}
{{- int .Values.pools.pdb.maxUnavailable }}
{{- end }}
{{- end }}

{{/* Combinations of values the schema cannot refuse on its own. */}}
{{- define "expertmesh.checks" -}}
{{- $copies := int .Values.pools.replicasPerExpert }}
{{- if gt $copies (int .Values.pools.count) }}
{{- fail (printf "pools.replicasPerExpert (%d) needs at least as many pools: pools.count is %d" $copies (int .Values.pools.count)) }}
{{- end }}
{{- if and .Values.pools.pdb.enabled (ge (int (include "expertmesh.poolsMaxUnavailable" .)) $copies) }}
{{- fail (printf "pools.pdb.maxUnavailable (%s) must stay below pools.replicasPerExpert (%d): evicting that many pools at once can take every copy of an expert" (include "expertmesh.poolsMaxUnavailable" .) $copies) }}
{{- end }}
{{- $as := .Values.gateway.autoscaling }}
{{- if and $as.enabled (gt (int $as.minReplicas) (int $as.maxReplicas)) }}
{{- fail (printf "gateway.autoscaling.minReplicas (%d) is above maxReplicas (%d)" (int $as.minReplicas) (int $as.maxReplicas)) }}
{{- end }}
{{- if and $as.waitingRequests.enabled (not $as.enabled) }}
{{- fail "gateway.autoscaling.waitingRequests needs gateway.autoscaling.enabled" }}
{{- end }}
{{- end }}
