{{- define "tiffin.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tiffin.fullname" -}}
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

{{- define "tiffin.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{ include "tiffin.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "tiffin.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tiffin.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: server
{{- end }}

{{- /* Plain-manifest canaries (kubectl users, seed 004): a second Deployment per track behind
the same Service; its selector adds the track so the two Deployments never overlap. */ -}}
{{- define "tiffin.workloadName" -}}
{{- if .Values.track }}{{ printf "%s-%s" (include "tiffin.fullname" .) .Values.track }}{{ else }}{{ include "tiffin.fullname" . }}{{ end }}
{{- end }}

{{- define "tiffin.workloadSelector" -}}
{{ include "tiffin.selectorLabels" . }}
{{- with .Values.track }}
tiffin.dev/track: {{ . }}
{{- end }}
{{- end }}

{{- define "tiffin.image" -}}
{{- printf "%s:%s" .repository (.tag | default $.appVersion) }}
{{- end }}

{{- define "tiffin.redisName" -}}
{{- printf "%s-redis" (include "tiffin.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tiffin.llmName" -}}
{{- printf "%s-llm" (include "tiffin.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- /* The entry service's pod template: shared by the Deployment and the Rollout. */ -}}
{{- define "tiffin.podTemplate" -}}
metadata:
  labels:
    {{- include "tiffin.workloadSelector" . | nindent 4 }}
    {{- with .Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with .Values.podAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  automountServiceAccountToken: false
  terminationGracePeriodSeconds: {{ .Values.terminationGracePeriodSeconds }}
  securityContext:
    runAsNonRoot: true
    runAsUser: {{ .Values.securityContext.runAsUser }}
    runAsGroup: {{ .Values.securityContext.runAsGroup }}
    fsGroup: {{ .Values.securityContext.fsGroup }}
    seccompProfile:
      type: RuntimeDefault
  initContainers:
    # One init step in the same image: refuse a runtime whose open-files hard limit is below
    # what mlx_lm needs, then copy the Bento's models into a writable store, so models
    # registered through the admin API can be saved (BentoML serves a Bento from its own
    # models directory, which is in the read-only image).
    - name: prepare
      image: {{ include "tiffin.image" (merge (dict "appVersion" .Chart.AppVersion) .Values.image) | quote }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      command:
        - /bin/sh
        - -c
        - |
          set -e
          hard=$(ulimit -Hn)
          if [ "$hard" != unlimited ] && [ "$hard" -lt {{ .Values.nofileMinimum }} ]; then
            echo "open-files hard limit $hard < {{ .Values.nofileMinimum }}: raise the container runtime's LimitNOFILE" >&2
            exit 1
          fi
          cp -R "$BENTO_PATH/models/." /models/
      securityContext:
        {{- include "tiffin.containerSecurityContext" . | nindent 8 }}
      resources:
        requests: {cpu: 100m, memory: 64Mi}
        limits: {cpu: "1", memory: 256Mi}
      volumeMounts:
        - name: models
          mountPath: /models
  containers:
    - name: tiffin
      image: {{ include "tiffin.image" (merge (dict "appVersion" .Chart.AppVersion) .Values.image) | quote }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      # The image's entrypoint serves the Bento: `bentoml serve $BENTO_PATH`.
      args: ["serve", "--port", "{{ .Values.port }}", "--timeout-keep-alive", "{{ .Values.keepAliveSeconds }}"]
      ports:
        - name: http
          containerPort: {{ .Values.port }}
          protocol: TCP
      env:
        - name: TIFFIN_PORT
          value: {{ .Values.port | quote }}
        - name: TIFFIN_WORKERS
          value: {{ .Values.workers | quote }}
        - name: TIFFIN_LOG_LEVEL
          value: {{ .Values.logLevel | quote }}
        - name: TIFFIN_ENVIRONMENT
          value: production
        # BentoML's home (Prometheus multiprocess files, its tmp): the writable /tmp emptyDir.
        - name: BENTOML_HOME
          value: /tmp/bentoml
        - name: JWT_SECRET_KEY
          valueFrom:
            secretKeyRef:
              name: {{ .Values.jwt.existingSecret }}
              key: {{ .Values.jwt.key }}
        {{- if .Values.redis.enabled }}
        - name: REDIS_URL
          value: {{ printf "redis://%s:6379/0" (include "tiffin.redisName" .) | quote }}
        {{- else if .Values.redis.existingSecret }}
        - name: REDIS_URL
          valueFrom:
            secretKeyRef:
              name: {{ .Values.redis.existingSecret }}
              key: {{ .Values.redis.existingSecretKey }}
        {{- else if .Values.redis.url }}
        - name: REDIS_URL
          value: {{ .Values.redis.url | quote }}
        {{- end }}
        - name: TIFFIN_LLM_ENABLED
          value: {{ or .Values.llm.inEntry .Values.llm.separate.enabled | quote }}
        {{- if .Values.llm.separate.enabled }}
        - name: TIFFIN_RUNNER_URLS
          value: {{ dict "llm" (printf "http://%s:%v" (include "tiffin.llmName" .) .Values.service.port) | toJson | quote }}
        {{- end }}
        # Pod identity in logs and in the canary analysis.
        - name: POD_NAME
          valueFrom:
            fieldRef:
              fieldPath: metadata.name
        {{- range $name, $value := .Values.env }}
        - name: {{ $name }}
          value: {{ $value | quote }}
        {{- end }}
      {{- include "tiffin.probes" . | nindent 6 }}
      lifecycle:
        preStop:
          exec:
            command: ["sleep", "{{ .Values.drain.preStopSleepSeconds }}"]
      resources:
        {{- toYaml .Values.resources | nindent 8 }}
      securityContext:
        {{- include "tiffin.containerSecurityContext" . | nindent 8 }}
      volumeMounts:
        - name: tmp
          mountPath: /tmp
        - name: cache
          mountPath: /home/bentoml/.cache
        - name: models
          mountPath: /home/bentoml/bento/models
  volumes:
    - name: tmp
      emptyDir:
        sizeLimit: {{ .Values.tmpSizeLimit }}
    - name: cache
      emptyDir:
        sizeLimit: {{ .Values.cacheSizeLimit }}
    - name: models
      emptyDir:
        sizeLimit: {{ .Values.modelsSizeLimit }}
  {{- with .Values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

{{- define "tiffin.containerSecurityContext" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
{{- end }}

{{- /* BentoML's /livez (process up) and /readyz (Tiffin's models loaded and warm). */ -}}
{{- define "tiffin.probes" -}}
startupProbe:
  httpGet:
    path: /livez
    port: http
  periodSeconds: {{ .Values.probes.periodSeconds }}
  failureThreshold: {{ .Values.probes.startupFailureThreshold }}
livenessProbe:
  httpGet:
    path: /livez
    port: http
  periodSeconds: 10
  timeoutSeconds: 5
  failureThreshold: 3
readinessProbe:
  httpGet:
    path: /readyz
    port: http
  periodSeconds: {{ .Values.probes.periodSeconds }}
  timeoutSeconds: 3
  failureThreshold: 2
{{- end }}
