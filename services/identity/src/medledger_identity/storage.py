"""Identity's tables and queries."""

from __future__ import annotations

import time
from dataclasses import dataclass

from medledger.types.v1 import vocabulary_pb2
from sqlalchemy import Column, Float, Integer, MetaData, String, Table, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection

from medledger_common.db import Migration, create_tables

metadata = MetaData()
principals = Table(
    "principals",
    metadata,
    Column("principal_id", String(64), primary_key=True),
    Column("kind", Integer, nullable=False),
    Column("status", Integer, nullable=False),
    Column("organization_id", String(64), nullable=False, default=""),
    Column("version", Integer, nullable=False),
    Column("created_at", Float, nullable=False),
)

MIGRATIONS = [Migration(1, "principals", create_tables(metadata))]


@dataclass(frozen=True)
class PrincipalRow:
    principal_id: str
    kind: vocabulary_pb2.PrincipalKind.ValueType
    status: vocabulary_pb2.PrincipalStatus.ValueType
    organization_id: str
    version: int


async def insert_principal(conn: AsyncConnection, row: PrincipalRow) -> None:
    await conn.execute(
        insert(principals).values(
            principal_id=row.principal_id,
            kind=row.kind,
            status=row.status,
            organization_id=row.organization_id,
            version=row.version,
            created_at=time.time(),
        )
    )


async def get_principal(conn: AsyncConnection, principal_id: str) -> PrincipalRow | None:
    r = (await conn.execute(select(principals).where(principals.c.principal_id == principal_id))).first()
    if r is None:
        return None
    return PrincipalRow(
        r.principal_id,
        vocabulary_pb2.PrincipalKind.ValueType(r.kind),
        vocabulary_pb2.PrincipalStatus.ValueType(r.status),
        r.organization_id,
        r.version,
    )
