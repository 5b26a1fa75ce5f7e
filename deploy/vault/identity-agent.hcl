# medledger-identity-agent: the policy of identity's Kubernetes auth role. The Vault agent in the
# identity pod logs in with it and can do one thing: create the two child tokens the service
# uses, from two token roles (medledger-identity and medledger-identity-erasure), each limited to
# its own policy. So the everyday token cannot mint the erasure token, and neither can touch the
# other's paths.
path "auth/token/create/medledger-identity"         { capabilities = ["update"] }
path "auth/token/create/medledger-identity-erasure" { capabilities = ["update"] }
