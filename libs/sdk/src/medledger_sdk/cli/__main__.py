"""Run with ``python -m medledger_sdk.cli``."""

import sys

from medledger_sdk.cli import main

sys.exit(main())
