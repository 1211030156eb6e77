{{/* Chart name, truncated to a DNS label. */}}
{{- define "edgefleet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name: the release name when it already contains the chart name. */}}
{{- define "edgefleet.fullname" -}}
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

{{- define "edgefleet.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object of the release. */}}
{{- define "edgefleet.labels" -}}
helm.sh/chart: {{ include "edgefleet.chart" . }}
{{ include "edgefleet.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: edgefleet
{{- end }}

{{/* Selector labels of the operator pods (immutable: never add to these). */}}
{{- define "edgefleet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "edgefleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* The operator's ServiceAccount name. */}}
{{- define "edgefleet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "edgefleet.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* An edgefleet image: dict "root" . "image" .Values.image. repository (default images.registry/name), then
@digest (image.digest, else images.digests.<name>) or :tag (default appVersion). */}}
{{- define "edgefleet.imageRef" -}}
{{- $v := .root.Values }}
{{- $repo := default (printf "%s/%s" (trimSuffix "/" $v.images.registry) .image.name) .image.repository }}
{{- $digest := default (get ($v.images.digests | default dict) .image.name) .image.digest }}
{{- if $digest }}
{{- printf "%s@%s" $repo $digest }}
{{- else }}
{{- printf "%s:%s" $repo (default .root.Chart.AppVersion .image.tag) }}
{{- end }}
{{- end }}

{{/* The operator image. */}}
{{- define "edgefleet.image" -}}
{{- include "edgefleet.imageRef" (dict "root" . "image" .Values.image) }}
{{- end }}

{{/* The compile Job image (the compiler image: the operator's toolchain plus OpenVINO, LiteRT, onnx2tf). */}}
{{- define "edgefleet.compilerImage" -}}
{{- include "edgefleet.imageRef" (dict "root" . "image" .Values.compile.image) }}
{{- end }}

{{/* With images.requireDigests, fail unless every image the release runs has a digest: the operator, the
compiler and (profiles.builtin.enabled) each built-in profile's runtime image. */}}
{{- define "edgefleet.requireDigests" -}}
{{- $v := .Values }}
{{- if $v.images.requireDigests }}
{{- $digests := $v.images.digests | default dict }}
{{- $missing := list }}
{{- if not (or $v.image.digest (get $digests $v.image.name)) }}{{ $missing = append $missing $v.image.name }}{{ end }}
{{- if not (or $v.compile.image.digest (get $digests $v.compile.image.name)) }}{{ $missing = append $missing $v.compile.image.name }}{{ end }}
{{- if $v.profiles.builtin.enabled }}
{{- range list "runtime-coral" "runtime-cpu" "runtime-gpu" "runtime-jetson" "runtime-openvino" }}
{{- if not (get $digests .) }}{{ $missing = append $missing . }}{{ end }}
{{- end }}
{{- end }}
{{- if $missing }}
{{- fail (printf "images.requireDigests is true but images.digests lacks %s; fix: push and sign them with `edgefleet images build --all --push REGISTRY/PREFIX --sign-key KEY` and pass the --set images.digests.<name>=sha256:... line it prints (or set profiles.builtin.enabled=false and pin your own profiles' runtimeImage by digest)" (join ", " $missing)) }}
{{- end }}
{{- end }}
{{- end }}
