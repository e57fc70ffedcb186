{{/*
Chart name, overridable with nameOverride.
*/}}
{{- define "distillery.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Fully qualified app name: <release>-<chart> unless the release name already contains it.
*/}}
{{- define "distillery.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
Name of one service's resources. Call with (dict "root" $ "name" $name).
*/}}
{{- define "distillery.componentName" -}}
{{- printf "%s-%s" (include "distillery.fullname" .root) .name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "distillery.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Common labels.
*/}}
{{- define "distillery.labels" -}}
helm.sh/chart: {{ include "distillery.chart" . }}
{{ include "distillery.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: distillery
{{- end -}}

{{/*
Selector labels (add app.kubernetes.io/component per service).
*/}}
{{- define "distillery.selectorLabels" -}}
app.kubernetes.io/name: {{ include "distillery.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/*
Whether a services.<name> entry is enabled (entries without `enabled` are).
Renders "true" or "". Call with the entry.
*/}}
{{- define "distillery.enabled" -}}
{{- if or (not (hasKey . "enabled")) .enabled -}}true{{- end -}}
{{- end -}}

{{/*
The shared image reference.
*/}}
{{- define "distillery.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "distillery.configMapName" -}}
{{- printf "%s-config" (include "distillery.fullname" .) -}}
{{- end -}}

{{- define "distillery.secretName" -}}
{{- if .Values.existingSecret -}}
{{- .Values.existingSecret -}}
{{- else -}}
{{- printf "%s-secrets" (include "distillery.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/*
envFrom shared by every Distillery container: the ConfigMap and the Secret.
*/}}
{{- define "distillery.envFrom" -}}
- configMapRef:
    name: {{ include "distillery.configMapName" . }}
- secretRef:
    name: {{ include "distillery.secretName" . }}
{{- end -}}

{{/*
A ServiceAccount name: the services' own (no API permissions) or the trainer launcher's.
*/}}
{{- define "distillery.serviceAccountName" -}}
{{- include "distillery.fullname" . -}}
{{- end -}}

{{- define "distillery.trainerServiceAccountName" -}}
{{- default (printf "%s-trainer" (include "distillery.fullname" .)) .Values.trainer.serviceAccount.name -}}
{{- end -}}

{{/*
Liveness, readiness and start-up probes of every Distillery container. Call with
(dict "root" $ "svc" $svc); a service may override the paths (probes.livenessPath / readinessPath).
*/}}
{{- define "distillery.probes" -}}
{{- $p := .root.Values.probes -}}
{{- $live := dig "probes" "livenessPath" $p.liveness.path .svc -}}
{{- $ready := dig "probes" "readinessPath" $p.readiness.path .svc -}}
startupProbe:
  httpGet:
    path: {{ $live }}
    port: http
  periodSeconds: {{ $p.startup.periodSeconds }}
  failureThreshold: {{ $p.startup.failureThreshold }}
livenessProbe:
  httpGet:
    path: {{ $live }}
    port: http
  initialDelaySeconds: {{ $p.liveness.initialDelaySeconds }}
  periodSeconds: {{ $p.liveness.periodSeconds }}
  timeoutSeconds: {{ $p.liveness.timeoutSeconds }}
  failureThreshold: {{ $p.liveness.failureThreshold }}
readinessProbe:
  httpGet:
    path: {{ $ready }}
    port: http
  initialDelaySeconds: {{ $p.readiness.initialDelaySeconds }}
  periodSeconds: {{ $p.readiness.periodSeconds }}
  timeoutSeconds: {{ $p.readiness.timeoutSeconds }}
  failureThreshold: {{ $p.readiness.failureThreshold }}
{{- end -}}

{{/*
Ports of every Distillery container.
*/}}
{{- define "distillery.containerPorts" -}}
- name: http
  containerPort: {{ .Values.ports.http }}
  protocol: TCP
- name: grpc
  containerPort: {{ .Values.ports.grpc }}
  protocol: TCP
{{- end -}}

{{/*
Writable scratch space under a read-only root filesystem.
*/}}
{{- define "distillery.scratchMounts" -}}
- name: tmp
  mountPath: /tmp
- name: data
  mountPath: /var/lib/distillery
{{- end -}}

{{- define "distillery.scratchVolumes" -}}
- name: tmp
  emptyDir: {}
- name: data
  emptyDir: {}
{{- end -}}

{{/*
The routing table (files/routes.yaml), as a list of {prefix, service}.
*/}}
{{- define "distillery.routes" -}}
{{- .Files.Get "files/routes.yaml" -}}
{{- end -}}
