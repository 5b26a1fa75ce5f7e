"""Versions for the FHIR gateway (issue 24): PutRecord's `expected_version` (FHIR If-Match) and
`assign_fhir_identity`, ListRecordVersions (FHIR instance history) and PutRecords (a FHIR
transaction, all or nothing). The pure functions alone, then records' use cases and its gRPC
servicer (idempotency included) on a real PostgreSQL with its migrations, a real local keyring
behind the data-key cache, the outbox and the disclosures' group commit. Consent is a test double
of the consent SERVICE that counts the questions asked."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fhir.resources.R4B import get_fhir_model_class
from medledger.events.v1 import records_events_pb2 as ev
from medledger.records.v1 import records_service_pb2 as pb
from medledger.types.v1 import vocabulary_pb2 as v
from sqlalchemy import func, select

from medledger_devstack.testing import Postgres
from medledger_records import domain, storage
from medledger_records.api import RecordsApi
from medledger_records.data_keys import CacheLimits, DataKeyCache
from medledger_records.record_commands import (
    ConsentAnswer,
    GetRecord,
    ListRecordVersions,
    PutRecord,
    PutRecords,
    RecordWrite,
)
from medledger_records.records import RecordDesk
from medledger_runtime.auth import Caller, acting_as
from medledger_runtime.db import Database
from medledger_runtime.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from medledger_runtime.events import decode, unpack
from medledger_runtime.group_commit import OutboxGroupCommit
from medledger_runtime.keys import DataKey, LocalKeyring, create_master_key_file
from medledger_runtime.outbox import COMMON_MIGRATIONS, outbox
from medledger_verifier import commitments

OBS = v.DataCategory.DATA_CATEGORY_OBSERVATIONS
MEDS = v.DataCategory.DATA_CATEGORY_MEDICATIONS
TREAT = v.PurposeOfUse.PURPOSE_OF_USE_TREAT
READ, WRITE = v.Action.ACTION_READ, v.Action.ACTION_WRITE
FHIR = "application/fhir+json"
PATIENT = Caller("pat_1", "patient", frozenset(), "", "tok_1", 0.0)
DOCTOR = Caller("prn_1", "practitioner", frozenset(), "org_1", "tok_3", 0.0)


def observation(value: float = 72.0, **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": "heart rate"},
        "valueQuantity": {"value": value, "unit": "beats/min"},
        **extra,
    }


def raw(resource: dict[str, Any]) -> bytes:
    return json.dumps(resource).encode()


# -- the pure functions ------------------------------------------------------------------------------


def test_stamping_sets_id_version_and_last_updated_and_keeps_the_rest_of_meta() -> None:
    sent = observation(id="whatever", meta={"source": "urn:uuid:1", "tag": [{"code": "x"}], "versionId": "9"})
    stamped = json.loads(domain.assign_fhir_identity(raw(sent), "rec_" + "a" * 32, 3, 1765076400.1234, update=False))
    assert stamped["id"] == "rec-" + "a" * 32  # a create assigns its own id
    assert stamped["meta"] == {
        "source": "urn:uuid:1",
        "tag": [{"code": "x"}],
        "versionId": "3",
        "lastUpdated": "2025-12-07T03:00:00.123Z",
    }
    assert {k: val for k, val in stamped.items() if k not in ("id", "meta")} == {
        k: val for k, val in sent.items() if k not in ("id", "meta")
    }
    # What it stamps is a valid FHIR R4 resource (a record id is not a FHIR id: its FHIR form is).
    get_fhir_model_class("Observation").model_validate(stamped)
    assert domain.record_id_of(stamped["id"]) == "rec_" + "a" * 32


def test_stamping_an_update_refuses_another_resources_id_and_accepts_its_own() -> None:
    record_id = "rec_" + "b" * 32
    with pytest.raises(InvalidArgument) as refused:
        domain.assign_fhir_identity(raw(observation(id="someone-else")), record_id, 2, 0.0, update=True)
    assert [x.field for x in refused.value.violations] == ["content.id"]
    for same in (observation(id=domain.fhir_id(record_id)), observation()):
        stamped = json.loads(domain.assign_fhir_identity(raw(same), record_id, 2, 0.0, update=True))
        assert (stamped["id"], stamped["meta"]["versionId"]) == (domain.fhir_id(record_id), "2")
        assert stamped["meta"]["lastUpdated"] == "1970-01-01T00:00:00.000Z"


def test_references_are_rewritten_wherever_they_are_and_nothing_else() -> None:
    resource = {
        "resourceType": "Encounter",
        "subject": {"reference": "urn:uuid:p"},
        "participant": [{"individual": {"reference": "urn:uuid:d", "display": "urn:uuid:p"}}],
        "partOf": {"reference": "urn:uuid:unknown"},
        "text": "urn:uuid:p",
    }
    before = json.dumps(resource)
    rewritten, count = domain.rewrite_references(resource, {"urn:uuid:p": "Patient/pat_1", "urn:uuid:d": "X/rec-1"})
    assert count == 2
    assert rewritten["subject"] == {"reference": "Patient/pat_1"}
    assert rewritten["participant"][0]["individual"] == {"reference": "X/rec-1", "display": "urn:uuid:p"}
    assert rewritten["partOf"] == {"reference": "urn:uuid:unknown"} and rewritten["text"] == "urn:uuid:p"
    assert json.dumps(resource) == before  # the original is left as it was
    # No reference to rewrite: the very bytes sent.
    content = b'{"resourceType": "Observation",  "status": "final", "code": {"text": "x"}}'
    assert domain.with_references(content, json.loads(content), {"urn:uuid:p": "Patient/pat_1"}) is content


def test_an_entrys_error_names_its_index() -> None:
    with pytest.raises(InvalidArgument) as refused, domain.in_entry(3):
        domain.check_record_write("pat_1", OBS, FHIR, b"{")
    assert [x.field for x in refused.value.violations] == ["records[3].content"]
    assert str(refused.value).startswith("records[3].content: ")
    with pytest.raises(NotFound, match=r"^records\[1\]: no such record of this patient$"), domain.in_entry(1):
        raise NotFound("no such record of this patient")
    with pytest.raises(InvalidArgument) as twice:
        domain.check_put_records("pat_1", [("", 0, "urn:uuid:a"), ("", 0, "urn:uuid:a")], {})
    assert [x.field for x in twice.value.violations] == ["records[1].full_url"]
    with pytest.raises(InvalidArgument) as early:
        domain.check_put_records("pat_1", [("", 0, ""), ("", 2, "")], {})
    assert [x.field for x in early.value.violations] == ["records[1].expected_version"]


def test_version_page_tokens_round_trip_and_refuse_others() -> None:
    assert domain.version_page_position(domain.version_page_token(7)) == 7
    for bad in ("7", "v", "v0", "v-1", "v²", "x7", f"v{2**31}"):
        with pytest.raises(InvalidArgument):
            domain.version_page_position(bad)


# -- the use cases and the servicer on PostgreSQL ---------------------------------------------------


@dataclass
class CountingConsent:
    """A test double of the consent SERVICE: permits (or denies) every question, and keeps them."""

    permit: bool = True
    asked: list[tuple[str, str, int, int, int]] = field(default_factory=list)

    async def check(self, caller: Caller, patient_id: str, action: int, category: int, purpose: int) -> ConsentAnswer:
        self.asked.append((caller.principal_id, patient_id, action, category, purpose))
        n = len(self.asked)
        if self.permit:
            return ConsentAnswer(True, f"dec_{n}")
        return ConsentAnswer(False, f"dec_{n}", "EXPLICIT_DENY", "the patient refused")


class CountingKeyring:
    """The real local keyring, counting the data keys it generates."""

    def __init__(self, keyring: LocalKeyring) -> None:
        self.keyring = keyring
        self.data_keys = 0

    async def generate_data_key(self, name: str) -> DataKey:
        self.data_keys += 1
        return await self.keyring.generate_data_key(name)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.keyring, name)


@dataclass
class Desk:
    records: RecordDesk
    api: RecordsApi
    consent: CountingConsent
    keyring: CountingKeyring
    db: Database

    async def events(self) -> list[tuple[str, Any]]:
        async with self.db.connect() as conn:
            rows = (await conn.execute(select(outbox.c.value).order_by(outbox.c.id))).all()
        kinds = (ev.RecordStored, ev.RecordDisclosed, ev.RecordAccessDenied, ev.RecordsListed)
        out = []
        for (value,) in rows:
            event = decode(value)
            cls = next(c for c in kinds if event.type == c.DESCRIPTOR.full_name)
            out.append((cls.DESCRIPTOR.name, unpack(event, cls)))
        return out

    async def counts(self) -> tuple[int, int, int]:
        """(records, versions, outbox rows) stored."""
        async with self.db.connect() as conn:
            return (
                (await conn.execute(select(func.count()).select_from(storage.records))).scalar_one(),
                (await conn.execute(select(func.count()).select_from(storage.record_versions))).scalar_one(),
                (await conn.execute(select(func.count()).select_from(outbox))).scalar_one(),
            )


@pytest.fixture
async def desk(postgres: Postgres, tmp_path: Path) -> AsyncIterator[Desk]:
    db = Database(postgres.new_database("records"))
    await db.migrate("common", COMMON_MIGRATIONS)
    await db.migrate("records", storage.MIGRATIONS)
    master = create_master_key_file(tmp_path / "secrets" / "master.key")
    keyring = CountingKeyring(await LocalKeyring.open(tmp_path / "keys" / "records.keyring", master))
    # The cache off: every data key a write asks for is a fresh one, counted.
    keys = DataKeyCache(keyring, CacheLimits(max_age_seconds=0))  # type: ignore[arg-type]
    disclosures = OutboxGroupCommit(db, what="the disclosure")
    writer = asyncio.create_task(disclosures.run())
    consent = CountingConsent()
    records = RecordDesk(db, keys, consent, disclosures, None, lambda: None)
    runtime = SimpleNamespace(db=db, relay=SimpleNamespace(notify=lambda: None))
    api = RecordsApi(runtime, keys, records, None)  # type: ignore[arg-type]
    try:
        yield Desk(records, api, consent, keyring, db)
    finally:
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
        await disclosures.close()
        await db.close()


def put(content: bytes | None = None, **changes: Any) -> PutRecord:
    fields: dict[str, Any] = {
        "patient_id": "pat_1",
        "category": OBS,
        "media_type": FHIR,
        "content": raw(observation()) if content is None else content,
    }
    return PutRecord(**{**fields, **changes})


async def test_a_stale_expected_version_is_refused_and_stores_nothing(desk: Desk) -> None:
    first = await desk.records.put(PATIENT, put())
    second = await desk.records.put(PATIENT, put(record_id=first.record_id, expected_version=1))
    assert second.version == 2
    before = await desk.counts()
    with pytest.raises(FailedPrecondition, match=r"^the record is at version 2, not 1$"):
        await desk.records.put(PATIENT, put(record_id=first.record_id, expected_version=1))
    assert await desk.counts() == before
    with pytest.raises(InvalidArgument) as refused:
        await desk.records.put(PATIENT, put(expected_version=1))  # a new record has no version
    assert refused.value.violations[0].field == "expected_version"
    third = await desk.records.put(PATIENT, put(record_id=first.record_id))  # 0: any version
    assert third.version == 3


async def test_a_new_version_keeps_its_records_resource_type(desk: Desk) -> None:
    request = {
        "resourceType": "MedicationRequest",
        "status": "active",
        "intent": "order",
        "medicationCodeableConcept": {"text": "aspirin"},
        "subject": {"reference": "Patient/pat-1"},
    }
    first = await desk.records.put(PATIENT, put(raw(request), category=MEDS))
    before = await desk.counts()
    statement = {k: v for k, v in request.items() if k != "intent"} | {"resourceType": "MedicationStatement"}
    # Same category, another type: refused, nothing stored.
    with pytest.raises(InvalidArgument) as refused:
        await desk.records.put(PATIENT, put(raw(statement), category=MEDS, record_id=first.record_id))
    assert refused.value.violations[0].field == "content.resourceType"
    assert await desk.counts() == before


async def test_of_two_concurrent_puts_expecting_the_same_version_exactly_one_wins(desk: Desk) -> None:
    first = await desk.records.put(PATIENT, put())
    for expected in (1, 2, 3):
        outcomes = await asyncio.gather(
            *(
                desk.records.put(
                    PATIENT, put(raw(observation(float(n))), record_id=first.record_id, expected_version=expected)
                )
                for n in range(2)
            ),
            return_exceptions=True,
        )
        won = [o for o in outcomes if not isinstance(o, BaseException)]
        lost = [o for o in outcomes if isinstance(o, BaseException)]
        assert len(won) == 1 and won[0].version == expected + 1
        assert len(lost) == 1 and isinstance(lost[0], FailedPrecondition)
    async with desk.db.connect() as conn:
        record = await storage.get_record(conn, first.record_id)
    assert record is not None and record.latest_version == 4
    assert (await desk.counts())[1] == 4


async def test_stamped_bytes_are_what_a_read_returns_and_what_the_receipt_commits_to(desk: Desk) -> None:
    sent = observation(meta={"source": "urn:example:device"})
    written = await desk.records.put(PATIENT, put(raw(sent), assign_fhir_identity=True))
    got = await desk.records.get(PATIENT, GetRecord(record_id=written.record_id))
    resource = json.loads(got.content)
    assert resource["id"] == domain.fhir_id(written.record_id)
    assert resource["meta"]["versionId"] == "1" and resource["meta"]["source"] == "urn:example:device"
    assert resource["meta"]["lastUpdated"] == got.provenance["recorded"]  # the write's time
    assert commitments.record_commitment(got.content, got.receipt.salt) == written.receipt.commitment
    assert got.receipt == written.receipt

    # An update: the resource as read, changed, comes back as version 2 with its meta moved on.
    resource["status"] = "amended"
    again = await desk.records.put(
        PATIENT, put(raw(resource), record_id=written.record_id, expected_version=1, assign_fhir_identity=True)
    )
    got2 = await desk.records.get(PATIENT, GetRecord(record_id=written.record_id))
    assert json.loads(got2.content)["meta"]["versionId"] == "2" and json.loads(got2.content)["status"] == "amended"
    assert commitments.record_commitment(got2.content, got2.receipt.salt) == again.receipt.commitment
    # One naming another resource is not this record's update.
    before = await desk.counts()
    with pytest.raises(InvalidArgument) as refused:
        await desk.records.put(
            PATIENT, put(raw(observation(id="other")), record_id=written.record_id, assign_fhir_identity=True)
        )
    assert [x.field for x in refused.value.violations] == ["content.id"]
    assert await desk.counts() == before
    # Off: stored exactly as sent.
    plain = await desk.records.put(PATIENT, put(raw(sent)))
    assert (await desk.records.get(PATIENT, GetRecord(record_id=plain.record_id))).content == raw(sent)
    with pytest.raises(InvalidArgument, match="assign_fhir_identity"):
        await desk.records.put(PATIENT, put(b"a scan", media_type="application/pdf", assign_fhir_identity=True))


async def test_history_pages_newest_first_and_is_decided_as_a_read(desk: Desk) -> None:
    first = await desk.records.put(PATIENT, put(raw(observation(1.0))))
    receipts = [first.receipt]
    for n in (2.0, 3.0):
        receipts.append((await desk.records.put(PATIENT, put(raw(observation(n)), record_id=first.record_id))).receipt)

    page = await desk.records.versions(PATIENT, ListRecordVersions(record_id=first.record_id, page_size=2))
    assert [x.version for x in page.versions] == [3, 2] and page.next_page_token
    rest = await desk.records.versions(
        PATIENT, ListRecordVersions(record_id=first.record_id, page_size=2, page_token=page.next_page_token)
    )
    assert [x.version for x in rest.versions] == [1] and rest.next_page_token == ""
    assert [x.receipt for x in page.versions + rest.versions] == receipts[::-1]
    assert page.record.latest_version == 3 and page.decision_id == "" and desk.consent.asked == []
    written_at = [x.written_at for x in page.versions + rest.versions]
    assert written_at == sorted(written_at, reverse=True)
    listed = [p for kind, p in await desk.events() if kind == "RecordsListed"]
    assert [(x.operation, list(x.record_ids)) for x in listed] == [("history", [first.record_id])] * 2

    # A reader consent denies: announced, then refused, and nothing listed.
    desk.consent.permit = False
    with pytest.raises(PermissionDenied, match="consent EXPLICIT_DENY"):
        await desk.records.versions(DOCTOR, ListRecordVersions(record_id=first.record_id, purpose=TREAT))
    kind, denied = (await desk.events())[-1]
    assert kind == "RecordAccessDenied" and (denied.actor_id, denied.record_id) == ("prn_1", first.record_id)
    assert desk.consent.asked == [("prn_1", "pat_1", READ, OBS, TREAT)]
    # Permitted: the decision comes back and is logged with the listing, through the servicer too.
    desk.consent.permit = True
    with acting_as(DOCTOR):
        answer = await desk.api.ListRecordVersions(
            pb.ListRecordVersionsRequest(record_id=first.record_id, purpose=TREAT),
            None,
        )
    assert [x.version for x in answer.versions] == [3, 2, 1] and answer.decision_id == "dec_2"
    assert answer.record.record_id == first.record_id and answer.record.resource_type == "Observation"
    assert answer.versions[0].receipt.commitment == receipts[2].commitment
    kind, listed_event = (await desk.events())[-1]
    assert kind == "RecordsListed" and list(listed_event.decision_ids) == ["dec_2"]
    with pytest.raises(NotFound):
        await desk.records.versions(
            Caller("pat_2", "patient", frozenset(), "", "t", 0.0), ListRecordVersions(first.record_id)
        )
    with pytest.raises(InvalidArgument):
        await desk.records.versions(DOCTOR, ListRecordVersions(record_id=first.record_id))  # no purpose


def transaction_writes() -> list[RecordWrite]:
    """A FHIR transaction of one patient: an encounter and what happened in it, referring to each
    other (and to the patient) by `urn:uuid:` fullUrls."""
    encounter = {
        "resourceType": "Encounter",
        "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "subject": {"reference": "urn:uuid:patient"},
    }
    pulse = observation(subject={"reference": "urn:uuid:patient"}, encounter={"reference": "urn:uuid:encounter"})
    statement = {
        "resourceType": "MedicationStatement",
        "status": "active",
        "medicationCodeableConcept": {"text": "aspirin"},
        "subject": {"reference": "urn:uuid:patient"},
        "context": {"reference": "urn:uuid:encounter"},
    }
    return [
        RecordWrite(OBS, FHIR, raw(encounter), full_url="urn:uuid:encounter"),
        RecordWrite(OBS, FHIR, raw(pulse), full_url="urn:uuid:pulse"),
        RecordWrite(MEDS, FHIR, raw(statement)),
        RecordWrite(OBS, FHIR, raw(observation(80.0, hasMember=[{"reference": "urn:uuid:pulse"}]))),
    ]


async def test_put_records_rewrites_references_stamps_and_asks_consent_once_per_category(desk: Desk) -> None:
    command = PutRecords(
        "pat_1", tuple(transaction_writes()), {"urn:uuid:patient": "Patient/pat_1"}, assign_fhir_identity=True
    )
    written = await desk.records.put_records(DOCTOR, command)
    assert [w.version for w in written] == [1, 1, 1, 1] and len({w.record_id for w in written}) == 4
    # One question per category, not per record; one data key for the whole request.
    assert sorted(desk.consent.asked) == [("prn_1", "pat_1", WRITE, OBS, TREAT), ("prn_1", "pat_1", WRITE, MEDS, TREAT)]
    assert desk.keyring.data_keys == 1
    read = [json.loads((await desk.records.get(PATIENT, GetRecord(record_id=w.record_id))).content) for w in written]
    encounter_ref = f"Encounter/{domain.fhir_id(written[0].record_id)}"
    assert read[0]["subject"] == {"reference": "Patient/pat_1"}
    assert read[1]["encounter"] == {"reference": encounter_ref}
    assert read[2]["context"] == {"reference": encounter_ref} and read[2]["subject"]["reference"] == "Patient/pat_1"
    assert read[3]["hasMember"] == [{"reference": f"Observation/{domain.fhir_id(written[1].record_id)}"}]
    assert [r["id"] for r in read] == [domain.fhir_id(w.record_id) for w in written]
    for w in written:
        got = await desk.records.get(PATIENT, GetRecord(record_id=w.record_id))
        assert commitments.record_commitment(got.content, got.receipt.salt) == w.receipt.commitment
    stored = [p for kind, p in await desk.events() if kind == "RecordStored"]
    assert [(s.record_id, s.commitment) for s in stored] == [(w.record_id, w.receipt.commitment) for w in written]

    # Updates in a second transaction: an expected version that holds, and a new record.
    update = RecordWrite(OBS, FHIR, json.dumps(read[1]).encode(), record_id=written[1].record_id, expected_version=1)
    more = await desk.records.put_records(
        PATIENT, PutRecords("pat_1", (update, RecordWrite(OBS, FHIR, raw(observation()))))
    )
    assert [m.version for m in more] == [2, 1] and more[0].record_id == written[1].record_id


async def test_put_records_is_all_or_nothing(desk: Desk) -> None:
    existing = await desk.records.put(PATIENT, put())
    before = await desk.counts()
    writes = transaction_writes()
    # A bad third entry, found before any transaction.
    bad = [*writes[:2], RecordWrite(MEDS, FHIR, raw({"resourceType": "MedicationStatement"})), writes[3]]
    with pytest.raises(InvalidArgument) as refused:
        await desk.records.put_records(PATIENT, PutRecords("pat_1", tuple(bad)))
    assert refused.value.violations and all(x.field.startswith("records[2].content") for x in refused.value.violations)
    # A third entry found stale inside the transaction, after two were written: rolled back.
    stale = [*writes[:2], RecordWrite(OBS, FHIR, raw(observation()), record_id=existing.record_id, expected_version=5)]
    with pytest.raises(FailedPrecondition, match=r"^records\[2\]: the record is at version 1, not 5$"):
        await desk.records.put_records(PATIENT, PutRecords("pat_1", tuple(stale)))
    other = [*writes[:2], RecordWrite(OBS, FHIR, raw(observation()), record_id="rec_" + "0" * 32)]
    with pytest.raises(NotFound, match=r"^records\[2\]: "):
        await desk.records.put_records(PATIENT, PutRecords("pat_1", tuple(other)))
    assert await desk.counts() == before
    with pytest.raises(PermissionDenied):
        await desk.records.put_records(
            Caller("pat_2", "patient", frozenset(), "", "t", 0.0), PutRecords("pat_1", tuple(writes))
        )
    desk.consent.permit = False
    with pytest.raises(PermissionDenied, match="consent EXPLICIT_DENY"):
        await desk.records.put_records(DOCTOR, PutRecords("pat_1", tuple(writes)))
    assert await desk.counts() == before


async def test_put_records_through_the_servicer_is_idempotent_by_request_id(desk: Desk) -> None:
    request = pb.PutRecordsRequest(
        request_id=str(uuid.uuid4()),
        patient_id="pat_1",
        records=[
            pb.RecordWrite(category=w.category, content=w.content, media_type=w.media_type, full_url=w.full_url)  # type: ignore[arg-type]
            for w in transaction_writes()
        ],
        references={"urn:uuid:patient": "Patient/pat_1"},
        assign_fhir_identity=True,
    )
    with acting_as(PATIENT):
        first = await desk.api.PutRecords(request, None)
        counts = await desk.counts()
        retry = await desk.api.PutRecords(request, None)
    assert [r.record_id for r in retry.records] == [r.record_id for r in first.records]
    assert retry == first and len(first.records) == 4 and counts[:2] == (4, 4)
    assert await desk.counts() == counts  # nothing written again, no event again
    with acting_as(PATIENT), pytest.raises(InvalidArgument, match="request_id"):
        changed = pb.PutRecordsRequest()
        changed.CopyFrom(request)
        changed.assign_fhir_identity = False
        await desk.api.PutRecords(changed, None)
    # PutRecord carries its expected version and stamping from the wire too.
    with acting_as(PATIENT):
        target = first.records[1].record_id
        got = await desk.records.get(PATIENT, GetRecord(record_id=target))
        again = await desk.api.PutRecord(
            pb.PutRecordRequest(
                request_id=str(uuid.uuid4()),
                patient_id="pat_1",
                category=OBS,
                content=got.content,
                media_type=FHIR,
                record_id=target,
                expected_version=1,
                assign_fhir_identity=True,
            ),
            None,
        )
    assert again.version == 2
    read = json.loads((await desk.records.get(PATIENT, GetRecord(record_id=target))).content)
    assert read["meta"]["versionId"] == "2"


def test_references_resolved_outside_the_request_must_be_literal_references() -> None:
    # What a rewritten reference becomes is not validated again as FHIR: the targets are checked.
    domain.check_put_records("pat_1", [("", 0, "urn:uuid:a")], {"urn:uuid:p": "Patient/pat-1"})
    for bad in ("not a reference", "Patient/", "patient/pat-1", "Patient/pat 1", "Patient/x\u0000", "A/" + "x" * 65):
        with pytest.raises(InvalidArgument, match="references"):
            domain.check_put_records("pat_1", [("", 0, "urn:uuid:a")], {"urn:uuid:p": bad})
