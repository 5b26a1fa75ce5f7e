"""Replaying a logged consent decision from the transparency log alone.

Given a `consent.decision` entry (the parsed JSON the audit log holds) and the log's entries about
the same patient (`consent.version_recorded`, `break_glass.started`, `break_glass.reviewed`),
``replay`` checks three things and names every failure:

(a) every version the decision says it considered is a logged version of the patient recorded at
    or before `decided_at`;
(b) every logged version of the patient recorded at or before `decided_at` minus the propagation
    window is among those considered. Versions and decisions travel on different topics
    (`medledger.consent.v1`, `medledger.consent.decisions.v1`) and a replica learns of a version
    recorded on another one from its event, so the log's order says nothing about what the
    deciding replica held: the match is by the times the entries carry (`recorded_at`,
    `decided_at`), not by log index. A version recorded within the window before the decision
    may fairly be missing; it is reported, not failed. The default window, 3 s, is consent's
    bound on what its index may lack: events arrive within a second (p99), and the index's
    repair pass reads the database every 2 s should one be lost.
(c) the rule of the entry's `rule_version` (``consent_rules``), run over the considered versions
    and the patient's logged break-glass accesses at `decided_at`, gives the logged decision,
    reason code, deciding versions and break-glass access.

Times in entries are RFC 3339 with milliseconds, truncated; the rule compares full-precision
times. Truncation keeps `<=` between two times (a version recorded before a decision is never
logged after it), but two times in the same millisecond compare equal whatever their order. When
the logged outcome follows only with `now` at one edge of the decision's millisecond and a time
the rule compared falls in that millisecond, the replay says so and does not fail.

Entries held a list of more than 16 ids as `<name>_sha256` and `<name>_count`; the list itself
(for `considered`, the one GetDecision returns) is given in `side_lists` by its SHA-256 and
checked against it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import rfc8785

from medledger_verifier import consent_rules as rules
from medledger_verifier.errors import InvalidArgument

DEFAULT_WINDOW_SECONDS = 3.0
# Just before, and at the far end of, the decision's millisecond: entries truncate times to it, so
# a time in the same millisecond may have been either side of `now`.
_MILLISECOND_EDGES = (-0.000001, 0.000999)

_DECISIONS = {
    "DECISION_PERMIT": rules.DECISION_PERMIT,
    "DECISION_DENY": rules.DECISION_DENY,
    "DECISION_NO_CONSENT": rules.DECISION_NO_CONSENT,
}
_DECISION_NAMES = {v: k for k, v in _DECISIONS.items()}
_PROVISIONS = {"PROVISION_TYPE_PERMIT": rules.PROVISION_PERMIT, "PROVISION_TYPE_DENY": rules.PROVISION_DENY}


@dataclass(frozen=True)
class Finding:
    code: str
    message: str


@dataclass(frozen=True)
class ReplayReport:
    decision_id: str
    rule_version: str
    decided_at: str
    logged: str
    # The failures: empty when the logged outcome follows from the log.
    failures: tuple[Finding, ...] = ()
    # What a reader should know but does not make the decision wrong.
    notes: tuple[Finding, ...] = ()
    replayed: str = ""
    considered: int = 0
    logged_versions: int = 0

    @property
    def valid(self) -> bool:
        return not self.failures


@dataclass
class _Codes:
    """Names of vocabulary codes as entries hold them, as numbers the rule compares: the two the
    rule itself names keep their proto numbers, every other name its own negative number."""

    numbers: dict[str, int] = field(
        default_factory=lambda: {"ACTION_READ": rules.ACTION_READ, "PURPOSE_OF_USE_ETREAT": rules.PURPOSE_ETREAT}
    )

    def __call__(self, name: object) -> int:
        text = str(name)
        number = self.numbers.get(text)
        if number is None:
            number = self.numbers[text] = -1 - len(self.numbers)
        return number


def time_of(value: object, what: str) -> float:
    """Seconds since the epoch of an entry's RFC 3339 time."""
    if not isinstance(value, str):
        raise InvalidArgument.field(what, "an RFC 3339 time is required")
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        raise InvalidArgument.field(what, f"not an RFC 3339 time: {value[:40]!r}") from None


def listed(entry: Mapping[str, Any], name: str, side_lists: Mapping[str, Sequence[str]]) -> list[str] | None:
    """An entry's list `name`, from the entry or, held beside the log, from `side_lists`
    (checked against the entry's digest and count); None when it is beside the log and not given."""
    if name in entry:
        values = entry[name]
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise InvalidArgument.field(name, "a list of strings is required")
        return values
    digest = entry.get(f"{name}_sha256")
    if digest is None:
        return []  # an empty list is not set, so not in the entry
    side = side_lists.get(str(digest))
    if side is None:
        return None
    values = [str(v) for v in side]
    if hashlib.sha256(rfc8785.dumps(values)).hexdigest() != digest or len(values) != entry.get(f"{name}_count"):
        raise InvalidArgument.field(name, "the list given does not match the entry's digest and count")
    return values


def replay(
    decision: Mapping[str, Any],
    patient_entries: Iterable[Mapping[str, Any]],
    *,
    side_lists: Mapping[str, Sequence[str]] | None = None,
    window_seconds: float = DEFAULT_WINDOW_SECONDS,
) -> ReplayReport:
    """Whether the logged `decision` follows from the log (module docstring). Raises
    InvalidArgument when `decision` is not a decision entry or is malformed."""
    if decision.get("type") != "consent.decision":
        raise InvalidArgument.field("decision", "not a consent.decision entry")
    if window_seconds < 0:
        raise InvalidArgument.field("window_seconds", "must not be negative")
    sides = side_lists or {}
    decision_id = str(decision.get("decision_id", ""))
    rule_version = str(decision.get("rule_version", ""))
    subject = decision.get("subject")
    decided_at_text = str(decision.get("decided_at"))
    decided_at = time_of(decision.get("decided_at"), "decided_at")
    logged_decision = _DECISIONS.get(str(decision.get("decision")))
    if logged_decision is None:
        raise InvalidArgument.field("decision", f"unknown decision {str(decision.get('decision'))[:40]!r}")
    logged = _describe(str(decision.get("decision")), str(decision.get("reason_code", "")))
    report = ReplayReport(decision_id, rule_version, decided_at_text, logged)
    if not subject:
        return _failed(report, Finding("no-subject", "the decision entry names no patient subject (erased?)"))

    failures: list[Finding] = []
    notes: list[Finding] = []
    considered = listed(decision, "considered", sides)
    deciding_refs = listed(decision, "deciding", sides)
    if considered is None:
        return _failed(
            report,
            Finding("considered-not-given", "the considered versions are kept beside the log and were not given"),
        )
    if deciding_refs is None:
        return _failed(
            report, Finding("deciding-not-given", "the deciding versions are kept beside the log and were not given")
        )

    codes = _Codes()
    versions, accesses = _patient_log(patient_entries, subject, codes)
    by_commitment = {v.commitment: v for v in versions}
    report = ReplayReport(
        decision_id, rule_version, decided_at_text, logged, considered=len(considered), logged_versions=len(versions)
    )

    # (a) what was considered is logged, for this patient, and no later than the decision.
    given: list[rules.ConsentVersion] = []
    for commitment in sorted(set(considered)):
        v = by_commitment.get(commitment)
        if v is None:
            failures.append(
                Finding(
                    "considered-not-logged",
                    f"version {commitment[:16]}… was considered but the log holds no such version of the patient",
                )
            )
        elif v.recorded_at > decided_at:
            failures.append(
                Finding(
                    "considered-after-decision",
                    f"{v.consent_id} version {v.version} was considered but recorded after the decision",
                )
            )
        else:
            given.append(v)
    if len(set(considered)) != len(considered):
        failures.append(Finding("considered-duplicated", "a version is listed twice among those considered"))

    # (b) what was logged before the decision, by more than the window, was considered.
    wanted = set(considered)
    for v in sorted(versions, key=lambda v: (v.recorded_at, v.consent_id, v.version)):
        if v.commitment in wanted or v.recorded_at > decided_at:
            continue
        ago = decided_at - v.recorded_at
        if ago > window_seconds:
            failures.append(
                Finding(
                    "version-not-considered",
                    f"{v.consent_id} version {v.version}, recorded {ago:.3f} s before the decision, was not considered",
                )
            )
        else:
            notes.append(
                Finding(
                    "version-within-window",
                    f"{v.consent_id} version {v.version}, recorded {ago:.3f} s before the decision (within the "
                    f"{window_seconds:g} s window), was not considered: the deciding replica need not have had it",
                )
            )

    # (c) the rule of that version, re-run, gives what was logged.
    rule = rules.RULES.get(rule_version)
    if rule is None:
        failures.append(Finding("unknown-rule-version", f"no published rule is called {rule_version[:60]!r}"))
        return _done(report, failures, notes, "")
    by_consent: dict[str, list[rules.ConsentVersion]] = {}
    for v in given:
        by_consent.setdefault(v.consent_id, []).append(v)
    question = rules.Question(
        patient_id=str(subject),
        actor_id=str(decision.get("actor_id", "")),
        actor_organization_id=str(decision.get("actor_organization_id", "")),
        action=codes(decision.get("action", "")),
        category=codes(decision.get("category", "")),
        purpose=codes(decision.get("purpose", "")),
        now=decided_at,
    )
    expected = (
        logged_decision,
        str(decision.get("reason_code", "")),
        tuple(_ref(r) for r in deciding_refs),
        str(decision.get("break_glass_access_id", "")),
    )
    consents = list(by_consent.values())
    outcome = rule(consents, question, accesses, rules.NO_NAMES)
    if _key(outcome) != expected:
        # Break-glass accesses started within the window may not have reached the deciding
        # replica either; and the decision's millisecond may hide an order.
        settled = [a for a in accesses if decided_at - a.started_at > window_seconds]
        late = rule(consents, question, settled, rules.NO_NAMES)
        edges = [rule(consents, _at(question, decided_at + d), accesses, rules.NO_NAMES) for d in _MILLISECOND_EDGES]
        tied = [o for o in edges if _key(o) == expected]
        if len(settled) < len(accesses) and _key(late) == expected:
            notes.append(
                Finding(
                    "break-glass-within-window",
                    "the logged outcome follows without a break-glass access started within the window",
                )
            )
            outcome = late
        elif tied and _ties(decided_at_text, given, accesses):
            notes.append(
                Finding(
                    "millisecond-tie",
                    "the logged outcome follows only with a time in the decision's own millisecond ordered the "
                    "other way; the log's precision cannot order the two",
                )
            )
            outcome = tied[0]
        else:
            failures.append(
                Finding(
                    "outcome-differs",
                    f"the rule {rule_version} gives {_describe_outcome(outcome)}; the log says {logged}"
                    + _deciding_difference(outcome, expected),
                )
            )
    return _done(report, failures, notes, _describe_outcome(outcome))


def _patient_log(
    entries: Iterable[Mapping[str, Any]], subject: object, codes: _Codes
) -> tuple[list[rules.ConsentVersion], list[rules.BreakGlassAccess]]:
    versions: list[rules.ConsentVersion] = []
    started: dict[str, Mapping[str, Any]] = {}
    ended: dict[str, float] = {}
    for e in entries:
        if e.get("subject") != subject:
            continue
        kind = e.get("type")
        if kind == "consent.version_recorded":
            versions.append(_version(e, str(subject), codes))
        elif kind == "break_glass.started":
            started[str(e.get("access_id"))] = e
        elif kind == "break_glass.reviewed" and "ended_at" in e:
            ended[str(e.get("access_id"))] = time_of(e["ended_at"], "ended_at")
    accesses = [
        rules.BreakGlassAccess(
            access_id=access_id,
            patient_id=str(subject),
            practitioner_id=str(e.get("practitioner_id", "")),
            organization_id=str(e.get("organization_id", "")),
            reason=0,
            justification_sha256=str(e.get("justification_sha256", "")),
            started_at=time_of(e.get("started_at"), "started_at"),
            expires_at=time_of(e.get("expires_at"), "expires_at"),
            overrides_deny=bool(e.get("overrides_deny", False)),
            review=0,
            ended_at=ended.get(access_id),
        )
        for access_id, e in started.items()
    ]
    return versions, accesses


def _version(e: Mapping[str, Any], patient: str, codes: _Codes) -> rules.ConsentVersion:
    provision = _PROVISIONS.get(str(e.get("provision")), 0)
    lists = {}
    for name in ("actions", "categories", "purposes"):
        values = e.get(name, [])
        if not isinstance(values, list):
            raise InvalidArgument.field(name, "a list is required in a consent.version_recorded entry")
        lists[name] = frozenset(codes(x) for x in values)
    return rules.ConsentVersion(
        consent_id=str(e.get("consent_id", "")),
        version=int(e.get("version", 0)),
        patient_id=patient,
        grantee_id=str(e.get("grantee_id", "")),
        provision=provision,
        actions=lists["actions"],
        categories=lists["categories"],
        purposes=lists["purposes"],
        period_start=time_of(e["period_start"], "period_start") if "period_start" in e else 0.0,
        period_end=time_of(e["period_end"], "period_end") if "period_end" in e else None,
        status=rules.STATUS_INACTIVE if e.get("revoked") else rules.STATUS_ACTIVE,
        recorded_by="",
        recorded_at=time_of(e.get("recorded_at"), "recorded_at"),
        commitment=str(e.get("commitment", "")),
    )


def _ref(text: str) -> tuple[str, int]:
    consent_id, _, version = text.rpartition("@")
    if not consent_id or not version.isdigit():
        raise InvalidArgument.field("deciding", f"not a consent@version: {text[:60]!r}")
    return consent_id, int(version)


def _key(o: rules.Outcome) -> tuple[int, str, tuple[tuple[str, int], ...], str]:
    return (o.decision, o.reason_code, o.deciding, o.break_glass_access_id)


def _at(q: rules.Question, now: float) -> rules.Question:
    return rules.Question(q.patient_id, q.actor_id, q.actor_organization_id, q.action, q.category, q.purpose, now)


def _ties(
    decided_at: str, versions: Sequence[rules.ConsentVersion], accesses: Sequence[rules.BreakGlassAccess]
) -> bool:
    """Whether a time the rule compares with `now` falls in the decision's millisecond."""
    ms = time_of(decided_at, "decided_at")
    times: list[float | None] = [t for v in versions for t in (v.recorded_at, v.period_start, v.period_end)]
    times += [t for a in accesses for t in (a.started_at, a.expires_at, a.ended_at)]
    return any(t is not None and abs(t - ms) < 0.0005 for t in times)


def _describe(decision: str, reason_code: str) -> str:
    return f"{decision.removeprefix('DECISION_')} ({reason_code})"


def _describe_outcome(o: rules.Outcome) -> str:
    return _describe(_DECISION_NAMES.get(o.decision, str(o.decision)), o.reason_code)


def _deciding_difference(o: rules.Outcome, expected: tuple[int, str, tuple[tuple[str, int], ...], str]) -> str:
    parts = []
    if o.deciding != expected[2]:
        got = ", ".join(f"{c}@{v}" for c, v in o.deciding) or "none"
        logged = ", ".join(f"{c}@{v}" for c, v in expected[2]) or "none"
        parts.append(f"deciding versions {got}, logged {logged}")
    if o.break_glass_access_id != expected[3]:
        parts.append(f"break-glass access {o.break_glass_access_id or 'none'}, logged {expected[3] or 'none'}")
    return "; " + "; ".join(parts) if parts else ""


def _failed(report: ReplayReport, finding: Finding) -> ReplayReport:
    return _done(report, [finding], [], "")


def _done(report: ReplayReport, failures: list[Finding], notes: list[Finding], replayed: str) -> ReplayReport:
    return ReplayReport(
        report.decision_id,
        report.rule_version,
        report.decided_at,
        report.logged,
        tuple(failures),
        tuple(notes),
        replayed,
        report.considered,
        report.logged_versions,
    )
