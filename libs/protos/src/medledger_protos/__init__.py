"""Generated protobuf and gRPC code lives beside this package, under ``medledger/``.

``make setup`` (``tools/gen_protos.py``) generates it from ``protos/``; it is never committed.
"""

from pathlib import Path

GENERATED_ROOT = Path(__file__).resolve().parent.parent
