"""FHIR search parameters as the gateway reads them: what records is asked, what the self link
keeps, and hostile values refused (400) or passed on as plain values, never interpreted."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qs, urlparse

import grpc
import pytest
from aiohttp.test_utils import make_mocked_request
from medledger.records.v1 import records_service_pb2 as pb

from medledger_fhir.backends import Backends
from medledger_fhir.capability import Capabilities, TypeSupport
from medledger_fhir.http import purpose_of, strict_handling
from medledger_fhir.outcomes import FhirError
from medledger_fhir.search import (
    MAX_COUNT,
    PAGE_TOKEN_PARAM,
    EverythingCursor,
    declarations,
    everything_params,
    everything_scope,
    parse_search,
    run_everything,
)
from medledger_runtime.auth import Caller, ScopeSet
from medledger_runtime.errors import PermissionDenied

TREAT = 1
PATIENT = [("patient", "Patient/pat-0a1b")]


def parse(params: list[tuple[str, str]], *, strict: bool = False, resource_type: str = "Observation") -> Any:
    return parse_search(resource_type, params, strict=strict)


def refused(params: list[tuple[str, str]], **kw: Any) -> FhirError:
    with pytest.raises(FhirError) as caught:
        parse(params, **kw)
    assert caught.value.status == 400
    return caught.value


def test_a_search_becomes_records_request() -> None:
    query = parse(
        [
            ("patient", "Patient/pat-0a1b"),
            ("code", "http://loinc.org|8310-5,|local,8331-1"),
            ("category", "vital-signs"),
            ("date", "ge2020-01-01"),
            ("date", "lt2021-06-01T10:00:00Z"),
            ("_lastUpdated", "gt2026-01-01T00:00:00.123+02:00"),
            ("_id", "rec-1f,rec-2e"),
            ("_count", "10"),
        ]
    )
    request = query.request(TREAT)
    assert request.patient_id == "pat_0a1b"  # the FHIR id back to the principal id
    assert request.resource_type == "Observation"
    assert [(t.parameter, list(t.values)) for t in request.tokens] == [
        ("code", ["http://loinc.org|8310-5", "|local", "8331-1"]),
        ("category", ["vital-signs"]),
    ]
    assert [(d.parameter, d.value) for d in request.dates] == [
        ("date", "ge2020-01-01"),
        ("date", "lt2021-06-01T10:00:00Z"),
    ]
    assert list(request.last_updated) == ["gt2026-01-01T00:00:00.123+02:00"]
    assert list(request.record_ids) == ["rec_1f", "rec_2e"]
    assert request.page_size == 10 and not request.count_only and request.purpose == TREAT


@pytest.mark.parametrize("value", ["Patient/pat-0a1b", "pat-0a1b", "pat_0a1b", "http://x/fhir/R4/Patient/pat-0a1b"])
def test_patient_or_subject_in_any_form(value: str) -> None:
    assert parse([("patient", value)]).patient_id == "pat_0a1b"
    assert parse([("subject", value)]).patient_id == "pat_0a1b"
    assert parse([("subject:Patient", value)]).patient_id == "pat_0a1b"


def test_no_patient_is_refused_saying_why() -> None:
    error = refused([("code", "8310-5")])
    assert "compartment" in error.message and error.expression == ("patient",)
    refused([("patient", "Patient/pat-1"), ("subject", "Patient/pat-2")])
    refused([("patient", "pat-1,pat-2")])
    refused([("subject", "Group/g-1")])
    refused([("subject:Group", "g-1")])


def test_unknown_parameters_strict_or_lenient() -> None:
    lenient = parse([*PATIENT, ("colour", "blue"), ("_sort", "date"), ("_summary", "true")])
    assert [name for name, _ in lenient.used] == ["patient", "_count"]  # the self link shows only what was used
    assert lenient.count == 50
    error = refused([*PATIENT, ("colour", "blue")], strict=True)
    assert "colour" in error.message and "blue" not in error.message
    refused([*PATIENT, ("_summary", "true")], strict=True)
    # A parameter of another type is unknown here.
    refused([*PATIENT, ("vaccine-code", "140")], strict=True)
    assert parse([*PATIENT, ("vaccine-code", "140")], resource_type="Immunization").tokens == [
        ("vaccine-code", ("140",))
    ]
    # A type records keeps no clinical date for takes no `date`.
    refused([*PATIENT, ("date", "ge2020")], strict=True, resource_type="Goal")


def test_modifiers_are_never_silently_dropped() -> None:
    for name in ("code:text", "code:not", "status:missing", "date:exact"):
        refused([*PATIENT, (name, "x")])


def test_count_and_summary() -> None:
    assert parse([*PATIENT, ("_count", "99999")]).count == MAX_COUNT
    assert parse([*PATIENT, ("_count", "0")]).count_only
    counted = parse([*PATIENT, ("_summary", "count")])
    assert counted.count_only and counted.request(TREAT).page_size == 0 and counted.request(TREAT).count_only
    for bad in ("-1", "ten", "1e3", "", "1" * 10):
        refused([*PATIENT, ("_count", bad)])


def test_include_and_revinclude() -> None:
    query = parse([*PATIENT, ("_revinclude", "Provenance:target"), ("_include", "Observation:patient")])
    assert query.revinclude_provenance and query.include_patient
    assert not parse([*PATIENT, ("_revinclude", "Device:patient")]).revinclude_provenance
    refused([*PATIENT, ("_revinclude", "Device:patient")], strict=True)


@pytest.mark.parametrize(
    "value",
    ["' OR '1'='1", "x'; DROP TABLE records; --", "%' UNION SELECT * FROM keys --", '{"$ne": null}', "<script>"],
)
def test_injection_shaped_tokens_are_just_values(value: str) -> None:
    query = parse([*PATIENT, ("code", value)])
    assert query.tokens == [("code", (value,))]  # passed on verbatim: records hashes it, never runs it


@pytest.mark.parametrize(
    "params",
    [
        [*PATIENT, ("code", "x" * 600)],
        [*PATIENT, ("code", ",".join(["c"] * 60))],
        [*PATIENT, *[("status", "final")] * 45],
        [*PATIENT, *[("status", "final")] * 11],  # more token matches than records takes
        [*PATIENT, *[("date", "ge2020")] * 5],
        [*PATIENT, ("_id", ",".join(f"rec-{i}" for i in range(101)))],
        [*PATIENT, ("code", "a\x00b")],
        [*PATIENT, ("code", "a\nb")],
        [*PATIENT, ("code", "a|b|c")],
        [*PATIENT, ("code", ",")],
        [("patient", "Patient/1; DROP TABLE x")],
        [("patient", "Patient/" + "a" * 65)],
        [("patient", "../../etc/passwd")],
        [*PATIENT, ("date", "2020-13-01")],
        [*PATIENT, ("date", "ge2020-01-01' OR 1=1")],
        [*PATIENT, ("date", "ge2020,le2021")],
        [*PATIENT, ("_lastUpdated", "yesterday")],
        [*PATIENT, ("_id", "rec 1")],
        [*PATIENT, (PAGE_TOKEN_PARAM, "a b")],
        [*PATIENT, (PAGE_TOKEN_PARAM, "x" * 3000)],
        [*PATIENT, ("x" * 100, "1")],
    ],
)
def test_hostile_values_are_refused(params: list[tuple[str, str]]) -> None:
    error = refused(params)
    assert "DROP" not in error.message and "passwd" not in error.message  # values are never echoed


def test_links_carry_the_used_parameters_and_the_page_token() -> None:
    query = parse([*PATIENT, ("code", "8310-5"), ("colour", "blue"), (PAGE_TOKEN_PARAM, "abc")])
    assert query.page_token == "abc"
    assert query.link_params("next-1") == [
        ("patient", "Patient/pat-0a1b"),
        ("code", "8310-5"),
        ("_count", "50"),
        (PAGE_TOKEN_PARAM, "next-1"),
    ]


def test_prefer_handling_and_purpose_headers() -> None:
    def request(**headers: str) -> Any:
        return make_mocked_request("GET", "/fhir/R4/Observation", headers=headers)

    assert strict_handling(request(Prefer="handling=strict"))
    assert strict_handling(request(Prefer='return=minimal, handling="strict"'))
    assert not strict_handling(request(Prefer="handling=lenient"))
    assert not strict_handling(request())
    assert purpose_of(request()) == TREAT
    assert purpose_of(request(**{"X-Purpose-Of-Use": "hresch"})) == 3
    with pytest.raises(FhirError) as caught:
        purpose_of(request(**{"X-Purpose-Of-Use": "'; DROP"}))
    assert caught.value.status == 400


def test_everything_cursor_round_trips_and_refuses_forgeries() -> None:
    cursor = EverythingCursor(3, "tok_9", (2, 5))
    count, back = everything_params([("_count", "20"), (PAGE_TOKEN_PARAM, cursor.encode())], strict=True)
    assert count == 20 and back == cursor
    for forged in ("!!", "eyJ4IjoxfQ", EverythingCursor(999, "", ()).encode(), "A" * 3000):
        with pytest.raises(FhirError):
            everything_params([(PAGE_TOKEN_PARAM, forged)], strict=False)
    with pytest.raises(FhirError):
        everything_params([("_count", "0")], strict=False)


def test_search_declarations_merge_with_another_modules() -> None:
    capabilities = Capabilities()
    capabilities.declare({"Observation": TypeSupport(interactions=("read", "create"))})
    capabilities.declare(declarations())
    statement = capabilities.statement("http://x/fhir/R4", "http://x/token")
    observation = next(r for r in statement["rest"][0]["resource"] if r["type"] == "Observation")
    assert [i["code"] for i in observation["interaction"]] == ["read", "create", "search-type"]
    assert {"patient", "code", "date", "_lastUpdated"} <= {p["name"] for p in observation["searchParam"]}
    with pytest.raises(ValueError, match="declared twice"):
        capabilities.declare({"Observation": TypeSupport(interactions=("search-type",))})


def test_request_is_a_records_search() -> None:
    assert isinstance(parse(PATIENT).request(TREAT), pb.SearchRecordsRequest)


class FakeSearch:
    """records' SearchRecords over a few stored resources per type, paged by offset."""

    def __init__(self, stored: dict[str, int]) -> None:
        self.stored = stored
        self.asked: list[str] = []

    async def SearchRecords(self, request: pb.SearchRecordsRequest, metadata: Any) -> Any:
        self.asked.append(request.resource_type)
        count = self.stored.get(request.resource_type, 0)
        start = int(request.page_token or 0)
        end = min(start + request.page_size, count)
        found = [
            pb.FoundRecord(
                summary=pb.RecordSummary(record_id=f"rec_{request.resource_type.lower()}{i}"),
                content=json.dumps({"resourceType": request.resource_type, "id": f"x{i}"}).encode(),
            )
            for i in range(start, end)
        ]
        return pb.SearchRecordsResponse(records=found, next_page_token=str(end) if end < count else "", total=count)


class NoPatient:
    async def GetPrincipal(self, request: Any, metadata: Any) -> Any:
        raise grpc.aio.AioRpcError(grpc.StatusCode.PERMISSION_DENIED, grpc.aio.Metadata(), grpc.aio.Metadata())


async def test_everything_pages_across_types_without_losing_or_repeating_one() -> None:
    records = FakeSearch({"Condition": 3, "Encounter": 1, "Observation": 5})
    backends = Backends(NoPatient(), None, records, None, ())  # type: ignore[arg-type]
    request = make_mocked_request("GET", "/", headers={"Authorization": "Bearer t"})
    params: list[tuple[str, str]] = [("_count", "4")]
    seen: list[str] = []
    pages = 0
    while True:
        bundle = await run_everything(backends, request, "pat-0a1b", params, "http://x/fhir/R4")
        assert len(bundle["entry"]) <= 4
        seen += [e["fullUrl"].rpartition("/")[2] for e in bundle["entry"]]
        pages += 1
        link = next((link["url"] for link in bundle["link"] if link["relation"] == "next"), None)
        if link is None:
            break
        assert link.startswith("http://x/fhir/R4/Patient/pat-0a1b/$everything?_count=4&_page_token=")
        params = [(k, v[0]) for k, v in parse_qs(urlparse(link).query).items()]
    expected = [f"rec-condition{i}" for i in range(3)] + ["rec-encounter0"] + [f"rec-observation{i}" for i in range(5)]
    assert sorted(seen) == sorted(expected) and len(seen) == len(set(seen)) and pages == 3


def test_everything_refuses_a_scoped_token_that_allows_none_of_its_types() -> None:
    request = make_mocked_request("GET", "/fhir/R4/Patient/pat-0a1b/$everything", match_info={"id": "pat-0a1b"})

    def caller(scopes: str | None, context: str = "pat_0a1b") -> Caller:
        parsed = None if scopes is None else ScopeSet.parse(scopes)
        return Caller("pat_0a1b", "patient", frozenset(), "", "t", 0.0, parsed, context)

    for allowed in (None, "patient/Observation.rs", "patient/Patient.r", "patient/*.rs", "user/Condition.s"):
        everything_scope(caller(allowed), request)  # each may ask: the services filter type by type
    for refused in ("patient/Basic.rs", "patient/Observation.c", "user/Consent.rs"):
        with pytest.raises(PermissionDenied):
            everything_scope(caller(refused), request)
    # A patient scope reaches only the patient in context.
    with pytest.raises(PermissionDenied):
        everything_scope(caller("patient/Observation.rs", context="pat_other"), request)
