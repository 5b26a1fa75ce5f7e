"""SearchRecords (search.SearchDesk) without gRPC, on PostgreSQL with records' migrations, a real
local keyring behind the data-key cache (as main wires it), the outbox and the disclosures' group
commit; consent is a test double of the consent SERVICE permitting chosen categories. Erasure runs
with records' own runner and shredder. Includes the leak check: no code, value or clinical date
written is found in any text or bytea column, nor in the outbox's events."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
from medledger.events.v1 import records_events_pb2 as ev
from medledger.records.v1 import records_service_pb2 as pb
from medledger.types.v1 import vocabulary_pb2 as v
from prometheus_client import REGISTRY
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from medledger_devstack import synthetic
from medledger_devstack.testing import OpenBaoServer, Postgres
from medledger_records import storage
from medledger_records.api import RecordsApi
from medledger_records.data_keys import DataKeyCache
from medledger_records.erasure import ErasureDesk, RequestErasure
from medledger_records.erasure_certificates import Certifier
from medledger_records.erasure_runner import COMPLETED, ErasureRunner
from medledger_records.record_commands import ConsentAnswer, PutRecord
from medledger_records.records import RecordDesk
from medledger_records.search import (
    DateMatch,
    SearchBackfill,
    SearchDesk,
    SearchIndex,
    SearchRecords,
    SearchResult,
    TokenMatch,
    search_key_name,
)
from medledger_runtime.auth import Caller, acting_as
from medledger_runtime.db import Database
from medledger_runtime.disclosures import disclosing_methods
from medledger_runtime.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from medledger_runtime.events import decode, unpack
from medledger_runtime.group_commit import OutboxGroupCommit
from medledger_runtime.keys import (
    KeyManager,
    KeyShredder,
    LocalKeyring,
    VaultKeyManager,
    create_master_key_file,
    patient_key_name,
)
from medledger_runtime.outbox import COMMON_MIGRATIONS, outbox

OBS = v.DataCategory.DATA_CATEGORY_OBSERVATIONS
DIAG = v.DataCategory.DATA_CATEGORY_DIAGNOSTIC_REPORTS
TREAT = v.PurposeOfUse.PURPOSE_OF_USE_TREAT
FHIR = "application/fhir+json"
LOINC = "http://loinc.org"
PATIENT = Caller("pat_1", "patient", frozenset(), "", "tok_1", 0.0)
OTHER_PATIENT = Caller("pat_2", "patient", frozenset(), "", "tok_2", 0.0)
DOCTOR = Caller("prn_1", "practitioner", frozenset(), "org_1", "tok_3", 0.0)
OFFICER = Caller("prn_po", "practitioner", frozenset({"privacy-officer"}), "org_1", "tok_4", 0.0)


def observation(code: str, *, system: str | None = LOINC, when: str = "2020-06-01T10:00:00Z", **more: Any) -> bytes:
    coding: dict[str, str] = {"code": code}
    if system is not None:
        coding["system"] = system
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [coding]},
        "effectiveDateTime": when,
        "valueQuantity": {"value": 72, "unit": "beats/min"},
    }
    resource.update(more)
    return json.dumps(resource).encode()


@dataclass
class ConsentByCategory:
    """A test double of the consent SERVICE: permits the categories in `permitted`, keeps the
    questions asked (actor, patient, action, category, purpose)."""

    permitted: set[int] = field(default_factory=lambda: {OBS, DIAG})
    asked: list[tuple[str, str, int, int, int]] = field(default_factory=list)

    async def check(self, caller: Caller, patient_id: str, action: int, category: int, purpose: int) -> ConsentAnswer:
        self.asked.append((caller.principal_id, patient_id, action, category, purpose))
        if category in self.permitted:
            return ConsentAnswer(True, f"dec_{category}")
        return ConsentAnswer(False, f"dec_{category}", "EXPLICIT_DENY", "refused")


@dataclass
class Desk:
    records: RecordDesk
    search: SearchDesk
    erasures: ErasureDesk
    consent: ConsentByCategory
    keys: KeyManager
    db: Database

    async def put(self, content: bytes, caller: Caller = PATIENT, category: int = OBS, record_id: str = "") -> str:
        written = await self.records.put(caller, PutRecord("pat_1", category, FHIR, content, record_id))
        return written.record_id

    async def find(self, caller: Caller = PATIENT, **fields: Any) -> SearchResult:
        fields.setdefault("patient_id", "pat_1")
        fields.setdefault("resource_type", "Observation")
        return await self.search.search(caller, SearchRecords(**fields))

    async def ids(self, *tokens: tuple[str, tuple[str, ...]], **fields: Any) -> set[str]:
        matches = tuple(TokenMatch(p, values) for p, values in tokens)
        return {f.record.record_id for f in (await self.find(tokens=matches, **fields)).records}

    async def listed(self) -> list[ev.RecordsListed]:
        async with self.db.connect() as conn:
            rows = (await conn.execute(select(outbox.c.value).order_by(outbox.c.id))).all()
        events = [decode(raw) for (raw,) in rows]
        wanted = ev.RecordsListed.DESCRIPTOR.full_name
        return [cast(ev.RecordsListed, unpack(e, ev.RecordsListed)) for e in events if e.type == wanted]


def key_manager_calls(operation: str) -> float:
    value = REGISTRY.get_sample_value("medledger_records_key_manager_calls_total", {"operation": operation})
    return value or 0.0


@pytest.fixture(params=["postgresql", "sqlite", "openbao"])
async def desk(request: pytest.FixtureRequest, tmp_path: Any) -> AsyncIterator[Desk]:
    """On PostgreSQL with a local keyring, on SQLite (a laptop's default) with one, and on
    PostgreSQL with OpenBao under records' own tokens (everyday and erasure, as deployed)."""
    if request.param == "sqlite":
        db = Database(f"sqlite+aiosqlite:///{tmp_path}/records.db")
    else:
        postgres: Postgres = request.getfixturevalue("postgres")
        db = Database(postgres.new_database("records"))
    await db.migrate("common", COMMON_MIGRATIONS)
    await db.migrate("records", storage.MIGRATIONS)
    everyday: KeyManager
    if request.param == "openbao":
        bao: OpenBaoServer = request.getfixturevalue("openbao")
        everyday = VaultKeyManager(bao.address, token_file=bao.token_file("records"))
        shredder = KeyShredder(VaultKeyManager(bao.address, token_file=bao.token_file("records-erasure")), everyday)
        # The server outlives the test: each test starts without the patient's keys.
        for name in (patient_key_name("records", "pat_1"), search_key_name("pat_1")):
            await shredder.shred(name)
    else:
        master = create_master_key_file(tmp_path / "secrets" / "master.key")
        everyday = await LocalKeyring.open(tmp_path / "keys" / "records.keyring", master)
        shredder = KeyShredder(everyday)
    keys = DataKeyCache(everyday)
    shredder.also_forget(keys.purge)
    disclosures = OutboxGroupCommit(db, what="the disclosure")
    writer = asyncio.create_task(disclosures.run())
    consent = ConsentByCategory()
    index = SearchIndex(keys)
    records = RecordDesk(db, keys, consent, disclosures, None, lambda: None, search_index=index)
    runner = ErasureRunner(
        db,
        shredder,
        None,
        Certifier(everyday, backup_retention_seconds=3600.0),
        lambda: None,
        check_interval=3600.0,
        participants=("records", "audit"),
    )
    await runner.start()
    erasures = ErasureDesk(db, runner, lambda: None, grace_seconds=3600.0)
    try:
        yield Desk(records, SearchDesk(db, records, index), erasures, consent, everyday, db)
    finally:
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
        await disclosures.close()
        await db.close()
        await shredder.aclose()
        if request.param == "openbao":
            await everyday.aclose()


async def test_search_by_code_in_its_three_forms_returns_content_and_receipts(desk: Desk) -> None:
    pulse = await desk.put(observation("8867-4"))
    local = await desk.put(observation("LOCAL-1", system=None))
    await desk.put(observation("2708-6"))

    assert await desk.ids(("code", (f"{LOINC}|8867-4",))) == {pulse}
    assert await desk.ids(("code", ("8867-4",))) == {pulse}
    assert await desk.ids(("code", ("|8867-4",))) == set()  # it has a system
    assert await desk.ids(("code", ("http://snomed.info/sct|8867-4",))) == set()
    assert await desk.ids(("code", ("|LOCAL-1",))) == {local}
    assert await desk.ids(("code", ("LOCAL-1",))) == {local}
    assert await desk.ids(("code", (f"{LOINC}|LOCAL-1",))) == set()
    assert await desk.ids(("status", ("final",))) == {pulse, local} | await desk.ids(("code", ("2708-6",)))
    assert await desk.ids(("code", ("8867-4",)), resource_type="Condition") == set()

    result = await desk.find(tokens=(TokenMatch("code", ("8867-4",)),))
    [found] = result.records
    assert json.loads(found.content)["code"]["coding"][0]["code"] == "8867-4"
    assert (found.receipt.record_id, found.receipt.version) == (pulse, 1)
    assert result.total == 1 and result.decision_ids == [] and desk.consent.asked == []


async def test_tokens_are_anded_across_matches_and_ored_within_one(desk: Desk) -> None:
    a = await desk.put(observation("A-1", category=[{"coding": [{"system": "urn:cat", "code": "vital-signs"}]}]))
    b = await desk.put(observation("B-2", category=[{"coding": [{"system": "urn:cat", "code": "laboratory"}]}]))
    c = await desk.put(observation("C-3", status="amended"))
    assert await desk.ids(("code", ("A-1", "B-2", "C-3"))) == {a, b, c}
    assert await desk.ids(("code", ("A-1", "B-2", "C-3")), ("status", ("final",))) == {a, b}
    assert await desk.ids(("code", ("A-1", "B-2")), ("category", ("urn:cat|laboratory",))) == {b}
    assert await desk.ids(("category", ("vital-signs",)), ("status", ("amended",))) == set()
    assert await desk.ids(("code", ("A-1", "C-3")), record_ids=(c, b)) == {c}


async def test_a_new_version_replaces_the_index_of_the_previous_one(desk: Desk) -> None:
    record_id = await desk.put(observation("OLD-1"))
    await desk.put(observation("NEW-2"), record_id=record_id)
    assert await desk.ids(("code", ("OLD-1",))) == set()
    assert await desk.ids(("code", ("NEW-2",))) == {record_id}
    [found] = (await desk.find(tokens=(TokenMatch("code", ("NEW-2",)),))).records
    assert found.receipt.version == 2


async def test_dates_are_matched_by_decrypting_the_candidates(desk: Desk) -> None:
    y2019 = await desk.put(observation("D", when="2019-03-05"))
    june = await desk.put(observation("D", when="2020-06-01T10:00:00Z"))
    period = await desk.put(
        json.dumps(
            {
                "resourceType": "Observation",
                "status": "final",
                "code": {"coding": [{"system": LOINC, "code": "D"}]},
                "effectivePeriod": {"start": "2021-02-01", "end": "2021-02-03"},
            }
        ).encode()
    )
    undated = await desk.put(
        json.dumps({"resourceType": "Observation", "status": "final", "code": {"text": "no date"}}).encode()
    )

    async def dated(*values: str, **more: Any) -> set[str]:
        dates = tuple(DateMatch("date", value) for value in values)
        return {f.record.record_id for f in (await desk.find(dates=dates, **more)).records}

    assert await dated("2020") == {june}
    assert await dated("ge2020") == {june, period}
    assert await dated("lt2020") == {y2019}
    assert await dated("ge2019-03-05", "le2020-12-31") == {y2019, june}  # a range: both hold
    assert await dated("eq2021-02") == {period}
    assert await dated("ne2020") == {y2019, period}  # never the undated one
    assert await dated("sa2020-06-01") == {period}
    assert await dated("eb2020") == {y2019}
    assert undated not in await dated("ge1900")
    assert await dated("ge2020", tokens=(TokenMatch("code", ("D",)),)) == {june, period}
    counted = await desk.find(dates=(DateMatch("date", "ge2019"),), count_only=True)
    assert (counted.total, counted.records) == (3, [])


async def test_paging_is_stable_and_total_counts_every_match(desk: Desk) -> None:
    written = [await desk.put(observation("P", when=f"2020-0{i + 1}-01")) for i in range(5)]
    await desk.put(observation("Q"))
    for dates in ((), (DateMatch("date", "ge2020"),)):
        seen: list[str] = []
        token = ""
        totals = []
        while True:
            page = await desk.find(tokens=(TokenMatch("code", ("P",)),), dates=dates, page_size=2, page_token=token)
            totals.append(page.total)
            seen.extend(f.record.record_id for f in page.records)
            assert len(page.records) <= 2
            token = page.next_page_token
            if not token:
                break
        assert totals == [5, 5, 5]
        assert seen == list(reversed(written))  # newest update first
    with pytest.raises(InvalidArgument) as refused:
        await desk.find(page_token="not-a-token")
    assert refused.value.violations[0].field == "page_token"


async def test_last_updated_and_id_are_sql_criteria(desk: Desk) -> None:
    first = await desk.put(observation("L"))
    second = await desk.put(observation("L"))
    assert await desk.ids(last_updated=("ge2000-01-01",)) == {first, second}
    assert await desk.ids(last_updated=("lt2000-01-01",)) == set()
    assert await desk.ids(last_updated=("gt9000",)) == set()
    assert await desk.ids(record_ids=(second, "rec_unknown")) == {second}
    with pytest.raises(InvalidArgument) as refused:
        await desk.find(last_updated=("ap2020",))
    assert refused.value.violations[0].field == "last_updated[0]"


async def test_others_search_only_the_categories_consent_permits_asked_once_each(desk: Desk) -> None:
    seen = await desk.put(observation("X"), category=OBS)
    hidden = await desk.put(observation("X"), category=v.DataCategory.DATA_CATEGORY_CONDITIONS)
    await desk.put(observation("X"), category=v.DataCategory.DATA_CATEGORY_CONDITIONS)
    desk.consent.permitted = {OBS}

    result = await desk.find(DOCTOR, tokens=(TokenMatch("code", ("X",)),), purpose=TREAT)
    assert [f.record.record_id for f in result.records] == [seen]
    assert result.total == 1  # the denied category is neither counted nor returned
    assert result.decision_ids == [f"dec_{OBS}"]
    conditions = v.DataCategory.DATA_CATEGORY_CONDITIONS
    assert sorted(desk.consent.asked) == [
        ("prn_1", "pat_1", v.Action.ACTION_READ, OBS, TREAT),
        ("prn_1", "pat_1", v.Action.ACTION_READ, conditions, TREAT),
    ]
    counted = await desk.find(DOCTOR, tokens=(TokenMatch("code", ("X",)),), purpose=TREAT, count_only=True)
    assert counted.total == 1
    by_id = await desk.find(DOCTOR, record_ids=(hidden,), purpose=TREAT)
    assert (by_id.total, by_id.records) == (0, [])

    with pytest.raises(InvalidArgument) as refused:
        await desk.find(DOCTOR)
    assert refused.value.violations[0].field == "purpose"
    with pytest.raises(PermissionDenied):
        await desk.find(OTHER_PATIENT)


async def test_every_search_is_logged_with_its_page_before_the_answer(desk: Desk) -> None:
    first = await desk.put(observation("E"))
    second = await desk.put(observation("E"))
    page = await desk.find(DOCTOR, tokens=(TokenMatch("code", ("E",)),), purpose=TREAT, page_size=1)
    [listed] = await desk.listed()
    assert listed.operation == "search"
    assert list(listed.record_ids) == [second] == [f.record.record_id for f in page.records]
    assert (listed.actor_id, listed.patient_id, listed.purpose) == ("prn_1", "pat_1", TREAT)
    assert list(listed.decision_ids) == page.decision_ids == [f"dec_{OBS}"]

    await desk.find(DOCTOR, tokens=(TokenMatch("code", ("E",)),), purpose=TREAT, page_token=page.next_page_token)
    await desk.find(tokens=(TokenMatch("code", ("E",)),), count_only=True)
    later = (await desk.listed())[1:]
    assert [(e.operation, list(e.record_ids)) for e in later] == [("search", [first]), ("search-count", [])]


@pytest.mark.parametrize(
    ("fields", "field_name"),
    [
        ({"resource_type": ""}, "resource_type"),
        ({"resource_type": "Observations"}, "resource_type"),
        ({"patient_id": ""}, "patient_id"),
        ({"tokens": (TokenMatch("code:text", ("x",)),)}, "tokens[0].parameter"),
        ({"tokens": (TokenMatch("vaccine-code", ("x",)),)}, "tokens[0].parameter"),
        ({"tokens": (TokenMatch("code", ("ok", "sys|")),)}, "tokens[0].values[1]"),
        ({"tokens": (TokenMatch("code", ()),)}, "tokens[0].values"),
        ({"tokens": (TokenMatch("code", ("x",) * 51),)}, "tokens[0].values"),
        ({"tokens": (TokenMatch("status", ("final",)),) * 11}, "tokens"),
        ({"dates": (DateMatch("date", "xx2020"),)}, "dates[0].value"),
        ({"dates": (DateMatch("date", "2020-13"),)}, "dates[0].value"),
        ({"dates": (DateMatch("birthdate", "2020"),)}, "dates[0].parameter"),
        ({"dates": (DateMatch("date", "2020"),) * 5}, "dates"),
        ({"resource_type": "Patient", "dates": (DateMatch("date", "2020"),)}, "dates[0].parameter"),
        ({"record_ids": ("rec_x",) * 101}, "record_ids"),
        ({"record_ids": ("",)}, "record_ids[0]"),
        ({"last_updated": ("2020",) * 5}, "last_updated"),
        ({"page_size": -1}, "page_size"),
    ],
)
async def test_bad_input_names_the_field_and_nothing_is_asked_or_logged(
    desk: Desk, fields: dict[str, Any], field_name: str
) -> None:
    with pytest.raises(InvalidArgument) as refused:
        await desk.find(DOCTOR, purpose=TREAT, **fields)
    assert refused.value.violations[0].field == field_name
    assert desk.consent.asked == []
    assert await desk.listed() == []


async def test_key_manager_calls_one_hmac_per_patient_within_the_cache_age(desk: Desk) -> None:
    """The patient's index key is one hmac call, then kept as data keys are (data_keys.py): later
    writes and searches of the patient within the age limit ask the key manager nothing."""
    before = key_manager_calls("hmac")
    await desk.put(json.dumps({"resourceType": "Patient", "gender": "other"}).encode(), category=OBS)
    assert key_manager_calls("hmac") == before  # no terms, no call
    await desk.put(observation("K"))
    assert key_manager_calls("hmac") == before + 1
    await desk.put(observation("L"))
    await desk.find(tokens=(TokenMatch("code", ("K", "L")),))
    await desk.find(tokens=(TokenMatch("code", ("K",)), TokenMatch("status", ("final",))))
    await desk.find(last_updated=("ge2000",))
    assert key_manager_calls("hmac") == before + 1
    # A patient with nothing indexed has no search key: no match, not an error.
    assert (
        await desk.find(patient_id="pat_9", caller=Caller("pat_9", "patient", frozenset(), "", "t", 0.0))
    ).total == 0
    assert key_manager_calls("hmac") == before + 1  # nothing of the type to search: no call


async def text_columns(conn: AsyncConnection) -> list[tuple[str, str]]:
    """(table, column) of every column that can hold text or bytes, on PostgreSQL or SQLite."""
    if conn.dialect.name == "postgresql":
        rows = await conn.execute(
            text(
                "SELECT table_name, column_name FROM information_schema.columns "
                "WHERE table_schema NOT IN ('pg_catalog', 'information_schema') "
                "AND data_type IN ('text', 'character varying', 'bytea', 'json', 'jsonb', 'character')"
            )
        )
        return [(t, c) for t, c in rows]
    found = []
    tables = await conn.execute(text("SELECT name FROM sqlite_master WHERE type = 'table'"))
    for (table,) in tables.all():
        for column in (await conn.execute(text(f'PRAGMA table_info("{table}")'))).all():
            if any(kind in str(column.type).upper() for kind in ("CHAR", "TEXT", "BLOB", "CLOB", "JSON")):
                found.append((table, column.name))
    return found


async def test_no_code_value_or_clinical_date_is_stored_or_sent_in_plaintext(desk: Desk) -> None:
    """The LEAK check: after writing resources with distinctive codes, identifiers and dates and
    searching them, every text and bytea column of records' database and every event in the
    outbox is read and none of them holds any of those strings."""
    secrets = [
        "ZQX-8867-LEAK",
        "urn:leak:system",
        "LEAKID-4242",
        "QQ-LOCAL-999",
        "1987-06-05",
        "1966-11-22",
        "LEAKUNIT-mmHg",
        "123.456",
    ]
    await desk.put(
        observation(
            "ZQX-8867-LEAK",
            system="urn:leak:system",
            when="1987-06-05T04:03:02Z",
            identifier=[{"system": "urn:leak:system", "value": "LEAKID-4242"}],
        )
    )
    record_id = await desk.put(observation("QQ-LOCAL-999", system=None, when="1966-11-22"))
    await desk.put(
        observation(
            "QQ-LOCAL-999",
            system=None,
            when="1966-11-22",
            valueQuantity={"value": 123.456, "unit": "LEAKUNIT-mmHg"},
        ),
        record_id=record_id,
    )
    found = await desk.find(
        DOCTOR,
        purpose=TREAT,
        tokens=(TokenMatch("code", ("urn:leak:system|ZQX-8867-LEAK", "QQ-LOCAL-999")),),
        dates=(DateMatch("date", "le1987-06-05"),),
    )
    assert found.total == 2  # the search itself works on what it may not store

    values: list[tuple[str, Any]] = []
    async with desk.db.connect() as conn:
        columns = await text_columns(conn)
        tables = {t for t, _ in columns}
        assert {"records", "record_versions", "search_terms", "outbox"} <= tables
        for table, column in columns:
            rows = await conn.execute(text(f'SELECT "{column}" FROM "{table}"'))  # noqa: S608
            values.extend((f"{table}.{column}", value) for (value,) in rows)
        index_rows = (await conn.execute(select(func.count()).select_from(storage.search_terms))).scalar_one()
    assert index_rows > 0 and len(values) > index_rows
    for secret in secrets:
        for where, value in values:
            if isinstance(value, bytes | memoryview):
                assert secret.encode() not in bytes(value), (secret, where)
            elif value is not None:
                assert secret not in str(value), (secret, where)
    # The outbox's events, decoded: their attributes and payloads hold none of it either.
    async with desk.db.connect() as conn:
        for (raw,) in (await conn.execute(select(outbox.c.value))).all():
            event = decode(raw)
            for secret in secrets:
                assert secret not in str(event), secret


async def test_an_approved_erasure_destroys_the_search_key_and_the_index(desk: Desk) -> None:
    await desk.put(observation("ERASE-ME"))
    key = search_key_name("pat_1")
    assert (await desk.keys.key_info(key)).latest_version == 1
    assert key == "records-search-pat_1"

    pending = await desk.erasures.request(PATIENT, RequestErasure("pat_1", "leaving"))
    erasure = (await desk.erasures.approve(OFFICER, pending.erasure_id)).erasure
    assert erasure.state == COMPLETED
    with pytest.raises(NotFound):
        await desk.keys.key_info(key)
    async with desk.db.connect() as conn:
        assert (await conn.execute(select(func.count()).select_from(storage.search_terms))).scalar_one() == 0
    with pytest.raises(FailedPrecondition, match="erased"):
        await desk.find(tokens=(TokenMatch("code", ("ERASE-ME",)),))
    # The certificate lists it among the keys records destroyed.
    assert erasure.certificate is not None
    certificate = ev.ErasureCertificate.FromString(erasure.certificate)
    [records_part] = [p for p in certificate.participants if p.participant == "records"]
    assert [(k.key_name, list(k.versions)) for k in records_part.keys] == [
        ("records-patient-pat_1", [1]),
        (key, [1]),
    ]


async def test_synthetic_patients_resources_are_found_by_their_codes(
    desk: Desk, synthetic_patients: synthetic.Population
) -> None:
    """Synthea's R4 resources of each indexed type, written and then found by their own first
    code (system|code), with their clinical date."""
    categories = {
        "Observation": OBS,
        "Condition": v.DataCategory.DATA_CATEGORY_CONDITIONS,
        "Encounter": v.DataCategory.DATA_CATEGORY_ENCOUNTERS,
        "Procedure": v.DataCategory.DATA_CATEGORY_PROCEDURES,
        "Immunization": v.DataCategory.DATA_CATEGORY_IMMUNIZATIONS,
        "MedicationRequest": v.DataCategory.DATA_CATEGORY_MEDICATIONS,
        "DiagnosticReport": DIAG,
        "Claim": v.DataCategory.DATA_CATEGORY_CLAIMS,
    }
    parameter = {"Immunization": "vaccine-code", "Encounter": "type", "Claim": "status"}
    element = {
        "Immunization": "vaccineCode",
        "Encounter": "type",
        "MedicationRequest": "medicationCodeableConcept",
    }
    for resource_type, category in categories.items():
        resources = synthetic_patients.of_type(resource_type)
        resource = next(
            (r for r in resources if resource_type == "Claim" or element.get(resource_type, "code") in r), None
        )
        assert resource is not None, resource_type
        record_id = await desk.put(json.dumps(resource).encode(), category=category)
        if resource_type == "Claim":
            value = resource["status"]
        else:
            concept = resource[element.get(resource_type, "code")]
            coding = (concept[0] if isinstance(concept, list) else concept)["coding"][0]
            value = f"{coding['system']}|{coding['code']}"
        found = await desk.find(
            resource_type=resource_type, tokens=(TokenMatch(parameter.get(resource_type, "code"), (value,)),)
        )
        assert record_id in {f.record.record_id for f in found.records}, resource_type
        dated = await desk.find(
            resource_type=resource_type, record_ids=(record_id,), dates=(DateMatch("date", "ge1900"),)
        )
        assert dated.total == 1, resource_type


async def test_the_grpc_api_maps_the_request_and_answers_content_with_receipts(desk: Desk) -> None:
    """RecordsApi.SearchRecords: the wire's request as the use case's command, FoundRecord with
    summary, content and receipt. Its answer carries content (a disclosure), which the use case
    logs itself: hence SearchRecords in main's `discloses_itself`."""
    record_id = await desk.put(observation("API-1", when="2020-05-05"))
    await desk.put(observation("API-2"))
    api = RecordsApi(None, None, desk.records, desk.erasures, desk.search)  # type: ignore[arg-type]
    request = pb.SearchRecordsRequest(
        patient_id="pat_1",
        resource_type="Observation",
        tokens=[pb.TokenMatch(parameter="code", values=[f"{LOINC}|API-1", "API-3"])],
        dates=[pb.DateMatch(parameter="date", value="ge2020-05")],
        purpose=TREAT,
    )
    with acting_as(DOCTOR):
        answer = await api.SearchRecords(request, None)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument) as refused:
            await api.SearchRecords(pb.SearchRecordsRequest(patient_id="pat_1", resource_type="Nope"), None)  # type: ignore[arg-type]
    assert refused.value.violations[0].field == "resource_type"
    assert (answer.total, answer.next_page_token, list(answer.decision_ids)) == (1, "", [f"dec_{OBS}"])
    [found] = answer.records
    assert (found.summary.record_id, found.summary.resource_type, found.summary.category) == (
        record_id,
        "Observation",
        OBS,
    )
    assert json.loads(found.content)["code"]["coding"][0]["code"] == "API-1"
    assert (found.receipt.record_id, found.receipt.version) == (record_id, 1) and found.receipt.commitment
    service = pb.DESCRIPTOR.services_by_name["RecordsService"]
    assert "/medledger.records.v1.RecordsService/SearchRecords" in disclosing_methods([service])


async def test_records_written_before_the_index_are_indexed_by_the_backfill(desk: Desk) -> None:
    index = desk.records.search_index
    desk.records.search_index = None  # as the release before the index wrote them
    old = await desk.put(observation("OLD-9"))
    document = await desk.records.put(PATIENT, PutRecord("pat_1", OBS, "application/pdf", b"%PDF-1.7 x"))
    desk.records.search_index = index
    assert await desk.ids(("code", ("OLD-9",))) == set()

    backfill = SearchBackfill(desk.db, desk.records, desk.search.index, page=1)
    assert await backfill.run() == 1  # the Observation; never the document
    assert await desk.ids(("code", ("OLD-9",))) == {old}
    assert await backfill.run() == 0  # done once
    async with desk.db.connect() as conn:
        rows = await conn.execute(select(storage.search_terms.c.record_id).distinct())
        assert {r.record_id for r in rows} == {old} and document.record_id != old


async def test_the_backfill_never_indexes_an_erased_patient(desk: Desk) -> None:
    index = desk.records.search_index
    desk.records.search_index = None
    await desk.put(observation("GONE-1"))
    desk.records.search_index = index
    pending = await desk.erasures.request(PATIENT, RequestErasure("pat_1", "leaving"))
    await desk.erasures.approve(OFFICER, pending.erasure_id)
    assert await SearchBackfill(desk.db, desk.records, desk.search.index).run() == 0
    with pytest.raises(NotFound):
        await desk.keys.key_info(search_key_name("pat_1"))  # not made again


class GuardianOf:
    """Who acts for whom (as medledger_runtime.guardians.Guardians answers): one guardianship."""

    def __init__(self, guardian_id: str, patient_id: str) -> None:
        self.pair = (guardian_id, patient_id)

    async def acts_for(self, caller: Caller, patient_id: str) -> bool:
        return (caller.principal_id, patient_id) == self.pair and "guardian" in caller.roles


async def test_a_guardian_searches_every_category_for_the_patient_without_consent(desk: Desk) -> None:
    guardian = Caller("prn_g", "practitioner", frozenset({"guardian"}), "org_1", "tok_g", 0.0)
    desk.records.guardians = GuardianOf("prn_g", "pat_1")  # type: ignore[assignment]
    desk.consent.permitted = set()  # consent would refuse everything
    both = {
        await desk.put(observation("G"), category=OBS),
        await desk.put(observation("G"), category=v.DataCategory.DATA_CATEGORY_CONDITIONS),
    }
    result = await desk.find(guardian, tokens=(TokenMatch("code", ("G",)),))
    assert {f.record.record_id for f in result.records} == both and result.total == 2
    assert desk.consent.asked == [] and result.decision_ids == []
    [listed] = await desk.listed()
    assert (listed.actor_id, listed.on_behalf_of) == ("prn_g", "pat_1")
