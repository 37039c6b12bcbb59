{{/*
Chart name, for the app.kubernetes.io/name label.
*/}}
{{- define "petrel.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name of the release's objects: the release name, with the chart name appended
unless the release name already contains it ("petrel" for `helm install petrel`).
*/}}
{{- define "petrel.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The operator's objects are named after the full name with an "-operator" suffix.
*/}}
{{- define "petrel.operatorName" -}}
{{- printf "%s-operator" (include "petrel.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "petrel.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels on every object of the chart.
*/}}
{{- define "petrel.commonLabels" -}}
helm.sh/chart: {{ include "petrel.chart" . }}
app.kubernetes.io/name: {{ include "petrel.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: petrel
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Labels on the operator's objects.
*/}}
{{- define "petrel.labels" -}}
{{ include "petrel.commonLabels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{/*
Labels that select the operator pod. The MTA objects the operator renders carry other
app.kubernetes.io/name values, so these never select them.
*/}}
{{- define "petrel.selectorLabels" -}}
app.kubernetes.io/name: {{ include "petrel.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "petrel.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "petrel.operatorName" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
An image reference from {repository, tag, digest}: the digest wins over the tag, and
the tag defaults to the chart's appVersion. Call with (list .Values.image .Chart.AppVersion).
*/}}
{{- define "petrel.image" -}}
{{- $image := index . 0 -}}
{{- $appVersion := index . 1 -}}
{{- if $image.digest -}}
{{- printf "%s@%s" $image.repository $image.digest -}}
{{- else -}}
{{- printf "%s:%s" $image.repository (default $appVersion $image.tag | toString) -}}
{{- end -}}
{{- end }}

{{/*
The operator's RBAC rules, the same whether granted cluster-wide or per namespace.
Server-side apply that creates an object is authorized as `create`, so the objects the
operator renders need create as well as patch.
*/}}
{{- define "petrel.rbacRules" -}}
# The four kinds: read them, write their status. The operator never edits a spec.
- apiGroups: ["mail.petrel.dev"]
  resources: [maildomains, smtplisteners, relaypolicies, dkimkeys]
  verbs: [get, list, watch]
- apiGroups: ["mail.petrel.dev"]
  resources: [maildomains/status, smtplisteners/status, relaypolicies/status, dkimkeys/status]
  verbs: [get, patch]
# What it renders: server-side apply (create, patch), drift watches (get, list, watch),
# pruning of objects no resource asks for any more (delete).
- apiGroups: [""]
  resources: [configmaps, services, secrets]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: ["apps"]
  resources: [statefulsets]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: ["policy"]
  resources: [poddisruptionbudgets]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: ["autoscaling"]
  resources: [horizontalpodautoscalers]
  verbs: [get, list, watch, create, patch, delete]
# cert-manager Certificates for SmtpListeners with tls.issuerRef (cert-manager itself
# writes the Secret they name; the operator only reads it).
- apiGroups: ["cert-manager.io"]
  resources: [certificates]
  verbs: [get, list, watch, create, patch, delete]
# MTA pod readiness, for the SmtpListener status and for draining before scale-in; patch
# only sets the pods' config-checksum annotation, which makes the kubelet refresh their
# mounted config and keys at once instead of at its next periodic sync.
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch, patch]
# Queue volumes of pods removed by a scale-in: marked once their pod drained, deleted
# after it is gone (never one that did not drain).
- apiGroups: [""]
  resources: [persistentvolumeclaims]
  verbs: [get, list, patch, delete]
# Jobs that drain a queue volume left by a pod that went without draining: created
# (never updated), read for their state, deleted once the volume is drained.
- apiGroups: ["batch"]
  resources: [jobs]
  verbs: [get, list, watch, create, patch, delete]
# Events on the reconciled resources (the recorder creates, then patches a series).
- apiGroups: ["events.k8s.io"]
  resources: [events]
  verbs: [create, patch]
{{- end }}

{{/*
OTEL_RESOURCE_ATTRIBUTES: the pod and namespace, then the user's attributes, sorted.
*/}}
{{- define "petrel.otelResourceAttributes" -}}
{{- $attrs := list (printf "k8s.namespace.name=%s" .Release.Namespace) "k8s.pod.name=$(POD_NAME)" -}}
{{- range $k, $v := .Values.otel.resourceAttributes -}}
{{- $attrs = append $attrs (printf "%s=%s" $k (toString $v)) -}}
{{- end -}}
{{- join "," $attrs -}}
{{- end }}

{{/*
Namespace of the example resources.
*/}}
{{- define "petrel.examplesNamespace" -}}
{{- default .Release.Namespace .Values.examples.namespace }}
{{- end }}
