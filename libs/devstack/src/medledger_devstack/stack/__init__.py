"""The local stack that ``medledger up`` runs: where its parts answer (``layout``), how each
service is configured (``service_env``), the chain side (``chain_side``), process chores
(``processes``) and the supervisor that starts, watches and stops it all (``supervisor``)."""
