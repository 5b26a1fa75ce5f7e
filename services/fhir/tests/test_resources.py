"""The instance-level routes' pure helpers: purpose of use, the patient a resource is filed
under, idempotency ids, If-None-Exist, Provenance ids, headers and records' content errors."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from medledger.types.v1 import vocabulary_pb2 as vocab

from medledger_fhir import http, ids, resources
from medledger_fhir.outcomes import FhirError
from medledger_fhir.resource_types import CLINICAL_TYPES
from medledger_sdk.calls import RpcError

P = vocab.PurposeOfUse


def status_of(call: object) -> int:
    with pytest.raises(FhirError) as raised:
        call()  # type: ignore[operator]
    return raised.value.status


def test_purpose_of_use_is_an_hl7_v3_code_bare_or_with_its_system_treat_by_default() -> None:
    assert http.purpose_of_use(None) == http.purpose_of_use("") == P.PURPOSE_OF_USE_TREAT
    assert http.purpose_of_use("ETREAT") == P.PURPOSE_OF_USE_ETREAT
    assert http.purpose_of_use("hresch") == P.PURPOSE_OF_USE_HRESCH
    assert http.purpose_of_use(f"{http.PURPOSE_SYSTEM}|HPAYMT") == P.PURPOSE_OF_USE_HPAYMT
    assert http.purpose_of_use("|PUBHLTH") == P.PURPOSE_OF_USE_PUBHLTH
    # Every proto purpose has its code, and nothing else is one.
    assert set(http.PURPOSES.values()) == {v.number for v in P.DESCRIPTOR.values if v.number}
    for bad in ("UNSPECIFIED", "treatment", "http://example.org|TREAT", "TREAT,ETREAT"):
        assert status_of(lambda bad=bad: http.purpose_of_use(bad)) == 400


HEX = "0123456789abcdef" * 2


def test_fhir_ids_are_record_and_principal_ids_without_underscores() -> None:
    assert ids.fhir_id(f"rec_{HEX}") == f"rec-{HEX}"
    assert ids.service_id(f"rec-{HEX}") == ids.service_id(f"rec_{HEX}") == f"rec_{HEX}"
    assert resources.principal_id_of(f"pat-{HEX}") == resources.principal_id_of(f"pat_{HEX}") == f"pat_{HEX}"
    for other in (f"prn-{HEX}", f"pat-{HEX}0", "pat-1", f"pat-{HEX.upper()}"):
        assert resources.principal_id_of(other) is None


def test_the_patient_is_the_subject_or_patient_reference_else_422_naming_the_element() -> None:
    relative = {"resourceType": "Observation", "subject": {"reference": f"Patient/pat-{HEX}"}}
    assert resources.patient_of(relative) == f"pat_{HEX}"
    absolute = {"resourceType": "Immunization", "patient": {"reference": f"http://h/fhir/R4/Patient/pat_{HEX}"}}
    assert resources.patient_of(absolute) == f"pat_{HEX}"
    for resource, element in (
        ({"resourceType": "Observation"}, "Observation.subject"),
        ({"resourceType": "Observation", "subject": {"reference": "Group/g1"}}, "Observation.subject"),
        ({"resourceType": "Observation", "subject": {"reference": f"Practitioner/pat-{HEX}"}}, "Observation.subject"),
        ({"resourceType": "Observation", "subject": {"reference": "Patient/pat_1"}}, "Observation.subject"),
        ({"resourceType": "Observation", "subject": {"display": "someone"}}, "Observation.subject"),
        ({"resourceType": "AllergyIntolerance", "patient": {"reference": "Patient/a b"}}, "AllergyIntolerance.patient"),
        ({"resourceType": "Observation", "subject": f"Patient/pat-{HEX}"}, "Observation.subject"),
    ):
        with pytest.raises(FhirError) as raised:
            resources.patient_of(resource)
        assert raised.value.status == 422 and raised.value.expression == (element,)


def test_request_ids_are_derived_per_caller_and_operation_or_fresh() -> None:
    one = http.request_id("abc", principal_id="prn_1", operation="create:Observation")
    assert one == http.request_id("abc", principal_id="prn_1", operation="create:Observation")
    assert one != http.request_id("abc", principal_id="prn_2", operation="create:Observation")
    assert one != http.request_id("abc", principal_id="prn_1", operation="update:Observation/rec_1")
    fresh = {http.request_id(None, principal_id="prn_1", operation="x") for _ in range(3)}
    assert len(fresh) == 3
    assert status_of(lambda: http.request_id("x" * 129, principal_id="p", operation="o")) == 400
    assert status_of(lambda: http.request_id("a\nb", principal_id="p", operation="o")) == 400


def test_if_none_exist_takes_identifiers_and_ids_and_refuses_other_parameters() -> None:
    assert resources.if_none_exist("identifier=urn:x|1,urn:x|2&_id=rec_a") == resources.ExistCriteria(
        ("urn:x|1", "urn:x|2"), ("rec_a",)
    )
    assert resources.if_none_exist("Observation?identifier=http%3A%2F%2Fs%7Cv").identifiers == ("http://s|v",)
    for bad in ("", "code=123", "identifier=", "identifier=a&status=final"):
        assert status_of(lambda bad=bad: resources.if_none_exist(bad)) == 400
    # Values are checked as search values are: an id is a FHIR id, an identifier system|value.
    assert resources.if_none_exist("identifier=urn:x|A 1").identifiers == ("urn:x|A 1",)
    for bad in ("_id=../../etc", "_id=' OR 1=1 --", "identifier=a|b|c", "identifier=%00", "identifier=a  b"):
        assert status_of(lambda bad=bad: resources.if_none_exist(bad)) == 400


def test_provenance_ids_name_a_record_version() -> None:
    pid = resources.provenance_id(f"rec_{HEX}", 12)
    assert pid == f"rec-{HEX}-12" and resources.parse_provenance_id(pid) == (f"rec_{HEX}", 12)
    for bad in ("rec-0af3", "rec-0af3-", "-3", "rec-0af3-0", "rec-0af3-x"):
        assert resources.parse_provenance_id(bad) is None


def test_headers_last_modified_prefer_and_count() -> None:
    assert resources.last_modified({"meta": {"lastUpdated": "2026-12-07T03:04:05.123Z"}}) == (
        "Mon, 07 Dec 2026 03:04:05 GMT"
    )
    assert resources.last_modified({"meta": {"lastUpdated": "2026-12-07T04:04:05+01:00"}}) == (
        "Mon, 07 Dec 2026 03:04:05 GMT"
    )
    assert resources.last_modified({}) is None and resources.last_modified({"meta": {"lastUpdated": "x"}}) is None
    assert resources.prefers_minimal("return=minimal")
    assert resources.prefers_minimal("handling=strict, return=minimal")
    assert not resources.prefers_minimal("return=representation") and not resources.prefers_minimal(None)
    assert resources.history_count(None) == 20 and resources.history_count("100") == 100
    for bad in ("0", "101", "-1", "ten"):
        assert status_of(lambda bad=bad: resources.history_count(bad)) == 400


def rpc_error(code: grpc.StatusCode, fields: list[str]) -> RpcError:
    bad = error_details_pb2.BadRequest(
        field_violations=[error_details_pb2.BadRequest.FieldViolation(field=f, description="bad") for f in fields]
    )
    detail = any_pb2.Any()
    detail.Pack(bad)
    status = status_pb2.Status(code=code.value[0], message="invalid", details=[detail])
    trailing = grpc.aio.Metadata(("grpc-status-details-bin", status.SerializeToString()))
    return RpcError(grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, "invalid"))


def test_records_refusing_the_content_is_422_with_fhirpath_other_errors_pass() -> None:
    invalid = resources.content_error(
        rpc_error(grpc.StatusCode.INVALID_ARGUMENT, ["content.status", "content.code.coding[0]"]), "Observation"
    )
    assert invalid is not None and invalid.status == 422
    assert invalid.expression == ("Observation.status", "Observation.code.coding[0]")
    whole = resources.content_error(rpc_error(grpc.StatusCode.INVALID_ARGUMENT, ["content"]), "Condition")
    assert whole is not None and whole.expression == ("Condition",)
    # Not the content's fault (a request field), or not INVALID_ARGUMENT: the usual mapping.
    assert resources.content_error(rpc_error(grpc.StatusCode.INVALID_ARGUMENT, ["patient_id"]), "Observation") is None
    assert resources.content_error(rpc_error(grpc.StatusCode.NOT_FOUND, ["content.x"]), "Observation") is None


def test_declarations_cover_every_clinical_type_provenance_and_patient() -> None:
    declared = resources.declarations()
    assert set(declared) == CLINICAL_TYPES | {"Provenance", "Patient"}
    assert set(declared["Observation"].interactions) == {"read", "vread", "update", "history-instance", "create"}
    assert declared["Observation"].conditional_create and declared["Observation"].versioning == "versioned-update"
    assert declared["Patient"].interactions == ("read",)
    assert declared["Provenance"].interactions == ("read", "search-type")
    assert [p.name for p in declared["Provenance"].search_params] == ["target"]


def test_a_type_naming_no_patient_is_read_but_not_created_or_updated_here() -> None:
    declared = resources.declarations()
    # Medication has no subject or patient: nothing here could say whose it is.
    assert "Medication" not in resources.WRITABLE_TYPES
    assert set(declared["Medication"].interactions) == {"read", "vread", "history-instance"}
    assert not declared["Medication"].conditional_create
    assert CLINICAL_TYPES - {"Medication"} == resources.WRITABLE_TYPES


def test_a_provenance_target_names_a_clinical_record_and_maybe_its_version() -> None:
    assert resources.parse_target(f"Observation/rec-{HEX}") == ("Observation", f"rec_{HEX}", 0)
    assert resources.parse_target(f"http://h/fhir/R4/Condition/rec-{HEX}/_history/3") == ("Condition", f"rec_{HEX}", 3)
    for bad in (None, "", "nothing", f"Patient/pat-{HEX}", f"Observation/{'x' * 65}", "Observation/' OR 1=1"):
        assert resources.parse_target(bad) is None, bad
