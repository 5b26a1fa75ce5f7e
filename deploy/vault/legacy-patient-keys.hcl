# medledger-legacy-patient-keys: the key-owner migration's token (MEDLEDGER_LEGACY_VAULT_TOKEN_FILE).
# Before each service owned its keys, identity, consent and records shared patient-<id>. The
# migration decrypts under that name and re-encrypts under the service's own key (transit cannot
# rewrap ciphertexts made with associated data, nor into another key). Decrypt only: no
# encryption, data keys, rotation, config or deletion. Issue it to identity, consent and records
# for the migration, and revoke it once each reports the migration done (it can read every
# service's old ciphertexts, as every token could before).
path "transit/decrypt/patient-*" { capabilities = ["update"] }
