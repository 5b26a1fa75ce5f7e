"""Consents, checks and guardians through their use cases (consents.ConsentDesk,
checks.ConsentChecks), without gRPC: on SQLite, with the decision log's group commit running
(conftest.py). The gRPC API over them is tested in tests/integration/test_consent.py."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from medledger.consent.v1 import consent_service_pb2 as pb
from medledger.events.v1 import consent_events_pb2 as ev
from medledger.types.v1 import vocabulary_pb2 as v
from sqlalchemy import select

from medledger_consent import domain, fhir, storage
from medledger_consent.consents import ChangeGuardian, GetConsent, GrantConsent, ListConsents, RevokeConsent
from medledger_runtime.auth import Caller
from medledger_runtime.errors import InvalidArgument, NotFound, PermissionDenied
from medledger_runtime.events import TOPICS

if TYPE_CHECKING:
    from conftest import World  # type: ignore[import-not-found]  # the fixture's type (conftest.py)

Kind = v.PrincipalKind


def caller(principal_id: str, kind: str, *roles: str, organization_id: str = "") -> Caller:
    return Caller(principal_id, kind, frozenset(roles), organization_id, f"tok_{principal_id}", 0.0)


READ = v.Action.ACTION_READ
OBS = v.DataCategory.DATA_CATEGORY_OBSERVATIONS
TREAT = v.PurposeOfUse.PURPOSE_OF_USE_TREAT
PERMIT, NO_CONSENT = pb.Decision.DECISION_PERMIT, pb.Decision.DECISION_NO_CONSENT
PATIENT = caller("pat_1", "patient")
STRANGER = caller("pat_2", "patient")
RECORDS = caller("svc_records", "service", "pdp-client")
GUARDIAN = caller("prn_g", "practitioner", "guardian", organization_id="org_1")


@pytest.fixture
async def registered(world: World) -> World:
    await world.register("pat_1", Kind.PRINCIPAL_KIND_PATIENT)
    await world.register("pat_2", Kind.PRINCIPAL_KIND_PATIENT)
    await world.register("prn_1", Kind.PRINCIPAL_KIND_PRACTITIONER, "org_1")
    await world.register("prn_g", Kind.PRINCIPAL_KIND_PRACTITIONER, "org_1")
    return world


def grant_to(grantee_id: str = "prn_1", **changes: object) -> GrantConsent:
    fields: dict[str, object] = {
        "patient_id": "pat_1",
        "grantee_id": grantee_id,
        "provision": domain.PERMIT,
        "actions": (READ,),
        "categories": (OBS,),
        "purposes": (TREAT,),
    }
    fields.update(changes)
    return GrantConsent(**fields)  # type: ignore[arg-type]


async def test_a_grant_then_a_check_permits_and_the_decision_is_recorded(registered: World) -> None:
    w = registered
    before, _, _ = await w.checks.check(RECORDS, "pat_1", "prn_1", READ, OBS, TREAT)
    assert (before.decision, before.reason_code) == (NO_CONSENT, "NO_CONSENT_FOR_PATIENT")

    granted = await w.consents.grant(PATIENT, grant_to())
    assert (granted.version.version, granted.version.status, granted.version.recorded_by) == (1, domain.ACTIVE, "pat_1")
    assert granted.version.commitment == fhir.commitment(fhir.fhir_consent(granted.version), granted.salt)
    assert w.notified == [1]  # the relay is woken once the grant commits

    outcome, decision_id, decided_at = await w.checks.check(RECORDS, "pat_1", "prn_1", READ, OBS, TREAT)
    assert (outcome.decision, outcome.reason_code) == (PERMIT, "PERMITTED")
    assert outcome.deciding == ((granted.version.consent_id, 1),)

    # Recorded before the answer: the row and its event, on the decisions topic.
    async with w.db.connect() as conn:
        row = (
            await conn.execute(
                select(storage.consent_decisions).where(storage.consent_decisions.c.decision_id == decision_id)
            )
        ).one()
    assert (row.decision, row.reason_code, row.deciding) == (PERMIT, "PERMITTED", f"{granted.version.consent_id}@1")
    assert (row.decided_at, row.rule_version) == (decided_at, domain.RULE_VERSION)
    events = await w.events()
    assert [(topic, kind) for topic, kind, _ in events] == [
        (TOPICS["consent.decisions"], "ConsentDecisionRecorded"),
        (TOPICS["consent"], "ConsentVersionRecorded"),
        (TOPICS["consent.decisions"], "ConsentDecisionRecorded"),
    ]
    recorded = events[2][2]
    assert isinstance(recorded, ev.ConsentDecisionRecorded)
    assert (recorded.decision_id, recorded.decision) == (decision_id, "DECISION_PERMIT")


async def test_a_revocation_then_a_check_denies(registered: World) -> None:
    w = registered
    granted = await w.consents.grant(PATIENT, grant_to())
    revoked = await w.consents.revoke(PATIENT, RevokeConsent(granted.version.consent_id))
    assert (revoked.version.version, revoked.version.status) == (2, domain.INACTIVE)

    outcome, _, _ = await w.checks.check(RECORDS, "pat_1", "prn_1", READ, OBS, TREAT)
    assert (outcome.decision, outcome.reason_code) == (NO_CONSENT, "REVOKED")

    # Revoking again records nothing new and answers with the revoked version.
    again = await w.consents.revoke(PATIENT, RevokeConsent(granted.version.consent_id))
    assert again.version == revoked.version
    kinds = [kind for _, kind, _ in await w.events()]
    assert kinds.count("ConsentVersionRecorded") == 2


async def test_a_guardian_grants_for_the_patient_once_appointed_and_holding_the_role(registered: World) -> None:
    w = registered
    with pytest.raises(PermissionDenied, match="only the patient, their guardian or an admin grants"):
        await w.consents.grant(GUARDIAN, grant_to())

    appointed = await w.consents.appoint_guardian(PATIENT, ChangeGuardian("pat_1", "prn_g"))
    assert (appointed.active, appointed.changed_by) == (True, "pat_1")
    granted = await w.consents.grant(GUARDIAN, grant_to())
    assert (granted.version.patient_id, granted.version.recorded_by) == ("pat_1", "prn_g")
    outcome, _, _ = await w.checks.check(GUARDIAN, "pat_1", "prn_1", READ, OBS, TREAT)  # checks for them too
    assert outcome.decision == PERMIT

    # The same practitioner without identity's guardian role does not act for the patient.
    without_role = caller("prn_g", "practitioner", organization_id="org_1")
    with pytest.raises(PermissionDenied):
        await w.consents.grant(without_role, grant_to())

    removed = await w.consents.remove_guardian(PATIENT, ChangeGuardian("pat_1", "prn_g"))
    assert removed.active is False
    with pytest.raises(PermissionDenied):
        await w.consents.revoke(GUARDIAN, RevokeConsent(granted.version.consent_id))
    changes = [p for _, kind, p in await w.events() if kind == "GuardianshipChanged"]
    assert [(c.guardian_id, c.active) for c in changes] == [("prn_g", True), ("prn_g", False)]  # type: ignore[attr-defined]


async def test_a_stranger_cannot_read_someones_consents(registered: World) -> None:
    w = registered
    granted = await w.consents.grant(PATIENT, grant_to())
    with pytest.raises(PermissionDenied, match="principals list their own consents"):
        await w.consents.list(STRANGER, ListConsents(patient_id="pat_1"))
    # One consent by id: the same answer as a missing one.
    with pytest.raises(NotFound, match="no such consent version"):
        await w.consents.get(STRANGER, GetConsent(granted.version.consent_id))
    with pytest.raises(PermissionDenied, match="about themselves only"):
        await w.checks.check(STRANGER, "pat_1", "prn_1", READ, OBS, TREAT)

    # The patient and the grantee read it; only the patient gets the salt.
    own = await w.consents.list(PATIENT, ListConsents(patient_id="pat_1"))
    assert [c.consent_id for c in own.versions] == [granted.version.consent_id]
    # Each listed version with its FHIR form, as GetConsent gives it.
    assert own.fhir_consent_json == [granted.fhir_consent_json]
    assert (await w.consents.get(PATIENT, GetConsent(granted.version.consent_id))).salt == granted.salt
    assert (await w.consents.get(caller("prn_1", "practitioner"), GetConsent(granted.version.consent_id))).salt == b""


@pytest.mark.parametrize(
    ("who", "command", "field"),
    [
        (PATIENT, grant_to(provision=0), "provision"),
        (PATIENT, grant_to(grantee_id="pat_1"), "grantee_id"),
        (PATIENT, grant_to(actions=(99,)), "actions"),
        (PATIENT, grant_to(period_start=2000.0, period_end=1000.0), "period_end"),
        (PATIENT, grant_to(grantee_id="prn_unknown"), "grantee_id"),  # refused inside the transaction
        (caller("adm_1", "service", "admin"), grant_to(patient_id="pat_unknown"), "patient_id"),
    ],
)
async def test_an_invalid_grant_names_its_field_and_changes_nothing(
    registered: World, who: object, command: GrantConsent, field: str
) -> None:
    w = registered
    before = await w.state()
    with pytest.raises(InvalidArgument) as refused:
        await w.consents.grant(who, command)  # type: ignore[arg-type]
    assert [violation.field for violation in refused.value.violations] == [field]
    assert await w.state() == before
    assert w.index.of_patient(command.patient_id) == []
    assert w.notified == []


async def test_invalid_checks_and_guardianships_change_nothing(registered: World) -> None:
    w = registered
    before = await w.state()
    with pytest.raises(InvalidArgument) as refused:
        await w.checks.check(RECORDS, "pat_1", "", READ, 0, TREAT)
    assert [violation.field for violation in refused.value.violations] == ["actor_id", "category"]
    with pytest.raises(InvalidArgument, match="not their own guardian"):
        await w.consents.appoint_guardian(PATIENT, ChangeGuardian("pat_1", "pat_1"))
    with pytest.raises(InvalidArgument, match="not a registered patient, practitioner or researcher"):
        await w.consents.appoint_guardian(PATIENT, ChangeGuardian("pat_1", "prn_unknown"))
    with pytest.raises(InvalidArgument):
        await w.consents.list(PATIENT, ListConsents(patient_id="pat_1", page_size=-1))
    assert await w.state() == before


async def test_a_version_event_carries_what_the_rule_reads_of_the_version(registered: World) -> None:
    """So that a decision can be replayed from the audit log alone: provision, coverage, period
    and recording time are in the event (codes and times, no personal data beyond the subject)."""
    w = registered
    granted = await w.consents.grant(
        PATIENT, grant_to(provision=domain.DENY, actions=(READ,), categories=(OBS,), purposes=())
    )
    revoked = await w.consents.revoke(PATIENT, RevokeConsent(granted.version.consent_id))
    recorded = [p for _, kind, p in await w.events() if kind == "ConsentVersionRecorded"]
    assert len(recorded) == 2
    for event, version in zip(recorded, (granted.version, revoked.version), strict=True):
        assert isinstance(event, ev.ConsentVersionRecorded)
        assert (event.consent_id, event.version, event.commitment) == (
            version.consent_id,
            version.version,
            version.commitment,
        )
        assert event.provision == "PROVISION_TYPE_DENY"
        assert (list(event.actions), list(event.categories), list(event.purposes)) == ([READ], [OBS], [])
        assert event.recorded_at.ToNanoseconds() / 1e9 == pytest.approx(version.recorded_at, abs=1e-6)
        assert event.period_start.ToNanoseconds() / 1e9 == pytest.approx(version.period_start, abs=1e-6)
    assert (recorded[0].revoked, recorded[1].revoked) == (False, True)
