# medledger-records: the everyday token (MEDLEDGER_VAULT_TOKEN_FILE), as services/records/README.md
# "Who may delete keys" lays it out. The glob also covers patient-*/config and patient-*/rotate;
# no "delete", and deletion_allowed is refused wherever it is sent.
path "transit/keys/patient-*" {
  capabilities      = ["create", "read", "update"]   # ensure, info, rotate, min_decryption_version
  denied_parameters = { "deletion_allowed" = [] }
}
path "transit/encrypt/patient-*"           { capabilities = ["update"] }
path "transit/decrypt/patient-*"           { capabilities = ["update"] }
path "transit/rewrap/patient-*"            { capabilities = ["update"] }
path "transit/datakey/plaintext/patient-*" { capabilities = ["update"] }
path "sys/seal-status"                     { capabilities = ["read"] }
