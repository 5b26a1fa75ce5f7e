"""Records' queries on the wrapping of data keys: a patient's key rotation (resumable, from
the last version it rewrapped) and the key-owner migration off the old shared patient keys (the
tables are in ``storage``, with every migration)."""

from __future__ import annotations

from sqlalchemy import and_, delete, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from medledger_records.storage import key_rotations, record_versions

# A patient's key rotation.


async def rotation_in_progress(conn: AsyncConnection, patient_id: str) -> tuple[int, str, int] | None:
    """(target key version, last record id and version rewrapped) of an unfinished rotation."""
    r = (await conn.execute(select(key_rotations).where(key_rotations.c.patient_id == patient_id))).first()
    return (int(r.target_version), r.done_record_id, int(r.done_version)) if r else None


async def rotations_in_progress(conn: AsyncConnection) -> list[str]:
    """The patients whose key rotation has not finished."""
    rows = await conn.execute(select(key_rotations.c.patient_id).order_by(key_rotations.c.patient_id))
    return [str(r) for r in rows.scalars()]


async def start_rotation(conn: AsyncConnection, patient_id: str, target_version: int, now: float) -> None:
    await conn.execute(
        insert(key_rotations).values(
            patient_id=patient_id, target_version=target_version, done_record_id="", done_version=0, started_at=now
        )
    )


async def versions_after(
    conn: AsyncConnection, patient_id: str, record_id: str, version: int, limit: int, *, key_name: str | None = None
) -> list[tuple[str, int, str]]:
    """(record id, version, wrapped key) of a patient's versions after a position, in order; with
    ``key_name``, only those wrapped under that key."""
    c = record_versions.c
    query = (
        select(c.record_id, c.version, c.wrapped_key)
        .where(c.patient_id == patient_id)
        .where(or_(c.record_id > record_id, and_(c.record_id == record_id, c.version > version)))
        .order_by(c.record_id, c.version)
        .limit(limit)
    )
    if key_name is not None:
        query = query.where(c.key_name == key_name)
    rows = await conn.execute(query)
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


# The key-owner migration: versions whose data key is wrapped under the old shared patient-<id>.


async def versions_under_old_keys_after(
    conn: AsyncConnection, record_id: str, version: int, limit: int
) -> list[tuple[str, int]]:
    """(record id, version) of versions still wrapped under an old shared key, after a position,
    in order, locked (erased versions have no wrapped key any more)."""
    c = record_versions.c
    rows = await conn.execute(
        select(c.record_id, c.version)
        .where(c.key_name.like("patient-%"), c.wrapped_key != "")
        .where(or_(c.record_id > record_id, and_(c.record_id == record_id, c.version > version)))
        .order_by(c.record_id, c.version)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return [(r.record_id, int(r.version)) for r in rows]


async def wrapped_key_for_update(conn: AsyncConnection, record_id: str, version: int) -> tuple[str, str, str] | None:
    """(patient id, key name, wrapped key) of a version, locked."""
    c = record_versions.c
    row = (
        await conn.execute(
            select(c.patient_id, c.key_name, c.wrapped_key)
            .where(c.record_id == record_id, c.version == version)
            .with_for_update()
        )
    ).first()
    return (row.patient_id, row.key_name, row.wrapped_key) if row else None


async def rewrap_under(conn: AsyncConnection, record_id: str, version: int, key_name: str, wrapped_key: str) -> None:
    c = record_versions.c
    await conn.execute(
        update(record_versions)
        .where(c.record_id == record_id, c.version == version)
        .values(key_name=key_name, wrapped_key=wrapped_key)
    )
