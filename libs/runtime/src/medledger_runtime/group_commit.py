"""Group commit for hot durable writes: many requests' events (and, optionally, rows of a
service table that go with them) committed together, each request answered only once its part
is durable.

Used where every request must leave a durable record before it is answered and requests are
many: consent's decision log, records' disclosures. Requests queue their writes; one writer task
commits everything queued so far in one statement, then releases the waiting requests.

A commit waits for company only as long as company is coming. Once as many requests wait as the
previous commit carried, the next commit starts: a lone caller (a clinician's app asking one
thing at a time), whose previous commit carried only its own request, waits for its own commit
and nothing else; under load, the callers the previous commit answered come back and fill the
next one, which starts as soon as they are in, however often that is. With fewer waiting, the
writer waits for more, but no longer than `commit_interval` after the previous commit began
(like PostgreSQL's `commit_delay`), so that commits carry many requests' writes instead of one
or two, which is what lets a small machine serve more of them (each commit costs the event loop
more than its rows do). (Waiting out the interval whenever a commit was in flight capped the
rate at the callers in flight per interval: 16 callers every 8 ms, 2,000 requests/s at best.)
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from opentelemetry import propagate
from sqlalchemy import Float, Integer, LargeBinary, String, Table, Text, insert

from medledger_runtime.db import Database
from medledger_runtime.errors import Unavailable
from medledger_runtime.events import Event
from medledger_runtime.outbox import enqueue_many, events_statement, rows_with_events

_ARRAY_TYPES = {String: "varchar[]", Text: "text[]", Float: "float8[]", Integer: "int[]", LargeBinary: "bytea[]"}


def unnest_insert(table: Table) -> str:
    """`INSERT INTO table (...) SELECT * FROM unnest($1::type[], ...)`: a PostgreSQL statement
    that inserts one row per array position, built from the table's own columns, never input."""
    columns = list(table.columns)
    return (
        f"INSERT INTO {table.name} ({', '.join(c.name for c in columns)}) SELECT * FROM unnest("  # noqa: S608
        + ", ".join(f"${i}::{_ARRAY_TYPES[type(c.type)]}" for i, c in enumerate(columns, 1))
        + ")"
    )


@dataclass
class _Pending:
    topic: str
    event: Event
    key: bytes | None
    row: dict[str, Any] | None
    traceparent: str | None
    done: asyncio.Future[None]


class OutboxGroupCommit:
    """Durable events (with rows of `table`, when given), group-committed; see the module."""

    def __init__(
        self,
        db: Database,
        *,
        table: Table | None = None,
        max_batch: int = 500,
        notify_seconds: float = 0.2,
        commit_interval: float = 0.008,
        what: str = "the event",
    ) -> None:
        self.db = db
        self.table = table
        self.max_batch = max_batch
        self.commit_interval = commit_interval
        self._what = what
        self._rows_sql = unnest_insert(table) if table is not None else None
        self._columns = [c.name for c in table.columns] if table is not None else []
        self._queue: list[_Pending] = []
        self._wake = asyncio.Event()
        # As many requests as the previous commit carried: once that many wait, the next commit
        # need not wait for more (a lone caller's previous commit carried one: its own).
        self._enough = 1
        # Called after commits, at most every `notify_seconds`: the relay then publishes in
        # batches of that many milliseconds, not one relay transaction per commit.
        self.after_commit: Callable[[], None] | None = None
        self.notify_seconds = notify_seconds
        self._notified_at = 0.0
        self._driver: Any = None  # asyncpg.Connection, opened at the first commit

    async def write(self, topic: str, event: Event, key: bytes | None, row: dict[str, Any] | None = None) -> None:
        """Return once `event` (and `row`) are durable; Unavailable if they could not be."""
        if (row is None) != (self.table is None):
            raise ValueError("a row goes with every event when there is a table, and never without")
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(topic, event, key, row, carrier.get("traceparent"), done))
        if len(self._queue) == 1 or len(self._queue) >= self._enough:
            self._wake.set()
        await done

    async def run(self) -> None:
        """Commit what is queued, one transaction at a time; a batch fills while the previous
        one waits for its fsync. (Two at a time measured slower: the work is CPU, not waiting.)"""
        last_start = 0.0
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()  # the first request to queue
            if len(self._queue) < self._enough:
                # Fewer wait than the previous commit carried: company is coming (the callers it
                # answered, under load), so wait for as many, but no longer than the interval
                # since the previous commit began.
                pause = last_start + self.commit_interval - time.monotonic()
                if pause > 0:
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), pause)
            last_start = time.monotonic()
            batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
            self._enough = len(batch)
            await self._commit(batch)

    async def close(self) -> None:
        if self._driver is not None:
            await self._driver.close()
            self._driver = None

    async def _commit(self, batch: list[_Pending]) -> None:
        events = [(p.topic, p.event, p.key, p.traceparent) for p in batch]
        rows = [p.row for p in batch if p.row is not None]
        try:
            if self.db.is_postgres:
                # One statement, one round trip, on a connection of this writer's own (see
                # Database.connect_driver): a transaction of separate statements costs four.
                if self._rows_sql is not None:
                    arrays = [[row[c] for row in rows] for c in self._columns]
                    statement, arguments = rows_with_events(self._rows_sql, arrays, events)
                else:
                    statement, arguments = events_statement(events)
                if self._driver is None:
                    self._driver = await self.db.connect_driver()
                try:
                    await self._driver.execute(statement, *arguments)
                except BaseException:
                    # Whether the statement committed is unknown only if the connection broke;
                    # then the requests fail (Unavailable) and the next batch opens a new one.
                    driver, self._driver = self._driver, None
                    driver.terminate()
                    raise
            else:
                async with self.db.transaction() as conn:
                    if self.table is not None:
                        await conn.execute(insert(self.table), rows)
                    await enqueue_many(conn, events)
        except Exception as exc:
            failure = Unavailable(f"{self._what} could not be recorded: {type(exc).__name__}")
            for p in batch:
                if not p.done.done():
                    p.done.set_exception(failure)
            return
        for p in batch:
            if not p.done.done():
                p.done.set_result(None)
        now = time.monotonic()
        if self.after_commit is not None and now - self._notified_at >= self.notify_seconds:
            self._notified_at = now
            self.after_commit()
