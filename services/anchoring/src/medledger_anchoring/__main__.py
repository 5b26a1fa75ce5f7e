"""Run with ``python -m medledger_anchoring``."""

from medledger_anchoring.main import main

main()
