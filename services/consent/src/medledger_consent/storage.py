"""Consent's tables, their migrations, and the queries on the principal directory, consent
versions, decisions and guardianships. The queries on break-glass are in ``break_glass_storage``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Column,
    Float,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    and_,
    insert,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.expression import Executable

from medledger_consent.domain import ConsentVersion
from medledger_runtime.db import Database, Migration, create_tables, dialect_insert
from medledger_runtime.events import Event
from medledger_runtime.group_commit import OutboxGroupCommit

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

consents_metadata = MetaData()
# Every version of every consent; versions are never changed, only added.
consent_versions = Table(
    "consent_versions",
    consents_metadata,
    Column("consent_id", String(64), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("patient_id", String(64), nullable=False, index=True),
    Column("grantee_id", String(64), nullable=False, index=True),
    Column("provision", Integer, nullable=False),
    # Space-separated enum numbers; empty: every value.
    Column("actions", String(200), nullable=False),
    Column("categories", String(200), nullable=False),
    Column("purposes", String(200), nullable=False),
    Column("period_start", Float, nullable=False),
    Column("period_end", Float, nullable=True),
    Column("status", Integer, nullable=False),
    Column("recorded_by", String(64), nullable=False),
    Column("recorded_at", Float, nullable=False),
    Column("commitment", String(64), nullable=False),
    # The commitment's salt: for the grantor; never in events or logs.
    Column("salt", LargeBinary, nullable=False),
)
# Every decision, written before it was answered.
consent_decisions = Table(
    "consent_decisions",
    consents_metadata,
    Column("decision_id", String(64), primary_key=True),
    Column("decided_at", Float, nullable=False),
    Column("patient_id", String(64), nullable=False, index=True),
    Column("actor_id", String(64), nullable=False),
    Column("action", Integer, nullable=False),
    Column("category", Integer, nullable=False),
    Column("purpose", Integer, nullable=False),
    Column("decision", Integer, nullable=False),
    Column("reason_code", String(64), nullable=False),
    # Space-separated consent_id@version.
    Column("deciding", Text, nullable=False),
    Column("rule_version", String(64), nullable=False),
    # The break-glass access that permitted (migration 6); empty for consent decisions.
    Column("break_glass_access_id", String(64), nullable=False, server_default=""),
    # The actor's organization as matched, and the space-separated commitments of the consent
    # versions the rule was given (migration 8).
    Column("actor_organization_id", String(64), nullable=False, server_default=""),
    Column("considered", Text, nullable=False, server_default=""),
)


async def _add_decision_columns(conn: AsyncConnection, columns: dict[str, str]) -> None:
    """Add `columns` (name: SQL type and default) to consent_decisions where missing: databases
    that ran migration 2 before a column was in the table above lack it, newer ones have it."""
    present = await conn.run_sync(lambda sync: {c["name"] for c in inspect(sync).get_columns("consent_decisions")})
    for name, definition in columns.items():
        if name not in present:
            await conn.execute(text(f"ALTER TABLE consent_decisions ADD COLUMN {name} {definition}"))


async def _decisions_by_break_glass(conn: AsyncConnection) -> None:
    await _add_decision_columns(conn, {"break_glass_access_id": "VARCHAR(64) NOT NULL DEFAULT ''"})


async def _decisions_with_their_inputs(conn: AsyncConnection) -> None:
    await _add_decision_columns(
        conn, {"actor_organization_id": "VARCHAR(64) NOT NULL DEFAULT ''", "considered": "TEXT NOT NULL DEFAULT ''"}
    )


guardians_metadata = MetaData()
# Who acts for a patient; a row is kept (inactive) when a guardianship ends.
guardianships = Table(
    "guardianships",
    guardians_metadata,
    Column("patient_id", String(64), primary_key=True),
    Column("guardian_id", String(64), primary_key=True),
    Column("active", Integer, nullable=False),
    Column("changed_by", String(64), nullable=False),
    Column("changed_at", Float, nullable=False),
)


break_glass_metadata = MetaData()
# Each organization's break-glass rules; no row: disabled.
break_glass_policies = Table(
    "break_glass_policies",
    break_glass_metadata,
    Column("organization_id", String(64), primary_key=True),
    Column("enabled", Integer, nullable=False),
    Column("overrides_deny", Integer, nullable=False),
    Column("access_seconds", Float, nullable=False),
    Column("max_uses", Integer, nullable=False),
    Column("rate_window_seconds", Float, nullable=False),
    Column("changed_by", String(64), nullable=False),
    Column("changed_at", Float, nullable=False),
)
# Every break-glass use; the justification only as a key-manager ciphertext under the patient's
# key (crypto-shredding erases it with the patient's other data).
break_glass_accesses = Table(
    "break_glass_accesses",
    break_glass_metadata,
    Column("access_id", String(64), primary_key=True),
    Column("patient_id", String(64), nullable=False, index=True),
    Column("practitioner_id", String(64), nullable=False, index=True),
    Column("organization_id", String(64), nullable=False, index=True),
    Column("reason", Integer, nullable=False),
    Column("justification_sha256", String(64), nullable=False),
    Column("justification_ciphertext", Text, nullable=False),
    Column("started_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("ended_at", Float, nullable=True),
    Column("overrides_deny", Integer, nullable=False),
    Column("review", Integer, nullable=False),
    Column("reviewed_by", String(64), nullable=False),
    Column("reviewed_at", Float, nullable=True),
    # When the row last changed: replicas' reconciliation reads recent changes.
    Column("changed_at", Float, nullable=False, index=True),
)


async def _index_recorded_at(conn: AsyncConnection) -> None:
    await conn.execute(text("CREATE INDEX ix_consent_versions_recorded_at ON consent_versions (recorded_at)"))


# Break-glass accesses whose justification is still under the old shared key `patient-<id>`
# (the key-owner migration moves it to consent-patient-<id>, then drops the row). Filled once,
# by migration 7, with every access there was: everything written since is under consent's key.
key_owners_metadata = MetaData()
justifications_under_old_keys = Table(
    "justifications_under_old_keys",
    key_owners_metadata,
    Column("access_id", String(64), primary_key=True),
)


async def _list_justifications_under_old_keys(conn: AsyncConnection) -> None:
    await conn.run_sync(key_owners_metadata.create_all)
    await conn.execute(
        text(
            "INSERT INTO justifications_under_old_keys (access_id) SELECT access_id FROM break_glass_accesses "
            "WHERE justification_ciphertext <> ''"
        )
    )


MIGRATIONS = [
    Migration(1, "principal directory", create_tables(metadata)),
    Migration(2, "consent versions and decisions", create_tables(consents_metadata)),
    Migration(3, "guardianships", create_tables(guardians_metadata)),
    Migration(4, "consent versions by recording time", _index_recorded_at),
    Migration(5, "break-glass policies and accesses", create_tables(break_glass_metadata)),
    Migration(6, "decisions name the break-glass access that permitted", _decisions_by_break_glass),
    Migration(7, "justifications still under the old shared keys", _list_justifications_under_old_keys),
    Migration(
        8, "decisions name the actor's organization and the consent versions considered", _decisions_with_their_inputs
    ),
]


@dataclass(frozen=True)
class KnownPrincipal:
    principal_id: str
    kind: int
    status: int
    organization_id: str
    version: int


def upsert(
    conn: AsyncConnection, table: Table, values: dict[str, object], keys: list[str], where: Any = None
) -> Executable:
    """INSERT ... ON CONFLICT (keys) DO UPDATE the other columns [WHERE where], in the dialect's
    own form (PostgreSQL's and SQLite's share the syntax, not the SQLAlchemy construct)."""
    upsert: Executable = (
        dialect_insert(conn, table)
        .values(**values)
        .on_conflict_do_update(
            index_elements=keys, set_={k: v for k, v in values.items() if k not in keys}, where=where
        )
    )
    return upsert


async def upsert_principal(conn: AsyncConnection, p: KnownPrincipal) -> bool:
    """Apply a principal's state at `p.version`; an older version than the stored one is ignored."""
    values = {
        "principal_id": p.principal_id,
        "kind": p.kind,
        "status": p.status,
        "organization_id": p.organization_id,
        "version": p.version,
    }
    result = await conn.execute(
        upsert(conn, principal_directory, values, ["principal_id"], where=principal_directory.c.version < p.version)
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


def _codes(values: frozenset[int]) -> str:
    return " ".join(str(v) for v in sorted(values))


def _parse_codes(text: str) -> frozenset[int]:
    return frozenset(int(v) for v in text.split())


def _version(r: object) -> ConsentVersion:
    return ConsentVersion(
        consent_id=r.consent_id,  # type: ignore[attr-defined]
        version=int(r.version),  # type: ignore[attr-defined]
        patient_id=r.patient_id,  # type: ignore[attr-defined]
        grantee_id=r.grantee_id,  # type: ignore[attr-defined]
        provision=int(r.provision),  # type: ignore[attr-defined]
        actions=_parse_codes(r.actions),  # type: ignore[attr-defined]
        categories=_parse_codes(r.categories),  # type: ignore[attr-defined]
        purposes=_parse_codes(r.purposes),  # type: ignore[attr-defined]
        period_start=float(r.period_start),  # type: ignore[attr-defined]
        period_end=None if r.period_end is None else float(r.period_end),  # type: ignore[attr-defined]
        status=int(r.status),  # type: ignore[attr-defined]
        recorded_by=r.recorded_by,  # type: ignore[attr-defined]
        recorded_at=float(r.recorded_at),  # type: ignore[attr-defined]
        commitment=r.commitment,  # type: ignore[attr-defined]
    )


async def insert_version(conn: AsyncConnection, v: ConsentVersion, salt: bytes) -> None:
    await conn.execute(
        insert(consent_versions).values(
            consent_id=v.consent_id,
            version=v.version,
            patient_id=v.patient_id,
            grantee_id=v.grantee_id,
            provision=v.provision,
            actions=_codes(v.actions),
            categories=_codes(v.categories),
            purposes=_codes(v.purposes),
            period_start=v.period_start,
            period_end=v.period_end,
            status=v.status,
            recorded_by=v.recorded_by,
            recorded_at=v.recorded_at,
            commitment=v.commitment,
            salt=salt,
        )
    )


async def get_version(
    conn: AsyncConnection, consent_id: str, version: int = 0, *, for_update: bool = False
) -> tuple[ConsentVersion, bytes] | None:
    """One version with its salt; version 0 means the latest. `for_update`: the consent stays
    locked against other writers until the transaction ends."""
    c = consent_versions.c
    if for_update and conn.dialect.name == "postgresql":
        # Writers lock the consent's first version, which never changes, and read the latest
        # after: locking the latest let a writer that had waited on it read that same row once
        # let in (READ COMMITTED re-checks only the locked row), not the version written
        # meanwhile, and write that next version again.
        await conn.execute(
            select(c.version).where(c.consent_id == consent_id).order_by(c.version).limit(1).with_for_update()
        )
    query = select(consent_versions).where(c.consent_id == consent_id)
    query = query.where(c.version == version) if version else query
    query = query.order_by(c.version.desc()).limit(1)
    r = (await conn.execute(query)).first()
    return (_version(r), bytes(r.salt)) if r else None


async def all_versions(conn: AsyncConnection) -> list[ConsentVersion]:
    rows = await conn.execute(
        select(consent_versions).order_by(consent_versions.c.consent_id, consent_versions.c.version)
    )
    return [_version(r) for r in rows]


async def versions_recorded_since(conn: AsyncConnection, since: float) -> list[ConsentVersion]:
    c = consent_versions.c
    rows = await conn.execute(select(consent_versions).where(c.recorded_at >= since).order_by(c.recorded_at))
    return [_version(r) for r in rows]


async def latest_versions(
    conn: AsyncConnection, *, patient_id: str, grantee_id: str, after: str, limit: int
) -> list[ConsentVersion]:
    """The latest version of each consent of a patient or naming a grantee, in id order."""
    c = consent_versions.c
    condition = c.patient_id == patient_id if patient_id else c.grantee_id == grantee_id
    ids = (
        await conn.execute(
            select(c.consent_id).where(and_(condition, c.consent_id > after)).group_by(c.consent_id)
            .order_by(c.consent_id).limit(limit)
        )
    ).scalars().all()  # fmt: skip
    out = []
    for consent_id in ids:
        found = await get_version(conn, consent_id)
        if found is not None:
            out.append(found[0])
    return out


class DecisionLog(OutboxGroupCommit):
    """Writes decision records and their events durably before the checks answer, group
    committed (see medledger_runtime.group_commit)."""

    def __init__(self, db: Database, topic: str, *, commit_interval: float = 0.008) -> None:
        super().__init__(db, table=consent_decisions, commit_interval=commit_interval, what="the decision")
        self.topic = topic

    async def record(self, row: dict[str, object], event: Event) -> None:
        await self.write(self.topic, event, str(row["patient_id"]).encode(), row)


async def get_decision(conn: AsyncConnection, decision_id: str) -> Any | None:
    """The decision record's row, or None."""
    d = consent_decisions.c
    return (await conn.execute(select(consent_decisions).where(d.decision_id == decision_id))).first()


async def set_guardianship(
    conn: AsyncConnection, patient_id: str, guardian_id: str, active: bool, changed_by: str, changed_at: float
) -> None:
    values = {
        "patient_id": patient_id,
        "guardian_id": guardian_id,
        "active": int(active),
        "changed_by": changed_by,
        "changed_at": changed_at,
    }
    await conn.execute(upsert(conn, guardianships, values, ["patient_id", "guardian_id"]))


async def is_guardian(conn: AsyncConnection, patient_id: str, guardian_id: str) -> bool:
    g = guardianships.c
    row = await conn.execute(select(g.active).where(and_(g.patient_id == patient_id, g.guardian_id == guardian_id)))
    return bool(row.scalar())
