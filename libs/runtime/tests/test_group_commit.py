"""Group commit (OutboxGroupCommit) on a real PostgreSQL and on SQLite: every request returns
only once its event (and row) is durable, many requests share a commit, and a failed commit
fails every request in it with UNAVAILABLE."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
from medledger.events.v1 import identity_events_pb2
from sqlalchemy import Column, Integer, MetaData, String, Table, func, select

from medledger_devstack.testing import Postgres
from medledger_runtime import events
from medledger_runtime.db import Database, create_tables
from medledger_runtime.errors import Unavailable
from medledger_runtime.group_commit import OutboxGroupCommit, unnest_insert
from medledger_runtime.outbox import COMMON_MIGRATIONS, outbox

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


async def test_a_lone_write_commits_at_once_and_a_commit_waits_only_for_the_company_it_expects(
    db: Database,
) -> None:
    # An interval far longer than the test may take: a write that waited for it would time out.
    writer = OutboxGroupCommit(db, table=notes, commit_interval=120.0)
    batches: list[int] = []
    in_flight, release = asyncio.Event(), asyncio.Event()
    real_commit = writer._commit

    async def counted(batch):  # type: ignore[no-untyped-def]
        batches.append(len(batch))
        if len(batches) == 6:  # hold the sixth commit in flight while more writes arrive
            in_flight.set()
            await release.wait()
        await real_commit(batch)

    writer._commit = counted  # type: ignore[method-assign]
    runner = asyncio.create_task(writer.run())

    def write(n: int) -> asyncio.Future[None]:
        return asyncio.ensure_future(
            writer.write("medledger.test", _event(n), None, {"note_id": f"n{n}", "n": n}),
        )

    fewer: list[asyncio.Future[None]] = []
    try:
        for n in range(5):  # one caller, one request at a time: each commits on its own, at once
            await asyncio.wait_for(write(n), timeout=20)
        assert batches == [1, 1, 1, 1, 1]
        first = write(5)
        await asyncio.wait_for(in_flight.wait(), timeout=20)
        during = [write(n) for n in range(6, 26)]  # load: they queue behind the commit in flight
        await asyncio.sleep(0.05)
        assert not any(f.done() for f in during)
        release.set()
        await asyncio.wait_for(first, timeout=20)
        # More wait than the previous commit carried: the next commit takes them all, at once.
        await asyncio.wait_for(asyncio.gather(*during), timeout=20)
        assert batches == [1, 1, 1, 1, 1, 1, 20]
        # Fewer than the previous commit carried: the writer waits for more company (up to the
        # interval): still pending after a while.
        fewer = [write(n) for n in range(26, 31)]
        await asyncio.sleep(0.2)
        assert not any(f.done() for f in fewer)
        assert batches == [1, 1, 1, 1, 1, 1, 20]
    finally:
        runner.cancel()
        for f in fewer:
            f.cancel()
        await writer.close()
    assert await _count(db, notes) == 26


async def test_callers_coming_back_after_a_round_trip_fill_one_commit_each_round(db: Database) -> None:
    # 16 callers, each writing again a moment (a network round trip) after its write returned.
    # The first to come back must not get a commit of its own with the other fifteen waiting
    # for the next: every round is one commit, started once all 16 are in (long before the
    # interval, which only bounds the wait when fewer come).
    writer = OutboxGroupCommit(db, table=notes, commit_interval=0.2)
    batches: list[int] = []
    real_commit = writer._commit

    async def counted(batch):  # type: ignore[no-untyped-def]
        batches.append(len(batch))
        await real_commit(batch)

    writer._commit = counted  # type: ignore[method-assign]
    runner = asyncio.create_task(writer.run())
    rng = random.Random(7)
    try:

        async def caller(c: int) -> None:
            for i in range(10):
                n = c * 100 + i
                await writer.write("medledger.test", _event(n), None, {"note_id": f"n{n}", "n": n})
                await asyncio.sleep(rng.uniform(0.0005, 0.003))

        await asyncio.wait_for(asyncio.gather(*(caller(c) for c in range(16))), timeout=60)
    finally:
        runner.cancel()
        await writer.close()
    assert sum(batches) == 160 and await _count(db, notes) == 160
    assert len(batches) <= 13, f"each round of 16 callers should share one commit: {batches}"


async def test_under_load_commits_group_at_the_interval(db: Database) -> None:
    writer = OutboxGroupCommit(db, table=notes, commit_interval=0.05)
    batches: list[int] = []
    real_commit = writer._commit

    async def counted(batch):  # type: ignore[no-untyped-def]
        batches.append(len(batch))
        await real_commit(batch)

    writer._commit = counted  # type: ignore[method-assign]
    runner = asyncio.create_task(writer.run())
    try:

        async def caller(c: int) -> None:  # 16 callers, each one request after another
            for i in range(10):
                n = c * 100 + i
                await writer.write("medledger.test", _event(n), None, {"note_id": f"n{n}", "n": n})

        await asyncio.wait_for(asyncio.gather(*(caller(c) for c in range(16))), timeout=60)
    finally:
        runner.cancel()
        await writer.close()
    assert sum(batches) == 160 and await _count(db, notes) == 160
    assert len(batches) < 40, f"16 callers at once should share commits: {batches}"


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
