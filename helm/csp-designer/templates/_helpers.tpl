{{/* The chart's name, at most 63 characters. */}}
{{- define "csp.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The release's full name. */}}
{{- define "csp.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "csp.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "csp.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* A target's resource name: <fullname>-<target>. Call with (list $ "gateway"). */}}
{{- define "csp.target" -}}
{{- $root := index . 0 -}}
{{- printf "%s-%s" (include "csp.fullname" $root) (index . 1) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "csp.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "csp.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: csp-designer
{{- end -}}

{{/* Selector labels of a target. Call with (list $ "gateway"). */}}
{{- define "csp.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "csp.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "csp.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "csp.secretName" -}}
{{- default (printf "%s-secrets" (include "csp.fullname" .)) .Values.secrets.existingSecret -}}
{{- end -}}

{{- define "csp.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "csp.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The environment every target shares: the ConfigMap, the Secret, each service's address. */}}
{{- define "csp.env" -}}
{{- $root := . -}}
- name: DATABASE_URL
  valueFrom: {secretKeyRef: {name: {{ include "csp.secretName" . }}, key: DATABASE_URL}}
- name: REDIS_URL
  valueFrom: {secretKeyRef: {name: {{ include "csp.secretName" . }}, key: REDIS_URL}}
- name: SECRET_KEY
  valueFrom: {secretKeyRef: {name: {{ include "csp.secretName" . }}, key: SECRET_KEY}}
- name: OPENAI_API_KEY
  valueFrom: {secretKeyRef: {name: {{ include "csp.secretName" . }}, key: OPENAI_API_KEY, optional: true}}
- name: ANTHROPIC_API_KEY
  valueFrom: {secretKeyRef: {name: {{ include "csp.secretName" . }}, key: ANTHROPIC_API_KEY, optional: true}}
- name: CSP_DATABASE__RUN_MIGRATIONS
  value: "false"
{{- range $name, $target := .Values.targets }}
{{- if ne $name "gateway" }}
- name: CSP_SERVICES__{{ upper $name }}__ADDRESS
  value: {{ printf "http://%s:%v" (include "csp.target" (list $root $name)) $target.port | quote }}
{{- end }}
{{- end }}
{{- end -}}
