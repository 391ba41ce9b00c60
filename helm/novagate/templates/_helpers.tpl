{{/* Resource names: <release>-novagate, as in every earlier version of the chart (renaming would replace the
Secret, and with it every resume token). */}}
{{- define "novagate.name" -}}{{ printf "%s-novagate" .Release.Name | trunc 63 | trimSuffix "-" }}{{- end -}}
{{- define "novagate.secret" -}}{{ .Values.secret.existingSecret | default (include "novagate.name" .) }}{{- end -}}
{{- define "novagate.serviceAccount" -}}
{{- if .Values.serviceAccount.create }}{{ .Values.serviceAccount.name | default (include "novagate.name" .) }}
{{- else }}{{ .Values.serviceAccount.name | default "default" }}{{ end -}}
{{- end -}}

{{/* The pod selector. A Deployment's selector cannot change after it is created: it stays `app: <name>`. */}}
{{- define "novagate.selector" -}}
app: {{ include "novagate.name" . }}
{{- end -}}

{{- define "novagate.labels" -}}
{{ include "novagate.selector" . }}
app.kubernetes.io/name: novagate
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* NOVAGATE_ALLOWED_HOSTS: the value when set; else the ingress's host names; else the names the Service has
inside the cluster (clients in other namespaces reach it by these). */}}
{{- define "novagate.allowedHosts" -}}
{{- if .Values.allowedHosts -}}
{{ .Values.allowedHosts }}
{{- else if and .Values.ingress.enabled .Values.ingress.hosts -}}
{{ join "," .Values.ingress.hosts }}
{{- else -}}
{{- $svc := include "novagate.name" . -}}
{{- $ns := .Release.Namespace -}}
{{ printf "%s,%s.%s,%s.%s.svc,%s.%s.svc.%s" $svc $svc $ns $svc $ns $svc $ns .Values.clusterDomain }}
{{- end -}}
{{- end -}}

{{/* Seconds the kubelet waits after the preStop hook starts before it kills the container: the preStop
sleep, then the gateway's drain (NOVAGATE_DRAIN_GRACE_S), then a margin for the process to exit (under
several workers the supervisor waits up to 10 s more for them, gateway/workers.py). */}}
{{- define "novagate.terminationGrace" -}}
{{ add .Values.drain.preStopSleepSeconds .Values.drain.graceSeconds .Values.drain.marginSeconds }}
{{- end -}}

{{/* Worker processes per pod (NOVAGATE_WORKERS): the value when set, else one per CPU of the CPU limit,
rounded up (what the gateway itself would count from its cgroup quota), else 1. */}}
{{- define "novagate.workers" -}}
{{- $cpu := "" -}}
{{- with .Values.resources.limits }}{{ $cpu = toString (.cpu | default "") }}{{ end -}}
{{- if .Values.workers -}}
{{ .Values.workers }}
{{- else if hasSuffix "m" $cpu -}}
{{ divf (trimSuffix "m" $cpu | float64) 1000 | ceil | int }}
{{- else if $cpu -}}
{{ $cpu | float64 | ceil | int }}
{{- else -}}
1
{{- end -}}
{{- end -}}

{{/* The Secret's contents across upgrades (templates/secret.yaml), as YAML:
  current    NOVAGATE_SECRET: kept from the Secret in the cluster (helm's `lookup`); new (random) on the first
             install, or when secret.rotation changes, or secret.value when set;
  previous   NOVAGATE_SECRET_PREVIOUS: the secrets replaced by the last rotations (they still verify), kept until
             rotatedAt + the grace period, then dropped by the next render;
  rotation, rotatedAt  kept as annotations of the Secret.
Without a cluster (`helm template`, `helm lint`) lookup finds nothing: a first install. */}}
{{- define "novagate.secretState" -}}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "novagate.name" .) | default dict -}}
{{- $data := $existing.data | default dict -}}
{{- $ann := dig "metadata" "annotations" dict $existing -}}
{{- $rotation := toString .Values.secret.rotation -}}
{{- $kept := "" -}}
{{- with get $data "NOVAGATE_SECRET" }}{{ $kept = b64dec . }}{{ end -}}
{{- $previous := list -}}
{{- with get $data "NOVAGATE_SECRET_PREVIOUS" }}{{ $previous = splitList "," (b64dec .) | compact }}{{ end -}}
{{- $rotatedAt := get $ann "novagate.io/rotated-at" | default "0" | int64 -}}
{{- $current := $kept -}}
{{- if .Values.secret.value -}}
{{- $current = .Values.secret.value -}}
{{- else if or (not $kept) (and $existing (ne $rotation (get $ann "novagate.io/rotation" | default ""))) -}}
{{- $current = randAlphaNum 48 -}}
{{- end -}}
{{- $now := now | unixEpoch | int64 -}}
{{- if and $kept (ne $kept $current) -}}
{{- $previous = prepend $previous $kept | uniq -}}
{{- $rotatedAt = $now -}}
{{- end -}}
{{- $previous = without $previous $current -}}
{{- $grace := .Values.secret.previousGraceSeconds | default (add .Values.resumeTtlSeconds 3600) | int64 -}}
{{- if and $previous (ge $now (add $rotatedAt $grace)) -}}
{{- $previous = list -}}
{{- end -}}
current: {{ $current | quote }}
previous: {{ join "," $previous | quote }}
rotation: {{ $rotation | quote }}
rotatedAt: {{ $rotatedAt | toString | quote }}
{{- end -}}
