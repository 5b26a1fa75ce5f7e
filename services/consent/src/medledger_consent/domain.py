"""Consent's domain, free of I/O: the decision rule's inputs and outcome, grant validation and
the index the rule reads. (The FHIR form and the commitment are in ``fhir``; break-glass's
policy rules in ``break_glass_rules``.)

The decision rule itself (RULE_VERSION, its text and every published version) lives in
``medledger_verifier.consent_rules``, so that anyone replaying a logged decision runs the very
rule the service ran; this module names its inputs in the service's vocabulary and keeps the
index it decides on.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence

from medledger.consent.v1 import consent_service_pb2 as pb
from medledger.types.v1 import vocabulary_pb2

from medledger_runtime.auth import Caller
from medledger_runtime.errors import FieldViolation, InvalidArgument
from medledger_runtime.keys import patient_key_name
from medledger_verifier import consent_rules
from medledger_verifier.consent_rules import (
    DECISION_CODES,
    BreakGlassAccess,
    ConsentVersion,
    Outcome,
    Question,
    in_force,
)

# The current rule's steps, which the index runs on the versions it looked up by grantee.
from medledger_verifier.consent_rules import decide_among as _decide_among
from medledger_verifier.consent_rules import with_break_glass as _with_break_glass

__all__ = ["DECISION_CODES", "BreakGlassAccess", "ConsentVersion", "Outcome", "Question", "in_force"]

RULE_VERSION = consent_rules.CURRENT_RULE_VERSION
SALT_BYTES = 32

PERMIT = pb.ProvisionType.PROVISION_TYPE_PERMIT
DENY = pb.ProvisionType.PROVISION_TYPE_DENY
ACTIVE = pb.ConsentStatus.CONSENT_STATUS_ACTIVE
INACTIVE = pb.ConsentStatus.CONSENT_STATUS_INACTIVE

_ACTIONS = {v.number: v.name for v in vocabulary_pb2.Action.DESCRIPTOR.values if v.number}
_CATEGORIES = {v.number: v.name for v in vocabulary_pb2.DataCategory.DESCRIPTOR.values if v.number}
_PURPOSES = {v.number: v.name for v in vocabulary_pb2.PurposeOfUse.DESCRIPTOR.values if v.number}


def _name(values: Mapping[int, str], number: int) -> str:
    return values.get(number, str(number)).split("_", 1)[-1].replace("_", " ").lower()


# How codes read in a reason ("the action read"), built once: the hot path only looks them up.
NAMES = consent_rules.Names(
    actions={n: _name(_ACTIONS, n) for n in _ACTIONS},
    categories={n: _name(_CATEGORIES, n) for n in _CATEGORIES},
    purposes={n: _name(_PURPOSES, n) for n in _PURPOSES},
)


def decide(
    consents: Iterable[Sequence[ConsentVersion]], q: Question, break_glass: Iterable[BreakGlassAccess] = ()
) -> Outcome:
    """The decision for `q` under the current rule, given the patient's consents (each a
    sequence of its versions) and break-glass accesses."""
    return consent_rules.decide_v2(consents, q, break_glass, NAMES)


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
            outcome = _decide_among((), q, patient_has_consents=False, names=NAMES)
        else:
            naming_actor = []
            org = q.actor_organization_id
            for grantee in (q.actor_id,) if org in ("", q.actor_id) else (q.actor_id, org):
                for versions in patient.by_grantee.get(grantee, ()):
                    if (v := in_force(versions, q.now)) is not None:
                        naming_actor.append(v)
            outcome = _decide_among(naming_actor, q, patient_has_consents=True, names=NAMES)
        return _with_break_glass(outcome, q, break_glass.values() if break_glass else ())


class _PatientConsents:
    """One patient's consents: each a list of its versions, by consent id and by grantee."""

    __slots__ = ("by_consent", "by_grantee", "first_recorded_at")

    def __init__(self) -> None:
        self.by_consent: dict[str, list[ConsentVersion]] = {}
        self.by_grantee: dict[str, list[list[ConsentVersion]]] = {}
        # A consent exists from its first version's recording on (rule 1).
        self.first_recorded_at = float("inf")
