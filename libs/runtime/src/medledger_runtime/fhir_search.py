"""The FHIR R4 search parameters records' `SearchRecords` matches in a patient's compartment, for
both services that speak FHIR search: records builds its blind index and its date matching from
them, and the FHIR gateway accepts and declares (in /metadata) exactly these. One table, so the
two cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping

# The token search parameters of FHIR R4 indexed per resource type: parameter -> the element
# holding its values (a code, a Coding, a CodeableConcept or an Identifier, or a list of them).
# The names are FHIR R4's (hl7.org/fhir/R4/searchparameter-registry.html); records' README "Search".
TOKEN_PARAMETERS: Mapping[str, Mapping[str, str]] = {
    "AllergyIntolerance": {
        "code": "code",
        "category": "category",
        "clinical-status": "clinicalStatus",
        "verification-status": "verificationStatus",
        "criticality": "criticality",
        "type": "type",
        "identifier": "identifier",
    },
    "CarePlan": {"category": "category", "status": "status", "intent": "intent", "identifier": "identifier"},
    "Claim": {"status": "status", "use": "use", "priority": "priority", "identifier": "identifier"},
    "Condition": {
        "code": "code",
        "category": "category",
        "clinical-status": "clinicalStatus",
        "verification-status": "verificationStatus",
        "severity": "severity",
        "body-site": "bodySite",
        "identifier": "identifier",
    },
    "DiagnosticReport": {"code": "code", "category": "category", "status": "status", "identifier": "identifier"},
    "Encounter": {"type": "type", "class": "class", "status": "status", "identifier": "identifier"},
    "Immunization": {"vaccine-code": "vaccineCode", "status": "status", "identifier": "identifier"},
    "MedicationRequest": {
        "code": "medicationCodeableConcept",
        "category": "category",
        "status": "status",
        "intent": "intent",
        "identifier": "identifier",
    },
    "Observation": {"code": "code", "category": "category", "status": "status", "identifier": "identifier"},
    "Procedure": {"code": "code", "category": "category", "status": "status", "identifier": "identifier"},
}

# The clinical date of each resource type, FHIR's `date` parameter: the first of these elements
# the resource has (an `[x]` element in any of its date forms: dateTime, instant, date, Period).
DATE_ELEMENTS: Mapping[str, tuple[str, ...]] = {
    "AllergyIntolerance": ("recordedDate", "onset"),
    "CarePlan": ("period",),
    "Claim": ("created",),
    "Condition": ("onset", "recordedDate"),
    "DiagnosticReport": ("effective",),
    "Encounter": ("period",),
    "Immunization": ("occurrence",),
    "MedicationRequest": ("authoredOn",),
    "Observation": ("effective", "issued"),
    "Procedure": ("performed",),
}
DATE_PARAMETER = "date"
DATE_PREFIXES = frozenset({"eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap"})
