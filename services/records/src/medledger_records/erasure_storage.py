"""Records' queries on erasures, their participants' confirmations and legal holds, and the
erasure of a patient's record data itself (the tables are in ``storage``, with every migration)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, bindparam, delete, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from medledger_records.storage import (
    erasure_confirmations,
    erasures,
    legal_holds,
    record_versions,
    records,
    search_terms,
)
from medledger_runtime.db import dialect_insert


@dataclass(frozen=True)
class ErasureRow:
    erasure_id: str
    patient_id: str
    state: int
    requested_by: str
    requested_at: float
    reason: str
    runs_after: float
    approved_by: str = ""
    approved_at: float | None = None
    key_versions: tuple[int, ...] = ()
    certificate: bytes | None = None
    participants: tuple[str, ...] = ()
    records_erased: int | None = None
    versions_erased: int | None = None
    signed_certificate: str | None = None


@dataclass(frozen=True)
class LegalHoldRow:
    hold_id: str
    patient_id: str
    reason: str
    placed_by: str
    placed_at: float
    released_by: str = ""
    released_at: float | None = None


def _erasure(r: Any) -> ErasureRow:
    return ErasureRow(
        r.erasure_id,
        r.patient_id,
        int(r.state),
        r.requested_by,
        float(r.requested_at),
        r.reason,
        float(r.runs_after),
        r.approved_by,
        None if r.approved_at is None else float(r.approved_at),
        tuple(int(v) for v in r.key_versions.split(",") if v),
        None if r.certificate is None else bytes(r.certificate),
        tuple(p for p in r.participants.split(",") if p),
        r.records_erased,
        r.versions_erased,
        r.signed_certificate,
    )


async def insert_erasure(conn: AsyncConnection, e: ErasureRow) -> None:
    await conn.execute(
        insert(erasures).values(
            erasure_id=e.erasure_id,
            patient_id=e.patient_id,
            state=e.state,
            requested_by=e.requested_by,
            requested_at=e.requested_at,
            reason=e.reason,
            runs_after=e.runs_after,
            approved_by="",
            key_versions="",
        )
    )


async def get_erasure(conn: AsyncConnection, erasure_id: str) -> ErasureRow | None:
    r = (await conn.execute(select(erasures).where(erasures.c.erasure_id == erasure_id))).first()
    return _erasure(r) if r else None


_ERASURES_OF = (
    select(erasures)
    .where(erasures.c.patient_id == bindparam("patient_id"), erasures.c.state.in_(bindparam("states", expanding=True)))
    .order_by(erasures.c.requested_at)
)


async def erasures_of(conn: AsyncConnection, patient_id: str, states: Sequence[int]) -> list[ErasureRow]:
    rows = await conn.execute(_ERASURES_OF, {"patient_id": patient_id, "states": list(states)})
    return [_erasure(r) for r in rows]


async def set_erasure_state(conn: AsyncConnection, erasure_id: str, from_state: int, **values: Any) -> bool:
    """Move an erasure on from `from_state` (with `values`); False if it was no longer there."""
    c = erasures.c
    if "key_versions" in values:
        values["key_versions"] = ",".join(str(v) for v in values["key_versions"])
    if "participants" in values:
        values["participants"] = ",".join(values["participants"])
    result = await conn.execute(
        update(erasures).where(c.erasure_id == erasure_id, c.state == from_state).values(**values)
    )
    return bool(result.rowcount)


async def erasures_to_run(conn: AsyncConnection, pending: int, running: int, now: float) -> list[ErasureRow]:
    """Running erasures (to finish after a crash) and pending ones past their grace period."""
    c = erasures.c
    rows = await conn.execute(
        select(erasures)
        .where(or_(c.state == running, and_(c.state == pending, c.runs_after <= now)))
        .order_by(c.requested_at)
    )
    return [_erasure(r) for r in rows]


async def running_erasures(conn: AsyncConnection, running: int) -> list[ErasureRow]:
    rows = await conn.execute(select(erasures).where(erasures.c.state == running))
    return [_erasure(r) for r in rows]


async def add_confirmation(
    conn: AsyncConnection, erasure_id: str, participant: str, confirmation: bytes, now: float
) -> bool:
    """Store a participant's confirmation unless one is stored; True if this one was."""
    values = {"erasure_id": erasure_id, "participant": participant, "confirmation": confirmation, "confirmed_at": now}
    result = await conn.execute(dialect_insert(conn, erasure_confirmations).values(**values).on_conflict_do_nothing())
    return bool(result.rowcount)


async def confirmations_of(conn: AsyncConnection, erasure_id: str) -> dict[str, tuple[bytes, float]]:
    """Each confirmed participant's confirmation (a serialized PatientKeysDestroyed) and when."""
    c = erasure_confirmations.c
    rows = await conn.execute(select(erasure_confirmations).where(c.erasure_id == erasure_id))
    return {r.participant: (bytes(r.confirmation), float(r.confirmed_at)) for r in rows}


def _hold(r: Any) -> LegalHoldRow:
    return LegalHoldRow(
        r.hold_id,
        r.patient_id,
        r.reason,
        r.placed_by,
        float(r.placed_at),
        r.released_by,
        None if r.released_at is None else float(r.released_at),
    )


async def insert_hold(conn: AsyncConnection, h: LegalHoldRow) -> None:
    await conn.execute(
        insert(legal_holds).values(
            hold_id=h.hold_id,
            patient_id=h.patient_id,
            reason=h.reason,
            placed_by=h.placed_by,
            placed_at=h.placed_at,
            released_by="",
        )
    )


async def get_hold(conn: AsyncConnection, hold_id: str) -> LegalHoldRow | None:
    r = (await conn.execute(select(legal_holds).where(legal_holds.c.hold_id == hold_id))).first()
    return _hold(r) if r else None


async def holds_in_force(conn: AsyncConnection, patient_id: str) -> list[LegalHoldRow]:
    c = legal_holds.c
    rows = await conn.execute(select(legal_holds).where(c.patient_id == patient_id, c.released_at.is_(None)))
    return [_hold(r) for r in rows]


async def release_hold(conn: AsyncConnection, hold_id: str, released_by: str, now: float) -> bool:
    c = legal_holds.c
    result = await conn.execute(
        update(legal_holds)
        .where(c.hold_id == hold_id, c.released_at.is_(None))
        .values(released_by=released_by, released_at=now)
    )
    return bool(result.rowcount)


async def blob_keys_of(conn: AsyncConnection, patient_id: str) -> list[str]:
    c = record_versions.c
    rows = await conn.execute(select(c.blob_key).where(c.patient_id == patient_id, c.blob_key != ""))
    return [r.blob_key for r in rows]


async def erase_patient_data(conn: AsyncConnection, patient_id: str, now: float) -> tuple[int, int]:
    """Drop everything of a patient's records but ids, versions and commitments (which the
    transparency log holds anyway): ciphertexts, wrapped keys, salts, categories, types, who
    wrote them and when. Returns how many records and versions there were."""
    v = record_versions.c
    versions = await conn.execute(
        update(record_versions)
        .where(v.patient_id == patient_id)
        .values(
            key_name="",
            wrapped_key="",
            ciphertext=b"",
            salt=b"",
            blob_key="",
            written_by="",
            organization_id="",
            written_at=0.0,
        )
    )
    # The blind index: its key is gone, but its rows would still say which records share a term.
    await conn.execute(delete(search_terms).where(search_terms.c.patient_id == patient_id))
    r = records.c
    erased = await conn.execute(
        update(records)
        .where(r.patient_id == patient_id)
        .values(category=0, media_type="", resource_type="", created_at=now, updated_at=now, erased_at=now)
    )
    return int(erased.rowcount), int(versions.rowcount)
