"""Records' tables, their migrations, and the queries on records and their versions. Only
ciphertexts, wrapped data keys, salts and commitments are stored, never content; the common
outbox, inbox and idempotency tables are the runtime's. The queries on erasures and legal holds
are in ``erasure_storage``, those on the wrapping of data keys in ``key_storage``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
    bindparam,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from medledger_runtime import guardians
from medledger_runtime.db import Database, DriverQuery, Migration, create_tables, lock_key

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
    # Set when the patient's records were erased: only ids, versions and commitments remain.
    Column("erased_at", Float, nullable=True),
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
    # Where the ciphertext is when not in `ciphertext`: a blob-store key (empty: in the row).
    Column("blob_key", String(255), nullable=False, server_default=""),
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

# Erasure requests and their certificates, per patient.
erasures = Table(
    "erasures",
    metadata,
    Column("erasure_id", String(64), primary_key=True),
    Column("patient_id", String(64), nullable=False, index=True),
    Column("state", Integer, nullable=False),
    Column("requested_by", String(64), nullable=False),
    Column("requested_at", Float, nullable=False),
    Column("reason", Text, nullable=False),
    Column("runs_after", Float, nullable=False),
    Column("approved_by", String(64), nullable=False),
    Column("approved_at", Float, nullable=True),
    # The key's versions, read before it was deleted (a resumed erasure still knows them).
    Column("key_versions", Text, nullable=False),
    # The serialized ErasureCertificate, once completed.
    Column("certificate", LargeBinary, nullable=True),
    # The participants asked to destroy their keys (comma-separated), set when it starts
    # running: a later change of the setting does not change a running erasure.
    Column("participants", Text, nullable=False, server_default=""),
    # What records' own part erased, once done (its confirmation is then stored).
    Column("records_erased", Integer, nullable=True),
    Column("versions_erased", Integer, nullable=True),
    # The certificate as a C2SP signed note, once completed.
    Column("signed_certificate", Text, nullable=True),
)
# Each participant's confirmation of an erasure, the first one kept (later ones are
# redeliveries or re-confirmations and change nothing).
erasure_confirmations = Table(
    "erasure_confirmations",
    metadata,
    Column("erasure_id", String(64), primary_key=True),
    Column("participant", String(32), primary_key=True),
    # The serialized PatientKeysDestroyed.
    Column("confirmation", LargeBinary, nullable=False),
    Column("confirmed_at", Float, nullable=False),
)
_ADDED_IN_3 = ("participants", "records_erased", "versions_erased", "signed_certificate")
legal_holds = Table(
    "legal_holds",
    metadata,
    Column("hold_id", String(64), primary_key=True),
    Column("patient_id", String(64), nullable=False, index=True),
    Column("reason", Text, nullable=False),
    Column("placed_by", String(64), nullable=False),
    Column("placed_at", Float, nullable=False),
    Column("released_by", String(64), nullable=False),
    Column("released_at", Float, nullable=True),
)
# The blind index of FHIR search (search.py): one row per search term of each record's latest
# version, the term's HMAC under the patient's search key, never the term itself.
search_terms = Table(
    "search_terms",
    metadata,
    Column("record_id", String(64), primary_key=True),
    Column("term", LargeBinary, primary_key=True),
    Column("patient_id", String(64), nullable=False),
)
Index("ix_search_terms_patient_term", search_terms.c.patient_id, search_terms.c.term)

# Migration 1 created the first three tables without the columns migration 2 adds.
_ADDED_IN_2 = {"records": ("erased_at",), "record_versions": ("blob_key",)}
_metadata_v1 = MetaData()
for _table in (records, record_versions, key_rotations):
    Table(
        _table.name,
        _metadata_v1,
        *(c._copy() for c in _table.columns if c.name not in _ADDED_IN_2.get(_table.name, ())),
    )
Index(
    "ix_records_patient_updated",
    _metadata_v1.tables["records"].c.patient_id,
    _metadata_v1.tables["records"].c.updated_at,
)


# Migration 2 created the erasures table without the columns migration 3 adds.
_metadata_v2 = MetaData()
_erasures_v2 = Table("erasures", _metadata_v2, *(c._copy() for c in erasures.columns if c.name not in _ADDED_IN_3))


async def _erasure_and_blobs(conn: AsyncConnection) -> None:
    await conn.execute(text("ALTER TABLE records ADD COLUMN erased_at DOUBLE PRECISION"))
    await conn.execute(text("ALTER TABLE record_versions ADD COLUMN blob_key VARCHAR(255) NOT NULL DEFAULT ''"))
    await conn.run_sync(lambda sync: _metadata_v2.create_all(sync, tables=[_erasures_v2]))
    await conn.run_sync(lambda sync: metadata.create_all(sync, tables=[legal_holds]))


async def _erasure_participants(conn: AsyncConnection) -> None:
    await conn.execute(text("ALTER TABLE erasures ADD COLUMN participants TEXT NOT NULL DEFAULT ''"))
    await conn.execute(text("ALTER TABLE erasures ADD COLUMN records_erased INTEGER"))
    await conn.execute(text("ALTER TABLE erasures ADD COLUMN versions_erased INTEGER"))
    await conn.execute(text("ALTER TABLE erasures ADD COLUMN signed_certificate TEXT"))
    await conn.run_sync(lambda sync: metadata.create_all(sync, tables=[erasure_confirmations]))


async def _search_terms(conn: AsyncConnection) -> None:
    await conn.run_sync(lambda sync: metadata.create_all(sync, tables=[search_terms]))


MIGRATIONS = [
    Migration(1, "records and their versions", create_tables(_metadata_v1)),
    Migration(2, "erasures, legal holds and blob-store keys", _erasure_and_blobs),
    Migration(3, "erasure participants, their confirmations and signed certificates", _erasure_participants),
    guardians.migration(4),
    Migration(5, "the blind index of FHIR search terms", _search_terms),
]


@dataclass(frozen=True)
class Record:
    record_id: str
    patient_id: str
    category: int
    media_type: str
    latest_version: int
    resource_type: str = ""
    updated_at: float = 0.0
    erased_at: float | None = None


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
    blob_key: str = ""
    written_by: str = ""
    organization_id: str = ""
    written_at: float = 0.0


async def get_record(conn: AsyncConnection, record_id: str, *, for_update: bool = False) -> Record | None:
    query = select(records).where(records.c.record_id == record_id)
    if for_update and conn.dialect.name == "postgresql":
        query = query.with_for_update()
    r = (await conn.execute(query)).first()
    return _record_of(dict(r._mapping)) if r else None


def _record_of(r: Mapping[str, Any]) -> Record:
    """A Record from a row's mapping of `records` columns."""
    return Record(
        r["record_id"],
        r["patient_id"],
        int(r["category"]),
        r["media_type"],
        int(r["latest_version"]),
        r["resource_type"],
        float(r["updated_at"]),
        None if r["erased_at"] is None else float(r["erased_at"]),
    )


# Inserts run on every put: built once, their values passed as parameters.
_INSERT_RECORD = insert(records)
_INSERT_VERSION = insert(record_versions)


async def insert_record(conn: AsyncConnection, record: Record, now: float) -> None:
    await conn.execute(_INSERT_RECORD, record_row(record, now))


def record_row(record: Record, now: float) -> dict[str, Any]:
    return {
        "record_id": record.record_id,
        "patient_id": record.patient_id,
        "category": record.category,
        "media_type": record.media_type,
        "resource_type": record.resource_type,
        "latest_version": record.latest_version,
        "created_at": now,
        "updated_at": now,
        "erased_at": None,
    }


def version_row(v: StoredVersion, *, written_by: str, organization_id: str, now: float) -> dict[str, Any]:
    return {
        "record_id": v.record_id,
        "version": v.version,
        "patient_id": v.patient_id,
        "key_name": v.key_name,
        "wrapped_key": v.wrapped_key,
        "ciphertext": v.ciphertext,
        "salt": v.salt,
        "commitment": v.commitment,
        "event_id": v.event_id,
        "blob_key": v.blob_key,
        "written_by": written_by,
        "organization_id": organization_id,
        "written_at": now,
    }


async def insert_records_and_versions(
    conn: AsyncConnection, record_rows: Sequence[dict[str, Any]], version_rows: Sequence[dict[str, Any]]
) -> None:
    """Many new records and versions in two statements (a PutRecords): one round trip each
    instead of two per record."""
    if record_rows:
        await conn.execute(_INSERT_RECORD, list(record_rows))
    if version_rows:
        await conn.execute(_INSERT_VERSION, list(version_rows))


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
    query = select(records).where(c.patient_id == patient_id, c.erased_at.is_(None))
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
    return [_record_of(dict(r._mapping)) for r in rows]


async def insert_version(
    conn: AsyncConnection, v: StoredVersion, *, written_by: str, organization_id: str, now: float
) -> None:
    await conn.execute(_INSERT_VERSION, version_row(v, written_by=written_by, organization_id=organization_id, now=now))


def _stored_version(row: Any, prefix: str = "") -> StoredVersion:
    """A StoredVersion from a row's mapping of `record_versions` columns (named `prefix + name`)."""

    def column(name: str) -> Any:
        return row[prefix + name]

    return StoredVersion(
        column("record_id"),
        int(column("version")),
        column("patient_id"),
        column("key_name"),
        column("wrapped_key"),
        bytes(column("ciphertext")),
        bytes(column("salt")),
        column("commitment"),
        column("event_id"),
        column("blob_key"),
        column("written_by"),
        column("organization_id"),
        float(column("written_at")),
    )


async def get_version(conn: AsyncConnection, record_id: str, version: int) -> StoredVersion | None:
    c = record_versions.c
    r = (await conn.execute(select(record_versions).where(c.record_id == record_id, c.version == version))).first()
    if r is None:
        return None
    return _stored_version(r._mapping)


@dataclass(frozen=True)
class VersionMeta:
    """A version without its ciphertext or key: what a history lists."""

    record_id: str
    version: int
    salt: bytes
    commitment: str
    event_id: str
    written_at: float


async def list_versions(conn: AsyncConnection, record_id: str, *, below: int | None, limit: int) -> list[VersionMeta]:
    """A record's versions, newest first, below version `below` when given (the ciphertexts are
    not read)."""
    c = record_versions.c
    query = select(c.record_id, c.version, c.salt, c.commitment, c.event_id, c.written_at).where(
        c.record_id == record_id
    )
    if below is not None:
        query = query.where(c.version < below)
    rows = await conn.execute(query.order_by(c.version.desc()).limit(limit))
    return [
        VersionMeta(r.record_id, int(r.version), bytes(r.salt), r.commitment, r.event_id, float(r.written_at))
        for r in rows
    ]


def _record_and_version_query() -> Any:
    r, v = records.c, record_versions.c
    wanted = v.version == func.coalesce(func.nullif(bindparam("version", type_=Integer), 0), r.latest_version)
    return (
        select(records, *(c.label(f"v_{c.name}") for c in record_versions.columns))
        .select_from(records.outerjoin(record_versions, and_(v.record_id == r.record_id, wanted)))
        .where(r.record_id == bindparam("record_id", type_=String))
    )


# Built once and run through asyncpg itself on PostgreSQL: it runs on every read.
_RECORD_AND_VERSION = DriverQuery(_record_and_version_query())


async def get_record_and_version(
    db: Database, record_id: str, version: int
) -> tuple[Record, StoredVersion | None] | None:
    """A record and one of its versions (0: the latest) in one query; None: no such record."""
    row = await _RECORD_AND_VERSION.first(db, {"record_id": record_id, "version": version})
    if row is None:
        return None
    stored = None
    if row["v_record_id"] is not None:
        stored = _stored_version(row, prefix="v_")
    return _record_of(row), stored


# A patient's writes against the start of their erasure.


_LOCK_PATIENT_EXCLUSIVE = text("SELECT pg_advisory_xact_lock(:k)")
_LOCK_PATIENT_SHARED = text("SELECT pg_advisory_xact_lock_shared(:k)")


async def lock_patient(conn: AsyncConnection, patient_id: str, *, exclusive: bool) -> None:
    """Serialize a patient's writes (shared) against the start of their erasure (exclusive)
    until the transaction ends. PostgreSQL: an advisory lock; SQLite writes serialize anyway."""
    if conn.dialect.name == "postgresql":
        statement = _LOCK_PATIENT_EXCLUSIVE if exclusive else _LOCK_PATIENT_SHARED
        await conn.execute(statement, {"k": lock_key(f"records.patient:{patient_id}")})
