"""The decision rule as a pure function: the decision matrix, deny over permit, organizations,
periods, revocation, replay at a past `now`; and the FHIR form and commitment of a version."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace

import pytest
import rfc8785
from fhir.resources.R4B.consent import Consent as FhirConsent
from hypothesis import given, settings
from hypothesis import strategies as st
from medledger.consent.v1 import consent_service_pb2 as pb
from medledger.types.v1 import vocabulary_pb2 as v

from medledger_consent import break_glass_rules, domain, fhir
from medledger_consent.domain import ConsentIndex, ConsentVersion, Question

T0 = 1_800_000_000.0
DAY = 86400.0
PATIENT, DOCTOR, OTHER_DOCTOR, ORG = "pat_p", "prn_a", "prn_b", "org_1"
READ, WRITE = v.Action.ACTION_READ, v.Action.ACTION_WRITE
OBS, MEDS = v.DataCategory.DATA_CATEGORY_OBSERVATIONS, v.DataCategory.DATA_CATEGORY_MEDICATIONS
TREAT, HRESCH = v.PurposeOfUse.PURPOSE_OF_USE_TREAT, v.PurposeOfUse.PURPOSE_OF_USE_HRESCH
PERMIT, DENY, NO_CONSENT = (
    pb.Decision.DECISION_PERMIT,
    pb.Decision.DECISION_DENY,
    pb.Decision.DECISION_NO_CONSENT,
)


def consent(
    consent_id: str = "cns_1",
    grantee: str = DOCTOR,
    provision: int = domain.PERMIT,
    version: int = 1,
    recorded_at: float = T0,
    **changes: object,
) -> ConsentVersion:
    base = ConsentVersion(
        consent_id=consent_id,
        version=version,
        patient_id=PATIENT,
        grantee_id=grantee,
        provision=provision,
        actions=frozenset({READ}),
        categories=frozenset({OBS}),
        purposes=frozenset({TREAT}),
        period_start=T0,
        period_end=T0 + 30 * DAY,
        status=domain.ACTIVE,
        recorded_by=PATIENT,
        recorded_at=recorded_at,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def ask_question() -> Question:
    return Question(
        patient_id=PATIENT,
        actor_id=DOCTOR,
        actor_organization_id="",
        action=READ,
        category=OBS,
        purpose=TREAT,
        now=T0 + DAY,
    )


def ask(index: ConsentIndex, **changes: object) -> domain.Outcome:
    return index.decide(replace(ask_question(), **changes))  # type: ignore[arg-type]


def index_of(*versions: ConsentVersion) -> ConsentIndex:
    index = ConsentIndex()
    for x in versions:
        index.add(x)
    return index


def test_the_right_request_is_permitted_by_its_consent() -> None:
    outcome = ask(index_of(consent()))
    assert (outcome.decision, outcome.reason_code, outcome.deciding) == (PERMIT, "PERMITTED", (("cns_1", 1),))


@pytest.mark.parametrize(
    ("wrong", "code"),
    [
        ({"patient_id": "pat_other"}, "NO_CONSENT_FOR_PATIENT"),
        ({"actor_id": OTHER_DOCTOR}, "NO_MATCHING_GRANTEE"),
        ({"action": WRITE}, "ACTION_NOT_COVERED"),
        ({"category": MEDS}, "CATEGORY_NOT_COVERED"),
        ({"purpose": HRESCH}, "PURPOSE_NOT_COVERED"),
        ({"now": T0 + 31 * DAY}, "NOT_IN_PERIOD"),
    ],
)
def test_each_single_wrong_input_denies_with_its_own_reason(wrong: dict, code: str) -> None:
    outcome = ask(index_of(consent()), **wrong)
    assert outcome.decision == NO_CONSENT
    assert outcome.reason_code == code
    assert outcome.deciding == (), "NO_CONSENT has no deciding versions"
    assert outcome.reason and outcome.reason != ask(index_of(consent())).reason


def test_the_reasons_differ_from_each_other() -> None:
    index = index_of(consent())
    wrongs = [{"actor_id": OTHER_DOCTOR}, {"action": WRITE}, {"category": MEDS}, {"purpose": HRESCH}, {"now": T0 - 1}]
    reasons = {ask(index, **w).reason for w in wrongs}
    assert len(reasons) == len(wrongs)


def test_an_explicit_deny_beats_a_permit() -> None:
    deny = consent("cns_2", provision=domain.DENY, actions=frozenset(), categories=frozenset(), purposes=frozenset())
    outcome = ask(index_of(consent(), deny))
    assert (outcome.decision, outcome.reason_code, outcome.deciding) == (DENY, "EXPLICIT_DENY", (("cns_2", 1),))
    # The deny names one doctor: another's permit stands.
    other = consent("cns_3", grantee=OTHER_DOCTOR)
    assert ask(index_of(consent(), deny, other), actor_id=OTHER_DOCTOR).decision == PERMIT


def test_a_newer_consent_for_one_doctor_leaves_another_doctors_permit_intact() -> None:
    first = consent("cns_1", grantee=DOCTOR)
    second = consent("cns_2", grantee=OTHER_DOCTOR, recorded_at=T0 + 2 * DAY)
    revoked_first = replace(first, version=2, status=domain.INACTIVE, recorded_at=T0 + 3 * DAY)
    index = index_of(first, second, revoked_first)
    now = T0 + 4 * DAY
    assert ask(index, actor_id=OTHER_DOCTOR, now=now).decision == PERMIT
    assert ask(index, now=now).reason_code == "REVOKED"


def test_expiry_and_not_yet_begun() -> None:
    index = index_of(consent(period_start=T0 + DAY, period_end=T0 + 2 * DAY))
    assert ask(index, now=T0 + 0.5 * DAY).reason_code == "NOT_IN_PERIOD"
    assert ask(index, now=T0 + 1.5 * DAY).decision == PERMIT
    assert ask(index, now=T0 + 2 * DAY).reason_code == "NOT_IN_PERIOD"  # the end is exclusive
    assert ask(index_of(consent(period_end=None)), now=T0 + 3650 * DAY).decision == PERMIT


def test_an_organization_grant_covers_its_practitioners_only() -> None:
    index = index_of(consent(grantee=ORG))
    assert ask(index, actor_organization_id=ORG).decision == PERMIT
    assert ask(index, actor_organization_id="org_2").reason_code == "NO_MATCHING_GRANTEE"
    assert ask(index).reason_code == "NO_MATCHING_GRANTEE"


def test_empty_lists_cover_everything() -> None:
    index = index_of(consent(actions=frozenset(), categories=frozenset(), purposes=frozenset()))
    assert ask(index, action=WRITE, category=MEDS, purpose=HRESCH).decision == PERMIT


def test_the_same_inputs_and_now_give_the_same_decision_even_after_later_changes() -> None:
    grant = consent()
    index = index_of(grant)
    before = ask(index, now=T0 + DAY)
    # A revocation recorded later does not change what was decided at T0 + DAY.
    index.add(replace(grant, version=2, status=domain.INACTIVE, recorded_at=T0 + 2 * DAY))
    assert ask(index, now=T0 + DAY) == before
    assert ask(index, now=T0 + 3 * DAY).reason_code == "REVOKED"
    # Versions recorded in the future of `now` do not exist yet.
    assert ask(index_of(consent(recorded_at=T0 + 5 * DAY)), now=T0 + DAY).decision == NO_CONSENT


def test_adding_a_version_twice_changes_nothing() -> None:
    index = index_of(consent())
    assert not index.add(consent())
    assert index.size == 1


def test_the_fhir_form_validates_and_the_commitment_is_what_the_readme_says() -> None:
    for version in (consent(), consent(provision=domain.DENY, grantee=ORG, period_end=None)):
        document = fhir.fhir_consent(version)
        FhirConsent.model_validate(document)
        assert document["provision"]["type"] in ("permit", "deny")
        salt = bytes(range(32))
        expected = hashlib.sha256(b"medledger:consent:v1\n" + salt + rfc8785.dumps(document)).hexdigest()
        assert fhir.commitment(document, salt) == expected
        assert fhir.commitment(document, bytes(32)) != expected
        # JCS: key order and whitespace do not change the commitment.
        reordered = json.loads(json.dumps(document, sort_keys=True))
        assert fhir.commitment(reordered, salt) == expected


# -- break-glass (rule 4) -------------------------------------------------------------------------

ETREAT = v.PurposeOfUse.PURPOSE_OF_USE_ETREAT
HOUR = 3600.0


def broken_glass(access_id: str = "bgl_1", **changes: object) -> domain.BreakGlassAccess:
    base = domain.BreakGlassAccess(
        access_id=access_id,
        patient_id=PATIENT,
        practitioner_id=DOCTOR,
        organization_id=ORG,
        reason=pb.BreakGlassReason.BREAK_GLASS_REASON_LIFE_THREATENING,
        justification_sha256=break_glass_rules.justification_sha256("unconscious, allergy history needed"),
        started_at=T0 + DAY - HOUR,
        expires_at=T0 + DAY + 3 * HOUR,
        overrides_deny=False,
        review=pb.BreakGlassReview.BREAK_GLASS_REVIEW_PENDING,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def with_break_glass(index: ConsentIndex, *accesses: domain.BreakGlassAccess) -> ConsentIndex:
    for a in accesses:
        index.put_break_glass(a)
    return index


def test_break_glass_permits_emergency_reads_without_consent() -> None:
    index = with_break_glass(index_of(), broken_glass())
    outcome = ask(index, purpose=ETREAT)
    assert (outcome.decision, outcome.reason_code, outcome.break_glass_access_id) == (PERMIT, "BREAK_GLASS", "bgl_1")
    assert outcome.deciding == ()


def test_break_glass_is_read_only_for_etreat_and_for_its_practitioner_and_patient() -> None:
    index = with_break_glass(index_of(), broken_glass())
    for wrong, code in (
        ({"action": WRITE}, "NO_CONSENT_FOR_PATIENT"),
        ({"purpose": TREAT}, "NO_CONSENT_FOR_PATIENT"),
        ({"actor_id": OTHER_DOCTOR}, "NO_CONSENT_FOR_PATIENT"),
        ({"patient_id": "pat_other"}, "NO_CONSENT_FOR_PATIENT"),
    ):
        outcome = ask(index, **{"purpose": ETREAT, **wrong})
        assert (outcome.decision, outcome.reason_code, outcome.break_glass_access_id) == (NO_CONSENT, code, ""), wrong


def test_break_glass_expires_and_ends_with_an_unjustified_review() -> None:
    access = broken_glass()
    index = with_break_glass(index_of(), access)
    assert ask(index, purpose=ETREAT, now=access.expires_at - 1).decision == PERMIT
    assert ask(index, purpose=ETREAT, now=access.expires_at).decision == NO_CONSENT
    assert ask(index, purpose=ETREAT, now=access.started_at - 1).decision == NO_CONSENT
    ended = replace(
        access, review=pb.BreakGlassReview.BREAK_GLASS_REVIEW_UNJUSTIFIED, ended_at=T0 + DAY, reviewed_at=T0 + DAY
    )
    assert index.put_break_glass(ended) and not index.put_break_glass(ended)
    assert ask(index, purpose=ETREAT, now=T0 + DAY + 1).decision == NO_CONSENT
    # Replayed at a time before the review, the decision is what it was then.
    assert ask(index, purpose=ETREAT, now=T0 + DAY - 1).decision == PERMIT


def test_an_explicit_deny_stands_unless_the_policy_let_break_glass_override_it() -> None:
    deny = consent("cns_deny", provision=domain.DENY, actions=frozenset(), categories=frozenset(), purposes=frozenset())
    held = ask(with_break_glass(index_of(deny), broken_glass()), purpose=ETREAT)
    assert (held.decision, held.reason_code, held.break_glass_access_id) == (DENY, "EXPLICIT_DENY", "")
    assert "does not override" in held.reason
    overridden = ask(with_break_glass(index_of(deny), broken_glass(overrides_deny=True)), purpose=ETREAT)
    assert (overridden.decision, overridden.reason_code) == (PERMIT, "BREAK_GLASS_OVERRIDES_DENY")
    assert overridden.deciding == (("cns_deny", 1),) and overridden.break_glass_access_id == "bgl_1"


def test_a_consent_that_permits_decides_before_break_glass() -> None:
    index = with_break_glass(index_of(consent(purposes=frozenset({ETREAT}))), broken_glass())
    outcome = ask(index, purpose=ETREAT)
    assert (outcome.reason_code, outcome.break_glass_access_id) == ("PERMITTED", "")


@pytest.mark.parametrize(
    ("field", "request_fields"),
    [
        ("patient_id", {"patient_id": ""}),
        ("reason", {"reason": 0}),
        ("reason", {"reason": 99}),
        ("justification", {"justification": "   too short "}),
        ("justification", {"justification": "x" * 2001}),
    ],
)
def test_break_glass_requests_name_the_bad_field(field: str, request_fields: dict) -> None:
    base = {
        "patient_id": PATIENT,
        "reason": pb.BreakGlassReason.BREAK_GLASS_REASON_LIFE_THREATENING,
        "justification": "unconscious on arrival; allergy history needed",
    }
    with pytest.raises(domain.InvalidArgument) as err:
        break_glass_rules.check_break_glass(**{**base, **request_fields})
    assert [violation.field for violation in err.value.violations] == [field]


def test_policies_default_to_four_hours_and_three_uses_a_day_and_refuse_bad_durations() -> None:
    unset = {"overrides_deny": False, "access_seconds": None, "max_uses": 0, "rate_window_seconds": None}
    policy = break_glass_rules.check_policy(ORG, enabled=True, **unset)  # type: ignore[arg-type]
    assert (policy.access_seconds, policy.max_uses, policy.rate_window_seconds) == (4 * HOUR, 3, 24 * HOUR)
    with pytest.raises(domain.InvalidArgument):
        break_glass_rules.check_policy(ORG, enabled=False, **{**unset, "access_seconds": 25 * 3600.0})  # type: ignore[arg-type]


# -- the index decides as the rule does -----------------------------------------------------------

_ACTORS = [DOCTOR, OTHER_DOCTOR, ORG]
_version_strategy = st.builds(
    lambda cid, grantee, provision, actions, categories, purposes, start, length, revoked, recorded: consent(
        f"cns_{cid}",
        grantee=grantee,
        provision=provision,
        actions=frozenset(actions),
        categories=frozenset(categories),
        purposes=frozenset(purposes),
        period_start=T0 + start * DAY,
        period_end=None if length is None else T0 + (start + length) * DAY,
        status=domain.INACTIVE if revoked else domain.ACTIVE,
        recorded_at=T0 + recorded * DAY,
    ),
    st.integers(0, 5),
    st.sampled_from(_ACTORS),
    st.sampled_from([domain.PERMIT, domain.DENY]),
    st.sets(st.sampled_from([READ, WRITE]), max_size=2),
    st.sets(st.sampled_from([OBS, MEDS]), max_size=2),
    st.sets(st.sampled_from([TREAT, HRESCH]), max_size=2),
    st.integers(-3, 3),
    st.one_of(st.none(), st.integers(1, 5)),
    st.booleans(),
    st.integers(-4, 4),
)


@settings(max_examples=300, deadline=None)
@given(
    versions=st.lists(_version_strategy, max_size=8),
    actor=st.sampled_from(_ACTORS),
    organization=st.sampled_from(["", ORG]),
    action=st.sampled_from([READ, WRITE]),
    category=st.sampled_from([OBS, MEDS]),
    purpose=st.sampled_from([TREAT, HRESCH]),
    day=st.integers(-5, 8),
)
def test_the_index_decides_exactly_as_the_rule_over_all_the_patients_consents(
    versions: list[ConsentVersion], actor: str, organization: str, action: int, category: int, purpose: int, day: int
) -> None:
    # Versions of one consent share its grantee and take numbers in order of recording.
    by_id: dict[str, list[ConsentVersion]] = {}
    for x in sorted(versions, key=lambda x: x.recorded_at):
        first = by_id.get(x.consent_id, [x])[0]
        by_id.setdefault(x.consent_id, []).append(
            replace(x, grantee_id=first.grantee_id, version=len(by_id.get(x.consent_id, [])) + 1)
        )
    index = index_of(*(v for vs in by_id.values() for v in vs))
    q = Question(PATIENT, actor, organization, action, category, purpose, T0 + day * DAY)
    outcome = domain.decide(list(by_id.values()), q)
    assert index.decide(q) == outcome
    # Every outcome is one the decisions metric was created with (at zero), so dashboards
    # see each (decision, reason code) series from the start.
    decision = pb.Decision.Name(outcome.decision).removeprefix("DECISION_")
    assert (decision, outcome.reason_code) in domain.DECISION_CODES


def test_an_actor_that_is_its_own_organization_is_counted_once() -> None:
    # Found by the property test above: the index looked the organization up twice.
    index = index_of(consent(grantee=ORG))
    outcome = ask(index, actor_id=ORG, actor_organization_id=ORG)
    assert outcome == domain.decide(
        index.of_patient(PATIENT), replace(ask_question(), actor_id=ORG, actor_organization_id=ORG)
    )
    assert outcome.deciding == (("cns_1", 1),)
