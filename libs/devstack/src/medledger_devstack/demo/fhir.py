"""The story's synthetic FHIR resources: a patient, practitioners, a blood-pressure Observation."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any


def patient_resource() -> bytes:
    """A synthetic patient: the name and birth date are personal data that must stay in
    identity, encrypted, and never reach an event, a log line or the chain."""
    return json.dumps(
        {
            "resourceType": "Patient",
            "identifier": [{"system": "urn:oid:2.16.840.1.113883.4.1", "value": f"demo-{uuid.uuid4().hex[:12]}"}],
            "name": [{"family": "Rivera", "given": ["Alex"]}],
            "gender": "female",
            "birthDate": "1984-03-02",
        }
    ).encode()


def practitioner_resource(family: str, given: str) -> bytes:
    return json.dumps(
        {
            "resourceType": "Practitioner",
            "identifier": [{"system": "http://hl7.org/fhir/sid/us-npi", "value": f"demo-{uuid.uuid4().hex[:10]}"}],
            "name": [{"family": family, "given": [given], "prefix": ["Dr."]}],
        }
    ).encode()


def blood_pressure(patient_id: str) -> bytes:
    """A FHIR R4 vital-signs Observation (LOINC 85354-9), 128/82 mmHg."""

    def component(code: str, display: str, value: int) -> dict[str, Any]:
        return {
            "code": {"coding": [{"system": "http://loinc.org", "code": code, "display": display}]},
            "valueQuantity": {"value": value, "unit": "mmHg", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"},
        }

    return json.dumps(
        {
            "resourceType": "Observation",
            "status": "final",
            "category": [
                {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                            "code": "vital-signs",
                        }
                    ]
                }
            ],
            "code": {"coding": [{"system": "http://loinc.org", "code": "85354-9", "display": "Blood pressure panel"}]},
            "subject": {"reference": f"Patient/{patient_id}"},
            "effectiveDateTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "component": [
                component("8480-6", "Systolic blood pressure", 128),
                component("8462-4", "Diastolic blood pressure", 82),
            ],
        },
        indent=2,
    ).encode()
