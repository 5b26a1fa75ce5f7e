"""Consent and AuditEvent through the FHIR gateway, with a FHIR client nobody here wrote (fhirpy):
a patient POSTs a FHIR Consent and their practitioner can read (gRPC GetRecord); the Consent is
read, read by version and searched with paging; an invalid Consent is 422 naming its FHIRPath;
revoking by PUT with status inactive ends the practitioner's access; the patient's AuditEvents
name the practitioner's read, and another patient may not search them."""

from __future__ import annotations

import json
import uuid
from typing import Any

import aiohttp
import grpc
import pytest
from fhirpy import AsyncFHIRClient
from fhirpy.base.exceptions import ForbiddenError, OperationOutcome
from medledger.identity.v1 import identity_service_pb2 as id_pb
from medledger.identity.v1 import identity_service_pb2_grpc as id_grpc
from medledger.records.v1 import records_service_pb2 as rec_pb
from medledger.records.v1 import records_service_pb2_grpc as rec_grpc
from medledger.types.v1 import vocabulary_pb2 as vocab

from medledger_devstack.testing import eventually, status_of
from medledger_sdk.channels import make_channel

OBS = vocab.DataCategory.DATA_CATEGORY_OBSERVATIONS
TREAT = vocab.PurposeOfUse.PURPOSE_OF_USE_TREAT


def rid() -> str:
    return str(uuid.uuid4())


def as_fhir(principal_id: str) -> str:
    return principal_id.replace("_", "-", 1)


def consent_for(patient_id: str, actor: str, *, purpose: str = "TREAT") -> dict[str, Any]:
    """A FHIR R4 Consent as an app writes one: the patient lets `actor` read their observations."""
    return {
        "resourceType": "Consent",
        "status": "active",
        "scope": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]
        },
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": f"Patient/{as_fhir(patient_id)}"},
        "provision": {
            "type": "permit",
            "actor": [
                {
                    "role": {
                        "coding": [
                            {"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "IRCP"}
                        ]
                    },
                    "reference": {"reference": actor},
                }
            ],
            "action": [
                {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentaction", "code": "access"}]}
            ],
            "purpose": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": purpose}],
            "class": [{"system": "http://hl7.org/fhir/resource-types", "code": "Observation"}],
        },
    }


async def register_patient(public: id_grpc.IdentityServiceStub) -> Any:
    fhir = {"resourceType": "Patient", "identifier": [{"system": "urn:oid:1.2.3", "value": uuid.uuid4().hex}]}
    return await public.RegisterPatient(
        id_pb.RegisterPatientRequest(request_id=rid(), fhir_patient=json.dumps(fhir).encode())
    )


async def test_a_fhir_consent_grants_is_searched_revoked_and_the_patient_sees_who_read(start_stack) -> None:
    async with start_stack(records=True, audit=True, fhir=True) as stack:
        assert stack.records is not None
        base = stack.fhir_base
        public = id_grpc.IdentityServiceStub(make_channel(stack.identity_address))
        admin = id_grpc.IdentityServiceStub(stack.admin().channel(stack.identity_address, "medledger.identity"))
        patient, other = await register_patient(public), await register_patient(public)
        patient_id = patient.principal.principal_id
        org = await admin.RegisterPrincipal(
            id_pb.RegisterPrincipalRequest(request_id=rid(), kind=vocab.PrincipalKind.PRINCIPAL_KIND_ORGANIZATION)
        )
        doctor = await admin.RegisterPrincipal(
            id_pb.RegisterPrincipalRequest(
                request_id=rid(),
                kind=vocab.PrincipalKind.PRINCIPAL_KIND_PRACTITIONER,
                organization_id=org.principal.principal_id,
                fhir_resource=json.dumps(
                    {"resourceType": "Practitioner", "identifier": [{"system": "urn:npi", "value": uuid.uuid4().hex}]}
                ).encode(),
            )
        )
        doctor_id, org_id = doctor.principal.principal_id, org.principal.principal_id
        await stack.known_to_consent(patient_id, doctor_id, org_id)
        records_address = f"127.0.0.1:{stack.records.grpc_port}"
        patient_login = stack.client(patient_id, patient.client_secret)
        doctor_records = rec_grpc.RecordsServiceStub(
            stack.client(doctor_id, doctor.client_secret).channel(records_address, "medledger.records")
        )
        observation = {"resourceType": "Observation", "status": "final", "code": {"text": "heart rate"}}
        stored = await rec_grpc.RecordsServiceStub(
            patient_login.channel(records_address, "medledger.records")
        ).PutRecord(
            rec_pb.PutRecordRequest(
                request_id=rid(),
                patient_id=patient_id,
                category=OBS,
                content=json.dumps(observation).encode(),
                media_type="application/fhir+json",
            )
        )
        read = rec_pb.GetRecordRequest(record_id=stored.record_id, purpose=TREAT)
        assert await status_of(doctor_records.GetRecord(read)) == grpc.StatusCode.PERMISSION_DENIED

        token = await patient_login.token("medledger.fhir")
        fhir = AsyncFHIRClient(base, authorization=f"Bearer {token}")
        other_token = await stack.client(other.principal.principal_id, other.client_secret).token("medledger.fhir")
        other_fhir = AsyncFHIRClient(base, authorization=f"Bearer {other_token}")
        me = f"Patient/{as_fhir(patient_id)}"

        # An invalid Consent: 422 naming where, and nothing granted.
        bad = consent_for(patient_id, f"Practitioner/{as_fhir(doctor_id)}")
        bad["provision"]["actor"].append({**bad["provision"]["actor"][0]})
        bad["provision"]["purpose"] = [{"code": "SHOPPING"}]
        with pytest.raises(OperationOutcome) as caught:
            await fhir.resource("Consent", **bad).create()
        (issue,) = caught.value.resource["issue"]
        assert set(issue["expression"]) == {"Consent.provision.actor", "Consent.provision.purpose[0]"}
        assert await fhir.resources("Consent").search(patient=me).count() == 0

        # A valid one grants: the practitioner reads the record now.
        granted = fhir.resource("Consent", **consent_for(patient_id, f"Practitioner/{as_fhir(doctor_id)}"))
        await granted.create()
        assert granted["id"].startswith("cns-") and granted["id"].endswith("-v1") and granted["status"] == "active"
        assert granted["provision"]["actor"][0]["reference"]["identifier"]["value"] == doctor_id
        got = await doctor_records.GetRecord(read)
        assert json.loads(got.content) == observation

        # Read: by its version id, by the consent's own id (the latest), and by version.
        logical = granted["id"].removesuffix("-v1")
        assert (await fhir.reference("Consent", granted["id"]).to_resource()).serialize() == granted.serialize()
        assert (await fhir.reference("Consent", logical).to_resource())["meta"]["versionId"] == "1"
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http:
            async with http.get(f"{base}/Consent/{logical}/_history/1") as response:
                assert response.status == 200 and response.headers["ETag"] == 'W/"1"'
            async with http.get(f"{base}/Consent/{logical}/_history/2") as response:
                assert response.status == 404
            # Revoking is an update; DELETE is not offered.
            async with http.delete(f"{base}/Consent/{logical}") as response:
                assert response.status == 405 and (await response.json(content_type=None))["resourceType"] == (
                    "OperationOutcome"
                )

        # Search, paged: a second consent (to the organization), one a page.
        second = fhir.resource(
            "Consent", **consent_for(patient_id, f"Organization/{as_fhir(org_id)}", purpose="HOPERAT")
        )
        await second.create()
        pages = fhir.resources("Consent").search(patient=me).limit(1)
        first_page = await pages.fetch_raw()
        assert first_page["total"] == 2 and len(first_page["entry"]) == 1
        assert any(link["relation"] == "next" for link in first_page["link"])
        assert sorted(c["id"] for c in await pages.fetch_all()) == sorted([granted["id"], second["id"]])
        # Another patient does not list mine.
        with pytest.raises(ForbiddenError):
            await other_fhir.resources("Consent").search(patient=me).fetch()

        # Revoke: the Consent PUT back with status inactive is a new, inactive version.
        stale = granted.serialize()
        granted["status"] = "inactive"
        await granted.save()
        assert granted["id"] == f"{logical}-v2" and granted["status"] == "inactive"
        assert await status_of(doctor_records.GetRecord(read)) == grpc.StatusCode.PERMISSION_DENIED
        active = await fhir.resources("Consent").search(patient=me, status="active").fetch_all()
        assert [c["id"] for c in active] == [second["id"]]
        inactive = await fhir.resources("Consent").search(patient=me, status="inactive").fetch_all()
        assert [c["id"] for c in inactive] == [granted["id"]]
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http:
            # A stale copy: 412. Changed terms: 422.
            stale_put = {**stale, "status": "inactive"}
            headers = {"Content-Type": "application/fhir+json", "If-Match": 'W/"1"'}
            async with http.put(f"{base}/Consent/{logical}", json=stale_put, headers=headers) as response:
                assert response.status == 412
            changed = {**second.serialize(), "provision": {**second["provision"], "type": "deny"}}
            async with http.put(f"{base}/Consent/{second['id']}", json=changed, headers={}) as response:
                assert response.status == 422
                assert (await response.json(content_type=None))["issue"][0]["expression"] == ["Consent.provision"]

        # Who saw my data: the practitioner's read, in the patient's AuditEvents (the log is
        # appended from Kafka, so it comes shortly).
        async def doctors_read() -> list[Any]:
            events = await fhir.resources("AuditEvent").search(patient=me, subtype="record.disclosed").fetch_all()
            return [e for e in events if e["agent"][0]["who"].get("identifier", {}).get("value") == doctor_id]

        (seen,) = await eventually(doctors_read, "the practitioner's read in the patient's AuditEvents")
        assert seen["action"] == "R" and seen["id"].startswith("entry-")
        assert {"identifier": {"system": "urn:medledger:record", "value": stored.record_id}} in [
            e["what"] for e in seen["entity"]
        ]
        # Paged with _count and next links, oldest first; the patient's own by default.
        one = await fhir.resources("AuditEvent").search(patient=me).limit(1).fetch_raw()
        assert len(one["entry"]) == 1 and any(link["relation"] == "next" for link in one["link"])
        everything = await fhir.resources("AuditEvent").limit(2).fetch_all()
        ids = [int(e["id"].removeprefix("entry-")) for e in everything]
        assert ids == sorted(ids) and seen["id"] in [e["id"] for e in everything]
        # Another patient may not read mine.
        with pytest.raises(ForbiddenError):
            await other_fhir.resources("AuditEvent").search(patient=me).fetch()

        # X-Request-Id makes a retry safe for its caller only: the patient's retry is the first
        # grant again, and another patient sending the same header value grants their own.
        other_id = other.principal.principal_id
        await stack.known_to_consent(other_id)
        header = {"Content-Type": "application/fhir+json", "X-Request-Id": "consent-retry-1"}
        created = []
        for bearer, who in ((token, patient_id), (token, patient_id), (other_token, other_id)):
            async with (
                aiohttp.ClientSession(headers={"Authorization": f"Bearer {bearer}"}) as http,
                http.post(
                    f"{base}/Consent",
                    json=consent_for(who, f"Practitioner/{as_fhir(doctor_id)}", purpose="HRESCH"),
                    headers=header,
                ) as response,
            ):
                assert response.status == 201, await response.text()
                created.append((await response.json(content_type=None))["id"])
        assert created[0] == created[1] != created[2]
        research = await fhir.resources("Consent").search(patient=me, status="active").fetch_all()
        assert sorted(c["id"] for c in research) == sorted([second["id"], created[0]])

        # The CapabilityStatement says so.
        async with aiohttp.ClientSession() as http, http.get(f"{base}/metadata") as response:
            statement = await response.json(content_type=None)
        served = {r["type"]: {i["code"] for i in r["interaction"]} for r in statement["rest"][0]["resource"]}
        assert served["Consent"] == {"read", "vread", "update", "create", "search-type"}
        assert served["AuditEvent"] == {"search-type"}
