"""Anchoring's tables: the log's signed checkpoints as the audit service announced them, the
anchors the chain accepted, and the consent commitments waiting to be written on chain.

The chain, not these tables, decides what is anchored: the sender reads the contract's latest
checkpoint before every transaction. The tables remember what the chain said (transaction, block)
so proofs can name it, and are corrected when the chain changes its mind (a reorg).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    delete,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from medledger_runtime.db import Migration, create_tables

metadata = MetaData()

signed_checkpoints = Table(
    "signed_checkpoints",
    metadata,
    Column("origin", String(255), primary_key=True),
    Column("tree_size", BigInteger, primary_key=True),
    Column("root", LargeBinary(32), nullable=False),
    # The C2SP signed note, verbatim (Ed25519 and P-256 signatures).
    Column("note", Text, nullable=False),
    Column("received_at", Float, nullable=False),
)

anchors = Table(
    "anchors",
    metadata,
    Column("origin", String(255), primary_key=True),
    Column("tree_size", BigInteger, primary_key=True),
    Column("root", LargeBinary(32), nullable=False),
    Column("previous_size", BigInteger, nullable=False),
    Column("chain_id", BigInteger, nullable=False),
    Column("contract_address", String(42), nullable=False),
    Column("transaction_hash", String(66), nullable=False),
    Column("block_number", BigInteger, nullable=False),
    Column("block_time", Float, nullable=False),
    Column("gas_used", BigInteger, nullable=False),
    Column("recorded_at", Float, nullable=False),
)

# Consent versions to write to ConsentRegistry, in the order they were recorded.
consent_writes = Table(
    "consent_writes",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("event_id", String(64), nullable=False, unique=True),
    Column("consent_id", String(64), nullable=False, index=True),
    Column("version", BigInteger, nullable=False),
    Column("commitment", String(64), nullable=False),
    Column("revoked", Integer, nullable=False),
    Column("valid_from", BigInteger, nullable=False),
    Column("valid_until", BigInteger, nullable=False),
    # pending, done, or failed (the contract refused it: the reason is kept).
    Column("status", String(16), nullable=False, index=True),
    Column("transaction_hash", String(66), nullable=True),
    Column("detail", Text, nullable=True),
)

MIGRATIONS = [Migration(1, "signed checkpoints, anchors and consent writes", create_tables(metadata))]


@dataclass(frozen=True)
class SignedCheckpoint:
    origin: str
    tree_size: int
    root: bytes
    note: str
    received_at: float


@dataclass(frozen=True)
class AnchorRow:
    origin: str
    tree_size: int
    root: bytes
    previous_size: int
    chain_id: int
    contract_address: str
    transaction_hash: str
    block_number: int
    block_time: float
    gas_used: int


async def save_signed_checkpoint(conn: AsyncConnection, checkpoint: SignedCheckpoint) -> bool:
    """Keep a checkpoint the log announced; False when it was known already (redelivery)."""
    known = await conn.scalar(
        select(signed_checkpoints.c.root).where(
            signed_checkpoints.c.origin == checkpoint.origin, signed_checkpoints.c.tree_size == checkpoint.tree_size
        )
    )
    if known is not None:
        return False
    await conn.execute(
        insert(signed_checkpoints).values(
            origin=checkpoint.origin,
            tree_size=checkpoint.tree_size,
            root=checkpoint.root,
            note=checkpoint.note,
            received_at=checkpoint.received_at,
        )
    )
    return True


def _checkpoint(row: object) -> SignedCheckpoint:
    return SignedCheckpoint(row.origin, row.tree_size, row.root, row.note, row.received_at)  # type: ignore[attr-defined]


async def newest_signed_checkpoint(conn: AsyncConnection, origin: str) -> SignedCheckpoint | None:
    row = (
        await conn.execute(
            select(signed_checkpoints)
            .where(signed_checkpoints.c.origin == origin)
            .order_by(signed_checkpoints.c.tree_size.desc())
            .limit(1)
        )
    ).first()
    return _checkpoint(row) if row else None


async def signed_checkpoint(conn: AsyncConnection, origin: str, tree_size: int) -> SignedCheckpoint | None:
    row = (
        await conn.execute(
            select(signed_checkpoints).where(
                signed_checkpoints.c.origin == origin, signed_checkpoints.c.tree_size == tree_size
            )
        )
    ).first()
    return _checkpoint(row) if row else None


async def first_waiting_since(conn: AsyncConnection, origin: str, anchored_size: int) -> float | None:
    """When the oldest checkpoint larger than the anchored size arrived."""
    value = await conn.scalar(
        select(func.min(signed_checkpoints.c.received_at)).where(
            signed_checkpoints.c.origin == origin, signed_checkpoints.c.tree_size > anchored_size
        )
    )
    return float(value) if value is not None else None


async def save_anchor(conn: AsyncConnection, anchor: AnchorRow, recorded_at: float) -> bool:
    """Record an anchor the chain holds; False when it was recorded already."""
    known = await conn.scalar(
        select(anchors.c.transaction_hash).where(
            anchors.c.origin == anchor.origin, anchors.c.tree_size == anchor.tree_size
        )
    )
    if known is not None:
        if known == anchor.transaction_hash:
            return False
        # The same checkpoint, anchored again in another transaction after a reorg dropped the
        # first: the chain's word replaces ours.
        await conn.execute(
            delete(anchors).where(anchors.c.origin == anchor.origin, anchors.c.tree_size == anchor.tree_size)
        )
    await conn.execute(insert(anchors).values(**anchor.__dict__, recorded_at=recorded_at))
    return True


def _anchor(row: object) -> AnchorRow:
    return AnchorRow(**{name: getattr(row, name) for name in AnchorRow.__dataclass_fields__})


async def latest_anchor(conn: AsyncConnection, origin: str) -> AnchorRow | None:
    row = (
        await conn.execute(
            select(anchors).where(anchors.c.origin == origin).order_by(anchors.c.tree_size.desc()).limit(1)
        )
    ).first()
    return _anchor(row) if row else None


async def anchor_covering(conn: AsyncConnection, origin: str, index: int) -> AnchorRow | None:
    """The smallest anchor whose tree holds entry ``index`` (the earliest proof of it)."""
    row = (
        await conn.execute(
            select(anchors)
            .where(anchors.c.origin == origin, anchors.c.tree_size > index)
            .order_by(anchors.c.tree_size)
            .limit(1)
        )
    ).first()
    return _anchor(row) if row else None


async def list_anchors(conn: AsyncConnection, origin: str, *, below_size: int | None, limit: int) -> list[AnchorRow]:
    query = select(anchors).where(anchors.c.origin == origin)
    if below_size is not None:
        query = query.where(anchors.c.tree_size < below_size)
    rows = (await conn.execute(query.order_by(anchors.c.tree_size.desc()).limit(limit))).all()
    return [_anchor(r) for r in rows]


async def drop_anchors_above(conn: AsyncConnection, origin: str, size: int) -> int:
    """Forget anchors the chain no longer holds (a reorg dropped their blocks)."""
    result = await conn.execute(delete(anchors).where(anchors.c.origin == origin, anchors.c.tree_size > size))
    return int(result.rowcount or 0)


# --- consent writes -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ConsentWrite:
    seq: int
    event_id: str
    consent_id: str
    version: int
    commitment: str
    revoked: bool
    valid_from: int
    valid_until: int


async def queue_consent_write(conn: AsyncConnection, write: ConsentWrite) -> bool:
    if await conn.scalar(select(consent_writes.c.seq).where(consent_writes.c.event_id == write.event_id)):
        return False
    await conn.execute(
        insert(consent_writes).values(
            event_id=write.event_id,
            consent_id=write.consent_id,
            version=write.version,
            commitment=write.commitment,
            revoked=int(write.revoked),
            valid_from=write.valid_from,
            valid_until=write.valid_until,
            status="pending",
        )
    )
    return True


async def pending_consent_writes(conn: AsyncConnection, limit: int) -> list[ConsentWrite]:
    rows = (
        await conn.execute(
            select(consent_writes)
            .where(consent_writes.c.status == "pending")
            .order_by(consent_writes.c.seq)
            .limit(limit)
        )
    ).all()
    return [
        ConsentWrite(
            r.seq, r.event_id, r.consent_id, r.version, r.commitment, bool(r.revoked), r.valid_from, r.valid_until
        )
        for r in rows
    ]


async def previous_granted_commitment(conn: AsyncConnection, consent_id: str, before_version: int) -> str | None:
    """The commitment of the consent's latest granted (not revoking) version before this one that
    the chain recorded: what a revocation or a change revokes."""
    return await conn.scalar(
        select(consent_writes.c.commitment)
        .where(
            consent_writes.c.consent_id == consent_id,
            consent_writes.c.version < before_version,
            consent_writes.c.revoked == 0,
            consent_writes.c.status == "done",
        )
        .order_by(consent_writes.c.version.desc())
        .limit(1)
    )


async def finish_consent_write(
    conn: AsyncConnection, seq: int, status: str, transaction_hash: str | None, detail: str | None
) -> None:
    await conn.execute(
        update(consent_writes)
        .where(consent_writes.c.seq == seq)
        .values(status=status, transaction_hash=transaction_hash, detail=detail)
    )
