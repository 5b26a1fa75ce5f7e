"""Run with ``python -m medledger_audit``."""

from medledger_audit.main import main

main()
