# medledger-audit: audit's everyday token (MEDLEDGER_VAULT_TOKEN_FILE). The log's checkpoint keys
# (ed25519 and ecdsa-p256), and a subject key per patient (hmac), which audit-erasure.hcl
# destroys once the patient's erasure is in the log.
path "transit/keys/audit-checkpoint-*" {
  capabilities       = ["read", "update"]   # ensure, public keys
  allowed_parameters = { "type" = ["ed25519", "ecdsa-p256"] }
}
path "transit/sign/audit-checkpoint-*"   { capabilities = ["update"] }
path "transit/verify/audit-checkpoint-*" { capabilities = ["update"] }

# Subject keys are never rotated: an entry's subject is the HMAC under the latest version, and
# lookups by subject recompute it. "type" is required, so the one write allowed is creating the
# key: rotate, config and trim (which send no type) are refused, and so is reading the key, which
# audit never needs (the key's answer to its creation says all).
path "transit/keys/audit-subject-*" {
  capabilities        = ["update"]
  required_parameters = ["type"]
  allowed_parameters  = { "type" = ["hmac"], "key_size" = [] }
}
path "transit/hmac/audit-subject-*" { capabilities = ["update"] }
path "sys/seal-status"              { capabilities = ["read"] }
