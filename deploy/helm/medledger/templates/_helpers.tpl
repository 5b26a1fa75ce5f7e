{{/*
Names and labels. Every object carries the app.kubernetes.io/* labels; a component's objects add
app.kubernetes.io/component: <service>.
*/}}
{{- define "medledger.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "medledger.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "medledger.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "medledger.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: medledger
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "medledger.selectorLabels" -}}
app.kubernetes.io/name: {{ include "medledger.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* A component's helpers take (dict "root" $ "name" <service> "c" <its values>). */}}
{{- define "medledger.component.fullname" -}}
{{- printf "%s-%s" (include "medledger.fullname" .root) .name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "medledger.component.labels" -}}
{{ include "medledger.labels" .root }}
app.kubernetes.io/component: {{ .name }}
{{- end -}}

{{- define "medledger.component.selectorLabels" -}}
{{ include "medledger.selectorLabels" .root }}
app.kubernetes.io/component: {{ .name }}
{{- end -}}

{{/* Selector labels of another component, by name: (dict "root" $ "name" <service>). */}}
{{- define "medledger.peer" -}}
podSelector:
  matchLabels:
    {{- include "medledger.component.selectorLabels" . | nindent 4 }}
{{- end -}}

{{- define "medledger.image" -}}
{{- $registry := default .root.Values.image.registry .root.Values.global.imageRegistry -}}
{{- $tag := default .root.Chart.AppVersion .root.Values.image.tag -}}
{{- $repository := printf "%s/%s" .root.Values.image.repositoryPrefix .name | trimPrefix "/" -}}
{{- if $registry -}}
{{- printf "%s/%s:%s" $registry $repository $tag -}}
{{- else -}}
{{- printf "%s:%s" $repository $tag -}}
{{- end -}}
{{- end -}}

{{- define "medledger.imagePullSecrets" -}}
{{- with .Values.global.imagePullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Where a service answers gRPC, for the others: (dict "root" $ "name" <service>). */}}
{{- define "medledger.address" -}}
{{- $c := index .root.Values.components .name -}}
{{- printf "%s-%s:%v" (include "medledger.fullname" .root) .name $c.ports.grpc -}}
{{- end -}}

{{- define "medledger.kafka.clusterName" -}}
{{- default (printf "%s-kafka" (include "medledger.fullname" .)) .Values.kafka.strimzi.clusterName -}}
{{- end -}}

{{- define "medledger.kafka.bootstrapServers" -}}
{{- if .Values.kafka.strimzi.enabled -}}
{{- printf "%s-kafka-bootstrap:9092" (include "medledger.kafka.clusterName" .) -}}
{{- else -}}
{{- /* medledger.checks refuses an empty one, naming the value. */ -}}
{{- .Values.kafka.bootstrapServers -}}
{{- end -}}
{{- end -}}

{{/* The services that keep keys in the key manager; anchoring's only key is the anchorer's. */}}
{{- define "medledger.keepsKeys" -}}
{{- if has .name (list "identity" "consent" "records" "audit") }}true{{ end -}}
{{- end -}}

{{/* Stateless components in front of the services: no database, no Kafka, no keys. */}}
{{- define "medledger.gateway" -}}
{{- if has .name (list "fhir") }}true{{ end -}}
{{- end -}}

{{- define "medledger.hasDatabase" -}}
{{- if or (dig "database" "existingSecret" "" .c) (dig "database" "url" "" .c) }}true{{ end -}}
{{- end -}}

{{- define "medledger.databaseSecretName" -}}
{{- default (printf "%s-database" (include "medledger.component.fullname" .)) .c.database.existingSecret -}}
{{- end -}}

{{- define "medledger.credentialsSecretName" -}}
{{- default (printf "%s-credentials" (include "medledger.fullname" .)) .Values.credentials.existingSecret -}}
{{- end -}}

{{- define "medledger.keyringSecretName" -}}
{{- default (printf "%s-keyring" (include "medledger.fullname" .)) .Values.keyManager.local.existingSecret -}}
{{- end -}}

{{- define "medledger.tlsSecretName" -}}
{{- if .root.Values.tls.certManager.enabled -}}
{{- printf "%s-tls" (include "medledger.component.fullname" .) -}}
{{- else -}}
{{- required (printf "tls.existingSecrets.%s is required with tls.enabled and without cert-manager" .name) (index .root.Values.tls.existingSecrets .name) -}}
{{- end -}}
{{- end -}}

{{- define "medledger.vault" -}}
{{- if and (eq .root.Values.keyManager.type "vault") (include "medledger.keepsKeys" .) }}true{{ end -}}
{{- end -}}

{{/*
The agent injector's annotation prefix and the folder its agent writes secrets to: HashiCorp
Vault's injector (vault-k8s) or OpenBao's (openbao-k8s), keyManager.vault.injector.
*/}}
{{- define "medledger.vaultPrefix" -}}
{{- if eq .Values.keyManager.vault.injector "openbao" }}openbao.openbao.org{{ else }}vault.hashicorp.com{{ end -}}
{{- end -}}
{{- define "medledger.vaultSecretsDir" -}}
{{- if eq .Values.keyManager.vault.injector "openbao" }}/openbao/secrets{{ else }}/vault/secrets{{ end -}}
{{- end -}}

{{/*
Agent injector annotations: the agent logs in with the pod's ServiceAccount under the service's
role and keeps a token file that the key manager re-reads when it changes
(MEDLEDGER_VAULT_TOKEN_FILE), and a second one for the service's erasure path alone
(MEDLEDGER_ERASURE_VAULT_TOKEN_FILE). The same annotations for Vault and OpenBao, under each
injector's prefix.
*/}}
{{- define "medledger.vaultAnnotations" -}}
{{- $v := .root.Values.keyManager.vault -}}
{{- $p := include "medledger.vaultPrefix" .root -}}
{{ $p }}/agent-inject: "true"
{{ $p }}/role: {{ printf "%s%s" $v.rolePrefix .name | quote }}
{{ $p }}/auth-path: {{ $v.authPath | quote }}
{{ $p }}/agent-pre-populate: "true"
{{ $p }}/agent-run-as-user: "10001"
{{ $p }}/agent-run-as-group: "10001"
{{- /* two child tokens from token roles, so that the everyday token (no key deletion) cannot
mint the erasure token; the agent's own token (policy <service>-agent) can only create these two. */}}
{{ $p }}/agent-inject-secret-token: {{ printf "auth/token/create/%s%s" $v.rolePrefix .name | quote }}
{{ $p }}/agent-inject-template-token: |
  {{ printf "{{- with secret \"auth/token/create/%s%s\" \"ttl=1h\" -}}{{ .Auth.ClientToken }}{{- end -}}" $v.rolePrefix .name }}
{{ $p }}/agent-inject-perms-token: "0400"
{{ $p }}/agent-inject-secret-erasure-token: {{ printf "auth/token/create/%s%s-erasure" $v.rolePrefix .name | quote }}
{{ $p }}/agent-inject-template-erasure-token: |
  {{ printf "{{- with secret \"auth/token/create/%s%s-erasure\" \"ttl=1h\" -}}{{ .Auth.ClientToken }}{{- end -}}" $v.rolePrefix .name }}
{{ $p }}/agent-inject-perms-erasure-token: "0400"
{{- with $v.caSecret }}
{{ $p }}/tls-secret: {{ . | quote }}
{{ $p }}/ca-cert: {{ printf "/%s/tls/ca.crt" (ternary "openbao" "vault" (eq $v.injector "openbao")) }}
{{- end }}
{{- with $v.extraAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The component's values over the `default` block, for a key: (dict ... "key" "nodeSelector"). */}}
{{- define "medledger.pick" -}}
{{- $own := index .c .key -}}
{{- if $own -}}{{ toYaml $own }}{{- else -}}{{ toYaml (index .root.Values.default .key) }}{{- end -}}
{{- end -}}


{{/*
What a working installation needs, checked before anything is installed (templates/checks.yaml
includes this): every problem is listed at once, each naming the value(s) to set. The values
schema cannot do this: these rules join values across the tree (keyManager with each component's
replicas, kafka.strimzi with kafka.bootstrapServers), and a schema's error can say which value
broke which keyword but not why, nor name the other value that would fix it.
*/}}
{{- define "medledger.checks" -}}
{{- $problems := list -}}
{{- if not (or .Values.kafka.strimzi.enabled .Values.kafka.bootstrapServers) -}}
{{- $problems = append $problems "kafka.bootstrapServers is empty: set it to your Kafka cluster's host:port[,host:port...], or kafka.strimzi.enabled: true for a cluster run by the Strimzi operator" -}}
{{- end -}}
{{- if and .Values.components.anchoring.enabled (not .Values.chain.anchorRegistryAddress) -}}
{{- $problems = append $problems "chain.anchorRegistryAddress is empty: anchoring refuses to start without it; set it to your AnchorRegistry contract's address (deploy/README.md, \"The chain\")" -}}
{{- end -}}
{{- range $name, $c := .Values.components -}}
{{- /* A gateway keeps nothing per pod: any number of replicas, no database. */ -}}
{{- if and $c.enabled (not (include "medledger.gateway" (dict "name" $name))) -}}
{{- $at := printf "components.%s" $name -}}
{{- $autoscaled := dig "autoscaling" "enabled" false $c -}}
{{- $scaled := or $autoscaled (gt (int $c.replicas) 1) -}}
{{- $how := ternary (printf "%s.autoscaling.enabled is true" $at) (printf "%s.replicas is %v" $at $c.replicas) $autoscaled -}}
{{- $single := ternary (printf "%s.replicas: 1 and %s.autoscaling.enabled: false" $at $at) (printf "%s.replicas: 1" $at) (hasKey $c "autoscaling") -}}
{{- /* A sqlite+aiosqlite:// URL is a file on the pod's own volume as much as the embedded one. */ -}}
{{- $shared := or $c.database.existingSecret (and $c.database.url (not (hasPrefix "sqlite" $c.database.url))) -}}
{{- if and $scaled (not $shared) -}}
{{- $problems = append $problems (printf "%s but %s has no database (%s.database.existingSecret or .url, a postgresql+asyncpg:// URL): each pod would keep its own SQLite file; set a database, or %s" $how $name $at $single) -}}
{{- else if not (or $c.database.existingSecret $c.database.url $c.database.embedded) -}}
{{- $problems = append $problems (printf "%s has no database: set %s.database.existingSecret (a Secret with its postgresql+asyncpg:// URL under .secretKey) or .url, or %s.database.embedded: true for a SQLite file on the pod's volume (one replica, lost with the pod)" $name $at $at) -}}
{{- end -}}
{{- if and $scaled (eq $.Values.keyManager.type "local") (include "medledger.keepsKeys" (dict "name" $name)) -}}
{{- $problems = append $problems (printf "%s but keyManager.type is local: each pod would keep its own keyring on its own volume (its own signing and patients' keys); set keyManager.type: vault, or %s" $how $single) -}}
{{- end -}}
{{- if and $scaled (eq $name "records") (eq (dig "MEDLEDGER_BLOB_STORE" "database" (default dict $c.settings)) "filesystem") -}}
{{- $problems = append $problems (printf "%s but %s.settings.MEDLEDGER_BLOB_STORE is filesystem: each pod would keep its own blobs on its own volume; set it to database, or %s" $how $at $single) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if $problems -}}
{{- fail (printf "\nmedledger cannot work with these values:\n- %s" (join "\n- " $problems)) -}}
{{- end -}}
{{- end -}}
