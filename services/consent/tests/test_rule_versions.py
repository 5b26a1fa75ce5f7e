"""The verifier's consent rule (``medledger_verifier.consent_rules``) is the rule the service
runs: its enum numbers are the protos', the current version is the service's, the index decides
exactly as it does over random histories, and the older version /1 still runs as it was
published (rules 1-3, no break-glass)."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st
from medledger.consent.v1 import consent_service_pb2 as pb
from medledger.types.v1 import vocabulary_pb2 as v

from medledger_consent import domain
from medledger_consent.domain import BreakGlassAccess, ConsentIndex, ConsentVersion, Question
from medledger_verifier import consent_rules as rules

T0 = 1_800_000_000.0
HOUR = 3600.0
PATIENT, ORG = "pat_p", "org_1"
_ACTORS = ["prn_a", "prn_b", ORG]
READ, WRITE = v.Action.ACTION_READ, v.Action.ACTION_WRITE
OBS, MEDS = v.DataCategory.DATA_CATEGORY_OBSERVATIONS, v.DataCategory.DATA_CATEGORY_MEDICATIONS
TREAT, ETREAT = v.PurposeOfUse.PURPOSE_OF_USE_TREAT, v.PurposeOfUse.PURPOSE_OF_USE_ETREAT


def test_the_verifier_codes_are_the_proto_enum_numbers() -> None:
    assert rules.PROVISION_PERMIT == pb.ProvisionType.PROVISION_TYPE_PERMIT
    assert rules.PROVISION_DENY == pb.ProvisionType.PROVISION_TYPE_DENY
    assert rules.STATUS_ACTIVE == pb.ConsentStatus.CONSENT_STATUS_ACTIVE
    assert rules.STATUS_INACTIVE == pb.ConsentStatus.CONSENT_STATUS_INACTIVE
    assert rules.DECISION_PERMIT == pb.Decision.DECISION_PERMIT
    assert rules.DECISION_DENY == pb.Decision.DECISION_DENY
    assert rules.DECISION_NO_CONSENT == pb.Decision.DECISION_NO_CONSENT
    assert rules.ACTION_READ == v.Action.ACTION_READ
    assert rules.PURPOSE_ETREAT == v.PurposeOfUse.PURPOSE_OF_USE_ETREAT


def test_the_service_decides_under_the_verifiers_current_version() -> None:
    assert domain.RULE_VERSION == rules.CURRENT_RULE_VERSION == "medledger-consent-rules/2"
    assert set(rules.RULES) == {"medledger-consent-rules/1", "medledger-consent-rules/2"}
    # Every outcome code the verifier can give has a decision the proto knows.
    for decision, _ in rules.DECISION_CODES:
        assert pb.Decision.Value(f"DECISION_{decision}")


def _version(
    cid: int,
    grantee: str,
    deny: bool,
    actions: set[int],
    purposes: set[int],
    start: int,
    length: int | None,
    revoked: bool,
    recorded: int,
) -> ConsentVersion:
    return ConsentVersion(
        consent_id=f"cns_{cid}",
        version=1,
        patient_id=PATIENT,
        grantee_id=grantee,
        provision=domain.DENY if deny else domain.PERMIT,
        actions=frozenset(actions),
        categories=frozenset({OBS}),
        purposes=frozenset(purposes),
        period_start=T0 + start * HOUR,
        period_end=None if length is None else T0 + (start + length) * HOUR,
        status=domain.INACTIVE if revoked else domain.ACTIVE,
        recorded_by=PATIENT,
        recorded_at=T0 + recorded * HOUR,
        commitment=f"{cid:02d}{recorded:+03d}",
    )


_versions = st.builds(
    _version,
    st.integers(0, 4),
    st.sampled_from(_ACTORS),
    st.booleans(),
    st.sets(st.sampled_from([READ, WRITE]), max_size=2),
    st.sets(st.sampled_from([TREAT, ETREAT]), max_size=2),
    st.integers(-3, 3),
    st.one_of(st.none(), st.integers(1, 5)),
    st.booleans(),
    st.integers(-4, 4),
)
_accesses = st.builds(
    lambda n, who, start, length, ended, overrides: BreakGlassAccess(
        access_id=f"bgl_{n}",
        patient_id=PATIENT,
        practitioner_id=who,
        organization_id=ORG,
        reason=1,
        justification_sha256="00" * 32,
        started_at=T0 + start * HOUR,
        expires_at=T0 + (start + length) * HOUR,
        overrides_deny=overrides,
        review=0,
        ended_at=None if ended is None else T0 + (start + ended) * HOUR,
    ),
    st.integers(0, 3),
    st.sampled_from(_ACTORS[:2]),
    st.integers(-3, 3),
    st.integers(1, 4),
    st.one_of(st.none(), st.integers(0, 4)),
    st.booleans(),
)


def _histories(versions: list[ConsentVersion]) -> list[list[ConsentVersion]]:
    # Versions of one consent share its grantee and take numbers in order of recording.
    by_id: dict[str, list[ConsentVersion]] = {}
    for x in sorted(versions, key=lambda x: x.recorded_at):
        earlier = by_id.setdefault(x.consent_id, [])
        grantee = earlier[0].grantee_id if earlier else x.grantee_id
        earlier.append(replace(x, grantee_id=grantee, version=len(earlier) + 1))
    return list(by_id.values())


@settings(max_examples=400, deadline=None)
@given(
    versions=st.lists(_versions, max_size=10),
    accesses=st.lists(_accesses, max_size=3, unique_by=lambda a: a.access_id),
    actor=st.sampled_from(_ACTORS),
    organization=st.sampled_from(["", ORG]),
    action=st.sampled_from([READ, WRITE]),
    category=st.sampled_from([OBS, MEDS]),
    purpose=st.sampled_from([TREAT, ETREAT]),
    hour=st.integers(-5, 8),
)
def test_the_verifiers_current_rule_decides_exactly_as_the_services_index(
    versions: list[ConsentVersion],
    accesses: list[BreakGlassAccess],
    actor: str,
    organization: str,
    action: int,
    category: int,
    purpose: int,
    hour: int,
) -> None:
    consents = _histories(versions)
    index = ConsentIndex()
    for x in (x for vs in consents for x in vs):
        index.add(x)
    for a in accesses:
        index.put_break_glass(a)
    q = Question(PATIENT, actor, organization, action, category, purpose, T0 + hour * HOUR)
    served = index.decide(q)
    # A replayer has only the versions the decision record says were considered (recorded at or
    # before `now`) and no reason texts: the codes and the deciding versions must follow alone.
    considered = set(index.considered(PATIENT, q.now))
    replayed_consents = [[x for x in vs if x.commitment in considered] for vs in consents]
    replayed = rules.decide(
        [vs for vs in replayed_consents if vs], q, accesses, rule_version=rules.CURRENT_RULE_VERSION
    )
    assert (replayed.decision, replayed.reason_code, replayed.deciding, replayed.break_glass_access_id) == (
        served.decision,
        served.reason_code,
        served.deciding,
        served.break_glass_access_id,
    )
    # With the service's names, the reason reads the same too.
    assert rules.decide(consents, q, accesses, domain.NAMES) == served


def test_rule_version_1_has_no_break_glass() -> None:
    access = BreakGlassAccess("bgl_1", PATIENT, "prn_a", ORG, 1, "00" * 32, T0, T0 + HOUR, True, 0)
    q = Question(PATIENT, "prn_a", ORG, READ, OBS, ETREAT, T0 + 60)
    assert rules.decide([], q, [access], rule_version=rules.RULES_V2).reason_code == "BREAK_GLASS"
    v1 = rules.decide([], q, [access], rule_version=rules.RULES_V1)
    assert (v1.decision, v1.reason_code) == (rules.DECISION_NO_CONSENT, "NO_CONSENT_FOR_PATIENT")
