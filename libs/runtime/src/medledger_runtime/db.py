"""Async database access (PostgreSQL in production, SQLite embedded) and per-service migrations.

Each service owns its database (or schema). Migrations are ordered steps per component, recorded
in ``schema_migrations``; the common tables (outbox, inbox, idempotency) are component "common".
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Column, Float, Integer, MetaData, String, Table, event, inspect, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

_meta = MetaData()
schema_migrations = Table(
    "schema_migrations",
    _meta,
    Column("component", String(64), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("name", String(200), nullable=False),
    Column("applied_at", Float, nullable=False),
)


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    apply: Callable[[AsyncConnection], Awaitable[None]]


def lock_key(name: str) -> int:
    """A stable signed 64-bit key for PostgreSQL advisory locks."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


class DriverQuery:
    """A SQLAlchemy Core query that runs through asyncpg itself on PostgreSQL.

    For hot reads of one statement: through SQLAlchemy, a pooled connection in autocommit and
    the statement cost about 200 µs of CPU here (pool and connection bookkeeping, the compiled
    cache, parameter and result processing), several times what asyncpg alone costs, and on a
    small machine that limits requests per second. The query is still written once, in
    SQLAlchemy, and compiled for asyncpg once; on SQLite it runs through SQLAlchemy as before.
    Rows are mappings by column label either way.
    """

    def __init__(self, statement: Any) -> None:
        from sqlalchemy.dialects.postgresql import asyncpg as pg_asyncpg

        self.statement = statement
        compiled = statement.compile(dialect=pg_asyncpg.dialect())  # type: ignore[no-untyped-call]
        self.sql: str = compiled.string
        self._names: list[str] = list(compiled.positiontup or ())
        self._fixed: dict[str, Any] = dict(compiled.params)  # literals the query holds as parameters

    async def first(self, db: Database, params: dict[str, Any]) -> Mapping[str, Any] | None:
        """The first row of the query with `params`, read on its own (autocommit)."""
        if db.is_postgres:
            async with db.driver() as driver:
                row: Mapping[str, Any] | None = await driver.fetchrow(
                    self.sql, *[params[n] if n in params else self._fixed[n] for n in self._names]
                )
            return row
        async with db.read() as conn:
            found = (await conn.execute(self.statement, params)).first()
        return None if found is None else dict(found._mapping)


class Database:
    def __init__(self, url: str, *, pool_size: int = 10) -> None:
        parsed = make_url(url)
        self.url = url
        self.dialect = parsed.get_backend_name()
        if self.dialect not in ("postgresql", "sqlite"):
            raise ValueError(f"unsupported database {self.dialect!r}: use postgresql or sqlite")
        self._sqlite_path: Path | None = None
        self._file_locks: dict[str, int] = {}
        self._local_locks: dict[str, asyncio.Lock] = {}
        if self.dialect == "sqlite":
            if parsed.database and parsed.database != ":memory:":
                self._sqlite_path = Path(parsed.database)
                self._sqlite_path.parent.mkdir(parents=True, exist_ok=True)
            self.engine: AsyncEngine = create_async_engine(url, connect_args={"timeout": 30})
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
        else:
            # No pre-ping: it costs a round trip per checkout, on every request. A connection that
            # died (a database restart) fails its statement once, and SQLAlchemy then drops the
            # whole pool, so one request per pool sees the error and retries.
            self.engine = create_async_engine(url, pool_size=pool_size, max_overflow=max(1, pool_size // 2))

    @property
    def is_postgres(self) -> bool:
        return self.dialect == "postgresql"

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncConnection]:
        async with self.engine.begin() as conn:
            yield conn

    @asynccontextmanager
    async def connect(self) -> AsyncIterator[AsyncConnection]:
        async with self.engine.connect() as conn:
            yield conn

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """A connection for reads that need no transaction of their own (one statement, or
        statements that need not see one snapshot): in autocommit, so PostgreSQL is spared the
        BEGIN and ROLLBACK round trips that `connect` costs around every use, which on a hot
        read path cost more than the query does."""
        async with self.engine.connect() as conn:
            if self.is_postgres:
                await conn.execution_options(isolation_level="AUTOCOMMIT")
            yield conn

    @asynccontextmanager
    async def driver(self) -> AsyncIterator[Any]:
        """PostgreSQL: a pooled connection's own asyncpg connection, for hot reads of one
        statement (`DriverQuery`, audit's tiles). Nothing goes through SQLAlchemy on it, so no
        transaction begins: each statement commits on its own."""
        async with self.engine.connect() as conn:
            yield (await conn.get_raw_connection()).driver_connection

    async def connect_driver(self) -> Any:
        """PostgreSQL: a plain asyncpg connection of its own, outside the pool, in autocommit.

        For a hot path that runs one statement at a time (consent's decision log): through
        SQLAlchemy a statement costs about three times the CPU of asyncpg alone, and on a small
        machine that is what limits throughput. Close it with `await conn.close()`.
        """
        import asyncpg

        if not self.is_postgres:
            raise ValueError("connect_driver is for PostgreSQL")
        url = make_url(self.url).set(drivername="postgresql")
        return await asyncpg.connect(url.render_as_string(hide_password=False))

    async def try_xact_lock(self, conn: AsyncConnection, name: str) -> bool:
        """Try to take lock `name` until `conn`'s transaction ends (one holder across replicas).

        PostgreSQL: a transaction-level advisory lock. SQLite, a single-host database: an
        exclusive file lock beside the database file, kept by this process once taken.
        """
        if self.is_postgres:
            got = await conn.scalar(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": lock_key(name)})
            return bool(got)
        return self._try_file_lock(name)

    def _try_file_lock(self, name: str) -> bool:
        if name in self._file_locks:
            return True
        if self._sqlite_path is None:
            return True  # an in-memory database is private to this process
        path = self._sqlite_path.with_name(f"{self._sqlite_path.name}.{name}.lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._file_locks[name] = fd
        return True

    async def migrate(self, component: str, migrations: Sequence[Migration]) -> list[str]:
        """Apply `component`'s migrations not yet applied, in order; returns what it applied."""
        applied: list[str] = []
        async with self.transaction() as conn:
            if self.is_postgres:
                await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": lock_key("migrations")})
            await conn.run_sync(_meta.create_all)
            done = set(
                (
                    await conn.execute(
                        select(schema_migrations.c.version).where(schema_migrations.c.component == component)
                    )
                ).scalars()
            )
            for m in sorted(migrations, key=lambda m: m.version):
                if m.version in done:
                    continue
                await m.apply(conn)
                await conn.execute(
                    schema_migrations.insert().values(
                        component=component, version=m.version, name=m.name, applied_at=time.time()
                    )
                )
                applied.append(f"{component} {m.version} {m.name}")
        return applied

    async def pending(self, component: str, migrations: Sequence[Migration]) -> list[str]:
        """`component`'s migrations not yet applied, by name; changes nothing."""
        async with self.connect() as conn:
            if not await conn.run_sync(lambda sync: inspect(sync).has_table(schema_migrations.name)):
                done: set[int] = set()
            else:
                done = set(
                    (
                        await conn.execute(
                            select(schema_migrations.c.version).where(schema_migrations.c.component == component)
                        )
                    ).scalars()
                )
        return [
            f"{component} {m.version} {m.name}"
            for m in sorted(migrations, key=lambda m: m.version)
            if m.version not in done
        ]

    async def ping(self) -> None:
        async with self.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def close(self) -> None:
        await self.engine.dispose()
        for fd in self._file_locks.values():
            os.close(fd)
        self._file_locks.clear()


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


async def locked_page_after(conn: AsyncConnection, column: Column[str], after: str, limit: int) -> list[str]:
    """Up to `limit` values of a work list's key `column` after `after`, in order, each row
    locked; rows another worker holds are skipped (a page each, for jobs run by every replica)."""
    rows = await conn.execute(
        select(column).where(column > after).order_by(column).limit(limit).with_for_update(skip_locked=True)
    )
    return [str(r) for r in rows.scalars()]


def dialect_insert(conn: AsyncConnection, table: Table) -> Any:
    """`table`'s INSERT in the connection's own dialect, for ON CONFLICT clauses: PostgreSQL's
    and SQLite's share the SQL syntax, not the SQLAlchemy construct."""
    return (postgresql if conn.dialect.name == "postgresql" else sqlite).insert(table)


def create_tables(metadata: MetaData) -> Callable[[AsyncConnection], Awaitable[None]]:
    """A migration step that creates `metadata`'s tables (dialect-portable DDL)."""

    async def apply(conn: AsyncConnection) -> None:
        await conn.run_sync(metadata.create_all)

    return apply
