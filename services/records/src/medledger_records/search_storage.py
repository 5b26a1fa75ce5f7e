"""The queries of FHIR search (``search.py``): the blind index of each record's latest version
(``storage.search_terms``: record id and term HMACs only) and the searches over it, in SQL."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import and_, delete, func, insert, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection

from medledger_records.storage import (
    Record,
    StoredVersion,
    _record_of,
    _stored_version,
    record_versions,
    records,
    search_terms,
)

_INSERT_TERM = insert(search_terms)


async def replace_terms(conn: AsyncConnection, patient_id: str, record_id: str, hashes: Sequence[bytes]) -> None:
    """The record's index becomes `hashes` (its latest version's): the previous version's go."""
    await conn.execute(delete(search_terms).where(search_terms.c.record_id == record_id))
    await insert_terms(conn, term_rows(patient_id, record_id, hashes))


def term_rows(patient_id: str, record_id: str, hashes: Sequence[bytes]) -> list[dict[str, Any]]:
    return [{"record_id": record_id, "term": h, "patient_id": patient_id} for h in sorted(set(hashes))]


async def insert_terms(conn: AsyncConnection, rows: Sequence[dict[str, Any]]) -> None:
    """The terms of new records (nothing to replace), many records' in one statement."""
    if rows:
        await conn.execute(_INSERT_TERM, list(rows))


async def delete_terms_of(conn: AsyncConnection, patient_id: str) -> None:
    """An erasure drops the patient's index (its key is gone already, so it matches nothing)."""
    await conn.execute(delete(search_terms).where(search_terms.c.patient_id == patient_id))


async def unindexed_after(conn: AsyncConnection, resource_types: Sequence[str], after: str, limit: int) -> list[str]:
    """FHIR records of the indexed types with no index rows (written before the index existed,
    or without any term), by record id after `after`."""
    c, t = records.c, search_terms.c
    query = (
        select(c.record_id)
        .where(
            c.resource_type.in_(list(resource_types)),
            c.erased_at.is_(None),
            c.record_id > after,
            ~select(t.record_id).where(t.record_id == c.record_id).exists(),
        )
        .order_by(c.record_id)
        .limit(limit)
    )
    return [r.record_id for r in await conn.execute(query)]


async def categories_of(conn: AsyncConnection, patient_id: str, resource_type: str) -> list[int]:
    """The categories the patient's records of this type are in: consent is asked about these."""
    c = records.c
    rows = await conn.execute(
        select(c.category)
        .where(c.patient_id == patient_id, c.resource_type == resource_type, c.erased_at.is_(None))
        .distinct()
        .order_by(c.category)
    )
    return [int(r.category) for r in rows]


@dataclass(frozen=True)
class Criteria:
    """What SQL decides: the compartment, type, permitted categories, `_id`, `_lastUpdated`
    bounds (from inclusive, before exclusive) and the token matches (each a set of term HMACs,
    any of which must be in the record's index; every set must be matched)."""

    patient_id: str
    resource_type: str
    categories: Sequence[int]
    record_ids: Sequence[str] = ()
    updated: Sequence[tuple[float | None, float | None]] = ()
    tokens: Sequence[Sequence[bytes]] = field(default_factory=tuple)


def _where(criteria: Criteria) -> list[Any]:
    c = records.c
    clauses: list[Any] = [
        c.patient_id == criteria.patient_id,
        c.resource_type == criteria.resource_type,
        c.erased_at.is_(None),
        c.category.in_(list(criteria.categories)),
    ]
    if criteria.record_ids:
        clauses.append(c.record_id.in_(list(criteria.record_ids)))
    for low, high in criteria.updated:
        if low is not None:
            clauses.append(c.updated_at >= low)
        if high is not None:
            clauses.append(c.updated_at < high)
    t = search_terms.c
    for hashes in criteria.tokens:
        clauses.append(
            c.record_id.in_(select(t.record_id).where(t.patient_id == criteria.patient_id, t.term.in_(list(hashes))))
        )
    return clauses


async def count(conn: AsyncConnection, criteria: Criteria) -> int:
    query = select(func.count()).select_from(records).where(*_where(criteria))
    return int((await conn.execute(query)).scalar_one())


async def find(
    conn: AsyncConnection, criteria: Criteria, *, after: tuple[float, str] | None = None, limit: int
) -> list[Record]:
    """Matching records, newest update first then by id (the order of ListRecords), after the
    position `after` (updated_at, record_id)."""
    c = records.c
    query = select(records).where(*_where(criteria))
    if after is not None:
        query = query.where(or_(c.updated_at < after[0], and_(c.updated_at == after[0], c.record_id < after[1])))
    rows = await conn.execute(query.order_by(c.updated_at.desc(), c.record_id.desc()).limit(limit))
    return [_record_of(dict(r._mapping)) for r in rows]


async def latest_versions(conn: AsyncConnection, found: Sequence[Record]) -> dict[str, StoredVersion]:
    """Each record's latest version, in one query."""
    if not found:
        return {}
    v = record_versions.c
    wanted = [and_(v.record_id == r.record_id, v.version == r.latest_version) for r in found]
    rows = await conn.execute(select(record_versions).where(or_(*wanted)))
    return {row.record_id: _stored_version(row._mapping) for row in rows}
