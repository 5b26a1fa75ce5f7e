"""Which FHIR resource types the gateway serves, and where each lives: clinical types as records
of a patient's data category (the category consent decides on), Patient in identity, Consent in
consent, AuditEvent in audit, Provenance beside each record version."""

from __future__ import annotations

from medledger.types.v1 import vocabulary_pb2

C = vocabulary_pb2.DataCategory

# A clinical resource type → the data category its records are filed and consented under.
# (Synthea's patient bundles hold all of these but Organization and Practitioner, which are
# identity's principals.)
CATEGORY_OF: dict[str, int] = {
    "Observation": C.DATA_CATEGORY_OBSERVATIONS,
    "Condition": C.DATA_CATEGORY_CONDITIONS,
    "MedicationRequest": C.DATA_CATEGORY_MEDICATIONS,
    "MedicationStatement": C.DATA_CATEGORY_MEDICATIONS,
    "MedicationAdministration": C.DATA_CATEGORY_MEDICATIONS,
    "Medication": C.DATA_CATEGORY_MEDICATIONS,
    "Immunization": C.DATA_CATEGORY_IMMUNIZATIONS,
    "Procedure": C.DATA_CATEGORY_PROCEDURES,
    "Encounter": C.DATA_CATEGORY_ENCOUNTERS,
    "DiagnosticReport": C.DATA_CATEGORY_DIAGNOSTIC_REPORTS,
    "ImagingStudy": C.DATA_CATEGORY_DIAGNOSTIC_REPORTS,
    "DocumentReference": C.DATA_CATEGORY_DOCUMENTS,
    "AllergyIntolerance": C.DATA_CATEGORY_ALLERGIES,
    "CarePlan": C.DATA_CATEGORY_CARE_PLANS,
    "CareTeam": C.DATA_CATEGORY_CARE_PLANS,
    "Goal": C.DATA_CATEGORY_CARE_PLANS,
    "Claim": C.DATA_CATEGORY_CLAIMS,
    "ExplanationOfBenefit": C.DATA_CATEGORY_CLAIMS,
}
CLINICAL_TYPES = frozenset(CATEGORY_OF)
# What a bundle may file as records: the types above, and patient-linked types Synthea writes
# beside them, filed with the nearest category and read through $everything only.
FILED_WITH: dict[str, int] = {
    **CATEGORY_OF,
    "Device": C.DATA_CATEGORY_PROCEDURES,
    "SupplyDelivery": C.DATA_CATEGORY_PROCEDURES,
    "Coverage": C.DATA_CATEGORY_CLAIMS,
}
# Where a clinical resource names its patient (R4: most in `subject`, some in `patient`,
# Coverage in `beneficiary`), in the order looked at.
PATIENT_ELEMENTS = ("subject", "patient", "beneficiary")
