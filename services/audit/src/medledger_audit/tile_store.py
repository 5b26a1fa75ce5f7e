"""Audit's tile readers over its tables, and the reads and writes of one append: through
SQLAlchemy (SQLite, and reads on either database) and through asyncpg (the sequencer's append on
PostgreSQL: entries by COPY, the rest as one statement of arrays each). Both answer a tile read in
ONE query. The tables and the other reads are in ``storage``."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import insert, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncConnection

from medledger_audit.storage import ENTRY_COLUMNS, EntryRow, entries, log_state, read_state, side_lists, tiles
from medledger_runtime.db import Database, dialect_insert
from medledger_runtime.errors import DataLoss
from medledger_verifier import tlog


def answer_tiles(wanted: Sequence[tlog.Tile], stored: Mapping[tuple[int, int], bytes]) -> list[bytes]:
    """Each wanted tile as the prefix of its stored (widest) version; DataLoss if missing or short."""
    out = []
    for tile in wanted:
        data = stored.get((tile.level, tile.index))
        if data is None or len(data) < tile.byte_length:
            raise DataLoss(f"tile {tile.path()} is missing from storage")
        out.append(bytes(data[: tile.byte_length]))
    return out


# --- SQLAlchemy (SQLite, and reads on either database) ----------------------------------------


class _OneQueryTiles:
    """A TileReader that reads every wanted tile in one query, by (level, index)."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    async def read_tiles(self, wanted: Sequence[tlog.Tile]) -> list[bytes]:
        if not wanted:
            return []
        return answer_tiles(wanted, await self._stored(sorted({(t.level, t.index) for t in wanted})))

    async def _stored(self, keys: list[tuple[int, int]]) -> Mapping[tuple[int, int], bytes]:
        raise NotImplementedError


class ConnectionTiles(_OneQueryTiles):
    """A TileReader on an open SQLAlchemy connection (inside a transaction when appending)."""

    conn: AsyncConnection

    async def _stored(self, keys: list[tuple[int, int]]) -> Mapping[tuple[int, int], bytes]:
        rows = await self.conn.execute(
            select(tiles.c.level, tiles.c.tile_index, tiles.c.hashes).where(
                tuple_(tiles.c.level, tiles.c.tile_index).in_(keys)
            )
        )
        return {(r.level, r.tile_index): r.hashes for r in rows}


class DatabaseTiles:
    """A TileReader over the database: one autocommit read per call. For proofs and roots at
    any size up to the current one (tiles only grow, so no snapshot is needed)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def read_tiles(self, wanted: Sequence[tlog.Tile]) -> list[bytes]:
        if not wanted:
            return []
        if self.db.is_postgres:
            # One statement through asyncpg itself: a proof is this one read, and through
            # SQLAlchemy's statement building it cost more than the query.
            async with self.db.driver() as driver:
                return await PgTiles(driver).read_tiles(wanted)
        async with self.db.read() as conn:
            return await ConnectionTiles(conn).read_tiles(wanted)


class SqlAppend:
    """The reads and writes of one append, on a SQLAlchemy connection in a transaction."""

    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn
        self.tiles = ConnectionTiles(conn)

    async def state(self) -> tuple[int, bytes]:
        return await read_state(self.conn)

    async def logged_event_ids(self, event_ids: Sequence[str]) -> set[str]:
        rows = await self.conn.execute(select(entries.c.event_id).where(entries.c.event_id.in_(event_ids)))
        return {r.event_id for r in rows}

    async def write(
        self,
        rows: Sequence[EntryRow],
        written_tiles: Mapping[tlog.Tile, bytes],
        lists: Mapping[str, list[str]],
        tree_size: int,
        root: bytes,
    ) -> None:
        conn = self.conn
        if rows:
            await conn.execute(insert(entries), [r._asdict() for r in rows])
        tile_rows = [{"level": t.level, "tile_index": t.index, "hashes": d} for t, d in written_tiles.items()]
        if tile_rows:
            upsert = dialect_insert(conn, tiles)
            await conn.execute(
                upsert.on_conflict_do_update(
                    index_elements=["level", "tile_index"], set_={"hashes": upsert.excluded.hashes}
                ),
                tile_rows,
            )
        if lists:
            await conn.execute(
                dialect_insert(conn, side_lists).on_conflict_do_nothing(),
                [{"hash": h, "ids": json.dumps(ids)} for h, ids in lists.items()],
            )
        await conn.execute(update(log_state).where(log_state.c.id == 1).values(tree_size=tree_size, root=root))


# --- asyncpg (the append on PostgreSQL) --------------------------------------------------------

_PG_READ_TILES = (
    "SELECT t.level, t.tile_index, t.hashes FROM tiles t "
    "JOIN unnest($1::int[], $2::bigint[]) AS w(level, tile_index) "
    "ON t.level = w.level AND t.tile_index = w.tile_index"
)
_PG_UPSERT_TILES = (
    "INSERT INTO tiles (level, tile_index, hashes) SELECT * FROM unnest($1::int[], $2::bigint[], $3::bytea[]) "
    "ON CONFLICT (level, tile_index) DO UPDATE SET hashes = EXCLUDED.hashes"
)
_PG_INSERT_LISTS = (
    "INSERT INTO side_lists (hash, ids) SELECT * FROM unnest($1::varchar[], $2::text[]) ON CONFLICT DO NOTHING"
)


class PgTiles(_OneQueryTiles):
    """A TileReader on an asyncpg connection."""

    async def _stored(self, keys: list[tuple[int, int]]) -> Mapping[tuple[int, int], bytes]:
        rows = await self.conn.fetch(_PG_READ_TILES, [k[0] for k in keys], [k[1] for k in keys])
        return {(r["level"], r["tile_index"]): r["hashes"] for r in rows}


class PgAppend:
    """The reads and writes of one append, on an asyncpg connection in a transaction: entries
    by COPY, every other write one statement of arrays, whatever the batch's size."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.tiles = PgTiles(conn)

    async def state(self) -> tuple[int, bytes]:
        row = await self.conn.fetchrow("SELECT tree_size, root FROM log_state WHERE id = 1")
        return int(row["tree_size"]), bytes(row["root"])

    async def logged_event_ids(self, event_ids: Sequence[str]) -> set[str]:
        rows = await self.conn.fetch("SELECT event_id FROM entries WHERE event_id = ANY($1::varchar[])", event_ids)
        return {r["event_id"] for r in rows}

    async def write(
        self,
        rows: Sequence[EntryRow],
        written_tiles: Mapping[tlog.Tile, bytes],
        lists: Mapping[str, list[str]],
        tree_size: int,
        root: bytes,
    ) -> None:
        conn = self.conn
        if rows:
            # COPY: for thousands of rows, cheaper for the server than INSERT ... unnest.
            await conn.copy_records_to_table("entries", records=rows, columns=ENTRY_COLUMNS)
        if written_tiles:
            items = list(written_tiles.items())
            await conn.execute(
                _PG_UPSERT_TILES, [t.level for t, _ in items], [t.index for t, _ in items], [d for _, d in items]
            )
        if lists:
            await conn.execute(_PG_INSERT_LISTS, list(lists), [json.dumps(ids) for ids in lists.values()])
        await conn.execute("UPDATE log_state SET tree_size = $1, root = $2 WHERE id = 1", tree_size, root)


@asynccontextmanager
async def pg_transaction(conn: Any) -> AsyncIterator[Any]:
    """An asyncpg transaction (typed here so callers need not import asyncpg)."""
    async with conn.transaction():
        yield conn
