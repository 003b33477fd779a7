{{/*
Names, labels, images and secrets shared by every template of the chart.
*/}}

{{- define "parley.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of every resource name: the release name, with the chart name unless the release
name already contains it. Truncated to 63 characters because some fields are DNS labels.
*/}}
{{- define "parley.fullname" -}}
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

{{- define "parley.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The name of one component's resources: call with (dict "root" $ "component" "user").
*/}}
{{- define "parley.componentName" -}}
{{- printf "%s-%s" (include "parley.fullname" .root) .component | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "parley.user.fullname" -}}
{{- include "parley.componentName" (dict "root" . "component" "user") }}
{{- end }}

{{/*
The headless Service of UserService: its DNS name resolves to every ready pod, so chat can
balance calls with round_robin over dns:///.
*/}}
{{- define "parley.user.headlessName" -}}
{{- printf "%s-headless" (include "parley.user.fullname" . | trunc 54 | trimSuffix "-") }}
{{- end }}

{{- define "parley.chat.fullname" -}}
{{- include "parley.componentName" (dict "root" . "component" "chat") }}
{{- end }}

{{- define "parley.migrations.fullname" -}}
{{- include "parley.componentName" (dict "root" . "component" "migrations") }}
{{- end }}

{{- define "parley.postgresql.fullname" -}}
{{- include "parley.componentName" (dict "root" . "component" "postgresql") }}
{{- end }}

{{- define "parley.redis.fullname" -}}
{{- include "parley.componentName" (dict "root" . "component" "redis") }}
{{- end }}

{{/*
Labels every resource carries.
*/}}
{{- define "parley.labels" -}}
helm.sh/chart: {{ include "parley.chart" . }}
{{ include "parley.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: parley
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Labels that identify the release's pods; never change them, Deployments select on them.
*/}}
{{- define "parley.selectorLabels" -}}
app.kubernetes.io/name: {{ include "parley.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Labels and selector labels of one component: call with (dict "root" $ "component" "chat").
*/}}
{{- define "parley.componentLabels" -}}
{{ include "parley.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "parley.componentSelectorLabels" -}}
{{ include "parley.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
The reference of every image the chart runs, from {repository, tag, digest}: with a digest
it is repository@digest and the tag is ignored; else repository:tag, where an empty tag
means the chart's appVersion. Call with (dict "root" $ "image" .Values.user.image).
*/}}
{{- define "parley.image" -}}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository (.image.tag | default .root.Chart.AppVersion | toString) }}
{{- end }}
{{- end }}

{{- define "parley.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "parley.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The Secret holding PARLEY_JWT_SECRET, PARLEY_DATABASE_URL and PARLEY_REDIS_URL: the user's
existingSecret, or the one this chart makes.
*/}}
{{- define "parley.secretName" -}}
{{- if .Values.secret.existingSecret }}
{{- .Values.secret.existingSecret }}
{{- else }}
{{- include "parley.fullname" . }}
{{- end }}
{{- end }}

{{/*
One env entry read from the Secret: call with (dict "root" $ "env" "PARLEY_JWT_SECRET" "key" "jwtSecret").
*/}}
{{- define "parley.secretEnv" -}}
- name: {{ .env }}
  valueFrom:
    secretKeyRef:
      name: {{ include "parley.secretName" .root }}
      key: {{ index .root.Values.secret.keys .key }}
{{- end }}

{{/*
Whether migrations run as init containers of the Deployments rather than as a hook Job.
"auto" picks init containers with the in-chart Postgres, because pre-install hooks run
before any of the chart's other resources, the database included, exist.
*/}}
{{- define "parley.migrations.initContainers" -}}
{{- $m := .Values.migrations }}
{{- if and $m.enabled (or (eq $m.mode "initContainer") (and (eq $m.mode "auto") .Values.postgresql.enabled)) }}true{{ end }}
{{- end }}

{{- define "parley.migrations.hookJob" -}}
{{- $m := .Values.migrations }}
{{- if and $m.enabled (not (include "parley.migrations.initContainers" .)) }}true{{ end }}
{{- end }}

{{/*
The Postgres address the services use: the in-chart StatefulSet when it is enabled.
*/}}
{{- define "parley.postgresql.host" -}}
{{- printf "%s.%s.svc.%s" (include "parley.postgresql.fullname" .) .Release.Namespace .Values.clusterDomain }}
{{- end }}

{{- define "parley.redis.host" -}}
{{- printf "%s.%s.svc.%s" (include "parley.redis.fullname" .) .Release.Namespace .Values.clusterDomain }}
{{- end }}

{{/*
The secretKeyRef (name and key) of the in-chart Redis's password: redis.auth.existingSecret,
else the release's Secret (the chart's own or secret.existingSecret) under
secret.keys.redisPassword.
*/}}
{{- define "parley.redis.passwordRef" -}}
{{- if .Values.redis.auth.existingSecret -}}
name: {{ .Values.redis.auth.existingSecret }}
key: {{ .Values.redis.auth.existingSecretPasswordKey }}
{{- else -}}
name: {{ include "parley.secretName" . }}
key: {{ .Values.secret.keys.redisPassword }}
{{- end }}
{{- end }}

{{/*
Chat's PARLEY_REDIS_URL for the in-chart Redis: the kubelet puts the password into the URL
from REDIS_PASSWORD, so no manifest holds it. Without the in-chart Redis the URL is a key
of the release's Secret.
*/}}
{{- define "parley.chat.redisEnv" -}}
{{- if .Values.redis.enabled -}}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      {{- include "parley.redis.passwordRef" . | nindent 6 }}
- name: PARLEY_REDIS_URL
  value: {{ printf "redis://:$(REDIS_PASSWORD)@%s:6379/0" (include "parley.redis.host" .) | quote }}
{{- else -}}
{{ include "parley.secretEnv" (dict "root" . "env" "PARLEY_REDIS_URL" "key" "redisUrl") }}
{{- end }}
{{- end }}

{{/*
The target chat dials for UserService: round_robin over the headless Service's pod addresses.
*/}}
{{- define "parley.chat.userServiceAddr" -}}
{{- if .Values.chat.config.userServiceAddr }}
{{- .Values.chat.config.userServiceAddr }}
{{- else }}
{{- printf "dns:///%s.%s.svc.%s:%d" (include "parley.user.headlessName" .) .Release.Namespace .Values.clusterDomain (int .Values.user.ports.grpc) }}
{{- end }}
{{- end }}

{{/*
The data of the chart's own Secret (without secret.existingSecret), as JSON:
{"data": {key: base64 value}, "generated": [keys made up by this render]}. Generated values
(the JWT secret, the in-chart Postgres and Redis passwords) are read back from the live
Secret with `lookup`, so upgrades keep them; where `lookup` sees no cluster (helm template,
Argo CD) they are new on every render, which is why gitops mode refuses to generate them.
Computed once per render and kept on the top-level context, so that the Secret and the
pods' checksum/secret annotation are made from the same values. Call with $.
*/}}
{{- define "parley.secret.data" -}}
{{- if not (hasKey . "parleySecretData") }}
{{- $keys := .Values.secret.keys }}
{{- $live := get (lookup "v1" "Secret" .Release.Namespace (include "parley.fullname" .) | default dict) "data" | default dict }}
{{- $generated := list }}
{{- $jwt := .Values.secret.jwtSecret }}
{{- if not $jwt }}
{{- if hasKey $live $keys.jwtSecret }}
{{- $jwt = index $live $keys.jwtSecret | b64dec }}
{{- else }}
{{- $jwt = randAlphaNum 48 }}
{{- $generated = append $generated $keys.jwtSecret }}
{{- end }}
{{- end }}
{{- $data := dict $keys.jwtSecret ($jwt | b64enc) }}
{{- $databaseUrl := .Values.secret.databaseUrl }}
{{- if .Values.postgresql.enabled }}
{{- $pg := .Values.postgresql }}
{{- $pgPassword := $pg.password }}
{{- if not $pgPassword }}
{{- if hasKey $live $keys.postgresPassword }}
{{- $pgPassword = index $live $keys.postgresPassword | b64dec }}
{{- else }}
{{- $pgPassword = randAlphaNum 32 }}
{{- $generated = append $generated $keys.postgresPassword }}
{{- end }}
{{- end }}
{{- $_ := set $data $keys.postgresPassword ($pgPassword | b64enc) }}
{{- $databaseUrl = printf "postgresql://%s:%s@%s:5432/%s" $pg.username $pgPassword (include "parley.postgresql.host" .) $pg.database }}
{{- end }}
{{- $_ := set $data $keys.databaseUrl ($databaseUrl | b64enc) }}
{{- if not .Values.redis.enabled }}
{{- $_ := set $data $keys.redisUrl (.Values.secret.redisUrl | b64enc) }}
{{- else if not .Values.redis.auth.existingSecret }}
{{- $redisPassword := "" }}
{{- if hasKey $live $keys.redisPassword }}
{{- $redisPassword = index $live $keys.redisPassword | b64dec }}
{{- else }}
{{- $redisPassword = randAlphaNum 48 }}
{{- $generated = append $generated $keys.redisPassword }}
{{- end }}
{{- $_ := set $data $keys.redisPassword ($redisPassword | b64enc) }}
{{- end }}
{{- $_ := set . "parleySecretData" (dict "data" $data "generated" $generated) }}
{{- end }}
{{- toJson (get . "parleySecretData") }}
{{- end }}

{{/*
The checksum/secret annotation of the pods that read the release's Secret: a sha256 of the
data the chart renders into its own Secret, or of secret.existingSecret's data as `lookup`
reads it (nothing under helm template or without RBAC), with redis.auth.existingSecret's
when the in-chart Redis uses it, and secret.revision, which the user changes to roll the
pods when the chart cannot read their Secret. Call with $.
*/}}
{{- define "parley.secret.checksum" -}}
{{- $in := dict "revision" .Values.secret.revision }}
{{- if .Values.secret.existingSecret }}
{{- $live := lookup "v1" "Secret" .Release.Namespace .Values.secret.existingSecret | default dict }}
{{- $_ := set $in "existingSecret" (dict "name" .Values.secret.existingSecret "data" (get $live "data" | default dict)) }}
{{- else }}
{{- $_ := set $in "data" (get (include "parley.secret.data" . | fromJson) "data") }}
{{- end }}
{{- if and .Values.redis.enabled .Values.redis.auth.existingSecret }}
{{- $live := lookup "v1" "Secret" .Release.Namespace .Values.redis.auth.existingSecret | default dict }}
{{- $_ := set $in "redisSecret" (dict "name" .Values.redis.auth.existingSecret "data" (get $live "data" | default dict)) }}
{{- end }}
{{- toJson $in | sha256sum }}
{{- end }}

{{/*
The in-chart Redis's checksum/secret: only its password (from redis.auth.existingSecret, the
key secret.keys.redisPassword of secret.existingSecret, or the chart's own Secret) and
secret.revision, so that rotating the JWT secret or a database URL does not restart Redis and
drop every chat subscription. Call with $.
*/}}
{{- define "parley.redis.secretChecksum" -}}
{{- $in := dict "revision" .Values.secret.revision }}
{{- $name := .Values.redis.auth.existingSecret | default .Values.secret.existingSecret }}
{{- $key := ternary .Values.redis.auth.existingSecretPasswordKey .Values.secret.keys.redisPassword (not (empty .Values.redis.auth.existingSecret)) }}
{{- if $name }}
{{- $live := get (lookup "v1" "Secret" .Release.Namespace $name | default dict) "data" | default dict }}
{{- $_ := set $in "password" (dict "name" $name "value" (get $live $key | default "")) }}
{{- else }}
{{- $_ := set $in "password" (get (get (include "parley.secret.data" . | fromJson) "data") $key) }}
{{- end }}
{{- toJson $in | sha256sum }}
{{- end }}

{{/*
The in-chart Redis is one node, never a cluster. One line.
*/}}
{{- define "parley.redisCluster.check" -}}
{{- if and .Values.redis.enabled .Values.chat.config.redisCluster }}
{{- fail "chat.config.redisCluster is true but redis.enabled is true: the in-chart Redis is a single node; set redis.enabled=false and point secret.redisUrl at a node of your Redis Cluster" }}
{{- end }}
{{- end }}

{{/*
gitops mode: nothing may be generated, so secret.existingSecret is required. One line.
*/}}
{{- define "parley.gitops.check" -}}
{{- if and .Values.gitops (not .Values.secret.existingSecret) }}
{{- fail "gitops is true but secret.existingSecret is empty: helm template (Argo CD) cannot keep generated secrets, so create the Secret yourself and name it in secret.existingSecret" }}
{{- end }}
{{- end }}
