"""Rotation keeps every ciphertext of every service readable, on OpenBao with each service's own
tokens: records' RotatePatientKey rotates records-patient-<id> alone, so the patient's resource in
identity and break-glass justification in consent (made with associated data, which transit cannot
rewrap) still decrypt; and a rotation the process died in, between rotating and raising the
minimum decryption version, is finished by the next run (records finishes unfinished rotations at
start and every few minutes)."""

from __future__ import annotations

import json
import uuid
from typing import Any

import grpc
import pytest
from medledger.consent.v1 import consent_service_pb2 as co_pb
from medledger.consent.v1 import consent_service_pb2_grpc as co_grpc
from medledger.identity.v1 import identity_service_pb2 as id_pb
from medledger.identity.v1 import identity_service_pb2_grpc as id_grpc
from medledger.records.v1 import records_service_pb2 as pb
from medledger.records.v1 import records_service_pb2_grpc as pb_grpc
from medledger.types.v1 import vocabulary_pb2 as vocab
from sqlalchemy import select

from medledger_consent import break_glass_storage as consent_break_glass_storage
from medledger_devstack.testing import OpenBaoServer, status_of
from medledger_records import storage as records_storage
from medledger_runtime.keys import KeyManager, VaultKeyManager, patient_key_name
from medledger_sdk.channels import make_channel

Kind = vocab.PrincipalKind
JUSTIFICATION = "Unconscious on arrival after a road accident; need allergy and medication history now"


def rid() -> str:
    return str(uuid.uuid4())


async def test_rotating_records_key_leaves_every_services_ciphertexts_readable_and_resumes_after_a_crash(
    start_stack: Any, openbao: OpenBaoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with start_stack(records=True, openbao=openbao) as stack:
        admin_client = stack.admin()
        identity = id_grpc.IdentityServiceStub(admin_client.channel(stack.identity_address, "medledger.identity"))
        public = id_grpc.IdentityServiceStub(make_channel(stack.identity_address))
        fhir = {"resourceType": "Patient", "identifier": [{"system": "urn:oid:1.2.3", "value": uuid.uuid4().hex}]}
        patient = await public.RegisterPatient(
            id_pb.RegisterPatientRequest(request_id=rid(), fhir_patient=json.dumps(fhir).encode())
        )
        patient_id = patient.principal.principal_id
        org = await identity.RegisterPrincipal(
            id_pb.RegisterPrincipalRequest(request_id=rid(), kind=Kind.PRINCIPAL_KIND_ORGANIZATION)
        )
        org_id = org.principal.principal_id
        doctor = await identity.RegisterPrincipal(
            id_pb.RegisterPrincipalRequest(
                request_id=rid(),
                kind=Kind.PRINCIPAL_KIND_PRACTITIONER,
                organization_id=org_id,
                fhir_resource=json.dumps(
                    {"resourceType": "Practitioner", "identifier": [{"system": "urn:npi", "value": uuid.uuid4().hex}]}
                ).encode(),
            )
        )
        doctor_id = doctor.principal.principal_id
        await stack.known_to_consent(patient_id, org_id, doctor_id)

        # One ciphertext of the patient in each service.
        consent_admin = co_grpc.ConsentServiceStub(admin_client.channel(stack.consent_address, "medledger.consent"))
        policy = co_pb.BreakGlassPolicy(organization_id=org_id, enabled=True)
        await consent_admin.SetBreakGlassPolicy(co_pb.SetBreakGlassPolicyRequest(request_id=rid(), policy=policy))
        doctor_consent = co_grpc.ConsentServiceStub(
            stack.client(doctor_id, doctor.client_secret).channel(stack.consent_address, "medledger.consent")
        )
        access = (
            await doctor_consent.BreakGlass(
                co_pb.BreakGlassRequest(
                    request_id=rid(),
                    patient_id=patient_id,
                    reason=co_pb.BreakGlassReason.BREAK_GLASS_REASON_LIFE_THREATENING,
                    justification=JUSTIFICATION,
                )
            )
        ).access
        records_address = f"127.0.0.1:{stack.records.grpc_port}"
        as_patient = pb_grpc.RecordsServiceStub(
            stack.client(patient_id, patient.client_secret).channel(records_address, "medledger.records")
        )
        note = b"blood pressure 120/80"
        record_ids = [
            (
                await as_patient.PutRecord(
                    pb.PutRecordRequest(
                        request_id=rid(),
                        patient_id=patient_id,
                        category=vocab.DataCategory.DATA_CATEGORY_OBSERVATIONS,
                        content=note,
                        media_type="text/plain",
                    )
                )
            ).record_id
            for _ in range(2)
        ]

        async def everything_decrypts() -> None:
            got = await identity.GetPrincipal(
                id_pb.GetPrincipalRequest(principal_id=patient_id, include_fhir_resource=True)
            )
            assert json.loads(got.fhir_resource) == fhir
            found = await consent_admin.GetBreakGlassAccess(
                co_pb.GetBreakGlassAccessRequest(access_id=access.access_id)
            )
            assert found.justification == JUSTIFICATION
            for record_id in record_ids:
                assert (await as_patient.GetRecord(pb.GetRecordRequest(record_id=record_id))).content == note

        await everything_decrypts()
        # Each service's ciphertext is under its own key, in the database.
        async with stack.consent.db.connect() as conn:
            stored = await consent_break_glass_storage.get_access(conn, access.access_id)
        assert stored is not None
        async with stack.records.db.connect() as conn:
            names = set((await conn.execute(select(records_storage.record_versions.c.key_name))).scalars())
        assert names == {patient_key_name("records", patient_id)}

        # The process dies between rotating the key and raising its minimum decryption version.
        admin_records = pb_grpc.RecordsServiceStub(admin_client.channel(records_address, "medledger.records"))
        rotate = pb.RotatePatientKeyRequest(patient_id=patient_id)
        records_keys: KeyManager = stack.records.keys
        real_floor = records_keys.set_min_decryption_version

        async def killed(*args: Any) -> Any:
            raise RuntimeError("killed between rotate and min_decryption_version")

        monkeypatch.setattr(records_keys, "set_min_decryption_version", killed)
        assert await status_of(admin_records.RotatePatientKey(rotate)) == grpc.StatusCode.INTERNAL
        await everything_decrypts()

        # The next run finishes it, without anyone calling again: records finishes unfinished
        # rotations at start (and every few minutes), one pass of which runs here.
        monkeypatch.setattr(records_keys, "set_min_decryption_version", real_floor)
        assert await stack.records.handle.api.finish_unfinished_rotations() == 1
        await everything_decrypts()
        async with VaultKeyManager(openbao.address, token=openbao.root_token) as root:
            info = await root.key_info(patient_key_name("records", patient_id))
            assert (info.latest_version, info.min_decryption_version) == (2, 2)
        async with stack.records.db.connect() as conn:
            wrapped = (await conn.execute(select(records_storage.record_versions.c.wrapped_key))).scalars().all()
        assert len(wrapped) == 2 and all(w.startswith("vault:v2:") for w in wrapped)
        assert await stack.records.handle.api.finish_unfinished_rotations() == 0

        # A rotation that runs through: version 3, both data keys rewrapped, all still readable.
        done = await admin_records.RotatePatientKey(rotate)
        assert (done.key_version, done.rewrapped) == (3, 2)
        await everything_decrypts()
        async with VaultKeyManager(openbao.address, token=openbao.root_token) as root:
            info = await root.key_info(patient_key_name("records", patient_id))
            assert (info.latest_version, info.min_decryption_version) == (3, 3)
            # Records' rotations touched no other service's key.
            for owner in ("identity", "consent"):
                other = await root.key_info(patient_key_name(owner, patient_id))  # type: ignore[arg-type]
                assert (other.latest_version, other.min_decryption_version) == (1, 1)
