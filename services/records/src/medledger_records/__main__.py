"""Run with ``python -m medledger_records``."""

from medledger_records.main import main

main()
