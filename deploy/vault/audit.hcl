# medledger-audit: the log's checkpoint keys (ed25519 and ecdsa-p256), and a subject key per
# patient (hmac), which the log deletes once the patient's erasure is in the log.
path "transit/keys/audit-checkpoint-*"  { capabilities = ["create", "read", "update"] }  # OpenBao: creating a transit key needs update
path "transit/sign/audit-checkpoint-*"  { capabilities = ["update"] }
path "transit/verify/audit-checkpoint-*" { capabilities = ["update"] }
path "transit/keys/audit-subject-*"    { capabilities = ["create", "read", "update", "delete"] }
path "transit/hmac/audit-subject-*"     { capabilities = ["update"] }
path "sys/seal-status"                  { capabilities = ["read"] }
