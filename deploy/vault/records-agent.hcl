# medledger-records-agent: the policy of records' Kubernetes auth role. The Vault agent in the
# records pod logs in with it and can do one thing: create the two child tokens the service
# uses, from two token roles (medledger-records and medledger-records-erasure), each limited to
# its own policy. So the everyday token cannot mint the erasure token, and neither can touch the
# other's paths.
path "auth/token/create/medledger-records"         { capabilities = ["update"] }
path "auth/token/create/medledger-records-erasure" { capabilities = ["update"] }
