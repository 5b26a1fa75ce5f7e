"""Consent's queries on break-glass: organizations' policies, the accesses and their reviews,
and the justifications' ciphertexts (the tables are in ``storage``, with every migration)."""

from __future__ import annotations

from medledger.consent.v1 import consent_service_pb2 as pb
from sqlalchemy import and_, delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from medledger_consent.break_glass_rules import BreakGlassPolicy
from medledger_consent.domain import BreakGlassAccess
from medledger_consent.storage import (
    break_glass_accesses,
    break_glass_policies,
    justifications_under_old_keys,
    principal_directory,
    upsert,
)
from medledger_runtime.db import locked_page_after

PENDING_REVIEW = pb.BreakGlassReview.BREAK_GLASS_REVIEW_PENDING


async def set_policy(conn: AsyncConnection, p: BreakGlassPolicy) -> None:
    values = {
        "organization_id": p.organization_id,
        "enabled": int(p.enabled),
        "overrides_deny": int(p.overrides_deny),
        "access_seconds": p.access_seconds,
        "max_uses": p.max_uses,
        "rate_window_seconds": p.rate_window_seconds,
        "changed_by": p.changed_by,
        "changed_at": p.changed_at,
    }
    await conn.execute(upsert(conn, break_glass_policies, values, ["organization_id"]))


async def get_policy(conn: AsyncConnection, organization_id: str) -> BreakGlassPolicy:
    """The organization's policy; a disabled one when it never set any."""
    t = break_glass_policies.c
    r = (await conn.execute(select(break_glass_policies).where(t.organization_id == organization_id))).first()
    if r is None:
        return BreakGlassPolicy(organization_id)
    return BreakGlassPolicy(
        organization_id=r.organization_id,
        enabled=bool(r.enabled),
        overrides_deny=bool(r.overrides_deny),
        access_seconds=float(r.access_seconds),
        max_uses=int(r.max_uses),
        rate_window_seconds=float(r.rate_window_seconds),
        changed_by=r.changed_by,
        changed_at=float(r.changed_at),
    )


def _access(r: object) -> BreakGlassAccess:
    return BreakGlassAccess(
        access_id=r.access_id,  # type: ignore[attr-defined]
        patient_id=r.patient_id,  # type: ignore[attr-defined]
        practitioner_id=r.practitioner_id,  # type: ignore[attr-defined]
        organization_id=r.organization_id,  # type: ignore[attr-defined]
        reason=int(r.reason),  # type: ignore[attr-defined]
        justification_sha256=r.justification_sha256,  # type: ignore[attr-defined]
        started_at=float(r.started_at),  # type: ignore[attr-defined]
        expires_at=float(r.expires_at),  # type: ignore[attr-defined]
        overrides_deny=bool(r.overrides_deny),  # type: ignore[attr-defined]
        review=int(r.review),  # type: ignore[attr-defined]
        reviewed_by=r.reviewed_by,  # type: ignore[attr-defined]
        reviewed_at=None if r.reviewed_at is None else float(r.reviewed_at),  # type: ignore[attr-defined]
        ended_at=None if r.ended_at is None else float(r.ended_at),  # type: ignore[attr-defined]
    )


async def insert_access(conn: AsyncConnection, a: BreakGlassAccess, justification_ciphertext: str) -> None:
    await conn.execute(
        insert(break_glass_accesses).values(
            access_id=a.access_id,
            patient_id=a.patient_id,
            practitioner_id=a.practitioner_id,
            organization_id=a.organization_id,
            reason=a.reason,
            justification_sha256=a.justification_sha256,
            justification_ciphertext=justification_ciphertext,
            started_at=a.started_at,
            expires_at=a.expires_at,
            ended_at=a.ended_at,
            overrides_deny=int(a.overrides_deny),
            review=a.review,
            reviewed_by=a.reviewed_by,
            reviewed_at=a.reviewed_at,
            changed_at=a.started_at,
        )
    )


async def record_review(conn: AsyncConnection, a: BreakGlassAccess) -> None:
    await conn.execute(
        update(break_glass_accesses)
        .where(break_glass_accesses.c.access_id == a.access_id)
        .values(
            review=a.review,
            reviewed_by=a.reviewed_by,
            reviewed_at=a.reviewed_at,
            ended_at=a.ended_at,
            changed_at=a.reviewed_at,
        )
    )


async def get_access(
    conn: AsyncConnection, access_id: str, *, for_update: bool = False
) -> tuple[BreakGlassAccess, str] | None:
    """An access with its justification's ciphertext."""
    query = select(break_glass_accesses).where(break_glass_accesses.c.access_id == access_id)
    if for_update and conn.dialect.name == "postgresql":
        query = query.with_for_update()
    r = (await conn.execute(query)).first()
    return (_access(r), r.justification_ciphertext) if r else None


async def uses_since(conn: AsyncConnection, practitioner_id: str, since: float) -> int:
    t = break_glass_accesses.c
    query = select(func.count()).where(and_(t.practitioner_id == practitioner_id, t.started_at >= since))
    return int((await conn.execute(query)).scalar_one())


async def lock_principal(conn: AsyncConnection, principal_id: str) -> None:
    """Serializes a principal's concurrent requests (PostgreSQL; SQLite serializes writers)."""
    if conn.dialect.name == "postgresql":
        await conn.execute(
            select(principal_directory.c.principal_id)
            .where(principal_directory.c.principal_id == principal_id)
            .with_for_update()
        )


async def list_accesses(
    conn: AsyncConnection, organization_id: str, *, pending_only: bool, before: str, limit: int
) -> list[BreakGlassAccess]:
    """An organization's accesses, newest first (by id within a start time), after the page token
    `before` ("<started_at>/<access_id>")."""
    t = break_glass_accesses.c
    query = select(break_glass_accesses).where(t.organization_id == organization_id)
    if pending_only:
        query = query.where(t.review == PENDING_REVIEW)
    if before:
        started, _, access_id = before.partition("/")
        query = query.where(
            (t.started_at < float(started)) | and_(t.started_at == float(started), t.access_id < access_id)
        )
    rows = await conn.execute(query.order_by(t.started_at.desc(), t.access_id.desc()).limit(limit))
    return [_access(r) for r in rows]


async def accesses_changed_since(conn: AsyncConnection, since: float) -> list[BreakGlassAccess]:
    t = break_glass_accesses.c
    return [_access(r) for r in await conn.execute(select(break_glass_accesses).where(t.changed_at >= since))]


async def accesses_running_after(conn: AsyncConnection, since: float) -> list[BreakGlassAccess]:
    """Accesses that expire after `since`: the ones a decision from then on can depend on."""
    t = break_glass_accesses.c
    return [_access(r) for r in await conn.execute(select(break_glass_accesses).where(t.expires_at > since))]


async def pending_reviews(conn: AsyncConnection) -> int:
    t = break_glass_accesses.c
    return int((await conn.execute(select(func.count()).where(t.review == PENDING_REVIEW))).scalar_one())


# The key-owner migration, and erasures that completed before consent took part in them.


async def justifications_under_old_keys_after(conn: AsyncConnection, after: str, limit: int) -> list[str]:
    """Accesses whose justification is still under the old shared key, after ``after``, locked."""
    return await locked_page_after(conn, justifications_under_old_keys.c.access_id, after, limit)


async def justification_for_update(conn: AsyncConnection, access_id: str) -> tuple[str, str] | None:
    """(patient id, justification ciphertext) of an access, locked."""
    c = break_glass_accesses.c
    row = (
        await conn.execute(
            select(c.patient_id, c.justification_ciphertext).where(c.access_id == access_id).with_for_update()
        )
    ).first()
    return (row.patient_id, row.justification_ciphertext) if row else None


async def move_justification(conn: AsyncConnection, access_id: str, ciphertext: str) -> None:
    """Store the justification's ciphertext under consent's own key ('': it was unreadable
    already) and take the access off the list. Not a change of the access: changed_at stays."""
    c = break_glass_accesses.c
    await conn.execute(
        update(break_glass_accesses).where(c.access_id == access_id).values(justification_ciphertext=ciphertext)
    )
    await conn.execute(
        delete(justifications_under_old_keys).where(justifications_under_old_keys.c.access_id == access_id)
    )


async def forget_justifications(conn: AsyncConnection, patient_id: str) -> int:
    """Drop the justification ciphertexts of an erased patient's break-glass accesses (their key
    is gone already); the accesses themselves stay, with the justification's hash."""
    c = break_glass_accesses.c
    ids = select(c.access_id).where(c.patient_id == patient_id).scalar_subquery()
    await conn.execute(delete(justifications_under_old_keys).where(justifications_under_old_keys.c.access_id.in_(ids)))
    result = await conn.execute(
        update(break_glass_accesses)
        .where(c.patient_id == patient_id, c.justification_ciphertext != "")
        .values(justification_ciphertext="")
    )
    return int(result.rowcount or 0)
