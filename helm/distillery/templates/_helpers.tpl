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
