"""FHIR search terms without I/O: the documented table of token parameters per resource type, the
three forms of a token (`system|code`, `code`, `|code`), FHIR date ranges and their prefixes."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from medledger_devstack import synthetic
from medledger_records import search_terms as st
from medledger_runtime.errors import InvalidArgument
from medledger_runtime.fhir_search import DATE_ELEMENTS, TOKEN_PARAMETERS

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
NOW = datetime(2026, 12, 7, tzinfo=UTC)


def cc(system: str, code: str) -> dict[str, object]:
    return {"coding": [{"system": system, "code": code, "display": "shown, not indexed"}], "text": "free text"}


def ident(system: str, value: str) -> dict[str, object]:
    return {"system": system, "value": value}


# One resource of each indexed type, and what each of its parameters must find: (parameter,
# query value) pairs that must match, in all three forms where the value has a system.
EXAMPLES: list[tuple[dict[str, object], list[tuple[str, str, str]]]] = [
    (
        {
            "resourceType": "Observation",
            "status": "final",
            "code": cc(LOINC, "8867-4"),
            "category": [cc("http://terminology.hl7.org/CodeSystem/observation-category", "vital-signs")],
            "identifier": [ident("urn:lab", "L-1")],
        },
        [
            ("code", LOINC, "8867-4"),
            ("category", "http://terminology.hl7.org/CodeSystem/observation-category", "vital-signs"),
            ("status", "", "final"),
            ("identifier", "urn:lab", "L-1"),
        ],
    ),
    (
        {
            "resourceType": "Condition",
            "code": cc(SNOMED, "44054006"),
            "category": [cc("http://terminology.hl7.org/CodeSystem/condition-category", "problem-list-item")],
            "clinicalStatus": cc("http://terminology.hl7.org/CodeSystem/condition-clinical", "active"),
            "verificationStatus": cc("http://terminology.hl7.org/CodeSystem/condition-ver-status", "confirmed"),
            "identifier": [ident("urn:c", "C-1")],
        },
        [
            ("code", SNOMED, "44054006"),
            ("category", "http://terminology.hl7.org/CodeSystem/condition-category", "problem-list-item"),
            ("clinical-status", "http://terminology.hl7.org/CodeSystem/condition-clinical", "active"),
            ("verification-status", "http://terminology.hl7.org/CodeSystem/condition-ver-status", "confirmed"),
            ("identifier", "urn:c", "C-1"),
        ],
    ),
    (
        {
            "resourceType": "Procedure",
            "status": "completed",
            "code": cc(SNOMED, "73761001"),
            "category": cc(SNOMED, "1"),
        },
        [("code", SNOMED, "73761001"), ("category", SNOMED, "1"), ("status", "", "completed")],
    ),
    (
        {
            "resourceType": "MedicationRequest",
            "status": "active",
            "intent": "order",
            "medicationCodeableConcept": cc("http://www.nlm.nih.gov/research/umls/rxnorm", "313782"),
            "category": [cc("urn:mc", "community")],
        },
        [
            ("code", "http://www.nlm.nih.gov/research/umls/rxnorm", "313782"),
            ("status", "", "active"),
            ("intent", "", "order"),
            ("category", "urn:mc", "community"),
        ],
    ),
    (
        {
            "resourceType": "Immunization",
            "status": "completed",
            "vaccineCode": cc("http://hl7.org/fhir/sid/cvx", "140"),
        },
        [("vaccine-code", "http://hl7.org/fhir/sid/cvx", "140"), ("status", "", "completed")],
    ),
    (
        {
            "resourceType": "Encounter",
            "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
            "type": [cc(SNOMED, "185345009")],
        },
        [
            ("class", "http://terminology.hl7.org/CodeSystem/v3-ActCode", "AMB"),
            ("type", SNOMED, "185345009"),
            ("status", "", "finished"),
        ],
    ),
    (
        {
            "resourceType": "DiagnosticReport",
            "status": "final",
            "code": cc(LOINC, "51990-0"),
            "category": [cc("http://terminology.hl7.org/CodeSystem/v2-0074", "LAB")],
        },
        [("code", LOINC, "51990-0"), ("category", "http://terminology.hl7.org/CodeSystem/v2-0074", "LAB")],
    ),
    (
        {
            "resourceType": "AllergyIntolerance",
            "code": cc(SNOMED, "300916003"),
            "category": ["food"],
            "criticality": "low",
            "type": "allergy",
        },
        [
            ("code", SNOMED, "300916003"),
            ("category", "", "food"),
            ("criticality", "", "low"),
            ("type", "", "allergy"),
        ],
    ),
    (
        {"resourceType": "CarePlan", "status": "active", "intent": "order", "category": [cc(SNOMED, "736353004")]},
        [("category", SNOMED, "736353004"), ("status", "", "active"), ("intent", "", "order")],
    ),
    (
        {"resourceType": "Claim", "status": "active", "use": "claim", "priority": cc("urn:p", "normal")},
        [("status", "", "active"), ("use", "", "claim"), ("priority", "urn:p", "normal")],
    ),
]


def test_the_table_covers_the_resource_types_the_issue_names() -> None:
    wanted = {
        "Observation": {"code", "category", "status", "identifier"},
        "Condition": {"code", "category", "identifier"},
        "Procedure": {"code", "category", "status", "identifier"},
        "MedicationRequest": {"code", "category", "status", "identifier"},
        "Immunization": {"vaccine-code", "status", "identifier"},
        "Encounter": {"type", "class", "status", "identifier"},
        "DiagnosticReport": {"code", "category", "status", "identifier"},
        "AllergyIntolerance": {"code", "category", "identifier"},
        "CarePlan": {"category", "status", "identifier"},
        "Claim": {"status", "identifier"},
    }
    for resource_type, parameters in wanted.items():
        assert parameters <= set(TOKEN_PARAMETERS[resource_type]), resource_type
        assert resource_type in DATE_ELEMENTS


@pytest.mark.parametrize(("resource", "expected"), EXAMPLES, ids=[str(e[0]["resourceType"]) for e in EXAMPLES])
def test_each_parameter_of_each_type_is_found_in_every_form(
    resource: dict[str, object], expected: list[tuple[str, str, str]]
) -> None:
    rt = str(resource["resourceType"])
    terms = st.resource_terms(resource)
    for parameter, system, code in expected:
        field = f"{parameter}"
        assert st.query_term(rt, parameter, code, field) in terms, (parameter, code)  # any system
        if system:
            assert st.query_term(rt, parameter, f"{system}|{code}", field) in terms
            assert st.query_term(rt, parameter, f"|{code}", field) not in terms  # it has a system
            assert st.query_term(rt, parameter, f"urn:other|{code}", field) not in terms
        else:
            assert st.query_term(rt, parameter, f"|{code}", field) in terms
    # Display texts, free text and codes under another parameter are no terms.
    assert st.query_term(rt, "status", "shown, not indexed", "f") not in terms
    for parameter, _, code in expected:
        for other in TOKEN_PARAMETERS[rt]:
            if other != parameter and not any(p == other and c == code for p, _, c in expected):
                assert st.query_term(rt, other, code, "f") not in terms


def test_a_term_binds_the_resource_type_and_tells_the_forms_apart() -> None:
    assert st.term("Observation", "code", "any", "", "x") != st.term("Condition", "code", "any", "", "x")
    # A code holding `|` without a system is not the same term as a system and a code.
    assert st.query_term("Observation", "code", "a\\|b", "f") != st.query_term("Observation", "code", "a|b", "f")
    assert st.query_term("Observation", "code", "a\\|b", "f") == st.term("Observation", "code", "any", "", "a|b")
    assert st.resource_terms({"resourceType": "Patient", "identifier": [ident("urn:x", "1")]}) == set()


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "1-512"),
        ("x" * 513, "1-512"),
        ("http://loinc.org|", "a code is required"),
        ("a|b|c", "not a token"),
        ("bad\\escape", "not a token"),
        ("tab\there", "control"),
    ],
)
def test_malformed_token_values_name_the_field(value: str, reason: str) -> None:
    with pytest.raises(InvalidArgument, match=reason) as refused:
        st.query_term("Observation", "code", value, "tokens[0].values[1]")
    assert refused.value.violations[0].field == "tokens[0].values[1]"


def test_unknown_types_and_parameters_are_refused() -> None:
    for bad in ("", "Observations", "observation", "Foo", "Obs ervation"):
        with pytest.raises(InvalidArgument) as refused:
            st.check_resource_type(bad)
        assert refused.value.violations[0].field == "resource_type"
    assert st.check_resource_type("Patient") == "Patient"
    with pytest.raises(InvalidArgument, match="known: category, code, identifier, status"):
        st.check_token_parameter("Observation", "code:text", "tokens[0].parameter")


def d(text: str) -> st.DateRange:
    found = st.parse_date(text)
    assert found is not None, text
    return found


def test_dates_are_ranges_at_their_precision() -> None:
    assert d("2020") == st.DateRange(datetime(2020, 1, 1, tzinfo=UTC), datetime(2021, 1, 1, tzinfo=UTC))
    assert d("2020-12") == st.DateRange(datetime(2020, 12, 1, tzinfo=UTC), datetime(2021, 1, 1, tzinfo=UTC))
    assert d("2020-02-28").high == datetime(2020, 2, 29, tzinfo=UTC)
    assert d("2020-06-01T10:00:00+02:00").low == datetime(2020, 6, 1, 8, tzinfo=UTC)
    assert d("2020-06-01T10:00:00+02:00").high == datetime(2020, 6, 1, 8, 0, 1, tzinfo=UTC)
    assert d("2020-06-01T10:00Z").high == datetime(2020, 6, 1, 10, 1, tzinfo=UTC)
    assert d("2020-06-01T10:00:00.25Z").high == datetime(2020, 6, 1, 10, 0, 0, 260000, tzinfo=UTC)
    assert d("9999").high == st.LATEST
    for bad in ("20", "2020-13", "2020-02-30", "2020-06-01T25:00Z", "2020/06/01", "2020-06-01T10:00+15:00"):
        assert st.parse_date(bad) is None, bad


@pytest.mark.parametrize(
    ("query", "resource", "matches"),
    [
        ("2020", "2020-06-01", True),
        ("eq2020", "2019-12-31T23:59:59Z", False),
        ("eq2020-06", "2020-06-15T10:00:00Z", True),
        ("eq2020-06-15", "2020-06", False),  # a month is not within a day
        ("ne2020", "2019-05-01", True),
        ("ne2020", "2020-05-01", False),
        ("gt2020", "2021-01-01", True),
        ("gt2020", "2020-12-31", False),
        ("ge2020", "2020-01-01", True),
        ("ge2020", "2019-12-31", False),
        ("lt2020", "2019-12-31", True),
        ("lt2020", "2020-01-01", False),
        ("le2020", "2020-12-31", True),
        ("le2020", "2021-01-01", False),
        ("sa2020", "2021-01-01", True),
        ("sa2020", "2020-12-31", False),
        ("eb2020", "2019-12-31", True),
        ("eb2020", "2020-01-01", False),
        ("ap2026-12-01", "2026-12-02", True),
        ("ap2020-01-01", "2020-06-01", True),  # 10% of ~7 years either side
        ("ap2026-12-01", "2026-11-01", False),
    ],
)
def test_date_prefixes_follow_fhir(query: str, resource: str, matches: bool) -> None:
    prefix, wanted = st.parse_date_query(query, "dates[0].value")
    assert st.date_matches(prefix, wanted, d(resource), NOW) is matches


def test_periods_and_open_ends() -> None:
    ongoing = st.resource_date({"resourceType": "Encounter", "period": {"start": "2020-03-01T09:00:00Z"}})
    assert ongoing is not None and ongoing.high == st.LATEST
    assert st.date_matches("ge", d("2025"), ongoing, NOW)
    assert not st.date_matches("eq", d("2020-03"), ongoing, NOW)  # it may still go on
    closed = st.resource_date({"resourceType": "CarePlan", "period": {"start": "2020-03-01", "end": "2020-03-20"}})
    assert closed is not None and st.date_matches("eq", d("2020-03"), closed, NOW)


def test_each_type_has_its_clinical_date_and_the_first_present_element_wins() -> None:
    examples: dict[str, tuple[dict[str, Any], str]] = {
        "Observation": ({"effectiveDateTime": "2020-01-02", "issued": "2021-01-01T00:00:00Z"}, "2020-01-02"),
        "DiagnosticReport": ({"effectivePeriod": {"start": "2020-01-02", "end": "2020-01-02"}}, "2020-01-02"),
        "Condition": ({"onsetDateTime": "2020-01-02", "recordedDate": "2021-01-01"}, "2020-01-02"),
        "Procedure": ({"performedDateTime": "2020-01-02"}, "2020-01-02"),
        "Encounter": ({"period": {"start": "2020-01-02", "end": "2020-01-02"}}, "2020-01-02"),
        "Immunization": ({"occurrenceDateTime": "2020-01-02"}, "2020-01-02"),
        "MedicationRequest": ({"authoredOn": "2020-01-02"}, "2020-01-02"),
        "AllergyIntolerance": ({"recordedDate": "2020-01-02", "onsetDateTime": "2010"}, "2020-01-02"),
        "CarePlan": ({"period": {"start": "2020-01-02", "end": "2020-01-02"}}, "2020-01-02"),
        "Claim": ({"created": "2020-01-02"}, "2020-01-02"),
    }
    assert set(examples) == set(DATE_ELEMENTS)
    for resource_type, (elements, day) in examples.items():
        assert st.resource_date({"resourceType": resource_type, **elements}) == d(day), resource_type
    observation = {"resourceType": "Observation", "issued": "2021-01-01T00:00:00Z"}
    assert st.resource_date(observation) == d("2021-01-01T00:00:00Z")  # no effective: issued
    assert st.resource_date({"resourceType": "Immunization", "occurrenceString": "last spring"}) is None
    assert st.resource_date({"resourceType": "Patient", "birthDate": "2000"}) is None


@pytest.mark.parametrize(
    ("value", "reason"),
    [("xx2020", "unknown prefix"), ("ge20-01", "not a FHIR date"), ("", "a date"), ("ge", "not a FHIR date")],
)
def test_bad_date_values_name_the_field(value: str, reason: str) -> None:
    with pytest.raises(InvalidArgument, match=reason) as refused:
        st.parse_date_query(value, "dates[2].value")
    assert refused.value.violations[0].field == "dates[2].value"


def test_last_updated_bounds() -> None:
    year = d("2020")
    low, high = year.low.timestamp(), year.high.timestamp()
    assert st.last_updated_bounds("eq", year) == (low, high)
    assert st.last_updated_bounds("ge", year) == (low, None)
    assert st.last_updated_bounds("gt", year) == (high, None)
    assert st.last_updated_bounds("lt", year) == (None, low)
    assert st.last_updated_bounds("le", year) == (None, high)


def test_every_synthetic_resource_of_an_indexed_type_has_terms_and_a_date(
    synthetic_patients: synthetic.Population,
) -> None:
    """Synthea's resources (R4): each of the ten types yields its codes' terms and a date."""
    seen = set()
    for resource in synthetic_patients.resources():
        resource_type = resource["resourceType"]
        if resource_type not in TOKEN_PARAMETERS:
            continue
        seen.add(resource_type)
        terms = st.resource_terms(resource)
        assert terms, resource_type
        if "status" in TOKEN_PARAMETERS[resource_type]:
            assert st.query_term(resource_type, "status", resource["status"], "f") in terms, resource_type
        assert st.resource_date(resource) is not None, (resource_type, resource.get("id"))
    assert {"Observation", "Condition", "Encounter", "Procedure", "Immunization", "Claim"} <= seen
