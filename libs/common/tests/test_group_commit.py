"""Group commit (OutboxGroupCommit) on a real PostgreSQL and on SQLite: every request returns
only once its event (and row) is durable, many requests share a commit, and a failed commit
fails every request in it with UNAVAILABLE."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from medledger.events.v1 import identity_events_pb2
from sqlalchemy import Column, Integer, MetaData, String, Table, func, select

from medledger_common import events
from medledger_common.db import Database, create_tables
from medledger_common.errors import Unavailable
from medledger_common.group_commit import OutboxGroupCommit, unnest_insert
from medledger_common.outbox import COMMON_MIGRATIONS, outbox
from medledger_common.testing import Postgres

metadata = MetaData()
notes = Table("notes", metadata, Column("note_id", String(64), primary_key=True), Column("n", Integer))


def _event(n: int) -> events.Event:
    return events.new_event(
        source="medledger.test",
        payload=identity_events_pb2.PrincipalRegistered(principal_id=f"pat_{n}"),
        aggregate_id=f"pat_{n}",
        version=1,
    )


@pytest.fixture(params=["postgresql", "sqlite"])
async def db(request: pytest.FixtureRequest, postgres: Postgres, tmp_path: Path):  # type: ignore[no-untyped-def]
    url = postgres.new_database("gc") if request.param == "postgresql" else f"sqlite+aiosqlite:///{tmp_path}/gc.db"
    database = Database(url)
    await database.migrate("common", COMMON_MIGRATIONS)
    async with database.transaction() as conn:
        await create_tables(metadata)(conn)
    yield database
    await database.close()


async def _count(db: Database, table: Table) -> int:
    async with db.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(table))).scalar_one())


async def test_concurrent_writes_share_commits_and_each_returns_durable(db: Database) -> None:
    writer = OutboxGroupCommit(db, table=notes, commit_interval=0.02)
    commits = 0
    real_commit = writer._commit

    async def counted(batch):  # type: ignore[no-untyped-def]
        nonlocal commits
        commits += 1
        await real_commit(batch)

    writer._commit = counted  # type: ignore[method-assign]
    runner = asyncio.create_task(writer.run())
    try:

        async def one(n: int) -> None:
            await writer.write("medledger.test", _event(n), f"pat_{n}".encode(), {"note_id": f"n{n}", "n": n})
            # Durable by the time write returns: visible to any other connection.
            async with db.connect() as conn:
                assert (await conn.execute(select(notes.c.n).where(notes.c.note_id == f"n{n}"))).scalar() == n

        await asyncio.gather(*(one(n) for n in range(200)))
    finally:
        runner.cancel()
        await writer.close()
    assert await _count(db, notes) == 200 and await _count(db, outbox) == 200
    assert commits < 100, "concurrent writes should share commits"


async def test_a_failed_commit_fails_every_write_in_it_and_the_next_ones_work(db: Database) -> None:
    writer = OutboxGroupCommit(db, table=notes)
    runner = asyncio.create_task(writer.run())
    try:
        await writer.write("medledger.test", _event(1), None, {"note_id": "dup", "n": 1})
        results = await asyncio.gather(
            writer.write("medledger.test", _event(2), None, {"note_id": "dup", "n": 2}),  # primary key taken
            return_exceptions=True,
        )
        assert isinstance(results[0], Unavailable)
        await writer.write("medledger.test", _event(3), None, {"note_id": "ok", "n": 3})
    finally:
        runner.cancel()
        await writer.close()
    assert await _count(db, notes) == 2 and await _count(db, outbox) == 2


async def test_events_without_rows_and_rows_are_required_exactly_when_there_is_a_table(db: Database) -> None:
    writer = OutboxGroupCommit(db)
    runner = asyncio.create_task(writer.run())
    try:
        await asyncio.gather(*(writer.write("medledger.test", _event(n), b"k") for n in range(20)))
        with pytest.raises(ValueError):
            await writer.write("medledger.test", _event(0), None, {"note_id": "x", "n": 0})
    finally:
        runner.cancel()
        await writer.close()
    assert await _count(db, outbox) == 20


def test_the_unnest_insert_is_built_from_the_table_columns() -> None:
    assert unnest_insert(notes) == ("INSERT INTO notes (note_id, n) SELECT * FROM unnest($1::varchar[], $2::int[])")
