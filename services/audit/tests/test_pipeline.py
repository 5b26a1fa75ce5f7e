"""The log's storage, sequencer and checkpointer on a real PostgreSQL (and SQLite, the embedded
default): entries and tiles written in one transaction, deduplication by event id, the tree
equal to tlog's reference, one sequencer at a time, checkpoints signed only on growth and never
over a rolled-back database."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from medledger.events.v1 import audit_events_pb2, identity_events_pb2, records_events_pb2
from prometheus_client import REGISTRY
from sqlalchemy import delete, func, select, update

from medledger_audit import storage, tile_store
from medledger_audit.checkpoints import Checkpointer
from medledger_audit.entries import EntryDraft, draft_entry, subject_key_name, unprocessable_entry
from medledger_audit.sequencer import APPEND_LOCK, Sequencer
from medledger_devstack.testing import Postgres
from medledger_runtime.db import Database, lock_key
from medledger_runtime.errors import NotFound
from medledger_runtime.events import TOPICS, Event, new_event
from medledger_runtime.keys import LocalKeyring, create_master_key_file
from medledger_runtime.outbox import COMMON_MIGRATIONS, outbox
from medledger_verifier import notes, tlog

ORIGIN = "test.medledger.local/audit"


def stored(patient: str, n: int) -> Event:
    return new_event(
        source="medledger.records",
        payload=records_events_pb2.RecordStored(
            record_id=f"rec_{n}", version=1, patient_id=patient, commitment=f"{n:064x}", written_by="prc_1"
        ),
        aggregate_id=f"rec_{n}",
        version=1,
    )


def registered(n: int) -> Event:
    return new_event(
        source="medledger.identity",
        payload=identity_events_pb2.PrincipalRegistered(principal_id=f"prc_{n}", organization_id="org_1"),
        aggregate_id=f"prc_{n}",
        version=1,
    )


def drafts_of(events: list[Event]) -> list[EntryDraft]:
    out = [draft_entry(e) for e in events]
    assert all(d is not None for d in out)
    return [d for d in out if d is not None]


def metric(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


@pytest.fixture(params=["postgres", "postgres-sqlalchemy", "sqlite"])
def backend(request: pytest.FixtureRequest) -> str:
    """PostgreSQL through asyncpg (production), through SQLAlchemy, and SQLite (embedded)."""
    return str(request.param)


@pytest.fixture
async def db(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    if backend == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'audit.db'}"
    else:
        postgres: Postgres = request.getfixturevalue("postgres")
        url = postgres.new_database("audit")
    database = Database(url)
    await database.migrate("common", COMMON_MIGRATIONS)
    await database.migrate("audit", storage.MIGRATIONS)
    yield database
    await database.close()


@pytest.fixture
async def keys(tmp_path: Path) -> AsyncIterator[LocalKeyring]:
    master = create_master_key_file(tmp_path / "master.key")
    keyring = await LocalKeyring.open(tmp_path / "keyrings" / "audit.keyring", master)
    yield keyring
    await keyring.aclose()


@pytest.fixture
async def sequencer(db: Database, keys: LocalKeyring, backend: str) -> AsyncIterator[Sequencer]:
    seq = Sequencer(db, keys, max_batch=100, use_driver=backend == "postgres")
    yield seq
    await seq.close()


def checkpointer(db: Database, keys: LocalKeyring, tmp_path: Path, **options: float) -> Checkpointer:
    return Checkpointer(
        db,
        keys,
        origin=ORIGIN,
        last_checkpoint_file=tmp_path / "audit" / "last-checkpoint",
        every_entries=int(options.pop("every_entries", 1000)),
        interval_seconds=options.pop("interval_seconds", 3600.0),
        **options,
    )


async def entry_rows(db: Database) -> list[storage.EntryRow]:
    async with db.connect() as conn:
        return await storage.read_entries(conn, 0, 1 << 62)  # type: ignore[return-value]


async def reference_root(entries: list[bytes]) -> bytes:
    memory = tlog.MemoryTiles()
    result = await tlog.append(memory, 0, [tlog.leaf_hash(e) for e in entries])
    return result.root


async def test_entries_and_tiles_give_tlogs_tree(db: Database, sequencer: Sequencer) -> None:
    events = [stored(f"pat_{i % 7}", i) for i in range(700)] + [registered(i) for i in range(50)]
    outcome = await sequencer.append(drafts_of(events))  # several transactions of 100
    assert (outcome.appended, outcome.duplicates, outcome.tree_size) == (750, 0, 750)

    rows = await entry_rows(db)
    assert [r.entry_index for r in rows] == list(range(750))
    assert [r.event_id for r in rows] == [e.id for e in events]
    reference = await reference_root([bytes(r.entry) for r in rows])
    assert outcome.root == reference
    tiles = tile_store.DatabaseTiles(db)
    assert await tlog.tree_root(tiles, 750) == reference
    # Proofs at older sizes come from prefixes of the stored tiles.
    for size in (1, 255, 256, 257, 700):
        root = await reference_root([bytes(r.entry) for r in rows[:size]])
        assert await tlog.tree_root(tiles, size) == root
        proof = await tlog.inclusion_proof(tiles, size - 1, size)
        assert tlog.verify_inclusion(size - 1, size, tlog.leaf_hash(bytes(rows[size - 1].entry)), proof, root)
    # Lookup columns and the subject: the patient only as an HMAC under their own key.
    first = rows[0]
    assert (first.record_id, first.commitment, first.actor_id) == ("rec_0", f"{0:064x}", "prc_1")
    assert first.subject is not None and first.subject.startswith("vault:v1:")
    assert b"pat_0" not in bytes(first.entry)
    assert rows[7].subject == first.subject and rows[1].subject != first.subject
    async with db.connect() as conn:
        assert await storage.read_state(conn) == (750, reference)


async def test_a_redelivered_event_adds_nothing(db: Database, sequencer: Sequencer) -> None:
    events = [stored("pat_1", i) for i in range(10)]
    await sequencer.append(drafts_of(events))
    before = await entry_rows(db)
    again = await sequencer.append(drafts_of([events[3], events[3], events[9], stored("pat_1", 10)]))
    assert (again.appended, again.duplicates, again.tree_size) == (1, 3, 11)
    after = await entry_rows(db)
    assert [bytes(r.entry) for r in after[:10]] == [bytes(r.entry) for r in before]
    assert after[10].event_id not in {e.id for e in events}


async def test_unprocessable_messages_are_kept_by_hash_and_counted(db: Database, sequencer: Sequencer) -> None:
    before = metric("medledger_audit_unprocessable_total")
    draft = unprocessable_entry(b"\xffnot an envelope", TOPICS["records"], 2, 41)
    outcome = await sequencer.append([draft])
    assert outcome.unprocessable == 1
    assert metric("medledger_audit_unprocessable_total") == before + 1
    (row,) = await entry_rows(db)
    assert row.type == "unprocessable" and b"not an envelope" not in bytes(row.entry)
    await sequencer.append([draft])  # the same message redelivered: still one entry
    assert metric("medledger_audit_unprocessable_total") == before + 1
    assert len(await entry_rows(db)) == 1


async def test_erasure_deletes_the_patients_subject_key(db: Database, sequencer: Sequencer, keys: LocalKeyring) -> None:
    erased = new_event(
        source="medledger.records",
        payload=records_events_pb2.PatientRecordsErased(
            certificate=records_events_pb2.ErasureCertificate(erasure_id="era_1", patient_id="pat_9")
        ),
        aggregate_id="pat_9",
        version=3,
    )
    await sequencer.append(drafts_of([stored("pat_9", 1), erased, stored("pat_9", 2)]))
    rows = await entry_rows(db)
    assert [r.type for r in rows] == ["record.stored", "erasure.completed", "record.stored"]
    # The erasure's entry still has the old subject; the entry after it another, unlinkable one:
    # the key behind the earlier subjects is gone, and the same patient id now gives another HMAC.
    assert rows[0].subject == rows[1].subject != rows[2].subject
    assert await keys.hmac(subject_key_name("pat_9"), b"pat_9") == rows[2].subject

    # An erasure redelivered after a crash between its commit and the key's deletion: the
    # duplicate is not appended, and the key is deleted then.
    await sequencer.append(drafts_of([erased]))
    with pytest.raises(NotFound):
        await keys.hmac(subject_key_name("pat_9"), b"pat_9")
    assert len(await entry_rows(db)) == 3


async def test_the_poll_after_an_erasure_is_prepared_once_the_key_is_gone(
    db: Database, sequencer: Sequencer, keys: LocalKeyring
) -> None:
    """The log consumer prepares a poll while the previous one is appended, except after a poll
    holding an erasure: the patient's next entry must get its subject from a new key."""
    from aiokafka import ConsumerRecord, TopicPartition

    from medledger_audit.handlers import LogConsumer

    erased = new_event(
        source="medledger.records",
        payload=records_events_pb2.PatientRecordsErased(
            certificate=records_events_pb2.ErasureCertificate(erasure_id="era_2", patient_id="pat_7")
        ),
        aggregate_id="pat_7",
        version=3,
    )
    polls = [[stored("pat_7", 1), erased], [stored("pat_7", 2), stored("pat_8", 3)]]
    tp = TopicPartition("medledger.records.v1", 0)

    class Kafka:
        """Two polls, then nothing."""

        def __init__(self) -> None:
            self.offset = 0
            self.polls = list(polls)

        async def getmany(self, timeout_ms: int = 0, max_records: int | None = None) -> object:
            if not self.polls:
                await asyncio.sleep(timeout_ms / 1000)
                return {}
            records = []
            for event in self.polls.pop(0):
                raw = event.SerializeToString()
                records.append(ConsumerRecord(tp.topic, 0, self.offset, 0, 0, None, raw, None, 0, len(raw), []))
                self.offset += 1
            return {tp: records}

        async def commit(self, offsets: object = None) -> None:
            pass

    consumer = LogConsumer(bootstrap_servers="127.0.0.1:1", sequencer=sequencer, producer=None)
    consumer.consumer = Kafka()
    task = asyncio.create_task(consumer.run())
    try:
        for _ in range(200):
            if len(await entry_rows(db)) == 4:
                break
            await asyncio.sleep(0.05)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    rows = await entry_rows(db)
    assert [r.type for r in rows] == ["record.stored", "erasure.completed", "record.stored", "record.stored"]
    assert rows[0].subject == rows[1].subject != rows[2].subject  # unlinkable to the erased patient
    assert await keys.hmac(subject_key_name("pat_7"), b"pat_7") == rows[2].subject


async def test_a_second_sequencer_waits_for_the_first(
    db: Database, keys: LocalKeyring, sequencer: Sequencer, postgres: Postgres
) -> None:
    if not db.is_postgres:
        pytest.skip("PostgreSQL's advisory lock; SQLite has one writer process by its file lock")
    await sequencer.append(drafts_of([registered(1)]))
    holder = await db.connect_driver()  # the first sequencer, mid-append
    transaction = holder.transaction()
    await transaction.start()
    await holder.execute("SELECT pg_advisory_xact_lock($1)", lock_key(APPEND_LOCK))

    second = Sequencer(db, keys, use_driver=sequencer.use_driver)
    waiting = asyncio.create_task(second.append(drafts_of([registered(2)])))
    watcher = await db.connect_driver()
    try:
        deadline = time.monotonic() + 30
        while not await watcher.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        ):  # the second sequencer is blocked on the lock
            assert time.monotonic() < deadline and not waiting.done()
            await asyncio.sleep(0.02)
        assert not waiting.done()
        assert (await second.state())[0] == 1  # nothing appended while the lock is held

        await transaction.commit()  # the first one is done (or gone): the second proceeds
        outcome = await asyncio.wait_for(waiting, 30)
        assert (outcome.appended, outcome.tree_size) == (1, 2)
    finally:
        await watcher.close()
        await holder.close()
        await second.close()


# --- checkpoints ------------------------------------------------------------------------------


async def test_no_checkpoint_without_growth_then_one_that_verifies(
    db: Database, keys: LocalKeyring, sequencer: Sequencer, tmp_path: Path
) -> None:
    cp = checkpointer(db, keys, tmp_path, every_entries=1000, interval_seconds=0.05)
    await cp.start()
    # Nothing appended: nothing is signed, however often it is asked.
    for _ in range(5):
        assert await cp.maybe_sign() is None
        await asyncio.sleep(0.06)
    assert await cp.latest() is None

    outcome = await sequencer.append(drafts_of([stored("pat_1", i) for i in range(12)]))
    await asyncio.sleep(0.06)
    signed = await cp.maybe_sign()
    assert signed is not None and signed.checkpoint.tree_size == 12
    assert signed.checkpoint.root == outcome.root

    # Both signatures verify with the published verifier keys, parsed from their C2SP text.
    verifiers = [notes.NoteVerifier.parse(k) for k in cp.verifier_keys()]
    assert [v.signature_type for v in verifiers] == [notes.SIGNATURE_ED25519, notes.SIGNATURE_ECDSA]
    checkpoint, note = notes.open_checkpoint(signed.note, verifiers, origin=ORIGIN, require_all=True)
    assert (checkpoint.tree_size, checkpoint.root) == (12, outcome.root)
    assert len(note.signatures) == 2
    # Kept verbatim, in the file outside the database too, and announced through the outbox.
    assert await cp.latest() == (signed.note, 12)
    assert (tmp_path / "audit" / "last-checkpoint").read_text() == signed.note
    async with db.connect() as conn:
        assert await storage.checkpoint_at(conn, ORIGIN, 12) == signed.note
        (value,) = (await conn.execute(select(outbox.c.value).where(outbox.c.topic == TOPICS["audit"]))).one()
    event = Event.FromString(value)
    payload = audit_events_pb2.CheckpointSigned()
    assert event.data.Unpack(payload)
    assert (payload.origin, payload.tree_size, payload.root, payload.note) == (ORIGIN, 12, outcome.root, signed.note)
    # The log does not append its own checkpoint events.
    assert draft_entry(event) is None

    # No growth since: nothing more is signed.
    await asyncio.sleep(0.06)
    assert await cp.maybe_sign() is None


async def test_checkpoints_every_n_entries_or_after_the_interval(
    db: Database, keys: LocalKeyring, sequencer: Sequencer, tmp_path: Path
) -> None:
    cp = checkpointer(db, keys, tmp_path, every_entries=100, interval_seconds=3600)
    await cp.start()
    await sequencer.append(drafts_of([registered(i) for i in range(99)]))
    assert await cp.maybe_sign() is None  # 99 entries, and the interval is far away
    await sequencer.append(drafts_of([registered(99)]))
    signed = await cp.maybe_sign()
    assert signed is not None and signed.checkpoint.tree_size == 100
    await sequencer.append(drafts_of([registered(100)]))
    assert await cp.maybe_sign() is None
    cp.interval_seconds = 0.05
    await asyncio.sleep(0.06)
    signed = await cp.maybe_sign()
    assert signed is not None and signed.checkpoint.tree_size == 101
    # The second checkpoint extends the first (its proof is what anchoring checks).
    first, second = 100, 101
    async with db.connect() as conn:
        old = notes.Checkpoint.parse(notes.parse_note(await storage.checkpoint_at(conn, ORIGIN, first) or "").text)
    proof = await tlog.consistency_proof(tile_store.DatabaseTiles(db), first, second)
    notes.check_extends(old, signed.checkpoint, proof)


async def roll_back_to(db: Database, size: int) -> None:
    """What restoring an older backup does: the entries and tiles after `size` are gone."""
    rows = await entry_rows(db)
    memory = tlog.MemoryTiles()
    result = await tlog.append(memory, 0, [tlog.leaf_hash(bytes(r.entry)) for r in rows[:size]])
    async with db.transaction() as conn:
        await conn.execute(delete(storage.entries).where(storage.entries.c.entry_index >= size))
        await conn.execute(delete(storage.tiles))
        for tile, data in result.tiles.items():
            await conn.execute(storage.tiles.insert().values(level=tile.level, tile_index=tile.index, hashes=data))
        await conn.execute(update(storage.log_state).values(tree_size=size, root=result.root))


async def test_a_rolled_back_database_is_never_signed(
    db: Database, keys: LocalKeyring, sequencer: Sequencer, tmp_path: Path
) -> None:
    cp = checkpointer(db, keys, tmp_path, every_entries=1)
    await cp.start()
    await sequencer.append(drafts_of([registered(i) for i in range(300)]))
    signed = await cp.maybe_sign()
    assert signed is not None and signed.checkpoint.tree_size == 300
    refusals = metric("medledger_audit_checkpoint_refusals_total")

    await roll_back_to(db, 290)
    assert await cp.maybe_sign() is None  # smaller than the last signed tree
    assert cp.refused is not None and "below the last signed" in cp.refused
    # The log grows past the old size again, with other entries: still not an extension.
    await sequencer.append(drafts_of([registered(1000 + i) for i in range(20)]))
    assert await cp.maybe_sign() is None
    assert cp.refused is not None and "does not extend" in cp.refused
    assert metric("medledger_audit_checkpoint_refusals_total") >= refusals + 2
    async with db.connect() as conn:
        assert await conn.scalar(select(func.count()).select_from(storage.checkpoints)) == 1

    # A new replica (or a restart) reads the last signed checkpoint from the file, not the
    # database: it refuses as well.
    restarted = checkpointer(db, keys, tmp_path, every_entries=1)
    await restarted.start()
    assert restarted.last is not None and restarted.last.checkpoint.tree_size == 300
    assert await restarted.maybe_sign() is None and restarted.refused is not None

    # A tile deleted behind the log's back is refused too (the tiles are what proofs come from).
    async with db.transaction() as conn:
        await conn.execute(delete(storage.tiles).where(storage.tiles.c.level == 1))
    assert await restarted.maybe_sign() is None
    assert restarted.refused is not None and "missing" in restarted.refused

    # The remedy: a new origin (with its own file).
    fresh = Checkpointer(db, keys, origin=ORIGIN + "-2", last_checkpoint_file=tmp_path / "new", every_entries=1)
    await fresh.start()
    await roll_back_to(db, 310)  # tiles restored to match the entries
    signed = await fresh.maybe_sign()
    assert signed is not None and signed.checkpoint.tree_size == 310
