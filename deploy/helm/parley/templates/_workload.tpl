{{/*
The pieces UserService and ChatService share. Each is called with a dict:
  root:        the top-level context ($)
  component:   "user" or "chat"
  values:      .Values.user or .Values.chat
  healthName:  the readiness service name, e.g. "user.UserService"
  secretEnv:   list of [ENV_NAME, key of .Values.secret.keys] pairs the container reads
  env:         further env entries of the container, as YAML (optional)
  config:      the rendered ConfigMap data (its checksum rolls the pods when it changes)
*/}}

{{/*
A setting's value as ConfigMap text, quoted. A whole number that a values file gave (YAML
numbers reach templates as floats) is written as digits: 1000000, never 1e+06.
*/}}
{{- define "parley.configValue" -}}
{{- if and (kindIs "float64" .) (eq (floor .) .) }}{{ int64 . | toString | quote }}{{ else }}{{ toString . | quote }}{{ end }}
{{- end }}

{{/*
Settings both services read, as ConfigMap data.
*/}}
{{- define "parley.commonConfig" -}}
{{- $c := .root.Values.config }}
{{- $v := .values -}}
PARLEY_GRPC_PORT: {{ $v.ports.grpc | quote }}
PARLEY_METRICS_PORT: {{ $v.ports.metrics | quote }}
PARLEY_LOG_FORMAT: {{ $c.logFormat | quote }}
PARLEY_LOG_LEVEL: {{ $c.logLevel | quote }}
PARLEY_SHUTDOWN_DELAY: {{ printf "%ds" (int $v.shutdown.delaySeconds) | quote }}
PARLEY_SHUTDOWN_GRACE: {{ printf "%ds" (int $v.shutdown.graceSeconds) | quote }}
PARLEY_MAX_CONNECTION_AGE: {{ $c.maxConnectionAge | quote }}
PARLEY_MAX_CONNECTION_AGE_GRACE: {{ $c.maxConnectionAgeGrace | quote }}
PARLEY_KEEPALIVE_TIME: {{ $c.keepaliveTime | quote }}
PARLEY_KEEPALIVE_TIMEOUT: {{ $c.keepaliveTimeout | quote }}
PARLEY_HEALTH_CHECK_INTERVAL: {{ $c.healthCheckInterval | quote }}
PARLEY_JWT_ISSUER: {{ $c.jwtIssuer | quote }}
PARLEY_JWT_AUDIENCE: {{ $c.jwtAudience | quote }}
PARLEY_JWT_LEEWAY: {{ $c.jwtLeeway | quote }}
PARLEY_ACCESS_LOG_SAMPLE: {{ include "parley.configValue" $c.accessLogSample }}
PARLEY_DB_POOL_MIN: {{ include "parley.configValue" $v.config.dbPoolMin }}
PARLEY_DB_POOL_MAX: {{ include "parley.configValue" $v.config.dbPoolMax }}
PARLEY_DB_POOL_TIMEOUT: {{ $v.config.dbPoolTimeout | quote }}
PARLEY_MAX_STREAMS: {{ include "parley.configValue" $v.config.maxStreams }}
PARLEY_MAX_UNARY_CALLS: {{ include "parley.configValue" $v.config.maxUnaryCalls }}
{{- $t := .root.Values.tls }}
{{- if $t.enabled }}
PARLEY_TLS_CERT_FILE: {{ include "parley.tls.file" "tls.crt" | quote }}
PARLEY_TLS_KEY_FILE: {{ include "parley.tls.file" "tls.key" | quote }}
{{- if $t.clientAuth }}
PARLEY_TLS_CLIENT_CA_FILE: {{ include "parley.tls.file" "ca.crt" | quote }}
{{- end }}
PARLEY_HEALTH_PORT: {{ $t.healthPort | quote }}
{{- end }}
{{- include "parley.tracingConfig" .root }}
{{- end }}

{{/*
The standard OTEL_* variables of tracing, as ConfigMap data (with a leading newline), or
nothing while tracing is off. OTEL_TRACES_SAMPLER_ARG only for the samplers that read it.
Refuses, in one line, to turn tracing on without an endpoint. Call with the top-level context.
*/}}
{{- define "parley.tracingConfig" -}}
{{- $t := .Values.tracing }}
{{- if $t.enabled }}
{{- if not $t.endpoint }}
{{- fail "tracing.enabled is true but tracing.endpoint is empty: set it to the OTLP URL of your collector, e.g. http://otel-collector.observability.svc.cluster.local:4317" }}
{{- end }}
OTEL_TRACES_EXPORTER: "otlp"
OTEL_EXPORTER_OTLP_ENDPOINT: {{ $t.endpoint | quote }}
OTEL_EXPORTER_OTLP_PROTOCOL: {{ $t.protocol | quote }}
OTEL_TRACES_SAMPLER: {{ $t.sampler | quote }}
{{- if hasSuffix "traceidratio" $t.sampler }}
OTEL_TRACES_SAMPLER_ARG: {{ include "parley.configValue" $t.samplerRatio }}
{{- end }}
{{- with $t.resourceAttributes }}
{{- $pairs := list }}
{{- range $key, $value := . }}
{{- $pairs = append $pairs (printf "%s=%s" $key $value) }}
{{- end }}
OTEL_RESOURCE_ATTRIBUTES: {{ join "," $pairs | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The port the OTLP collector listens on, for the NetworkPolicies: the one tracing.endpoint
names; without one, gRPC's default (443), or HTTP's (80) for http:// with http/protobuf.
*/}}
{{- define "parley.tracing.port" -}}
{{- $t := .Values.tracing }}
{{- $host := (urlParse $t.endpoint).host }}
{{- if regexMatch ":[0-9]+$" $host }}{{ regexFind "[0-9]+$" $host }}
{{- else if and (eq $t.protocol "http/protobuf") (hasPrefix "http://" $t.endpoint) }}80
{{- else }}443
{{- end }}
{{- end }}

{{/*
Where a key of the TLS Secret is mounted; call with the key name.
*/}}
{{- define "parley.tls.file" -}}
{{- printf "/etc/parley/tls/%s" . }}
{{- end }}

{{/*
The port the kubelet probes: the plain-text health-only port while TLS is on (the native
gRPC probe cannot speak TLS), else the gRPC port.
*/}}
{{- define "parley.probePort" -}}
{{- if .root.Values.tls.enabled }}{{ .root.Values.tls.healthPort }}{{ else }}{{ .values.ports.grpc }}{{ end }}
{{- end }}

{{- define "parley.configMap" -}}
apiVersion: v1
kind: ConfigMap
metadata:
  name: {{ include "parley.componentName" . }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "parley.componentLabels" . | nindent 4 }}
data:
  {{- .config | nindent 2 }}
{{- end }}

{{- define "parley.deployment" -}}
{{- $root := .root }}
{{- $v := .values }}
{{- $name := include "parley.componentName" . }}
{{- $sh := $v.shutdown }}
{{- $needed := add $sh.preStopSleepSeconds $sh.delaySeconds $sh.graceSeconds }}
{{- if le (int $v.terminationGracePeriodSeconds) (int $needed) }}
{{- fail (printf "%s.terminationGracePeriodSeconds (%d) must be greater than shutdown.preStopSleepSeconds + shutdown.delaySeconds + shutdown.graceSeconds (%d)" .component (int $v.terminationGracePeriodSeconds) (int $needed)) }}
{{- end }}
{{- $image := include "parley.image" (dict "root" $root "image" $v.image) }}
{{- $tls := $root.Values.tls }}
{{- if and $tls.enabled (not $tls.existingSecret) }}
{{- fail "tls.existingSecret must name a kubernetes.io/tls Secret (tls.crt, tls.key, ca.crt) when tls.enabled is true" }}
{{- end }}
{{- if and $tls.enabled (or (eq (int $tls.healthPort) (int $v.ports.grpc)) (eq (int $tls.healthPort) (int $v.ports.metrics))) }}
{{- fail (printf "tls.healthPort (%d) must differ from %s.ports.grpc and %s.ports.metrics" (int $tls.healthPort) .component .component) }}
{{- end }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ $name }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "parley.componentLabels" . | nindent 4 }}
spec:
  {{- if not $v.autoscaling.enabled }}
  replicas: {{ $v.replicaCount }}
  {{- end }}
  revisionHistoryLimit: 5
  # Surge first so a rollout never drops below the wanted number of ready replicas.
  strategy:
    type: RollingUpdate
    rollingUpdate:
      maxSurge: 25%
      maxUnavailable: 0
  selector:
    matchLabels:
      {{- include "parley.componentSelectorLabels" . | nindent 6 }}
  template:
    metadata:
      annotations:
        checksum/config: {{ .config | sha256sum }}
        checksum/secret: {{ include "parley.secret.checksum" $root }}
        {{- with $v.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      labels:
        {{- include "parley.componentLabels" . | nindent 8 }}
        {{- with $v.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      serviceAccountName: {{ include "parley.serviceAccountName" $root }}
      automountServiceAccountToken: false
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.priorityClassName }}
      priorityClassName: {{ . }}
      {{- end }}
      securityContext:
        {{- toYaml $root.Values.podSecurityContext | nindent 8 }}
      terminationGracePeriodSeconds: {{ $v.terminationGracePeriodSeconds }}
      {{- if include "parley.migrations.initContainers" $root }}
      initContainers:
        - name: migrate
          image: {{ $image }}
          imagePullPolicy: {{ $v.image.pullPolicy }}
          args: ["migrate"]
          envFrom:
            - configMapRef:
                name: {{ $name }}
          env:
            {{- include "parley.secretEnv" (dict "root" $root "env" "PARLEY_DATABASE_URL" "key" "databaseUrl") | nindent 12 }}
          {{- with $root.Values.migrations.resources }}
          resources:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          securityContext:
            {{- toYaml $root.Values.securityContext | nindent 12 }}
          volumeMounts:
            - name: tmp
              mountPath: /tmp
      {{- end }}
      containers:
        - name: {{ .component }}
          image: {{ $image }}
          imagePullPolicy: {{ $v.image.pullPolicy }}
          args: ["serve"]
          ports:
            - name: grpc
              containerPort: {{ $v.ports.grpc }}
              protocol: TCP
            - name: metrics
              containerPort: {{ $v.ports.metrics }}
              protocol: TCP
            {{- if $tls.enabled }}
            - name: health
              containerPort: {{ $tls.healthPort }}
              protocol: TCP
            {{- end }}
          envFrom:
            - configMapRef:
                name: {{ $name }}
          env:
            {{- range .secretEnv }}
            {{- include "parley.secretEnv" (dict "root" $root "env" (index . 0) "key" (index . 1)) | nindent 12 }}
            {{- end }}
            {{- with .env }}
            {{- . | nindent 12 }}
            {{- end }}
            {{- with $v.extraEnv }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          startupProbe:
            grpc:
              port: {{ include "parley.probePort" . }}
              service: ""
            periodSeconds: {{ $v.probes.startup.periodSeconds }}
            timeoutSeconds: {{ $v.probes.startup.timeoutSeconds }}
            failureThreshold: {{ $v.probes.startup.failureThreshold }}
          livenessProbe:
            grpc:
              port: {{ include "parley.probePort" . }}
              service: ""
            periodSeconds: {{ $v.probes.liveness.periodSeconds }}
            timeoutSeconds: {{ $v.probes.liveness.timeoutSeconds }}
            failureThreshold: {{ $v.probes.liveness.failureThreshold }}
          readinessProbe:
            grpc:
              port: {{ include "parley.probePort" . }}
              service: {{ .healthName | quote }}
            periodSeconds: {{ $v.probes.readiness.periodSeconds }}
            timeoutSeconds: {{ $v.probes.readiness.timeoutSeconds }}
            failureThreshold: {{ $v.probes.readiness.failureThreshold }}
            successThreshold: {{ $v.probes.readiness.successThreshold }}
          lifecycle:
            # Endpoints drop the pod while it sleeps; SIGTERM comes after.
            preStop:
              exec:
                command: ["sleep", "{{ $sh.preStopSleepSeconds }}"]
          {{- with $v.resources }}
          resources:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          securityContext:
            {{- toYaml $root.Values.securityContext | nindent 12 }}
          volumeMounts:
            - name: tmp
              mountPath: /tmp
            {{- if $tls.enabled }}
            - name: tls
              mountPath: {{ include "parley.tls.file" "" | trimSuffix "/" }}
              readOnly: true
            {{- end }}
      volumes:
        - name: tmp
          emptyDir:
            sizeLimit: 64Mi
        {{- if $tls.enabled }}
        - name: tls
          secret:
            secretName: {{ $tls.existingSecret }}
            defaultMode: 0440
        {{- end }}
      {{- if $v.affinity }}
      affinity:
        {{- toYaml $v.affinity | nindent 8 }}
      {{- else if eq $v.podAntiAffinity "preferred" }}
      affinity:
        podAntiAffinity:
          preferredDuringSchedulingIgnoredDuringExecution:
            - weight: 100
              podAffinityTerm:
                topologyKey: kubernetes.io/hostname
                labelSelector:
                  matchLabels:
                    {{- include "parley.componentSelectorLabels" . | nindent 20 }}
      {{- else if eq $v.podAntiAffinity "required" }}
      affinity:
        podAntiAffinity:
          requiredDuringSchedulingIgnoredDuringExecution:
            - topologyKey: kubernetes.io/hostname
              labelSelector:
                matchLabels:
                  {{- include "parley.componentSelectorLabels" . | nindent 18 }}
      {{- end }}
      {{- with $v.topologySpreadConstraints }}
      {{- $selector := dict "matchLabels" (include "parley.componentSelectorLabels" $ | fromYaml) }}
      topologySpreadConstraints:
        {{- range . }}
        - {{- toYaml (merge (deepCopy .) (dict "labelSelector" $selector)) | nindent 10 }}
        {{- end }}
      {{- end }}
      {{- with $v.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end }}

{{/*
The ClusterIP Service of a component, with named ports grpc and metrics.
*/}}
{{- define "parley.service" -}}
{{- $v := .values }}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "parley.componentName" . }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "parley.componentLabels" . | nindent 4 }}
  {{- with $v.service.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  type: {{ $v.service.type }}
  selector:
    {{- include "parley.componentSelectorLabels" . | nindent 4 }}
  ports:
    - name: grpc
      port: {{ $v.ports.grpc }}
      targetPort: grpc
      protocol: TCP
      # HTTP/2 over TLS when tls.enabled, else cleartext HTTP/2.
      appProtocol: {{ if .root.Values.tls.enabled }}https{{ else }}kubernetes.io/h2c{{ end }}
    - name: metrics
      port: {{ $v.ports.metrics }}
      targetPort: metrics
      protocol: TCP
      appProtocol: http
{{- end }}

{{- define "parley.hpa" -}}
{{- $a := .values.autoscaling }}
{{- if $a.enabled }}
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ include "parley.componentName" . }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "parley.componentLabels" . | nindent 4 }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ include "parley.componentName" . }}
  minReplicas: {{ $a.minReplicas }}
  maxReplicas: {{ $a.maxReplicas }}
  metrics:
    - type: Resource
      resource:
        name: cpu
        target:
          type: Utilization
          averageUtilization: {{ $a.targetCPUUtilizationPercentage }}
    {{- if $a.targetMemoryUtilizationPercentage }}
    - type: Resource
      resource:
        name: memory
        target:
          type: Utilization
          averageUtilization: {{ $a.targetMemoryUtilizationPercentage }}
    {{- end }}
  {{- with $a.behavior }}
  behavior:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
{{- end }}

{{- define "parley.pdb" -}}
{{- $p := .values.pdb }}
{{- if $p.enabled }}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "parley.componentName" . }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "parley.componentLabels" . | nindent 4 }}
spec:
  {{- if not (eq (toString $p.minAvailable) "") }}
  minAvailable: {{ $p.minAvailable }}
  {{- else }}
  maxUnavailable: {{ $p.maxUnavailable }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "parley.componentSelectorLabels" . | nindent 6 }}
{{- end }}
{{- end }}

{{/*
NetworkPolicy egress rules every Parley workload needs: DNS (networkPolicy.dns.to on
networkPolicy.dns.ports) and Postgres. Call with the top-level context.
*/}}
{{- define "parley.networkPolicy.baseEgress" -}}
{{- $np := .Values.networkPolicy }}
{{- include "parley.networkPolicy.dnsEgress" . }}
{{- if .Values.postgresql.enabled }}
- ports:
    - port: 5432
      protocol: TCP
  to:
    - podSelector:
        matchLabels:
          {{- include "parley.componentSelectorLabels" (dict "root" . "component" "postgresql") | nindent 10 }}
{{- else }}
- ports:
    - port: {{ $np.postgres.port }}
      protocol: TCP
  {{- with $np.postgres.to }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
{{- end }}

{{/*
The egress rule of user and chat to the OTLP collector while tracing is on: the peers of
networkPolicy.tracing.to (an empty list leaves `to` out: any destination) on
networkPolicy.tracing.port, or the endpoint's port. Nothing while tracing is off.
*/}}
{{- define "parley.networkPolicy.tracingEgress" -}}
{{- if .Values.tracing.enabled }}
{{- $np := .Values.networkPolicy.tracing -}}
- ports:
    - port: {{ $np.port | default (include "parley.tracing.port" .) }}
      protocol: TCP
  {{- with $np.to }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
{{- end }}

{{/*
The egress rule to the cluster DNS: the peers of networkPolicy.dns.to as they are (an empty
list leaves `to` out, which means any destination) on networkPolicy.dns.ports.
*/}}
{{- define "parley.networkPolicy.dnsEgress" -}}
{{- $dns := .Values.networkPolicy.dns -}}
- ports:
    {{- toYaml $dns.ports | nindent 4 }}
  {{- with $dns.to }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

{{/*
The ingress rule that lets Prometheus scrape a metrics port: the peers of
networkPolicy.prometheus.from as they are; an empty list leaves `from` out (any source).
Call with the top-level context.
*/}}
{{- define "parley.networkPolicy.metricsIngress" -}}
- ports:
    - port: metrics
      protocol: TCP
  {{- with .Values.networkPolicy.prometheus.from }}
  from:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
