"""Consent's tables and queries."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Column, Integer, MetaData, String, Table, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from medledger_common.db import Migration, create_tables

metadata = MetaData()
# Consent's view of identity's principals, kept current from identity events; grants name
# principals, and a grant to an unknown principal is refused.
principal_directory = Table(
    "principal_directory",
    metadata,
    Column("principal_id", String(64), primary_key=True),
    Column("kind", Integer, nullable=False),
    Column("status", Integer, nullable=False),
    Column("organization_id", String(64), nullable=False),
    Column("version", Integer, nullable=False),
)

MIGRATIONS = [Migration(1, "principal directory", create_tables(metadata))]


@dataclass(frozen=True)
class KnownPrincipal:
    principal_id: str
    kind: int
    status: int
    organization_id: str
    version: int


async def upsert_principal(conn: AsyncConnection, p: KnownPrincipal) -> bool:
    """Apply a principal's state at `p.version`; an older version than the stored one is ignored."""
    values = {
        "principal_id": p.principal_id,
        "kind": p.kind,
        "status": p.status,
        "organization_id": p.organization_id,
        "version": p.version,
    }
    ins = (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(principal_directory)
    result = await conn.execute(
        ins.values(**values).on_conflict_do_update(
            index_elements=["principal_id"],
            set_={k: v for k, v in values.items() if k != "principal_id"},
            where=principal_directory.c.version < p.version,
        )
    )
    return bool(result.rowcount)


async def set_status(conn: AsyncConnection, principal_id: str, status: int, version: int) -> bool:
    result = await conn.execute(
        update(principal_directory)
        .where(principal_directory.c.principal_id == principal_id, principal_directory.c.version < version)
        .values(status=status, version=version)
    )
    return bool(result.rowcount)


async def get_principal(conn: AsyncConnection, principal_id: str) -> KnownPrincipal | None:
    r = (
        await conn.execute(select(principal_directory).where(principal_directory.c.principal_id == principal_id))
    ).first()
    return KnownPrincipal(r.principal_id, r.kind, r.status, r.organization_id, r.version) if r else None
