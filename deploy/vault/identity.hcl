# medledger-identity: identity's everyday token (MEDLEDGER_VAULT_TOKEN_FILE). Only identity's own
# keys: identity-* (token signing, blind index, practitioners' resources, retried registrations'
# secrets, and each patient's FHIR resource under identity-patient-<id>) and principal-* (each
# principal's did:key). No other service's key, and nothing that destroys: the parameter list
# keeps trim (min_available_version), deletion_allowed, exportable and allow_plaintext_backup out
# of every write under transit/keys/ (the glob also covers .../rotate, .../config and .../trim),
# and there is no "delete", no export, backup or restore. Keys are destroyed only through
# identity-erasure.hcl. See libs/runtime/KEYS.md, "Who may do what".
path "transit/keys/identity-*" {
  capabilities       = ["read", "update"]   # ensure (POST is "update" on transit keys), info, rotate
  allowed_parameters = { "type" = ["ed25519", "hmac", "aes256-gcm96"], "key_size" = [] }
}
path "transit/sign/identity-token-signing"   { capabilities = ["update"] }
path "transit/verify/identity-token-signing" { capabilities = ["update"] }
path "transit/hmac/identity-blind-index"     { capabilities = ["update"] }   # version 1 pinned
path "transit/encrypt/identity-*"            { capabilities = ["update"] }   # no "create": no upsert
path "transit/decrypt/identity-*"            { capabilities = ["update"] }

# Each principal's key pair: created at registration, its public key read back.
path "transit/keys/principal-*" {
  capabilities       = ["read", "update"]
  allowed_parameters = { "type" = ["ed25519"] }
}

path "sys/seal-status" { capabilities = ["read"] }
