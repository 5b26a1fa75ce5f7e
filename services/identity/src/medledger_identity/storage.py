"""Identity's tables and queries.

Personal data is never stored in the clear: a FHIR resource is stored as a key-manager
ciphertext (a patient's under the patient's own key, so deleting that key erases it), and its
identifiers only as blind indexes (keyed hashes) for the duplicate check.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from sqlalchemy import Column, Float, Integer, MetaData, String, Table, Text, and_, delete, insert, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from medledger_runtime.db import Migration, create_tables, locked_page_after
from medledger_runtime.errors import Aborted, AlreadyExists

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

# Added by migration 2; declared apart so that migration 1 keeps creating what it always did.
roles_metadata = MetaData()
principal_roles = Table(
    "principal_roles",
    roles_metadata,
    Column("principal_id", String(64), primary_key=True),
    Column("role", Integer, primary_key=True),
)
principal_identifiers = Table(
    "principal_identifiers",
    roles_metadata,
    # HMAC of "system|value" under the blind-index key: equal identifiers, equal index.
    Column("blind_index", String(128), primary_key=True),
    Column("principal_id", String(64), nullable=False, index=True),
)
# Columns migration 2 adds to principals; the query helpers below use these names.
_NEW_COLUMNS = {
    "did": "VARCHAR(128) NOT NULL DEFAULT ''",
    "fhir_resource": "TEXT",
    "secret_hash": "VARCHAR(256)",
    "updated_at": "DOUBLE PRECISION NOT NULL DEFAULT 0",
}
_principals_v2 = Table(
    "principals",
    MetaData(),
    *(Column(c.name, c.type, primary_key=c.primary_key) for c in principals.columns),
    Column("did", String(128)),
    Column("fhir_resource", Text),
    Column("secret_hash", String(256)),
    Column("updated_at", Float),
    Column("registered_by", String(64)),
)


async def _add_principal_columns(conn: AsyncConnection) -> None:
    for name, ddl in _NEW_COLUMNS.items():
        await conn.execute(text(f"ALTER TABLE principals ADD COLUMN {name} {ddl}"))
    await conn.run_sync(roles_metadata.create_all)


# Patients whose FHIR resource is still under the old shared key `patient-<id>` (the key-owner
# migration moves it to identity-patient-<id>, then drops the row). Filled once, by migration 3,
# with every patient who had a resource then: everything written since is under identity's key.
key_owners_metadata = MetaData()
resources_under_old_keys = Table(
    "resources_under_old_keys",
    key_owners_metadata,
    Column("principal_id", String(64), primary_key=True),
)
_PATIENT_KIND = 1  # PrincipalKind.PRINCIPAL_KIND_PATIENT, fixed in the proto


async def _list_resources_under_old_keys(conn: AsyncConnection) -> None:
    await conn.run_sync(key_owners_metadata.create_all)
    await conn.execute(
        text(
            "INSERT INTO resources_under_old_keys (principal_id) SELECT principal_id FROM principals "
            "WHERE kind = :kind AND fhir_resource IS NOT NULL"
        ),
        {"kind": _PATIENT_KIND},
    )


# SMART Backend Services clients (principals of kind smart-client): their public keys and the
# scopes they may be granted; and the `jti` of every client assertion accepted, kept until the
# assertion expires, so that a replay is refused even after a restart or on another replica.
smart_metadata = MetaData()
smart_clients = Table(
    "smart_clients",
    smart_metadata,
    Column("principal_id", String(64), primary_key=True),
    Column("jwks_json", Text, nullable=False),
    # Space-separated SMART v2 system/ scopes.
    Column("allowed_scopes", Text, nullable=False),
)
client_assertion_jtis = Table(
    "client_assertion_jtis",
    smart_metadata,
    Column("client_id", String(64), primary_key=True),
    Column("jti", String(256), primary_key=True),
    Column("expires_at", Float, nullable=False, index=True),
)


async def _add_registered_by(conn: AsyncConnection) -> None:
    await conn.execute(text("ALTER TABLE principals ADD COLUMN registered_by VARCHAR(64) NOT NULL DEFAULT ''"))


MIGRATIONS = [
    Migration(1, "principals", create_tables(metadata)),
    Migration(2, "roles, identifiers, keys, resources and credentials", _add_principal_columns),
    Migration(3, "patients' resources still under the old shared keys", _list_resources_under_old_keys),
    Migration(4, "SMART clients and the client assertions seen", create_tables(smart_metadata)),
    Migration(5, "who registered each principal", _add_registered_by),
]

P = _principals_v2.c


@dataclass(frozen=True)
class PrincipalRow:
    principal_id: str
    kind: int
    status: int
    organization_id: str
    version: int
    did: str = ""
    roles: tuple[int, ...] = ()
    created_at: float = 0.0
    # Key-manager ciphertext of the FHIR resource, or None.
    fhir_resource: str | None = None
    # The principal that registered it ("" for self-registered patients and the platform's own
    # principals): a SMART client staffs the organizations it registered (domain.check_may_staff).
    registered_by: str = ""


async def insert_principal(conn: AsyncConnection, row: PrincipalRow, *, secret_hash: str | None) -> None:
    """A new principal; without a secret hash (a SMART client) no secret ever matches."""
    now = time.time()
    await conn.execute(
        insert(_principals_v2).values(
            principal_id=row.principal_id,
            kind=row.kind,
            status=row.status,
            organization_id=row.organization_id,
            version=row.version,
            created_at=row.created_at or now,
            did=row.did,
            fhir_resource=row.fhir_resource,
            secret_hash=secret_hash,
            updated_at=now,
            registered_by=row.registered_by,
        )
    )
    for role in row.roles:
        await conn.execute(insert(principal_roles).values(principal_id=row.principal_id, role=role))


async def claim_identifiers(conn: AsyncConnection, principal_id: str, blind_indexes: list[str]) -> None:
    """Record a principal's identifiers; ALREADY_EXISTS if another principal holds one."""
    taken = (
        await conn.execute(
            select(principal_identifiers.c.blind_index).where(principal_identifiers.c.blind_index.in_(blind_indexes))
        )
    ).first()
    if taken is not None:
        raise AlreadyExists("a principal with this identifier is already registered")
    try:
        async with conn.begin_nested():
            await conn.execute(
                insert(principal_identifiers),
                [{"blind_index": b, "principal_id": principal_id} for b in dict.fromkeys(blind_indexes)],
            )
    except IntegrityError:
        # Registered concurrently by another call: the same answer as the check above.
        raise AlreadyExists("a principal with this identifier is already registered") from None


async def replace_identifiers(conn: AsyncConnection, principal_id: str, blind_indexes: list[str]) -> None:
    await conn.execute(delete(principal_identifiers).where(principal_identifiers.c.principal_id == principal_id))
    await claim_identifiers(conn, principal_id, blind_indexes)


async def _roles(conn: AsyncConnection, principal_id: str) -> tuple[int, ...]:
    rows = await conn.execute(
        select(principal_roles.c.role).where(principal_roles.c.principal_id == principal_id).order_by("role")
    )
    return tuple(int(r) for r in rows.scalars())


def _row(r: object, roles: tuple[int, ...]) -> PrincipalRow:
    return PrincipalRow(
        principal_id=r.principal_id,  # type: ignore[attr-defined]
        kind=int(r.kind),  # type: ignore[attr-defined]
        status=int(r.status),  # type: ignore[attr-defined]
        organization_id=r.organization_id,  # type: ignore[attr-defined]
        version=int(r.version),  # type: ignore[attr-defined]
        did=r.did,  # type: ignore[attr-defined]
        roles=roles,
        created_at=float(r.created_at),  # type: ignore[attr-defined]
        fhir_resource=r.fhir_resource,  # type: ignore[attr-defined]
        registered_by=r.registered_by or "",  # type: ignore[attr-defined]
    )


async def get_principal(conn: AsyncConnection, principal_id: str, *, for_update: bool = False) -> PrincipalRow | None:
    query = select(_principals_v2).where(P.principal_id == principal_id)
    if for_update and conn.dialect.name == "postgresql":
        query = query.with_for_update()
    r = (await conn.execute(query)).first()
    if r is None:
        return None
    return _row(r, await _roles(conn, principal_id))


async def get_secret_hash(conn: AsyncConnection, principal_id: str) -> str | None:
    return (await conn.execute(select(P.secret_hash).where(P.principal_id == principal_id))).scalar()


async def set_secret_hash(conn: AsyncConnection, principal_id: str, secret_hash: str) -> None:
    await conn.execute(update(_principals_v2).where(P.principal_id == principal_id).values(secret_hash=secret_hash))


async def list_principals(
    conn: AsyncConnection, *, kind: int, organization_id: str, after: str, limit: int
) -> list[PrincipalRow]:
    conditions = [P.principal_id > after]
    if kind:
        conditions.append(P.kind == kind)
    if organization_id:
        conditions.append(P.organization_id == organization_id)
    rows = (
        await conn.execute(select(_principals_v2).where(and_(*conditions)).order_by(P.principal_id).limit(limit))
    ).all()
    out = []
    for r in rows:
        out.append(_row(r, await _roles(conn, r.principal_id)))
    return out


async def save_changes(conn: AsyncConnection, before: PrincipalRow, after: PrincipalRow) -> PrincipalRow:
    """Write `after` over `before` (status, resource, roles) and bump the version once."""
    changed = replace(after, version=before.version + 1)
    result = await conn.execute(
        update(_principals_v2)
        .where(and_(P.principal_id == before.principal_id, P.version == before.version))
        .values(
            status=changed.status,
            fhir_resource=changed.fhir_resource,
            version=changed.version,
            updated_at=time.time(),
        )
    )
    if result.rowcount != 1:
        raise Aborted("the principal changed while this call ran; retry it")
    for role in set(before.roles) - set(after.roles):
        await conn.execute(
            delete(principal_roles).where(
                and_(principal_roles.c.principal_id == before.principal_id, principal_roles.c.role == role)
            )
        )
    for role in set(after.roles) - set(before.roles):
        await conn.execute(insert(principal_roles).values(principal_id=before.principal_id, role=role))
    return changed


async def deactivated_ids(conn: AsyncConnection, deactivated_status: int) -> list[str]:
    rows = await conn.execute(select(P.principal_id).where(P.status == deactivated_status).order_by(P.principal_id))
    return [str(r) for r in rows.scalars()]


async def forget_personal_data(conn: AsyncConnection, principal_id: str) -> bool:
    """Drop a principal's FHIR resource and identifier indexes; False if there was no such
    principal."""
    await conn.execute(delete(principal_identifiers).where(principal_identifiers.c.principal_id == principal_id))
    result = await conn.execute(
        update(_principals_v2).where(P.principal_id == principal_id).values(fhir_resource=None, updated_at=time.time())
    )
    return bool(result.rowcount)


# SMART clients.


@dataclass(frozen=True)
class SmartClientRow:
    principal_id: str
    jwks_json: str
    allowed_scopes: str


async def insert_smart_client(conn: AsyncConnection, client: SmartClientRow) -> None:
    await conn.execute(
        insert(smart_clients).values(
            principal_id=client.principal_id, jwks_json=client.jwks_json, allowed_scopes=client.allowed_scopes
        )
    )


async def get_smart_client(conn: AsyncConnection, principal_id: str) -> SmartClientRow | None:
    c = smart_clients.c
    r = (await conn.execute(select(smart_clients).where(c.principal_id == principal_id))).first()
    return SmartClientRow(r.principal_id, r.jwks_json, r.allowed_scopes) if r else None


async def record_assertion_jti(
    conn: AsyncConnection, client_id: str, jti: str, expires_at: float, *, forget_before: float
) -> bool:
    """Record a client assertion's jti until it expires; False if it was seen before (a replay).

    Those that expired before `forget_before` are dropped first: their assertions are refused
    by their `exp` anyway."""
    c = client_assertion_jtis.c
    await conn.execute(delete(client_assertion_jtis).where(c.expires_at < forget_before))
    try:
        async with conn.begin_nested():
            await conn.execute(
                insert(client_assertion_jtis).values(client_id=client_id, jti=jti, expires_at=expires_at)
            )
    except IntegrityError:
        return False
    return True


async def principals_by_blind_index(conn: AsyncConnection, blind_index: str, kind: int) -> list[PrincipalRow]:
    """The principals of `kind` holding an identifier with this blind index (one at most: an
    identifier is claimed once)."""
    ids = (
        await conn.execute(
            select(principal_identifiers.c.principal_id).where(principal_identifiers.c.blind_index == blind_index)
        )
    ).scalars()
    rows = [await get_principal(conn, str(i)) for i in ids]
    return [r for r in rows if r is not None and r.kind == kind]


# The key-owner migration.


async def resources_under_old_keys_after(conn: AsyncConnection, after: str, limit: int) -> list[str]:
    """Patients whose resource is still under the old shared key, after ``after``, locked."""
    return await locked_page_after(conn, resources_under_old_keys.c.principal_id, after, limit)


async def resource_for_update(conn: AsyncConnection, principal_id: str) -> str | None:
    row = (await conn.execute(select(P.fhir_resource).where(P.principal_id == principal_id).with_for_update())).first()
    return row.fhir_resource if row else None


async def off_old_keys(conn: AsyncConnection, principal_id: str) -> None:
    c = resources_under_old_keys.c
    await conn.execute(delete(resources_under_old_keys).where(c.principal_id == principal_id))


async def move_resource(conn: AsyncConnection, principal_id: str, ciphertext: str | None) -> None:
    """Store the resource's ciphertext under identity's own key (None: it was unreadable already),
    and take the patient off the list. Not a change of the principal: no new version."""
    await conn.execute(update(_principals_v2).where(P.principal_id == principal_id).values(fhir_resource=ciphertext))
    c = resources_under_old_keys.c
    await conn.execute(delete(resources_under_old_keys).where(c.principal_id == principal_id))
