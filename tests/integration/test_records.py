"""Records end to end on PostgreSQL, Tansu, real tokens and consent: a FHIR resource and a
document round trip, consent decides every read and every practitioner's write, the stored bytes
hold no plaintext, tampering is DATA_LOSS, the receipt's commitment recomputes from what get
returned, and bad input changes nothing."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import time
import uuid
from typing import Any

import grpc
import pytest
import rfc8785
from medledger.consent.v1 import consent_service_pb2 as co_pb
from medledger.consent.v1 import consent_service_pb2_grpc as co_grpc
from medledger.events.v1 import records_events_pb2
from medledger.identity.v1 import identity_service_pb2 as id_pb
from medledger.identity.v1 import identity_service_pb2_grpc as id_grpc
from medledger.records.v1 import records_service_pb2 as pb
from medledger.records.v1 import records_service_pb2_grpc as pb_grpc
from medledger.types.v1 import vocabulary_pb2 as vocab
from sqlalchemy import func, select, update

from medledger_devstack import synthetic
from medledger_devstack.testing import bad_request_fields, status_of
from medledger_records import erasure_storage, key_storage, storage
from medledger_runtime.errors import NotFound
from medledger_runtime.events import decode, unpack
from medledger_runtime.outbox import outbox
from medledger_runtime.timestamps import timestamp
from medledger_sdk.channels import make_channel

Kind = vocab.PrincipalKind
CODE = grpc.StatusCode
OBS = vocab.DataCategory.DATA_CATEGORY_OBSERVATIONS
DOCS = vocab.DataCategory.DATA_CATEGORY_DOCUMENTS
TREAT = vocab.PurposeOfUse.PURPOSE_OF_USE_TREAT
READ, WRITE = vocab.Action.ACTION_READ, vocab.Action.ACTION_WRITE


def rid() -> str:
    return str(uuid.uuid4())


def observation() -> dict[str, Any]:
    """The first Observation of the seeded synthetic patients."""
    return synthetic.population().first("Observation")


async def people(stack: Any) -> dict[str, Any]:
    public = id_grpc.IdentityServiceStub(make_channel(stack.identity_address))
    admin = id_grpc.IdentityServiceStub(stack.admin().channel(stack.identity_address, "medledger.identity"))
    fhir = {"resourceType": "Patient", "identifier": [{"system": "urn:oid:1.2.3", "value": uuid.uuid4().hex}]}
    patient = await public.RegisterPatient(
        id_pb.RegisterPatientRequest(request_id=rid(), fhir_patient=json.dumps(fhir).encode())
    )
    org = await admin.RegisterPrincipal(
        id_pb.RegisterPrincipalRequest(request_id=rid(), kind=Kind.PRINCIPAL_KIND_ORGANIZATION)
    )
    out: dict[str, Any] = {"patient_id": patient.principal.principal_id}
    records_address = f"127.0.0.1:{stack.records.grpc_port}"
    out["patient"] = pb_grpc.RecordsServiceStub(
        stack.client(patient.principal.principal_id, patient.client_secret).channel(
            records_address, "medledger.records"
        )
    )
    out["consent"] = co_grpc.ConsentServiceStub(
        stack.client(patient.principal.principal_id, patient.client_secret).channel(
            stack.consent_address, "medledger.consent"
        )
    )
    for name in ("doctor", "stranger"):
        practitioner = {
            "resourceType": "Practitioner",
            "identifier": [{"system": "urn:npi", "value": uuid.uuid4().hex}],
        }
        reply = await admin.RegisterPrincipal(
            id_pb.RegisterPrincipalRequest(
                request_id=rid(),
                kind=Kind.PRINCIPAL_KIND_PRACTITIONER,
                organization_id=org.principal.principal_id,
                fhir_resource=json.dumps(practitioner).encode(),
            )
        )
        out[name + "_id"] = reply.principal.principal_id
        out[name] = pb_grpc.RecordsServiceStub(
            stack.client(reply.principal.principal_id, reply.client_secret).channel(
                records_address, "medledger.records"
            )
        )
    await stack.known_to_consent(out["patient_id"], out["doctor_id"], out["stranger_id"])
    return out


async def test_records_round_trip_under_consent_encrypted_and_provable(start_stack) -> None:
    async with start_stack(records=True) as stack:
        p = await people(stack)
        resource = observation()
        content = json.dumps(resource).encode()

        def put(**fields: Any) -> pb.PutRecordRequest:
            base = {
                "request_id": rid(),
                "patient_id": p["patient_id"],
                "category": OBS,
                "content": content,
                "media_type": "application/fhir+json",
            }
            return pb.PutRecordRequest(**{**base, **fields})

        # Without the patient's consent a doctor can neither write nor read.
        assert await status_of(p["doctor"].PutRecord(put())) == CODE.PERMISSION_DENIED
        stored = await p["patient"].PutRecord(put())  # a patient writes their own records
        assert stored.version == 1 and len(bytes.fromhex(stored.receipt.salt)) == 32
        get = pb.GetRecordRequest(record_id=stored.record_id, purpose=TREAT)
        assert await status_of(p["doctor"].GetRecord(get)) == CODE.PERMISSION_DENIED

        granted = await p["consent"].GrantConsent(
            co_pb.GrantConsentRequest(
                request_id=rid(),
                patient_id=p["patient_id"],
                grantee_id=p["doctor_id"],
                provision=co_pb.ProvisionType.PROVISION_TYPE_PERMIT,
                actions=[READ, WRITE],
                categories=[OBS],
                purposes=[TREAT],
            )
        )
        got = await p["doctor"].GetRecord(get)
        assert json.loads(got.content) == resource and got.decision_id.startswith("dec_")
        # The receipt's commitment recomputes from what get returned and the salt.
        salt = bytes.fromhex(got.receipt.salt)
        expected = hashlib.sha256(b"medledger:record:v1\n" + salt + rfc8785.dumps(json.loads(got.content))).hexdigest()
        assert got.receipt.commitment == expected == stored.receipt.commitment
        assert await status_of(p["stranger"].GetRecord(get)) == CODE.PERMISSION_DENIED

        # A new version by the doctor; a retried put makes no second one.
        retry = put(record_id=stored.record_id)
        second = await p["doctor"].PutRecord(retry)
        again = await p["doctor"].PutRecord(retry)
        assert second.version == again.version == 2 and second.receipt == again.receipt
        # A document round trips too.
        pdf = b"%PDF-1.7 " + uuid.uuid4().bytes * 100
        document = await p["patient"].PutRecord(put(content=pdf, media_type="application/pdf", category=DOCS))
        own = await p["patient"].GetRecord(pb.GetRecordRequest(record_id=document.record_id))
        assert own.content == pdf and own.decision_id == ""

        # Bad input: invalid FHIR, oversize, unknown category; nothing stored, no event.
        async with stack.records.db.connect() as conn:
            versions = (await conn.execute(select(func.count()).select_from(storage.record_versions))).scalar_one()
            events = (await conn.execute(select(func.count()).select_from(outbox))).scalar_one()
        invalid = dict(resource, status=5)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await p["patient"].PutRecord(put(content=json.dumps(invalid).encode()))
        assert refused.value.code() == CODE.INVALID_ARGUMENT
        assert bad_request_fields(refused.value) == ["content.status"]  # the problem, in the details
        assert await status_of(p["patient"].PutRecord(put(content=b'{"a": 1, "a": 2}'))) == CODE.INVALID_ARGUMENT
        big = b"x" * (4 * 1024 * 1024 + 1)
        assert (
            await status_of(p["patient"].PutRecord(put(content=big, media_type="text/plain")))
            == CODE.RESOURCE_EXHAUSTED
        )
        assert await status_of(p["patient"].PutRecord(put(category=0))) == CODE.INVALID_ARGUMENT
        async with stack.records.db.connect() as conn:
            assert (
                await conn.execute(select(func.count()).select_from(storage.record_versions))
            ).scalar_one() == versions
            assert (await conn.execute(select(func.count()).select_from(outbox))).scalar_one() == events
            rows = (await conn.execute(select(storage.record_versions))).all()
            published = [bytes(r.value) for r in await conn.execute(select(outbox.c.value))]
        # No plaintext fragment in what is stored or sent.
        fragment = json.dumps(resource["code"]).encode()[:40]
        for row in rows:
            assert fragment not in bytes(row.ciphertext) and b"%PDF" not in bytes(row.ciphertext)
        assert all(fragment not in value for value in published)
        kinds = {decode(value).type for value in published}
        assert {
            records_events_pb2.RecordStored.DESCRIPTOR.full_name,
            records_events_pb2.RecordDisclosed.DESCRIPTOR.full_name,
            records_events_pb2.RecordAccessDenied.DESCRIPTOR.full_name,
        } <= kinds
        disclosed = [
            unpack(e, records_events_pb2.RecordDisclosed)
            for e in map(decode, published)
            if e.type == records_events_pb2.RecordDisclosed.DESCRIPTOR.full_name
        ]
        assert any(d.decision_id == got.decision_id and d.actor_id == p["doctor_id"] for d in disclosed)

        # A flipped byte in the ciphertext is DATA_LOSS, never data.
        c = storage.record_versions.c
        row = next(r for r in rows if r.record_id == stored.record_id and r.version == 1)
        flipped = bytearray(row.ciphertext)
        flipped[20] ^= 1
        async with stack.records.db.transaction() as conn:
            await conn.execute(
                update(storage.record_versions)
                .where(c.record_id == stored.record_id, c.version == 1)
                .values(ciphertext=bytes(flipped))
            )
        one = pb.GetRecordRequest(record_id=stored.record_id, version=1, purpose=TREAT)
        assert await status_of(p["doctor"].GetRecord(one)) == CODE.DATA_LOSS
        # So is a flipped byte in the wrapped data key (of version 2, whose ciphertext is intact).
        row = next(r for r in rows if r.record_id == stored.record_id and r.version == 2)
        prefix, _, body = row.wrapped_key.rpartition(":")
        key_bytes = bytearray(base64.b64decode(body))
        key_bytes[14] ^= 1
        async with stack.records.db.transaction() as conn:
            await conn.execute(
                update(storage.record_versions)
                .where(c.record_id == stored.record_id, c.version == 2)
                .values(wrapped_key=f"{prefix}:{base64.b64encode(bytes(key_bytes)).decode()}")
            )
        two = pb.GetRecordRequest(record_id=stored.record_id, version=2, purpose=TREAT)
        assert await status_of(p["doctor"].GetRecord(two)) == CODE.DATA_LOSS

        # A revoked consent denies the next get.
        await p["consent"].RevokeConsent(
            co_pb.RevokeConsentRequest(request_id=rid(), consent_id=granted.consent.consent_id)
        )
        assert await status_of(p["doctor"].GetRecord(get)) == CODE.PERMISSION_DENIED


async def test_listing_shows_what_consent_permits_and_export_returns_everything_as_a_bundle(start_stack) -> None:
    from fhir.resources.R4B.bundle import Bundle

    async with start_stack(records=True) as stack:
        p = await people(stack)
        resource = observation()

        def put(**fields: Any) -> pb.PutRecordRequest:
            base = {
                "request_id": rid(),
                "patient_id": p["patient_id"],
                "category": OBS,
                "content": json.dumps(resource).encode(),
                "media_type": "application/fhir+json",
            }
            return pb.PutRecordRequest(**{**base, **fields})

        observations = [(await p["patient"].PutRecord(put())).record_id for _ in range(3)]
        pdf = b"%PDF-1.7 " + uuid.uuid4().bytes
        document = (
            await p["patient"].PutRecord(put(content=pdf, media_type="application/pdf", category=DOCS))
        ).record_id
        await p["consent"].GrantConsent(
            co_pb.GrantConsentRequest(
                request_id=rid(),
                patient_id=p["patient_id"],
                grantee_id=p["doctor_id"],
                provision=co_pb.ProvisionType.PROVISION_TYPE_PERMIT,
                actions=[READ],
                categories=[OBS],
                purposes=[TREAT],
            )
        )
        # The doctor sees the observations only, a page at a time, with the decision that permitted.
        seen: list[str] = []
        token = ""
        while True:
            page = await p["doctor"].ListRecords(
                pb.ListRecordsRequest(patient_id=p["patient_id"], purpose=TREAT, page_size=2, page_token=token)
            )
            assert len(page.decision_ids) == 1 and page.decision_ids[0].startswith("dec_")
            seen += [r.record_id for r in page.records]
            token = page.next_page_token
            if not token:
                break
        assert sorted(seen) == sorted(observations)
        assert (
            await p["stranger"].ListRecords(pb.ListRecordsRequest(patient_id=p["patient_id"], purpose=TREAT))
        ).records == []
        # The patient sees everything, and can filter.
        everything = await p["patient"].ListRecords(pb.ListRecordsRequest(patient_id=p["patient_id"]))
        assert {r.record_id for r in everything.records} == {*observations, document}
        only_docs = await p["patient"].ListRecords(pb.ListRecordsRequest(patient_id=p["patient_id"], categories=[DOCS]))
        assert [r.record_id for r in only_docs.records] == [document]
        by_type = await p["patient"].ListRecords(
            pb.ListRecordsRequest(patient_id=p["patient_id"], resource_type="Observation")
        )
        assert sorted(r.record_id for r in by_type.records) == sorted(observations)
        assert (
            await status_of(p["patient"].ListRecords(pb.ListRecordsRequest(patient_id=p["patient_id"], page_token="x")))
            == CODE.INVALID_ARGUMENT
        )

        # Export: the patient's right of access, as a FHIR Bundle that validates.
        exported = await p["patient"].ExportRecords(pb.ExportRecordsRequest(patient_id=p["patient_id"]))
        bundle = Bundle.model_validate_json(exported.fhir_bundle_json)
        # Each record's latest version, and a Provenance for it.
        assert exported.records == 4 and len(bundle.entry) == 8
        assert sum(e.resource.get_resource_type() == "Provenance" for e in bundle.entry) == 4
        raw = json.loads(exported.fhir_bundle_json)
        binaries = [e["resource"] for e in raw["entry"] if e["resource"]["resourceType"] == "Binary"]
        assert [base64.b64decode(b["data"]) for b in binaries] == [pdf]
        assert [b["contentType"] for b in binaries] == ["application/pdf"]
        assert (
            await status_of(p["doctor"].ExportRecords(pb.ExportRecordsRequest(patient_id=p["patient_id"])))
            == CODE.PERMISSION_DENIED
        )

        async with stack.records.db.connect() as conn:
            published = [decode(bytes(v)) for v in (await conn.execute(select(outbox.c.value))).scalars()]
        listed = [
            unpack(e, records_events_pb2.RecordsListed)
            for e in published
            if e.type == records_events_pb2.RecordsListed.DESCRIPTOR.full_name
        ]
        assert any(x.operation == "export" and len(x.record_ids) == 4 for x in listed)
        assert any(x.actor_id == p["doctor_id"] and x.decision_ids for x in listed)


async def test_key_rotation_rewraps_every_data_key_and_resumes_after_a_crash(start_stack, monkeypatch) -> None:
    from medledger_records import api as records_api

    async with start_stack(records=True) as stack:
        p = await people(stack)
        content = json.dumps(observation()).encode()
        ids = []
        for _ in range(3):
            put = pb.PutRecordRequest(
                request_id=rid(),
                patient_id=p["patient_id"],
                category=OBS,
                content=content,
                media_type="application/fhir+json",
            )
            ids.append((await p["patient"].PutRecord(put)).record_id)
        admin = pb_grpc.RecordsServiceStub(
            stack.admin().channel(f"127.0.0.1:{stack.records.grpc_port}", "medledger.records")
        )
        rotate = pb.RotatePatientKeyRequest(patient_id=p["patient_id"])
        assert await status_of(p["patient"].RotatePatientKey(rotate)) == CODE.PERMISSION_DENIED

        # The service dies after the first page of one version: nothing is refused yet.
        monkeypatch.setattr(records_api, "ROTATION_PAGE", 1)
        real_advance = key_storage.advance_rotation
        calls = 0

        async def crash_after_first_page(*args: Any) -> None:
            nonlocal calls
            calls += 1
            if calls > 1:
                raise RuntimeError("killed mid-rotation")
            await real_advance(*args)

        monkeypatch.setattr(key_storage, "advance_rotation", crash_after_first_page)
        assert await status_of(admin.RotatePatientKey(rotate)) == CODE.INTERNAL
        keys = stack.records.keys
        name = f"records-patient-{p['patient_id']}"
        assert (await keys.key_info(name)).min_decryption_version == 1
        for record_id in ids:
            assert (await p["patient"].GetRecord(pb.GetRecordRequest(record_id=record_id))).content == content

        # Called again, it finishes the same rotation (no third key version).
        monkeypatch.setattr(key_storage, "advance_rotation", real_advance)
        done = await admin.RotatePatientKey(rotate)
        assert done.key_version == 2 and done.rewrapped == 2
        info = await keys.key_info(name)
        assert (info.latest_version, info.min_decryption_version) == (2, 2)
        async with stack.records.db.connect() as conn:
            wrapped = (await conn.execute(select(storage.record_versions.c.wrapped_key))).scalars().all()
            assert (await conn.execute(select(func.count()).select_from(storage.key_rotations))).scalar_one() == 0
        assert len(wrapped) == 3 and all(w.startswith("vault:v2:") for w in wrapped)
        for record_id in ids:
            assert (await p["patient"].GetRecord(pb.GetRecordRequest(record_id=record_id))).content == content


async def test_records_work_on_the_embedded_sqlite_database_too(start_stack, tmp_path) -> None:
    async with start_stack(records=True, records_db=f"sqlite+aiosqlite:///{tmp_path / 'records.db'}") as stack:
        p = await people(stack)
        content = json.dumps(observation()).encode()
        put = pb.PutRecordRequest(
            request_id=rid(),
            patient_id=p["patient_id"],
            category=OBS,
            content=content,
            media_type="application/fhir+json",
        )
        stored = await p["patient"].PutRecord(put)
        again = await p["patient"].PutRecord(put)
        assert again.receipt == stored.receipt
        newer = await p["patient"].PutRecord(
            pb.PutRecordRequest(
                request_id=rid(),
                patient_id=p["patient_id"],
                record_id=stored.record_id,
                category=OBS,
                content=content,
                media_type="application/fhir+json",
            )
        )
        assert newer.version == 2
        got = await p["patient"].GetRecord(pb.GetRecordRequest(record_id=stored.record_id, version=1))
        assert got.content == content and got.receipt.commitment == stored.receipt.commitment
        listed = await p["patient"].ListRecords(pb.ListRecordsRequest(patient_id=p["patient_id"]))
        assert [(r.record_id, r.latest_version) for r in listed.records] == [(stored.record_id, 2)]


async def officer(stack: Any) -> pb_grpc.RecordsServiceStub:
    """A practitioner with the privacy-officer role, as a records client."""
    admin = id_grpc.IdentityServiceStub(stack.admin().channel(stack.identity_address, "medledger.identity"))
    org = await admin.RegisterPrincipal(
        id_pb.RegisterPrincipalRequest(request_id=rid(), kind=Kind.PRINCIPAL_KIND_ORGANIZATION)
    )
    reply = await admin.RegisterPrincipal(
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
            request_id=rid(), principal_id=reply.principal.principal_id, role=vocab.Role.ROLE_PRIVACY_OFFICER
        )
    )
    client = stack.client(reply.principal.principal_id, reply.client_secret)
    return pb_grpc.RecordsServiceStub(client.channel(f"127.0.0.1:{stack.records.grpc_port}", "medledger.records"))


async def put_two(p: dict[str, Any]) -> list[str]:
    """A FHIR record and a document of the patient's; their record ids."""
    fhir = pb.PutRecordRequest(
        request_id=rid(),
        patient_id=p["patient_id"],
        category=OBS,
        content=json.dumps(observation()).encode(),
        media_type="application/fhir+json",
    )
    document = pb.PutRecordRequest(
        request_id=rid(),
        patient_id=p["patient_id"],
        category=DOCS,
        content=b"%PDF-1.7 scan",
        media_type="application/pdf",
    )
    return [(await p["patient"].PutRecord(fhir)).record_id, (await p["patient"].PutRecord(document)).record_id]


ERASURE = pb.ErasureState


async def until_completed(stub: Any, erasure_id: str, within: float = 30.0) -> pb.Erasure:
    """The erasure once every participant has confirmed and the certificate is issued."""
    deadline = time.monotonic() + within
    while True:
        erasure = (await stub.GetErasure(pb.GetErasureRequest(erasure_id=erasure_id))).erasure
        if erasure.state == ERASURE.ERASURE_STATE_COMPLETED:
            return erasure
        assert time.monotonic() < deadline, f"the erasure still awaits {list(erasure.awaiting)}"
        await asyncio.sleep(0.1)


async def test_an_approved_erasure_shreds_keys_so_even_an_older_database_copy_is_unreadable(
    start_stack, tmp_path
) -> None:
    blob_dir = tmp_path / "blobs"
    settings = {"erasure_grace_seconds": 3600, "blob_store": "filesystem", "blob_dir": blob_dir}
    async with start_stack(records=True, records_settings=settings) as stack:
        p = await people(stack)
        po = await officer(stack)
        ids = await put_two(p)
        got = await p["patient"].GetRecord(pb.GetRecordRequest(record_id=ids[0]))
        provenance = json.loads(got.provenance_fhir_json)
        assert provenance["resourceType"] == "Provenance"
        assert provenance["agent"][0]["who"]["identifier"]["value"] == p["patient_id"]
        # The ciphertexts are in the blob store, not the rows.
        assert len(list(blob_dir.glob("rec_*/*"))) == 2
        # The copy an attacker (or a backup) keeps from before the erasure.
        async with stack.records.db.connect() as conn:
            copy = (await conn.execute(select(storage.record_versions))).all()
        blobs = {path: path.read_bytes() for path in blob_dir.glob("rec_*/*")}

        # Only the patient (or an admin) asks; a retried request is the same erasure.
        ask = pb.RequestErasureRequest(request_id=rid(), patient_id=p["patient_id"], reason="leaving the clinic")
        assert await status_of(p["doctor"].RequestErasure(ask)) == CODE.PERMISSION_DENIED
        pending = (await p["patient"].RequestErasure(ask)).erasure
        assert pending.state == ERASURE.ERASURE_STATE_PENDING
        assert pending.runs_after.seconds - pending.requested_at.seconds in (3599, 3600, 3601)
        assert (await p["patient"].RequestErasure(ask)).erasure.erasure_id == pending.erasure_id
        another = pb.RequestErasureRequest(request_id=rid(), patient_id=p["patient_id"])
        assert await status_of(p["patient"].RequestErasure(another)) == CODE.ALREADY_EXISTS

        # Unapproved, within its grace period: nothing happens.
        assert await stack.records.handle.erasure_runner.run_due() == []
        assert (await p["patient"].GetRecord(pb.GetRecordRequest(record_id=ids[1]))).content == b"%PDF-1.7 scan"

        # Held: approval is refused and nothing changes.
        approve = pb.ApproveErasureRequest(erasure_id=pending.erasure_id)
        assert await status_of(p["patient"].ApproveErasure(approve)) == CODE.PERMISSION_DENIED
        hold = (
            await po.PlaceLegalHold(
                pb.PlaceLegalHoldRequest(request_id=rid(), patient_id=p["patient_id"], reason="case 2026-114")
            )
        ).legal_hold
        assert await status_of(po.ApproveErasure(approve)) == CODE.FAILED_PRECONDITION
        held = (await p["patient"].GetErasure(pb.GetErasureRequest(erasure_id=pending.erasure_id))).erasure
        assert held.state == ERASURE.ERASURE_STATE_PENDING and "legal hold" in held.blocked_by
        assert (await p["patient"].GetRecord(pb.GetRecordRequest(record_id=ids[0]))).content == got.content
        await po.ReleaseLegalHold(pb.ReleaseLegalHoldRequest(hold_id=hold.hold_id))

        # Approved: it runs at once; the certificate comes once identity and consent confirmed.
        running = (await po.ApproveErasure(approve)).erasure
        assert running.state in (ERASURE.ERASURE_STATE_RUNNING, ERASURE.ERASURE_STATE_COMPLETED)
        done = await until_completed(p["patient"], pending.erasure_id)
        certificate = done.certificate
        assert certificate.key_name == f"records-patient-{p['patient_id']}" and list(certificate.key_versions) == [1]
        assert (certificate.records_erased, certificate.versions_erased) == (2, 2)
        assert certificate.authorized_by.startswith("privacy-officer ")
        assert certificate.unrecoverable_after.seconds - certificate.erased_at.seconds == 30 * 24 * 3600

        # Every later read or write says so; nothing is listed.
        for record_id in ids:
            read = p["patient"].GetRecord(pb.GetRecordRequest(record_id=record_id))
            assert await status_of(read) == CODE.FAILED_PRECONDITION
        write = pb.PutRecordRequest(
            request_id=rid(), patient_id=p["patient_id"], category=DOCS, content=b"x", media_type="text/plain"
        )
        assert await status_of(p["patient"].PutRecord(write)) == CODE.FAILED_PRECONDITION
        assert not (await p["patient"].ListRecords(pb.ListRecordsRequest(patient_id=p["patient_id"]))).records

        # The copy from before: its wrapped data keys no longer open, so neither does any byte of it.
        for row in copy:
            with pytest.raises(NotFound):
                await stack.records.keys.decrypt_data_key(row.key_name, row.wrapped_key)
        assert blobs and not list(blob_dir.glob("rec_*/*"))
        async with stack.records.db.connect() as conn:
            rows = (await conn.execute(select(storage.record_versions))).all()
            published = [decode(bytes(v)) for v in (await conn.execute(select(outbox.c.value))).scalars()]
        assert all(
            (bytes(r.ciphertext), bytes(r.salt), r.wrapped_key, r.written_by) == (b"", b"", "", "") for r in rows
        )
        assert {r.commitment for r in rows} == {r.commitment for r in copy}  # what the log holds stays
        erased = [e for e in published if e.type == records_events_pb2.PatientRecordsErased.DESCRIPTOR.full_name]
        assert [unpack(e, records_events_pb2.PatientRecordsErased).certificate for e in erased] == [certificate]

        # Identity drops the patient's personal attributes on the event.
        identity = id_grpc.IdentityServiceStub(stack.admin().channel(stack.identity_address, "medledger.identity"))
        ask_identity = id_pb.GetPrincipalRequest(principal_id=p["patient_id"], include_fhir_resource=True)
        for _ in range(200):
            if not (await identity.GetPrincipal(ask_identity)).fhir_resource:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("identity kept the erased patient's FHIR resource")
        with pytest.raises(NotFound):  # identity's own key of the patient went too
            await stack.identity.keys.key_info(f"identity-patient-{p['patient_id']}")


async def test_an_erasure_runs_after_its_grace_period_unless_held_and_finishes_after_a_crash(
    start_stack, monkeypatch
) -> None:
    settings = {"erasure_grace_seconds": 1.0, "erasure_check_interval_seconds": 0.2}
    async with start_stack(records=True, records_settings=settings) as stack:
        p = await people(stack)
        po = await officer(stack)
        ids = await put_two(p)
        desk = stack.records.handle.erasure_runner
        await po.PlaceLegalHold(
            pb.PlaceLegalHoldRequest(request_id=rid(), patient_id=p["patient_id"], reason="case 2026-115")
        )
        # Held before it is asked: refused.
        ask = pb.RequestErasureRequest(request_id=rid(), patient_id=p["patient_id"])
        assert await status_of(p["patient"].RequestErasure(ask)) == CODE.FAILED_PRECONDITION

        # Held after it is asked: the grace period passes and nothing happens.
        hold_ids = []
        async with stack.records.db.transaction() as conn:
            hold_ids = [h.hold_id for h in await erasure_storage.holds_in_force(conn, p["patient_id"])]
        await po.ReleaseLegalHold(pb.ReleaseLegalHoldRequest(hold_id=hold_ids[0]))
        # From here only the test runs erasures: the runner sleeps an hour on an event no one sets.
        monkeypatch.setattr(desk, "check_interval", 3600.0)
        await asyncio.sleep(0.5)
        monkeypatch.setattr(desk, "_wake", asyncio.Event())
        pending = (await p["patient"].RequestErasure(ask)).erasure
        await po.PlaceLegalHold(
            pb.PlaceLegalHoldRequest(request_id=rid(), patient_id=p["patient_id"], reason="case 2026-116")
        )
        await asyncio.sleep(1.5)
        assert await desk.run_due() == []
        assert (await p["patient"].GetRecord(pb.GetRecordRequest(record_id=ids[1]))).content == b"%PDF-1.7 scan"
        async with stack.records.db.transaction() as conn:
            hold_ids = [h.hold_id for h in await erasure_storage.holds_in_force(conn, p["patient_id"])]

        # Released, it runs; killed after deleting the key, the next run finishes it.
        real_erase = erasure_storage.erase_patient_data

        async def killed(*args: Any) -> Any:
            raise RuntimeError("killed mid-erasure")

        monkeypatch.setattr(erasure_storage, "erase_patient_data", killed)
        await po.ReleaseLegalHold(pb.ReleaseLegalHoldRequest(hold_id=hold_ids[0]))
        with contextlib.suppress(RuntimeError):
            await desk.run_due()
        state = (await p["patient"].GetErasure(pb.GetErasureRequest(erasure_id=pending.erasure_id))).erasure
        assert state.state == ERASURE.ERASURE_STATE_RUNNING
        monkeypatch.setattr(erasure_storage, "erase_patient_data", real_erase)
        await desk.run_due()
        done = await until_completed(p["patient"], pending.erasure_id)
        assert done.certificate.authorized_by == "grace-period"
        assert list(done.certificate.key_versions) == [1] and done.certificate.versions_erased == 2
        assert await status_of(p["patient"].GetRecord(pb.GetRecordRequest(record_id=ids[0]))) == (
            CODE.FAILED_PRECONDITION
        )
        # A pending erasure can be cancelled; a completed one cannot.
        cancel = pb.CancelErasureRequest(erasure_id=pending.erasure_id)
        assert await status_of(p["patient"].CancelErasure(cancel)) == CODE.FAILED_PRECONDITION


C = vocab.DataCategory
# Where a test files each Synthea resource type (anything else: documents).
CATEGORY_OF = {
    "Patient": C.DATA_CATEGORY_DEMOGRAPHICS,
    "Observation": C.DATA_CATEGORY_OBSERVATIONS,
    "Condition": C.DATA_CATEGORY_CONDITIONS,
    "MedicationRequest": C.DATA_CATEGORY_MEDICATIONS,
    "MedicationAdministration": C.DATA_CATEGORY_MEDICATIONS,
    "Immunization": C.DATA_CATEGORY_IMMUNIZATIONS,
    "Procedure": C.DATA_CATEGORY_PROCEDURES,
    "Encounter": C.DATA_CATEGORY_ENCOUNTERS,
    "DiagnosticReport": C.DATA_CATEGORY_DIAGNOSTIC_REPORTS,
    "AllergyIntolerance": C.DATA_CATEGORY_ALLERGIES,
    "CarePlan": C.DATA_CATEGORY_CARE_PLANS,
    "CareTeam": C.DATA_CATEGORY_CARE_PLANS,
    "Claim": C.DATA_CATEGORY_CLAIMS,
    "ExplanationOfBenefit": C.DATA_CATEGORY_CLAIMS,
}


async def test_every_synthea_resource_round_trips_encrypted_on_postgresql(
    start_stack, synthetic_patients: synthetic.Population
) -> None:
    # Every resource of the seeded generated set: three patients, some three thousand resources.
    resources = synthetic_patients.resources()
    assert len(resources) > 500
    async with start_stack(records=True) as stack:
        p = await people(stack)
        gate = asyncio.Semaphore(16)

        async def round_trip(resource: dict[str, Any]) -> tuple[str, str]:
            content = json.dumps(resource).encode()
            async with gate:
                stored = await p["patient"].PutRecord(
                    pb.PutRecordRequest(
                        request_id=rid(),
                        patient_id=p["patient_id"],
                        category=CATEGORY_OF.get(resource["resourceType"], C.DATA_CATEGORY_DOCUMENTS),
                        content=content,
                        media_type="application/fhir+json",
                    )
                )
                got = await p["patient"].GetRecord(pb.GetRecordRequest(record_id=stored.record_id))
            assert got.content == content
            salt = bytes.fromhex(got.receipt.salt)
            canonical = rfc8785.dumps(json.loads(got.content))
            assert stored.receipt.commitment == hashlib.sha256(b"medledger:record:v1\n" + salt + canonical).hexdigest()
            return stored.record_id, resource["id"]

        done = await asyncio.gather(*(round_trip(r) for r in resources))
        assert len({record_id for record_id, _ in done}) == len(resources)
        # Not one resource's id (a unique plaintext fragment) is in what the database holds.
        async with stack.records.db.connect() as conn:
            stored_bytes = b"".join(
                bytes(r.ciphertext) + r.wrapped_key.encode() + bytes(r.salt)
                for r in await conn.execute(select(storage.record_versions))
            )
        assert not [resource_id for _, resource_id in done if resource_id.encode() in stored_bytes]


async def test_every_consent_deny_reason_reaches_the_reader_and_the_event(start_stack) -> None:
    async with start_stack(records=True) as stack:
        p = await people(stack)
        stored = await p["patient"].PutRecord(
            pb.PutRecordRequest(
                request_id=rid(),
                patient_id=p["patient_id"],
                category=OBS,
                content=json.dumps(observation()).encode(),
                media_type="application/fhir+json",
            )
        )
        get = pb.GetRecordRequest(record_id=stored.record_id, purpose=TREAT)

        async def grant(grantee: str, **fields: Any) -> co_pb.GrantConsentResponse:
            base = {
                "provision": co_pb.ProvisionType.PROVISION_TYPE_PERMIT,
                "actions": [READ],
                "categories": [OBS],
                "purposes": [TREAT],
            }
            return await p["consent"].GrantConsent(
                co_pb.GrantConsentRequest(
                    request_id=rid(), patient_id=p["patient_id"], grantee_id=grantee, **{**base, **fields}
                )
            )

        async def revoked() -> None:
            consent = await grant(p["doctor_id"])
            await p["consent"].RevokeConsent(
                co_pb.RevokeConsentRequest(request_id=rid(), consent_id=consent.consent.consent_id)
            )

        # Each step adds a consent of the doctor's that gets one test further than the last, so
        # each denial names the next reason (consent reports the furthest test reached).
        steps = [
            ("NO_CONSENT_FOR_PATIENT", None),
            ("NO_MATCHING_GRANTEE", lambda: grant(p["stranger_id"])),
            ("REVOKED", revoked),
            ("NOT_IN_PERIOD", lambda: grant(p["doctor_id"], period_start=timestamp(time.time() + 3600))),
            ("ACTION_NOT_COVERED", lambda: grant(p["doctor_id"], actions=[WRITE])),
            ("CATEGORY_NOT_COVERED", lambda: grant(p["doctor_id"], categories=[DOCS])),
            (
                "PURPOSE_NOT_COVERED",
                lambda: grant(p["doctor_id"], purposes=[vocab.PurposeOfUse.PURPOSE_OF_USE_HRESCH]),
            ),
            (
                "EXPLICIT_DENY",
                lambda: grant(p["doctor_id"], provision=co_pb.ProvisionType.PROVISION_TYPE_DENY),
            ),
        ]
        for reason, step in steps:
            if step is not None:
                await step()
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await p["doctor"].GetRecord(get)
            assert denied.value.code() == CODE.PERMISSION_DENIED and reason in (denied.value.details() or ""), reason
        async with stack.records.db.connect() as conn:
            events = [
                decode(bytes(v)) for v in (await conn.execute(select(outbox.c.value).order_by(outbox.c.id))).scalars()
            ]
        denials = [
            unpack(e, records_events_pb2.RecordAccessDenied)
            for e in events
            if e.type == records_events_pb2.RecordAccessDenied.DESCRIPTOR.full_name
        ]
        assert [d.reason_code for d in denials] == [reason for reason, _ in steps]
        assert all(d.decision_id.startswith("dec_") and d.actor_id == p["doctor_id"] for d in denials)
