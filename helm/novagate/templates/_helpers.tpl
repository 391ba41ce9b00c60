{{- define "novagate.name" -}}{{ .Release.Name }}-novagate{{- end -}}
{{- define "novagate.secret" -}}{{ .Values.secret.existingSecret | default (include "novagate.name" .) }}{{- end -}}
