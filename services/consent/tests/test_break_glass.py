"""Break-glass through its use cases (break_glass.BreakGlassDesk), without gRPC: on SQLite with
a real local keyring (conftest.py); its accesses decide checks through checks.ConsentChecks. The
gRPC API over them is tested in tests/integration/test_consent.py."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from medledger.consent.v1 import consent_service_pb2 as pb
from medledger.events.v1 import consent_events_pb2 as ev
from medledger.types.v1 import vocabulary_pb2 as v

from medledger_consent import break_glass_rules
from medledger_consent.break_glass_commands import (
    BreakGlass,
    ListBreakGlassAccesses,
    ReviewBreakGlassAccess,
    SetBreakGlassPolicy,
)
from medledger_runtime.auth import Caller
from medledger_runtime.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, ResourceExhausted
from medledger_runtime.events import TOPICS

if TYPE_CHECKING:
    from conftest import World  # type: ignore[import-not-found]  # the fixture's type (conftest.py)

Kind = v.PrincipalKind
READ = v.Action.ACTION_READ
OBS = v.DataCategory.DATA_CATEGORY_OBSERVATIONS
ETREAT = v.PurposeOfUse.PURPOSE_OF_USE_ETREAT
PERMIT, NO_CONSENT = pb.Decision.DECISION_PERMIT, pb.Decision.DECISION_NO_CONSENT
LIFE_THREATENING = pb.BreakGlassReason.BREAK_GLASS_REASON_LIFE_THREATENING
PENDING = pb.BreakGlassReview.BREAK_GLASS_REVIEW_PENDING
UNJUSTIFIED = pb.BreakGlassReview.BREAK_GLASS_REVIEW_UNJUSTIFIED
JUSTIFICATION = "unconscious on arrival; allergy history needed"


def caller(principal_id: str, kind: str, *roles: str, organization_id: str = "") -> Caller:
    return Caller(principal_id, kind, frozenset(roles), organization_id, f"tok_{principal_id}", 0.0)


DOCTOR = caller("prn_1", "practitioner", organization_id="org_1")
ORG_ADMIN = caller("prn_admin", "practitioner", "org-admin", organization_id="org_1")
OFFICER = caller("prn_po", "practitioner", "privacy-officer", organization_id="org_1")
OTHER_OFFICER = caller("prn_po2", "practitioner", "privacy-officer", organization_id="org_2")
RECORDS = caller("svc_records", "service", "pdp-client")


@pytest.fixture
async def registered(world: World) -> World:
    await world.register("org_1", Kind.PRINCIPAL_KIND_ORGANIZATION)
    await world.register("pat_1", Kind.PRINCIPAL_KIND_PATIENT)
    await world.register("prn_1", Kind.PRINCIPAL_KIND_PRACTITIONER, "org_1")
    return world


def emergency(**changes: object) -> BreakGlass:
    fields: dict[str, object] = {"patient_id": "pat_1", "reason": LIFE_THREATENING, "justification": JUSTIFICATION}
    fields.update(changes)
    return BreakGlass(**fields)  # type: ignore[arg-type]


async def test_breaking_the_glass_under_a_policy_records_an_access_that_permits_and_is_reviewed(
    registered: World,
) -> None:
    w = registered
    policy = await w.break_glass.set_policy(ORG_ADMIN, SetBreakGlassPolicy("org_1", enabled=True, max_uses=2))
    assert (policy.enabled, policy.max_uses, policy.access_seconds, policy.changed_by) == (
        True,
        2,
        break_glass_rules.DEFAULT_ACCESS_SECONDS,
        "prn_admin",
    )
    assert await w.break_glass.get_policy(DOCTOR, "org_1") == policy

    access = await w.break_glass.break_glass(DOCTOR, emergency())
    assert (access.patient_id, access.practitioner_id, access.organization_id, access.review) == (
        "pat_1",
        "prn_1",
        "org_1",
        PENDING,
    )
    assert access.justification_sha256 == break_glass_rules.justification_sha256(JUSTIFICATION)
    events = [(topic, kind) for topic, kind, _ in await w.events()]
    assert events == [
        (TOPICS["consent"], "BreakGlassPolicyChanged"),
        (TOPICS["consent"], "BreakGlassAccessStarted"),
        (TOPICS["notifications"], "NotificationRequested"),
        (TOPICS["notifications"], "NotificationRequested"),
    ]

    # The access joined the index at once: an emergency read by that practitioner is permitted.
    outcome, _, _ = await w.checks.check(RECORDS, "pat_1", "prn_1", READ, OBS, ETREAT)
    assert (outcome.decision, outcome.reason_code, outcome.break_glass_access_id) == (
        PERMIT,
        "BREAK_GLASS",
        access.access_id,
    )

    # The organization's privacy officer lists it pending and reads it with its justification.
    page = await w.break_glass.list_accesses(OFFICER, ListBreakGlassAccesses("org_1", pending_only=True))
    assert [a.access_id for a in page.accesses] == [access.access_id]
    read = await w.break_glass.get_access(OFFICER, access.access_id)
    assert (read.access, read.justification) == (access, JUSTIFICATION)
    with pytest.raises(NotFound):  # another organization's officer sees nothing
        await w.break_glass.get_access(OTHER_OFFICER, access.access_id)

    reviewed = await w.break_glass.review(OFFICER, ReviewBreakGlassAccess(access.access_id, UNJUSTIFIED))
    assert (reviewed.review, reviewed.reviewed_by) == (UNJUSTIFIED, "prn_po")
    assert reviewed.ended_at is not None  # an unjustified access ends at once
    with pytest.raises(FailedPrecondition, match="reviewed already"):
        await w.break_glass.review(OFFICER, ReviewBreakGlassAccess(access.access_id, UNJUSTIFIED))
    pending = await w.break_glass.list_accesses(OFFICER, ListBreakGlassAccesses("org_1", pending_only=True))
    assert pending.accesses == []
    review_event = (await w.events())[-1][2]
    assert isinstance(review_event, ev.BreakGlassAccessReviewed)
    assert (review_event.access_id, review_event.review) == (access.access_id, "BREAK_GLASS_REVIEW_UNJUSTIFIED")

    after, _, _ = await w.checks.check(RECORDS, "pat_1", "prn_1", READ, OBS, ETREAT)
    assert (after.decision, after.break_glass_access_id) == (NO_CONSENT, "")


async def test_the_policy_limits_uses_and_a_user_does_not_review_their_own(registered: World) -> None:
    w = registered
    await w.break_glass.set_policy(ORG_ADMIN, SetBreakGlassPolicy("org_1", enabled=True, max_uses=1))
    await w.register("prn_po", Kind.PRINCIPAL_KIND_PRACTITIONER, "org_1")
    own = await w.break_glass.break_glass(OFFICER, emergency())
    with pytest.raises(ResourceExhausted, match="1 uses per 24 hours"):
        await w.break_glass.break_glass(OFFICER, emergency())
    with pytest.raises(PermissionDenied, match="does not review their own"):
        await w.break_glass.review(OFFICER, ReviewBreakGlassAccess(own.access_id, UNJUSTIFIED))


async def test_breaking_the_glass_without_a_policy_is_refused_and_changes_nothing(registered: World) -> None:
    w = registered
    assert (await w.break_glass.get_policy(DOCTOR, "org_1")).enabled is False
    before = await w.state()
    with pytest.raises(PermissionDenied, match="has not enabled break-glass access"):
        await w.break_glass.break_glass(DOCTOR, emergency())
    assert await w.state() == before
    assert w.notified == []
    outcome, _, _ = await w.checks.check(RECORDS, "pat_1", "prn_1", READ, OBS, ETREAT)
    assert (outcome.decision, outcome.break_glass_access_id) == (NO_CONSENT, "")


@pytest.mark.parametrize(
    ("command", "field"),
    [
        (emergency(patient_id=""), "patient_id"),
        (emergency(reason=0), "reason"),
        (emergency(justification="  short  "), "justification"),
        (emergency(patient_id="pat_unknown"), "patient_id"),  # refused inside the transaction
    ],
)
async def test_an_invalid_break_glass_names_its_field_and_changes_nothing(
    registered: World, command: BreakGlass, field: str
) -> None:
    w = registered
    await w.break_glass.set_policy(ORG_ADMIN, SetBreakGlassPolicy("org_1", enabled=True))
    before = await w.state()
    with pytest.raises(InvalidArgument) as refused:
        await w.break_glass.break_glass(DOCTOR, command)
    assert [violation.field for violation in refused.value.violations] == [field]
    assert await w.state() == before


async def test_only_an_admin_or_the_organizations_org_admin_sets_its_policy(registered: World) -> None:
    w = registered
    before = await w.state()
    with pytest.raises(PermissionDenied, match="their own organization's policy"):
        await w.break_glass.set_policy(
            caller("prn_x", "practitioner", "org-admin", organization_id="org_2"),
            SetBreakGlassPolicy("org_1", enabled=True),
        )
    with pytest.raises(InvalidArgument, match="at most 24 hours"):
        await w.break_glass.set_policy(ORG_ADMIN, SetBreakGlassPolicy("org_1", access_seconds=25 * 3600.0))
    assert await w.state() == before
