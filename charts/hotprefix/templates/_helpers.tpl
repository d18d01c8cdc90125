{{/* The release's full name, at most 63 characters. */}}
{{- define "hotprefix.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels selecting the operator's pods. */}}
{{- define "hotprefix.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels of every object of the chart. */}}
{{- define "hotprefix.labels" -}}
{{ include "hotprefix.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: hotprefix
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* The operator's ServiceAccount. */}}
{{- define "hotprefix.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "hotprefix.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* An image of this release: the repository with the chart's appVersion. */}}
{{- define "hotprefix.releaseImage" -}}
{{- printf "ghcr.io/hotprefix/hotprefix-%s:%s" .component .root.Chart.AppVersion -}}
{{- end -}}

{{/*
The rules the operator needs on HotPrefixServices and their children, and nothing more:
it reads and watches the services and writes their status; it creates and server-side
applies (patch) the children, watches the kinds whose changes it reacts to, and deletes only
the managed Redis' Deployment, Service and NetworkPolicy when a service switches to an
external Redis, the chat template's ConfigMap when a service no longer overrides the template
(reading them first to check that it owns them), and the engine StatefulSet, orphaning its
pods, when a change cannot be applied to it in place (reading it until it is gone). It holds list and watch on EndpointSlices
only because Kubernetes lets it grant the routers' Roles only what it holds itself.
*/}}
{{- define "hotprefix.rules" -}}
- apiGroups: ["hotprefix.dev"]
  resources: ["hotprefixservices"]
  verbs: ["list", "watch"]
- apiGroups: ["hotprefix.dev"]
  resources: ["hotprefixservices/status"]
  verbs: ["patch"]
- apiGroups: ["apps"]
  resources: ["statefulsets", "deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["serviceaccounts", "persistentvolumeclaims"]
  verbs: ["create", "patch"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["list", "watch", "create", "patch"]
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["create", "patch"]
- apiGroups: ["discovery.k8s.io"]
  resources: ["endpointslices"]
  verbs: ["list", "watch"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end -}}
