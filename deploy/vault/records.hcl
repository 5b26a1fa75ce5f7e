# medledger-records: records' everyday token (MEDLEDGER_VAULT_TOKEN_FILE), as
# services/records/README.md "Who may delete keys" lays it out. Only records-patient-<id>, the
# keys records wraps each record's data key under. The glob also covers .../rotate, .../config
# and .../trim: the parameter list admits key creation and min_decryption_version (rotation) and
# nothing else, so no trim (min_available_version), deletion_allowed, exportable or
# allow_plaintext_backup; no "delete", export, backup or restore. Keys are destroyed only through
# records-erasure.hcl. See libs/runtime/KEYS.md.
path "transit/keys/records-patient-*" {
  capabilities       = ["read", "update"]   # ensure, info, rotate, min_decryption_version
  allowed_parameters = { "type" = ["aes256-gcm96"], "min_decryption_version" = [] }
}
path "transit/encrypt/records-patient-*"           { capabilities = ["update"] }   # no upsert
path "transit/decrypt/records-patient-*"           { capabilities = ["update"] }
path "transit/rewrap/records-patient-*"            { capabilities = ["update"] }
path "transit/datakey/plaintext/records-patient-*" { capabilities = ["update"] }

# The patient's search key (hmac): the blind index of their FHIR resources' search terms. Every
# HMAC pins version 1; no min_decryption_version, so no floor can hide version 1.
path "transit/keys/records-search-*" {
  capabilities       = ["read", "update"]   # ensure, info (for the erasure certificate)
  allowed_parameters = { "type" = ["hmac"], "key_size" = [] }
}
path "transit/hmac/records-search-*" { capabilities = ["update"] }

# The erasure certificates' signing key (a C2SP signed note): created once, its public key read,
# notes signed and verified. The parameter list keeps it from being trimmed, exported or deleted.
path "transit/keys/records-erasure-certificate" {
  capabilities       = ["read", "update"]
  allowed_parameters = { "type" = ["ed25519"] }
}
path "transit/sign/records-erasure-certificate"   { capabilities = ["update"] }
path "transit/verify/records-erasure-certificate" { capabilities = ["update"] }

path "sys/seal-status" { capabilities = ["read"] }
