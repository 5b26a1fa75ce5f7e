# medledger-records-erasure: the erasure token (MEDLEDGER_ERASURE_VAULT_TOKEN_FILE), used only by
# approved erasures (erasure.KeyShredder): read, allow deletion, delete; nothing that touches data.
path "transit/keys/patient-*" {
  capabilities       = ["read", "update", "delete"]
  allowed_parameters = { "deletion_allowed" = [true] }  # a bool: OpenBao refuses the string "true" for the JSON true hvac sends
}
