#!/usr/bin/env bash
# Configures the development Vault (dev mode, root token "root") the Tiltfile installs: the transit
# engine, Kubernetes auth, medledger's policies (deploy/vault/*.hcl) and a role per service, as
# deploy/vault/README.md describes for a real Vault. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/../.."
NS=${NAMESPACE:-medledger}
RELEASE=${RELEASE:-medledger}
vault() { kubectl -n "$NS" exec -i vault-0 -- env VAULT_TOKEN=root vault "$@"; }

vault secrets list -format=json | grep -q '"transit/"' || vault secrets enable transit
vault auth list -format=json | grep -q '"kubernetes/"' || vault auth enable kubernetes
vault write auth/kubernetes/config kubernetes_host="https://kubernetes.default.svc" >/dev/null

for file in deploy/vault/*.hcl; do
  policy=$(basename "$file" .hcl)
  vault policy write "medledger-$policy" - < "$file" >/dev/null
done
# Each key-keeping service: a Kubernetes role whose agent may only create the service's two child
# tokens, the everyday one and the erasure one, each from a token role of exactly one policy.
for service in identity consent audit records; do
  vault write "auth/kubernetes/role/medledger-$service" bound_service_account_names="$RELEASE-$service" \
    bound_service_account_namespaces="$NS" policies="medledger-$service-agent" ttl=1h >/dev/null
  for role in "$service" "$service-erasure"; do
    vault write "auth/token/roles/medledger-$role" allowed_policies="medledger-$role" \
      disallowed_policies=default orphan=false renewable=true token_explicit_max_ttl=24h >/dev/null
  done
done
echo "vault: transit, kubernetes auth, policies and roles for $RELEASE in $NS"
