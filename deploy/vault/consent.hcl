# medledger-consent: consent's everyday token (MEDLEDGER_VAULT_TOKEN_FILE). Break-glass
# justifications are encrypted under consent's own key of the patient, consent-patient-<id>, so
# that destroying it (consent-erasure.hcl) erases them. No other service's key; nothing that
# destroys (no trim, deletion_allowed, delete, export, backup or restore) and no rotation or
# config: the parameter list admits key creation alone, and rotate takes none, so it is the one
# write left (harmless: older versions keep decrypting). See libs/runtime/KEYS.md.
path "transit/keys/consent-patient-*" {
  capabilities       = ["read", "update"]
  allowed_parameters = { "type" = ["aes256-gcm96"] }
}
path "transit/encrypt/consent-patient-*" { capabilities = ["update"] }   # no "create": no upsert
path "transit/decrypt/consent-patient-*" { capabilities = ["update"] }
path "sys/seal-status"                   { capabilities = ["read"] }
