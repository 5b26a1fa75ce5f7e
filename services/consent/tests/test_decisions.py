"""Decision records and GetDecision's use case (checks.ConsentChecks.decision), without gRPC: on
SQLite with the decision log's group commit running (conftest.py). A decision records, besides
the question and the outcome, what the rule was given: the actor's organization as matched and
the commitment of every version of the patient's consents recorded by then."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import pytest
from aiokafka.structs import ConsumerRecord
from medledger.consent.v1 import consent_service_pb2 as pb
from medledger.events.v1 import consent_events_pb2 as ev
from medledger.events.v1 import identity_events_pb2 as id_ev
from medledger.types.v1 import vocabulary_pb2 as v

from medledger_consent import domain
from medledger_consent.consents import GrantConsent, RevokeConsent
from medledger_consent.handlers import PrincipalDirectoryHandler
from medledger_runtime.auth import Caller
from medledger_runtime.errors import InvalidArgument, NotFound
from medledger_runtime.events import new_event
from medledger_runtime.kafka import ConsumedMessage

if TYPE_CHECKING:
    from conftest import World  # type: ignore[import-not-found]  # the fixture's type (conftest.py)

Kind = v.PrincipalKind
READ = v.Action.ACTION_READ
OBS = v.DataCategory.DATA_CATEGORY_OBSERVATIONS
TREAT = v.PurposeOfUse.PURPOSE_OF_USE_TREAT
PERMIT = pb.Decision.DECISION_PERMIT


def caller(principal_id: str, kind: str, *roles: str, organization_id: str = "") -> Caller:
    return Caller(principal_id, kind, frozenset(roles), organization_id, f"tok_{principal_id}", 0.0)


PATIENT = caller("pat_1", "patient")
OTHER_PATIENT = caller("pat_2", "patient")
RECORDS = caller("svc_records", "service", "pdp-client")
ACTOR = caller("prn_1", "practitioner", organization_id="org_1")
COLLEAGUE = caller("prn_2", "practitioner", organization_id="org_1")


@pytest.fixture
async def registered(world: World) -> World:
    await world.register("pat_1", Kind.PRINCIPAL_KIND_PATIENT)
    await world.register("pat_2", Kind.PRINCIPAL_KIND_PATIENT)
    await world.register("prn_1", Kind.PRINCIPAL_KIND_PRACTITIONER, "org_1")
    await world.register("prn_2", Kind.PRINCIPAL_KIND_PRACTITIONER, "org_1")
    await world.register("org_1", Kind.PRINCIPAL_KIND_ORGANIZATION)
    return world


def grant(patient_id: str, grantee_id: str) -> GrantConsent:
    return GrantConsent(
        patient_id=patient_id,
        grantee_id=grantee_id,
        provision=domain.PERMIT,
        actions=(READ,),
        categories=(OBS,),
        purposes=(TREAT,),
    )


async def test_a_decision_records_the_organization_and_every_version_the_rule_was_given(registered: World) -> None:
    w = registered
    to_organization = await w.consents.grant(PATIENT, grant("pat_1", "org_1"))
    to_someone_else = await w.consents.grant(PATIENT, grant("pat_1", "prn_2"))
    revoked = await w.consents.revoke(PATIENT, RevokeConsent(to_someone_else.version.consent_id))
    await w.consents.grant(OTHER_PATIENT, grant("pat_2", "prn_1"))  # another patient's: not considered

    outcome, decision_id, decided_at = await w.checks.check(RECORDS, "pat_1", "prn_1", READ, OBS, TREAT)
    assert outcome.decision == PERMIT  # through the grant to the actor's organization
    record = await w.checks.decision(PATIENT, decision_id)

    # Every version of the patient's, the revoked consent's two included, whether it names the
    # actor or not: what `decide` is given, so a replay can re-run it and find each in the log.
    considered = sorted(
        (to_organization.version.commitment, to_someone_else.version.commitment, revoked.version.commitment)
    )
    assert record.considered == tuple(considered)
    assert (record.actor_id, record.actor_organization_id) == ("prn_1", "org_1")
    assert (record.action, record.category, record.purpose) == (READ, OBS, TREAT)
    assert (record.decision, record.reason_code, record.decided_at) == (PERMIT, "PERMITTED", decided_at)
    assert record.deciding == ((to_organization.version.consent_id, 1),)
    assert record.rule_version == domain.RULE_VERSION

    # The event carries the same, for the audit log.
    recorded = [p for _, kind, p in await w.events() if kind == "ConsentDecisionRecorded"][-1]
    assert isinstance(recorded, ev.ConsentDecisionRecorded)
    assert list(recorded.considered) == considered and recorded.actor_organization_id == "org_1"


async def test_a_smart_client_learned_from_identitys_event_is_covered_by_its_organizations_grant(
    registered: World,
) -> None:
    """records asks consent with a SMART client (an integration engine) as the actor: consent
    learns the client, a principal of kind smart-client, from identity's PrincipalRegistered, and
    a consent naming its organization covers it; a client of another organization is denied."""
    w = registered
    learn = PrincipalDirectoryHandler(w.db)
    for client_id, org_id in (("cli_1", "org_1"), ("cli_2", "org_2")):
        registered_event = new_event(
            source="medledger.identity",
            payload=id_ev.PrincipalRegistered(
                principal_id=client_id, kind=Kind.PRINCIPAL_KIND_SMART_CLIENT, organization_id=org_id
            ),
            aggregate_id=client_id,
            version=1,
        )
        await learn(ConsumedMessage(ConsumerRecord("t", 0, 0, 0, 0, None, b"", None, 0, 0, ()), registered_event))
    await w.consents.grant(PATIENT, grant("pat_1", "org_1"))
    outcome, decision_id, _ = await w.checks.check(RECORDS, "pat_1", "cli_1", READ, OBS, TREAT)
    assert outcome.decision == PERMIT
    record = await w.checks.decision(PATIENT, decision_id)
    assert (record.actor_id, record.actor_organization_id) == ("cli_1", "org_1")
    denied, _, _ = await w.checks.check(RECORDS, "pat_1", "cli_2", READ, OBS, TREAT)
    assert denied.decision != PERMIT


async def test_a_version_recorded_after_the_decision_was_not_considered(registered: World) -> None:
    w = registered
    first = await w.consents.grant(PATIENT, grant("pat_1", "prn_1"))
    _, decision_id, _ = await w.checks.check(RECORDS, "pat_1", "prn_1", READ, OBS, TREAT)
    await asyncio.sleep(0.01)
    await w.consents.grant(PATIENT, grant("pat_1", "prn_2"))
    record = await w.checks.decision(ACTOR, decision_id)
    assert record.considered == (first.version.commitment,)


async def test_a_decision_about_a_patient_without_consents_considered_none(registered: World) -> None:
    w = registered
    _, decision_id, _ = await w.checks.check(RECORDS, "pat_1", "prn_1", READ, OBS, TREAT)
    record = await w.checks.decision(PATIENT, decision_id)
    assert record.considered == () and record.reason_code == "NO_CONSENT_FOR_PATIENT"


@pytest.mark.parametrize(
    ("reader", "allowed"),
    [
        (PATIENT, True),
        (ACTOR, True),
        (caller("prv_1", "practitioner", "privacy-officer", organization_id="org_9"), True),
        (caller("aud_1", "practitioner", "auditor"), True),
        (caller("adm_1", "service", "admin"), True),
        (OTHER_PATIENT, False),
        (COLLEAGUE, False),  # the actor's colleague is not the actor
        (RECORDS, False),  # asking consent does not make one a reader of its records
        (caller("prn_g", "practitioner", "guardian"), False),  # a guardian, but not this patient's
    ],
)
async def test_who_reads_a_decision(registered: World, reader: Caller, allowed: bool) -> None:
    w = registered
    _, decision_id, _ = await w.checks.check(RECORDS, "pat_1", "prn_1", READ, OBS, TREAT)
    if allowed:
        assert (await w.checks.decision(reader, decision_id)).decision_id == decision_id
    else:
        with pytest.raises(NotFound):  # as a missing one: ids must not reveal whom data went to
            await w.checks.decision(reader, decision_id)


async def test_an_unknown_or_malformed_decision_id_is_refused(registered: World) -> None:
    w = registered
    with pytest.raises(NotFound):
        await w.checks.decision(PATIENT, "dec_" + "0" * 32)
    for bad in ("", "dec_XYZ", "dec_" + "0" * 33, "con_" + "0" * 32):
        with pytest.raises(InvalidArgument):
            await w.checks.decision(PATIENT, bad)
