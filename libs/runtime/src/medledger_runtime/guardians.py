"""Who acts for a patient: a projection of consent's guardianships, for the services (records,
audit) that let a guardian do what the patient may.

consent owns guardianships (AppointGuardian, RemoveGuardian) and announces each change as
`GuardianshipChanged` on its topic; identity announces each role granted or revoked as
`PrincipalRoleChanged`. A service that serves guardians keeps both in two tables of its own
database (`MIGRATION` creates them; each service numbers the step among its own), written by
:class:`GuardianshipProjection`, a consumer-group handler: a versioned upsert per guardianship and
per principal's guardian role, so a redelivery, or an older event after a newer one, changes
nothing.

A caller acts for a patient (:func:`acts_for`) when their token carries the `guardian` role, the
patient appointed them and has not removed them, and no revocation of their role newer than the
token has arrived. The token alone would let a revoked guardian act until it expires (15 min);
the projection ends that as soon as the event is applied. A removal takes as long to reach here as
consent's relay and this consumer take (measured by tests/integration/test_guardians.py).
"""

from __future__ import annotations

import logging

from medledger.events.v1 import consent_events_pb2, identity_events_pb2
from medledger.types.v1 import vocabulary_pb2
from sqlalchemy import BigInteger, Boolean, Column, MetaData, String, Table, and_, bindparam, select
from sqlalchemy.ext.asyncio import AsyncConnection

from medledger_runtime.auth import Caller
from medledger_runtime.auth.callers import acting_for
from medledger_runtime.db import Database, DriverQuery, Migration, create_tables, dialect_insert
from medledger_runtime.events import TOPICS, unpack
from medledger_runtime.kafka import ConsumedMessage
from medledger_runtime.parts import ConsumerSpec

__all__ = ["GUARDIAN_ROLE", "Guardians", "GuardianshipProjection", "migration"]

log = logging.getLogger(__name__)
GUARDIAN_ROLE = "guardian"
_CHANGED = consent_events_pb2.GuardianshipChanged.DESCRIPTOR.full_name
_ROLE_CHANGED = identity_events_pb2.PrincipalRoleChanged.DESCRIPTOR.full_name

metadata = MetaData()
# The latest known state of each appointment (kept, inactive, once removed).
guardianships = Table(
    "guardianships",
    metadata,
    Column("patient_id", String(64), primary_key=True),
    Column("guardian_id", String(64), primary_key=True),
    Column("active", Boolean, nullable=False),
    # The event's aggregate version (consent: the change's time in ms): a newer one wins.
    Column("version", BigInteger, nullable=False),
)
# Whether each principal holds the guardian role, as identity last announced it.
guardian_roles = Table(
    "guardian_roles",
    metadata,
    Column("principal_id", String(64), primary_key=True),
    Column("held", Boolean, nullable=False),
    Column("version", BigInteger, nullable=False),
)


def migration(version: int) -> Migration:
    """The step creating the projection's tables, numbered among the service's own."""
    return Migration(version, "guardianships and guardian roles (who acts for a patient)", create_tables(metadata))


async def _upsert(conn: AsyncConnection, table: Table, keys: dict[str, str], state: dict[str, object]) -> bool:
    """Apply `state` at its version unless a newer (or the same) version is stored."""
    values = {**keys, **state}
    statement = (
        dialect_insert(conn, table)
        .values(**values)
        .on_conflict_do_update(index_elements=list(keys), set_=state, where=table.c.version < state["version"])
    )
    result = await conn.execute(statement)
    return bool(result.rowcount)


class GuardianshipProjection:
    """Applies GuardianshipChanged (consent's topic) and the guardian role's PrincipalRoleChanged
    (identity's) to the service's tables; every other event is not its concern."""

    def __init__(self, db: Database, group_id: str) -> None:
        self.db = db
        self.group_id = group_id

    def consumer(self) -> ConsumerSpec:
        # A short fetch wait: a removal must reach the service within the deactivation bound.
        return ConsumerSpec(
            group_id=self.group_id, handler=self, topics=[TOPICS["consent"], TOPICS["identity"]], fetch_max_wait_ms=50
        )

    async def __call__(self, message: ConsumedMessage) -> None:
        event = message.event
        if event is None:
            return
        # Unpacked before the source is looked at: a payload that does not parse is dead-lettered
        # (raised), whoever claims to have sent it.
        if event.type == _CHANGED:
            changed = unpack(event, consent_events_pb2.GuardianshipChanged)
            assert isinstance(changed, consent_events_pb2.GuardianshipChanged)
            if not self._from(event.source, "medledger.consent"):
                return
            async with self.db.transaction() as conn:
                await _upsert(
                    conn,
                    guardianships,
                    {"patient_id": changed.patient_id, "guardian_id": changed.guardian_id},
                    {"active": changed.active, "version": int(event.version)},
                )
        elif event.type == _ROLE_CHANGED:
            role = unpack(event, identity_events_pb2.PrincipalRoleChanged)
            assert isinstance(role, identity_events_pb2.PrincipalRoleChanged)
            if role.role != vocabulary_pb2.Role.ROLE_GUARDIAN or not self._from(event.source, "medledger.identity"):
                return
            async with self.db.transaction() as conn:
                await _upsert(
                    conn,
                    guardian_roles,
                    {"principal_id": role.principal_id},
                    {"held": role.granted, "version": int(event.version)},
                )

    def _from(self, source: str, owner: str) -> bool:
        """Only the service that owns the fact is believed about it."""
        if source == owner:
            return True
        log.warning("guardianship event ignored: not from its owner", extra={"source": source[:100]})
        return False


_g, _r = guardianships.c, guardian_roles.c
# One query per check: the appointment, and the role's latest announced state (if any).
_ACTS_FOR = DriverQuery(
    select(_g.active.label("appointed"), _r.held.label("role_held"))
    .select_from(guardianships.outerjoin(guardian_roles, _r.principal_id == _g.guardian_id))
    .where(and_(_g.patient_id == bindparam("patient_id"), _g.guardian_id == bindparam("guardian_id")))
)


class Guardians:
    """Answers whether a caller acts for a patient, from the projection's tables."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def acts_for(self, caller: Caller, patient_id: str) -> bool:
        """Whether `caller` is a guardian of `patient_id` now: the role in their token, an active
        appointment, and no later revocation of the role. The patient themselves is not asked
        about here (the rules treat them first)."""
        if not caller.has_role(GUARDIAN_ROLE) or not patient_id or caller.principal_id == patient_id:
            return False
        row = await _ACTS_FOR.first(self.db, {"patient_id": patient_id, "guardian_id": caller.principal_id})
        if row is None or not row["appointed"]:
            return False
        # No role event seen (the role was granted before this service kept the table, or its
        # event is still on its way): the token's role stands.
        if row["role_held"] is None or bool(row["role_held"]):
            acting_for.set(patient_id)
            return True
        return False
