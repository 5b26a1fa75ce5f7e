"""Replaying a logged decision from log entries alone (``decision_replay``): a valid decision,
and each way a record can be wrong, named; the propagation window; side lists; rule /1."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any

import pytest
import rfc8785

from medledger_verifier import consent_rules as rules
from medledger_verifier.decision_replay import ReplayReport, replay
from medledger_verifier.errors import InvalidArgument

T0 = 1_800_000_000.0
SUBJECT = "vault:v1:c3ViamVjdA=="
DOCTOR, ORG, OTHER = "prn_doctor", "org_h", "prn_other"


def at(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def version_entry(
    consent_id: str, version: int, recorded: float, *, grantee: str = DOCTOR, provision: str = "PERMIT", **more: Any
) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "v": 1,
        "type": "consent.version_recorded",
        "subject": SUBJECT,
        "consent_id": consent_id,
        "version": version,
        "grantee_id": grantee,
        "commitment": hashlib.sha256(f"{consent_id}@{version}".encode()).hexdigest(),
        "period_start": at(T0 - 86400),
        "provision": f"PROVISION_TYPE_{provision}",
        "actions": ["ACTION_READ"],
        "categories": ["DATA_CATEGORY_OBSERVATIONS"],
        "purposes": ["PURPOSE_OF_USE_TREAT"],
        "recorded_at": at(recorded),
    }
    entry.update(more)
    return entry


def decision_entry(decided: float, considered: list[dict[str, Any]], **more: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "v": 1,
        "type": "consent.decision",
        "subject": SUBJECT,
        "decision_id": "dec_" + "0" * 32,
        "actor_id": DOCTOR,
        "actor_organization_id": ORG,
        "action": "ACTION_READ",
        "category": "DATA_CATEGORY_OBSERVATIONS",
        "purpose": "PURPOSE_OF_USE_TREAT",
        "decided_at": at(decided),
        "decision": "DECISION_PERMIT",
        "reason_code": "PERMITTED",
        "deciding": ["cns_1@1"],
        "rule_version": rules.RULES_V2,
        "considered": sorted(v["commitment"] for v in considered),
    }
    entry.update(more)
    return entry


GRANT = version_entry("cns_1", 1, T0)
OTHERS = version_entry("cns_2", 1, T0 + 1, grantee=OTHER)


def codes(report: ReplayReport) -> list[str]:
    return [f.code for f in report.failures]


def test_a_decision_that_follows_from_the_log_replays_valid() -> None:
    log = [GRANT, OTHERS]
    report = replay(decision_entry(T0 + 60, log), log)
    assert report.valid, report.failures
    assert report.replayed == "PERMIT (PERMITTED)" == report.logged
    assert (report.considered, report.logged_versions) == (2, 2)


def test_a_considered_version_removed_fails_naming_it() -> None:
    log = [GRANT, OTHERS]
    tampered = decision_entry(T0 + 60, [GRANT])
    report = replay(tampered, log)
    assert codes(report) == ["version-not-considered"]
    assert "cns_2 version 1" in report.failures[0].message


def test_a_deny_left_out_makes_the_permit_wrong_and_both_are_named() -> None:
    deny = version_entry("cns_3", 1, T0 + 2, provision="DENY")
    log = [GRANT, deny]
    # As if the replica had decided without the deny: the permit no longer follows.
    report = replay(decision_entry(T0 + 60, [GRANT]), log)
    assert codes(report) == ["version-not-considered"]
    honest = replay(decision_entry(T0 + 60, log), log)
    assert codes(honest) == ["outcome-differs"]
    assert "DENY (EXPLICIT_DENY)" in honest.failures[0].message and "cns_3@1" in honest.failures[0].message


def test_a_considered_version_the_log_lacks_fails() -> None:
    ghost = version_entry("cns_9", 1, T0)
    report = replay(decision_entry(T0 + 60, [GRANT, ghost]), [GRANT])
    assert codes(report) == ["considered-not-logged"]


def test_a_version_recorded_after_the_decision_cannot_have_been_considered() -> None:
    later = version_entry("cns_2", 1, T0 + 120, grantee=OTHER)
    report = replay(decision_entry(T0 + 60, [GRANT, later]), [GRANT, later])
    assert codes(report) == ["considered-after-decision"]


def test_a_version_recorded_within_the_window_may_be_missing_and_is_reported() -> None:
    revocation = version_entry("cns_1", 2, T0 + 59.5, revoked=True)
    log = [GRANT, revocation]
    # The replica had not heard of the revocation half a second old: its permit stands, noted.
    report = replay(decision_entry(T0 + 60, [GRANT]), log)
    assert report.valid, report.failures
    assert [n.code for n in report.notes] == ["version-within-window"]
    assert "cns_1 version 2" in report.notes[0].message
    # A window narrower than that half second makes it a failure.
    assert codes(replay(decision_entry(T0 + 60, [GRANT]), log, window_seconds=0.25)) == ["version-not-considered"]


def test_a_wrong_outcome_fails() -> None:
    report = replay(decision_entry(T0 + 60, [GRANT], decision="DECISION_DENY", reason_code="EXPLICIT_DENY"), [GRANT])
    assert codes(report) == ["outcome-differs"]
    assert "PERMIT (PERMITTED)" in report.failures[0].message


def test_wrong_deciding_versions_fail() -> None:
    report = replay(decision_entry(T0 + 60, [GRANT], deciding=["cns_2@1"]), [GRANT])
    assert codes(report) == ["outcome-differs"]
    assert "deciding versions cns_1@1, logged cns_2@1" in report.failures[0].message


def test_a_revoked_consent_replays_as_revoked() -> None:
    revocation = version_entry("cns_1", 2, T0 + 10, revoked=True)
    log = [GRANT, revocation]
    entry = decision_entry(T0 + 60, log, decision="DECISION_NO_CONSENT", reason_code="REVOKED", deciding=[])
    entry.pop("deciding")  # an empty list is not set in an entry
    assert replay(entry, log).valid


def break_glass(started: float, overrides: bool = False, **more: Any) -> dict[str, Any]:
    return {
        "type": "break_glass.started",
        "subject": SUBJECT,
        "access_id": "bgl_1",
        "practitioner_id": DOCTOR,
        "organization_id": ORG,
        "started_at": at(started),
        "expires_at": at(started + 3600),
        "overrides_deny": overrides,
        **more,
    }


def emergency(decided: float, considered: list[dict[str, Any]], **more: Any) -> dict[str, Any]:
    return decision_entry(decided, considered, purpose="PURPOSE_OF_USE_ETREAT", **more)


def test_rule_version_1_replays_with_rule_1_and_2_with_break_glass() -> None:
    log: list[dict[str, Any]] = [OTHERS, break_glass(T0 + 10)]
    no_consent = {"decision": "DECISION_NO_CONSENT", "reason_code": "NO_MATCHING_GRANTEE", "deciding": []}
    # Under /1 break-glass did not exist: no consent names the doctor.
    assert replay(emergency(T0 + 60, [OTHERS], rule_version=rules.RULES_V1, **no_consent), log).valid
    # Under /2 the running access permits; the /1 outcome would now be wrong.
    bg = {"reason_code": "BREAK_GLASS", "deciding": [], "break_glass_access_id": "bgl_1"}
    assert replay(emergency(T0 + 60, [OTHERS], **bg), log).valid
    assert codes(replay(emergency(T0 + 60, [OTHERS], **no_consent), log)) == ["outcome-differs"]
    assert codes(replay(emergency(T0 + 60, [OTHERS], rule_version=rules.RULES_V1, **bg), log)) == ["outcome-differs"]


def test_a_review_that_ended_the_access_before_the_decision_counts() -> None:
    ended = {"type": "break_glass.reviewed", "subject": SUBJECT, "access_id": "bgl_1", "ended_at": at(T0 + 30)}
    log: list[dict[str, Any]] = [OTHERS, break_glass(T0 + 10), ended]
    bg = {"reason_code": "BREAK_GLASS", "deciding": [], "break_glass_access_id": "bgl_1"}
    assert codes(replay(emergency(T0 + 60, [OTHERS], **bg), log)) == ["outcome-differs"]


def test_an_unknown_rule_version_fails_by_name() -> None:
    report = replay(decision_entry(T0 + 60, [GRANT], rule_version="medledger-consent-rules/99"), [GRANT])
    assert codes(report) == ["unknown-rule-version"]


def test_entries_of_other_patients_are_not_the_patients() -> None:
    elsewhere = replace_subject(version_entry("cns_5", 1, T0, provision="DENY"), "vault:v1:b3RoZXI=")
    report = replay(decision_entry(T0 + 60, [GRANT]), [GRANT, elsewhere])
    assert report.valid


def replace_subject(entry: dict[str, Any], subject: str) -> dict[str, Any]:
    return {**entry, "subject": subject}


def test_a_considered_list_beside_the_log_is_checked_against_its_digest() -> None:
    log = [version_entry(f"cns_{n}", 1, T0 + n, grantee=OTHER) for n in range(2, 20)] + [GRANT]
    entry = decision_entry(T0 + 60, log)
    listed = entry.pop("considered")
    entry["considered_sha256"] = hashlib.sha256(rfc8785.dumps(listed)).hexdigest()
    entry["considered_count"] = len(listed)
    assert replay(entry, log, side_lists={entry["considered_sha256"]: listed}).valid
    assert codes(replay(entry, log)) == ["considered-not-given"]
    with pytest.raises(InvalidArgument, match="digest"):
        replay(entry, log, side_lists={entry["considered_sha256"]: listed[1:]})


def test_the_decisions_millisecond_cannot_order_a_time_inside_it() -> None:
    # A grant whose period began in the very millisecond of the decision, after it: the service
    # said no; at millisecond precision the period seems to have begun.
    decided = T0 + 60.0004
    grant = version_entry("cns_1", 1, T0, period_start=at(T0 + 60.0007))
    entry = decision_entry(decided, [grant], decision="DECISION_NO_CONSENT", reason_code="NOT_IN_PERIOD", deciding=[])
    entry.pop("deciding")
    entry["decided_at"] = at(T0 + 60.0004)
    report = replay(entry, [grant])
    assert report.valid
    assert [n.code for n in report.notes] == ["millisecond-tie"]


def test_what_is_not_a_decision_entry_is_bad_input() -> None:
    with pytest.raises(InvalidArgument, match="not a consent"):
        replay(GRANT, [GRANT])
    with pytest.raises(InvalidArgument, match="decided_at"):
        replay(decision_entry(T0, [GRANT], decided_at="yesterday"), [GRANT])
    with pytest.raises(InvalidArgument, match="deciding"):
        replay(decision_entry(T0 + 60, [GRANT], deciding=["cns_1"]), [GRANT])
