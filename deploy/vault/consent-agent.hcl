# medledger-consent-agent: the policy of consent's Kubernetes auth role. The Vault agent in the
# consent pod logs in with it and can do one thing: create the two child tokens the service
# uses, from two token roles (medledger-consent and medledger-consent-erasure), each limited to
# its own policy. So the everyday token cannot mint the erasure token, and neither can touch the
# other's paths.
path "auth/token/create/medledger-consent"         { capabilities = ["update"] }
path "auth/token/create/medledger-consent-erasure" { capabilities = ["update"] }
