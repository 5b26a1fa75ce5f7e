"""`verify` against a real PostgreSQL log: a sound log verifies; an edited, a deleted and a
swapped entry row are each named by index; an altered tile is found; a log rewritten consistently
(entries and tiles) no longer matches the checkpoint signed before."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from medledger.events.v1 import records_events_pb2
from sqlalchemy import delete, select, update

from medledger_audit import storage
from medledger_audit.checkpoints import Checkpointer
from medledger_audit.entries import draft_entry
from medledger_audit.sequencer import Sequencer
from medledger_audit.verify import verify_log, verify_recent
from medledger_devstack.testing import Postgres
from medledger_runtime.db import Database
from medledger_runtime.events import new_event
from medledger_runtime.keys import LocalKeyring, create_master_key_file
from medledger_runtime.outbox import COMMON_MIGRATIONS
from medledger_verifier import tlog

ORIGIN = "verify-test.medledger.local/audit"
N = 600  # more than two level-0 tiles


@pytest.fixture
async def log(postgres: Postgres, tmp_path: Path) -> AsyncIterator[tuple[Database, Checkpointer]]:
    db = Database(postgres.new_database("audit"))
    await db.migrate("common", COMMON_MIGRATIONS)
    await db.migrate("audit", storage.MIGRATIONS)
    keys = await LocalKeyring.open(tmp_path / "keyrings" / "audit.keyring", create_master_key_file(tmp_path / "m.key"))
    sequencer = Sequencer(db, keys, max_batch=250)
    checkpointer = Checkpointer(db, keys, origin=ORIGIN, last_checkpoint_file=tmp_path / "last-checkpoint")
    await checkpointer.start()
    drafts = []
    for n in range(N):
        event = new_event(
            source="medledger.records",
            payload=records_events_pb2.RecordStored(
                record_id=f"rec_{n}", version=1, patient_id=f"pat_{n % 7}", commitment=f"{n:064x}"
            ),
            aggregate_id=f"rec_{n}",
            version=1,
        )
        draft = draft_entry(event)
        assert draft is not None
        drafts.append(draft)
    await sequencer.append(drafts[:300])
    assert await checkpointer.sign(*await _state(db)) is not None
    await sequencer.append(drafts[300:])
    assert await checkpointer.sign(*await _state(db)) is not None
    yield db, checkpointer
    await sequencer.close()
    await keys.aclose()
    await db.close()


async def _state(db: Database) -> tuple[int, bytes]:
    async with db.read() as conn:
        return await storage.read_state(conn)


async def _verify(db: Database, checkpointer: Checkpointer):  # type: ignore[no-untyped-def]
    return await verify_log(db, checkpointer.verifiers, ORIGIN)


async def test_a_sound_log_verifies_whole_and_incrementally(log: tuple[Database, Checkpointer]) -> None:
    db, checkpointer = log
    seen = []
    report = await verify_log(db, checkpointer.verifiers, ORIGIN, progress=lambda done, total: seen.append(done))
    assert report.ok and report.tree_size == N and report.checkpoints_checked == 2 and seen[-1] == N
    assert await verify_recent(db, checkpointer.verifiers, ORIGIN, since=0) == (N, None)


async def test_an_edited_row_is_named_by_its_index(log: tuple[Database, Checkpointer]) -> None:
    db, checkpointer = log
    async with db.transaction() as conn:
        row = (await conn.execute(select(storage.entries.c.entry).where(storage.entries.c.entry_index == 417))).one()
        await conn.execute(
            update(storage.entries)
            .where(storage.entries.c.entry_index == 417)
            .values(entry=bytes(row.entry).replace(b'"version":1', b'"version":2'))
        )
    report = await _verify(db, checkpointer)
    assert not report.ok and report.divergence is not None and report.divergence.index == 417
    _, recent = await verify_recent(db, checkpointer.verifiers, ORIGIN, since=400)
    assert recent is not None and recent.index == 417


async def test_a_deleted_row_is_named_by_its_index(log: tuple[Database, Checkpointer]) -> None:
    db, checkpointer = log
    async with db.transaction() as conn:
        await conn.execute(delete(storage.entries).where(storage.entries.c.entry_index == 5))
    report = await _verify(db, checkpointer)
    assert report.divergence is not None and report.divergence.index == 5 and "missing" in report.divergence.problem


async def test_swapped_rows_are_named_by_the_first_of_them(log: tuple[Database, Checkpointer]) -> None:
    db, checkpointer = log
    c = storage.entries.c
    async with db.transaction() as conn:
        rows = {
            r.entry_index: bytes(r.entry)
            for r in await conn.execute(select(c.entry_index, c.entry).where(c.entry_index.in_([260, 520])))
        }
        await conn.execute(update(storage.entries).where(c.entry_index == 260).values(entry=rows[520]))
        await conn.execute(update(storage.entries).where(c.entry_index == 520).values(entry=rows[260]))
    report = await _verify(db, checkpointer)
    assert report.divergence is not None and report.divergence.index == 260


async def test_an_altered_tile_is_found(log: tuple[Database, Checkpointer]) -> None:
    db, checkpointer = log
    t = storage.tiles.c
    async with db.transaction() as conn:
        # A level-1 tile: the level-0 tiles and the entries still agree with each other.
        data = bytes((await conn.execute(select(t.hashes).where(t.level == 1, t.tile_index == 0))).scalar_one())
        await conn.execute(
            update(storage.tiles).where(t.level == 1, t.tile_index == 0).values(hashes=bytes(32) + data[32:])
        )
    report = await _verify(db, checkpointer)
    assert report.divergence is not None and "tile/1/000" in report.divergence.problem


async def test_a_consistently_rewritten_log_no_longer_matches_its_signed_checkpoints(
    log: tuple[Database, Checkpointer],
) -> None:
    db, checkpointer = log
    c = storage.entries.c
    async with db.transaction() as conn:
        rows = [bytes(r.entry) for r in await conn.execute(select(c.entry).order_by(c.entry_index))]
        rows[10] = rows[10].replace(b'"version":1', b'"version":9')
        # Rewrite the entry and every tile from it, so entries and tiles agree again.
        await conn.execute(update(storage.entries).where(c.entry_index == 10).values(entry=rows[10]))
        memory = tlog.MemoryTiles()
        result = await tlog.append(memory, 0, [tlog.leaf_hash(e) for e in rows])
        await conn.execute(delete(storage.tiles))
        for tile, data in result.tiles.items():
            if tile.level >= 0:
                await conn.execute(storage.tiles.insert().values(level=tile.level, tile_index=tile.index, hashes=data))
        await conn.execute(update(storage.log_state).values(root=result.root))
    report = await _verify(db, checkpointer)
    assert report.divergence is not None and "rewritten" in report.divergence.problem


async def test_the_verify_command_says_what_it_found(log: tuple[Database, Checkpointer]) -> None:
    import asyncio
    import sys

    db, checkpointer = log
    command = [sys.executable, "-m", "medledger_sdk.cli", "audit", "verify", "--database-url", db.url]
    command += ["--origin", ORIGIN] + [arg for key in checkpointer.verifier_keys() for arg in ("--verifier-key", key)]

    async def run() -> tuple[int, str]:
        process = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        out, _ = await process.communicate()
        return process.returncode or 0, out.decode()

    code, out = await run()
    assert code == 0 and f"the log {ORIGIN} verifies: {N} entries" in out, out
    async with db.transaction() as conn:
        await conn.execute(delete(storage.entries).where(storage.entries.c.entry_index == 33))
    code, out = await run()
    assert code == 1 and "first diverging entry: 33" in out, out


async def test_the_services_incremental_check_moves_its_success_time_only_while_sound(
    log: tuple[Database, Checkpointer],
) -> None:
    from prometheus_client import REGISTRY

    from medledger_audit.verify import IncrementalVerifier

    db, checkpointer = log
    verifier = IncrementalVerifier(db, checkpointer, interval=300, origin=ORIGIN)
    assert await verifier.check_once() is None and verifier.verified_up_to == N
    succeeded_at = REGISTRY.get_sample_value("medledger_audit_last_verified_timestamp_seconds")
    failures = REGISTRY.get_sample_value("medledger_audit_verify_failures_total") or 0.0
    assert succeeded_at
    verifier.verified_up_to = 500
    async with db.transaction() as conn:
        await conn.execute(delete(storage.entries).where(storage.entries.c.entry_index == 512))
    divergence = await verifier.check_once()
    assert divergence is not None and divergence.index == 512
    assert REGISTRY.get_sample_value("medledger_audit_verify_failures_total") == failures + 1
    assert REGISTRY.get_sample_value("medledger_audit_last_verified_timestamp_seconds") == succeeded_at
