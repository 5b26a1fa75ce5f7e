"""The story's words: the kinds, categories, purposes and actions it names, and its request ids."""

from __future__ import annotations

import uuid

from google.protobuf.timestamp_pb2 import Timestamp
from medledger.types.v1 import vocabulary_pb2 as vocab

Kind = vocab.PrincipalKind
OBSERVATIONS = vocab.DataCategory.DATA_CATEGORY_OBSERVATIONS
TREAT = vocab.PurposeOfUse.PURPOSE_OF_USE_TREAT
ETREAT = vocab.PurposeOfUse.PURPOSE_OF_USE_ETREAT
HRESCH = vocab.PurposeOfUse.PURPOSE_OF_USE_HRESCH
READ, WRITE = vocab.Action.ACTION_READ, vocab.Action.ACTION_WRITE
CONSENT_DAYS = 30


def rid() -> str:
    return str(uuid.uuid4())


def timestamp(seconds: float) -> Timestamp:
    t = Timestamp()
    t.FromNanoseconds(int(seconds * 1e9))
    return t
