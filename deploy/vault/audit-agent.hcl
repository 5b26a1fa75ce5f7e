# medledger-audit-agent: the policy of audit's Kubernetes auth role. The Vault agent in the
# audit pod logs in with it and can do one thing: create the two child tokens the service
# uses, from two token roles (medledger-audit and medledger-audit-erasure), each limited to
# its own policy. So the everyday token cannot mint the erasure token, and neither can touch the
# other's paths.
path "auth/token/create/medledger-audit"         { capabilities = ["update"] }
path "auth/token/create/medledger-audit-erasure" { capabilities = ["update"] }
