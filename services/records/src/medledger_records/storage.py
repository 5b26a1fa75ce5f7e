"""Records' tables and queries. Only ciphertexts, wrapped data keys, salts and commitments are
stored, never content; the common outbox, inbox and idempotency tables are the runtime's."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    and_,
    delete,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from medledger_common.db import Migration, create_tables

metadata = MetaData()
# One row per record: whose it is, what it is, and its latest version.
records = Table(
    "records",
    metadata,
    Column("record_id", String(64), primary_key=True),
    Column("patient_id", String(64), nullable=False, index=True),
    Column("category", Integer, nullable=False),
    Column("media_type", String(255), nullable=False),
    # The FHIR resourceType; empty for documents.
    Column("resource_type", String(64), nullable=False),
    Column("latest_version", Integer, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
)
Index("ix_records_patient_updated", records.c.patient_id, records.c.updated_at)
# Every version: AES-256-GCM ciphertext under its own data key, the data key wrapped under the
# patient's key in the key manager, and the version's salted commitment.
record_versions = Table(
    "record_versions",
    metadata,
    Column("record_id", String(64), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("patient_id", String(64), nullable=False),
    Column("key_name", String(128), nullable=False),
    Column("wrapped_key", Text, nullable=False),
    Column("ciphertext", LargeBinary, nullable=False),
    Column("salt", LargeBinary, nullable=False),
    Column("commitment", String(64), nullable=False),
    Column("event_id", String(64), nullable=False),
    # FHIR Provenance, as far as medledger knows it: who wrote it, for which organization, when.
    Column("written_by", String(64), nullable=False),
    Column("organization_id", String(64), nullable=False),
    Column("written_at", Float, nullable=False),
)

# A key rotation in progress, per patient: resumable from the last version it rewrapped.
key_rotations = Table(
    "key_rotations",
    metadata,
    Column("patient_id", String(64), primary_key=True),
    Column("target_version", Integer, nullable=False),
    Column("done_record_id", String(64), nullable=False),
    Column("done_version", Integer, nullable=False),
    Column("started_at", Float, nullable=False),
)

MIGRATIONS = [Migration(1, "records and their versions", create_tables(metadata))]


@dataclass(frozen=True)
class Record:
    record_id: str
    patient_id: str
    category: int
    media_type: str
    latest_version: int
    resource_type: str = ""
    updated_at: float = 0.0


@dataclass(frozen=True)
class StoredVersion:
    record_id: str
    version: int
    patient_id: str
    key_name: str
    wrapped_key: str
    ciphertext: bytes
    salt: bytes
    commitment: str
    event_id: str


async def get_record(conn: AsyncConnection, record_id: str, *, for_update: bool = False) -> Record | None:
    query = select(records).where(records.c.record_id == record_id)
    if for_update and conn.dialect.name == "postgresql":
        query = query.with_for_update()
    r = (await conn.execute(query)).first()
    return _record(r) if r else None


def _record(r: Any) -> Record:
    return Record(
        r.record_id,
        r.patient_id,
        int(r.category),
        r.media_type,
        int(r.latest_version),
        r.resource_type,
        float(r.updated_at),
    )


async def insert_record(conn: AsyncConnection, record: Record, now: float) -> None:
    await conn.execute(
        insert(records).values(
            record_id=record.record_id,
            patient_id=record.patient_id,
            category=record.category,
            media_type=record.media_type,
            resource_type=record.resource_type,
            latest_version=record.latest_version,
            created_at=now,
            updated_at=now,
        )
    )


async def set_latest_version(conn: AsyncConnection, record_id: str, version: int, now: float) -> None:
    await conn.execute(
        update(records).where(records.c.record_id == record_id).values(latest_version=version, updated_at=now)
    )


async def list_records(
    conn: AsyncConnection,
    patient_id: str,
    *,
    categories: Sequence[int] = (),
    resource_type: str = "",
    updated_from: float | None = None,
    updated_before: float | None = None,
    after: tuple[float, str] | None = None,
    limit: int = 50,
) -> list[Record]:
    """A patient's records, newest update first, after the position `after` (updated_at, id)."""
    c = records.c
    query = select(records).where(c.patient_id == patient_id)
    if categories:
        query = query.where(c.category.in_(list(categories)))
    if resource_type:
        query = query.where(c.resource_type == resource_type)
    if updated_from is not None:
        query = query.where(c.updated_at >= updated_from)
    if updated_before is not None:
        query = query.where(c.updated_at < updated_before)
    if after is not None:
        query = query.where(or_(c.updated_at < after[0], and_(c.updated_at == after[0], c.record_id < after[1])))
    rows = await conn.execute(query.order_by(c.updated_at.desc(), c.record_id.desc()).limit(limit))
    return [_record(r) for r in rows]


async def insert_version(
    conn: AsyncConnection, v: StoredVersion, *, written_by: str, organization_id: str, now: float
) -> None:
    await conn.execute(
        insert(record_versions).values(
            record_id=v.record_id,
            version=v.version,
            patient_id=v.patient_id,
            key_name=v.key_name,
            wrapped_key=v.wrapped_key,
            ciphertext=v.ciphertext,
            salt=v.salt,
            commitment=v.commitment,
            event_id=v.event_id,
            written_by=written_by,
            organization_id=organization_id,
            written_at=now,
        )
    )


async def get_version(conn: AsyncConnection, record_id: str, version: int) -> StoredVersion | None:
    c = record_versions.c
    r = (await conn.execute(select(record_versions).where(c.record_id == record_id, c.version == version))).first()
    if r is None:
        return None
    return StoredVersion(
        r.record_id,
        int(r.version),
        r.patient_id,
        r.key_name,
        r.wrapped_key,
        bytes(r.ciphertext),
        bytes(r.salt),
        r.commitment,
        r.event_id,
    )


async def rotation_in_progress(conn: AsyncConnection, patient_id: str) -> tuple[int, str, int] | None:
    """(target key version, last record id and version rewrapped) of an unfinished rotation."""
    r = (await conn.execute(select(key_rotations).where(key_rotations.c.patient_id == patient_id))).first()
    return (int(r.target_version), r.done_record_id, int(r.done_version)) if r else None


async def start_rotation(conn: AsyncConnection, patient_id: str, target_version: int, now: float) -> None:
    await conn.execute(
        insert(key_rotations).values(
            patient_id=patient_id, target_version=target_version, done_record_id="", done_version=0, started_at=now
        )
    )


async def versions_after(
    conn: AsyncConnection, patient_id: str, record_id: str, version: int, limit: int
) -> list[tuple[str, int, str]]:
    """(record id, version, wrapped key) of a patient's versions after a position, in order."""
    c = record_versions.c
    rows = await conn.execute(
        select(c.record_id, c.version, c.wrapped_key)
        .where(c.patient_id == patient_id)
        .where(or_(c.record_id > record_id, and_(c.record_id == record_id, c.version > version)))
        .order_by(c.record_id, c.version)
        .limit(limit)
    )
    return [(r.record_id, int(r.version), r.wrapped_key) for r in rows]


async def set_wrapped_key(conn: AsyncConnection, record_id: str, version: int, wrapped_key: str) -> None:
    c = record_versions.c
    await conn.execute(
        update(record_versions).where(c.record_id == record_id, c.version == version).values(wrapped_key=wrapped_key)
    )


async def advance_rotation(conn: AsyncConnection, patient_id: str, record_id: str, version: int) -> None:
    await conn.execute(
        update(key_rotations)
        .where(key_rotations.c.patient_id == patient_id)
        .values(done_record_id=record_id, done_version=version)
    )


async def finish_rotation(conn: AsyncConnection, patient_id: str) -> None:
    await conn.execute(delete(key_rotations).where(key_rotations.c.patient_id == patient_id))
