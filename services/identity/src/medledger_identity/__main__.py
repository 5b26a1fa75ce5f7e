"""Run with ``python -m medledger_identity``."""

from medledger_identity.main import main

main()
