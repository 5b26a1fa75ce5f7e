"""A consent version's FHIR R4 Consent form and its salted commitment (what the chain and the
grantor can check a version against)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from fhir.resources.R4B.consent import Consent as FhirConsent
from medledger.types.v1 import vocabulary_pb2
from pydantic import ValidationError

from medledger_consent import domain
from medledger_verifier import commitments

_PURPOSE_CODES = {
    v.number: v.name.removeprefix("PURPOSE_OF_USE_") for v in vocabulary_pb2.PurposeOfUse.DESCRIPTOR.values if v.number
}
_CATEGORY_CODES = {
    v.number: v.name.removeprefix("DATA_CATEGORY_").lower()
    for v in vocabulary_pb2.DataCategory.DESCRIPTOR.values
    if v.number
}
_ACTION_CODES: dict[int, str] = {
    vocabulary_pb2.Action.ACTION_READ: "access",
    vocabulary_pb2.Action.ACTION_WRITE: "correct",
}
_CATEGORY_SYSTEM = "https://medledger.dev/fhir/CodeSystem/data-category"
_PURPOSE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ActReason"


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


_PRINCIPAL_TYPES = {"pat": "Patient", "prn": "Practitioner", "org": "Organization"}


def _principal_reference(principal_id: str) -> dict[str, Any]:
    reference: dict[str, Any] = {"identifier": {"system": "https://medledger.dev/principal", "value": principal_id}}
    resource_type = _PRINCIPAL_TYPES.get(principal_id.split("_", 1)[0])
    if resource_type:
        reference["type"] = resource_type
    return reference


def fhir_consent(v: domain.ConsentVersion) -> dict[str, Any]:
    """The FHIR R4 Consent of a version (a plain dict, validated with fhir.resources.R4B)."""
    period: dict[str, str] = {"start": _iso(v.period_start)}
    if v.period_end is not None:
        period["end"] = _iso(v.period_end)
    provision: dict[str, Any] = {
        "type": "permit" if v.provision == domain.PERMIT else "deny",
        "period": period,
        "actor": [
            {
                "role": {
                    "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "IRCP"}]
                },
                # Logical references: medledger ids are not FHIR ids (they contain "_").
                "reference": _principal_reference(v.grantee_id),
            }
        ],
    }
    if v.actions:
        provision["action"] = [
            {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentaction", "code": _ACTION_CODES[a]}]}
            for a in sorted(v.actions)
        ]
    if v.purposes:
        provision["purpose"] = [{"system": _PURPOSE_SYSTEM, "code": _PURPOSE_CODES[p]} for p in sorted(v.purposes)]
    if v.categories:
        provision["class"] = [{"system": _CATEGORY_SYSTEM, "code": _CATEGORY_CODES[c]} for c in sorted(v.categories)]
    document = {
        "resourceType": "Consent",
        "id": f"{v.consent_id.replace('_', '-')}-v{v.version}",
        "meta": {"versionId": str(v.version)},
        "identifier": [{"system": "https://medledger.dev/consent", "value": v.consent_id}],
        "status": "active" if v.status == domain.ACTIVE else "inactive",
        "scope": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]
        },
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": _principal_reference(v.patient_id),
        "dateTime": _iso(v.recorded_at),
        "performer": [_principal_reference(v.recorded_by)],
        "policyRule": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                    "code": "OPTIN" if v.provision == domain.PERMIT else "OPTOUT",
                }
            ]
        },
        "provision": provision,
    }
    try:
        FhirConsent.model_validate(document)
    except ValidationError as exc:  # a bug here, never the caller's
        raise AssertionError(f"consent export does not validate: {exc}") from exc
    return document


def fhir_json(document: Mapping[str, Any]) -> str:
    return json.dumps(document, separators=(",", ":"), sort_keys=True)


def commitment(document: Mapping[str, Any], salt: bytes) -> str:
    """SHA-256 over the domain tag, the salt and the RFC 8785 (JCS) form of the FHIR Consent: the
    verifier's, so that the patient's check recomputes exactly what was recorded."""
    return commitments.consent_commitment(document, salt)
