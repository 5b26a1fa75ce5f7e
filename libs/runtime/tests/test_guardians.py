"""The guardianship projection records and audit keep (medledger_runtime.guardians), on PostgreSQL
and SQLite: who acts for a patient follows consent's and identity's events, a redelivered or
older event changes nothing, and a token's role is not enough once a revocation has arrived."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
from aiokafka import ConsumerRecord
from google.protobuf import message as pb_message
from google.protobuf.message import DecodeError
from medledger.events.v1 import consent_events_pb2, identity_events_pb2
from medledger.types.v1 import vocabulary_pb2

from medledger_devstack.testing import Postgres
from medledger_runtime import events
from medledger_runtime.auth import Caller
from medledger_runtime.db import Database
from medledger_runtime.guardians import Guardians, GuardianshipProjection, migration
from medledger_runtime.kafka import ConsumedMessage

PATIENT = "pat_" + "1" * 32
GUARDIAN = "prn_" + "2" * 32


@pytest.fixture(params=["postgresql", "sqlite"])
async def db(request: pytest.FixtureRequest, postgres: Postgres, tmp_path: Path):  # type: ignore[no-untyped-def]
    url = (
        postgres.new_database("guardians") if request.param == "postgresql" else f"sqlite+aiosqlite:///{tmp_path}/g.db"
    )
    database = Database(url)
    await database.migrate("test", [migration(1)])
    yield database
    await database.engine.dispose()


def caller(principal_id: str = GUARDIAN, *roles: str) -> Caller:
    return Caller(principal_id, "practitioner", frozenset(roles), "", "tok", time.time() + 900)


def message(payload: pb_message.Message, source: str, version: int, event_id: str | None = None) -> ConsumedMessage:
    event = events.new_event(
        source=source, payload=payload, aggregate_id="a", version=version, subject=PATIENT, event_id=event_id
    )
    record: ConsumerRecord[bytes, bytes] = ConsumerRecord("t", 0, 0, 0, 0, None, b"", None, 0, 0, ())
    return ConsumedMessage(record, event)


def appointment(active: bool, version: int, *, source: str = "medledger.consent") -> ConsumedMessage:
    changed = consent_events_pb2.GuardianshipChanged(
        patient_id=PATIENT, guardian_id=GUARDIAN, active=active, changed_by=PATIENT
    )
    return message(changed, source, version)


def role(granted: bool, version: int, role: int = vocabulary_pb2.Role.ROLE_GUARDIAN) -> ConsumedMessage:
    changed = identity_events_pb2.PrincipalRoleChanged(
        principal_id=GUARDIAN,
        role=role,  # type: ignore[arg-type]
        granted=granted,
        changed_by="prn_admin",
    )
    return message(changed, "medledger.identity", version)


async def test_an_appointed_guardian_holding_the_role_acts_for_the_patient_until_removed(db: Database) -> None:
    project, guardians = GuardianshipProjection(db, "test"), Guardians(db)
    holder = caller(GUARDIAN, "guardian")
    assert not await guardians.acts_for(holder, PATIENT)  # not appointed yet
    await project(appointment(True, 1000))
    assert await guardians.acts_for(holder, PATIENT)
    # The role in the token is required, and the appointment is for this patient only.
    assert not await guardians.acts_for(caller(GUARDIAN), PATIENT)
    assert not await guardians.acts_for(holder, "pat_" + "9" * 32)
    assert not await guardians.acts_for(caller("prn_" + "3" * 32, "guardian"), PATIENT)
    await project(appointment(False, 2000))
    assert not await guardians.acts_for(holder, PATIENT)


async def test_redelivered_and_older_events_change_nothing(db: Database) -> None:
    project, guardians = GuardianshipProjection(db, "test"), Guardians(db)
    holder = caller(GUARDIAN, "guardian")
    appointed, removed = appointment(True, 1000), appointment(False, 2000)
    await project(appointed)
    await project(removed)
    # The appointment again (a redelivery, or reordered behind the removal): still removed.
    await project(appointed)
    assert not await guardians.acts_for(holder, PATIENT)
    await project(removed)
    assert not await guardians.acts_for(holder, PATIENT)
    await project(appointment(True, 3000))  # appointed anew
    assert await guardians.acts_for(holder, PATIENT)


async def test_a_revoked_role_ends_the_guardianship_though_the_token_still_carries_it(db: Database) -> None:
    project, guardians = GuardianshipProjection(db, "test"), Guardians(db)
    holder = caller(GUARDIAN, "guardian")
    await project(appointment(True, 1000))
    await project(role(True, 2))
    assert await guardians.acts_for(holder, PATIENT)
    await project(role(False, 3))
    assert not await guardians.acts_for(holder, PATIENT)
    await project(role(True, 2))  # the older grant, redelivered
    assert not await guardians.acts_for(holder, PATIENT)
    # Another role's change is not the guardian role's.
    await project(role(True, 4, vocabulary_pb2.Role.ROLE_AUDITOR))
    assert not await guardians.acts_for(holder, PATIENT)
    await project(role(True, 5))
    assert await guardians.acts_for(holder, PATIENT)


async def test_events_from_another_source_are_not_taken_for_consents_or_identitys(db: Database) -> None:
    project, guardians = GuardianshipProjection(db, "test"), Guardians(db)
    await project(appointment(True, 1000, source="medledger.records"))
    assert not await guardians.acts_for(caller(GUARDIAN, "guardian"), PATIENT)
    # Malformed messages (no envelope) and other event types pass by.
    record: ConsumerRecord[bytes, bytes] = ConsumerRecord("t", 0, 0, 0, 0, None, b"", None, 0, 0, ())
    await project(ConsumedMessage(record, None, malformed="junk"))
    other = identity_events_pb2.PrincipalRegistered(principal_id=f"pat_{uuid.uuid4().hex}")
    await project(message(other, "medledger.identity", 1))


async def test_the_patient_is_not_their_own_guardian(db: Database) -> None:
    assert not await Guardians(db).acts_for(caller(PATIENT, "guardian"), PATIENT)


async def test_a_payload_that_does_not_parse_is_raised_to_be_dead_lettered_whoever_claims_to_send_it(
    db: Database,
) -> None:
    garbage = appointment(True, 1000, source="medledger.hostile")
    assert garbage.event is not None
    garbage.event.data.value = b"\x0a\xff\xff\xff\x0f"  # a length far past the end
    with pytest.raises(DecodeError):
        await GuardianshipProjection(db, "test")(garbage)
    assert not await Guardians(db).acts_for(caller(GUARDIAN, "guardian"), PATIENT)
