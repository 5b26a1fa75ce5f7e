"""Records' domain, free of I/O: FHIR validation, canonical JSON, commitments and the envelope
encryption of one record version; what a put, get, list or export may carry; and who may do
what without asking consent (the use cases in ``records.py`` ask consent for the rest).

The commitment formulas (also in the README, so anyone can recompute them) and the RFC 8785
parsing they need are in ``medledger_verifier.commitments``, shared with `medledger verify`; they
are re-exported here. Each version has a random 32-byte salt.
"""

from __future__ import annotations

import base64
import json
import os
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from fhir.resources.R4B import get_fhir_model_class
from medledger.types.v1 import vocabulary_pb2
from pydantic import ValidationError

from medledger_runtime.auth import Caller
from medledger_runtime.errors import (
    TOO_LARGE,
    DataLoss,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)

# The commitment formulas live in medledger_verifier.commitments (the verifier recomputes them);
# re-exported here for the tests and benchmarks that have always found them here.
from medledger_verifier.commitments import (  # noqa: F401
    DOCUMENT_DOMAIN,
    RECORD_DOMAIN,
    SALT_BYTES,
    canonical_json,
    document_commitment,
    parse_json,
    record_commitment,
)

SEAL_DOMAIN = b"medledger:record-seal:v1"
NONCE_BYTES = 12
FHIR_JSON = "application/fhir+json"
# Identifier systems naming medledger's own ids in FHIR resources.
RECORD_SYSTEM = "urn:medledger:record"
PRINCIPAL_SYSTEM = "urn:medledger:principal"
ORGANIZATION_SYSTEM = "urn:medledger:organization"
MAX_RECORD_BYTES = 4 * 1024 * 1024
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
# Versions are 32-bit integers in the database: none is larger.
MAX_VERSION = 2**31 - 1
READ, WRITE = vocabulary_pb2.Action.ACTION_READ, vocabulary_pb2.Action.ACTION_WRITE
TREAT = vocabulary_pb2.PurposeOfUse.PURPOSE_OF_USE_TREAT
CATEGORIES = frozenset(v.number for v in vocabulary_pb2.DataCategory.DESCRIPTOR.values if v.number)
PURPOSES = frozenset(v.number for v in vocabulary_pb2.PurposeOfUse.DESCRIPTOR.values if v.number)


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


# What a request may carry.


def check_put(patient_id: str, category: int, media_type: str, content: bytes) -> str:
    """A put's fields, checked in this order; returns the FHIR resource type ("" for a document)."""
    if len(content) > MAX_RECORD_BYTES:
        raise ResourceExhausted(f"a record is at most {MAX_RECORD_BYTES} bytes", reason=TOO_LARGE)
    if not patient_id:
        raise InvalidArgument.field("patient_id", "required")
    if category not in CATEGORIES:
        raise InvalidArgument.field("category", "required: a DataCategory")
    if not media_type:
        raise InvalidArgument.field("media_type", "required: application/fhir+json or a document's media type")
    if media_type == FHIR_JSON:
        return validate_fhir(parse_json(content))
    return ""


def check_new_version(record_category: int, record_media_type: str, category: int, media_type: str) -> None:
    if (record_category, record_media_type) != (category, media_type):
        raise InvalidArgument.field("category", "a new version keeps its record's category and media type")


def commitment(media_type: str, content: bytes, salt: bytes) -> str:
    """A FHIR resource commits to its canonical JSON, a document to its media type and bytes."""
    if media_type == FHIR_JSON:
        return record_commitment(content, salt)
    return document_commitment(media_type, content, salt)


def check_list(categories: tuple[int, ...], page_size: int) -> None:
    if any(c not in CATEGORIES for c in categories):
        raise InvalidArgument.field("categories", "DataCategory values only")
    if page_size < 0:
        raise InvalidArgument.field("page_size", "must not be negative")


def page_size(asked: int) -> int:
    return min(asked or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def page_token(updated_at: float, record_id: str) -> str:
    """Where the next page starts: after this record, in (updated_at, record_id) order."""
    return f"{updated_at!r}/{record_id}"


def page_position(token: str) -> tuple[float, str]:
    updated, _, record_id = token.partition("/")
    try:
        position = float(updated)
    except ValueError:
        raise InvalidArgument.field("page_token", "not a token this RPC returned") from None
    if not record_id.startswith("rec_"):
        raise InvalidArgument.field("page_token", "not a token this RPC returned")
    return position, record_id


# Who may do what without asking consent. Each returns whether consent must be asked, or refuses.
# `guardian` says the caller is a guardian the patient appointed, holding the role: they act for
# the patient, so they read, list and export as the patient would (no consent asked).


def write_needs_consent(caller: Caller, patient_id: str) -> bool:
    """A patient writes their own records (no consent asked); anyone else writing asks consent."""
    if caller.principal_id == patient_id:
        return False
    if caller.kind == "patient":
        raise PermissionDenied("a patient writes their own records only")
    return True


def read_needs_consent(caller: Caller, patient_id: str, purpose: int, *, guardian: bool = False) -> bool:
    """A patient (or their guardian) reads their own records; another patient's are as missing
    ones (NotFound); anyone else names a purpose and asks consent."""
    if caller.principal_id == patient_id or guardian:
        return False
    if caller.kind == "patient":
        raise NotFound("no such record")  # another patient's: the same answer as a missing one
    if purpose not in PURPOSES:
        raise InvalidArgument.field("purpose", "required: a PurposeOfUse, why the record is read")
    return True


def list_needs_consent(caller: Caller, patient_id: str, purpose: int, *, guardian: bool = False) -> bool:
    """A patient (or their guardian) lists their own records; anyone else but a patient names a
    purpose and asks consent (one question per category)."""
    if caller.principal_id == patient_id or guardian:
        return False
    if caller.kind == "patient":
        raise PermissionDenied("a patient lists their own records only")
    if purpose not in PURPOSES:
        raise InvalidArgument.field("purpose", "required: a PurposeOfUse, why the records are listed")
    return True


def check_export(caller: Caller, patient_id: str, *, guardian: bool = False) -> None:
    """Only the patient (or their guardian, for them) exports their records: no consent covers an
    export."""
    if caller.principal_id != patient_id and not guardian:
        raise PermissionDenied("a patient (or their guardian) exports their own records only")


def on_behalf_of(caller: Caller, patient_id: str, guardian: bool) -> str:
    """What an event names as the patient a guardian acted for: the patient when the caller acted
    as their guardian, else nothing."""
    return patient_id if guardian and caller.principal_id != patient_id else ""


def export_resource(media_type: str, content: bytes) -> dict[str, Any]:
    """A version as a Bundle entry's resource: the FHIR resource itself, or a document as a Binary."""
    if media_type == FHIR_JSON:
        resource: dict[str, Any] = json.loads(content)
        return resource
    return {
        "resourceType": "Binary",
        "contentType": media_type,
        "data": base64.b64encode(content).decode("ascii"),
    }


# SMART scopes name FHIR resource types; a document is served as a FHIR Binary (as ExportRecords
# renders it), so its scopes are Binary's.
DOCUMENT_SCOPE_TYPE = "Binary"


def scope_type(resource_type: str) -> str:
    """The resource type a stored record's SMART scopes name (its own; Binary for a document)."""
    return resource_type or DOCUMENT_SCOPE_TYPE


def content_scope_type(media_type: str, content: bytes) -> str:
    """The resource type a put's content claims, for its scope check before anything else is
    checked: a document's is Binary; content that names no type needs a ``*`` scope (the put then
    refuses it as invalid anyway)."""
    if media_type != FHIR_JSON:
        return DOCUMENT_SCOPE_TYPE
    try:
        resource = json.loads(content)
    except (ValueError, UnicodeDecodeError):
        return "*"
    name = resource.get("resourceType") if isinstance(resource, dict) else None
    return name if isinstance(name, str) and name else "*"
