"""The transactional outbox and the idempotent inbox: their tables, and the writes a service makes.

A service writes its state change and its event in one transaction (``enqueue``); the relay
(``medledger_runtime.outbox_relay``) publishes the rows at least once, and consumers deduplicate
by event id through the inbox (``claim_inbox``), written in the same transaction as their effect.
The idempotency keys' table is here too: the three make every service's first migration.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry import propagate
from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    insert,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from medledger_runtime.db import Migration, create_tables, dialect_insert
from medledger_runtime.events import Event

metadata = MetaData()
# BIGINT on PostgreSQL; INTEGER on SQLite, where only INTEGER PRIMARY KEY autoincrements.
_Id = BigInteger().with_variant(Integer(), "sqlite")

outbox = Table(
    "outbox",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("event_id", String(64), nullable=False),
    Column("topic", String(255), nullable=False),
    Column("key", LargeBinary, nullable=True),
    Column("value", LargeBinary, nullable=False),
    # The producing request's W3C trace context, sent with the message.
    Column("traceparent", String(128), nullable=True),
    Column("tracestate", String(512), nullable=True),
    Column("created_at", Float, nullable=False),
    Column("published_at", Float, nullable=True),
    Index(
        "ix_outbox_unpublished",
        "id",
        postgresql_where=Column("published_at").is_(None),
        sqlite_where=Column("published_at").is_(None),
    ),
    Index("ix_outbox_published_at", "published_at"),
)

# Per partition, the first offset of the newest batch the broker acknowledged. A broker whose
# end offset is not past it has lost acknowledged data, and the retained rows of that topic are
# published again. (The first offset, not the last: Tansu reports a partition's end as the
# newest record batch's base offset + 1, so only offsets at batch starts are comparable.)
outbox_watermarks = Table(
    "outbox_watermarks",
    metadata,
    Column("topic", String(255), primary_key=True),
    Column("partition", Integer, primary_key=True),
    Column("acked_offset", BigInteger, nullable=False),
)

inbox = Table(
    "inbox",
    metadata,
    Column("consumer", String(128), primary_key=True),
    Column("event_id", String(64), primary_key=True),
    Column("received_at", Float, nullable=False),
)

idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    Column("scope", String(128), primary_key=True),
    Column("request_id", String(128), primary_key=True),
    Column("request_hash", LargeBinary, nullable=False),
    Column("response", LargeBinary, nullable=False),
    Column("created_at", Float, nullable=False),
)

COMMON_MIGRATIONS = [Migration(1, "outbox, inbox and idempotency keys", create_tables(metadata))]


_INSERT_OUTBOX = insert(outbox)


def current_traceparent() -> str | None:
    """The W3C traceparent of the current span, as an outbox row keeps it (enqueue_many's)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent")


async def enqueue(conn: AsyncConnection, topic: str, event: Event, key: bytes | None = None) -> None:
    """Write `event` to the outbox inside the caller's transaction."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    await conn.execute(
        _INSERT_OUTBOX,  # prebuilt: statement building costs more CPU than the insert itself
        {
            "event_id": event.id,
            "topic": topic,
            "key": key,
            "value": event.SerializeToString(),
            "traceparent": carrier.get("traceparent"),
            "tracestate": carrier.get("tracestate"),
            "created_at": time.time(),
        },
    )


async def enqueue_many(conn: AsyncConnection, items: Sequence[tuple[str, Event, bytes | None, str | None]]) -> None:
    """Write many events to the outbox in one statement: (topic, event, key, traceparent) each,
    the traceparent of the request that caused it (several requests share one transaction)."""
    if not items:
        return
    now = time.time()
    await conn.execute(
        insert(outbox),
        [
            {
                "event_id": event.id,
                "topic": topic,
                "key": key,
                "value": event.SerializeToString(),
                "traceparent": traceparent,
                "tracestate": None,
                "created_at": now,
            }
            for topic, event, key, traceparent in items
        ],
    )


# PostgreSQL: outbox rows from arrays, $1..$7 shifted by the statement it follows.
_OUTBOX_FROM_ARRAYS = (
    "INSERT INTO outbox (event_id, topic, key, value, traceparent, tracestate, created_at) "
    "SELECT * FROM unnest(${0}::varchar[], ${1}::varchar[], ${2}::bytea[], ${3}::bytea[], "
    "${4}::varchar[], ${5}::varchar[], ${6}::float8[])"
)


def _outbox_arrays(items: Sequence[tuple[str, Event, bytes | None, str | None]]) -> list[list[Any]]:
    now = time.time()
    arrays: list[list[Any]] = [[], [], [], [], [], [], []]
    for topic, event, key, traceparent in items:
        for column, value in zip(
            arrays, (event.id, topic, key, event.SerializeToString(), traceparent, None, now), strict=True
        ):
            column.append(value)
    return arrays


def events_statement(items: Sequence[tuple[str, Event, bytes | None, str | None]]) -> tuple[str, tuple[Any, ...]]:
    """PostgreSQL: ONE statement (and its parameters) that writes events to the outbox. Items
    are as in `enqueue_many`."""
    return _OUTBOX_FROM_ARRAYS.format(*range(1, 8)), tuple(_outbox_arrays(items))


def rows_with_events(
    rows_sql: str,
    row_arrays: Sequence[Sequence[Any]],
    items: Sequence[tuple[str, Event, bytes | None, str | None]],
) -> tuple[str, tuple[Any, ...]]:
    """PostgreSQL: ONE statement (and its parameters) that inserts rows of a service table and
    their events into the outbox: one round trip, atomic as every statement is.

    `rows_sql` is an `INSERT ... SELECT * FROM unnest($1::type[], ..., $n::type[])` taking
    `row_arrays` (one list per column; see group_commit.unnest_insert). Items are as in
    `enqueue_many`. For hot paths, run it in autocommit mode (see group_commit).
    """
    n = len(row_arrays)
    statement = f"WITH service_rows AS ({rows_sql}) " + _OUTBOX_FROM_ARRAYS.format(*range(n + 1, n + 8))
    return statement, (*row_arrays, *_outbox_arrays(items))


async def claim_inbox(conn: AsyncConnection, consumer: str, event_id: str) -> bool:
    """Record `event_id` as handled by `consumer` in the caller's transaction.

    Returns False when it was handled before: the caller then skips its effect.
    """
    values = {"consumer": consumer, "event_id": event_id, "received_at": time.time()}
    result = await conn.execute(dialect_insert(conn, inbox).values(**values).on_conflict_do_nothing())
    return bool(result.rowcount)


if TYPE_CHECKING:
    from medledger_runtime.outbox_relay import OutboxRelay as OutboxRelay
