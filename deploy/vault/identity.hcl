# medledger-identity: the policy of identity's Vault role (transit mount "transit").
# Its own keys: token signing (ed25519; rotated by RotateSigningKey), the blind index (hmac,
# version 1 pinned), practitioners' resources and retried registrations' secrets (aes256-gcm96).
path "transit/keys/identity-*"        { capabilities = ["create", "read", "update"] }   # ensure, info, rotate
path "transit/sign/identity-*"        { capabilities = ["update"] }
path "transit/verify/identity-*"      { capabilities = ["update"] }
path "transit/hmac/identity-*"        { capabilities = ["update"] }
path "transit/encrypt/identity-*"     { capabilities = ["update"] }                     # no "create": no upsert
path "transit/decrypt/identity-*"     { capabilities = ["update"] }

# Each principal's key pair (its did:key): created at registration, public key read back.
path "transit/keys/principal-*"       { capabilities = ["create", "read", "update"] }  # OpenBao: creating a transit key needs update

# Patients' FHIR resources, under the patient's own key (shared with records and consent). After
# an erasure identity marks the key deletable and deletes it if records has not (it has: identity
# acts on records' PatientRecordsErased), so it needs to send deletion_allowed but never deletes.
path "transit/keys/patient-*"         { capabilities = ["create", "read", "update"] }
path "transit/encrypt/patient-*"      { capabilities = ["update"] }
path "transit/decrypt/patient-*"      { capabilities = ["update"] }

path "sys/seal-status"                { capabilities = ["read"] }
