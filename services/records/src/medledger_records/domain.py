"""Records' domain, free of I/O: FHIR validation, canonical JSON, commitments and the envelope
encryption of one record version.

The commitment formulas (also in the README, so anyone can recompute them) and the RFC 8785
parsing they need are in ``medledger_common.commitments``, shared with `medledger verify`; they
are re-exported here. Each version has a random 32-byte salt.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

# The commitment formulas live in medledger_common.commitments (the verifier recomputes them);
# re-exported here for the tests and benchmarks that have always found them here.
from medledger_common.commitments import (  # noqa: F401
    DOCUMENT_DOMAIN,
    RECORD_DOMAIN,
    SALT_BYTES,
    canonical_json,
    document_commitment,
    parse_json,
    record_commitment,
)
from medledger_common.errors import DataLoss, FieldViolation, InvalidArgument

SEAL_DOMAIN = b"medledger:record-seal:v1"
NONCE_BYTES = 12
FHIR_JSON = "application/fhir+json"
# Identifier systems naming medledger's own ids in FHIR resources.
RECORD_SYSTEM = "urn:medledger:record"
PRINCIPAL_SYSTEM = "urn:medledger:principal"
ORGANIZATION_SYSTEM = "urn:medledger:organization"


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
