"""What the FHIR gateway asks of records, over gRPC on the real stack (PostgreSQL, Tansu, real
tokens, the real consent service): a transaction of one patient's resources (PutRecords) all or
nothing, its references rewritten and its resources stamped with their FHIR identity, retried
safely; If-Match (expected_version) as FAILED_PRECONDITION; a record's history decided by
consent as a read is."""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Any

import grpc
import pytest
import rfc8785
from medledger.consent.v1 import consent_service_pb2 as co_pb
from medledger.consent.v1 import consent_service_pb2_grpc as co_grpc
from medledger.identity.v1 import identity_service_pb2 as id_pb
from medledger.identity.v1 import identity_service_pb2_grpc as id_grpc
from medledger.records.v1 import records_service_pb2 as pb
from medledger.records.v1 import records_service_pb2_grpc as pb_grpc
from medledger.types.v1 import vocabulary_pb2 as vocab

from medledger_devstack.testing import bad_request_fields, status_of
from medledger_sdk.channels import make_channel

CODE = grpc.StatusCode
OBS = vocab.DataCategory.DATA_CATEGORY_OBSERVATIONS
MEDS = vocab.DataCategory.DATA_CATEGORY_MEDICATIONS
TREAT = vocab.PurposeOfUse.PURPOSE_OF_USE_TREAT
READ, WRITE = vocab.Action.ACTION_READ, vocab.Action.ACTION_WRITE
FHIR = "application/fhir+json"


def rid() -> str:
    return str(uuid.uuid4())


async def register(stack: Any) -> dict[str, Any]:
    """A patient, a doctor the patient lets read and write observations, and a stranger."""
    public = id_grpc.IdentityServiceStub(make_channel(stack.identity_address))
    admin = id_grpc.IdentityServiceStub(stack.admin().channel(stack.identity_address, "medledger.identity"))
    fhir = {"resourceType": "Patient", "identifier": [{"system": "urn:oid:1.2.3", "value": uuid.uuid4().hex}]}
    patient = await public.RegisterPatient(
        id_pb.RegisterPatientRequest(request_id=rid(), fhir_patient=json.dumps(fhir).encode())
    )
    org = await admin.RegisterPrincipal(
        id_pb.RegisterPrincipalRequest(request_id=rid(), kind=vocab.PrincipalKind.PRINCIPAL_KIND_ORGANIZATION)
    )
    records_address = f"127.0.0.1:{stack.records.grpc_port}"
    patient_id = patient.principal.principal_id
    out: dict[str, Any] = {"patient_id": patient_id}
    out["patient"] = pb_grpc.RecordsServiceStub(
        stack.client(patient_id, patient.client_secret).channel(records_address, "medledger.records")
    )
    for name in ("doctor", "stranger"):
        reply = await admin.RegisterPrincipal(
            id_pb.RegisterPrincipalRequest(
                request_id=rid(),
                kind=vocab.PrincipalKind.PRINCIPAL_KIND_PRACTITIONER,
                organization_id=org.principal.principal_id,
                fhir_resource=json.dumps(
                    {"resourceType": "Practitioner", "identifier": [{"system": "urn:npi", "value": uuid.uuid4().hex}]}
                ).encode(),
            )
        )
        out[name + "_id"] = reply.principal.principal_id
        out[name] = pb_grpc.RecordsServiceStub(
            stack.client(reply.principal.principal_id, reply.client_secret).channel(
                records_address, "medledger.records"
            )
        )
    await stack.known_to_consent(patient_id, out["doctor_id"], out["stranger_id"])
    consent = co_grpc.ConsentServiceStub(
        stack.client(patient_id, patient.client_secret).channel(stack.consent_address, "medledger.consent")
    )
    await consent.GrantConsent(
        co_pb.GrantConsentRequest(
            request_id=rid(),
            patient_id=patient_id,
            grantee_id=out["doctor_id"],
            provision=co_pb.ProvisionType.PROVISION_TYPE_PERMIT,
            actions=[READ, WRITE],
            categories=[OBS],
            purposes=[TREAT],
        )
    )
    return out


def transaction(patient_id: str, **changes: Any) -> pb.PutRecordsRequest:
    encounter = {
        "resourceType": "Encounter",
        "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "subject": {"reference": "urn:uuid:patient"},
    }
    pulse = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": "heart rate"},
        "subject": {"reference": "urn:uuid:patient"},
        "encounter": {"reference": "urn:uuid:encounter"},
        "valueQuantity": {"value": 72, "unit": "beats/min"},
    }
    base: dict[str, Any] = {
        "request_id": rid(),
        "patient_id": patient_id,
        "records": [
            pb.RecordWrite(
                category=OBS, content=json.dumps(encounter).encode(), media_type=FHIR, full_url="urn:uuid:encounter"
            ),
            pb.RecordWrite(category=OBS, content=json.dumps(pulse).encode(), media_type=FHIR),
        ],
        "references": {"urn:uuid:patient": f"Patient/{patient_id}"},
        "assign_fhir_identity": True,
    }
    return pb.PutRecordsRequest(**{**base, **changes})


def commitment(content: bytes, salt_hex: str) -> str:
    """The README's formula, recomputed here from what GetRecord returned."""
    salt = bytes.fromhex(salt_hex)
    return hashlib.sha256(b"medledger:record:v1\n" + salt + rfc8785.dumps(json.loads(content))).hexdigest()


async def test_a_fhir_transaction_its_history_and_if_match_over_grpc(start_stack) -> None:
    async with start_stack(records=True) as stack:
        p = await register(stack)
        patient_id = p["patient_id"]
        listing = pb.ListRecordsRequest(patient_id=patient_id)

        # A category consent does not permit (medications) refuses the whole transaction.
        denied = transaction(patient_id)
        denied.records.append(
            pb.RecordWrite(
                category=MEDS,
                media_type=FHIR,
                content=json.dumps(
                    {
                        "resourceType": "MedicationStatement",
                        "status": "active",
                        "medicationCodeableConcept": {"text": "x"},
                        "subject": {"reference": "urn:uuid:patient"},
                    }
                ).encode(),
            )
        )
        assert await status_of(p["doctor"].PutRecords(denied)) == CODE.PERMISSION_DENIED
        # A bad third entry: its index named, nothing stored.
        bad = transaction(patient_id)
        bad.records.append(pb.RecordWrite(category=OBS, media_type=FHIR, content=b'{"resourceType": "Observation"}'))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await p["doctor"].PutRecords(bad)
        assert refused.value.code() == CODE.INVALID_ARGUMENT
        fields = bad_request_fields(refused.value)
        assert fields and all(f.startswith("records[2].content") for f in fields)
        assert len((await p["patient"].ListRecords(listing)).records) == 0

        request = transaction(patient_id)
        stored = await p["doctor"].PutRecords(request)
        assert await p["doctor"].PutRecords(request) == stored  # a retry: the same records, once
        assert len((await p["patient"].ListRecords(listing)).records) == 2
        encounter_id, pulse_id = (r.record_id for r in stored.records)
        got = await p["doctor"].GetRecord(pb.GetRecordRequest(record_id=pulse_id, purpose=TREAT))
        pulse = json.loads(got.content)
        assert pulse["id"] == pulse_id.replace("_", "-") and pulse["meta"]["versionId"] == "1"
        assert pulse["encounter"] == {"reference": "Encounter/" + encounter_id.replace("_", "-")}
        assert pulse["subject"] == {"reference": f"Patient/{patient_id}"}
        assert commitment(got.content, got.receipt.salt) == stored.records[1].receipt.commitment

        # If-Match: the version read is the one written on; a stale one is FAILED_PRECONDITION.
        def update(expected: int) -> pb.PutRecordRequest:
            return pb.PutRecordRequest(
                request_id=rid(),
                patient_id=patient_id,
                category=OBS,
                media_type=FHIR,
                content=got.content,
                record_id=pulse_id,
                expected_version=expected,
                assign_fhir_identity=True,
            )

        second = await p["doctor"].PutRecord(update(1))
        assert second.version == 2
        with pytest.raises(grpc.aio.AioRpcError) as stale:
            await p["doctor"].PutRecord(update(1))
        assert stale.value.code() == CODE.FAILED_PRECONDITION and "version 2" in (stale.value.details() or "")

        # History: newest first, decided as a read (the doctor by consent, a stranger refused).
        history = await p["doctor"].ListRecordVersions(
            pb.ListRecordVersionsRequest(record_id=pulse_id, purpose=TREAT, page_size=1)
        )
        assert [v.version for v in history.versions] == [2] and history.decision_id
        assert history.versions[0].receipt.commitment == second.receipt.commitment
        assert history.record.latest_version == 2 and history.record.resource_type == "Observation"
        older = await p["doctor"].ListRecordVersions(
            pb.ListRecordVersionsRequest(record_id=pulse_id, purpose=TREAT, page_token=history.next_page_token)
        )
        assert [v.version for v in older.versions] == [1] and older.next_page_token == ""
        stranger = pb.ListRecordVersionsRequest(record_id=pulse_id, purpose=TREAT)
        assert await status_of(p["stranger"].ListRecordVersions(stranger)) == CODE.PERMISSION_DENIED
        own = await p["patient"].ListRecordVersions(pb.ListRecordVersionsRequest(record_id=pulse_id))
        assert [v.version for v in own.versions] == [2, 1] and own.decision_id == ""
