"""A guardian acts for the patient in records' use cases (RecordDesk, ErasureDesk) without gRPC: on
SQLite with records' migrations, the guardianship projection fed the events consent and identity
emit, a real local keyring and the outbox. Consent is a test double that denies everything, so
whatever a guardian is served was served without asking it. The same across live services, with
the time a removal takes to arrive, is tests/integration/test_guardians.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiokafka import ConsumerRecord
from google.protobuf import message as pb_message
from medledger.events.v1 import consent_events_pb2, identity_events_pb2
from medledger.events.v1 import records_events_pb2 as ev
from medledger.types.v1 import vocabulary_pb2 as v
from sqlalchemy import select

from medledger_records import storage
from medledger_records.data_keys import DataKeyCache
from medledger_records.erasure import ErasureDesk, RequestErasure
from medledger_records.erasure_certificates import Certifier
from medledger_records.erasure_runner import CANCELLED, ErasureRunner
from medledger_records.record_commands import ConsentAnswer, ExportRecords, GetRecord, ListRecords, PutRecord
from medledger_records.records import RecordDesk
from medledger_runtime.auth import Caller
from medledger_runtime.db import Database
from medledger_runtime.errors import NotFound, PermissionDenied
from medledger_runtime.events import decode, new_event, unpack
from medledger_runtime.group_commit import OutboxGroupCommit
from medledger_runtime.guardians import Guardians, GuardianshipProjection
from medledger_runtime.kafka import ConsumedMessage
from medledger_runtime.keys import KeyShredder, LocalKeyring, create_master_key_file
from medledger_runtime.outbox import COMMON_MIGRATIONS, outbox

OBS = v.DataCategory.DATA_CATEGORY_OBSERVATIONS
TREAT = v.PurposeOfUse.PURPOSE_OF_USE_TREAT
PATIENT = Caller("pat_1", "patient", frozenset(), "", "tok_1", 0.0)
OTHER = "pat_2"
GUARDIAN = Caller("prn_g", "practitioner", frozenset({"guardian"}), "org_1", "tok_g", 0.0)
OBSERVATION = json.dumps(
    {"resourceType": "Observation", "status": "final", "code": {"text": "heart rate"}, "valueQuantity": {"value": 72}}
).encode()
RECORD_EVENTS = (ev.RecordDisclosed, ev.RecordsListed, ev.ErasureRequested, ev.ErasureCancelled)


@dataclass
class DenyAll:
    """A test double of the consent SERVICE: denies every question, and keeps them."""

    asked: list[str] = field(default_factory=list)

    async def check(self, caller: Caller, patient_id: str, action: int, category: int, purpose: int) -> ConsentAnswer:
        self.asked.append(caller.principal_id)
        return ConsentAnswer(False, "dec_1", "NO_CONSENT", "no consent")


@dataclass
class Desk:
    records: RecordDesk
    erasures: ErasureDesk
    project: GuardianshipProjection
    consent: DenyAll
    db: Database

    async def appoint(self, active: bool, version: int, patient_id: str = "pat_1") -> None:
        changed = consent_events_pb2.GuardianshipChanged(
            patient_id=patient_id, guardian_id=GUARDIAN.principal_id, active=active, changed_by=patient_id
        )
        await self.project(_message(changed, "medledger.consent", version))

    async def revoke_role(self, version: int) -> None:
        changed = identity_events_pb2.PrincipalRoleChanged(
            principal_id=GUARDIAN.principal_id, role=v.Role.ROLE_GUARDIAN, granted=False, changed_by="svc_admin"
        )
        await self.project(_message(changed, "medledger.identity", version))

    async def last_event(self) -> pb_message.Message:
        async with self.db.connect() as conn:
            raw = (await conn.execute(select(outbox.c.value).order_by(outbox.c.id.desc()).limit(1))).scalar_one()
        event = decode(raw)
        cls = next(c for c in RECORD_EVENTS if event.type == c.DESCRIPTOR.full_name)
        return unpack(event, cls)


def _message(payload: pb_message.Message, source: str, version: int) -> ConsumedMessage:
    event = new_event(source=source, payload=payload, aggregate_id="a", version=version)
    return ConsumedMessage(ConsumerRecord("t", 0, 0, 0, 0, None, b"", None, 0, 0, ()), event)


@pytest.fixture
async def desk(tmp_path: Path) -> AsyncIterator[Desk]:
    db = Database(f"sqlite+aiosqlite:///{tmp_path}/records.db")
    await db.migrate("common", COMMON_MIGRATIONS)
    await db.migrate("records", storage.MIGRATIONS)
    master = create_master_key_file(tmp_path / "secrets" / "master.key")
    keyring = await LocalKeyring.open(tmp_path / "keys" / "records.keyring", master)
    keys = DataKeyCache(keyring)
    disclosures = OutboxGroupCommit(db, what="the disclosure")
    writer = asyncio.create_task(disclosures.run())
    consent = DenyAll()
    guardians = Guardians(db)
    records = RecordDesk(db, keys, consent, disclosures, None, lambda: None, guardians=guardians)
    runner = ErasureRunner(
        db,
        KeyShredder(keyring),
        None,
        Certifier(keyring, backup_retention_seconds=3600.0),
        lambda: None,
        check_interval=3600.0,
        participants=("records", "audit"),
    )
    erasures = ErasureDesk(db, runner, lambda: None, grace_seconds=3600.0, guardians=guardians)
    try:
        yield Desk(records, erasures, GuardianshipProjection(db, "records.guardianships"), consent, db)
    finally:
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
        await disclosures.close()
        await db.close()
        await keyring.aclose()


async def test_an_appointed_guardian_reads_lists_and_exports_for_the_patient_without_consent(desk: Desk) -> None:
    written = await desk.records.put(PATIENT, PutRecord("pat_1", OBS, "application/fhir+json", OBSERVATION))
    await desk.appoint(True, 1000)

    got = await desk.records.get(GUARDIAN, GetRecord(record_id=written.record_id))
    assert got.content == OBSERVATION and got.decision_id == ""
    disclosed = await desk.last_event()
    assert isinstance(disclosed, ev.RecordDisclosed)
    assert (disclosed.actor_id, disclosed.on_behalf_of, disclosed.patient_id) == ("prn_g", "pat_1", "pat_1")

    listing = await desk.records.list(GUARDIAN, ListRecords(patient_id="pat_1"))
    assert [r.record_id for r in listing.records] == [written.record_id] and listing.decision_ids == []
    listed = await desk.last_event()
    assert isinstance(listed, ev.RecordsListed)
    assert (listed.actor_id, listed.on_behalf_of, listed.operation) == ("prn_g", "pat_1", "list")

    export = await desk.records.export(GUARDIAN, ExportRecords(patient_id="pat_1"))
    assert export.records == 1
    exported = await desk.last_event()
    assert isinstance(exported, ev.RecordsListed)
    assert (exported.actor_id, exported.on_behalf_of, exported.operation) == ("prn_g", "pat_1", "export")
    assert desk.consent.asked == []  # consent (which denies all) was never asked

    # The patient's own acts name nobody on their behalf.
    await desk.records.get(PATIENT, GetRecord(record_id=written.record_id))
    own = await desk.last_event()
    assert isinstance(own, ev.RecordDisclosed) and own.on_behalf_of == ""


async def test_a_guardian_of_another_patient_a_removed_one_or_one_without_the_role_asks_consent(desk: Desk) -> None:
    written = await desk.records.put(PATIENT, PutRecord("pat_1", OBS, "application/fhir+json", OBSERVATION))
    await desk.appoint(True, 1000, patient_id=OTHER)  # a guardian, but of someone else
    with pytest.raises(PermissionDenied):
        await desk.records.get(GUARDIAN, GetRecord(record_id=written.record_id, purpose=TREAT))
    with pytest.raises(PermissionDenied):
        await desk.records.export(GUARDIAN, ExportRecords(patient_id="pat_1"))
    assert (await desk.records.list(GUARDIAN, ListRecords(patient_id="pat_1", purpose=TREAT))).records == []

    await desk.appoint(True, 1000)
    no_role = Caller("prn_g", "practitioner", frozenset(), "org_1", "tok_x", 0.0)
    with pytest.raises(PermissionDenied):
        await desk.records.export(no_role, ExportRecords(patient_id="pat_1"))

    await desk.appoint(False, 2000)  # removed
    with pytest.raises(PermissionDenied):
        await desk.records.get(GUARDIAN, GetRecord(record_id=written.record_id, purpose=TREAT))
    with pytest.raises(PermissionDenied):
        await desk.records.export(GUARDIAN, ExportRecords(patient_id="pat_1"))
    # Each read and listing above asked consent (and was denied), as anyone else's would.
    assert desk.consent.asked and set(desk.consent.asked) == {"prn_g"}


async def test_a_guardian_requests_follows_and_cancels_the_patients_erasure_until_removed(desk: Desk) -> None:
    with pytest.raises(PermissionDenied):
        await desk.erasures.request(GUARDIAN, RequestErasure(patient_id="pat_1"))
    await desk.appoint(True, 1000)
    row = await desk.erasures.request(GUARDIAN, RequestErasure(patient_id="pat_1", reason="for the patient"))
    requested = await desk.last_event()
    assert isinstance(requested, ev.ErasureRequested)
    assert (requested.requested_by, requested.on_behalf_of) == ("prn_g", "pat_1")
    assert (await desk.erasures.get(GUARDIAN, row.erasure_id)).erasure.requested_by == "prn_g"

    cancelled = await desk.erasures.cancel(GUARDIAN, row.erasure_id)
    assert cancelled.erasure.state == CANCELLED
    event = await desk.last_event()
    assert isinstance(event, ev.ErasureCancelled)
    assert (event.cancelled_by, event.on_behalf_of) == ("prn_g", "pat_1")

    # Once the role is revoked (its event arrived), the token's role is not enough.
    await desk.revoke_role(7)
    with pytest.raises(NotFound):
        await desk.erasures.get(GUARDIAN, row.erasure_id)
    with pytest.raises(PermissionDenied):
        await desk.erasures.request(GUARDIAN, RequestErasure(patient_id="pat_1"))
