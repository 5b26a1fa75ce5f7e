# medledger-consent: break-glass justifications are encrypted under the patient's key, so that
# erasing the patient erases them.
path "transit/keys/patient-*" {
  capabilities      = ["create", "read", "update"]
  denied_parameters = { "deletion_allowed" = [] }
}
path "transit/encrypt/patient-*"      { capabilities = ["update"] }
path "transit/decrypt/patient-*"      { capabilities = ["update"] }
path "sys/seal-status"                { capabilities = ["read"] }
