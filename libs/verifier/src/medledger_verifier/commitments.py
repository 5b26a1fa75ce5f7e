"""The salted commitments of record and consent versions, pure: what the records service computes when it
stores a version and what anyone holding the record and its salt recomputes (`medledger verify`).

- a FHIR record version whose `get` returns the bytes B:
  ``SHA-256("medledger:record:v1\\n" || salt || JCS(parse(B)))``, JCS being RFC 8785;
- a document of media type M with bytes B:
  ``SHA-256("medledger:document:v1\\n" || salt || SHA-256(M) || B)``;
- a consent version, its FHIR Consent C: ``SHA-256("medledger:consent:v1\\n" || salt || JCS(C))``
  (what consent computes when it records a version, ConsentRegistry holds, and the patient,
  holding the document and its salt, recomputes: `medledger verify consent`);

with a random 32-byte salt per version. JSON that RFC 8785 cannot represent exactly (duplicate
keys, numbers that are not exactly an IEEE 754 double, integers beyond ±(2^53 - 1), NaN or
infinities) is refused: its commitment could not be recomputed from what `get` returns.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

import rfc8785

from medledger_verifier.errors import InvalidArgument

RECORD_DOMAIN = b"medledger:record:v1\n"
DOCUMENT_DOMAIN = b"medledger:document:v1\n"
CONSENT_DOMAIN = b"medledger:consent:v1\n"
SALT_BYTES = 32
# Beyond this an integer is not exactly an IEEE 754 double; RFC 8785 (I-JSON) refuses it.
_MAX_SAFE_INTEGER = 2**53 - 1


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _exact_float(text: str) -> float:
    """A JSON number with a fraction or exponent, refused unless a double holds it exactly as
    written (its shortest round-trip form denotes the same decimal value)."""
    value = float(text)
    try:
        exact = Decimal(text) == Decimal(repr(value))
    except InvalidOperation:
        exact = False
    if not exact:
        raise ValueError(f"the number {text[:40]} is not exactly an IEEE 754 double")
    return value


def _safe_int(text: str) -> int:
    value = int(text)
    if abs(value) > _MAX_SAFE_INTEGER:
        raise ValueError(f"the integer {text[:40]} is beyond ±(2^53 - 1)")
    return value


def _no_constant(text: str) -> Any:
    raise ValueError(f"{text} is not JSON")


def parse_json(content: bytes) -> Any:
    """Parse JSON that RFC 8785 represents exactly; InvalidArgument (field `content`) otherwise."""
    try:
        return json.loads(
            content,
            object_pairs_hook=_no_duplicates,
            parse_float=_exact_float,
            parse_int=_safe_int,
            parse_constant=_no_constant,
        )
    except _DuplicateKey as exc:
        raise InvalidArgument.field("content", f"duplicate JSON key {str(exc)[:60]!r}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument.field("content", f"not JSON that RFC 8785 represents exactly: {exc}") from None


def canonical_json(value: Any) -> bytes:
    """RFC 8785 (JCS) bytes of a parsed JSON value."""
    try:
        data: bytes = rfc8785.dumps(value)
    except rfc8785.CanonicalizationError as exc:
        raise InvalidArgument.field("content", f"not representable in RFC 8785: {exc}") from None
    return data


def _check_salt(salt: bytes) -> None:
    if len(salt) != SALT_BYTES:
        raise ValueError("the salt is 32 bytes")


def record_commitment(returned: bytes, salt: bytes) -> str:
    """The commitment of a FHIR record version whose `get` returns `returned` (hex)."""
    _check_salt(salt)
    return hashlib.sha256(RECORD_DOMAIN + salt + canonical_json(parse_json(returned))).hexdigest()


def document_commitment(media_type: str, data: bytes, salt: bytes) -> str:
    """The commitment of a document version of `media_type` (hex)."""
    _check_salt(salt)
    return hashlib.sha256(DOCUMENT_DOMAIN + salt + hashlib.sha256(media_type.encode()).digest() + data).hexdigest()


def consent_commitment(document: Mapping[str, Any], salt: bytes) -> str:
    """The commitment of a consent version whose FHIR Consent is ``document`` (hex)."""
    _check_salt(salt)
    return hashlib.sha256(CONSENT_DOMAIN + salt + canonical_json(dict(document))).hexdigest()
