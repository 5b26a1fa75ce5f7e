"""Run with ``python -m medledger_consent``."""

from medledger_consent.main import main

main()
