"""Consent's domain, free of I/O: consent versions, the decision rule, grant validation and
the index the rule reads. (The FHIR form and the commitment are in ``fhir``; break-glass's
policy rules in ``break_glass_rules``.) A little over 400 lines because the rule, its reasons
and the index it runs on are read together: splitting them would scatter one algorithm.

The decision rule (RULE_VERSION) is a pure function of the patient's consent versions, the
actor (and their organization), the action, the data category, the purpose and `now`:

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
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from medledger.consent.v1 import consent_service_pb2 as pb
from medledger.types.v1 import vocabulary_pb2

from medledger_runtime.auth import Caller
from medledger_runtime.errors import FieldViolation, InvalidArgument
from medledger_runtime.keys import patient_key_name

RULE_VERSION = "medledger-consent-rules/2"
SALT_BYTES = 32

PERMIT = pb.ProvisionType.PROVISION_TYPE_PERMIT
DENY = pb.ProvisionType.PROVISION_TYPE_DENY
ACTIVE = pb.ConsentStatus.CONSENT_STATUS_ACTIVE
INACTIVE = pb.ConsentStatus.CONSENT_STATUS_INACTIVE

# Module constants: a protobuf enum's attribute lookup costs microseconds, on the hot path.
_PERMITTED = pb.Decision.DECISION_PERMIT
_DENIED = pb.Decision.DECISION_DENY
_NO_CONSENT = pb.Decision.DECISION_NO_CONSENT
_READ = vocabulary_pb2.Action.ACTION_READ
_ETREAT = vocabulary_pb2.PurposeOfUse.PURPOSE_OF_USE_ETREAT
_ACTIONS = {v.number: v.name for v in vocabulary_pb2.Action.DESCRIPTOR.values if v.number}
_CATEGORIES = {v.number: v.name for v in vocabulary_pb2.DataCategory.DESCRIPTOR.values if v.number}
_PURPOSES = {v.number: v.name for v in vocabulary_pb2.PurposeOfUse.DESCRIPTOR.values if v.number}


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


def in_force(versions: Sequence[ConsentVersion], now: float) -> ConsentVersion | None:
    """The version of one consent in force at `now`: the latest recorded at or before it."""
    current = None
    for v in versions:
        if v.recorded_at <= now and (current is None or v.version > current.version):
            current = v
    return current


def _name(values: Mapping[int, str], number: int) -> str:
    return values.get(number, str(number)).split("_", 1)[-1].replace("_", " ").lower()


def _first_failed_test(v: ConsentVersion, q: Question) -> int:
    """How far `v`, which names the actor, gets through the tests of an applicable version
    (6: it applies)."""
    if v.status != ACTIVE:
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


def decide(
    consents: Iterable[Sequence[ConsentVersion]], q: Question, break_glass: Iterable[BreakGlassAccess] = ()
) -> Outcome:
    """The decision for `q` given the patient's consents (each a sequence of its versions) and
    break-glass accesses."""
    return _with_break_glass(_decide_by_consents(consents, q), q, break_glass)


def _with_break_glass(outcome: Outcome, q: Question, break_glass: Iterable[BreakGlassAccess]) -> Outcome:
    """Rule 4: a running break-glass access of the actor permits an emergency read."""
    if outcome.decision == _PERMITTED or q.action != _READ or q.purpose != _ETREAT:
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
    if outcome.decision == _DENIED:
        overriding = [a for a in running if a.overrides_deny]
        if not overriding:
            return replace(
                outcome,
                reason=outcome.reason
                + "; the break-glass access does not override a deny under its organization's policy",
            )
        return Outcome(
            _PERMITTED,
            "BREAK_GLASS_OVERRIDES_DENY",
            "emergency access (break-glass), overriding the patient's explicit deny as the organization's policy "
            "allows; a privacy officer reviews it",
            outcome.deciding,
            overriding[0].access_id,
        )
    return Outcome(
        _PERMITTED,
        "BREAK_GLASS",
        "emergency access (break-glass) without the patient's consent; a privacy officer reviews it",
        (),
        running[0].access_id,
    )


def _decide_by_consents(consents: Iterable[Sequence[ConsentVersion]], q: Question) -> Outcome:
    current = [v for versions in consents if (v := in_force(versions, q.now)) is not None]
    current = [v for v in current if v.patient_id == q.patient_id]
    actor_ids = {q.actor_id, q.actor_organization_id} - {""}
    return _decide_among([v for v in current if v.grantee_id in actor_ids], q, patient_has_consents=bool(current))


def _decide_among(naming_actor: Sequence[ConsentVersion], q: Question, *, patient_has_consents: bool) -> Outcome:
    """Rules 2-3 over the versions in force that name the actor (or their organization)."""
    if not patient_has_consents:
        return Outcome(_NO_CONSENT, "NO_CONSENT_FOR_PATIENT", f"patient {q.patient_id} has no consents")
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
        code, reason = _REASONS[furthest]
        return Outcome(_NO_CONSENT, code, reason.format(q=q, **_names_of(q)))
    denies = sorted(v.ref for v in applicable if v.provision == DENY)
    if denies:
        return Outcome(
            _DENIED,
            "EXPLICIT_DENY",
            "the patient explicitly denied this actor this access; a deny outweighs any permit",
            tuple(denies),
        )
    permits = sorted(v.ref for v in applicable if v.provision == PERMIT)
    return Outcome(_PERMITTED, "PERMITTED", "a consent of the patient permits this access", tuple(permits))


# The reason for NO_CONSENT when the versions got no further than test N.
_REASONS = [
    ("NO_MATCHING_GRANTEE", "no consent of patient {q.patient_id} names {q.actor_id} or their organization"),
    ("REVOKED", "the consents naming the actor are revoked"),
    ("NOT_IN_PERIOD", "no consent naming the actor is in force at this time (expired or not yet begun)"),
    ("ACTION_NOT_COVERED", "no consent naming the actor covers the action {action}"),
    ("CATEGORY_NOT_COVERED", "no consent naming the actor covers {category} data"),
    ("PURPOSE_NOT_COVERED", "no consent naming the actor covers the purpose {purpose}"),
]


def _names_of(q: Question) -> dict[str, str]:
    return {
        "action": _ACTION_NAMES.get(q.action) or _name(_ACTIONS, q.action),
        "category": _CATEGORY_NAMES.get(q.category) or _name(_CATEGORIES, q.category),
        "purpose": _PURPOSE_NAMES.get(q.purpose) or _name(_PURPOSES, q.purpose),
    }


_ACTION_NAMES = {n: _name(_ACTIONS, n) for n in _ACTIONS}
_CATEGORY_NAMES = {n: _name(_CATEGORIES, n) for n in _CATEGORIES}
_PURPOSE_NAMES = {n: _name(_PURPOSES, n) for n in _PURPOSES}


# -- grants ---------------------------------------------------------------------------------------


def may_manage(caller: Caller, patient_id: str) -> bool:
    """The patient, or an admin acting for them (guardians: see consents.acts_for)."""
    return caller.principal_id == patient_id or caller.has_role("admin")


def check_codes(field: str, values: Iterable[int], known: Mapping[int, str]) -> frozenset[int]:
    out = frozenset(values)
    for value in out:
        if value not in known:
            raise InvalidArgument.field(field, f"unknown code {value}; one of {', '.join(known.values())}")
    return out


def check_grant(
    patient_id: str,
    grantee_id: str,
    provision: int,
    actions: Iterable[int],
    categories: Iterable[int],
    purposes: Iterable[int],
    period_start: float | None,
    period_end: float | None,
    now: float,
) -> tuple[float, float | None]:
    """Field checks of a grant that need no lookups; returns its period (start, end), starting
    `now` when no start is given."""
    if not patient_id:
        raise InvalidArgument.field("patient_id", "required")
    if not grantee_id:
        raise InvalidArgument.field("grantee_id", "required")
    if grantee_id == patient_id:
        raise InvalidArgument.field("grantee_id", "a patient needs no consent for their own data")
    if provision not in (PERMIT, DENY):
        raise InvalidArgument.field("provision", "PERMIT or DENY")
    check_codes("actions", actions, _ACTIONS)
    check_codes("categories", categories, _CATEGORIES)
    check_codes("purposes", purposes, _PURPOSES)
    start = now if period_start is None else period_start
    end = period_end
    if end is not None and end <= start:
        raise InvalidArgument.field("period_end", "must be after period_start")
    return start, end


def check_question(patient_id: str, actor_id: str, action: int, category: int, purpose: int) -> None:
    violations = []
    if not patient_id:
        violations.append(FieldViolation("patient_id", "required"))
    if not actor_id:
        violations.append(FieldViolation("actor_id", "required"))
    for field, value, known in (
        ("action", action, _ACTIONS),
        ("category", category, _CATEGORIES),
        ("purpose", purpose, _PURPOSES),
    ):
        if value not in known:
            violations.append(FieldViolation(field, "required: one of " + ", ".join(known.values())))
    if violations:
        raise InvalidArgument("invalid consent check", violations=tuple(violations))


def justification_key_name(patient_id: str) -> str:
    """The key-manager key break-glass justifications of a patient are encrypted under (consent's
    own; its erasure handler destroys it)."""
    return patient_key_name("consent", patient_id)


def new_consent_id() -> str:
    return f"cns_{uuid.uuid4().hex}"


def new_decision_id() -> str:
    return f"dec_{uuid.uuid4().hex}"


DECISION_ID = re.compile(r"dec_[0-9a-f]{32}")


def new_salt() -> bytes:
    return os.urandom(SALT_BYTES)


class ConsentIndex:
    """Every consent version, by patient and consent, in memory: what checks decide on.

    Each replica keeps its own, loaded before it serves and kept current from consent events
    (and at once from its own writes). Adding a version twice is harmless.
    """

    def __init__(self) -> None:
        self._by_patient: dict[str, _PatientConsents] = {}
        # Break-glass accesses by patient and access id; a review replaces one.
        self._break_glass: dict[str, dict[str, BreakGlassAccess]] = {}
        self.size = 0

    def add(self, v: ConsentVersion) -> bool:
        patient = self._by_patient.get(v.patient_id)
        if patient is None:
            patient = self._by_patient[v.patient_id] = _PatientConsents()
        versions = patient.by_consent.get(v.consent_id)
        if versions is None:
            versions = patient.by_consent[v.consent_id] = []
            patient.by_grantee.setdefault(v.grantee_id, []).append(versions)
        if any(x.version == v.version for x in versions):
            return False
        versions.append(v)
        versions.sort(key=lambda x: x.version)
        patient.first_recorded_at = min(patient.first_recorded_at, v.recorded_at)
        self.size += 1
        return True

    def considered(self, patient_id: str, now: float) -> list[str]:
        """The commitments of the patient's versions recorded at or before `now`, sorted: what
        `decide` is given for a question about the patient at `now`, which a decision records."""
        patient = self._by_patient.get(patient_id)
        if patient is None:
            return []
        return sorted(
            v.commitment for versions in patient.by_consent.values() for v in versions if v.recorded_at <= now
        )

    def of_patient(self, patient_id: str) -> list[list[ConsentVersion]]:
        patient = self._by_patient.get(patient_id)
        return list(patient.by_consent.values()) if patient else []

    def put_break_glass(self, a: BreakGlassAccess) -> bool:
        """Add or update an access; False when the index already had it as it is."""
        accesses = self._break_glass.setdefault(a.patient_id, {})
        if accesses.get(a.access_id) == a:
            return False
        accesses[a.access_id] = a
        return True

    def decide(self, q: Question) -> Outcome:
        """What `decide` gives over all the patient's consents (a test holds them equal), looking
        only at the consents that name the actor or their organization."""
        patient = self._by_patient.get(q.patient_id)
        break_glass = self._break_glass.get(q.patient_id)
        if patient is None or patient.first_recorded_at > q.now:
            outcome = _decide_among((), q, patient_has_consents=False)
        else:
            naming_actor = []
            org = q.actor_organization_id
            for grantee in (q.actor_id,) if org in ("", q.actor_id) else (q.actor_id, org):
                for versions in patient.by_grantee.get(grantee, ()):
                    if (v := in_force(versions, q.now)) is not None:
                        naming_actor.append(v)
            outcome = _decide_among(naming_actor, q, patient_has_consents=True)
        return _with_break_glass(outcome, q, break_glass.values() if break_glass else ())


class _PatientConsents:
    """One patient's consents: each a list of its versions, by consent id and by grantee."""

    __slots__ = ("by_consent", "by_grantee", "first_recorded_at")

    def __init__(self) -> None:
        self.by_consent: dict[str, list[ConsentVersion]] = {}
        self.by_grantee: dict[str, list[list[ConsentVersion]]] = {}
        # A consent exists from its first version's recording on (rule 1).
        self.first_recorded_at = float("inf")


# Every (decision, reason code) `decide` can give, for metrics created at zero.
DECISION_CODES = (
    *(("NO_CONSENT", code) for code, _ in _REASONS),
    ("NO_CONSENT", "NO_CONSENT_FOR_PATIENT"),
    ("DENY", "EXPLICIT_DENY"),
    ("PERMIT", "PERMITTED"),
    ("PERMIT", "BREAK_GLASS"),
    ("PERMIT", "BREAK_GLASS_OVERRIDES_DENY"),
)
