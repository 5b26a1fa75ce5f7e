"""Audit's tables, their migrations, and the reads of the API, verify and the checkpointer.

The log is kept as:

- ``entries``: one row per leaf, by index; the entry's JCS bytes (NULL once redacted: its leaf
  hash stays in the tiles), its event id (UNIQUE: the log itself deduplicates), and lookup
  columns taken from the entry (type, subject, record, commitment, actor, times). Entry bundles
  (``tile/entries/<N>``) are built from these rows, never stored.
- ``tiles``: one row per hash tile (level, index) holding its widest version; a narrower width
  is a prefix of it (see ``tlog``).
- ``side_lists``: long id lists an entry holds by SHA-256, keyed by that hash.
- ``checkpoints``: every signed note, verbatim, by origin and tree size.
- ``log_state``: one row, the tree's size and root as of the last append.

The tile readers and the reads and writes of one append are in ``tile_store``: two ways in,
SQLAlchemy (SQLite, and reads on either database) and asyncpg (the sequencer's append on
PostgreSQL: entries by COPY, the rest as one statement of arrays each; building SQLAlchemy
statements for thousands of rows cost more CPU than the database did).
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

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
    Text,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from medledger_runtime import guardians
from medledger_runtime.db import Migration
from medledger_runtime.errors import DataLoss
from medledger_verifier import tlog

metadata = MetaData()

entries = Table(
    "entries",
    metadata,
    Column("entry_index", BigInteger, primary_key=True, autoincrement=False),
    Column("event_id", String(200), nullable=False, unique=True),
    # The entry's JCS bytes; NULL once redacted (the leaf hash stays in the tiles).
    Column("entry", LargeBinary, nullable=True),
    Column("type", String(64), nullable=False),
    # HMAC of the patient id under the patient's audit key; unlinkable once the key is erased.
    Column("subject", String(128), nullable=True),
    Column("record_id", String(200), nullable=True),
    Column("commitment", String(200), nullable=True),
    Column("actor_id", String(200), nullable=True),
    Column("event_time", Float, nullable=False),
    Column("integrated_time", Float, nullable=False),
    Index("ix_entries_subject", "subject"),
    Index("ix_entries_record_id", "record_id"),
    Index("ix_entries_commitment", "commitment"),
    Index("ix_entries_actor_id", "actor_id"),
    Index("ix_entries_integrated_time", "integrated_time"),
)

tiles = Table(
    "tiles",
    metadata,
    Column("level", Integer, primary_key=True, autoincrement=False),
    Column("tile_index", BigInteger, primary_key=True, autoincrement=False),
    # The widest version of the tile: width * 32 bytes.
    Column("hashes", LargeBinary, nullable=False),
)

side_lists = Table(
    "side_lists",
    metadata,
    # SHA-256 (hex) of the list's JCS form, as the entry holds it.
    Column("hash", String(64), primary_key=True),
    Column("ids", Text, nullable=False),  # the JSON list
)

checkpoints = Table(
    "checkpoints",
    metadata,
    # A log that was rolled back continues under a new origin: sizes repeat across origins.
    Column("origin", String(255), primary_key=True),
    Column("tree_size", BigInteger, primary_key=True, autoincrement=False),
    Column("note", Text, nullable=False),  # the signed note, verbatim
    Column("signed_at", Float, nullable=False),
)

log_state = Table(
    "log_state",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("tree_size", BigInteger, nullable=False),
    Column("root", LargeBinary, nullable=False),
)


async def _create_log_tables(conn: AsyncConnection) -> None:
    await conn.run_sync(metadata.create_all)
    await conn.execute(insert(log_state).values(id=1, tree_size=0, root=tlog.EMPTY_ROOT))


MIGRATIONS: list[Migration] = [
    Migration(1, "entries, tiles, side lists, checkpoints and the log's state", _create_log_tables),
    guardians.migration(2),
]


class EntryRow(NamedTuple):
    """An entry as the sequencer writes it: a tuple in the columns' order, so COPY takes the rows
    as they are (thousands per append; building a tuple from each row cost a tenth of an append)."""

    entry_index: int
    event_id: str
    entry: bytes
    type: str
    subject: str | None
    record_id: str | None
    commitment: str | None
    actor_id: str | None
    event_time: float
    integrated_time: float


ENTRY_COLUMNS = [c.name for c in entries.columns]
assert list(EntryRow._fields) == ENTRY_COLUMNS, "EntryRow's fields are the entries columns, in order"


async def read_state(conn: AsyncConnection) -> tuple[int, bytes]:
    """The tree's size and root as of the last committed append."""
    row = (await conn.execute(select(log_state.c.tree_size, log_state.c.root).where(log_state.c.id == 1))).one()
    return int(row.tree_size), bytes(row.root)


async def find_state(conn: AsyncConnection) -> tuple[int, bytes] | None:
    """`read_state`, or None when the state row is gone (verify names that, it does not fail on it)."""
    row = (await conn.execute(select(log_state.c.tree_size, log_state.c.root).where(log_state.c.id == 1))).first()
    return None if row is None else (int(row.tree_size), bytes(row.root))


async def highest_entry_index(conn: AsyncConnection) -> int | None:
    found = await conn.scalar(select(func.max(entries.c.entry_index)))
    return None if found is None else int(found)


# --- reads for the API, verify and the checkpointer --------------------------------------------


async def read_entries(conn: AsyncConnection, start: int, end: int) -> list[Any]:
    """The entry rows of indexes [start, end), in index order (``entry`` is NULL if redacted)."""
    return list(
        await conn.execute(
            select(entries).where(entries.c.entry_index >= start, entries.c.entry_index < end).order_by("entry_index")
        )
    )


async def entry_bundle(conn: AsyncConnection, tile: tlog.Tile) -> bytes:
    """The C2SP entry bundle ``tile/entries/<N>[.p/<W>]`` built from the entry rows; DataLoss if
    an entry is missing or redacted (a bundle cannot hold a redacted entry)."""
    start = tile.index * tlog.TILE_WIDTH
    rows = await read_entries(conn, start, start + tile.width)
    if len(rows) != tile.width or any(r.entry is None for r in rows):
        raise DataLoss(f"entries of {tile.path()} are missing or redacted")
    return tlog.encode_entry_bundle([bytes(r.entry) for r in rows])


async def side_list(conn: AsyncConnection, digest: str) -> list[str] | None:
    ids = await conn.scalar(select(side_lists.c.ids).where(side_lists.c.hash == digest))
    return None if ids is None else list(json.loads(ids))


async def checkpoint_at(conn: AsyncConnection, origin: str, tree_size: int) -> str | None:
    """The signed note of the checkpoint at exactly this size, verbatim, if one was signed."""
    note = await conn.scalar(
        select(checkpoints.c.note).where(checkpoints.c.origin == origin, checkpoints.c.tree_size == tree_size)
    )
    return None if note is None else str(note)


async def latest_checkpoint(conn: AsyncConnection, origin: str) -> tuple[str, int] | None:
    """The latest signed note of this origin and its tree size."""
    row = (
        await conn.execute(
            select(checkpoints.c.note, checkpoints.c.tree_size)
            .where(checkpoints.c.origin == origin)
            .order_by(checkpoints.c.tree_size.desc())
            .limit(1)
        )
    ).first()
    return None if row is None else (str(row.note), int(row.tree_size))


async def store_checkpoint(conn: AsyncConnection, origin: str, tree_size: int, note: str, signed_at: float) -> None:
    await conn.execute(insert(checkpoints).values(origin=origin, tree_size=tree_size, note=note, signed_at=signed_at))


# --- reads for the API --------------------------------------------------------------------------


async def select_entries(
    conn: AsyncConnection,
    *,
    subject: str | None = None,
    actor_id: str = "",
    record_id: str = "",
    time_from: float | None = None,
    time_before: float | None = None,
    after_index: int = -1,
    limit: int = 100,
) -> list[Any]:
    """Entry rows matching every filter given, in index order, after `after_index`."""
    c = entries.c
    query = select(entries).where(c.entry_index > after_index)
    if subject is not None:
        query = query.where(c.subject == subject)
    if actor_id:
        query = query.where(c.actor_id == actor_id)
    if record_id:
        query = query.where(c.record_id == record_id)
    if time_from is not None:
        query = query.where(c.integrated_time >= time_from)
    if time_before is not None:
        query = query.where(c.integrated_time < time_before)
    return list(await conn.execute(query.order_by(c.entry_index).limit(limit)))


async def entry_by_commitment(conn: AsyncConnection, commitment: str) -> Any | None:
    """The (first) entry holding a record version's commitment."""
    c = entries.c
    return (await conn.execute(select(entries).where(c.commitment == commitment).order_by(c.entry_index))).first()


async def checkpoints_of(conn: AsyncConnection, origin: str) -> list[tuple[int, str]]:
    """Every signed checkpoint of this origin: (tree size, note verbatim), by size."""
    rows = await conn.execute(
        select(checkpoints.c.tree_size, checkpoints.c.note)
        .where(checkpoints.c.origin == origin)
        .order_by(checkpoints.c.tree_size)
    )
    return [(int(r.tree_size), str(r.note)) for r in rows]


async def redact_entry(conn: AsyncConnection, index: int) -> None:
    """Remove an entry's payload; its leaf hash stays in the tiles, so every proof still holds."""
    await conn.execute(update(entries).where(entries.c.entry_index == index).values(entry=None))


async def entry_index_of(conn: AsyncConnection, event_id: str) -> int | None:
    found = await conn.scalar(select(entries.c.entry_index).where(entries.c.event_id == event_id))
    return None if found is None else int(found)
