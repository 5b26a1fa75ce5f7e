"""Erasure's use cases (erasure.ErasureDesk) and its runner (erasure_runner.ErasureRunner) without
gRPC: on SQLite with records' migrations, a real local keyring (the shredder deletes its keys,
the certificate is signed by it), the outbox, and records' own RecordDesk to write and read the
patient's records. Consent is a test double of the consent SERVICE permitting everything (the
patient reads their own records, which asks no consent). The whole protocol across identity,
consent, records and audit runs in tests/integration/test_erasure.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from medledger.events.v1 import records_events_pb2 as ev
from medledger.types.v1 import vocabulary_pb2 as v
from sqlalchemy import func, select

from medledger_records import erasure_storage, storage
from medledger_records.data_keys import DataKeyCache
from medledger_records.erasure import ErasureDesk, PlaceLegalHold, RequestErasure
from medledger_records.erasure_certificates import Certifier
from medledger_records.erasure_runner import CANCELLED, COMPLETED, PENDING, RUNNING, ErasureRunner
from medledger_records.record_commands import ConsentAnswer, GetRecord, PutRecord
from medledger_records.records import RecordDesk
from medledger_runtime.auth import Caller
from medledger_runtime.db import Database
from medledger_runtime.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from medledger_runtime.events import decode
from medledger_runtime.group_commit import OutboxGroupCommit
from medledger_runtime.keys import KeyShredder, LocalKeyring, create_master_key_file, patient_key_name
from medledger_runtime.outbox import COMMON_MIGRATIONS, outbox
from medledger_verifier.erasure_certificates import open_certificate

OBS = v.DataCategory.DATA_CATEGORY_OBSERVATIONS
PATIENT = Caller("pat_1", "patient", frozenset(), "", "tok_1", 0.0)
OTHER_PATIENT = Caller("pat_2", "patient", frozenset(), "", "tok_2", 0.0)
DOCTOR = Caller("prn_1", "practitioner", frozenset(), "org_1", "tok_3", 0.0)
OFFICER = Caller("prn_po", "practitioner", frozenset({"privacy-officer"}), "org_1", "tok_4", 0.0)
ADMIN = Caller("svc_admin", "service", frozenset({"admin"}), "", "tok_5", 0.0)
OBSERVATION = json.dumps(
    {"resourceType": "Observation", "status": "final", "code": {"text": "heart rate"}, "valueQuantity": {"value": 72}}
).encode()


class PermitAll:
    """A test double of the consent SERVICE: permits every question."""

    async def check(self, caller: Caller, patient_id: str, action: int, category: int, purpose: int) -> ConsentAnswer:
        return ConsentAnswer(True, "dec_1")


@dataclass
class Desk:
    erasures: ErasureDesk
    runner: ErasureRunner
    records: RecordDesk
    keyring: LocalKeyring
    db: Database
    notified: list[int] = field(default_factory=list)

    async def event_types(self) -> list[str]:
        """The short type of every event in the outbox, in order."""
        async with self.db.connect() as conn:
            rows = (await conn.execute(select(outbox.c.value).order_by(outbox.c.id))).all()
        return [decode(raw).type.rsplit(".", 1)[1] for (raw,) in rows]

    async def erasure_rows(self) -> int:
        async with self.db.connect() as conn:
            return int((await conn.execute(select(func.count()).select_from(storage.erasures))).scalar_one())

    async def put(self, caller: Caller = PATIENT) -> str:
        written = await self.records.put(
            caller, PutRecord(caller.principal_id, OBS, "application/fhir+json", OBSERVATION)
        )
        return written.record_id


@pytest.fixture
async def desk(tmp_path: Path) -> AsyncIterator[Desk]:
    db = Database(f"sqlite+aiosqlite:///{tmp_path}/records.db")
    await db.migrate("common", COMMON_MIGRATIONS)
    await db.migrate("records", storage.MIGRATIONS)
    master = create_master_key_file(tmp_path / "secrets" / "master.key")
    keyring = await LocalKeyring.open(tmp_path / "keys" / "records.keyring", master)
    keys = DataKeyCache(keyring)
    # As main wires it: the shredder forgets the cached data keys of a key it deletes.
    shredder = KeyShredder(keyring)
    shredder.also_forget(keys.purge)
    disclosures = OutboxGroupCommit(db, what="the disclosure")
    writer = asyncio.create_task(disclosures.run())
    notified: list[int] = []

    def notify() -> None:
        notified.append(1)

    records = RecordDesk(db, keys, PermitAll(), disclosures, None, notify)
    # This deployment's participants: records and audit (audit's part is at append), so records'
    # own part completes an erasure; identity and consent confirm in the test that names them.
    runner = ErasureRunner(
        db,
        shredder,
        None,
        Certifier(keyring, backup_retention_seconds=3600.0),
        notify,
        check_interval=3600.0,
        participants=("records", "audit"),
    )
    await runner.start()
    erasures = ErasureDesk(db, runner, notify, grace_seconds=3600.0)
    try:
        yield Desk(erasures, runner, records, keyring, db, notified)
    finally:
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
        await disclosures.close()
        await db.close()
        await keyring.aclose()


async def test_an_approved_erasure_shreds_the_key_so_the_records_read_as_erased(desk: Desk) -> None:
    record_id = await desk.put()
    assert (await desk.records.get(PATIENT, GetRecord(record_id))).content == OBSERVATION
    key_name = patient_key_name("records", "pat_1")
    assert (await desk.keyring.key_info(key_name)).latest_version == 1

    notified = len(desk.notified)
    pending: erasure_storage.ErasureRow = await desk.erasures.request(PATIENT, RequestErasure("pat_1", "leaving"))
    assert len(desk.notified) == notified + 1  # the relay is woken once the request commits
    assert (pending.state, pending.requested_by, pending.reason) == (PENDING, "pat_1", "leaving")
    assert pending.runs_after == pytest.approx(pending.requested_at + 3600.0)
    # Pending within its grace period: nothing runs, the record still reads.
    assert await desk.runner.run_due() == []
    assert (await desk.records.get(PATIENT, GetRecord(record_id))).content == OBSERVATION

    done = await desk.erasures.approve(OFFICER, pending.erasure_id)
    erasure = done.erasure
    assert (erasure.state, erasure.approved_by) == (COMPLETED, "prn_po")
    assert (erasure.records_erased, erasure.versions_erased, erasure.key_versions) == (1, 1, (1,))
    with pytest.raises(NotFound):
        await desk.keyring.key_info(key_name)
    with pytest.raises(FailedPrecondition, match="erased"):
        await desk.records.get(PATIENT, GetRecord(record_id))
    with pytest.raises(FailedPrecondition, match="erased"):
        await desk.put()

    # The signed certificate verifies under the published key and says what was destroyed.
    assert erasure.signed_certificate is not None
    certificate = open_certificate(erasure.signed_certificate, [await desk.erasures.verifier_key()])
    assert certificate.facts["erasure"] == pending.erasure_id
    assert certificate.facts["authorized-by"] == "privacy-officer prn_po"
    outcomes = {p.name: p.outcome for p in certificate.participants}
    assert outcomes == {
        "identity": "absent",
        "consent": "absent",
        "records": "destroyed",
        "audit": "destroyed-at-append",
    }
    [records_part] = [p for p in certificate.participants if p.name == "records"]
    # The patient's search key goes with it (already gone here: nothing of theirs was indexed).
    assert [(k.name, k.versions) for k in records_part.keys] == [
        (key_name, "1"),
        (patient_key_name("records-search", "pat_1"), "already-gone"),
    ]
    assert await desk.event_types() == [
        "RecordStored",
        "RecordDisclosed",
        "ErasureRequested",
        "RecordDisclosed",
        "PatientKeysErasureRequested",
        "PatientRecordsErased",
    ]

    # A retried approval answers with the erasure as it is; a new request is refused.
    assert (await desk.erasures.approve(OFFICER, pending.erasure_id)).erasure == erasure
    with pytest.raises(FailedPrecondition, match="erased"):
        await desk.erasures.request(PATIENT, RequestErasure("pat_1"))


async def test_unauthorized_callers_are_refused_and_nothing_is_erased(desk: Desk) -> None:
    record_id = await desk.put()
    # Someone else than the patient (or an admin) asks: refused before anything is written.
    for stranger in (OTHER_PATIENT, DOCTOR, OFFICER):
        with pytest.raises(PermissionDenied):
            await desk.erasures.request(stranger, RequestErasure("pat_1"))
    assert await desk.erasure_rows() == 0

    pending: erasure_storage.ErasureRow = await desk.erasures.request(PATIENT, RequestErasure("pat_1"))
    # The requester cannot approve their own; to a stranger someone else's erasure looks missing.
    with pytest.raises(NotFound):
        await desk.erasures.approve(OTHER_PATIENT, pending.erasure_id)
    with pytest.raises(NotFound):
        await desk.erasures.get(DOCTOR, pending.erasure_id)
    with pytest.raises(PermissionDenied):
        await desk.erasures.approve(PATIENT, pending.erasure_id)
    admin_asked: erasure_storage.ErasureRow = await desk.erasures.request(ADMIN, RequestErasure("pat_3"))
    assert (await desk.erasures.get(PATIENT, pending.erasure_id)).erasure.state == PENDING
    assert (await desk.erasures.get(ADMIN, admin_asked.erasure_id)).erasure.requested_by == "svc_admin"
    assert (await desk.records.get(PATIENT, GetRecord(record_id))).content == OBSERVATION

    # Cancelled by the patient, it never runs.
    cancelled = await desk.erasures.cancel(PATIENT, pending.erasure_id)
    assert cancelled.erasure.state == CANCELLED
    with pytest.raises(FailedPrecondition, match="cancelled, not pending"):
        await desk.erasures.approve(OFFICER, pending.erasure_id)
    assert (await desk.records.get(PATIENT, GetRecord(record_id))).content == OBSERVATION


@pytest.mark.parametrize(
    ("command", "field"),
    [(RequestErasure(""), "patient_id"), (RequestErasure("pat_1", "x" * 501), "reason")],
)
async def test_a_bad_request_is_invalid_argument_and_changes_nothing(
    desk: Desk, command: RequestErasure, field: str
) -> None:
    with pytest.raises(InvalidArgument) as raised:
        await desk.erasures.request(ADMIN, command)
    assert raised.value.violations[0].field == field
    assert await desk.erasure_rows() == 0
    assert await desk.event_types() == []


async def test_a_legal_hold_blocks_the_erasure_until_released(desk: Desk) -> None:
    record_id = await desk.put()
    hold: erasure_storage.LegalHoldRow = await desk.erasures.place_hold(
        OFFICER, PlaceLegalHold("pat_1", "case 2026-115")
    )
    with pytest.raises(FailedPrecondition, match="legal hold"):
        await desk.erasures.request(PATIENT, RequestErasure("pat_1"))

    released = await desk.erasures.release_hold(OFFICER, hold.hold_id)
    assert released.released_by == "prn_po" and released.released_at is not None
    pending: erasure_storage.ErasureRow = await desk.erasures.request(PATIENT, RequestErasure("pat_1"))
    with pytest.raises(AlreadyExists):
        await desk.erasures.request(PATIENT, RequestErasure("pat_1"))
    await desk.erasures.place_hold(OFFICER, PlaceLegalHold("pat_1", "case 2026-116"))
    assert (await desk.erasures.get(PATIENT, pending.erasure_id)).holds == 1
    with pytest.raises(FailedPrecondition, match="legal hold"):
        await desk.erasures.approve(OFFICER, pending.erasure_id)
    assert (await desk.records.get(PATIENT, GetRecord(record_id))).content == OBSERVATION


async def test_a_running_erasure_waits_for_every_participants_confirmation(desk: Desk) -> None:
    desk.runner.participants = ("identity", "consent", "records", "audit")
    await desk.put()
    pending: erasure_storage.ErasureRow = await desk.erasures.request(PATIENT, RequestErasure("pat_1"))
    running = await desk.erasures.approve(OFFICER, pending.erasure_id)
    assert running.erasure.state == RUNNING
    assert (await desk.erasures.get(PATIENT, pending.erasure_id)).awaiting == ("identity", "consent")

    def destroyed(participant: str, patient_id: str = "pat_1") -> ev.PatientKeysDestroyed:
        key = ev.DestroyedKey(key_name=f"{participant}-patient-{patient_id}", versions=[1])
        return ev.PatientKeysDestroyed(
            erasure_id=pending.erasure_id, patient_id=patient_id, participant=participant, keys=[key]
        )

    # A confirmation naming another patient, or a participant not asked, is not stored.
    assert await desk.runner.confirm(destroyed("identity", patient_id="pat_2")) is False
    assert await desk.runner.confirm(destroyed("records")) is False
    assert await desk.runner.confirm(destroyed("identity")) is True
    assert await desk.runner.confirm(destroyed("identity")) is False  # the first one is kept
    assert (await desk.erasures.get(PATIENT, pending.erasure_id)).awaiting == ("consent",)
    assert await desk.runner.confirm(destroyed("consent")) is True
    done = await desk.erasures.get(PATIENT, pending.erasure_id)
    assert (done.erasure.state, done.awaiting) == (COMPLETED, ())
