"""Consent's decision rule, every published version of it, free of I/O and of medledger's protos:
the consent service decides with it, and anyone replaying a logged decision re-runs it
(``decision_replay``). One rule, written once.

The rule is a pure function of the patient's consent versions, the actor (and their
organization), the action, the data category, the purpose and `now`:

1. For each consent, the version in force at `now` is its latest version recorded at or before
   `now`; consents with no such version do not exist yet.
2. A version applies when it names the actor (or the actor's organization), is active (not
   revoked), `now` is inside its period, and its action, category and purpose lists cover the
   request (an empty list covers everything).
3. Any applicable DENY decides DENY; otherwise any applicable PERMIT decides PERMIT; otherwise
   NO_CONSENT, which is a deny with no deciding versions.

When nothing applies, the reason names the first test that the consents naming the actor fail,
in the order above, so a single wrong input gets its own reason.

4. Break-glass: when 1-3 do not permit, the action is READ and the purpose ETREAT, a
   break-glass access of the actor to the patient that is running at `now` (started at or before
   it, not expired, not ended by a review) permits (BREAK_GLASS). It outweighs an explicit deny
   only if it was granted under a policy that says so (BREAK_GLASS_OVERRIDES_DENY, naming the
   overridden deny versions); otherwise the deny stands.

"medledger-consent-rules/1" is rules 1-3; "medledger-consent-rules/2" (current) adds rule 4.
Codes (actions, categories, purposes, provisions, statuses, decisions) are the numbers of
medledger's proto enums, written out here because the verifier imports no protos; a test in
services/consent keeps them equal.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

RULES_V1 = "medledger-consent-rules/1"
RULES_V2 = "medledger-consent-rules/2"
CURRENT_RULE_VERSION = RULES_V2

# medledger.consent.v1 enums, by number.
PROVISION_PERMIT = 1
PROVISION_DENY = 2
STATUS_ACTIVE = 1
STATUS_INACTIVE = 2
DECISION_PERMIT = 1
DECISION_DENY = 2
DECISION_NO_CONSENT = 3
# medledger.types.v1 vocabulary: the two codes rule 4 names.
ACTION_READ = 1
PURPOSE_ETREAT = 2


@dataclass(frozen=True)
class ConsentVersion:
    consent_id: str
    version: int
    patient_id: str
    grantee_id: str
    provision: int
    actions: frozenset[int]
    categories: frozenset[int]
    purposes: frozenset[int]
    period_start: float
    period_end: float | None
    status: int
    recorded_by: str
    recorded_at: float
    commitment: str = ""

    @property
    def ref(self) -> tuple[str, int]:
        return (self.consent_id, self.version)


@dataclass(frozen=True)
class BreakGlassAccess:
    """A practitioner's emergency read access (purpose ETREAT) to one patient's data."""

    access_id: str
    patient_id: str
    practitioner_id: str
    organization_id: str
    reason: int
    justification_sha256: str
    started_at: float
    expires_at: float
    overrides_deny: bool
    review: int
    reviewed_by: str = ""
    reviewed_at: float | None = None
    # Set when an UNJUSTIFIED review ended it before it expired.
    ended_at: float | None = None

    def running(self, now: float) -> bool:
        end = self.expires_at if self.ended_at is None else min(self.expires_at, self.ended_at)
        return self.started_at <= now < end


@dataclass(frozen=True)
class Question:
    """One consent check: who wants to do what with whose data, why, and when."""

    patient_id: str
    actor_id: str
    # The organization the actor belongs to (practitioners); grants to it cover the actor.
    actor_organization_id: str
    action: int
    category: int
    purpose: int
    now: float


@dataclass(frozen=True)
class Outcome:
    decision: int
    reason_code: str
    reason: str
    deciding: tuple[tuple[str, int], ...] = ()
    break_glass_access_id: str = ""


class Names(NamedTuple):
    """How codes read in a reason (codes without a name read as their number)."""

    actions: Mapping[int, str] = {}
    categories: Mapping[int, str] = {}
    purposes: Mapping[int, str] = {}


NO_NAMES = Names()

# The reason for NO_CONSENT when the versions got no further than test N.
REASONS = (
    ("NO_MATCHING_GRANTEE", "no consent of patient {q.patient_id} names {q.actor_id} or their organization"),
    ("REVOKED", "the consents naming the actor are revoked"),
    ("NOT_IN_PERIOD", "no consent naming the actor is in force at this time (expired or not yet begun)"),
    ("ACTION_NOT_COVERED", "no consent naming the actor covers the action {action}"),
    ("CATEGORY_NOT_COVERED", "no consent naming the actor covers {category} data"),
    ("PURPOSE_NOT_COVERED", "no consent naming the actor covers the purpose {purpose}"),
)

# Every (decision, reason code) a version of the rule can give.
DECISION_CODES = (
    *(("NO_CONSENT", code) for code, _ in REASONS),
    ("NO_CONSENT", "NO_CONSENT_FOR_PATIENT"),
    ("DENY", "EXPLICIT_DENY"),
    ("PERMIT", "PERMITTED"),
    ("PERMIT", "BREAK_GLASS"),
    ("PERMIT", "BREAK_GLASS_OVERRIDES_DENY"),
)


def in_force(versions: Sequence[ConsentVersion], now: float) -> ConsentVersion | None:
    """The version of one consent in force at `now`: the latest recorded at or before it."""
    current = None
    for v in versions:
        if v.recorded_at <= now and (current is None or v.version > current.version):
            current = v
    return current


def _first_failed_test(v: ConsentVersion, q: Question) -> int:
    """How far `v`, which names the actor, gets through the tests of an applicable version
    (6: it applies)."""
    if v.status != STATUS_ACTIVE:
        return 1
    if v.period_start > q.now or (v.period_end is not None and q.now >= v.period_end):
        return 2
    if v.actions and q.action not in v.actions:
        return 3
    if v.categories and q.category not in v.categories:
        return 4
    if v.purposes and q.purpose not in v.purposes:
        return 5
    return 6


def decide_among(
    naming_actor: Iterable[ConsentVersion], q: Question, *, patient_has_consents: bool, names: Names = NO_NAMES
) -> Outcome:
    """Rules 2-3 over the versions in force that name the actor (or their organization); the
    consent service's index calls this directly with the versions it looked up by grantee."""
    if not patient_has_consents:
        return Outcome(DECISION_NO_CONSENT, "NO_CONSENT_FOR_PATIENT", f"patient {q.patient_id} has no consents")
    applicable = []
    furthest = 0
    # One pass, one test after another per version: the reason is the first test that every
    # version fails, i.e. where the version that got furthest stopped.
    for v in naming_actor:
        reached = _first_failed_test(v, q)
        if reached == 6:
            applicable.append(v)
        elif reached > furthest:
            furthest = reached
    if not applicable:
        code, reason = REASONS[furthest]
        return Outcome(
            DECISION_NO_CONSENT,
            code,
            reason.format(
                q=q,
                action=names.actions.get(q.action) or str(q.action),
                category=names.categories.get(q.category) or str(q.category),
                purpose=names.purposes.get(q.purpose) or str(q.purpose),
            ),
        )
    denies = sorted(v.ref for v in applicable if v.provision == PROVISION_DENY)
    if denies:
        return Outcome(
            DECISION_DENY,
            "EXPLICIT_DENY",
            "the patient explicitly denied this actor this access; a deny outweighs any permit",
            tuple(denies),
        )
    permits = sorted(v.ref for v in applicable if v.provision == PROVISION_PERMIT)
    return Outcome(DECISION_PERMIT, "PERMITTED", "a consent of the patient permits this access", tuple(permits))


def decide_by_consents(consents: Iterable[Sequence[ConsentVersion]], q: Question, names: Names = NO_NAMES) -> Outcome:
    """Rules 1-3 over all the patient's consents, each a sequence of its versions."""
    current = [v for versions in consents if (v := in_force(versions, q.now)) is not None]
    current = [v for v in current if v.patient_id == q.patient_id]
    actor_ids = {q.actor_id, q.actor_organization_id} - {""}
    return decide_among(
        [v for v in current if v.grantee_id in actor_ids], q, patient_has_consents=bool(current), names=names
    )


def with_break_glass(outcome: Outcome, q: Question, break_glass: Iterable[BreakGlassAccess]) -> Outcome:
    """Rule 4: a running break-glass access of the actor permits an emergency read."""
    if outcome.decision == DECISION_PERMIT or q.action != ACTION_READ or q.purpose != PURPOSE_ETREAT:
        return outcome
    running = sorted(
        (
            a
            for a in break_glass
            if a.practitioner_id == q.actor_id and a.patient_id == q.patient_id and a.running(q.now)
        ),
        key=lambda a: a.access_id,
    )
    if not running:
        return outcome
    if outcome.decision == DECISION_DENY:
        overriding = [a for a in running if a.overrides_deny]
        if not overriding:
            return replace(
                outcome,
                reason=outcome.reason
                + "; the break-glass access does not override a deny under its organization's policy",
            )
        return Outcome(
            DECISION_PERMIT,
            "BREAK_GLASS_OVERRIDES_DENY",
            "emergency access (break-glass), overriding the patient's explicit deny as the organization's policy "
            "allows; a privacy officer reviews it",
            outcome.deciding,
            overriding[0].access_id,
        )
    return Outcome(
        DECISION_PERMIT,
        "BREAK_GLASS",
        "emergency access (break-glass) without the patient's consent; a privacy officer reviews it",
        (),
        running[0].access_id,
    )


def decide_v1(
    consents: Iterable[Sequence[ConsentVersion]],
    q: Question,
    break_glass: Iterable[BreakGlassAccess] = (),
    names: Names = NO_NAMES,
) -> Outcome:
    """medledger-consent-rules/1: rules 1-3; break-glass did not exist."""
    return decide_by_consents(consents, q, names)


def decide_v2(
    consents: Iterable[Sequence[ConsentVersion]],
    q: Question,
    break_glass: Iterable[BreakGlassAccess] = (),
    names: Names = NO_NAMES,
) -> Outcome:
    """medledger-consent-rules/2: rules 1-4."""
    return with_break_glass(decide_by_consents(consents, q, names), q, break_glass)


Rule = Callable[[Iterable[Sequence[ConsentVersion]], Question, Iterable[BreakGlassAccess], Names], Outcome]

# Every published version, runnable: a logged decision names the one it was made under.
RULES: Mapping[str, Rule] = {RULES_V1: decide_v1, RULES_V2: decide_v2}


def decide(
    consents: Iterable[Sequence[ConsentVersion]],
    q: Question,
    break_glass: Iterable[BreakGlassAccess] = (),
    names: Names = NO_NAMES,
    *,
    rule_version: str = CURRENT_RULE_VERSION,
) -> Outcome:
    """The decision for `q` under `rule_version`; KeyError for a version never published."""
    return RULES[rule_version](consents, q, break_glass, names)
