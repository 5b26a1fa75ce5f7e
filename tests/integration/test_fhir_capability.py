"""The CapabilityStatement at [base]/metadata claims exactly what the gateway does (issue 24: "a
test checks every claim against behaviour").

Driven by the statement, not by a list here: every resource type it declares, every interaction,
search parameter and operation of each, and the system interactions, is exercised against real
data on one stack (a patient, a practitioner the patient consented to, a record of every
declared clinical type, Consents, the log's AuditEvents) and must work: 2xx, the right resource
type, and a search parameter must find what it names and not what it does not. A declaration
this file does not know how to exercise fails the test, so a claim cannot be added without
behaviour behind it. And what is NOT declared (interactions, search parameters under
`Prefer: handling=strict`, types, operations, system interactions) is refused: 400, 404 or 405.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlencode

import aiohttp
from fhirpy import AsyncFHIRClient
from medledger.consent.v1 import consent_service_pb2 as co_pb
from medledger.consent.v1 import consent_service_pb2_grpc as co_grpc
from medledger.identity.v1 import identity_service_pb2 as id_pb
from medledger.identity.v1 import identity_service_pb2_grpc as id_grpc
from medledger.records.v1 import records_service_pb2 as rec_pb
from medledger.records.v1 import records_service_pb2_grpc as rec_grpc
from medledger.types.v1 import vocabulary_pb2 as vocab
from multidict import CIMultiDict

from medledger_devstack.testing import eventually
from medledger_fhir.resource_types import CATEGORY_OF
from medledger_sdk.channels import make_channel

Kind = vocab.PrincipalKind
FHIR_JSON = "application/fhir+json"
STRICT = {"Prefer": "handling=strict"}
# Every type-level and instance-level interaction FHIR R4 defines (CapabilityStatement.rest.resource.interaction).
TYPE_INTERACTIONS = (
    "read",
    "vread",
    "update",
    "patch",
    "delete",
    "history-instance",
    "history-type",
    "create",
    "search-type",
)
SYSTEM_INTERACTIONS = ("transaction", "batch", "search-system", "history-system")
# Types FHIR R4 has that a server like this might be expected to serve; any not declared must be refused.
OTHER_TYPES = ("Practitioner", "Organization", "Location", "Binary", "Basic", "Person", "Group", "Task", "Account")
# Search parameters FHIR R4 defines on many types that this gateway may not support.
OTHER_PARAMS = ("_text", "_content", "_has:Observation:patient:code", "encounter", "value-quantity", "performer")
REFUSED = (400, 404, 405)


def rid() -> str:
    return str(uuid.uuid4())


def as_fhir(principal_id: str) -> str:
    return principal_id.replace("_", "-")


def cc(system: str, code: str) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code}]}


def ident(value: str) -> list[dict[str, str]]:
    return [{"system": "urn:medledger-test:id", "value": value}]


SNOMED, LOINC, RXNORM = "http://snomed.info/sct", "http://loinc.org", "http://www.nlm.nih.gov/research/umls/rxnorm"
T = "http://terminology.hl7.org/CodeSystem/"


def samples(patient: dict[str, str]) -> dict[str, dict[str, Any]]:
    """A valid R4 resource of each clinical type about the patient, with a value for each of the
    type's usual token parameters and a clinical date in 2021 (the date `date` should match)."""
    subject = {"subject": patient}
    return {
        "Observation": {
            "status": "final",
            "category": [cc(T + "observation-category", "vital-signs")],
            "code": cc(LOINC, "8867-4"),
            "effectiveDateTime": "2021-05-01T10:00:00Z",
            "valueQuantity": {"value": 72, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"},
            **subject,
        },
        "Condition": {
            "clinicalStatus": cc(T + "condition-clinical", "active"),
            "verificationStatus": cc(T + "condition-ver-status", "confirmed"),
            "category": [cc(T + "condition-category", "problem-list-item")],
            "severity": cc(SNOMED, "24484000"),
            "code": cc(SNOMED, "44054006"),
            "bodySite": [cc(SNOMED, "38266002")],
            "onsetDateTime": "2021-05-01T10:00:00Z",
            **subject,
        },
        "MedicationRequest": {
            "status": "active",
            "intent": "order",
            "category": [cc(T + "medicationrequest-category", "outpatient")],
            "medicationCodeableConcept": cc(RXNORM, "860975"),
            "authoredOn": "2021-05-01T10:00:00Z",
            **subject,
        },
        "MedicationStatement": {"status": "active", "medicationCodeableConcept": cc(RXNORM, "860975"), **subject},
        "MedicationAdministration": {
            "status": "completed",
            "medicationCodeableConcept": cc(RXNORM, "860975"),
            "effectiveDateTime": "2021-05-01T10:00:00Z",
            **subject,
        },
        # A Medication names no patient: records files it under one given by the writer.
        "Medication": {"code": cc(RXNORM, "860975")},
        "Immunization": {
            "status": "completed",
            "vaccineCode": cc("http://hl7.org/fhir/sid/cvx", "140"),
            "occurrenceDateTime": "2021-05-01T10:00:00Z",
            "patient": patient,
        },
        "Procedure": {
            "status": "completed",
            "category": cc(SNOMED, "387713003"),
            "code": cc(SNOMED, "73761001"),
            "performedDateTime": "2021-05-01T10:00:00Z",
            **subject,
        },
        "Encounter": {
            "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
            "type": [cc(SNOMED, "185349003")],
            "period": {"start": "2021-05-01T10:00:00Z", "end": "2021-05-01T10:30:00Z"},
            **subject,
        },
        "DiagnosticReport": {
            "status": "final",
            "category": [cc(T + "v2-0074", "LAB")],
            "code": cc(LOINC, "58410-2"),
            "effectiveDateTime": "2021-05-01T10:00:00Z",
            **subject,
        },
        "ImagingStudy": {"status": "available", **subject},
        "DocumentReference": {
            "status": "current",
            "content": [{"attachment": {"contentType": "text/plain", "data": "aGVsbG8="}}],
            **subject,
        },
        "AllergyIntolerance": {
            "clinicalStatus": cc(T + "allergyintolerance-clinical", "active"),
            "verificationStatus": cc(T + "allergyintolerance-verification", "confirmed"),
            "type": "allergy",
            "category": ["food"],
            "criticality": "low",
            "code": cc(SNOMED, "91935009"),
            "recordedDate": "2021-05-01T10:00:00Z",
            "patient": patient,
        },
        "CarePlan": {
            "status": "active",
            "intent": "plan",
            "category": [cc(SNOMED, "734163000")],
            "period": {"start": "2021-05-01T10:00:00Z"},
            **subject,
        },
        "CareTeam": {"status": "active", **subject},
        "Goal": {"lifecycleStatus": "active", "description": {"text": "walk daily"}, **subject},
        "Claim": {
            "status": "active",
            "type": cc(T + "claim-type", "professional"),
            "use": "claim",
            "patient": patient,
            "created": "2021-05-01T10:00:00Z",
            "provider": {"display": "Hospital"},
            "priority": cc(T + "processpriority", "normal"),
            "insurance": [{"sequence": 1, "focal": True, "coverage": {"display": "Cover"}}],
        },
        "ExplanationOfBenefit": {
            "status": "active",
            "type": cc(T + "claim-type", "professional"),
            "use": "claim",
            "patient": patient,
            "created": "2021-05-01T10:00:00Z",
            "insurer": {"display": "Insurer"},
            "provider": {"display": "Hospital"},
            "outcome": "complete",
            "insurance": [{"focal": True, "coverage": {"display": "Cover"}}],
        },
    }


# A token search parameter (FHIR R4's name) → the elements it searches, in the order tried.
TOKEN_ELEMENTS = {
    "code": ("code", "medicationCodeableConcept"),
    "category": ("category",),
    "status": ("status",),
    "identifier": ("identifier",),
    "clinical-status": ("clinicalStatus",),
    "verification-status": ("verificationStatus",),
    "criticality": ("criticality",),
    "type": ("type",),
    "intent": ("intent",),
    "use": ("use",),
    "priority": ("priority",),
    "severity": ("severity",),
    "body-site": ("bodySite",),
    "class": ("class",),
    "vaccine-code": ("vaccineCode",),
}


def token_of(value: Any) -> str | None:
    """A token search value (`system|code`, or `code`) matching an element's value."""
    if isinstance(value, list):
        return token_of(value[0]) if value else None
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        if "coding" in value:
            return token_of(value["coding"])
        if "code" in value:
            return f"{value.get('system', '')}|{value['code']}" if value.get("system") else str(value["code"])
        if "value" in value:
            return f"{value['system']}|{value['value']}"
    return None


class Gateway:
    """Raw HTTP to the gateway (statuses and headers as they are), one session for the test."""

    def __init__(self, base: str, http: aiohttp.ClientSession) -> None:
        self.base, self.http = base, http

    async def __call__(
        self, method: str, path: str, token: str | None, body: Any = None, **headers: str
    ) -> tuple[int, CIMultiDict[str], Any]:
        sent = dict(headers)
        if token:
            sent["Authorization"] = f"Bearer {token}"
        data = None
        if body is not None:
            sent.setdefault("Content-Type", FHIR_JSON)
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
        url = path if path.startswith("http") else f"{self.base}/{path}" if path else self.base
        async with self.http.request(method, url, headers=sent, data=data) as response:
            raw = await response.read()
            try:
                parsed = json.loads(raw) if raw else None
            except ValueError:
                parsed = raw
            return response.status, CIMultiDict(response.headers), parsed


def ids_in(bundle: Any) -> set[str]:
    return {e["resource"]["id"] for e in (bundle or {}).get("entry", []) if "resource" in e}


async def test_the_capability_statement_claims_exactly_what_the_gateway_does(start_stack: Any) -> None:
    async with start_stack(records=True, audit=True, fhir=True) as stack, aiohttp.ClientSession() as http:
        gw = Gateway(stack.fhir_base, http)
        public = id_grpc.IdentityServiceStub(make_channel(stack.identity_address))
        admin = id_grpc.IdentityServiceStub(stack.admin().channel(stack.identity_address, "medledger.identity"))
        patient = await public.RegisterPatient(
            id_pb.RegisterPatientRequest(
                request_id=rid(),
                fhir_patient=json.dumps(
                    {"resourceType": "Patient", "identifier": ident(uuid.uuid4().hex), "birthDate": "1980-02-03"}
                ).encode(),
            )
        )
        org = await admin.RegisterPrincipal(
            id_pb.RegisterPrincipalRequest(request_id=rid(), kind=Kind.PRINCIPAL_KIND_ORGANIZATION)
        )
        doctor = await admin.RegisterPrincipal(
            id_pb.RegisterPrincipalRequest(
                request_id=rid(),
                kind=Kind.PRINCIPAL_KIND_PRACTITIONER,
                organization_id=org.principal.principal_id,
                fhir_resource=json.dumps(
                    {"resourceType": "Practitioner", "identifier": [{"system": "urn:npi", "value": uuid.uuid4().hex}]}
                ).encode(),
            )
        )
        patient_id, doctor_id = patient.principal.principal_id, doctor.principal.principal_id
        org_id = org.principal.principal_id
        await stack.known_to_consent(patient_id, doctor_id, org_id)
        me = stack.client(patient_id, patient.client_secret)
        # The patient lets the doctor read and write all their data for treatment.
        await co_grpc.ConsentServiceStub(me.channel(stack.consent_address, "medledger.consent")).GrantConsent(
            co_pb.GrantConsentRequest(
                request_id=rid(),
                patient_id=patient_id,
                grantee_id=doctor_id,
                provision=co_pb.ProvisionType.PROVISION_TYPE_PERMIT,
                actions=[vocab.Action.ACTION_READ, vocab.Action.ACTION_WRITE],
                purposes=[vocab.PurposeOfUse.PURPOSE_OF_USE_TREAT],
            )
        )
        patient_records = rec_grpc.RecordsServiceStub(
            me.channel(f"127.0.0.1:{stack.records.grpc_port}", "medledger.records")
        )
        patient_token = await me.token("medledger.fhir")
        doctor_token = await stack.client(doctor_id, doctor.client_secret).token("medledger.fhir")
        admin_token = await stack.admin().token("medledger.fhir")
        patient_ref = f"Patient/{as_fhir(patient_id)}"
        sample_of = samples({"reference": patient_ref})

        status, headers, statement = await gw("GET", "metadata", None)
        assert status == 200 and headers["Content-Type"].startswith(FHIR_JSON)
        assert statement["resourceType"] == "CapabilityStatement" and statement["fhirVersion"] == "4.0.1"
        (rest,) = statement["rest"]
        declared = {r["type"]: r for r in rest["resource"]}
        assert len(declared) == len(rest["resource"]), "a type declared twice"
        # Every failed claim is collected, so one run shows them all.
        failures: list[str] = []

        def check(ok: bool, what: str, got: Any = None) -> bool:
            if not ok:
                failures.append(f"{what}: {str(got)[:300]}")
            return ok

        def interactions(r: dict[str, Any]) -> set[str]:
            return {i["code"] for i in r.get("interaction", [])}

        def params(r: dict[str, Any]) -> dict[str, str]:
            return {p["name"]: p["type"] for p in r.get("searchParam", [])}

        # --- the clinical types: a sample each, exercised by the claims of its declaration -------

        instance: dict[str, str] = {}  # type → the id of a resource of it the doctor may read

        async def make(resource_type: str, r: dict[str, Any]) -> str | None:
            body = {"resourceType": resource_type, "identifier": ident(f"{resource_type}-{uuid.uuid4().hex}")}
            body.update(sample_of[resource_type])
            if "create" in interactions(r):
                status, headers, got = await gw("POST", resource_type, doctor_token, body)
                if not check(
                    status == 201 and got.get("resourceType") == resource_type and "Location" in headers,
                    f"{resource_type} create",
                    (status, got),
                ):
                    return None
                new_id = str(got["id"])
                if r.get("conditionalCreate"):
                    # If-None-Exist on a declared parameter: the match answers, nothing is written.
                    criteria = (
                        f"identifier={token_of(body['identifier'])}" if "identifier" in params(r) else f"_id={new_id}"
                    )
                    again = await gw("POST", resource_type, doctor_token, body, **{"If-None-Exist": criteria})
                    check(
                        again[0] == 200 and again[2].get("id") == new_id,
                        f"{resource_type} conditional create ({criteria.split('=')[0]})",
                        again[:1] + again[2:],
                    )
                return new_id
            # Not creatable over FHIR: written as records' own clients write it.
            put = await patient_records.PutRecord(
                rec_pb.PutRecordRequest(
                    request_id=rid(),
                    patient_id=patient_id,
                    category=CATEGORY_OF[resource_type],  # type: ignore[arg-type]
                    content=json.dumps(body).encode(),
                    media_type=FHIR_JSON,
                    assign_fhir_identity=True,
                )
            )
            return as_fhir(put.record_id)

        async def search(resource_type: str, query: list[tuple[str, str]], what: str) -> set[str] | None:
            url = f"{resource_type}?{urlencode(query)}"
            status, _, got = await gw("GET", url, doctor_token, **STRICT)
            if not check(status == 200 and got.get("type") == "searchset", what, (status, got)):
                return None
            check(
                all(
                    e["resource"]["resourceType"] == resource_type
                    for e in got.get("entry", [])
                    if e.get("search", {}).get("mode") == "match"
                ),
                f"{what}: matches of another type",
                got,
            )
            return ids_in(got)

        async def exercise_clinical(resource_type: str, r: dict[str, Any]) -> None:
            made = await make(resource_type, r)
            if made is None:
                return
            instance[resource_type] = made
            path = f"{resource_type}/{made}"
            versions = 1
            done = interactions(r)
            if "read" in done:
                status, headers, got = await gw("GET", path, doctor_token)
                check(
                    status == 200 and got["resourceType"] == resource_type and got["id"] == made and "ETag" in headers,
                    f"{resource_type} read",
                    (status, got),
                )
            if "vread" in done:
                status, _, got = await gw("GET", f"{path}/_history/1", doctor_token)
                check(
                    status == 200 and got["resourceType"] == resource_type and got["meta"]["versionId"] == "1",
                    f"{resource_type} vread",
                    (status, got),
                )
            if "update" in done:
                _, _, current = await gw("GET", f"{path}/_history/1", patient_token)
                changed = {**current, "identifier": ident(f"{resource_type}-updated-{uuid.uuid4().hex}")}
                headers = {"If-Match": 'W/"1"'} if r.get("versioning") == "versioned-update" else {}
                status, _, got = await gw("PUT", path, doctor_token, changed, **headers)
                if check(
                    status == 200 and got.get("resourceType") == resource_type and got["meta"]["versionId"] == "2",
                    f"{resource_type} update",
                    (status, got),
                ):
                    versions = 2
                if headers:  # versioned-update: a stale If-Match is refused
                    status, _, got = await gw("PUT", path, doctor_token, changed, **headers)
                    check(status == 412, f"{resource_type} update with a stale If-Match", (status, got))
                if not r.get("updateCreate", False):
                    absent = f"rec-{uuid.uuid4().hex}"
                    status, _, got = await gw(
                        "PUT", f"{resource_type}/{absent}", doctor_token, {**changed, "id": absent}
                    )
                    check(status == 404, f"{resource_type} update of an absent id (updateCreate false)", (status, got))
            if "history-instance" in done:
                status, _, got = await gw("GET", f"{path}/_history", doctor_token)
                check(
                    status == 200
                    and got["type"] == "history"
                    and got["total"] == versions
                    and all(e["resource"]["resourceType"] == resource_type for e in got["entry"]),
                    f"{resource_type} history-instance",
                    (status, got),
                )
            if "search-type" in done:
                await exercise_search(resource_type, r, made)
            elif params(r):
                failures.append(f"{resource_type}: search parameters declared without search-type")

        async def exercise_search(resource_type: str, r: dict[str, Any], made: str) -> None:
            _, _, resource = await gw("GET", f"{resource_type}/{made}", patient_token)
            compartment = ("patient", patient_ref)
            for name, kind in params(r).items():
                what = f"{resource_type}?{name} ({kind})"
                if name in ("patient", "subject"):
                    found = await search(resource_type, [(name, patient_ref)], what)
                    check(found is not None and made in found, what, found)
                    continue
                if name == "_id":
                    hit, miss = made, f"rec-{uuid.uuid4().hex}"
                elif kind == "date":
                    hit, miss = "ge2021-01-01", "lt2000-01-01"
                    if name == "_lastUpdated":
                        hit, miss = "ge2020-01-01", "lt2020-01-01"
                elif kind == "token" and name in TOKEN_ELEMENTS:
                    found_value = next(
                        (token_of(resource[e]) for e in TOKEN_ELEMENTS[name] if resource.get(e) is not None), None
                    )
                    if not check(found_value is not None, f"{what}: the sample has no value for it"):
                        continue
                    hit, miss = str(found_value), "urn:medledger-test:none|nothing"
                else:
                    failures.append(f"{what}: declared, and this test does not know how to exercise it")
                    continue
                found = await search(resource_type, [compartment, (name, hit)], f"{what}={hit}")
                check(found is not None and made in found, f"{what}={hit} finds the resource", found)
                found = await search(resource_type, [compartment, (name, miss)], f"{what}={miss}")
                check(found is not None and made not in found, f"{what}={miss} does not find it", found)
            # Parameters NOT declared: refused under strict handling.
            for name in OTHER_PARAMS:
                if name.partition(":")[0] not in params(r):
                    status, _, got = await gw(
                        "GET", f"{resource_type}?patient={patient_ref}&{name}=x", doctor_token, **STRICT
                    )
                    check(status == 400, f"{resource_type}?{name} (not declared) under strict handling", (status, got))

        clinical = [t for t in sorted(declared) if t in sample_of]
        for resource_type in clinical:
            await exercise_clinical(resource_type, declared[resource_type])

        # --- the other declared types: each claim has its exercise here, or the test fails ---------

        consent_ids: dict[str, str] = {}

        async def consent_create() -> None:
            grant = {
                "resourceType": "Consent",
                "status": "active",
                "scope": cc(T + "consentscope", "patient-privacy"),
                "category": [cc(LOINC, "59284-0")],
                "patient": {"reference": patient_ref},
                "provision": {
                    "type": "permit",
                    "actor": [
                        {
                            "role": cc(T + "v3-ParticipationType", "IRCP"),
                            "reference": {"reference": f"Organization/{as_fhir(org_id)}"},
                        }
                    ],
                    "action": [cc(T + "consentaction", "access")],
                    "class": [{"system": "http://hl7.org/fhir/resource-types", "code": "Observation"}],
                },
            }
            status, headers, got = await gw("POST", "Consent", patient_token, grant)
            if check(
                status == 201 and got["resourceType"] == "Consent" and "Location" in headers, "Consent create", got
            ):
                consent_ids["version"] = got["id"]
                consent_ids["logical"] = got["id"].rsplit("-v", 1)[0]

        async def consent_read() -> None:
            status, _, got = await gw("GET", f"Consent/{consent_ids.get('logical')}", patient_token)
            check(status == 200 and got["resourceType"] == "Consent", "Consent read", (status, got))

        async def consent_vread() -> None:
            status, _, got = await gw("GET", f"Consent/{consent_ids.get('logical')}/_history/1", patient_token)
            check(status == 200 and got["resourceType"] == "Consent", "Consent vread", (status, got))

        async def consent_search() -> None:
            status, _, got = await gw("GET", f"Consent?patient={patient_ref}", patient_token, **STRICT)
            check(
                status == 200 and got["type"] == "searchset" and consent_ids.get("version") in ids_in(got),
                "Consent search-type",
                (status, got),
            )

        def consent_param(name: str, hit: str, miss: str, token: str = "") -> Callable[[], Awaitable[None]]:
            async def run() -> None:
                for value, expected in ((hit, True), (miss, False)):
                    query = f"{name}={value}" if name == "actor" else f"patient={patient_ref}&{name}={value}"
                    status, _, got = await gw("GET", f"Consent?{query}", token or patient_token, **STRICT)
                    check(
                        status == 200 and (consent_ids.get("version") in ids_in(got)) == expected,
                        f"Consent?{name}={value}",
                        (status, got),
                    )

            return run

        async def consent_update() -> None:
            # Revoking is the update Consent offers: status inactive, terms unchanged.
            _, _, current = await gw("GET", f"Consent/{consent_ids.get('logical')}", patient_token)
            status, _, got = await gw(
                "PUT", f"Consent/{consent_ids.get('logical')}", patient_token, {**current, "status": "inactive"}
            )
            check(
                status == 200 and got["resourceType"] == "Consent" and got["status"] == "inactive",
                "Consent update",
                (status, got),
            )

        async def patient_read() -> None:
            status, _, got = await gw("GET", patient_ref, doctor_token)
            check(
                status == 200 and got["resourceType"] == "Patient" and got["id"] == as_fhir(patient_id),
                "Patient read",
                (status, got),
            )

        async def patient_everything() -> None:
            status, _, got = await gw("GET", f"{patient_ref}/$everything", doctor_token)
            types = {e["resource"]["resourceType"] for e in (got or {}).get("entry", [])}
            check(
                status == 200 and got["type"] == "searchset" and {"Patient", *clinical} <= types,
                "Patient $everything",
                (status, sorted({"Patient", *clinical} - types)),
            )

        async def provenance_read() -> None:
            observation = instance.get("Observation", "")
            status, _, got = await gw("GET", f"Provenance/{observation}-1", doctor_token)
            check(
                status == 200
                and got["resourceType"] == "Provenance"
                and got["target"][0]["reference"] == f"Observation/{observation}/_history/1",
                "Provenance read",
                (status, got),
            )

        async def provenance_search() -> None:
            observation = instance.get("Observation", "")
            status, _, got = await gw("GET", f"Provenance?target=Observation/{observation}", doctor_token, **STRICT)
            references = [e["resource"]["target"][0]["reference"] for e in (got or {}).get("entry", [])]
            # Every version's, newest first (the Observation may have been updated by now).
            check(
                status == 200
                and got["type"] == "searchset"
                and references == [f"Observation/{observation}/_history/{n}" for n in range(len(references), 0, -1)],
                "Provenance?target finds the record's versions' Provenances",
                (status, got),
            )
            # Another record's target finds none of this one's; a target naming no record is 400.
            other = instance.get("Condition", "")
            status, _, got = await gw("GET", f"Provenance?target=Condition/{other}", doctor_token, **STRICT)
            check(
                status == 200 and f"Observation/{observation}" not in json.dumps(got),
                "Provenance?target of another record finds none of this one's",
                (status, got),
            )
            status, _, got = await gw("GET", "Provenance?target=nothing", doctor_token)
            check(status == 400, "Provenance?target naming no record is refused", (status, got))

        async def audit_entries(query: str = "") -> Any:
            # One page of all (audit filters a page at a time; this patient has a few hundred).
            url = f"AuditEvent?patient={patient_ref}&_count=1000{query}"
            status, _, got = await gw("GET", url, patient_token, **STRICT)
            return got if status == 200 and got["type"] == "searchset" and got.get("entry") else None

        async def doctors_reads_logged() -> Any:
            got = await audit_entries()
            return got if got and "record.disclosed" in json.dumps(got) else None

        async def audit_search() -> None:
            # The doctor's reads reach the log through Kafka: wait for them.
            got = await eventually(doctors_reads_logged, "the doctor's reads in the patient's AuditEvents")
            check(all(e["resource"]["resourceType"] == "AuditEvent" for e in got["entry"]), "AuditEvent search", got)

        def audit_param(name: str, hit: str, miss: str) -> Callable[[], Awaitable[None]]:
            async def run() -> None:
                found = await audit_entries(f"&{name}={hit}")
                check(found is not None, f"AuditEvent?{name}={hit} finds entries", found)
                status, _, got = await gw(
                    "GET", f"AuditEvent?patient={patient_ref}&_count=1000&{name}={miss}", patient_token
                )
                check(status == 200 and not got.get("entry"), f"AuditEvent?{name}={miss} finds none", (status, got))

            return run

        doctor_actor = f"Organization/{as_fhir(org_id)}"
        exercises: dict[tuple[str, str], Callable[[], Awaitable[None]]] = {
            ("Consent", "create"): consent_create,
            ("Consent", "read"): consent_read,
            ("Consent", "vread"): consent_vread,
            ("Consent", "search-type"): consent_search,
            ("Consent", "param:patient"): consent_search,
            # By actor alone (one patient or one actor), as the org's admin would: the admin.
            ("Consent", "param:actor"): consent_param(
                "actor", doctor_actor, f"Practitioner/{as_fhir(doctor_id)}", admin_token
            ),
            ("Consent", "param:status"): consent_param("status", "active", "inactive"),
            ("Consent", "update"): consent_update,  # last of Consent's: it revokes
            ("Patient", "read"): patient_read,
            ("Patient", "op:everything"): patient_everything,
            ("Provenance", "read"): provenance_read,
            ("Provenance", "search-type"): provenance_search,
            ("Provenance", "param:target"): provenance_search,
            ("AuditEvent", "search-type"): audit_search,
            ("AuditEvent", "param:patient"): audit_search,
            ("AuditEvent", "param:date"): audit_param("date", "ge2020-01-01", "lt2020-01-01"),
            ("AuditEvent", "param:_lastUpdated"): audit_param("_lastUpdated", "ge2020-01-01", "lt2020-01-01"),
            ("AuditEvent", "param:action"): audit_param("action", "R", "D"),
            ("AuditEvent", "param:subtype"): audit_param("subtype", "record.disclosed", "no.such-entry"),
        }
        order = list(exercises)
        for resource_type in sorted(set(declared) - set(clinical)):
            r = declared[resource_type]
            claims = (
                [i for i in interactions(r)]
                + [f"param:{p}" for p in params(r)]
                + [f"op:{o['name']}" for o in r.get("operation", [])]
            )
            for claim in sorted(
                claims, key=lambda c: order.index((resource_type, c)) if (resource_type, c) in order else -1
            ):
                run = exercises.get((resource_type, claim))
                if run is None:
                    failures.append(f"{resource_type} {claim}: declared, and this test does not exercise it")
                    continue
                await run()
        # Operations on clinical types (none is known to this test).
        for resource_type in clinical:
            for op in declared[resource_type].get("operation", []):
                failures.append(f"{resource_type} ${op['name']}: declared, and this test does not exercise it")

        # --- system interactions ----------------------------------------------------------------------

        system = {i["code"] for i in rest.get("interaction", [])}
        for kind in ("batch", "transaction"):
            if kind not in system:
                continue
            entry = {
                "fullUrl": f"urn:uuid:{uuid.uuid4()}",
                "resource": {"resourceType": "Observation", **sample_of["Observation"]},
                "request": {"method": "POST", "url": "Observation"},
            }
            status, _, got = await gw(
                "POST", "", doctor_token, {"resourceType": "Bundle", "type": kind, "entry": [entry]}
            )
            check(
                status == 200
                and got["type"] == f"{kind}-response"
                and got["entry"][0]["response"]["status"].startswith("201"),
                f"system {kind}",
                (status, got),
            )
        for kind in set(system) - {"batch", "transaction"}:
            failures.append(f"system {kind}: declared, and this test does not exercise it")

        # --- what is not declared is refused ---------------------------------------------------------

        any_body = {"resourceType": "Basic", "code": {"text": "x"}}

        async def attempt(resource_type: str, interaction: str) -> tuple[int, Any]:
            known = (
                instance.get(resource_type)
                or {
                    "Consent": consent_ids.get("logical"),
                    "Patient": as_fhir(patient_id),
                    "Provenance": f"{instance.get('Observation')}-1",
                }.get(resource_type)
                or "x1"
            )
            body = {**any_body, "resourceType": resource_type, **sample_of.get(resource_type, {}), "id": known}
            path = f"{resource_type}/{known}"
            status, _, got = await {
                "read": lambda: gw("GET", path, doctor_token),
                "vread": lambda: gw("GET", f"{path}/_history/1", doctor_token),
                "update": lambda: gw("PUT", path, doctor_token, body),
                "patch": lambda: gw(
                    "PATCH", path, doctor_token, b"[]", **{"Content-Type": "application/json-patch+json"}
                ),
                "delete": lambda: gw("DELETE", path, doctor_token),
                "history-instance": lambda: gw("GET", f"{path}/_history", doctor_token),
                "history-type": lambda: gw("GET", f"{resource_type}/_history", doctor_token),
                "create": lambda: gw("POST", resource_type, doctor_token, body),
                "search-type": lambda: gw("GET", f"{resource_type}?patient={patient_ref}", doctor_token),
            }[interaction]()
            return status, got

        for resource_type, r in sorted(declared.items()):
            for interaction in sorted(set(TYPE_INTERACTIONS) - interactions(r)):
                status, got = await attempt(resource_type, interaction)
                check(
                    status in REFUSED and (got or {}).get("resourceType") == "OperationOutcome",
                    f"{resource_type} {interaction} (not declared) is refused",
                    (status, got),
                )
        for resource_type in OTHER_TYPES:
            if resource_type in declared:
                continue
            for interaction in ("read", "search-type", "create"):
                status, got = await attempt(resource_type, interaction)
                check(status in (404, 405), f"{resource_type} {interaction} (type not declared)", (status, got))
        for path in (
            f"Observation/{instance.get('Observation')}/$validate",
            "Observation/$lastn",
            f"{patient_ref}/$match",
        ):
            status, got = (await gw("GET", path, doctor_token))[::2]
            check(status in REFUSED, f"{path} (operation not declared)", (status, got))
        for kind, (method, path) in {"search-system": ("GET", "?_id=x"), "history-system": ("GET", "_history")}.items():
            if kind not in system:
                status, _, got = await gw(
                    method,
                    f"{stack.fhir_base}/{path}" if path != "?_id=x" else f"{stack.fhir_base}?_id=x",
                    doctor_token,
                )
                check(status in REFUSED, f"system {kind} (not declared) is refused", (status, got))

        # A FHIR client nobody here wrote reads the same statement.
        fetched = await AsyncFHIRClient(stack.fhir_base).execute("metadata", method="get")
        assert fetched["rest"][0]["resource"] == rest["resource"]

        assert not failures, "claims that do not hold:\n" + "\n".join(failures)
