"""Records' domain, free of I/O: FHIR validation, canonical JSON, commitments and the envelope
encryption of one record version.

The formulas (also in the README, so anyone can recompute them):

- a FHIR record version whose `get` returns the bytes B:
  ``SHA-256("medledger:record:v1\\n" || salt || JCS(parse(B)))``, JCS being RFC 8785;
- a document of media type M with bytes B:
  ``SHA-256("medledger:document:v1\\n" || salt || SHA-256(M) || B)``;

with a random 32-byte salt per version. JSON that RFC 8785 cannot represent exactly (duplicate
keys, numbers that are not exactly an IEEE 754 double, integers beyond ±(2^53 - 1), NaN or
infinities) is refused: its commitment could not be recomputed from what `get` returns.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

import rfc8785
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from medledger_common.errors import DataLoss, FieldViolation, InvalidArgument

RECORD_DOMAIN = b"medledger:record:v1\n"
DOCUMENT_DOMAIN = b"medledger:document:v1\n"
SEAL_DOMAIN = b"medledger:record-seal:v1"
SALT_BYTES = 32
NONCE_BYTES = 12
FHIR_JSON = "application/fhir+json"
# Identifier systems naming medledger's own ids in FHIR resources.
RECORD_SYSTEM = "urn:medledger:record"
PRINCIPAL_SYSTEM = "urn:medledger:principal"
ORGANIZATION_SYSTEM = "urn:medledger:organization"
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
        return rfc8785.dumps(value)
    except rfc8785.CanonicalizationError as exc:
        raise InvalidArgument.field("content", f"not representable in RFC 8785: {exc}") from None


def validate_fhir(resource: Any) -> str:
    """Check a parsed resource against the FHIR R4 model of its `resourceType` (with
    `fhir.resources.R4B`); returns the resource type. InvalidArgument names each problem."""
    if not isinstance(resource, dict):
        raise InvalidArgument.field("content", "a FHIR resource is a JSON object")
    resource_type = resource.get("resourceType")
    if not isinstance(resource_type, str) or not resource_type:
        raise InvalidArgument.field("content.resourceType", "required")
    try:
        model = get_fhir_model_class(resource_type)
    except (KeyError, ValueError):
        raise InvalidArgument.field(
            "content.resourceType", f"not a FHIR R4 resource type: {resource_type[:60]}"
        ) from None
    try:
        model.model_validate(resource)
    except ValidationError as exc:
        violations = tuple(
            FieldViolation(
                "content." + ".".join(str(part) for part in error["loc"]) if error["loc"] else "content",
                error["msg"],
            )
            for error in exc.errors()[:20]
        )
        raise InvalidArgument(f"invalid FHIR {resource_type}", violations=violations) from None
    return resource_type


def new_salt() -> bytes:
    return os.urandom(SALT_BYTES)


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


def associated_data(record_id: str, version: int, patient_id: str) -> bytes:
    """What a version's ciphertext is bound to: moved to another record, version or patient, it
    does not decrypt. Length-prefixed, so no two triples give the same bytes."""
    parts = [record_id.encode(), str(version).encode(), patient_id.encode()]
    return SEAL_DOMAIN + b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def seal(data_key: bytes, plaintext: bytes, record_id: str, version: int, patient_id: str) -> bytes:
    """AES-256-GCM under a version's data key: nonce (12 bytes) || ciphertext || tag."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(data_key).encrypt(nonce, plaintext, associated_data(record_id, version, patient_id))


def unseal(data_key: bytes, sealed: bytes, record_id: str, version: int, patient_id: str) -> bytes:
    """The plaintext of `seal`; DataLoss when the bytes, the key or the binding were altered."""
    if len(sealed) < NONCE_BYTES + 16:
        raise DataLoss("a stored record version is truncated")
    try:
        return AESGCM(data_key).decrypt(
            sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], associated_data(record_id, version, patient_id)
        )
    except InvalidTag:
        raise DataLoss("a stored record version does not decrypt: altered ciphertext or data key") from None


def provenance(
    *, record_id: str, version: int, patient_id: str, written_by: str, organization_id: str, written_at: float
) -> dict[str, Any]:
    """A FHIR R4 Provenance for one record version: who wrote it (the patient, or a
    practitioner), for which organization, and when. Principals and organizations are named by
    medledger identifiers, never by personal data."""
    author: dict[str, Any] = {
        "type": {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type", "code": "author"}
            ]
        },
        "who": {
            "type": "Patient" if written_by == patient_id else "Practitioner",
            "identifier": {"system": PRINCIPAL_SYSTEM, "value": written_by},
        },
    }
    if organization_id:
        author["onBehalfOf"] = {
            "type": "Organization",
            "identifier": {"system": ORGANIZATION_SYSTEM, "value": organization_id},
        }
    recorded = datetime.fromtimestamp(written_at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return {
        "resourceType": "Provenance",
        "target": [{"identifier": {"system": RECORD_SYSTEM, "value": f"{record_id}/_history/{version}"}}],
        "recorded": recorded,
        "agent": [author],
    }
