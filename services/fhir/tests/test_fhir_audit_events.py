"""AuditEvent search parameters as audit's export request: FHIR date ranges at their precision,
the patient, the page size and cursor; action and subtype filters."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from multidict import MultiDict

from medledger_fhir.audit_events import Range, date_range, export_request, matches, period_of
from medledger_fhir.outcomes import FhirError


def ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def test_a_date_covers_its_precision() -> None:
    assert period_of("2026") == (ts("2026-01-01"), ts("2027-01-01"))
    assert period_of("2026-02") == (ts("2026-02-01"), ts("2026-03-01"))
    assert period_of("2026-12-07") == (ts("2026-12-07"), ts("2026-12-08"))
    assert period_of("2026-12-07T10:30Z") == (ts("2026-12-07T10:30"), ts("2026-12-07T10:31"))
    assert period_of("2026-12-07T10:30:05+02:00") == (ts("2026-12-07T08:30:05"), ts("2026-12-07T08:30:06"))
    start, end = period_of("2026-12-07T10:30:05.25Z")
    assert start == ts("2026-12-07T10:30:05.25") and end == pytest.approx(start + 0.01)
    for bad in ("2026-13-01", "2026-12-07T10:30", "yesterday", "2026-12-07T10:30:05Zjunk"):
        with pytest.raises(FhirError):
            period_of(bad)


def test_prefixes_narrow_the_range() -> None:
    day, next_day = ts("2026-12-07"), ts("2026-12-08")
    assert date_range(["ge2026-12-07"]) == Range(day, None)
    assert date_range(["2026-12-07"]) == Range(day, next_day)
    assert (date_range(["gt2026-12-07"]).start, date_range(["le2026-12-07"]).end) == (next_day, next_day)
    assert date_range(["lt2026-12-07"]).end == day
    both = date_range(["ge2026-12-01", "lt2026-12-07", "le2026-12-31"])
    assert (both.start, both.end) == (ts("2026-12-01"), day)
    with pytest.raises(FhirError):
        date_range(["sa2026-12-07"])


def test_a_search_is_an_export_request() -> None:
    patient = "pat_" + "a" * 32
    query = MultiDict(
        [
            ("patient", "Patient/pat-" + "a" * 32),
            ("date", "ge2026-12-01"),
            ("_lastUpdated", "lt2026-12-02"),
            ("_count", "10"),
            ("_cursor", "41"),
        ]
    )
    request = export_request(query, query.getall)
    assert request.patient_id == patient and request.page_size == 10 and request.page_token == "41"
    assert request.time_from.ToSeconds() == ts("2026-12-01") and request.time_before.ToSeconds() == ts("2026-12-02")
    plain = MultiDict[str]()
    request = export_request(plain, plain.getall)
    assert not request.patient_id and not request.HasField("time_from") and request.page_size == 100
    for bad in (
        [("patient", "Practitioner/prn-" + "b" * 32)],
        [("_count", "0")],
        [("_count", "1001")],
        [("_count", "9" * 5000)],  # more digits than int() takes: still a 400
        [("date", "ge2026-12-02"), ("date", "lt2026-12-01")],
    ):
        with pytest.raises(FhirError) as caught:
            query = MultiDict(bad)
            export_request(query, query.getall)
        assert caught.value.status == 400


def test_action_and_subtype_filter() -> None:
    event = {"action": "R", "subtype": [{"system": "urn:medledger:audit-entry-type", "code": "record.disclosed"}]}
    assert matches(event, set(), set())
    assert matches(event, {"R", "C"}, {"record.disclosed"})
    assert not matches(event, {"C"}, set())
    assert not matches(event, set(), {"record.stored"})
