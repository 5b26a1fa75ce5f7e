# medledger-audit-erasure: audit's erasure token (MEDLEDGER_ERASURE_VAULT_TOKEN_FILE), held only by audit's
# erasure path (medledger_runtime.keys.KeyShredder). It may mark its own per-patient keys
# deletable and delete them: nothing that reads or writes data, no rotation, config or trim
# ("deletion_allowed = true" is required on every write), no export, backup or restore.
path "transit/keys/audit-subject-*" {
  capabilities        = ["update", "delete"]
  required_parameters = ["deletion_allowed"]
  allowed_parameters  = { "deletion_allowed" = [true] }
}
