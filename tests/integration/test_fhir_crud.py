"""FHIR REST on records through real FHIR clients nobody here wrote (fhirpy, async; fhirclient,
SMART's own, sync in a thread): create, read, vread, update with ETags, history, Provenance and
Patient read; consent deciding every practitioner's read (403 with consent's reason code, then
permitted, then revoked); an erased patient's data as 410."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import aiohttp
import pytest
from fhirclient.models.observation import Observation
from fhirclient.models.patient import Patient
from fhirclient.server import FHIRServer
from fhirpy import AsyncFHIRClient
from fhirpy.base.exceptions import ForbiddenError
from medledger.consent.v1 import consent_service_pb2 as co_pb
from medledger.consent.v1 import consent_service_pb2_grpc as co_grpc
from medledger.identity.v1 import identity_service_pb2 as id_pb
from medledger.identity.v1 import identity_service_pb2_grpc as id_grpc
from medledger.records.v1 import records_service_pb2 as pb
from medledger.records.v1 import records_service_pb2_grpc as pb_grpc
from medledger.types.v1 import vocabulary_pb2 as vocab
from multidict import CIMultiDict

from medledger_devstack.testing import eventually
from medledger_fhir.ids import fhir_id
from medledger_fhir.ids import service_id as record_id_of
from medledger_sdk.channels import make_channel

Kind = vocab.PrincipalKind
OBS, DEMOGRAPHICS = vocab.DataCategory.DATA_CATEGORY_OBSERVATIONS, vocab.DataCategory.DATA_CATEGORY_DEMOGRAPHICS
TREAT = vocab.PurposeOfUse.PURPOSE_OF_USE_TREAT
READ, WRITE = vocab.Action.ACTION_READ, vocab.Action.ACTION_WRITE
FHIR_JSON = "application/fhir+json"


def rid() -> str:
    return str(uuid.uuid4())


async def cast(stack: Any) -> dict[str, Any]:
    """A patient with a Patient resource, a doctor of a hospital and a privacy officer; each
    with a token for the gateway, and the patient's consent and records stubs."""
    public = id_grpc.IdentityServiceStub(make_channel(stack.identity_address))
    admin = id_grpc.IdentityServiceStub(stack.admin().channel(stack.identity_address, "medledger.identity"))
    family = f"Rivera-{uuid.uuid4().hex[:6]}"
    fhir = {
        "resourceType": "Patient",
        "identifier": [{"system": "urn:oid:1.2.3", "value": uuid.uuid4().hex}],
        "name": [{"family": family, "given": ["Ana"]}],
        "birthDate": "1984-03-02",
    }
    patient = await public.RegisterPatient(
        id_pb.RegisterPatientRequest(request_id=rid(), fhir_patient=json.dumps(fhir).encode())
    )
    org = await admin.RegisterPrincipal(
        id_pb.RegisterPrincipalRequest(request_id=rid(), kind=Kind.PRINCIPAL_KIND_ORGANIZATION)
    )
    people: dict[str, Any] = {"patient": patient}
    for name in ("doctor", "officer"):
        people[name] = await admin.RegisterPrincipal(
            id_pb.RegisterPrincipalRequest(
                request_id=rid(),
                kind=Kind.PRINCIPAL_KIND_PRACTITIONER,
                organization_id=org.principal.principal_id,
                fhir_resource=json.dumps(
                    {"resourceType": "Practitioner", "identifier": [{"system": "urn:npi", "value": uuid.uuid4().hex}]}
                ).encode(),
            )
        )
    await admin.AssignRole(
        id_pb.AssignRoleRequest(
            request_id=rid(),
            principal_id=people["officer"].principal.principal_id,
            role=vocab.Role.ROLE_PRIVACY_OFFICER,
        )
    )
    out: dict[str, Any] = {"family": family}
    for name, reply in people.items():
        client = stack.client(reply.principal.principal_id, reply.client_secret)
        out[f"{name}_id"] = reply.principal.principal_id
        out[f"{name}_token"] = await client.token("medledger.fhir")
        out[f"{name}_records"] = pb_grpc.RecordsServiceStub(
            client.channel(f"127.0.0.1:{stack.records.grpc_port}", "medledger.records")
        )
    patient_client = stack.client(patient.principal.principal_id, patient.client_secret)
    out["consent"] = co_grpc.ConsentServiceStub(patient_client.channel(stack.consent_address, "medledger.consent"))
    await stack.known_to_consent(out["patient_id"], out["doctor_id"], out["officer_id"])
    return out


def observation(patient_id: str, **fields: Any) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4", "display": "Heart rate"}]},
        "subject": {"reference": f"Patient/{fhir_id(patient_id)}"},
        "valueQuantity": {"value": 72, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"},
        **fields,
    }


async def call(
    method: str, url: str, token: str, body: Any = None, **headers: str
) -> tuple[int, CIMultiDict[str], bytes]:
    """One raw HTTP exchange, for what the clients hide (statuses, headers, exact bytes)."""
    sent = {"Authorization": f"Bearer {token}", **headers}
    data = None
    if body is not None:
        sent.setdefault("Content-Type", FHIR_JSON)
        data = json.dumps(body).encode()
    async with aiohttp.ClientSession() as http, http.request(method, url, headers=sent, data=data) as response:
        # Header names are case-insensitive (aiohttp sends `Etag`).
        return response.status, CIMultiDict(response.headers), await response.read()


def fhirclient_server(base: str, token: str) -> FHIRServer:
    server = FHIRServer(None, base_uri=base)
    server.session.headers["Authorization"] = f"Bearer {token}"
    return server


def reason_of(outcome: bytes) -> str:
    body = json.loads(outcome)
    assert body["resourceType"] == "OperationOutcome"
    return str(body["issue"][0]["details"]["coding"][0]["code"])


async def test_create_read_update_history_through_fhirpy_and_fhirclient(start_stack: Any) -> None:
    async with start_stack(records=True, audit=True, fhir=True) as stack:
        c = await cast(stack)
        base, token, patient_id = stack.fhir_base, c["patient_token"], c["patient_id"]
        fhirpy = AsyncFHIRClient(base, authorization=f"Bearer {token}")

        # Create through fhirpy: the answer is the resource as committed, id and meta assigned.
        obs = fhirpy.resource("Observation", **observation(patient_id))
        await obs.save()
        record_id = obs.id
        assert record_id and obs["meta"]["versionId"] == "1" and obs["meta"]["lastUpdated"]
        # The raw read: the bytes committed, with ETag, Last-Modified, Content-Location.
        status, headers, raw = await call("GET", f"{base}/Observation/{record_id}", token)
        assert status == 200 and headers["Content-Type"].startswith(FHIR_JSON)
        assert headers["ETag"] == 'W/"1"' and headers["Last-Modified"].endswith(" GMT")
        assert headers["Content-Location"] == f"{base}/Observation/{record_id}/_history/1"
        assert json.loads(raw) == dict(obs.serialize())
        committed = await c["patient_records"].GetRecord(pb.GetRecordRequest(record_id=record_id_of(record_id)))
        assert committed.content == raw  # what the receipt proves is what FHIR answered

        # Read through fhirclient (SMART's client; sync, so in a thread).
        server = fhirclient_server(base, token)
        read = await asyncio.to_thread(Observation.read, record_id, server)
        assert read.id == record_id and read.status == "final" and read.valueQuantity.value == 72

        # Update with If-Match: a new version; the same stale ETag again is 412.
        update = AsyncFHIRClient(base, authorization=f"Bearer {token}", extra_headers={"If-Match": 'W/"1"'})
        amended = update.resource("Observation", **{**dict(obs.serialize()), "status": "amended"})
        await amended.save()
        assert amended.id == record_id and amended["meta"]["versionId"] == "2" and amended["status"] == "amended"
        stale = {**dict(amended.serialize()), "status": "corrected"}
        status, _, outcome = await call("PUT", f"{base}/Observation/{record_id}", token, stale, **{"If-Match": 'W/"1"'})
        assert status == 412 and json.loads(outcome)["resourceType"] == "OperationOutcome"
        # Another id in the body than in the URL: 400; invalid FHIR: 422 with the FHIRPath.
        status, _, _ = await call("PUT", f"{base}/Observation/{record_id}", token, {**stale, "id": "rec_other"})
        assert status == 400
        status, _, outcome = await call("POST", f"{base}/Observation", token, observation(patient_id, status=5))
        assert status == 422 and json.loads(outcome)["issue"][0]["expression"] == ["Observation.status"]

        # A purpose that is no HL7 code is refused before anything is written (history: 2 versions).
        status, _, _ = await call(
            "PUT", f"{base}/Observation/{record_id}", token, stale, **{"X-Purpose-Of-Use": "CURIOSITY"}
        )
        assert status == 400
        # vread of the first version through fhirclient; the record under another type: 404.
        first = await asyncio.to_thread(Observation.read_from, f"Observation/{record_id}/_history/1", server)
        assert first.status == "final" and first.meta.versionId == "1"
        status, _, _ = await call("GET", f"{base}/Condition/{record_id}", token)
        assert status == 404

        # Instance history, newest first, a page at a time along the next link.
        status, _, page = await call("GET", f"{base}/Observation/{record_id}/_history?_count=1", token)
        bundle = json.loads(page)
        assert status == 200 and bundle["type"] == "history" and bundle["total"] == 2
        assert [e["resource"]["meta"]["versionId"] for e in bundle["entry"]] == ["2"]
        assert bundle["entry"][0]["request"] == {"method": "PUT", "url": f"Observation/{record_id}"}
        (next_url,) = [link["url"] for link in bundle["link"] if link["relation"] == "next"]
        status, _, page = await call("GET", next_url, token)
        older = json.loads(page)
        assert [e["resource"]["status"] for e in older["entry"]] == ["final"]
        assert older["entry"][0]["response"]["etag"] == 'W/"1"' and not any(
            link["relation"] == "next" for link in older["link"]
        )

        # The Provenance of version 2: who wrote it, pointing at that version.
        status, _, prov = await call("GET", f"{base}/Provenance/{record_id}-2", token)
        provenance = json.loads(prov)
        assert status == 200 and provenance["id"] == f"{record_id}-2"
        assert provenance["target"][0]["reference"] == f"Observation/{record_id}/_history/2"
        assert provenance["agent"][0]["who"]["identifier"]["value"] == patient_id

        # Conditional create: an identifier already there answers it (200, no write).
        identified = observation(patient_id, identifier=[{"system": "urn:lab", "value": "A-17"}])
        status, headers, _ = await call("POST", f"{base}/Observation", token, identified)
        assert status == 201
        location = headers["Location"]
        status, headers, body = await call(
            "POST", f"{base}/Observation", token, identified, **{"If-None-Exist": "identifier=urn:lab|A-17"}
        )
        assert (
            status == 200 and headers["Location"] == location and json.loads(body)["identifier"][0]["value"] == "A-17"
        )
        # return=minimal: no body; a retry with the same X-Request-Id is the same write.
        minimal = {"Prefer": "return=minimal", "X-Request-Id": rid()}
        status, headers, body = await call("POST", f"{base}/Observation", token, observation(patient_id), **minimal)
        assert status == 201 and body == b"" and headers["ETag"] == 'W/"1"'
        again = await call("POST", f"{base}/Observation", token, observation(patient_id), **minimal)
        assert again[0] == 201 and again[1]["Location"] == headers["Location"]

        # The patient reads their own Patient resource through fhirclient.
        me = await asyncio.to_thread(Patient.read, fhir_id(patient_id), server)
        assert me.id == fhir_id(patient_id) and me.name[0].family == c["family"] and me.meta.versionId


async def grant(c: dict[str, Any], categories: list[int]) -> str:
    granted = await c["consent"].GrantConsent(
        co_pb.GrantConsentRequest(
            request_id=rid(),
            patient_id=c["patient_id"],
            grantee_id=c["doctor_id"],
            provision=co_pb.ProvisionType.PROVISION_TYPE_PERMIT,
            actions=[READ, WRITE],
            categories=categories,
            purposes=[TREAT],
        )
    )
    return str(granted.consent.consent_id)


async def test_consent_decides_a_practitioners_reads_403_then_permitted_then_revoked(start_stack: Any) -> None:
    async with start_stack(records=True, audit=True, fhir=True) as stack:
        c = await cast(stack)
        base, patient_id = stack.fhir_base, c["patient_id"]
        mine = AsyncFHIRClient(base, authorization=f"Bearer {c['patient_token']}")
        obs = mine.resource("Observation", **observation(patient_id))
        await obs.save()
        url = f"{base}/Observation/{obs.id}"

        # Without consent: 403 as an OperationOutcome naming consent's reason, to both clients.
        doctor = AsyncFHIRClient(base, authorization=f"Bearer {c['doctor_token']}")
        with pytest.raises(ForbiddenError):
            await doctor.get("Observation", obs.id)
        status, _, outcome = await call("GET", url, c["doctor_token"])
        assert status == 403 and reason_of(outcome) in {"NO_MATCHING_GRANTEE", "NO_CONSENT_FOR_PATIENT"}
        status, _, outcome = await call("GET", f"{base}/Patient/{fhir_id(patient_id)}", c["doctor_token"])
        assert status == 403 and json.loads(outcome)["resourceType"] == "OperationOutcome"

        # Consent for observations and demographics, for treatment: the doctor reads and writes.
        consent_id = await grant(c, [OBS, DEMOGRAPHICS])
        server = fhirclient_server(base, c["doctor_token"])
        read = await asyncio.to_thread(Observation.read, obs.id, server)
        assert read.id == obs.id and read.status == "final"
        patient = await asyncio.to_thread(Patient.read, fhir_id(patient_id), server)
        assert patient.name[0].family == c["family"]
        theirs = doctor.resource("Observation", **{**dict(obs.serialize()), "status": "amended"})
        await theirs.save()
        assert theirs["meta"]["versionId"] == "2"
        status, _, prov = await call("GET", f"{base}/Provenance/{obs.id}-2", c["doctor_token"])
        assert status == 200 and json.loads(prov)["agent"][0]["who"]["type"] == "Practitioner"
        # Another purpose than the consent's (research): refused, with consent's reason.
        status, _, outcome = await call("GET", url, c["doctor_token"], **{"X-Purpose-Of-Use": "HRESCH"})
        assert status == 403 and reason_of(outcome) == "PURPOSE_NOT_COVERED"
        status, _, _ = await call("GET", url, c["doctor_token"], **{"X-Purpose-Of-Use": "NOPE"})
        assert status == 400

        # Revoked: refused again, naming the revocation.
        await c["consent"].RevokeConsent(co_pb.RevokeConsentRequest(request_id=rid(), consent_id=consent_id))

        async def refused() -> bool:
            status, _, outcome = await call("GET", url, c["doctor_token"])
            return status == 403 and reason_of(outcome) == "REVOKED"

        await eventually(refused, "the revocation to refuse the doctor", within=20)


async def test_an_erased_patients_resources_are_gone_410(start_stack: Any) -> None:
    async with start_stack(records=True, audit=True, fhir=True) as stack:
        c = await cast(stack)
        base, patient_id = stack.fhir_base, c["patient_id"]
        mine = AsyncFHIRClient(base, authorization=f"Bearer {c['patient_token']}")
        obs = mine.resource("Observation", **observation(patient_id))
        await obs.save()
        await grant(c, [OBS, DEMOGRAPHICS])
        status, _, _ = await call("GET", f"{base}/Observation/{obs.id}", c["doctor_token"])
        assert status == 200

        pending = (
            await c["patient_records"].RequestErasure(
                pb.RequestErasureRequest(request_id=rid(), patient_id=patient_id, reason="leaving")
            )
        ).erasure
        await c["officer_records"].ApproveErasure(pb.ApproveErasureRequest(erasure_id=pending.erasure_id))

        async def gone() -> bool:
            status, _, outcome = await call("GET", f"{base}/Observation/{obs.id}", c["doctor_token"])
            return status == 410 and json.loads(outcome)["issue"][0]["code"] == "deleted"

        await eventually(gone, "the erasure to make the record gone", within=30)
        for path in (f"Observation/{obs.id}/_history/1", f"Observation/{obs.id}/_history", f"Provenance/{obs.id}-1"):
            status, _, _ = await call("GET", f"{base}/{path}", c["doctor_token"])
            assert status == 410, path

        async def patient_gone() -> bool:
            status, _, _ = await call("GET", f"{base}/Patient/{fhir_id(patient_id)}", c["patient_token"])
            return status == 410

        await eventually(patient_gone, "identity to shred the patient's resource", within=30)
        # Nothing new is filed under an erased patient.
        status, _, _ = await call("POST", f"{base}/Observation", c["patient_token"], observation(patient_id))
        assert status == 410
