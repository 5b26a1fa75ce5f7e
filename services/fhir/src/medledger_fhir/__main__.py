"""Run with ``python -m medledger_fhir``."""

from medledger_fhir.main import main

main()
