"""Records' use cases (records.RecordDesk) without gRPC: on SQLite with its migrations, a real
local keyring (behind the data-key cache, as main wires it), the outbox and the disclosures'
group commit. Consent is a test double of the consent SERVICE answering fixed decisions (the
real consent service is asked in tests/integration/test_records.py and test_access_control.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from medledger.events.v1 import records_events_pb2 as ev
from medledger.types.v1 import vocabulary_pb2 as v
from sqlalchemy import select

from medledger_records import erasure_storage, storage
from medledger_records.data_keys import DataKeyCache
from medledger_records.erasure_runner import COMPLETED, RUNNING
from medledger_records.record_commands import ConsentAnswer, ExportRecords, GetRecord, ListRecords, PutRecord, Written
from medledger_records.records import RecordDesk
from medledger_runtime.auth import Caller
from medledger_runtime.db import Database
from medledger_runtime.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from medledger_runtime.events import decode, unpack
from medledger_runtime.group_commit import OutboxGroupCommit
from medledger_runtime.keys import LocalKeyring, create_master_key_file
from medledger_runtime.outbox import COMMON_MIGRATIONS, outbox
from medledger_verifier import commitments

OBS = v.DataCategory.DATA_CATEGORY_OBSERVATIONS
MEDS = v.DataCategory.DATA_CATEGORY_MEDICATIONS
TREAT = v.PurposeOfUse.PURPOSE_OF_USE_TREAT
READ, WRITE = v.Action.ACTION_READ, v.Action.ACTION_WRITE
FHIR = "application/fhir+json"
PATIENT = Caller("pat_1", "patient", frozenset(), "", "tok_1", 0.0)
OTHER_PATIENT = Caller("pat_2", "patient", frozenset(), "", "tok_2", 0.0)
DOCTOR = Caller("prn_1", "practitioner", frozenset(), "org_1", "tok_3", 0.0)


def observation(value: float = 72.0) -> bytes:
    return json.dumps(
        {
            "resourceType": "Observation",
            "status": "final",
            "code": {"text": "heart rate"},
            "valueQuantity": {"value": value, "unit": "beats/min"},
        }
    ).encode()


@dataclass
class ConsentServiceDouble:
    """A test double of the consent SERVICE: answers every question with `decision` and keeps
    the questions asked, (actor, patient, action, category, purpose)."""

    permit: bool = True
    reason_code: str = "EXPLICIT_DENY"
    asked: list[tuple[str, str, int, int, int]] = field(default_factory=list)

    async def check(self, caller: Caller, patient_id: str, action: int, category: int, purpose: int) -> ConsentAnswer:
        self.asked.append((caller.principal_id, patient_id, action, category, purpose))
        n = len(self.asked)
        if self.permit:
            return ConsentAnswer(True, f"dec_{n}")
        return ConsentAnswer(False, f"dec_{n}", self.reason_code, "the patient refused")


@dataclass
class Desk:
    records: RecordDesk
    consent: ConsentServiceDouble
    db: Database
    notified: list[int]

    async def events(self) -> list[tuple[str, object]]:
        """(type, payload) of every event in the outbox, in order."""
        async with self.db.connect() as conn:
            rows = (await conn.execute(select(outbox.c.value).order_by(outbox.c.id))).all()
        out: list[tuple[str, object]] = []
        kinds = (ev.RecordStored, ev.RecordDisclosed, ev.RecordAccessDenied, ev.RecordsListed)
        for (raw,) in rows:
            event = decode(raw)
            cls = next(c for c in kinds if event.type == c.DESCRIPTOR.full_name)
            out.append((cls.DESCRIPTOR.name, unpack(event, cls)))
        return out


@pytest.fixture
async def desk(tmp_path: Path) -> AsyncIterator[Desk]:
    db = Database(f"sqlite+aiosqlite:///{tmp_path}/records.db")
    await db.migrate("common", COMMON_MIGRATIONS)
    await db.migrate("records", storage.MIGRATIONS)
    master = create_master_key_file(tmp_path / "secrets" / "master.key")
    # As main wires it: the everyday key manager behind the data-key cache.
    keys = DataKeyCache(await LocalKeyring.open(tmp_path / "keys" / "records.keyring", master))
    disclosures = OutboxGroupCommit(db, what="the disclosure")
    writer = asyncio.create_task(disclosures.run())
    consent = ConsentServiceDouble()
    notified: list[int] = []
    records = RecordDesk(db, keys, consent, disclosures, None, lambda: notified.append(1))
    try:
        yield Desk(records, consent, db, notified)
    finally:
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
        await disclosures.close()
        await db.close()


def put(patient_id: str = "pat_1", content: bytes | None = None, **changes: object) -> PutRecord:
    fields: dict[str, object] = {
        "patient_id": patient_id,
        "category": OBS,
        "media_type": FHIR,
        "content": observation() if content is None else content,
    }
    fields.update(changes)
    return PutRecord(**fields)  # type: ignore[arg-type]


async def test_a_patients_own_put_then_get_round_trips_without_asking_consent(desk: Desk) -> None:
    content = observation()
    written = await desk.records.put(PATIENT, put(content=content))
    assert written.version == 1 and written.record_id.startswith("rec_")
    assert written.receipt.commitment == commitments.record_commitment(content, written.receipt.salt)
    assert desk.notified == [1]

    got = await desk.records.get(PATIENT, GetRecord(record_id=written.record_id))
    assert got.content == content
    assert (got.media_type, got.category, got.version, got.patient_id) == (FHIR, OBS, 1, "pat_1")
    assert got.receipt == written.receipt and got.decision_id == ""
    assert got.provenance["agent"][0]["who"]["type"] == "Patient"
    assert desk.consent.asked == []

    events = await desk.events()
    assert [kind for kind, _ in events] == ["RecordStored", "RecordDisclosed"]
    stored = events[0][1]
    assert isinstance(stored, ev.RecordStored)
    assert (stored.record_id, stored.commitment, stored.written_by) == (
        written.record_id,
        written.receipt.commitment,
        "pat_1",
    )
    assert written.receipt.event_id  # the RecordStored event's id, in the receipt


async def test_a_document_round_trips_and_commits_to_its_media_type(desk: Desk) -> None:
    written = await desk.records.put(PATIENT, put(content=b"%PDF-1.7 a scan", media_type="application/pdf"))
    assert written.receipt.commitment == commitments.document_commitment(
        "application/pdf", b"%PDF-1.7 a scan", written.receipt.salt
    )
    got = await desk.records.get(PATIENT, GetRecord(record_id=written.record_id))
    assert (got.content, got.media_type) == (b"%PDF-1.7 a scan", "application/pdf")


async def test_a_patient_writing_another_patients_record_is_refused_without_asking_consent(desk: Desk) -> None:
    with pytest.raises(PermissionDenied, match="a patient writes their own records only"):
        await desk.records.put(OTHER_PATIENT, put("pat_1"))
    assert desk.consent.asked == []
    assert await desk.events() == []


async def test_a_practitioners_write_asks_consent_and_a_denial_is_permission_denied(desk: Desk) -> None:
    desk.consent.permit = False
    with pytest.raises(PermissionDenied) as refused:
        await desk.records.put(DOCTOR, put("pat_1"))
    assert str(refused.value) == "consent EXPLICIT_DENY: the patient refused (decision dec_1)"
    assert desk.consent.asked == [("prn_1", "pat_1", WRITE, OBS, TREAT)]
    assert await desk.events() == []  # nothing written

    desk.consent.permit = True
    written = await desk.records.put(DOCTOR, put("pat_1"))
    got = await desk.records.get(PATIENT, GetRecord(record_id=written.record_id))
    assert got.provenance["agent"][0]["who"]["type"] == "Practitioner"
    assert got.provenance["agent"][0]["onBehalfOf"]["identifier"]["value"] == "org_1"


async def test_a_denied_read_is_announced_then_permission_denied(desk: Desk) -> None:
    written = await desk.records.put(PATIENT, put())
    desk.consent.permit = False
    with pytest.raises(PermissionDenied, match="consent EXPLICIT_DENY"):
        await desk.records.get(DOCTOR, GetRecord(record_id=written.record_id, purpose=TREAT))
    assert desk.consent.asked == [("prn_1", "pat_1", READ, OBS, TREAT)]
    kinds = [kind for kind, _ in await desk.events()]
    assert kinds == ["RecordStored", "RecordAccessDenied"]

    desk.consent.permit = True
    got = await desk.records.get(DOCTOR, GetRecord(record_id=written.record_id, purpose=TREAT))
    assert got.decision_id == "dec_2"
    disclosed = (await desk.events())[-1][1]
    assert isinstance(disclosed, ev.RecordDisclosed)
    assert (disclosed.actor_id, disclosed.decision_id) == ("prn_1", "dec_2")


async def test_another_patients_record_reads_as_missing_and_a_purpose_is_required(desk: Desk) -> None:
    written = await desk.records.put(PATIENT, put())
    with pytest.raises(NotFound, match="no such record"):
        await desk.records.get(OTHER_PATIENT, GetRecord(record_id=written.record_id))
    with pytest.raises(InvalidArgument):
        await desk.records.get(DOCTOR, GetRecord(record_id=written.record_id))
    assert desk.consent.asked == []


async def test_a_write_after_an_erasure_started_is_failed_precondition(desk: Desk) -> None:
    for n, state in enumerate([RUNNING, COMPLETED]):
        patient = f"pat_e{n}"
        first = await desk.records.put(Caller(patient, "patient", frozenset(), "", "t", 0.0), put(patient))
        async with desk.db.transaction() as conn:
            await erasure_storage.insert_erasure(
                conn,
                erasure_storage.ErasureRow(f"era_{n}", patient, state, patient, 1.0, "", 2.0, approved_by="prn_po"),
            )
        caller = Caller(patient, "patient", frozenset(), "", "t", 0.0)
        with pytest.raises(FailedPrecondition, match=f"this patient's records were erased \\(era_{n}\\)"):
            await desk.records.put(caller, put(patient))
        with pytest.raises(FailedPrecondition):
            await desk.records.put(caller, put(patient, record_id=first.record_id))


async def test_a_new_version_keeps_its_records_category_and_media_type(desk: Desk) -> None:
    first = await desk.records.put(PATIENT, put(content=observation(70.0)))
    with pytest.raises(InvalidArgument, match="category") as refused:
        await desk.records.put(PATIENT, put(record_id=first.record_id, category=MEDS))
    assert refused.value.violations[0].field == "category"
    with pytest.raises(InvalidArgument, match="category"):
        await desk.records.put(PATIENT, put(record_id=first.record_id, content=b"a scan", media_type="application/pdf"))
    with pytest.raises(NotFound, match="no such record of this patient"):
        await desk.records.put(PATIENT, put(record_id="rec_missing"))

    second = await desk.records.put(PATIENT, put(record_id=first.record_id, content=observation(80.0)))
    assert (second.record_id, second.version) == (first.record_id, 2)
    latest = await desk.records.get(PATIENT, GetRecord(record_id=first.record_id))
    older = await desk.records.get(PATIENT, GetRecord(record_id=first.record_id, version=1))
    assert (latest.version, latest.content) == (2, observation(80.0))
    assert (older.version, older.content) == (1, observation(70.0))


async def test_a_put_runs_its_write_in_the_transaction_it_is_given(desk: Desk) -> None:
    """What the gRPC API relies on to run a put once per request id: the write happens inside
    the transaction passed, after the checks."""
    runs: list[Written] = []

    async def transaction(write):  # type: ignore[no-untyped-def]
        async with desk.db.transaction() as conn:
            written = await write(conn)
        runs.append(written)
        return written

    written = await desk.records.put(PATIENT, put(), transaction)
    assert runs == [written] and desk.notified == []
    with pytest.raises(PermissionDenied):
        await desk.records.put(OTHER_PATIENT, put(), transaction)
    assert len(runs) == 1


async def test_a_practitioner_lists_only_the_categories_consent_permits(desk: Desk) -> None:
    obs = await desk.records.put(PATIENT, put())
    await desk.records.put(PATIENT, put(content=b"a prescription", media_type="text/plain", category=MEDS))
    own = await desk.records.list(PATIENT, ListRecords(patient_id="pat_1"))
    assert len(own.records) == 2 and own.decision_ids == [] and desk.consent.asked == []

    with pytest.raises(PermissionDenied):
        await desk.records.list(OTHER_PATIENT, ListRecords(patient_id="pat_1"))
    with pytest.raises(InvalidArgument):
        await desk.records.list(DOCTOR, ListRecords(patient_id="pat_1"))

    listing = await desk.records.list(DOCTOR, ListRecords(patient_id="pat_1", purpose=TREAT, categories=(OBS,)))
    assert [r.record_id for r in listing.records] == [obs.record_id]
    assert listing.decision_ids == ["dec_1"]

    page = await desk.records.list(PATIENT, ListRecords(patient_id="pat_1", page_size=1))
    assert len(page.records) == 1 and page.next_page_token
    rest = await desk.records.list(PATIENT, ListRecords(patient_id="pat_1", page_token=page.next_page_token))
    assert len(rest.records) == 1 and rest.next_page_token == ""
    assert {r.record_id for r in page.records + rest.records} == {r.record_id for r in own.records}


async def test_a_patient_exports_their_own_records_as_a_bundle(desk: Desk) -> None:
    await desk.records.put(PATIENT, put())
    await desk.records.put(PATIENT, put(content=b"a scan", media_type="application/pdf"))
    with pytest.raises(PermissionDenied):
        await desk.records.export(DOCTOR, ExportRecords(patient_id="pat_1"))
    export = await desk.records.export(PATIENT, ExportRecords(patient_id="pat_1"))
    assert export.records == 2
    types = sorted(e["resource"]["resourceType"] for e in export.bundle["entry"])
    assert types == ["Binary", "Observation", "Provenance", "Provenance"]
    listed = (await desk.events())[-1][1]
    assert isinstance(listed, ev.RecordsListed) and listed.operation == "export" and len(listed.record_ids) == 2
