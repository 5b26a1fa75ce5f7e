# medledger-records-erasure: records' erasure token (MEDLEDGER_ERASURE_VAULT_TOKEN_FILE), held only by records'
# erasure path (medledger_runtime.keys.KeyShredder). It may mark its own per-patient keys
# deletable and delete them: nothing that reads or writes data, no rotation, config or trim
# ("deletion_allowed = true" is required on every write), no export, backup or restore.
path "transit/keys/records-patient-*" {
  capabilities        = ["update", "delete"]
  required_parameters = ["deletion_allowed"]
  allowed_parameters  = { "deletion_allowed" = [true] }
}
# The patient's search key (the blind index of their search terms) goes with the records.
path "transit/keys/records-search-*" {
  capabilities        = ["update", "delete"]
  required_parameters = ["deletion_allowed"]
  allowed_parameters  = { "deletion_allowed" = [true] }
}
# The name identity, consent and records once shared (patient-<id>): ciphertexts from before
# the key-owner migration, in backups or not moved yet, were made under it, so each erasure
# destroys it too (the first one to come does; with local keyrings each service has its own).
path "transit/keys/patient-*" {
  capabilities        = ["update", "delete"]
  required_parameters = ["deletion_allowed"]
  allowed_parameters  = { "deletion_allowed" = [true] }
}
