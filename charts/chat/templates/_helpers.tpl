{{/* Names and labels. */}}
{{- define "chat.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "chat.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "chat.selectorLabels" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .name }}
{{- end -}}

{{- define "chat.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Secret names: the existing one, or the one this chart creates. */}}
{{- define "chat.jwtSecret" -}}
{{- default (printf "%s-jwt" (include "chat.fullname" .)) .Values.jwt.existingSecret -}}
{{- end -}}
{{- define "chat.s3Secret" -}}
{{- default (printf "%s-s3" (include "chat.fullname" .)) .Values.s3.existingSecret -}}
{{- end -}}
{{- define "chat.s3Credentials" -}}
{{- if or .Values.s3.existingSecret .Values.s3.accessKeyId }}true{{ end -}}
{{- end -}}
{{- define "chat.cassandraSecret" -}}
{{- default (printf "%s-cassandra" (include "chat.fullname" .)) .Values.store.cassandra.existingSecret -}}
{{- end -}}

{{/*
The key of the JWT secret that holds the single verification key (the key for tokens without
`kid`), and the setting it goes to. Empty when only jwt.keys are set: then every token must
name its `kid`.
*/}}
{{- define "chat.jwtKind" -}}
{{- if .Values.jwt.rs256PublicKey -}}rs256
{{- else if .Values.jwt.eddsaPublicKey -}}eddsa
{{- else if .Values.jwt.hs256Secret -}}hs256
{{- else if .Values.jwt.existingSecret -}}
{{- if .Values.jwt.kind -}}{{ .Values.jwt.kind }}
{{- else if not .Values.jwt.keys -}}{{ fail "jwt.kind is required with jwt.existingSecret (rs256, eddsa or hs256), unless jwt.keys are set" }}
{{- end -}}
{{- else if .Values.jwt.keys -}}
{{- else -}}{{ fail "jwt: set one of hs256Secret, rs256PublicKey, eddsaPublicKey, existingSecret (with kind) or keys" }}
{{- end -}}
{{- end -}}

{{/*
The jwt.keys, checked, as a JSON list of {kid, alg, file}: `file` is the key of the JWT secret
holding the PEM (`key-<kid>.pem` when the chart creates the secret, `secretKey` with
jwt.existingSecret).
*/}}
{{- define "chat.jwtKeys" -}}
{{- $keys := list -}}
{{- $seen := dict -}}
{{- range $i, $k := .Values.jwt.keys -}}
{{- $kid := required (printf "jwt.keys[%d].kid is required (the key for tokens without kid is the single-key setting)" $i) $k.kid | toString -}}
{{- if not (regexMatch "^[A-Za-z0-9._-]{1,64}$" $kid) -}}
{{- fail (printf "jwt.keys[%d].kid %q: use 1-64 of A-Z a-z 0-9 . _ - (it names a file of the JWT secret)" $i $kid) -}}
{{- end -}}
{{- if hasKey $seen $kid -}}{{ fail (printf "jwt.keys: kid %q appears twice" $kid) }}{{- end -}}
{{- $_ := set $seen $kid true -}}
{{- if not (has $k.alg (list "RS256" "EdDSA")) -}}
{{- fail (printf "jwt.keys[%d].alg %q: RS256 or EdDSA (public keys only; HS256 keys go through extraEnv, for development)" $i (toString $k.alg)) -}}
{{- end -}}
{{- $file := "" -}}
{{- if $.Values.jwt.existingSecret -}}
{{- $file = required (printf "jwt.keys[%d].secretKey is required with jwt.existingSecret (the key of that secret holding the PEM)" $i) $k.secretKey -}}
{{- else -}}
{{- $_ := required (printf "jwt.keys[%d].publicKey (the PEM) is required" $i) $k.publicKey -}}
{{- $file = printf "key-%s.pem" $kid -}}
{{- end -}}
{{- $keys = append $keys (dict "kid" $kid "alg" $k.alg "file" $file) -}}
{{- end -}}
{{- toJson $keys -}}
{{- end -}}

{{/* What the gateway and media read of the JWT values at start, hashed: a change rolls them. */}}
{{- define "chat.jwtChecksum" -}}
{{- toJson .Values.jwt | sha256sum -}}
{{- end -}}

{{/* "true" when the JWT secret is mounted as files (public keys). */}}
{{- define "chat.jwtMounted" -}}
{{- if or .Values.jwt.keys (and (include "chat.jwtKind" .) (ne (include "chat.jwtKind" .) "hs256")) }}true{{ end -}}
{{- end -}}

{{/*
Environment of the JWT verification key for a service with env prefix `.prefix`: a secret
value (HS256) or a mounted PEM file.
*/}}
{{- define "chat.jwtEnv" -}}
{{- $kind := include "chat.jwtKind" .root -}}
{{- if eq $kind "hs256" }}
- name: {{ .prefix }}_AUTH__HS256_SECRET
  valueFrom:
    secretKeyRef: { name: {{ include "chat.jwtSecret" .root }}, key: hs256-secret }
{{- else if eq $kind "rs256" }}
- name: {{ .prefix }}_AUTH__RS256_PUBLIC_KEY_FILE
  value: /etc/chat/jwt/rs256-public.pem
{{- else if eq $kind "eddsa" }}
- name: {{ .prefix }}_AUTH__EDDSA_PUBLIC_KEY_FILE
  value: /etc/chat/jwt/eddsa-public.pem
{{- else if $kind }}
{{- fail (printf "jwt.kind %q: rs256, eddsa or hs256" $kind) }}
{{- end }}
{{- with include "chat.jwtKeys" .root | fromJsonArray }}
{{- $entries := list }}
{{- range . }}
{{- $entries = append $entries (printf "{kid=%q, alg=%q, public_key_file=%q}" .kid .alg (printf "/etc/chat/jwt/%s" .file)) }}
{{- end }}
{{- /* One value in figment's inline syntax (gateway/README.md, auth.keys). */}}
- name: {{ $.prefix }}_AUTH__KEYS
  value: {{ printf "[%s]" (join ", " $entries) | quote }}
{{- end }}
{{- end -}}

{{/*
TLS to NATS (nats.tls): env entries naming the mounted files, `.prefix` + `.ca`/`.cert`/`.key`
as the variable names; the secret's mount and volume. Empty when nats.tls is off.
*/}}
{{- define "chat.natsTlsEnv" -}}
{{- $t := .root.Values.nats.tls -}}
{{- if $t.enabled -}}
- name: {{ .prefix }}{{ .ca }}
  value: /etc/chat/nats-tls/{{ $t.caKey }}
{{- if $t.clientCertificate }}
- name: {{ .prefix }}{{ .cert }}
  value: /etc/chat/nats-tls/{{ $t.certKey }}
- name: {{ .prefix }}{{ .key }}
  value: /etc/chat/nats-tls/{{ $t.keyKey }}
{{- end }}
{{- end -}}
{{- end -}}
{{- define "chat.natsTlsMount" -}}
{{- if .Values.nats.tls.enabled -}}
- name: nats-tls
  mountPath: /etc/chat/nats-tls
  readOnly: true
{{- end -}}
{{- end -}}
{{- define "chat.natsTlsVolume" -}}
{{- if .Values.nats.tls.enabled -}}
- name: nats-tls
  secret:
    secretName: {{ .Values.nats.tls.secretName }}
{{- end -}}
{{- end -}}

{{/* The drain budget of a component: preStop + steps x grace + 5 s, unless set. */}}
{{- define "chat.terminationGrace" -}}
{{- $c := .component -}}
{{- if $c.terminationGracePeriodSeconds -}}
{{- $c.terminationGracePeriodSeconds -}}
{{- else -}}
{{- add (int $c.preStopSleepSeconds) (div (mul (int .steps) (int $c.shutdownGraceMs)) 1000) 5 -}}
{{- end -}}
{{- end -}}

{{/*
One component: its Deployment (or StatefulSet), HorizontalPodAutoscaler and
PodDisruptionBudget. Arguments (dict):
  root       the chart's root context
  name       component name (labels, object names)
  component  its values block
  bin        binary in the image
  prefix     env var prefix of its settings
  user       its NATS user (nats/auth.conf)
  steps      drain steps, each bounded by shutdownGraceMs
  ports      list of {name, port} served besides the admin port
  env        extra env entries (YAML list, rendered by the caller)
  volumes, volumeMounts, volumeClaimTemplates   YAML strings, optional
  checksums  dict of pod annotations `checksum/<name>`, optional: a changed value rolls the
             pods (a mounted secret's new content is only read at start)
  statefulSet  render a StatefulSet instead of a Deployment
*/}}
{{- define "chat.component" -}}
{{- $root := .root -}}
{{- $c := .component -}}
{{- $fullname := printf "%s-%s" (include "chat.fullname" $root) .name -}}
{{- $grace := include "chat.terminationGrace" (dict "component" $c "steps" .steps) -}}
{{- $minGrace := add (int $c.preStopSleepSeconds) (div (mul (int .steps) (int $c.shutdownGraceMs)) 1000) -}}
{{- if lt (int $grace) (int $minGrace) -}}
{{- fail (printf "%s.terminationGracePeriodSeconds (%s) is shorter than its drain: preStopSleepSeconds + %d steps x shutdownGraceMs = %d s" .name $grace (int .steps) (int $minGrace)) -}}
{{- end -}}
apiVersion: apps/v1
kind: {{ if .statefulSet }}StatefulSet{{ else }}Deployment{{ end }}
metadata:
  name: {{ $fullname }}
  labels:
    {{- include "chat.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .name }}
spec:
  {{- if not $c.autoscaling.enabled }}
  replicas: {{ $c.replicas }}
  {{- end }}
  {{- if .statefulSet }}
  serviceName: {{ $fullname }}
  podManagementPolicy: Parallel
  {{- else }}
  strategy:
    type: RollingUpdate
    rollingUpdate: { maxSurge: 25%, maxUnavailable: 0 }
  {{- end }}
  selector:
    matchLabels:
      {{- include "chat.selectorLabels" (dict "root" $root "name" .name) | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "chat.selectorLabels" (dict "root" $root "name" .name) | nindent 8 }}
      annotations:
        {{- if $root.Values.metrics.podAnnotations }}
        prometheus.io/scrape: "true"
        prometheus.io/port: {{ $root.Values.adminPort | quote }}
        prometheus.io/path: /metrics
        {{- end }}
        {{- range $name, $sum := .checksums }}
        checksum/{{ $name }}: {{ $sum | quote }}
        {{- end }}
        {{- with $c.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      automountServiceAccountToken: false
      terminationGracePeriodSeconds: {{ $grace }}
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml $root.Values.podSecurityContext | nindent 8 }}
      containers:
        - name: {{ .name }}
          image: {{ include "chat.image" $root }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          command: ["/usr/local/bin/{{ .bin }}"]
          securityContext:
            {{- toYaml $root.Values.securityContext | nindent 12 }}
          ports:
            - name: admin
              containerPort: {{ $root.Values.adminPort }}
            {{- range .ports }}
            - name: {{ .name }}
              containerPort: {{ .port }}
            {{- end }}
          env:
            - name: LOG_FORMAT
              value: {{ $root.Values.logFormat | quote }}
            - name: RUST_LOG
              value: {{ $root.Values.logLevel | quote }}
            - name: POD_NAME
              valueFrom:
                fieldRef: { fieldPath: metadata.name }
            - name: {{ .prefix }}_NATS_URL
              value: {{ $root.Values.nats.url | quote }}
            - name: {{ .prefix }}_ADMIN_LISTEN
              value: "0.0.0.0:{{ $root.Values.adminPort }}"
            - name: {{ .prefix }}_SHUTDOWN_GRACE_MS
              value: {{ $c.shutdownGraceMs | quote }}
            {{- if $root.Values.nats.auth.enabled }}
            - name: {{ .prefix }}_NATS_AUTH__USER
              value: {{ .user }}
            - name: {{ .prefix }}_NATS_AUTH__PASSWORD
              valueFrom:
                secretKeyRef: { name: {{ $root.Values.nats.auth.secretName }}, key: {{ .user }} }
            {{- end }}
            {{- include "chat.natsTlsEnv" (dict "root" $root "prefix" (printf "%s_NATS_TLS__" .prefix) "ca" "CA_FILE" "cert" "CERT_FILE" "key" "KEY_FILE") | nindent 12 }}
            {{- with .env }}
            {{- . | nindent 12 }}
            {{- end }}
            {{- with $c.extraEnv }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          {{- with ($c.probes | default dict).liveness | default $root.Values.probes.liveness }}
          livenessProbe:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          {{- with ($c.probes | default dict).readiness | default $root.Values.probes.readiness }}
          readinessProbe:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          {{- with ($c.probes | default dict).startup | default $root.Values.probes.startup }}
          startupProbe:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          {{- if gt (int $c.preStopSleepSeconds) 0 }}
          lifecycle:
            preStop:
              sleep:
                seconds: {{ $c.preStopSleepSeconds }}
          {{- end }}
          resources:
            {{- toYaml $c.resources | nindent 12 }}
          {{- if or .volumeMounts $root.Values.nats.tls.enabled }}
          volumeMounts:
            {{- with .volumeMounts }}
            {{- . | nindent 12 }}
            {{- end }}
            {{- include "chat.natsTlsMount" $root | nindent 12 }}
          {{- end }}
      {{- if or .volumes $root.Values.nats.tls.enabled }}
      volumes:
        {{- with .volumes }}
        {{- . | nindent 8 }}
        {{- end }}
        {{- include "chat.natsTlsVolume" $root | nindent 8 }}
      {{- end }}
      {{- with $c.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $c.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $c.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- if $c.topologySpreadConstraints }}
      topologySpreadConstraints:
        {{- toYaml $c.topologySpreadConstraints | nindent 8 }}
      {{- else }}
      # Replicas on different nodes where possible: one node going down takes one replica.
      topologySpreadConstraints:
        - maxSkew: 1
          topologyKey: kubernetes.io/hostname
          whenUnsatisfiable: ScheduleAnyway
          labelSelector:
            matchLabels:
              {{- include "chat.selectorLabels" (dict "root" $root "name" .name) | nindent 14 }}
      {{- end }}
  {{- with .volumeClaimTemplates }}
  volumeClaimTemplates:
    {{- . | nindent 4 }}
  {{- end }}
{{- if $c.autoscaling.enabled }}
---
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ $fullname }}
  labels:
    {{- include "chat.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .name }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: {{ if .statefulSet }}StatefulSet{{ else }}Deployment{{ end }}
    name: {{ $fullname }}
  minReplicas: {{ $c.autoscaling.minReplicas }}
  maxReplicas: {{ $c.autoscaling.maxReplicas }}
  metrics:
    - type: Resource
      resource:
        name: cpu
        target:
          type: Utilization
          averageUtilization: {{ $c.autoscaling.targetCPUUtilizationPercentage }}
    {{- with $c.autoscaling.metrics }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $c.autoscaling.behavior }}
  behavior:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
{{- if $c.pdb.enabled }}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ $fullname }}
  labels:
    {{- include "chat.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .name }}
spec:
  {{- if $c.pdb.minAvailable }}
  minAvailable: {{ $c.pdb.minAvailable }}
  {{- else }}
  maxUnavailable: {{ $c.pdb.maxUnavailable | default 1 }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "chat.selectorLabels" (dict "root" $root "name" .name) | nindent 6 }}
{{- end }}
{{- end -}}
